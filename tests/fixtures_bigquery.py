"""Session-scoped BigQuery emulator (PyPI ``bqemulator``) fixture with table-building helpers.

The emulator runs from its own virtualenv (``make bqemulator`` / ``scripts/setup_bqemulator.sh``),
found through ``BQ_EMULATOR_VENV`` (default ``<repo>/.venv-bqemu``).
"""

from __future__ import annotations

import dataclasses
import io
import os
import socket
import subprocess
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from tests.emulator_process import free_port, log_tail, stop_process_group

REPO_ROOT = Path(__file__).resolve().parent.parent
PROJECT = "skewless-test"
STARTUP_TIMEOUT_S = 60.0
API_TIMEOUT_S = 60.0
# insert_rows_json requests stay well below the API's request size limit.
INSERT_CHUNK_ROWS = 2000

_ARROW_TO_BIGQUERY = [
    (pa.types.is_boolean, "BOOL"),
    (pa.types.is_integer, "INT64"),
    (pa.types.is_floating, "FLOAT64"),
    (pa.types.is_string, "STRING"),
    (pa.types.is_large_string, "STRING"),
    (pa.types.is_binary, "BYTES"),
    (pa.types.is_date, "DATE"),
    (pa.types.is_decimal, "NUMERIC"),
]


def _bigquery_type(field: pa.Field) -> str:
    if pa.types.is_timestamp(field.type):
        # BigQuery TIMESTAMP is an instant; a zone-less Arrow timestamp is a civil DATETIME.
        return "TIMESTAMP" if field.type.tz is not None else "DATETIME"
    for predicate, bq_type in _ARROW_TO_BIGQUERY:
        if predicate(field.type):
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
        rows: pa.Table | Sequence[Mapping[str, Any]],
        schema: Sequence[Any] | None = None,
    ) -> str:
        """Creates and fills a table; returns ``project.dataset.table``.

        An Arrow table is loaded as Parquet (schema derived from the Arrow types unless given);
        dicts are streamed with ``insert_rows`` and need ``schema`` (SchemaFields or
        ``(name, type)`` pairs).
        """
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
                    chunk = rows[start : start + INSERT_CHUNK_ROWS]
                    errors = client.insert_rows(table, chunk, timeout=API_TIMEOUT_S)
                    if errors:
                        raise RuntimeError(f"inserting into {full_id} failed: {errors[:5]}")
        return full_id


def _emulator_venv() -> Path:
    return Path(os.environ.get("BQ_EMULATOR_VENV") or REPO_ROOT / ".venv-bqemu")


def _wait_until_ready(
    proc: subprocess.Popen, rest_port: int, grpc_port: int, log_path: Path
) -> None:
    deadline = time.monotonic() + STARTUP_TIMEOUT_S
    url = f"http://127.0.0.1:{rest_port}/readyz"
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(
                f"BigQuery emulator exited with code {proc.returncode} during startup; "
                f"log {log_path}:\n{log_tail(log_path, lines=40)}"
            )
        try:
            with urllib.request.urlopen(url, timeout=2) as response:
                rest_ready = response.status == 200
        except (urllib.error.URLError, OSError):
            rest_ready = False
        if rest_ready:
            # The gRPC server starts alongside REST; make sure it accepts connections too.
            try:
                socket.create_connection(("127.0.0.1", grpc_port), timeout=2).close()
                return
            except OSError:
                pass
        time.sleep(0.2)
    pytest.fail(
        f"BigQuery emulator not ready after {STARTUP_TIMEOUT_S:.0f}s; "
        f"log {log_path}:\n{log_tail(log_path, lines=40)}"
    )


@pytest.fixture(scope="session")
def bq_emulator(tmp_path_factory: pytest.TempPathFactory) -> Iterator[BigQueryEmulator]:
    venv = _emulator_venv()
    executable = venv / "bin" / "bqemulator"
    home = venv / "home"
    if not executable.exists() or not home.is_dir():
        message = (
            f"BigQuery emulator venv not found at {venv} (no {executable} or {home}); "
            "run `make test` (or `make bqemulator`) to create .venv-bqemu, or set BQ_EMULATOR_VENV"
        )
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)

    rest_port, grpc_port = free_port(), free_port()
    log_path = tmp_path_factory.mktemp("bqemulator") / "bqemulator.log"
    # HOME is where DuckDB finds the extensions setup_bqemulator.sh installed; without them the
    # emulator tries to download them and dies offline.
    env = {**os.environ, "HOME": str(home)}
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(
            [
                str(executable),
                "start",
                "--rest-port",
                str(rest_port),
                "--grpc-port",
                str(grpc_port),
                "--project",
                PROJECT,
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env=env,
            cwd=str(home),
            start_new_session=True,
        )
    try:
        _wait_until_ready(proc, rest_port, grpc_port, log_path)
        yield BigQueryEmulator(
            project=PROJECT,
            rest_endpoint=f"http://127.0.0.1:{rest_port}",
            grpc_endpoint=f"127.0.0.1:{grpc_port}",
            log_path=log_path,
        )
    finally:
        stop_process_group(proc)
