"""Benchmark helpers: run a command as a child process and measure its wall time and peak RSS."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
import zipfile
from collections.abc import Collection
from dataclasses import dataclass
from pathlib import Path


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


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ready(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1):
            return True
    except OSError:
        return False


def start_emulators() -> tuple[list[subprocess.Popen], dict]:
    """Start the Pub/Sub and Bigtable emulators of the Cloud SDK on free ports; set their env."""
    sdk = subprocess.run(
        [shutil.which("gcloud"), "info", "--format=value(installation.sdk_root)"],
        capture_output=True, text=True, check=True,
    ).stdout.strip()  # fmt: skip
    ps_port, bt_port = _free_port(), _free_port()
    commands = [
        [
            f"{sdk}/platform/pubsub-emulator/bin/cloud-pubsub-emulator",
            "--host=127.0.0.1",
            f"--port={ps_port}",
        ],
        [
            f"{sdk}/platform/bigtable-emulator/cbtemulator",
            "-host",
            "127.0.0.1",
            "-port",
            str(bt_port),
        ],
    ]
    procs = [
        subprocess.Popen(
            c, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True
        )
        for c in commands
    ]
    deadline = time.monotonic() + 60
    while not (_ready(ps_port) and _ready(bt_port)):
        if time.monotonic() > deadline or any(p.poll() is not None for p in procs):
            stop(procs)
            raise SystemExit("emulators did not start")
        time.sleep(0.2)
    time.sleep(1.0)  # the Pub/Sub emulator accepts connections a little before it serves
    env = {
        "PUBSUB_EMULATOR_HOST": f"127.0.0.1:{ps_port}",
        "BIGTABLE_EMULATOR_HOST": f"127.0.0.1:{bt_port}",
    }
    os.environ.update(env)
    return procs, env


def stop(procs: list[subprocess.Popen]) -> None:
    for proc in procs:
        try:
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(timeout=10)
        except (ProcessLookupError, subprocess.TimeoutExpired):
            pass


def flights_csv(path: Path, months: Collection[int] | None = None) -> int:
    """The bundled flights of `months` (all when None), as the CSV lines they are, written to
    `path`; returns the rows."""
    from skewless.examples.flights import bundled_flights_path

    with zipfile.ZipFile(bundled_flights_path()) as archive:
        text = archive.read(archive.namelist()[0]).decode()
    header, *lines = text.splitlines()
    wanted = None if months is None else {str(m) for m in months}
    keep = [line for line in lines if wanted is None or line.split(",")[1] in wanted]
    path.write_text("\n".join([header, *keep]) + "\n")
    return len(keep)
