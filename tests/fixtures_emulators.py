"""Session-scoped Pub/Sub and Bigtable emulator fixtures (Cloud SDK), with small client helpers.

Each emulator runs in its own process group on a free port; tests use unique topic,
subscription and table names. Without the Cloud SDK the tests skip (fail when CI is set).
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import shutil
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.emulator_process import free_port, log_tail, stop_process_group

PROJECT = "skewless-test"
INSTANCE = "skewless-instance"
STARTUP_TIMEOUT_S = 60.0


def _sdk_root() -> Path | None:
    gcloud = shutil.which("gcloud")
    if gcloud is None:
        return None
    try:
        out = subprocess.run(
            [gcloud, "info", "--format=value(installation.sdk_root)"],
            capture_output=True,
            text=True,
            timeout=60,
            check=True,
        ).stdout.strip()
    except (subprocess.SubprocessError, OSError):
        return None
    return Path(out) if out else None


def _missing(message: str) -> None:
    if os.environ.get("CI"):
        pytest.fail(message)
    pytest.skip(message)


def _start(cmd: list[str], log_path: Path, ready: Callable[[], bool], what: str) -> subprocess.Popen:
    log = open(log_path, "wb")  # noqa: SIM115 - closed with the process in _stop
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    proc._skewless_log = log  # type: ignore[attr-defined]
    deadline = time.monotonic() + STARTUP_TIMEOUT_S
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            _stop(proc)
            pytest.fail(f"{what} exited with code {proc.returncode}:\n{log_tail(log_path)}")
        if ready():
            return proc
        time.sleep(0.1)
    _stop(proc)
    pytest.fail(f"{what} not ready after {STARTUP_TIMEOUT_S}s:\n{log_tail(log_path)}")
    raise AssertionError("unreachable")


def _stop(proc: subprocess.Popen) -> None:
    stop_process_group(proc)
    proc._skewless_log.close()  # type: ignore[attr-defined]


@contextlib.contextmanager
def _exported(name: str, value: str) -> Iterator[None]:
    """Set an environment variable for the fixture's lifetime, then restore the previous one."""
    previous = os.environ.get(name)
    os.environ[name] = value
    try:
        yield
    finally:
        if previous is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = previous


def _http_ok(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=1) as response:
            return response.status == 200
    except (urllib.error.URLError, OSError):
        return False


def _tcp_ok(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1):
            return True
    except OSError:
        return False


@contextlib.contextmanager
def paused(proc: subprocess.Popen | None, seconds: float) -> Iterator[None]:
    """Freeze an emulator's process group (SIGSTOP) for `seconds`, then resume it (SIGCONT):
    an outage in which connections stay open and nothing answers. The body runs while frozen."""
    assert proc is not None, "this emulator was not started by the fixture"
    os.killpg(proc.pid, signal.SIGSTOP)
    resume_at = time.monotonic() + seconds
    try:
        yield
        time.sleep(max(0.0, resume_at - time.monotonic()))
    finally:
        os.killpg(proc.pid, signal.SIGCONT)


@dataclasses.dataclass
class PubSubEmulator:
    """A running Pub/Sub emulator; the clients it hands out talk to it (PUBSUB_EMULATOR_HOST)."""

    host: str
    project: str = PROJECT
    process: subprocess.Popen | None = None

    def paused(self, seconds: float):
        return paused(self.process, seconds)

    def publisher(self):
        from google.cloud import pubsub_v1

        return pubsub_v1.PublisherClient()

    def subscriber(self):
        from google.cloud import pubsub_v1

        return pubsub_v1.SubscriberClient()

    def topic(self, prefix: str = "t") -> str:
        """A new topic with a unique name; returns its path."""
        path = f"projects/{self.project}/topics/{prefix}-{uuid.uuid4().hex[:10]}"
        self.publisher().create_topic(name=path)
        return path

    def subscription(self, topic: str, prefix: str = "s") -> str:
        """A new subscription to `topic`; returns its path."""
        path = f"projects/{self.project}/subscriptions/{prefix}-{uuid.uuid4().hex[:10]}"
        with self.subscriber() as sub:
            sub.create_subscription(name=path, topic=topic, ack_deadline_seconds=60)
        return path

    def pull_all(self, subscription: str, expect: int, timeout_s: float = 30.0) -> list:
        """Pull (and ack) until `expect` messages arrived or the timeout; returns the messages."""
        out = []
        deadline = time.monotonic() + timeout_s
        with self.subscriber() as sub:
            while len(out) < expect and time.monotonic() < deadline:
                resp = sub.pull(subscription=subscription, max_messages=100, timeout=5)
                if resp.received_messages:
                    sub.acknowledge(
                        subscription=subscription,
                        ack_ids=[m.ack_id for m in resp.received_messages],
                    )
                    out.extend(m.message for m in resp.received_messages)
        return out


@dataclasses.dataclass
class BigtableEmulator:
    """A running Bigtable emulator; clients talk to it through BIGTABLE_EMULATOR_HOST."""

    host: str
    project: str = PROJECT
    instance: str = INSTANCE
    process: subprocess.Popen | None = None

    def paused(self, seconds: float):
        return paused(self.process, seconds)

    def client(self):
        from google.cloud import bigtable

        return bigtable.Client(project=self.project, admin=True)

    def table_name(self, prefix: str = "features") -> str:
        return f"{prefix}-{uuid.uuid4().hex[:10]}"


@pytest.fixture(scope="session")
def pubsub_emulator(tmp_path_factory: pytest.TempPathFactory) -> Iterator[PubSubEmulator]:
    sdk = _sdk_root()
    binary = sdk / "platform" / "pubsub-emulator" / "bin" / "cloud-pubsub-emulator" if sdk else None
    if binary is None or not binary.exists():
        _missing("Pub/Sub emulator not found (needs the Cloud SDK with the pubsub-emulator component)")
    port = free_port()
    log_path = tmp_path_factory.mktemp("pubsub") / "emulator.log"
    proc = _start(
        [str(binary), "--host=127.0.0.1", f"--port={port}"],
        log_path,
        lambda: _http_ok(f"http://127.0.0.1:{port}/"),
        "Pub/Sub emulator",
    )
    host = f"127.0.0.1:{port}"
    try:
        with _exported("PUBSUB_EMULATOR_HOST", host):
            yield PubSubEmulator(host, process=proc)
    finally:
        _stop(proc)


@pytest.fixture(scope="session")
def bigtable_emulator(tmp_path_factory: pytest.TempPathFactory) -> Iterator[BigtableEmulator]:
    sdk = _sdk_root()
    binary = sdk / "platform" / "bigtable-emulator" / "cbtemulator" if sdk else None
    if binary is None or not binary.exists():
        _missing("Bigtable emulator not found (needs the Cloud SDK with the bigtable component)")
    port = free_port()
    log_path = tmp_path_factory.mktemp("bigtable") / "emulator.log"
    proc = _start(
        [str(binary), "-host", "127.0.0.1", "-port", str(port)],
        log_path,
        lambda: _tcp_ok(port),
        "Bigtable emulator",
    )
    host = f"127.0.0.1:{port}"
    try:
        with _exported("BIGTABLE_EMULATOR_HOST", host):
            yield BigtableEmulator(host, process=proc)
    finally:
        _stop(proc)
