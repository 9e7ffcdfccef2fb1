"""Shared wiring for the job modules: option parsing with a complete --help, runner defaults."""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import sys
import warnings
from collections.abc import Sequence

from apache_beam.options.pipeline_options import (
    DirectOptions,
    GoogleCloudOptions,
    PipelineOptions,
    SetupOptions,
    StandardOptions,
    WorkerOptions,
)

BEAM_OPTION_GROUPS = (
    StandardOptions,
    GoogleCloudOptions,
    WorkerOptions,
    DirectOptions,
    SetupOptions,
)
LOCAL_BATCH_RUNNER = "FnApiRunner"


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


VERBOSE_ENV = "SKEWLESS_VERBOSE"
LIBRARY_LOGGERS = ("apache_beam", "tensorflow", "absl", "tensorflow_transform", "tfx_bsl", "keras")


def is_verbose() -> bool:
    """--verbose on the `skewless` command line (the CLI sets SKEWLESS_VERBOSE=1)."""
    return os.environ.get(VERBOSE_ENV, "") not in ("", "0")


def configure_logging(batch: bool = False) -> None:
    """The job's own progress and result at INFO; the libraries' logs only with --verbose.

    Quiet by default: Beam, TensorFlow, absl and tf.Transform log (and warn) a screen of
    start-up and runner chatter that says nothing about the job. Their errors still show, as
    one line without the traceback, since a streaming job lives on through them; a batch job
    (`batch=True`) hides them too, as its failure ends the run and the CLI reports it.
    """
    verbose = is_verbose()
    logging.basicConfig(
        level=logging.INFO if verbose else logging.WARNING,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    logging.getLogger("skewless").setLevel(logging.INFO)
    library_level = logging.INFO if verbose else logging.CRITICAL if batch else logging.ERROR
    for noisy in LIBRARY_LOGGERS:
        logging.getLogger(noisy).setLevel(library_level)
    if not verbose:
        for handler in logging.getLogger().handlers:
            if not any(isinstance(f, _NoLibraryTracebacks) for f in handler.filters):
                handler.addFilter(_NoLibraryTracebacks())
        try:
            import absl.logging

            absl.logging.set_verbosity(absl.logging.ERROR)
        except ImportError:
            pass
        warnings.filterwarnings("ignore", module=r"(apache_beam|tensorflow|tfx_bsl|keras)\b")


class _NoLibraryTracebacks(logging.Filter):
    """Library log records keep their message and lose their traceback (--verbose keeps it)."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.exc_info and not record.name.startswith("skewless"):
            record.exc_info = None
            record.exc_text = None
        return True


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
    *,
    prog: str,
    description: str,
    groups: Sequence[type[PipelineOptions]],
    required: Sequence[tuple[type[PipelineOptions], str]],
    default_runner: str | None = LOCAL_BATCH_RUNNER,
) -> PipelineOptions:
    """Options with a --help listing every group, required flags checked (Beam's shared parser
    cannot mark them required: it would fail every other job of the same process)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = help_parser(prog, description, _FlagGroups(*groups))
    if "-h" in argv or "--help" in argv:
        parser.print_help()
        raise SystemExit(0)
    _check_flag_values(parser, argv, prog)
    options = PipelineOptions(argv)
    missing = [f"--{name}" for group, name in required if not getattr(options.view_as(group), name)]
    if missing:
        raise SystemExit(f"{prog}: missing required option(s): {', '.join(missing)}")
    std = options.view_as(StandardOptions)
    if std.runner is None and default_runner:
        # The DirectRunner first tries to download the Prism binary, which fails offline.
        std.runner = default_runner
    return options


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


@contextlib.contextmanager
def before_run():
    """Marks a ValueError or LookupError raised inside (bad options, inputs, model) as found
    before the pipeline ran: the CLI reports it as one line with the usage exit code."""
    try:
        yield
    except (ValueError, LookupError) as exc:
        exc.skewless_before_run = True
        raise


def check_output_dir(path: str, flag: str) -> None:
    """An output directory that names an existing file is an error before the run."""
    from apache_beam.io.filesystems import FileSystems

    if "://" not in path and os.path.exists(path) and not os.path.isdir(path):
        raise ValueError(f"{flag} {path!r} is a file, not a directory")
    if "://" not in path:
        parent = os.path.dirname(os.path.abspath(path))
        while not os.path.exists(parent):
            parent = os.path.dirname(parent)
        if not os.path.isdir(parent):
            raise ValueError(f"{flag} {path!r}: {parent!r} is a file, not a directory")
        if not os.access(parent, os.W_OK):
            raise ValueError(f"{flag} {path!r}: {parent!r} is not writable")
    elif not FileSystems.get_filesystem(path):
        raise ValueError(f"{flag} {path!r}: unknown file system")


def is_dry_run(options: PipelineOptions) -> bool:
    """DataflowRunner's --dry_run is untyped: any value, even False, means a dry run."""
    return options.get_all_options(retain_unknown_options=True).get("dry_run") not in (None, False)
