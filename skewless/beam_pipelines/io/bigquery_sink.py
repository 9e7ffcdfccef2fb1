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
