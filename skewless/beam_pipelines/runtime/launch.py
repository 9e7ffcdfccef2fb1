"""How a command runs, from the CLI or as `python -m <its module>`: one-line errors, quiet
libraries.

Every error a command reports is one line, `skewless <job>: ...`, with a non-zero exit (2 for
a usage or input error found before the run, 1 for a failure while running); the traceback
and the libraries' logs (TensorFlow's C++ start-up lines, absl, Beam) only with --verbose.
"""

from __future__ import annotations

import argparse
import contextlib
import difflib
import importlib
import os
import sys
import tempfile
import traceback
from collections.abc import Callable

from skewless.beam_pipelines.runtime import job as jobs
from skewless.beam_pipelines.runtime.process import VERBOSE_ENV, configure_logging

VERBOSE_FLAG = "--verbose"
EXIT_USAGE = 2
EXIT_FAILED = 1
_RUNNING = " [while running"  # what Beam's runners append to an error raised in a step


def launch(job: jobs.Job, run: Callable) -> None:
    """`python -m <command module>`: the command as `skewless <name>` runs it (the module
    passes its own `run`, so it is not imported a second time under its package name)."""
    args = list(sys.argv[1:])
    if job.mode and job.mode not in args:
        args.insert(0, job.mode)
    raise SystemExit(run_command(job.name, args, run=run))


def run_command(name: str, args: list[str], run: Callable | None = None) -> int:
    """Run `skewless <name> <args>` (--verbose anywhere in args); the exit code."""
    verbose = VERBOSE_FLAG in args
    args = [a for a in args if a != VERBOSE_FLAG]
    os.environ[VERBOSE_ENV] = "1" if verbose else "0"
    if not verbose:
        # TensorFlow's C++ logging once running (e.g. "failed call to cuInit" on a machine
        # without a GPU); a real failure still surfaces as a Python exception.
        os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    return run_job(name, args, verbose, run)


def run_job(job: str, args: list[str], verbose: bool = False, run=None) -> int:
    """Run one command; report any error as one line on stderr and return the exit code."""
    try:
        if run is None:
            with _quiet_native_stderr(enabled=not verbose):
                module = importlib.import_module(job_module(job, args))
                run = module.run
                if not {"-h", "--help"} & set(args):
                    # A command that loads TensorFlow only when it runs (train: its --help
                    # stays fast) names it, so its C++ start-up lines are absorbed here too.
                    for library in getattr(getattr(module, "JOB", None), "native_libraries", ()):
                        importlib.import_module(library)
                _find_devices_now()
        # Every command's logging; a Beam job configures it again (a batch job quiets the
        # libraries further).
        configure_logging()
        with _one_line_usage_errors():
            run(args)
    except SystemExit as exc:
        if exc.code is None or isinstance(exc.code, int):
            return exc.code or 0
        print(error_line(job, str(exc.code)), file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print(f"skewless {job}: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:  # noqa: BLE001 - the one place every error becomes one line
        if verbose:
            traceback.print_exc()
        print(error_line(job, describe_error(exc)), file=sys.stderr)
        return EXIT_USAGE if _before_run(exc) else EXIT_FAILED
    return 0


def job_module(job: str, args: list[str]) -> str:
    """The module that runs `skewless <job> <args>`: the command's (or its mode's), or the
    module that runs it in this process when that module's `runs_here(args)` says so."""
    module = jobs.module_for(job, args)
    in_process = next(e.in_process for e in jobs.declared() if e.module == module)
    if in_process and importlib.import_module(in_process).runs_here(args):
        return in_process
    return module


def error_line(job: str, message: str) -> str:
    """`skewless <job>: <message>` on one line (a message that already names the job keeps it)."""
    text = " ".join(message.split())
    prefix = f"skewless {job}:"
    if text.startswith(prefix):
        text = text[len(prefix) :].strip()
    return f"{prefix} {text}"


def describe_error(exc: BaseException) -> str:
    """A short, single-line description: the message of a known error, else 'Type: message'.

    Errors raised inside a Beam pipeline arrive wrapped, their message holding the worker's
    traceback: the last 'Type: message' line of it is the cause.
    """
    if _before_run(exc):
        return _first_line(str(exc)) or type(exc).__name__
    if _RUNNING in str(exc) and isinstance(exc, ValueError) and "\n" not in str(exc):
        # The runner re-raised our own error (e.g. an InputError of a file that changed since
        # the check) with the step appended.
        return str(exc).split(_RUNNING)[0].strip()
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    cause = next(
        (line for line in reversed(lines) if _looks_like_exception_line(line)),
        lines[0] if lines else "",
    )
    cause = cause.split(_RUNNING)[0]
    if _looks_like_exception_line(cause):
        text = cause
    else:
        text = f"{type(exc).__name__}: {cause}" if cause else type(exc).__name__
    return text[:500] + (" ... (--verbose for details)" if len(text) > 500 else "")


def _looks_like_exception_line(line: str) -> bool:
    head, sep, _ = line.partition(": ")
    name = head.rsplit(".", 1)[-1]
    return bool(sep) and name.isidentifier() and name[:1].isupper() and (
        name.endswith(("Error", "Exception", "Invalid")) or name in ("InputError",)
    )


def _first_line(text: str) -> str:
    return next((line.strip() for line in text.splitlines() if line.strip()), "")


def _before_run(exc: BaseException) -> bool:
    """Errors of the inputs or the options, raised before any pipeline runs."""
    from skewless.beam_pipelines.io.files import InputError

    try:
        from skewless.transforms.featureset import FeatureSetError
    except ImportError:  # pragma: no cover
        FeatureSetError = InputError  # noqa: N806
    if _RUNNING in str(exc):
        return False
    return isinstance(exc, (InputError, FeatureSetError)) or getattr(exc, "skewless_before_run", False)


@contextlib.contextmanager
def _one_line_usage_errors():
    """The jobs that parse their flags with plain argparse (train, report, cells,
    pubsub-setup) report a usage error as one line, like the Beam jobs, instead of argparse's
    usage block: while a job runs from the CLI, ArgumentParser.error raises SystemExit with
    `<prog>: <message>` (run_job prints it and exits 2)."""
    original = argparse.ArgumentParser.error

    def error(self, message):
        unknown = message.partition("unrecognized arguments: ")[2].split()
        if unknown and unknown[0].startswith("-"):
            flag = unknown[0].split("=", 1)[0]
            known = [s for action in self._actions for s in action.option_strings]
            close = difflib.get_close_matches(flag, known, n=1, cutoff=0.6)
            hint = f" (did you mean {close[0]}?)" if close else f" ({self.prog} --help lists the options)"
            message = f"unknown option {flag}{hint}"
        raise SystemExit(f"{self.prog}: {message}")

    argparse.ArgumentParser.error = error
    try:
        yield
    finally:
        argparse.ArgumentParser.error = original


def _find_devices_now() -> None:
    """TensorFlow looks for a GPU the first time a device is needed (its "failed call to
    cuInit" line goes straight to fd 2): when the job loaded TensorFlow, make that happen now,
    inside the quiet start-up, not whenever a pipeline thread first runs a graph."""
    tf = sys.modules.get("tensorflow")
    if tf is not None:
        tf.config.list_physical_devices()


@contextlib.contextmanager
def _quiet_native_stderr(enabled: bool = True):
    """Send file descriptor 2 to a temporary file while the job's libraries load.

    TensorFlow's C++ start-up lines (oneDNN, CUDA, cpu_feature_guard, absl's "before
    InitializeLog") are written straight to fd 2 before any setting can silence them. If the
    import fails, what was written is replayed so nothing is lost.
    """
    if not enabled:
        yield
        return
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as sink:
        os.dup2(sink.fileno(), 2)
        try:
            yield
        except BaseException:
            sys.stderr.flush()
            os.dup2(saved, 2)
            sink.seek(0)
            os.write(2, sink.read())
            raise
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)


