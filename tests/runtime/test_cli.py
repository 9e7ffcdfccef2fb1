"""The `skewless` entry point: subcommands, --help for every job, clear usage errors."""

import subprocess
import sys

import pytest

from skewless.beam_pipelines.runtime.cli import main
from skewless.beam_pipelines.runtime.job import (
    PACKAGES,
    _package_dir,
    _static_declaration,
    commands,
    declared,
    job_modules,
    load,
)
from skewless.beam_pipelines.runtime.launch import job_module, run_job


def test_top_level_help_lists_every_job(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    for job in ("prepare", "aggregate", "bigtable-setup", "replay", "train", "retrain", "score", "report"):
        assert job in out and job in commands()


def test_unknown_command_is_a_one_line_usage_error(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["frobnicate"])
    assert exit_info.value.code == 2
    assert (
        capsys.readouterr().err
        == "skewless: unknown command 'frobnicate' (skewless --help lists them)\n"
    )
    with pytest.raises(SystemExit) as exit_info:
        main(["scroe"])
    assert exit_info.value.code == 2
    assert "(did you mean score?)" in capsys.readouterr().err


def test_bare_skewless_is_a_usage_error_with_the_commands_on_stderr(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main([])
    assert exit_info.value.code == 2
    captured = capsys.readouterr()
    assert captured.out == "" and "publish-reference  batch:" in captured.err
    assert "pipelines:" in captured.err and "commands:" in captured.err


# A misspelt flag of each job: (job, arguments, the flag, the flag the error suggests).
MISSPELT = [
    ("prepare", ["--output_dir", "{out}", "--eval_fractoin", "0.5"], "--eval_fractoin", "--eval_fraction"),
    ("validate", ["--baseline", "{out}", "--output_dir", "{out}", "--inptu", "x.csv"], "--inptu", "--input"),
    ("publish-reference", ["--table", "plane", "--write_retry_sec", "0"], "--write_retry_sec", "--write_retry_s"),
    ("bigtable-setup", ["--bigtable_project", "p", "--retention_sec", "60"], "--retention_sec", "--retention_s"),
    ("aggregate", ["--subscription", "s", "--allowed_latenes_s", "9"], "--allowed_latenes_s", "--allowed_lateness_s"),
    ("score", ["--model_dir", "{out}", "--output_tabel", "p.d.t"], "--output_tabel", "--output_table"),
    ("score", ["--streaming", "--model_dir", "{out}", "--output_topik", "t"], "--output_topik", "--output_topic"),
    ("replay", ["--topic", "t", "--speedupp", "0"], "--speedupp", "--speedup"),
    ("audit", ["--serving_logg", "x"], "--serving_logg", "--serving_log"),
    ("train", ["--prepared_dir", "{out}", "--model_dir", "{out}", "--epoch", "1"], "--epoch", "--epochs"),
    ("report", ["--model_dir", "{out}", "--score_dir", "{out}", "--chartt", "x"], "--chartt", "--chart"),
    ("cells", ["--bigtable_project=p", "--bigtable_instance=i", "--bigtable_table=t", "--famly", "f"], "--famly", "--family"),
    ("pubsub-setup", ["--project", "p", "--topik", "t"], "--topik", "--topic"),
]  # fmt: skip


@pytest.mark.parametrize(("job", "args", "flag", "closest"), MISSPELT, ids=[m[2] for m in MISSPELT])
def test_every_job_refuses_an_unknown_flag_naming_the_closest_one(
    job, args, flag, closest, tmp_path, capsys
):
    """Beam drops a flag no options class declares with a log line; the job would run with the
    default (`prepare --eval_fractoin 0.5` a time split). Every job refuses it before running."""
    out = tmp_path / "out"
    code = run_job(job, [a.format(out=out) for a in args])
    err = capsys.readouterr().err.splitlines()
    assert code == 2
    assert len(err) == 1 and flag in err[0] and f"did you mean {closest}?" in err[0], err
    assert err[0].startswith(f"skewless {job}")
    assert not out.exists()  # nothing ran


def test_a_stray_positional_argument_is_refused(tmp_path, capsys):
    assert run_job("prepare", ["--output_dir", str(tmp_path / "o"), "flights.csv"]) == 2
    assert "unexpected argument 'flights.csv'" in capsys.readouterr().err


def test_an_empty_feature_set_is_an_error_not_the_default(tmp_path, capsys):
    for job, args in (
        ("prepare", ["--output_dir", str(tmp_path / "o")]),
        ("bigtable-setup", ["--bigtable_project=p", "--bigtable_instance=i", "--bigtable_table=t"]),
    ):
        assert run_job(job, ["--feature_set", "", *args]) == 2
        assert "feature set ''" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_a_feature_set_module_that_fails_to_load_is_a_one_line_usage_error(
    tmp_path, capsys, monkeypatch
):
    (tmp_path / "broken_features.py").write_text("from skewless import FeatureSet\nFS = (\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    assert (
        run_job(
            "prepare", ["--feature_set", "broken_features:FS", "--output_dir", str(tmp_path / "o")]
        )
        == 2
    )
    (line,) = capsys.readouterr().err.splitlines()
    assert line.startswith("skewless prepare: feature set 'broken_features:FS': module")
    assert "SyntaxError" in line and "broken_features.py, line 2" in line


@pytest.mark.parametrize(
    ("job", "args", "message"),
    [
        ("train", [], "the following arguments are required: --prepared_dir, --model_dir"),
        ("report", ["--model_dir", "m", "--chart", "c.png"], "--chart needs --score_dir (the chart is of the scored predictions)"),
        ("retrain", ["--model_dir", "m", "--input", "a", "--examples", "b"], "argument --examples: not allowed with argument --input"),
        ("cells", ["--limit", "many"], "argument --limit: invalid int value: 'many'"),
        ("pubsub-setup", [], "the following arguments are required: --project"),
    ],
)
def test_plain_argparse_jobs_report_usage_errors_in_one_line(job, args, message, capsys):
    assert run_job(job, args) == 2
    assert capsys.readouterr().err.splitlines() == [f"skewless {job}: {message}"]


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_train_and_score_print_their_own_lines_only(trained, tmp_path):
    """No TensorFlow C++ start-up lines from train (it loads TensorFlow after its --help), no
    'Resource module is not available' warnings from RunInference in score."""
    skewless = [sys.executable, "-m", "skewless.beam_pipelines.runtime.cli"]
    noise = ("oneDNN", "cuda", "cpu_feature_guard", "absl::InitializeLog", "I0000", "W0000",
             "Resource module", "WARNING root")  # fmt: skip
    runs = {
        "train": ["train", "--prepared_dir", str(trained["prepared"]), "--model_dir",
                  str(tmp_path / "m"), "--epochs", "1"],
        "score": ["score", "--model_dir", str(trained["model_dir"]), "--input", str(trained["csv"]),
                  "--output", str(tmp_path / "s"), "--start", "2013-01-07T00:00:00Z"],
    }  # fmt: skip
    for job, args in runs.items():
        proc = subprocess.run([*skewless, *args], capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, proc.stderr
        noisy = [line for line in proc.stderr.splitlines() if any(n in line for n in noise)]
        assert not noisy, (job, noisy)


@pytest.mark.parametrize("job", sorted(commands()))
def test_every_job_explains_its_options(job, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main([job, "--help"])
    assert exit_info.value.code in (0, None)
    out = capsys.readouterr().out
    assert "usage:" in out and "--" in out


@pytest.mark.timeout(120)
def test_prepare_runs_as_a_module_and_names_missing_options():
    proc = subprocess.run(
        [sys.executable, "-m", "skewless.beam_pipelines.jobs.prepare"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode != 0
    assert "--output_dir" in proc.stderr


def test_the_cli_reads_each_declaration_as_the_job_declares_it():
    """`skewless` lists the commands without importing them (it reads `JOB = Job(...)` with
    ast): what it reads is what each module declares, every module of jobs/ and commands/
    declares one, and every command has one default module."""
    entries = declared()
    for entry in entries:
        job = load(entry.module)
        assert (entry.name, entry.summary, entry.mode, entry.in_process) == (
            job.name, job.summary, job.mode, job.in_process
        )  # fmt: skip
    modules = {
        f"{package}.{path.stem}"
        for package in PACKAGES
        for path in _package_dir(package).glob("[!_]*.py")
    }
    assert {e.module for e in entries} == modules == job_modules()
    assert sorted(commands()) == sorted({e.name for e in entries})
    assert [e.name for e in entries].count("score") == 2  # batch, and --streaming


def test_a_declaration_the_cli_cannot_read_is_a_clear_error(tmp_path):
    path = tmp_path / "job.py"
    path.write_text('NAME = "x"\nJOB = Job(name=NAME, summary="s")\n')
    with pytest.raises(ValueError, match="JOB's name must be a literal"):
        _static_declaration(path)


def test_score_streaming_is_its_own_job_module():
    assert job_module("score", ["--model_dir=m"]) == "skewless.beam_pipelines.jobs.score"
    assert job_module("score", ["--streaming", "--model_dir=m"]) == "skewless.beam_pipelines.jobs.score_streaming"


def test_score_streaming_help_lists_only_its_own_flags(capsys):
    with pytest.raises(SystemExit):
        main(["score", "--streaming", "--help"])
    out = capsys.readouterr().out
    assert "--output_topic" in out and "--subscription" in out and "--model_dir" in out
    assert "--output_table" in out and "--bigquery_endpoint" in out  # predictions to BigQuery
    for other in (
        "--allowed_lateness_s",
        "--source_timestamps",
        "--write_retry_s",
        "--output_method",
        "--input",
    ):
        assert other not in out, other


def test_job_options_keep_one_view_per_class_over_the_shared_values():
    import copy
    import pickle

    from apache_beam.options.pipeline_options import (
        GoogleCloudOptions,
        StandardOptions,
        TypeOptions,
    )

    from skewless.beam_pipelines.jobs import prepare
    from skewless.beam_pipelines.runtime.parsing import JobOptions, parse_job_options

    options = parse_job_options(["--output_dir", "/tmp/x", "--project", "p"], prepare.JOB)
    assert isinstance(options, JobOptions)
    assert options.view_as(TypeOptions) is options.view_as(TypeOptions)
    options.view_as(StandardOptions).streaming = True  # written through one view ...
    assert options.get_all_options()["streaming"] is True  # ... read by every other reader
    # A copy (as beam.Pipeline makes) has its own views over its own values.
    copied = copy.deepcopy(options)
    copied.view_as(StandardOptions).streaming = False
    assert options.view_as(StandardOptions).streaming is True
    assert copied.view_as(StandardOptions).streaming is False
    # Pickling keeps Beam's rule: the impersonated account is not carried to the workers.
    options.view_as(GoogleCloudOptions).impersonate_service_account = "sa@p"
    restored = pickle.loads(pickle.dumps(options))
    assert restored.view_as(GoogleCloudOptions).impersonate_service_account is None
    assert restored.view_as(GoogleCloudOptions).project == "p"
    assert options.view_as(GoogleCloudOptions).impersonate_service_account == "sa@p"
    restored.view_as(StandardOptions).streaming = False  # its views write its own values
    assert restored.get_all_options()["streaming"] is False
