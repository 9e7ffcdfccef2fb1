"""BigQuery source: reads a table or a parameterized query through the Storage Read API as Arrow.

Beam's own ``ReadFromBigQuery`` cannot be pointed at another endpoint, so it cannot be tested
against the local BigQuery emulator; this source can (``bigquery_endpoint`` for REST,
``storage_endpoint`` for the Storage Read gRPC API) and behaves the same against BigQuery.

Shape of the read: one planning element creates a read session (running the query first when
there is one), the session's streams are redistributed across workers, and each stream is read
into ``pyarrow.RecordBatch`` elements with the raw columns BigQuery returns.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import decimal
import re
import unicodedata
import uuid
from collections.abc import Iterable, Iterator, Sequence
from typing import Any

import apache_beam as beam
import grpc
import pyarrow as pa
from apache_beam.metrics import Metrics
from google.api_core import exceptions as gexc
from google.auth.credentials import AnonymousCredentials
from google.cloud import bigquery
from google.cloud.bigquery_storage_v1 import BigQueryReadClient, types
from google.cloud.bigquery_storage_v1.services.big_query_read.transports import (
    BigQueryReadGrpcTransport,
)

METRICS_NAMESPACE = "skewless"

# Unary API calls (query jobs, session creation) must never hang a worker for ever, e.g. when
# an endpoint is unreachable or credentials are missing.
API_TIMEOUT_S = 300.0
# A stream is one long server-streaming call; the deadline bounds it without cutting off
# the large streams BigQuery hands out for big tables.
READ_TIMEOUT_S = 3600.0
# Tables a query materializes into a temp dataset expire on their own: the read finishes
# long before, and a crashed pipeline leaves nothing behind for good.
TEMP_TABLE_EXPIRATION_HOURS = 24

# https://cloud.google.com/resource-manager/docs/creating-managing-projects: 6-30 chars,
# lowercase letters, digits and hyphens, starts with a letter, no trailing hyphen. Legacy
# domain-scoped projects carry a "domain.com:" prefix.
_PROJECT_RE = re.compile(r"^(?:[a-z][a-z0-9.-]*[a-z0-9]:)?[a-z][a-z0-9-]{4,28}[a-z0-9]$")
# https://cloud.google.com/bigquery/docs/datasets#dataset-naming
_DATASET_RE = re.compile(r"^[A-Za-z0-9_]{1,1024}$")
# Table names allow Unicode letters, marks, numbers, connectors, dashes and spaces, up to
# 1024 UTF-8 bytes: https://cloud.google.com/bigquery/docs/tables#table_naming
_TABLE_CATEGORIES = ("L", "M", "N", "Pc", "Pd", "Zs")
_TABLE_MAX_BYTES = 1024
_PARAMETER_NAME_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,127}$")

_TYPE_ALIASES = {"INTEGER": "INT64", "FLOAT": "FLOAT64", "BOOLEAN": "BOOL"}
_BOOL_VALUES = {"true": True, "false": False}


def validate_table_name(name: str) -> tuple[str, str, str]:
    """Parses ``project.dataset.table`` (or legacy ``project:dataset.table``) into its parts.

    Raises ValueError naming the offending part when the name breaks BigQuery's naming rules.
    """
    if not isinstance(name, str) or not name:
        raise ValueError(f"BigQuery table name must be a non-empty string, got {name!r}")
    project, sep, rest = name.rpartition(":")
    if sep and rest.count(".") == 1:
        # Legacy form: the colon separates project and dataset.
        dataset, table = rest.split(".")
    else:
        # Standard form; a domain-scoped project ("example.com:proj") keeps its colon.
        parts = name.rsplit(".", 2)
        if len(parts) != 3:
            raise ValueError(
                f"BigQuery table name {name!r} must look like project.dataset.table "
                "(or project:dataset.table)"
            )
        project, dataset, table = parts
    if not _PROJECT_RE.match(project):
        raise ValueError(
            f"Invalid project id {project!r} in table name {name!r}: 6-30 lowercase letters, "
            "digits or hyphens, starting with a letter and not ending with a hyphen"
        )
    if not _DATASET_RE.match(dataset):
        raise ValueError(
            f"Invalid dataset id {dataset!r} in table name {name!r}: 1-1024 letters, digits "
            "or underscores"
        )
    _validate_table_id(table, name)
    return project, dataset, table


def _validate_table_id(table: str, name: str) -> None:
    if not table or len(table.encode("utf-8")) > _TABLE_MAX_BYTES:
        raise ValueError(
            f"Invalid table id {table!r} in table name {name!r}: must be 1-{_TABLE_MAX_BYTES} "
            "UTF-8 bytes"
        )
    for char in table:
        if not unicodedata.category(char).startswith(_TABLE_CATEGORIES):
            raise ValueError(
                f"Invalid table id {table!r} in table name {name!r}: character {char!r} is "
                "not a letter, mark, number, underscore, dash or space"
            )


def _parse_value(bq_type: str, raw: str) -> Any:
    if bq_type == "STRING":
        return raw
    if bq_type == "INT64":
        return int(raw)
    if bq_type == "FLOAT64":
        return float(raw)
    if bq_type == "NUMERIC" or bq_type == "BIGNUMERIC":
        return decimal.Decimal(raw)
    if bq_type == "BOOL":
        if raw.lower() not in _BOOL_VALUES:
            raise ValueError(f"expected true or false, got {raw!r}")
        return _BOOL_VALUES[raw.lower()]
    if bq_type == "DATE":
        return dt.date.fromisoformat(raw)
    if bq_type == "DATETIME":
        value = dt.datetime.fromisoformat(raw)
        if value.tzinfo is not None:
            raise ValueError("a DATETIME has no time zone; use TIMESTAMP")
        return value
    if bq_type == "TIMESTAMP":
        value = dt.datetime.fromisoformat(raw)
        # BigQuery reads a timestamp without a zone as UTC; say so explicitly so the client
        # does not depend on the local zone of the machine that builds the pipeline.
        return value if value.tzinfo is not None else value.replace(tzinfo=dt.UTC)
    raise ValueError(f"unsupported type {bq_type}")


_PARAMETER_TYPES = (
    "STRING",
    "INT64",
    "FLOAT64",
    "NUMERIC",
    "BIGNUMERIC",
    "BOOL",
    "DATE",
    "DATETIME",
    "TIMESTAMP",
)


def parse_query_parameter(spec: str) -> bigquery.ScalarQueryParameter:
    """Parses a CLI spec ``name=TYPE:value`` (e.g. ``min_delay=INT64:15``) into a parameter."""
    name, eq, typed_value = spec.partition("=")
    bq_type, colon, raw = typed_value.partition(":")
    if not eq or not colon:
        raise ValueError(
            f"Query parameter {spec!r} must look like name=TYPE:value, e.g. region=STRING:EU"
        )
    if not _PARAMETER_NAME_RE.match(name):
        raise ValueError(
            f"Invalid query parameter name {name!r} in {spec!r}: letters, digits and "
            "underscores, not starting with a digit, at most 128 characters"
        )
    bq_type = _TYPE_ALIASES.get(bq_type.upper(), bq_type.upper())
    if bq_type not in _PARAMETER_TYPES:
        raise ValueError(
            f"Unsupported type {bq_type!r} in query parameter {spec!r}; expected one of "
            f"{', '.join(_PARAMETER_TYPES)}"
        )
    try:
        value = _parse_value(bq_type, raw)
    except (ValueError, decimal.InvalidOperation) as e:
        raise ValueError(f"Invalid {bq_type} value {raw!r} in query parameter {spec!r}: {e}") from e
    return bigquery.ScalarQueryParameter(name, bq_type, value)


def check_table_schema(
    table: str, fs, project: str | None = None, endpoint: str | None = None
) -> list[str]:
    """Before the run: the table exists and its columns match the feature set's schema.

    The same rules as a file header (skewless.beam_pipelines.io.files.check_columns): no missing
    required column, no unexpected column if the feature set rejects them; plus no nested or
    repeated column (a raw record is flat). Returns the column names; raises InputError.
    """
    from skewless.beam_pipelines.io.files import InputError, check_columns

    project_id, dataset, table_id = validate_table_name(table)
    client = _bigquery_client(project, endpoint)
    try:
        found = client.get_table(f"{project_id}.{dataset}.{table_id}", timeout=API_TIMEOUT_S)
    except gexc.NotFound:
        raise InputError(f"BigQuery table {table} not found") from None
    except gexc.GoogleAPIError as exc:
        raise InputError(f"BigQuery table {table} cannot be read: {exc}") from None
    finally:
        client.close()
    nested = [f.name for f in found.schema if f.field_type in ("RECORD", "STRUCT") or f.mode == "REPEATED"]
    if nested:
        raise InputError(f"BigQuery table {table}: nested or repeated column(s) {nested}")
    names = [f.name for f in found.schema]
    check_columns(f"BigQuery table {table}", names, fs)
    return names


@dataclasses.dataclass(frozen=True)
class _ReadSpec:
    """What to read; the single element the planning step starts from."""

    table: tuple[str, str, str] | None
    query: str | None
    query_parameters: tuple[bigquery.ScalarQueryParameter, ...]
    temp_dataset: tuple[str, str] | None
    project: str | None
    max_streams: int
    selected_fields: tuple[str, ...] | None
    row_restriction: str | None


@dataclasses.dataclass(frozen=True)
class _StreamTask:
    """One Storage Read API stream plus the Arrow schema its batches are encoded with."""

    stream_name: str
    arrow_schema: bytes


def _bigquery_client(project: str | None, endpoint: str | None) -> bigquery.Client:
    if endpoint:
        # The emulator accepts any caller; anonymous credentials keep the client from
        # looking for (and, without any, blocking on) application default credentials.
        return bigquery.Client(
            project=project,
            credentials=AnonymousCredentials(),
            client_options={"api_endpoint": endpoint},
        )
    return bigquery.Client(project=project)


def _read_client(endpoint: str | None) -> BigQueryReadClient:
    if endpoint:
        # The emulator speaks plaintext gRPC; the default transport would insist on TLS and
        # default credentials.
        channel = grpc.insecure_channel(endpoint)
        return BigQueryReadClient(transport=BigQueryReadGrpcTransport(channel=channel))
    return BigQueryReadClient()


class _PlanReadSession(beam.DoFn):
    """Runs the query (if any) and creates the read session; emits one task per stream."""

    def __init__(self, bigquery_endpoint: str | None, storage_endpoint: str | None):
        self._bigquery_endpoint = bigquery_endpoint
        self._storage_endpoint = storage_endpoint
        self._streams = Metrics.counter(METRICS_NAMESPACE, "bigquery_streams")
        self._queries = Metrics.counter(METRICS_NAMESPACE, "bigquery_queries_run")

    def setup(self) -> None:
        self._read_client = _read_client(self._storage_endpoint)
        # Created on first use: reading a table needs no REST client at all.
        self._bq_client: bigquery.Client | None = None

    def teardown(self) -> None:
        if getattr(self, "_bq_client", None) is not None:
            self._bq_client.close()
        if getattr(self, "_read_client", None) is not None:
            self._read_client.transport.close()

    def _run_query(self, spec: _ReadSpec) -> tuple[str, str, str]:
        if self._bq_client is None:
            self._bq_client = _bigquery_client(spec.project, self._bigquery_endpoint)
        client = self._bq_client
        config = bigquery.QueryJobConfig(query_parameters=list(spec.query_parameters))
        sql = spec.query
        target = None
        if spec.temp_dataset is not None:
            # Materialize into a named table: the emulator does not expose a query's anonymous
            # result table to the Storage Read API. Only our own validated identifiers go into
            # the SQL; values stay in query parameters.
            target = (*spec.temp_dataset, f"skewless_read_{uuid.uuid4().hex}")
            sql = (
                f"CREATE TABLE `{target[0]}.{target[1]}.{target[2]}`\n"
                f"OPTIONS (expiration_timestamp = TIMESTAMP_ADD(CURRENT_TIMESTAMP(), "
                f"INTERVAL {TEMP_TABLE_EXPIRATION_HOURS} HOUR))\nAS (\n{spec.query}\n)"
            )
        job = client.query(sql, job_config=config, timeout=API_TIMEOUT_S)
        job.result(timeout=API_TIMEOUT_S)
        self._queries.inc()
        if target is not None:
            return target
        destination = job.destination
        if destination is None:
            raise RuntimeError(f"BigQuery query job {job.job_id} reported no destination table")
        return destination.project, destination.dataset_id, destination.table_id

    def process(self, spec: _ReadSpec) -> Iterator[_StreamTask]:
        table = self._run_query(spec) if spec.query is not None else spec.table
        assert table is not None
        project, dataset, table_id = table
        read_options = types.ReadSession.TableReadOptions(
            selected_fields=list(spec.selected_fields or ()),
            row_restriction=spec.row_restriction or "",
        )
        session = types.ReadSession(
            table=f"projects/{project}/datasets/{dataset}/tables/{table_id}",
            data_format=types.DataFormat.ARROW,
            read_options=read_options,
        )
        try:
            session = self._read_client.create_read_session(
                parent=f"projects/{spec.project or project}",
                read_session=session,
                max_stream_count=spec.max_streams,
                timeout=API_TIMEOUT_S,
            )
        except gexc.NotFound as e:
            raise LookupError(
                f"BigQuery table {project}.{dataset}.{table_id} not found: {e.message}"
            ) from e
        # An empty table gives no streams, hence no batches, hence an empty PCollection.
        for stream in session.streams:
            self._streams.inc()
            yield _StreamTask(stream.name, bytes(session.arrow_schema.serialized_schema))


class _ReadStream(beam.DoFn):
    """Reads one Storage Read API stream into Arrow record batches."""

    def __init__(self, storage_endpoint: str | None):
        self._storage_endpoint = storage_endpoint
        self._rows = Metrics.counter(METRICS_NAMESPACE, "bigquery_rows_read")
        self._batches = Metrics.counter(METRICS_NAMESPACE, "bigquery_batches_read")
        self._streams_read = Metrics.counter(METRICS_NAMESPACE, "bigquery_streams_read")

    def setup(self) -> None:
        self._read_client = _read_client(self._storage_endpoint)
        self._schemas: dict[bytes, pa.Schema] = {}

    def teardown(self) -> None:
        if getattr(self, "_read_client", None) is not None:
            self._read_client.transport.close()

    def process(self, task: _StreamTask) -> Iterator[pa.RecordBatch]:
        schema = self._schemas.get(task.arrow_schema)
        if schema is None:
            schema = pa.ipc.read_schema(pa.py_buffer(task.arrow_schema))
            self._schemas[task.arrow_schema] = schema
        # The client's stream wrapper reconnects at the last offset on transient errors.
        responses = self._read_client.read_rows(task.stream_name, timeout=READ_TIMEOUT_S)
        for response in responses:
            payload = response.arrow_record_batch.serialized_record_batch
            if not payload:
                continue
            batch = pa.ipc.read_record_batch(pa.py_buffer(payload), schema)
            self._rows.inc(batch.num_rows)
            self._batches.inc()
            yield batch
        self._streams_read.inc()


class ReadFromBigQueryStorage(beam.PTransform):
    """Reads a BigQuery table or query result as ``pyarrow.RecordBatch`` elements.

    Exactly one of ``table`` (``project.dataset.table``) or ``query`` (standard SQL, values
    passed as ``query_parameters``, never formatted into the SQL). ``bigquery_endpoint`` and
    ``storage_endpoint`` point the REST and Storage Read clients at an emulator, with anonymous
    credentials and a plaintext gRPC channel; without them the default credentials are used.
    ``temp_dataset`` (``project.dataset``) makes a query write its result to a table there,
    expiring after a day; the emulator needs it because it cannot stream a query's anonymous
    result table. ``max_streams`` 0 lets the server choose the parallelism.
    """

    def __init__(
        self,
        *,
        table: str | None = None,
        query: str | None = None,
        query_parameters: Iterable[bigquery.ScalarQueryParameter] = (),
        project: str | None = None,
        bigquery_endpoint: str | None = None,
        storage_endpoint: str | None = None,
        max_streams: int = 0,
        selected_fields: Sequence[str] | None = None,
        row_restriction: str | None = None,
        temp_dataset: str | None = None,
    ):
        super().__init__()
        if (table is None) == (query is None):
            raise ValueError("ReadFromBigQueryStorage needs exactly one of table= or query=")
        if query is not None and not query.strip():
            raise ValueError("ReadFromBigQueryStorage query= is empty")
        if query is not None and project is None:
            raise ValueError("ReadFromBigQueryStorage query= needs project= to run the job in")
        if not isinstance(max_streams, int) or max_streams < 0:
            raise ValueError(f"max_streams must be an integer >= 0, got {max_streams!r}")
        parameters = tuple(query_parameters)
        for parameter in parameters:
            if not isinstance(parameter, bigquery.ScalarQueryParameter):
                raise ValueError(
                    f"query_parameters must be ScalarQueryParameter objects, got {parameter!r}"
                )
        if parameters and query is None:
            raise ValueError("query_parameters only apply to query=")
        if isinstance(selected_fields, str):
            raise ValueError("selected_fields must be a sequence of column names, not a str")
        temp = None
        if temp_dataset is not None:
            # Reuse the table rules on a placeholder table id, with a message about the dataset.
            try:
                temp_project, temp_dataset_id, _ = validate_table_name(f"{temp_dataset}.t")
            except ValueError as e:
                raise ValueError(
                    f"Invalid temp_dataset {temp_dataset!r}: expected project.dataset ({e})"
                ) from e
            temp = (temp_project, temp_dataset_id)
        self._spec = _ReadSpec(
            table=validate_table_name(table) if table is not None else None,
            query=query,
            query_parameters=parameters,
            temp_dataset=temp,
            project=project,
            max_streams=max_streams,
            selected_fields=tuple(selected_fields) if selected_fields is not None else None,
            row_restriction=row_restriction,
        )
        self._bigquery_endpoint = bigquery_endpoint
        self._storage_endpoint = storage_endpoint

    def expand(self, pbegin: beam.pvalue.PBegin) -> beam.PCollection[pa.RecordBatch]:
        return (
            pbegin
            | "Spec" >> beam.Create([self._spec])
            | "PlanReadSession"
            >> beam.ParDo(_PlanReadSession(self._bigquery_endpoint, self._storage_endpoint))
            # Streams go to whichever workers are free instead of staying on the planner's.
            | "SpreadStreams" >> beam.Reshuffle()
            | "ReadStreams" >> beam.ParDo(_ReadStream(self._storage_endpoint))
        )
