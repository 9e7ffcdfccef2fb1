"""Dataflow Flex Templates, verified offline: strict metadata, regexes, parameters vs the jobs'
options, the image definition, build.sh, and every job's graph built by the DataflowRunner."""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys

import pytest
from apache_beam.options.pipeline_options import PipelineOptions
from google.cloud.dataflow_v1beta3 import ParameterType, TemplateMetadata

from skewless.beam_pipelines.io.bigquery import parse_query_parameter, validate_table_name
from skewless.beam_pipelines.jobs.score_streaming import on_off
from skewless.transforms.drift_calibration import parse_span
from skewless.transforms.featureset import load_feature_set
from skewless.transforms.record_checks import to_epoch_ms
from templates.render import job_flags, text_of
from tests.support import REPO_ROOT
from tests.support.dataflow import (
    AGGREGATE_STEPS,
    BIGTABLE,
    DATAFLOW,
    JOBS,
    SCORE_STREAM_STEPS,
    metadata,
    parameters,
    run_job,
    step_names,
    template_argv,
)
from tests.support.reference_tables import FLIGHTS_TABLES_SPEC

ROOT = REPO_ROOT


MAIN = ROOT / "templates" / "main.py"


# Good and bad values per parameter name (a name means the same thing in every template).
SAMPLES = {
    "gs": (
        ["gs://my-bucket/out", "gs://b-1.example/a/b/*.csv.gz", "gs://abc", "gs://my_bucket/"],
        ["/tmp/out", "gs://", "gs://Bad/x", "gs://-bucket/x", "s3://b/x", "gs://ab", "gs://b/x\ny"],
    ),
    "bigquery_table": (
        ["my-proj.ds.flights", "my-proj:ds.flights", "example.com:my-proj.ds.t_1", "my-proj.ds.Flights 2013"],
        ["ds.flights", "My-Proj.ds.t", "my-proj.d-s.t", "my-proj.ds.", "proj.ds.t", "my-proj..t"],
    ),
    "bigquery_project": (["my-proj", "example.com:my-proj"], ["My-Proj", "proj", "my-proj-", "1proj-id"]),
    "bigquery_temp_dataset": (["my-proj.tmp_ds"], ["my-proj", "tmp_ds", "my-proj.tmp-ds", "my-proj.ds.t"]),
    "bigquery_query_param": (
        ["origin=STRING:JFK", "min_delay=INT64:15", "day=DATE:2013-01-01", "note=STRING:a=b:c"],
        ["origin", "origin=JFK", "1x=STRING:a", "origin=string:JFK", "origin=STRUCT:x"],
    ),
    "instant": (
        ["2013-11-01", "2013-11-01T00:00:00Z", "2013-11-01T05:30:00.250+05:30", "2013-11-01 08:00"],
        ["yesterday", "2013/11/01", "2013-11-01T8:00", "1383264000", "2013-11-01T00:00:00 UTC"],
    ),
    "feature_set": (["flights", "tests.support.toy_featureset:CLICKS"], ["flights:", "my module:X", "pkg.mod", "pkg.:X"]),
    "eval_fraction": (["0.2", "0", "1", "1.0", ".25"], ["1.5", "-0.1", "abc", "20%", ""]),
    "drift_span": (["month", "30d", "2w", "12h", "3600", "0", "none"], ["1mo", "-1", "1.5d", "30 d", ""]),
    "positive": (["1", "8192", "7"], ["0", "-1", "1.5", "abc", "01"]),
    "label_window": (["6h", "90m", "2d", "3600", "1w"], ["0", "6 h", "-1h", "1.5h", "6hours", ""]),
    "label_time_field": (["label_time", "arrived_at", "_t"], ["", "1t", "label time", "a-b"]),
    "allowed_lateness_s": (["0", "600"], ["-1", "1.5", "ten", "0600"]),
    "top_n": (["0", "10000", "1"], ["-1", "1.5", "ten", "010", ""]),
    "prediction_cache": (["true", "false"], ["", "yes", "True", "1", "on"]),
    "model_poll_s": (["30", "30.0", "0.5", ".5"], ["-1", "abc", "1e3", ""]),
    "serving_log_sample": (["0.01", "1.0", "1", "0", ".5"], ["1.5", "-0.1", "2", "abc", "", "1e-3"]),
    "subscription": (
        ["projects/my-proj/subscriptions/events", "projects/example.com:my-proj/subscriptions/a.b~c+d%e"],
        ["events", "projects/my-proj/topics/events", "projects/my-proj/subscriptions/goog-x",
         "projects/my-proj/subscriptions/1abc", "projects/P/subscriptions/events"],
    ),  # fmt: skip
    "topic": (
        ["projects/my-proj/topics/dead-letters", "projects/my-proj/topics/predictions_v1"],
        ["dead-letters", "projects/my-proj/subscriptions/x", "projects/my-proj/topics/goog-x", "projects/my-proj/topics/ab"],
    ),
    "bigtable_instance": (["skewless-features", "abcdef"], ["abc", "Skewless", "skewless-", "1skewless"]),
    "bigtable_table": (["features", "flights_v1.2", "a"], ["", "bad/name", "bad name", "x" * 51]),
    "timestamp_attribute": (["event_time", "ts"], ["googts", "event time", ""]),
    "table": (["origin_weather", "plane", "dest_airport", "t1"], ["", "a#b", "a b", "1x", "w/x", "x" * 129]),
    "examples": (
        ["gs://my-bucket/prepared", "gs://my-bucket/labelled/*,gs://my-bucket/prepared/2013-11"],
        ["/tmp/out", "gs://my-bucket/a,", "gs://my-bucket/a,/tmp/b", "gs://Bad/x", "", "gs://b/x\ny"],
    ),
    "reference": (
        ["origin_weather=gs://my-bucket/weather.csv", "plane=gs://b-1.example/planes.parquet"],
        ["origin_weather", "=gs://my-bucket/x", "plane=/tmp/planes.csv", "a b=gs://my-bucket/x"],
    ),
}
SAMPLE_OF = {
    "input": "gs", "schema": "gs", "output_dir": "gs", "output": "gs", "dead_letter_dir": "gs", "model_dir": "gs",
    "eval_start": "instant", "start": "instant", "end": "instant", "bigtable_project": "bigquery_project",
    "model_version": "positive", "min_batch_size": "positive", "max_batch_size": "positive",
    "output_table": "bigquery_table", "output_topic": "topic", "dead_letter_topic": "topic",
    "write_retry_s": "model_poll_s",
    "serving_log_window_s": "positive", "serving_log": "gs",
    "monitor_topic": "topic", "monitor_window_s": "positive", "monitor_allowed_lateness_s": "allowed_lateness_s",
    "baseline": "gs", "baseline_schema": "gs", "prepared_dir": "gs", "validate_against": "gs",
    "label_files": "gs", "label_bigquery_table": "bigquery_table",
}  # fmt: skip


def samples(name: str) -> tuple[list[str], list[str]]:
    return SAMPLES[SAMPLE_OF.get(name, name)]


def all_parameters():
    return [(job.name, p) for job in JOBS.values() for p in parameters(job).values()]


@pytest.mark.timeout(60)
def test_there_is_a_template_per_declared_job_and_its_metadata_is_the_declaration_s():
    """The metadata files are rendered from the job declarations (templates/render.py): a
    declaration changed without rendering again fails here."""
    assert sorted(JOBS) == [
        "aggregate", "audit", "label_join", "precompute", "prepare", "publish_reference", "score",
        "score_streaming", "validate",
    ]  # fmt: skip
    assert sorted(p.parent.name for p in (ROOT / "templates").glob("*/metadata.json")) == sorted(JOBS)
    for name, job in JOBS.items():
        assert job.metadata_path.read_text() == text_of(name), f"{name}: run templates/render.py"
        assert json.loads(job.metadata_path.read_text())["description"] == job.job.description


@pytest.mark.timeout(60)
@pytest.mark.parametrize("name", sorted(JOBS))
def test_metadata_parses_strictly(name):
    text = JOBS[name].metadata_path.read_text()
    parsed = TemplateMetadata.from_json(text)  # unknown fields raise
    assert parsed.name and parsed.description
    raw = json.loads(text)
    assert "streaming" not in raw, "gcloud drops it at build time: the job sets streaming in code"
    names = [p["name"] for p in raw["parameters"]]
    assert len(names) == len(set(names)) == len(parsed.parameters)
    for p in parsed.parameters:
        assert p.label and p.help_text, p.name
        assert len(p.help_text) >= 20, p.name


@pytest.mark.timeout(60)
def test_strict_parsing_would_catch_a_typo():
    raw = metadata(JOBS["prepare"])
    raw["parameters"][0]["helptext"] = "typo of helpText"
    with pytest.raises(Exception, match="helptext"):
        TemplateMetadata.from_json(json.dumps(raw))


@pytest.mark.timeout(60)
@pytest.mark.parametrize(("job", "param"), all_parameters(), ids=lambda v: v if isinstance(v, str) else v["name"])
def test_every_regex_compiles_accepts_good_and_rejects_bad_values(job, param):
    regexes = param.get("regexes", [])
    if param.get("paramType") != "ENUM" and param["name"] != "bigquery_query":
        assert regexes, f"{job}: {param['name']} has no regex"
    if not regexes:
        return
    compiled = [re.compile(r) for r in regexes]
    for r in regexes:
        assert r.startswith("^") and r.endswith("$"), f"{param['name']}: anchor {r!r}"
    if param.get("paramType") == "ENUM":
        good = [o["value"] for o in param["enumOptions"]]
        bad = ["", "CSV", good[0] + "x"]
    else:
        good, bad = samples(param["name"])
    for value in good:
        assert all(c.fullmatch(value) for c in compiled), f"{param['name']}: rejects good {value!r}"
    for value in bad:
        assert not all(c.fullmatch(value) for c in compiled), f"{param['name']}: accepts bad {value!r}"
    if "defaultValue" in param:
        assert all(c.fullmatch(param["defaultValue"]) for c in compiled)


@pytest.mark.timeout(60)
def test_a_parameter_name_has_the_same_regex_in_every_template():
    seen: dict[str, list] = {}
    for _, param in all_parameters():
        regexes = param.get("regexes", [])
        assert seen.setdefault(param["name"], regexes) == regexes, param["name"]


@pytest.mark.timeout(60)
def test_regexes_agree_with_the_jobs_own_validators():
    """Values the templates accept are values the jobs accept."""
    for table in samples("bigquery_table")[0]:
        validate_table_name(table)
    for dataset in samples("bigquery_temp_dataset")[0]:
        validate_table_name(f"{dataset}.t")
    for spec in samples("bigquery_query_param")[0]:
        parse_query_parameter(spec)
    for instant in samples("instant")[0]:
        to_epoch_ms(instant)
    for spec in samples("feature_set")[0]:
        load_feature_set(spec)
    for span in samples("drift_span")[0]:
        parse_span(span)
    for span in samples("drift_span")[1]:
        with pytest.raises(ValueError):
            parse_span(span)
    for value in samples("prediction_cache")[0]:
        on_off(value)


@pytest.mark.timeout(120)
@pytest.mark.parametrize("name", sorted(JOBS))
def test_parameters_are_the_jobs_options_and_required_ones_are_required(name):
    job = JOBS[name]
    params = parameters(job)
    flags = job_flags(job.job)
    assert set(params) <= set(flags), f"not options of {name}: {set(params) - set(flags)}"
    assert set(job.required) <= set(params)
    # Every option is a parameter or deliberately not one, with the reason.
    assert set(flags) == set(params) | set(job.not_parameters)
    assert not set(params) & set(job.not_parameters)
    for flag, action in flags.items():
        if flag in params:
            p = params[flag]
            assert p.get("isOptional", False) == (flag not in job.required), flag
            assert type(action).__name__ not in ("_StoreTrueAction", "_StoreFalseAction"), flag
            if action.choices:
                assert p["paramType"] == "ENUM", flag
                assert [o["value"] for o in p["enumOptions"]] == list(action.choices), flag
            if action.type in (int, float):
                assert p.get("paramType") == "NUMBER", flag
            if "defaultValue" in p:
                assert p["defaultValue"] == str(action.default), flag
            if "paramType" in p:
                ParameterType[p["paramType"]]
            if "parentName" in p:
                assert p["parentName"] in params, flag


@pytest.mark.timeout(120)
@pytest.mark.parametrize("name", sorted(JOBS))
def test_required_parameters_are_what_the_job_reports_missing(name, tmp_path):
    """The declaration's `required`: run with no flags, the job names exactly those."""
    job = JOBS[name]
    with pytest.raises(SystemExit) as exc:
        run_job(job, [])
    message = str(exc.value.code)
    assert "missing required option(s):" in message
    reported = re.findall(r"--(\w+)", message.split("missing required option(s):")[1])
    assert sorted(reported) == sorted(job.required)


@pytest.mark.timeout(120)
@pytest.mark.parametrize("name", sorted(JOBS))
def test_parameters_parse_in_the_form_flex_templates_pass_them(name):
    """The launcher passes --name=value; each sample value reaches the job's option as typed."""
    job = JOBS[name]
    argv, expected = [], {}
    for pname, p in parameters(job).items():
        if p.get("paramType") == "ENUM":
            value = p["enumOptions"][-1]["value"]
        else:
            value = samples(pname)[0][-1] if p.get("regexes") else "SELECT 1"
        argv.append(f"--{pname}={value}")
        expected[pname] = value
    options = PipelineOptions([*job.fixed_args, *argv])
    flags = job_flags(job.job)
    for cls in job.job.groups:
        view = options.view_as(cls)
        for pname, value in expected.items():
            if hasattr(view, pname):
                got = getattr(view, pname)
                if flags[pname].type not in (None, str):  # int, float, on_off
                    value = flags[pname].type(value)
                if isinstance(flags[pname], argparse._AppendAction):
                    value = [value]
                assert got == value, (pname, got, value)


@pytest.mark.timeout(60)
def test_dockerfile_is_one_image_for_launcher_and_workers():
    text = (ROOT / "templates" / "Dockerfile").read_text()
    args = dict(re.findall(r"^ARG (\w+)=(\S+)$", text, re.M))
    from importlib.metadata import version

    assert args["PYTHON_IMAGE"].startswith("python:3.11")
    assert args["BEAM_SDK_IMAGE"] == f"apache/beam_python3.11_sdk:{version('apache-beam')}"
    assert "python311-template-launcher-base" in args["LAUNCHER_IMAGE"]
    assert "COPY --from=beam_sdk /opt/apache/beam /opt/apache/beam" in text
    assert "/opt/google/dataflow/python_template_launcher" in text
    assert re.search(r"pip install -r requirements.txt -c constraints.txt", text)
    assert re.search(r"pip install --no-deps \.", text)
    assert 'ENTRYPOINT ["/opt/apache/beam/boot"]' in text
    assert "ENV FLEX_TEMPLATE_PYTHON_PY_FILE=/template/templates/main.py" in text
    assert "SKEWLESS_TEMPLATE=${TEMPLATE}" in text
    assert "FLEX_TEMPLATE_PYTHON_REQUIREMENTS_FILE=" not in text  # everything is in the image
    for src in re.findall(r"^COPY (?!--from)(.+) \S+$", text, re.M):
        for path in src.split():
            assert (ROOT / path).exists(), f"COPY source {path} missing"
    # The one package setup.py installs is copied into the image.
    assert "COPY skewless skewless" in text
    # Every pinned requirement is installed from the pins, not resolved anew.
    pins = [line for line in (ROOT / "requirements.txt").read_text().splitlines() if "==" in line]
    assert any(p.startswith("apache-beam[gcp]==") for p in pins)


@pytest.mark.timeout(120)
@pytest.mark.parametrize("name", sorted(JOBS))
def test_entry_point_runs_as_a_script(name):
    """The launcher runs `python templates/main.py ...` with the image's packages and
    SKEWLESS_TEMPLATE set by the image: the job of that template, its fixed flags first."""
    job = JOBS[name]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "SKEWLESS_TEMPLATE": name}
    out = subprocess.run(
        [sys.executable, str(MAIN), "--help"],
        capture_output=True, text=True, timeout=110, cwd="/", env=env,
    )  # fmt: skip
    assert out.stdout.startswith(f"usage: {job.job.prog}"), out.stdout[:200]
    assert out.returncode == 0, out.stderr[-2000:]
    for flag in parameters(job):
        assert f"--{flag}" in out.stdout, flag


@pytest.mark.timeout(60)
def test_build_script_prints_the_build_and_run_commands():
    env = {**os.environ, "PROJECT": "my-proj", "REGION": "europe-west1", "BUCKET": "my-bucket", "TAG": "v1"}
    out = subprocess.run(
        ["bash", str(ROOT / "templates" / "build.sh"), "--dry-run"],
        capture_output=True, text=True, timeout=50, env=env,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    for name, job in JOBS.items():
        image = f"europe-west1-docker.pkg.dev/my-proj/skewless/skewless-{name.replace('_', '-')}:v1"
        spec = f"gs://my-bucket/templates/skewless-{name.replace('_', '-')}-v1.json"
        assert f"--build-arg TEMPLATE={name} -t {image}" in out.stdout
        build = [line for line in out.stdout.splitlines() if f"flex-template build {spec}" in line]
        assert len(build) == 1
        assert f"--image {image} --sdk-language PYTHON --metadata-file {job.metadata_path}" in build[0]
        assert ("--enable-streaming-engine" in build[0]) == job.streaming
        assert f"--template-file-gcs-location {spec}" in out.stdout
        assert f"--parameters sdk_container_image={image}" in out.stdout
    for job in JOBS.values():
        for flag in job.required:
            assert f"--parameters {flag}=VALUE" in out.stdout
    bad = subprocess.run(["bash", str(ROOT / "templates" / "build.sh"), "--dry-run", "nope"], capture_output=True, env=env)
    assert bad.returncode == 2


# --- each job's graph, built by the DataflowRunner (dry run) -------------------------------------


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_prepare_builds_for_dataflow_with_tf_transform(trained, dataflow_jobs, tmp_path):
    argv = template_argv("prepare", {"input": str(trained["csv"]), "output_dir": str(tmp_path / "out")})
    assert run_job(JOBS["prepare"], [*argv, *DATAFLOW]) is None
    (job,) = dataflow_jobs
    assert job.proto.type.name == "JOB_TYPE_BATCH"
    steps = step_names(job)
    for step in ("AnalyzeAndTransform", "TransformEval", "WriteTransform", "WriteTrain/EncodeAndWriteShards", "DeadLetters"):
        assert step in steps, step


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_score_batch_builds_for_dataflow_with_run_inference(trained, dataflow_jobs, tmp_path):
    argv = template_argv(
        "score",
        {"model_dir": str(trained["model_dir"]), "input": str(trained["csv"]), "output": str(tmp_path / "out")},
    )
    run_job(JOBS["score"], [*argv, *DATAFLOW])
    (job,) = dataflow_jobs
    assert job.proto.type.name == "JOB_TYPE_BATCH"
    steps = step_names(job)
    for step in ("Score/RunInference", "BuildExamples", "Write", "WriteDeadLetters"):
        assert step in steps, step


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_score_batch_run_returns_after_a_dry_run(trained, tmp_path):
    argv = ["--model_dir", str(trained["model_dir"]), "--input", str(trained["csv"]), "--output", str(tmp_path / "o")]
    assert run_job(JOBS["score"], [*argv, *DATAFLOW]) is None
    assert not (tmp_path / "o" / "summary.json").exists()




@pytest.mark.timeout(120)
def test_aggregate_builds_for_dataflow_as_a_streaming_job(dataflow_jobs):
    argv = template_argv(
        "aggregate",
        {"subscription": "projects/fake-project/subscriptions/events",
         "dead_letter_topic": "projects/fake-project/topics/dead-letters", **BIGTABLE},
    )  # fmt: skip
    run_job(JOBS["aggregate"], [*argv, "--skip_table_check", *DATAFLOW])
    (job,) = dataflow_jobs
    assert job.proto.type.name == "JOB_TYPE_STREAMING"
    steps = step_names(job)
    assert {s for s in steps if "/" not in s and not s.startswith("ref_")} == AGGREGATE_STEPS
    assert "WriteCells/MutateRows" in steps and "DeadLetters/Publish" in steps


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_score_streaming_builds_for_dataflow_as_a_streaming_job(trained, dataflow_jobs):
    argv = template_argv(
        "score_streaming",
        {"subscription": "projects/fake-project/subscriptions/events",
         "output_topic": "projects/fake-project/topics/predictions",
         "output_table": "fake-project:predictions.flights",
         "dead_letter_topic": "projects/fake-project/topics/dead-letters",
         "model_dir": str(trained["model_dir"]), **BIGTABLE},
    )  # fmt: skip
    run_job(JOBS["score_streaming"], [*argv, "--skip_table_check", *DATAFLOW])
    (job,) = dataflow_jobs
    assert job.proto.type.name == "JOB_TYPE_STREAMING"
    steps = step_names(job)
    assert {s for s in steps if "/" not in s and not s.startswith("ref_")} == SCORE_STREAM_STEPS
    assert "Score/RunInference" in steps and "LookupAggregates/ReadCells" in steps
    # Both outputs: the Pub/Sub steps keep their names, the rows BigQuery refuses are published.
    for step in ("Write/ToMessage", "Write/Publish", "Write/Insert/Insert", "Write/RefusedRows/Publish"):
        assert step in steps, step


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_precompute_builds_for_dataflow_as_a_batch_job(schedule_trained, dataflow_jobs, tmp_path):
    argv = template_argv(
        "precompute",
        {"model_dir": str(schedule_trained["model_dir"]), "output_dir": str(tmp_path / "out"),
         "input": str(schedule_trained["root"] / "flights.csv"), "top_n": "1000", **BIGTABLE},
    )  # fmt: skip
    assert run_job(JOBS["precompute"], [*argv, "--skip_table_check", *DATAFLOW]) is None
    (job,) = dataflow_jobs
    assert job.proto.type.name == "JOB_TYPE_BATCH"
    steps = step_names(job)
    for step in ("Requests/Read", "Key", "PerKey", "Top", "OnePerHash", "Score/RunInference",
                 "Write", "Marker", "DeadLetters"):  # fmt: skip
        assert any(s == step or s.startswith(step + "/") for s in steps), step


@pytest.mark.timeout(120)
def test_publish_reference_builds_for_dataflow_as_a_batch_job(dataflow_jobs):
    """A dry run checks neither the input nor the Bigtable table (as for BigQuery tables)."""
    argv = template_argv(
        "publish_reference",
        {"table": "origin_weather", "feature_set": FLIGHTS_TABLES_SPEC,
         "dead_letter_dir": "gs://fake-bucket/dead", **BIGTABLE},
    )  # fmt: skip
    assert run_job(JOBS["publish_reference"], [*argv, *DATAFLOW]) is None
    (job,) = dataflow_jobs
    assert job.proto.type.name == "JOB_TYPE_BATCH"
    steps = step_names(job)
    for step in ("Read", "Validate", "Deduplicate/Group", "Write/MutateRows", "DeadLetters"):
        assert step in steps, step


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_validate_builds_for_dataflow_with_statistics_and_the_comparison(trained, dataflow_jobs, tmp_path):
    """The statistics and the comparison are steps of the Dataflow job, not launcher work."""
    argv = template_argv(
        "validate",
        {"baseline": str(trained["prepared"]), "input": str(trained["csv"]), "output_dir": str(tmp_path / "out")},
    )
    assert run_job(JOBS["validate"], [*argv, *DATAFLOW]) is None
    (job,) = dataflow_jobs
    assert job.proto.type.name == "JOB_TYPE_BATCH"
    steps = step_names(job)
    for step in ("Read", "Statistics", "WriteStatistics", "Check/FindAnomalies", "Check/WriteAnomalies", "Check/WriteReport"):
        assert step in steps, step
