"""The online/offline consistency audit: the streaming scorer's serving log on the emulators,
recomputed by the batch path (`skewless audit`).

Real bundled flights (a slice of a week prepared and trained once per session): the aggregate
job writes their cells to the Bigtable emulator (TestStream, deterministic), the streaming
scorer reads them from Pub/Sub and logs its sample; the audit of a clean replay finds nothing,
and the audit of a broken serving path (a wrong serving delay D at lookup, aggregate rows
deleted between writing the cells and scoring) finds the features it broke, and only those.
"""

from __future__ import annotations

import dataclasses
import glob
import json
import time
from collections import Counter

import pytest

from skewless.beam_pipelines.commands.bigtable_setup import ensure_table
from skewless.beam_pipelines.commands.replay import ReplayStats, order_events, publish_events
from skewless.beam_pipelines.io.bigtable import open_table
from skewless.beam_pipelines.io.online_store import cell_keys
from skewless.beam_pipelines.io.serving_log import WriteServingLog
from skewless.beam_pipelines.jobs import audit, score_streaming
from skewless.beam_pipelines.runtime.launch import run_job
from skewless.examples.flights import FLIGHTS
from skewless.transforms.aggregations import row_key
from skewless.transforms.consistency import (
    ABSENT,
    audit_report,
    compare_value,
    example_key,
    is_sampled,
    serving_log_record,
)
from skewless.transforms.example_schema import aggregate_column_names, example_columns
from skewless.transforms.record_checks import to_epoch_ms
from skewless.transforms.split import HASH_BUCKETS, key_bucket
from tests.support.dataflow import (
    BIGTABLE,
    DATAFLOW,
    JOBS,
    SCORE_STREAM_STEPS,
    step_names,
    template_argv,
)
from tests.support.dataflow import run_job as run_template
from tests.support.flights_data import write_jsonl
from tests.support.pipelines import typed_events
from tests.support.streaming_jobs import write_cells_with_the_aggregate_job

INPUT_START, INPUT_END = "2013-01-06T10:00:00Z", "2013-01-06T14:00:00Z"  # by scheduled hour
SCORE_START, SCORE_END = "2013-01-06T11:00:00Z", "2013-01-06T14:00:00Z"  # by event time
RETENTION_S = 20 * 365 * 86_400  # the cells are stamped in 2013: keep them
SAMPLE = 0.5
ORIGIN_AGGREGATES = {"origin_departures_1h", "origin_mean_dep_delay_1h", "origin_departures_15m"}


# --- the pure comparison (fast) ------------------------------------------------------------


def _example(**change) -> dict:
    """A typed flights example with every example column (aggregates of non-empty windows)."""
    example = {
        "carrier": "UA", "flight": 1545, "origin": "EWR", "dest": "IAH",
        "scheduled_departure": 1357048800000, "event_time": 1357048920000, "year": 2013,
        "month": 1, "day": 1, "hour": 5, "minute": 15, "dep_delay": 2.0, "distance": 1400.0,
        "label": 1, "origin_departures_1h": 3, "origin_mean_dep_delay_1h": 4.5,
        "carrier_mean_dep_delay_1h": -1.25, "origin_departures_15m": 1,
    }  # fmt: skip
    assert set(example) == {c.name for c in example_columns(FLIGHTS)}
    return {**example, **change}


def test_a_log_record_names_the_example_and_carries_every_served_column():
    record = serving_log_record(FLIGHTS, _example(), 0.25, 4)
    assert record["example_key"] == {
        "carrier": "UA", "flight": 1545, "origin": "EWR", "scheduled_departure": 1357048800000,
    }  # fmt: skip
    assert record["event_time"] == 1357048920000
    assert record["features"] == _example()
    assert (record["model_version"], record["prediction"]) == (4, 0.25)
    assert json.loads(json.dumps(record)) == record  # JSON as is


def test_the_sample_is_the_splits_hash_of_the_key_and_keeps_about_the_fraction():
    import datetime as dt

    keys = [("UA", n, "EWR", 1357048800000 + 60_000 * n) for n in range(4000)]
    picked = [k for k in keys if is_sampled(k, 0.1)]
    assert 300 < len(picked) < 500
    assert all(key_bucket(k) < 0.1 * HASH_BUCKETS for k in picked)
    assert picked == [k for k in keys if is_sampled(k, 0.1)]  # stable
    assert all(is_sampled(k, 1.0) for k in keys) and not any(is_sampled(k, 0.0) for k in keys)
    # A batch row (a datetime) and a streaming example (epoch ms) name one key alike.
    moment = dt.datetime(2013, 1, 1, 14, 0, tzinfo=dt.UTC)
    row = _example(scheduled_departure=moment)
    assert example_key(FLIGHTS, row) == example_key(
        FLIGHTS, _example(scheduled_departure=1357048800000)
    )
    with pytest.raises(ValueError, match=r"must be in \[0, 1\]"):
        is_sampled(keys[0], 1.5)


def test_compare_value_tolerance_missing_extra_strings_and_lists():
    assert compare_value(4.5, 4.5) == ("equal", 0.0)
    assert compare_value(1.0 + 5e-7, 1.0)[0] == "equal"  # absolute 1e-6 up to 1
    assert compare_value(1.0 + 2e-6, 1.0)[0] == "mismatch"
    assert compare_value(1e6 + 0.5, 1e6)[0] == "equal"  # relative 1e-6 above
    assert compare_value(1e6 + 2.0, 1e6)[0] == "mismatch"
    assert compare_value(3, 3.0) == ("equal", 0.0)
    assert compare_value(None, 2.0) == ("missing", None)
    assert compare_value(ABSENT, 2.0) == ("missing", None)
    assert compare_value(2.0, None) == ("extra", None)
    assert compare_value(None, None) == ("equal", None)
    assert compare_value("EWR", "JFK") == ("mismatch", None)
    assert compare_value([1.0, 2.0], [1.0, 2.0]) == ("equal", None)
    assert compare_value([1.0, 2.0], [2.0, 1.0]) == ("mismatch", None)
    assert compare_value(float("nan"), float("nan"))[0] == "equal"
    assert compare_value(True, 1)[0] == "mismatch"  # a bool is not a number here


def test_audit_report_counts_per_feature_and_prediction_and_the_unmatched():
    batch = {"features": _example(), "prediction": 0.30}
    clean = serving_log_record(FLIGHTS, _example(), 0.30, 2)
    shifted = serving_log_record(FLIGHTS, _example(flight=2, origin_mean_dep_delay_1h=6.5), 0.35, 2)
    lost = serving_log_record(FLIGHTS, _example(flight=3), 0.30, 2)
    del lost["features"]["dest"]
    other_version = serving_log_record(FLIGHTS, _example(flight=4, origin_departures_1h=0), 0.9, 1)
    alone = serving_log_record(FLIGHTS, _example(flight=5), 0.30, 2)
    batch_of = lambda n: {"features": _example(flight=n), "prediction": 0.30}  # noqa: E731
    report = audit_report(
        FLIGHTS,
        [(clean, batch), (shifted, batch_of(2)), (lost, batch_of(3)), (other_version, batch_of(4)),
         (alone, None)],
        2,
        batch_not_logged=[("AA", 9, "JFK", 0)],
    )  # fmt: skip
    assert report["logged_events"] == 5 and report["compared"] == 4
    assert report["logged_without_batch_example"] == 1
    assert report["logged_without_batch_example_keys"] == [["UA", 5, "EWR", 1357048800000]]
    assert report["batch_examples_not_logged"] == 1
    mean = report["features"]["origin_mean_dep_delay_1h"]
    assert (mean["compared"], mean["mismatches"], mean["mismatch_rate"]) == (4, 1, 0.25)
    assert mean["abs_diff"]["max"] == pytest.approx(2.0) and mean["abs_diff"]["p50"] == 0.0
    assert mean["examples"][0]["served"] == 6.5 and mean["examples"][0]["batch"] == 4.5
    dest = report["features"]["dest"]
    assert (dest["mismatches"], dest["missing"], dest["missing_rate"], dest["extra"]) == (
        1,
        1,
        0.25,
        0,
    )
    assert "abs_diff" not in dest  # a string
    assert report["features"]["origin_departures_1h"]["mismatches"] == 1
    assert report["features"]["carrier"]["mismatches"] == 0
    assert report["logged_under_other_model_version"] == 1
    prediction = report["prediction"]  # version 2 only: 0, 0.05, 0
    assert prediction["count"] == 3 and prediction["mismatches"] == 1
    assert prediction["max_abs_diff"] == pytest.approx(0.05)
    assert prediction["mean_abs_diff"] == pytest.approx(0.05 / 3)
    assert report["feature_mismatches"] == 3 and report["clean"] is False
    assert audit_report(FLIGHTS, [(clean, batch)], 2)["clean"] is True


# --- the serving path on the emulators -----------------------------------------------------


def _log_lines(directory) -> list[dict]:
    return [
        json.loads(line)
        for path in sorted(glob.glob(f"{directory}/*.jsonl"))
        for line in open(path)
        if line.strip()
    ]


def _serve(ps, bt, table_id, model_dir, raws, log_dir, sample, lookup_fs=None, timeout_s=180):
    """The streaming scorer on the emulators with a serving log, fed `raws`; returns the
    predictions, the log records and the job's counters once every event is scored and every
    sampled one logged. `lookup_fs`: a feature set the Bigtable lookup uses instead of the
    model's (a broken serving path); the scorer is then wired by its build_pipeline."""
    from apache_beam.io.gcp.pubsub import ReadFromPubSub
    from apache_beam.options.pipeline_options import PipelineOptions

    from skewless.beam_pipelines.io.pubsub import PublishDeadLetters
    from skewless.beam_pipelines.runtime.local_runner import prepare_local_runner
    from skewless.beam_pipelines.runtime.parsing import metric_counters
    from skewless.beam_pipelines.score_core import load_model

    inp, out = ps.topic("events"), ps.topic("predictions")
    inp_sub, out_sub = ps.subscription(inp, "scorer"), ps.subscription(out, "reader")
    log_args = [
        f"--serving_log={log_dir}",
        f"--serving_log_sample={sample}",
        "--serving_log_window_s=2",
    ]
    if lookup_fs is None:
        p, _ = score_streaming.make_pipeline(
            ["--streaming", f"--subscription={inp_sub}", f"--output_topic={out}",
             f"--bigtable_project={bt.project}", f"--bigtable_instance={bt.instance}",
             f"--bigtable_table={table_id}", f"--model_dir={model_dir}",
             f"--project={ps.project}", *log_args]
        )  # fmt: skip
    else:
        import apache_beam as beam

        prepare_local_runner()
        model = load_model(str(model_dir), None, None)
        p = beam.Pipeline(
            options=PipelineOptions(
                runner="BundleBasedDirectRunner", streaming=True, project=ps.project
            )
        )
        score_streaming.build_pipeline(
            p,
            model.fs,
            model.handler,
            ReadFromPubSub(subscription=inp_sub, with_attributes=True),
            score_streaming.LookupAggregates.from_bigtable(
                lookup_fs, bt.project, bt.instance, table_id
            ),
            score_streaming.WritePredictions(out),
            PublishDeadLetters(None),
            WriteServingLog(str(log_dir), sample, 2),
        )
    expected_logged = sum(
        is_sampled(example_key(FLIGHTS, e), sample) for e in typed_events(FLIGHTS, raws)
    )
    result = p.run()
    try:
        publisher = ps.publisher()
        publish_events(publisher, inp, FLIGHTS, order_events(FLIGHTS, raws, ReplayStats()))
        streamed: list = []
        deadline = time.monotonic() + timeout_s
        while len(streamed) < len(raws) and time.monotonic() < deadline:
            streamed += [json.loads(m.data) for m in ps.pull_all(out_sub, expect=1, timeout_s=5)]
        while len(_log_lines(log_dir)) < expected_logged and time.monotonic() < deadline:
            time.sleep(1)
        time.sleep(3)  # anything extra (a duplicate) would be written now
    finally:
        result.cancel()
    return streamed, _log_lines(log_dir), metric_counters(result), expected_logged


def _audit(trained, flights_path, log_dir, out_dir, sample) -> dict:
    """`skewless audit` of a log; the report (run() exits 3 when it is not clean)."""
    args = [
        f"--serving_log={log_dir}", f"--model_dir={trained['model_dir']}",
        f"--input={flights_path}", f"--output_dir={out_dir}", f"--serving_log_sample={sample}",
    ]  # fmt: skip
    try:
        report = audit.run(args)
    except SystemExit as exc:
        assert exc.code == audit.EXIT_MISMATCH
        report = json.loads((out_dir / audit.REPORT).read_text())
        assert report["clean"] is False
        return report
    assert report["clean"] is True
    assert json.loads((out_dir / audit.REPORT).read_text())["clean"] is True
    return report


@pytest.fixture(scope="module")
def audited(trained, tmp_path_factory, pubsub_emulator, bigtable_emulator):
    """A clean replay, a re-run with a wrong D at lookup, and a replay after aggregate rows were
    deleted, each logged by the streaming scorer and audited."""
    ps, bt = pubsub_emulator, bigtable_emulator
    root = tmp_path_factory.mktemp("audit")
    raws = [dict(r) for r in trained["rows"] if INPUT_START <= r["time_hour"] < INPUT_END]
    start, end = to_epoch_ms(SCORE_START), to_epoch_ms(SCORE_END)
    to_score = [r for t, r in order_events(FLIGHTS, raws, ReplayStats()) if start <= t < end]
    flights_path = write_jsonl(root / "flights.jsonl", raws)

    table_id = bt.table_name()
    ensure_table(bt.project, bt.instance, table_id, FLIGHTS, 600, RETENTION_S)
    assert write_cells_with_the_aggregate_job(bt, table_id, FLIGHTS, raws)["cells_written"] > 0
    runs = {}
    model_dir = trained["model_dir"]
    wrong_d = dataclasses.replace(FLIGHTS, serving_delay_s=FLIGHTS.serving_delay_s + 900)
    for name, lookup_fs in (("clean", None), ("wrong_d", wrong_d)):
        started = time.monotonic()
        served = _serve(ps, bt, table_id, model_dir, to_score, root / name, SAMPLE, lookup_fs)
        runs[name] = {"served": served, "serve_s": time.monotonic() - started}

    # Delete the aggregate rows of the busiest origin's three most read window ends.
    typed = typed_events(FLIGHTS, to_score)
    reads = Counter(k for e in typed for k in cell_keys(FLIGHTS, e) if k.key_name == "origin")
    deleted = [k for k, _ in reads.most_common(3)]
    table = open_table(bt.project, bt.instance, table_id)
    for key in deleted:
        row = table.direct_row(row_key(*key).encode())
        row.delete()
        row.commit()
    served = _serve(ps, bt, table_id, model_dir, to_score, root / "deleted", 1.0)
    runs["deleted"] = {"served": served, "deleted": deleted, "typed": typed}
    for name, run in runs.items():
        started = time.monotonic()
        sample = 1.0 if name == "deleted" else SAMPLE
        run["report"] = _audit(trained, flights_path, root / name, root / f"{name}_audit", sample)
        run["audit_s"] = time.monotonic() - started
    return {"runs": runs, "to_score": to_score, "trained": trained, "root": root}


@pytest.mark.slow
@pytest.mark.emulator
@pytest.mark.timeout(900)
def test_a_clean_replay_audits_with_no_mismatch(audited):
    run = audited["runs"]["clean"]
    streamed, logged, counters, expected = run["served"]
    to_score = audited["to_score"]
    assert len(to_score) > 100 and len(streamed) == len(to_score)
    assert 0 < expected < len(to_score)  # a real sample: some keys in, some out
    assert len(logged) == expected == counters["serving_log_events"]
    for record in logged:
        assert sorted(record) == [
            "event_time",
            "example_key",
            "features",
            "model_version",
            "prediction",
            "source",
        ]
        assert record["source"] == "model"
        assert set(record["features"]) == {c.name for c in example_columns(FLIGHTS)}
    report = run["report"]
    assert report["clean"] is True, json.dumps(report, indent=1)[:3000]
    assert report["compared"] == report["logged_events"] == expected
    assert report["feature_mismatches"] == 0
    assert report["logged_without_batch_example"] == report["batch_examples_not_logged"] == 0
    assert report["prediction"]["count"] == expected
    assert report["prediction"]["max_abs_diff"] <= 1e-6
    assert all(f["compared"] == expected for f in report["features"].values())
    assert report["features"]["origin_departures_1h"]["abs_diff"]["max"] == 0.0
    # The aggregates really came from Bigtable (a table of empty windows would agree with nothing).
    assert sum(r["features"]["origin_departures_1h"] > 0 for r in logged) > expected / 2
    assert report["counters"]["examples_scored"] == expected


@pytest.mark.slow
@pytest.mark.emulator
@pytest.mark.timeout(900)
def test_a_re_run_logs_the_same_keys(audited):
    clean, rerun = (audited["runs"][n]["served"][1] for n in ("clean", "wrong_d"))
    keys = lambda logged: sorted(json.dumps(r["example_key"], sort_keys=True) for r in logged)  # noqa: E731
    assert keys(clean) == keys(rerun) and len(set(keys(clean))) == len(clean)


@pytest.mark.slow
@pytest.mark.emulator
@pytest.mark.timeout(900)
def test_a_wrong_serving_delay_is_caught_on_the_aggregates_only(audited):
    report = audited["runs"]["wrong_d"]["report"]
    assert report["clean"] is False and report["compared"] > 0
    aggregates = set(aggregate_column_names(FLIGHTS))
    wrong = {n for n, f in report["features"].items() if f["mismatches"]}
    assert wrong <= aggregates and "origin_departures_1h" in wrong, wrong
    # A window 15 minutes earlier: most counts of the busy airports differ.
    assert report["features"]["origin_departures_1h"]["mismatch_rate"] > 0.3
    assert report["features"]["origin_departures_1h"]["abs_diff"]["max"] >= 1.0
    assert report["prediction"]["mismatches"] > 0 and report["prediction"]["max_abs_diff"] > 1e-4


@pytest.mark.slow
@pytest.mark.emulator
@pytest.mark.timeout(900)
def test_deleted_aggregate_rows_are_caught_on_their_features_and_events(audited):
    run = audited["runs"]["deleted"]
    report, deleted = run["report"], set(run["deleted"])
    hit = {
        json.dumps(
            dict(zip(FLIGHTS.example_key, example_key(FLIGHTS, e), strict=True)), sort_keys=True
        )
        for e in run["typed"]
        if deleted & set(cell_keys(FLIGHTS, e))
    }
    assert hit and report["clean"] is False
    assert report["compared"] == len(audited["to_score"])
    wrong = {n for n, f in report["features"].items() if f["mismatches"]}
    assert wrong <= ORIGIN_AGGREGATES and "origin_departures_1h" in wrong, wrong
    # Every event that read a deleted row (an hour with departures) served an empty window.
    assert report["features"]["origin_departures_1h"]["mismatches"] == len(hit)
    for example in report["features"]["origin_departures_1h"]["examples"]:
        assert json.dumps(example["example_key"], sort_keys=True) in hit
        assert example["served"] == 0 and example["batch"] > 0


@pytest.mark.timeout(120)
def test_audit_errors_before_the_run_are_one_line(tmp_path, capsys):
    (tmp_path / "log").mkdir()
    code = run_job(
        "audit",
        [
            f"--serving_log={tmp_path / 'log'}",
            f"--model_dir={tmp_path}",
            f"--output_dir={tmp_path / 'o'}",
        ],
    )
    assert code == 2
    assert "skewless audit: --serving_log" in capsys.readouterr().err
    assert run_job("audit", ["--model_dir=x", "--output_dir=y"]) == 2
    assert "missing required option(s): --serving_log" in capsys.readouterr().err


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_the_scorer_with_a_serving_log_builds_for_dataflow_keeping_its_step_names(
    trained, dataflow_jobs
):
    """The template's serving log parameters reach the job; the steps of a scorer without a
    log keep their names (Dataflow's --update maps steps by name), the log adds two."""
    argv = template_argv(
        "score_streaming",
        {"subscription": "projects/fake-project/subscriptions/events",
         "output_topic": "projects/fake-project/topics/predictions",
         "model_dir": str(trained["model_dir"]), **BIGTABLE,
         "serving_log": "gs://fake-bucket/serving_log", "serving_log_sample": "0.05",
         "serving_log_window_s": "300"},
    )  # fmt: skip
    run_template(JOBS["score_streaming"], [*argv, "--skip_table_check", *DATAFLOW])
    (job,) = dataflow_jobs
    assert job.proto.type.name == "JOB_TYPE_STREAMING"
    steps = step_names(job)
    top = {s for s in steps if "/" not in s and not s.startswith("ref_")}
    assert top == SCORE_STREAM_STEPS | {"SplitServingLog", "ServingLog"}
    assert {"ServingLog/Window", "ServingLog/WriteFiles"} <= steps


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_the_audit_builds_for_dataflow_from_its_template_parameters(trained, dataflow_jobs, tmp_path):
    """The audit ships as a Flex Template: the comparison and the report are steps of the
    Dataflow job (the launcher only scans the log for its versions and span)."""
    log_dir = tmp_path / "log"
    log_dir.mkdir()
    record = serving_log_record(FLIGHTS, _example(), 0.25, 1)
    (log_dir / "part-0.jsonl").write_text(json.dumps(record) + "\n")
    argv = template_argv(
        "audit",
        {"serving_log": str(log_dir), "model_dir": str(trained["model_dir"]),
         "input": str(trained["csv"]), "output_dir": str(tmp_path / "out")},
    )  # fmt: skip
    assert run_template(JOBS["audit"], [*argv, *DATAFLOW]) is None
    (job,) = dataflow_jobs
    assert job.proto.type.name == "JOB_TYPE_BATCH"
    steps = step_names(job)
    for step in ("ReadLog", "LogIndex", "BuildExamples", "Score/RunInference", "Join", "Report", "DeadLetters"):
        assert any(s == step or s.startswith(step + "/") for s in steps), (step, sorted(steps))
    assert not (tmp_path / "out" / "audit.json").exists()


def _id(r: dict) -> tuple:
    """Carrier, flight and origin: one flight of the slice (the scheduled time's form differs
    between a prediction and an example)."""
    return (r["carrier"], r["flight"], r["origin"])


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_the_log_branch_carries_the_scored_examples_and_their_predictions(trained):
    """ScoreEvents with a sample, then SplitServingLog: the predictions are the plain ones and
    each sampled example's record holds its example columns and its own prediction."""
    import apache_beam as beam
    from apache_beam.testing.test_pipeline import TestPipeline
    from apache_beam.testing.util import assert_that, equal_to

    from skewless.models.handler import SkewlessModelHandler
    from skewless.transforms.aggregations import attach_aggregates

    raws = [dict(r) for r in trained["rows"] if INPUT_START <= r["time_hour"] < INPUT_END][:40]
    examples = [attach_aggregates(FLIGHTS, e, lambda k: None) for e in typed_events(FLIGHTS, raws)]
    sampled = [e for e in examples if is_sampled(example_key(FLIGHTS, e), SAMPLE)]
    assert 0 < len(sampled) < len(examples)
    handler = SkewlessModelHandler(str(trained["model_dir"]))
    with TestPipeline(runner="FnApiRunner") as p:
        batches = p | beam.Create([examples[:25], examples[25:]])
        predictions, dead = batches | score_streaming.ScoreEvents(FLIGHTS, handler, SAMPLE)
        split = predictions | beam.ParDo(score_streaming.SplitServingLog()).with_outputs(
            score_streaming.SERVING_LOG, main="predictions"
        )
        plain = split.predictions | beam.Map(lambda r: (_id(r), score_streaming.SERVING_LOG in r))
        logged = split[score_streaming.SERVING_LOG] | beam.Map(
            lambda r: (_id(r["example_key"]), r["features"]["dest"], round(r["prediction"], 6))
        )
        probability = beam.pvalue.AsDict(
            split.predictions
            | "ByFlight" >> beam.Map(lambda r: (_id(r), round(r["probability"], 6)))
        )
        assert_that(
            plain,
            equal_to([(_id(e), False) for e in examples]),
            label="Predictions",
        )
        assert_that(
            logged | beam.Map(lambda t, probs: (t[0], t[1], t[2] == probs[t[0]]), probability),
            equal_to([(_id(e), e["dest"], True) for e in sampled]),
            label="Logged",
        )
        assert_that(dead, equal_to([]), label="NoDeadLetters")
