"""Shared wiring for the job modules: option parsing with a complete --help, runner defaults."""

from __future__ import annotations

import argparse
import difflib
import json
import sys
import time
from collections.abc import Callable, Sequence

from apache_beam.options.pipeline_options import (
    DirectOptions,
    GoogleCloudOptions,
    PipelineOptions,
    SetupOptions,
    StandardOptions,
    WorkerOptions,
)

from skewless.beam_pipelines.runtime.job import Job

BEAM_OPTION_GROUPS = (
    StandardOptions,
    GoogleCloudOptions,
    WorkerOptions,
    DirectOptions,
    SetupOptions,
)
LOCAL_BATCH_RUNNER = "FnApiRunner"


class JobOptions(PipelineOptions):
    """The options of a job: PipelineOptions whose views are made once per options class.

    Beam builds a fresh view (an argparse parse of every flag) on each `view_as`, and its
    type checks ask for one on every transform applied: about 3,200 views, 1 s of prepare's
    start. A view reads and writes the shared values, so one view per class behaves the same.
    Copies and pickles leave the views behind (a copy makes its own, over its own values).
    """

    def view_as(self, cls):
        views = self.__dict__.setdefault("_views", {})
        view = views.get(cls)
        if view is None:
            view = views[cls] = super().view_as(cls)
        return view

    def __getstate__(self):
        state = dict(super().__getstate__())
        state.pop("_views", None)
        return state


def help_parser(
    prog: str, description: str, job_options: type[PipelineOptions]
) -> argparse.ArgumentParser:
    """An argparse parser listing the job's own options and the usual Beam options, for --help."""
    parser = argparse.ArgumentParser(
        prog=prog,
        description=description,
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        epilog="Any other Apache Beam pipeline option is accepted and passed to the runner.",
    )
    job_options._add_argparse_args(parser.add_argument_group("job options"))
    for group in BEAM_OPTION_GROUPS:
        try:
            group._add_argparse_args(parser.add_argument_group(f"Beam {group.__name__}"))
        except (argparse.ArgumentError, TypeError, AttributeError):
            continue  # an option group that cannot render in plain argparse; still accepted
    return parser


def metric_counters(result, namespace: str = "skewless") -> dict[str, int]:
    """Committed (or attempted) counter values of a finished pipeline, by name."""
    from apache_beam.metrics.metric import MetricsFilter

    out: dict[str, int] = {}
    for counter in result.metrics().query(MetricsFilter().with_namespace(namespace))["counters"]:
        value = counter.committed if counter.committed is not None else counter.attempted
        out[counter.key.metric.name] = out.get(counter.key.metric.name, 0) + int(value or 0)
    return out


class _FlagGroups:
    """Several options classes rendered as one for --help (duck-types `_add_argparse_args`)."""

    def __init__(self, *groups):
        self.groups = groups

    def _add_argparse_args(self, parser):
        for group in self.groups:
            group._add_argparse_args(parser)


def parse_job_options(
    argv: Sequence[str] | None,
    job: Job,
    default_runner: str | None = LOCAL_BATCH_RUNNER,
) -> PipelineOptions:
    """The options of `job` (its declaration's groups and required flags), with a --help
    listing every group; a flag neither the job nor Beam declares, a bad value or a missing
    required flag is a one-line usage error (Beam's shared parser cannot mark flags required:
    it would fail every other job of the same process)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = help_parser(job.prog, job.description, _FlagGroups(*job.groups))
    if "-h" in argv or "--help" in argv:
        parser.print_help()
        raise SystemExit(0)
    _check_flag_values(parser, argv, job.prog)
    _reject_unknown_flags(job.groups, argv, job.prog)
    options = JobOptions(argv)
    values = options.get_all_options()
    missing = [f"--{name}" for name in job.required if not values.get(name)]
    if missing:
        raise SystemExit(f"{job.prog}: missing required option(s): {', '.join(missing)}")
    std = options.view_as(StandardOptions)
    if std.runner is None and default_runner:
        # The DirectRunner first tries to download the Prism binary, which fails offline.
        std.runner = default_runner
    return options


def run_and_summarise(
    p,
    options: PipelineOptions,
    summarise: Callable[[dict[str, int], float], dict],
    log,
    shown: Callable[[dict], dict] = lambda summary: summary,
) -> dict | None:
    """The end of every batch job: run the pipeline to its end, then (not after a Dataflow
    dry run, which only builds the graph) turn its counters and elapsed seconds into the
    job's summary (`summarise(counters, elapsed_seconds)`), log it and print it (or the part
    `shown` picks) as one JSON line; returns the summary (None after a dry run)."""
    started = time.monotonic()
    result = p.run()
    result.wait_until_finish()
    if is_dry_run(options):
        log.info("dry run: the job graph was built and not run")
        return None
    summary = summarise(metric_counters(result), round(time.monotonic() - started, 2))
    line = json.dumps(shown(summary), default=str)
    log.info("%s finished: %s", log.name.rsplit(".", 1)[-1], line)
    print(line)
    return summary


def _check_flag_values(parser: argparse.ArgumentParser, argv: list[str], prog: str) -> None:
    """A bad value of a known flag (an invalid choice, a non-number) as one line, before Beam's
    shared parser would print its whole usage text and exit."""
    parser.exit_on_error = False
    parser.allow_abbrev = False
    try:
        parser.parse_known_args(argv)
    except argparse.ArgumentError as exc:
        raise SystemExit(f"{prog}: {exc}") from None
    except Exception:  # noqa: BLE001 - Beam's own parser has the last word on anything else
        return


def beam_option_classes() -> list[type[PipelineOptions]]:
    """Every options class Apache Beam itself declares (runners, file systems, workers, tests)."""
    return [
        cls
        for cls in PipelineOptions.__subclasses__()
        if cls.__module__.split(".", 1)[0] == "apache_beam"
    ]


def _reject_unknown_flags(
    groups: Sequence[type[PipelineOptions]], argv: list[str], prog: str
) -> None:
    """A flag that neither the job nor Beam declares is a usage error naming the closest known
    flag. Beam's own parser would drop it with a log line, so `--eval_fractoin 0.5` would run
    with the default split; a flag of another job (imported into the same process) is unknown
    to this one too."""
    from apache_beam.options.pipeline_options import _BeamArgumentParser

    parser = _BeamArgumentParser(allow_abbrev=False, add_help=False)
    for group in (*groups, *beam_option_classes()):
        try:
            group._add_argparse_args(parser)
        except argparse.ArgumentError:
            continue  # declared twice (a group shared by the job and Beam): already known
    _, unknown = parser.parse_known_args(argv)
    if not unknown:
        return
    flag = next((a.split("=", 1)[0] for a in unknown if a.startswith("-")), None)
    if flag is None:
        raise SystemExit(f"{prog}: unexpected argument {unknown[0]!r} (options are --name value)")
    known = [s for action in parser._actions for s in action.option_strings]
    close = difflib.get_close_matches(flag, known, n=1, cutoff=0.6)
    hint = f" (did you mean {close[0]}?)" if close else f" ({prog} --help lists the options)"
    raise SystemExit(f"{prog}: unknown option {flag}{hint}")


def is_dry_run(options: PipelineOptions) -> bool:
    """DataflowRunner's --dry_run is untyped: any value, even False, means a dry run."""
    return options.get_all_options(retain_unknown_options=True).get("dry_run") not in (None, False)
