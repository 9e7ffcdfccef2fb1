"""BigQuery sink for Arrow batches: load jobs (batch) or streaming inserts, with an endpoint option.

Beam's WriteToBigQuery cannot be pointed at another endpoint (so not tested against the local
emulator); this sink uses the google-cloud-bigquery client, which can. Rows that fail to be
written go to the dead-letter output with the reason instead of failing the job.
"""

from __future__ import annotations

import io
from collections.abc import Iterator

import apache_beam as beam
import pyarrow as pa
import pyarrow.parquet as pq
from apache_beam.metrics import Metrics
from apache_beam.pvalue import TaggedOutput

from skewless.beam_pipelines.io.bigquery import validate_table_name
from skewless.transforms.record_checks import dead_letter

NAMESPACE = "skewless"
DEAD = "dead"
API_TIMEOUT_S = 300.0
INSERT_CHUNK_ROWS = 500
METHODS = ("load", "insert")


def bigquery_schema(schema: pa.Schema) -> list:
    """Arrow schema -> BigQuery SchemaFields (nullable unless the Arrow field says otherwise)."""
    from google.cloud import bigquery

    def bq_type(t: pa.DataType) -> str:
        if pa.types.is_timestamp(t):
            return "TIMESTAMP" if t.tz is not None else "DATETIME"
        if pa.types.is_integer(t):
            return "INT64"
        if pa.types.is_floating(t):
            return "FLOAT64"
        if pa.types.is_boolean(t):
            return "BOOL"
        if pa.types.is_string(t) or pa.types.is_large_string(t):
            return "STRING"
        if pa.types.is_binary(t) or pa.types.is_large_binary(t):
            return "BYTES"
        raise TypeError(f"no BigQuery type for Arrow type {t}")

    return [
        bigquery.SchemaField(f.name, bq_type(f.type), mode="NULLABLE" if f.nullable else "REQUIRED")
        for f in schema
    ]


def _client(project: str | None, endpoint: str | None):
    from google.cloud import bigquery

    if endpoint:
        from google.auth.credentials import AnonymousCredentials

        # An emulator takes any caller; anonymous credentials avoid a (blocking) ADC lookup.
        return bigquery.Client(
            project=project, credentials=AnonymousCredentials(), client_options={"api_endpoint": endpoint}
        )
    return bigquery.Client(project=project)


class _WriteBatches(beam.DoFn):
    def __init__(self, table: str, schema: pa.Schema, project: str | None, endpoint: str | None, method: str):
        self.table = table
        self.schema = schema
        self.project = project
        self.endpoint = endpoint
        self.method = method

    def setup(self) -> None:
        from google.cloud import bigquery

        self._bigquery = bigquery
        project = self.project or self.table.split(".")[0]
        self._client = _client(project, self.endpoint)
        self._fields = bigquery_schema(self.schema)
        # Created once per worker; exists_ok makes concurrent workers and re-runs harmless.
        self._table = self._client.create_table(
            bigquery.Table(self.table, schema=self._fields), exists_ok=True, timeout=API_TIMEOUT_S
        )
        self._written = Metrics.counter(NAMESPACE, "rows_written")
        self._failed = Metrics.counter(NAMESPACE, "rows_write_failed")

    def teardown(self) -> None:
        if getattr(self, "_client", None) is not None:
            self._client.close()

    def process(self, batch: pa.RecordBatch) -> Iterator:
        if not batch.num_rows:
            return
        try:
            if self.method == "load":
                self._load(batch)
            else:
                self._insert(batch)
        except Exception as exc:  # noqa: BLE001 - any API error: the rows go to dead letters
            self._failed.inc(batch.num_rows)
            reason = f"{type(exc).__name__}: {exc}"
            for row in batch.to_pylist():
                yield TaggedOutput(DEAD, dead_letter("write", reason, row))
            return
        self._written.inc(batch.num_rows)

    def _load(self, batch: pa.RecordBatch) -> None:
        buffer = io.BytesIO()
        pq.write_table(pa.Table.from_batches([batch]).cast(self.schema), buffer)
        buffer.seek(0)
        config = self._bigquery.LoadJobConfig(
            source_format="PARQUET", write_disposition="WRITE_APPEND", schema=self._fields
        )
        job = self._client.load_table_from_file(buffer, self._table, job_config=config, timeout=API_TIMEOUT_S)
        job.result(timeout=API_TIMEOUT_S)

    def _insert(self, batch: pa.RecordBatch) -> None:
        rows = [
            {k: (v.isoformat() if hasattr(v, "isoformat") else v) for k, v in row.items()}
            for row in batch.to_pylist()
        ]
        for start in range(0, len(rows), INSERT_CHUNK_ROWS):
            errors = self._client.insert_rows_json(
                self._table, rows[start : start + INSERT_CHUNK_ROWS], timeout=API_TIMEOUT_S
            )
            if errors:
                raise RuntimeError(f"insert_rows_json reported errors: {errors[:3]}")


class WriteArrowToBigQuery(beam.PTransform):
    """RecordBatches -> rows of a BigQuery table (created if missing); returns the dead letters.

    `method="load"` (batch) runs one Parquet load job per batch; `"insert"` (streaming) uses
    streaming inserts. `endpoint` points the client at an emulator (anonymous credentials).
    A load job appends: a re-run of the same job appends the same rows again.
    """

    def __init__(
        self,
        table: str,
        schema: pa.Schema,
        *,
        project: str | None = None,
        endpoint: str | None = None,
        method: str = "load",
    ):
        super().__init__()
        validate_table_name(table)  # a bad name fails when the pipeline is built
        if method not in METHODS:
            raise ValueError(f"method must be one of {METHODS}, got {method!r}")
        self.table = table.replace(":", ".", 1) if table.count(":") == 1 and table.count(".") == 1 else table
        self.schema = schema
        self.project = project
        self.endpoint = endpoint
        self.method = method

    def expand(self, batches):
        results = batches | "Write" >> beam.ParDo(
            _WriteBatches(self.table, self.schema, self.project, self.endpoint, self.method)
        ).with_outputs(DEAD, main="written")
        return results[DEAD]


# --- streaming inserts of row dicts (score --streaming) ------------------------------------------


class OutputTableError(ValueError):
    """A table a job cannot write its rows to: its dataset is missing, or it exists with
    columns that cannot take them."""


def ensure_table(table: str, fields: list, endpoint: str | None = None) -> None:
    """Create `table` with `fields` (SchemaFields) if it is missing; if it exists, its columns
    must take our rows: each of ours present with the same type (a REQUIRED one of ours may be
    NULLABLE there, not the other way round), and none of its other columns REQUIRED (we
    would leave them empty). Raises OutputTableError, or a google.api_core error from the
    API."""
    from google.api_core.exceptions import NotFound
    from google.cloud import bigquery

    project, dataset, table_id = validate_table_name(table)
    client = _client(project, endpoint)
    try:
        # Asked first: creating a table in a missing dataset is a 404 on BigQuery, a retried
        # 500 on the emulator.
        try:
            client.get_dataset(f"{project}.{dataset}", timeout=API_TIMEOUT_S)
        except NotFound:
            raise OutputTableError(
                f"BigQuery dataset {project}.{dataset} not found: the table {table} is created "
                "if missing, its dataset is not"
            ) from None
        found = client.create_table(
            bigquery.Table(f"{project}.{dataset}.{table_id}", schema=fields),
            exists_ok=True,
            timeout=API_TIMEOUT_S,
        )
    finally:
        client.close()
    theirs = {f.name: f for f in found.schema}
    problems = []
    for ours in fields:
        other = theirs.pop(ours.name, None)
        if other is None:
            problems.append(f"no column {ours.name}")
        elif _standard_type(other.field_type) != _standard_type(ours.field_type):
            problems.append(f"{ours.name} is {other.field_type}, expected {ours.field_type}")
        elif other.mode == "REQUIRED" and ours.mode != "REQUIRED" or other.mode == "REPEATED":
            problems.append(f"{ours.name} is {other.mode}, expected {ours.mode}")
    problems += [f"extra REQUIRED column {f.name}" for f in theirs.values() if f.mode == "REQUIRED"]
    if problems:
        raise OutputTableError(f"BigQuery table {table} exists and does not fit the rows: {'; '.join(problems)}")


_STANDARD_TYPES = {"INTEGER": "INT64", "FLOAT": "FLOAT64", "BOOLEAN": "BOOL"}


def _standard_type(name: str) -> str:
    return _STANDARD_TYPES.get(name.upper(), name.upper())


def _refusal(errors: list[dict]) -> str:
    """insertErrors' entries for one row -> one line."""
    parts = []
    for error in errors:
        where = f" ({error['location']})" if error.get("location") else ""
        parts.append(f"{error.get('reason', 'invalid')}{where}: {error.get('message', '')}".strip())
    return "; ".join(parts) or "refused without a reason"


def _row_id(row: dict) -> str:
    """BigQuery's insertId: the same row inserted again (a retried bundle) is the same id, so
    BigQuery's best-effort de-duplication drops it."""
    import hashlib
    import json

    return hashlib.sha256(json.dumps(row, sort_keys=True, default=str).encode()).hexdigest()[:32]


class _InsertRows(beam.DoFn):
    """Lists of row dicts -> one streaming insert request per list.

    BigQuery answers per row: the rows it refuses (insertErrors; with skipInvalidRows the
    others are written) and the rows of a request it refuses as a whole (400 Bad Request, 404
    Not Found: the table is gone) go to DEAD with BigQuery's reason. Any other failure (a 5xx,
    403/429 quota, the network, a timeout) raises, so the runner retries the bundle: an
    outage delays rows, it does not turn them into dead letters.
    """

    def __init__(self, table: str, endpoint: str | None, feature_set: str):
        self.table = table
        self.endpoint = endpoint
        self.feature_set = feature_set

    def setup(self) -> None:
        self._client = _client(self.table.split(".")[0], self.endpoint)
        self._written = Metrics.counter(NAMESPACE, "rows_written")
        self._failed = Metrics.counter(NAMESPACE, "rows_write_failed")

    def teardown(self) -> None:
        if getattr(self, "_client", None) is not None:
            self._client.close()

    def process(self, rows: list[dict]) -> Iterator[TaggedOutput]:
        from google.api_core import exceptions as gexc

        try:
            errors = self._client.insert_rows_json(
                self.table,
                rows,
                row_ids=[_row_id(r) for r in rows],
                skip_invalid_rows=True,
                timeout=API_TIMEOUT_S,
            )
        except (gexc.BadRequest, gexc.NotFound) as exc:
            whole = [{"reason": type(exc).__name__, "message": exc.message}]
            errors = [{"index": i, "errors": whole} for i in range(len(rows))]
        refused = {e["index"]: _refusal(e.get("errors", [])) for e in errors}
        self._written.inc(len(rows) - len(refused))
        if refused:
            self._failed.inc(len(refused))
        for index, reason in sorted(refused.items()):
            letter = dead_letter("write", f"BigQuery refused the row: {reason}", rows[index], self.feature_set)
            yield TaggedOutput(DEAD, letter)


class InsertRowsToBigQuery(beam.PTransform):
    """Row dicts (JSON values: ISO-8601 text for timestamps) -> streaming inserts into an
    existing BigQuery table (`ensure_table` makes it); returns the dead letters of the rows
    BigQuery refused, with its reason. Counts rows_written and rows_write_failed.

    Rows travel in lists of up to INSERT_CHUNK_ROWS, one per bundle and request (fixed-size
    BatchElements, as the streaming scorer's lookup). Each row has a stable insertId (a hash of
    its content), so a retried bundle's rows are de-duplicated by BigQuery (best effort).
    """

    def __init__(self, table: str, *, endpoint: str | None = None, feature_set: str = ""):
        super().__init__()
        project, dataset, table_id = validate_table_name(table)  # a bad name fails when built
        self.table = f"{project}.{dataset}.{table_id}"
        self.endpoint = endpoint
        self.feature_set = feature_set

    def expand(self, rows):
        results = (
            rows
            | "Batch" >> beam.BatchElements(min_batch_size=INSERT_CHUNK_ROWS, max_batch_size=INSERT_CHUNK_ROWS)
            | "Insert"
            >> beam.ParDo(_InsertRows(self.table, self.endpoint, self.feature_set)).with_outputs(
                DEAD, main="written"
            )
        )
        return results[DEAD]
