"""The `skewless` entry point: subcommands, --help for every job, clear usage errors."""

import subprocess
import sys

import pytest

from beam_pipelines.cli import JOBS, job_module, main


def test_top_level_help_lists_every_job(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    for job in ("prepare", "aggregate", "bigtable-setup", "replay", "train", "score", "report"):
        assert job in out and job in JOBS


def test_unknown_command_is_an_error(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["frobnicate"])
    assert "unknown command 'frobnicate'" in str(exit_info.value.code)


@pytest.mark.parametrize("job", sorted(JOBS))
def test_every_job_explains_its_options(job, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main([job, "--help"])
    assert exit_info.value.code in (0, None)
    out = capsys.readouterr().out
    assert "usage:" in out and "--" in out


@pytest.mark.timeout(120)
def test_prepare_runs_as_a_module_and_names_missing_options():
    proc = subprocess.run(
        [sys.executable, "-m", "beam_pipelines.prepare"], capture_output=True, text=True, timeout=120
    )
    assert proc.returncode != 0
    assert "--output_dir" in proc.stderr


def test_score_streaming_is_its_own_job_module():
    assert job_module("score", ["--model_dir=m"]) == "beam_pipelines.score"
    assert job_module("score", ["--streaming", "--model_dir=m"]) == "beam_pipelines.score_stream"


def test_score_streaming_help_lists_only_its_own_flags(capsys):
    with pytest.raises(SystemExit):
        main(["score", "--streaming", "--help"])
    out = capsys.readouterr().out
    assert "--output_topic" in out and "--subscription" in out and "--model_dir" in out
    for other in ("--allowed_lateness_s", "--source_timestamps", "--write_retry_s", "--output_table"):
        assert other not in out, other
