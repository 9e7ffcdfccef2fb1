"""The emulators the tests and the benchmarks run: Pub/Sub and Bigtable (Cloud SDK) and BigQuery
(PyPI ``bqemulator`` in a virtualenv of its own), each in its own process group on free ports,
as context managers that set the client environment for their lifetime and stop the group at
the end. tests/conftest.py wraps them in session fixtures; bench/*.py use them directly.

Without the Cloud SDK (or the BigQuery emulator's virtualenv) they raise EmulatorMissing, which
the fixtures turn into a skip (a failure when CI is set); a start that fails raises StartupError.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import io
import os
import shutil
import signal
import socket
import subprocess
import time
import uuid
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

from tests.support import REPO_ROOT
from tests.support.processes import (
    StartupError,
    free_port,
    http_ok,
    stop_process_group,
    tcp_ok,
    wait_until_ready,
)

PROJECT = "skewless-test"
INSTANCE = "skewless-instance"
STARTUP_TIMEOUT_S = 60.0
API_TIMEOUT_S = 60.0
# insert_rows_json requests stay well below the API's request size limit.
INSERT_CHUNK_ROWS = 2000

__all__ = [
    "BigQueryEmulator",
    "BigtableEmulator",
    "EmulatorMissing",
    "PubSubEmulator",
    "StartupError",
    "bigquery_emulator",
    "bigtable_emulator",
    "pubsub_and_bigtable",
    "pubsub_emulator",
]


class EmulatorMissing(RuntimeError):
    """The emulator is not installed on this machine (no Cloud SDK component, no virtualenv)."""


@functools.lru_cache(maxsize=1)
def sdk_root() -> Path | None:
    """The Cloud SDK root (`gcloud info`), or None without gcloud."""
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


def _sdk_binary(*parts: str, missing: str) -> Path:
    sdk = sdk_root()
    binary = sdk.joinpath(*parts) if sdk else None
    if binary is None or not binary.exists():
        raise EmulatorMissing(missing)
    return binary


@contextlib.contextmanager
def _exported(name: str, value: str) -> Iterator[None]:
    """Set an environment variable for the block's lifetime, then restore the previous one."""
    previous = os.environ.get(name)
    os.environ[name] = value
    try:
        yield
    finally:
        if previous is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = previous


@contextlib.contextmanager
def _process(cmd: list[str], log_path: Path, ready, what: str, **popen) -> Iterator[subprocess.Popen]:
    """A process in its own session, its output in `log_path`, ready when `ready()` holds."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(
            cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            start_new_session=True, **popen,
        )  # fmt: skip
        try:
            wait_until_ready(proc, ready, what, log_path, STARTUP_TIMEOUT_S)
            yield proc
        finally:
            stop_process_group(proc)


@contextlib.contextmanager
def paused(proc: subprocess.Popen | None, seconds: float) -> Iterator[None]:
    """Freeze an emulator's process group (SIGSTOP) for `seconds`, then resume it (SIGCONT):
    an outage in which connections stay open and nothing answers. The body runs while frozen."""
    assert proc is not None, "this emulator was not started here"
    os.killpg(proc.pid, signal.SIGSTOP)
    resume_at = time.monotonic() + seconds
    try:
        yield
        time.sleep(max(0.0, resume_at - time.monotonic()))
    finally:
        os.killpg(proc.pid, signal.SIGCONT)


# --- Pub/Sub ---------------------------------------------------------------------------------


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


@contextlib.contextmanager
def pubsub_emulator(log_dir: Path, project: str = PROJECT) -> Iterator[PubSubEmulator]:
    """The Cloud SDK's Pub/Sub emulator on a free port (ready: HTTP 200 on /)."""
    binary = _sdk_binary(
        "platform", "pubsub-emulator", "bin", "cloud-pubsub-emulator",
        missing="Pub/Sub emulator not found (needs the Cloud SDK with the pubsub-emulator component)",
    )  # fmt: skip
    port = free_port()
    with _process(
        [str(binary), "--host=127.0.0.1", f"--port={port}"],
        Path(log_dir) / "pubsub-emulator.log",
        lambda: http_ok(f"http://127.0.0.1:{port}/"),
        "Pub/Sub emulator",
    ) as proc:
        host = f"127.0.0.1:{port}"
        with _exported("PUBSUB_EMULATOR_HOST", host):
            yield PubSubEmulator(host, project, proc)


# --- Bigtable --------------------------------------------------------------------------------


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


@contextlib.contextmanager
def bigtable_emulator(
    log_dir: Path, project: str = PROJECT, instance: str = INSTANCE
) -> Iterator[BigtableEmulator]:
    """The Cloud SDK's Bigtable emulator (cbtemulator) on a free port (ready: TCP connect)."""
    binary = _sdk_binary(
        "platform", "bigtable-emulator", "cbtemulator",
        missing="Bigtable emulator not found (needs the Cloud SDK with the bigtable component)",
    )  # fmt: skip
    port = free_port()
    with _process(
        [str(binary), "-host", "127.0.0.1", "-port", str(port)],
        Path(log_dir) / "bigtable-emulator.log",
        lambda: tcp_ok(port),
        "Bigtable emulator",
    ) as proc:
        host = f"127.0.0.1:{port}"
        with _exported("BIGTABLE_EMULATOR_HOST", host):
            yield BigtableEmulator(host, project, instance, proc)


@dataclasses.dataclass
class PubSubAndBigtable:
    """Both Cloud SDK emulators, and the environment a child process needs to reach them."""

    pubsub: PubSubEmulator
    bigtable: BigtableEmulator

    @property
    def env(self) -> dict[str, str]:
        return {"PUBSUB_EMULATOR_HOST": self.pubsub.host, "BIGTABLE_EMULATOR_HOST": self.bigtable.host}


@contextlib.contextmanager
def pubsub_and_bigtable(
    log_dir: Path, project: str = PROJECT, instance: str = INSTANCE
) -> Iterator[PubSubAndBigtable]:
    """Both emulators of the streaming jobs (what a benchmark of them starts)."""
    with pubsub_emulator(log_dir, project) as ps, bigtable_emulator(log_dir, project, instance) as bt:
        yield PubSubAndBigtable(ps, bt)


# --- BigQuery --------------------------------------------------------------------------------

_ARROW_TO_BIGQUERY = [
    ("is_boolean", "BOOL"),
    ("is_integer", "INT64"),
    ("is_floating", "FLOAT64"),
    ("is_string", "STRING"),
    ("is_large_string", "STRING"),
    ("is_binary", "BYTES"),
    ("is_date", "DATE"),
    ("is_decimal", "NUMERIC"),
]


def _bigquery_type(field) -> str:
    import pyarrow as pa

    if pa.types.is_timestamp(field.type):
        # BigQuery TIMESTAMP is an instant; a zone-less Arrow timestamp is a civil DATETIME.
        return "TIMESTAMP" if field.type.tz is not None else "DATETIME"
    for predicate, bq_type in _ARROW_TO_BIGQUERY:
        if getattr(pa.types, predicate)(field.type):
            return bq_type
    raise TypeError(f"no BigQuery type for Arrow field {field}")


@dataclasses.dataclass
class BigQueryEmulator:
    """A running emulator: its endpoints and helpers to create datasets and tables."""

    project: str
    rest_endpoint: str
    grpc_endpoint: str
    log_path: Path

    def client(self) -> Any:
        from google.auth.credentials import AnonymousCredentials
        from google.cloud import bigquery

        return bigquery.Client(
            project=self.project,
            credentials=AnonymousCredentials(),
            client_options={"api_endpoint": self.rest_endpoint},
        )

    def args(self) -> list[str]:
        """The flags that point a job's BigQuery reads at this emulator."""
        return [
            "--bigquery_endpoint", self.rest_endpoint,
            "--bigquery_storage_endpoint", self.grpc_endpoint,
            "--bigquery_project", self.project,
        ]  # fmt: skip

    def create_dataset(self, dataset_id: str | None = None) -> str:
        """Creates a dataset (a unique name by default) and returns its id."""
        dataset_id = dataset_id or f"ds_{uuid.uuid4().hex[:12]}"
        with self.client() as client:
            client.create_dataset(f"{self.project}.{dataset_id}", timeout=API_TIMEOUT_S)
        return dataset_id

    def create_table(
        self,
        dataset_id: str,
        table_id: str,
        rows: Any,
        schema: Sequence[Any] | None = None,
    ) -> str:
        """Creates and fills a table; returns ``project.dataset.table``.

        An Arrow table is loaded as Parquet (schema derived from the Arrow types unless given);
        dicts (a sequence of mappings) are streamed with ``insert_rows`` and need ``schema``
        (SchemaFields or ``(name, type)`` pairs).
        """
        import pyarrow as pa
        import pyarrow.parquet as pq
        from google.cloud import bigquery

        full_id = f"{self.project}.{dataset_id}.{table_id}"
        if schema is None:
            if not isinstance(rows, pa.Table):
                raise ValueError("rows given as dicts need an explicit schema")
            schema = [bigquery.SchemaField(f.name, _bigquery_type(f)) for f in rows.schema]
        fields = [
            f if isinstance(f, bigquery.SchemaField) else bigquery.SchemaField(*f) for f in schema
        ]
        with self.client() as client:
            # The emulator's load jobs do not create the destination table: create it first.
            table = client.create_table(
                bigquery.Table(full_id, schema=fields), timeout=API_TIMEOUT_S
            )
            if isinstance(rows, pa.Table):
                buffer = io.BytesIO()
                pq.write_table(rows, buffer)
                buffer.seek(0)
                job = client.load_table_from_file(
                    buffer,
                    table,
                    job_config=bigquery.LoadJobConfig(source_format="PARQUET"),
                    timeout=API_TIMEOUT_S,
                )
                job.result(timeout=API_TIMEOUT_S)
            else:
                rows = list(rows)
                for start in range(0, len(rows), INSERT_CHUNK_ROWS):
                    chunk: list[Mapping[str, Any]] = rows[start : start + INSERT_CHUNK_ROWS]
                    errors = client.insert_rows(table, chunk, timeout=API_TIMEOUT_S)
                    if errors:
                        raise RuntimeError(f"inserting into {full_id} failed: {errors[:5]}")
        return full_id


def bigquery_emulator_venv() -> Path:
    return Path(os.environ.get("BQ_EMULATOR_VENV") or REPO_ROOT / ".venv-bqemu")


def _bigquery_ready(rest_port: int, grpc_port: int) -> bool:
    if not http_ok(f"http://127.0.0.1:{rest_port}/readyz", timeout_s=2):
        return False
    # The gRPC server starts alongside REST; make sure it accepts connections too.
    try:
        socket.create_connection(("127.0.0.1", grpc_port), timeout=2).close()
        return True
    except OSError:
        return False


@contextlib.contextmanager
def bigquery_emulator(log_dir: Path, project: str = PROJECT) -> Iterator[BigQueryEmulator]:
    """``bqemulator`` (REST + Storage Read gRPC) from its own virtualenv (``make bqemulator`` /
    ``scripts/setup_bqemulator.sh``), found through ``BQ_EMULATOR_VENV`` (default
    ``<repo>/.venv-bqemu``)."""
    venv = bigquery_emulator_venv()
    executable = venv / "bin" / "bqemulator"
    home = venv / "home"
    if not executable.exists() or not home.is_dir():
        raise EmulatorMissing(
            f"BigQuery emulator venv not found at {venv} (no {executable} or {home}); "
            "run `make test` (or `make bqemulator`) to create .venv-bqemu, or set BQ_EMULATOR_VENV"
        )
    rest_port, grpc_port = free_port(), free_port()
    log_path = Path(log_dir) / "bqemulator.log"
    # HOME is where DuckDB finds the extensions setup_bqemulator.sh installed; without them the
    # emulator tries to download them and dies offline.
    with _process(
        [str(executable), "start", "--rest-port", str(rest_port), "--grpc-port", str(grpc_port),
         "--project", project],
        log_path,
        lambda: _bigquery_ready(rest_port, grpc_port),
        "BigQuery emulator",
        env={**os.environ, "HOME": str(home)},
        cwd=str(home),
    ):  # fmt: skip
        yield BigQueryEmulator(
            project=project,
            rest_endpoint=f"http://127.0.0.1:{rest_port}",
            grpc_endpoint=f"127.0.0.1:{grpc_port}",
            log_path=log_path,
        )
