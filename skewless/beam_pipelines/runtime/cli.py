"""The `skewless` console entry point: lists the commands and runs one.

The commands are the modules of jobs/ and commands/ that declare `JOB = Job(...)`
(runtime/job.py), read without importing them; runtime/launch.py runs the chosen one.
"""

from __future__ import annotations

import difflib
import sys

from skewless.beam_pipelines.runtime import job as jobs
from skewless.beam_pipelines.runtime.launch import EXIT_USAGE, VERBOSE_FLAG, run_command


def main(argv: list[str] | None = None) -> None:
    """`skewless <command> [options] [--verbose]`."""
    argv = list(sys.argv[1:] if argv is None else argv)
    commands = jobs.commands()
    first = next((a for a in argv if a != VERBOSE_FLAG), None)
    if first is not None and first not in ("-h", "--help") and first not in commands:
        close = difflib.get_close_matches(first, list(commands), n=1)
        hint = f" (did you mean {close[0]}?)" if close else " (skewless --help lists them)"
        print(f"skewless: unknown command {first!r}{hint}", file=sys.stderr)
        raise SystemExit(EXIT_USAGE)
    if first is None or first in ("-h", "--help"):
        width = max(map(len, commands)) + 2
        sections = []
        for title, package in (("pipelines", jobs.PACKAGES[0]), ("commands", jobs.PACKAGES[1])):
            sections += ["", f"{title}:"] + [
                f"  {name:<{width}}{entry.summary}"
                for name, entry in commands.items()
                if entry.module.startswith(package + ".")
            ]
        usage = "\n".join(
            [
                "usage: skewless <command> [options] [--verbose]   (skewless <command> --help)",
                *sections,
                f"\n{VERBOSE_FLAG}: tracebacks and the libraries' logs (TensorFlow, absl, Beam)",
            ]
        )
        # Asked for: stdout and success; a bare `skewless` is a usage error (stderr, exit 2).
        print(usage, file=sys.stdout if first else sys.stderr)
        raise SystemExit(0 if first else EXIT_USAGE)
    rest = list(argv)
    rest.remove(first)
    raise SystemExit(run_command(first, rest))


if __name__ == "__main__":
    main()
