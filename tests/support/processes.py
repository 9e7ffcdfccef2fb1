"""Process plumbing for emulators and child jobs: free ports, readiness polls, log tails, and
stopping a process group."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def log_tail(path: Path, lines: int = 30) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError as exc:
        return f"(no log: {exc})"


def http_ok(url: str, timeout_s: float = 1.0) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=timeout_s) as response:
            return response.status == 200
    except (urllib.error.URLError, OSError):
        return False


def tcp_ok(port: int, timeout_s: float = 1.0) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=timeout_s):
            return True
    except OSError:
        return False


class StartupError(RuntimeError):
    """A process exited or did not become ready in time; the message ends with its log's tail."""


def wait_until_ready(
    proc: subprocess.Popen,
    ready: Callable[[], bool],
    what: str,
    log_path: Path,
    timeout_s: float,
    interval_s: float = 0.1,
    log_lines: int = 30,
) -> None:
    """Poll `ready` until it holds; raise StartupError if the process exits or time runs out."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise StartupError(
                f"{what} exited with code {proc.returncode}; log {log_path}:\n"
                f"{log_tail(log_path, log_lines)}"
            )
        if ready():
            return
        time.sleep(interval_s)
    raise StartupError(
        f"{what} not ready after {timeout_s:.0f}s; log {log_path}:\n{log_tail(log_path, log_lines)}"
    )


def stop_process_group(proc: subprocess.Popen) -> None:
    """SIGTERM the process's own session (no worker left over), SIGKILL if it lingers."""
    if proc.poll() is not None:
        return
    try:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=10)
    except ProcessLookupError:
        pass
