"""Benchmark helpers: run a command as a child process and measure its wall time and peak RSS.

What the benchmarks share with the tests (emulators, data slices, paced publishers, the runner's
ceiling) is in tests/support/."""

from __future__ import annotations

import os
import subprocess
import time
from dataclasses import dataclass


@dataclass
class Measured:
    name: str
    seconds: float
    peak_rss_mib: float
    returncode: int


def measure(name: str, argv: list[str], log_path: str) -> Measured:
    """Run argv to completion; wall seconds and the child's peak RSS (its own children excluded)."""
    with open(log_path, "wb") as log:
        started = time.perf_counter()
        proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT)
        _, status, usage = os.wait4(proc.pid, 0)
        seconds = time.perf_counter() - started
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode:
        raise SystemExit(f"{name} failed (exit {proc.returncode}); see {log_path}")
    return Measured(name, seconds, usage.ru_maxrss / 1024.0, proc.returncode)
