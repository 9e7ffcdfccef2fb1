"""What every job does around its pipeline, without loading Beam: logging, errors found
before the run, the output directory's check (the CLI imports it before any job)."""

from __future__ import annotations

import contextlib
import logging
import os
import warnings

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
    else:
        from apache_beam.io.filesystems import FileSystems

        if not FileSystems.get_filesystem(path):
            raise ValueError(f"{flag} {path!r}: unknown file system")
