"""Tests for the BigQuery Storage Read source, against the local BigQuery emulator."""

from __future__ import annotations

import datetime as dt
import decimal

import apache_beam as beam
import pyarrow as pa
import pytest
from apache_beam.metrics.metric import MetricsFilter
from apache_beam.testing.test_pipeline import TestPipeline as BeamTestPipeline
from apache_beam.testing.util import assert_that, equal_to
from google.cloud import bigquery

from skewless.beam_pipelines.io.bigquery import (
    METRICS_NAMESPACE,
    ReadFromBigQueryStorage,
    parse_query_parameter,
    validate_table_name,
)

START = dt.datetime(2013, 6, 1, tzinfo=dt.UTC)
ORIGINS = ("JFK", "LGA", "EWR", None)
FLIGHT_SCHEMA = [
    ("id", "INT64"),
    ("origin", "STRING"),
    ("dep_delay", "FLOAT64"),
    ("sched_dep", "TIMESTAMP"),
]
N_FLIGHTS = 3000
# Raw columns as the Storage Read API returns them.
FLIGHT_ARROW_SCHEMA = (
    ("id", "int64"),
    ("origin", "string"),
    ("dep_delay", "double"),
    ("sched_dep", "timestamp[us, tz=UTC]"),
)


def flight(i: int) -> dict:
    """Deterministic row i: every column takes NULLs at its own rhythm."""
    return {
        "id": i,
        "origin": ORIGINS[i % len(ORIGINS)],
        # Quarter minutes are exact in binary, so equality on floats is safe.
        "dep_delay": None if i % 7 == 0 else (i % 120) * 0.25 - 5.0,
        "sched_dep": None if i % 11 == 0 else START + dt.timedelta(minutes=5 * i),
    }


FLIGHTS = [flight(i) for i in range(N_FLIGHTS)]


def keyed_rows(batches):
    """RecordBatches -> (id, row dict) so equal_to sorts by the unique id, not by dicts."""
    return (
        batches
        | "ToRows" >> beam.FlatMap(lambda batch: batch.to_pylist())
        | "KeyById" >> beam.Map(lambda row: (row["id"], row))
    )


def emulator_read(emulator, **kwargs) -> ReadFromBigQueryStorage:
    return ReadFromBigQueryStorage(
        project=emulator.project,
        bigquery_endpoint=emulator.rest_endpoint,
        storage_endpoint=emulator.grpc_endpoint,
        **kwargs,
    )


def counter(result, name: str) -> int:
    counters = result.metrics().query(
        MetricsFilter().with_namespace(METRICS_NAMESPACE).with_name(name)
    )["counters"]
    return sum(c.committed for c in counters)


@pytest.fixture(scope="module")
def flights_table(bq_emulator) -> str:
    dataset = bq_emulator.create_dataset()
    return bq_emulator.create_table(dataset, "flights", FLIGHTS, schema=FLIGHT_SCHEMA)


# --- configuration, no emulator --------------------------------------------------------------


@pytest.mark.parametrize(
    "name, expected",
    [
        ("my-project.flights.departures", ("my-project", "flights", "departures")),
        ("my-project:flights.departures", ("my-project", "flights", "departures")),
        ("example.com:my-project.ds_1.t", ("example.com:my-project", "ds_1", "t")),
        ("abcdef.DS.table-with dash and space", ("abcdef", "DS", "table-with dash and space")),
        ("abcdef.ds.départs_2013", ("abcdef", "ds", "départs_2013")),
    ],
)
def test_validate_table_name_accepts_valid_names(name, expected):
    assert validate_table_name(name) == expected


@pytest.mark.parametrize(
    "name, message",
    [
        ("", "non-empty"),
        ("flights.departures", "project.dataset.table"),
        ("My-Project.flights.departures", "Invalid project id 'My-Project'"),
        ("abc.flights.departures", "Invalid project id 'abc'"),
        ("my-project-.flights.departures", "Invalid project id"),
        ("1project.flights.departures", "Invalid project id"),
        ("my-project.fli-ghts.departures", "Invalid dataset id 'fli-ghts'"),
        ("my-project..departures", "Invalid dataset id ''"),
        ("my-project.flights.", "Invalid table id ''"),
        ("my-project.flights.dep;drop", "character ';'"),
        ("my-project.flights.dep*", "character '*'"),
        ("my-project.flights." + "t" * 1025, "1-1024 UTF-8 bytes"),
    ],
)
def test_validate_table_name_rejects_invalid_names(name, message):
    with pytest.raises(ValueError, match=message.replace("*", r"\*")):
        validate_table_name(name)


@pytest.mark.parametrize(
    "spec, name, bq_type, value",
    [
        ("origin=STRING:JFK", "origin", "STRING", "JFK"),
        ("note=STRING:a:b=c", "note", "STRING", "a:b=c"),
        ("empty=STRING:", "empty", "STRING", ""),
        ("min_delay=INT64:15", "min_delay", "INT64", 15),
        ("min_delay=integer:-3", "min_delay", "INT64", -3),
        ("ratio=FLOAT64:0.5", "ratio", "FLOAT64", 0.5),
        ("flag=BOOL:true", "flag", "BOOL", True),
        ("amount=NUMERIC:1.25", "amount", "NUMERIC", decimal.Decimal("1.25")),
        ("day=DATE:2013-06-01", "day", "DATE", dt.date(2013, 6, 1)),
        ("since=TIMESTAMP:2013-06-01T00:00:00Z", "since", "TIMESTAMP", START),
        ("since=TIMESTAMP:2013-06-01T02:00:00+02:00", "since", "TIMESTAMP", START),
        ("since=TIMESTAMP:2013-06-01 00:00:00", "since", "TIMESTAMP", START),
        ("at=DATETIME:2013-06-01T08:30:00", "at", "DATETIME", dt.datetime(2013, 6, 1, 8, 30)),
    ],
)
def test_parse_query_parameter(spec, name, bq_type, value):
    parameter = parse_query_parameter(spec)
    assert parameter == bigquery.ScalarQueryParameter(name, bq_type, value)
    if bq_type == "TIMESTAMP":
        assert parameter.value.utcoffset() is not None


@pytest.mark.parametrize(
    "spec, message",
    [
        ("origin", "name=TYPE:value"),
        ("origin=JFK", "name=TYPE:value"),
        ("=STRING:JFK", "Invalid query parameter name ''"),
        ("1x=STRING:JFK", "Invalid query parameter name '1x'"),
        ("origin=TEXT:JFK", "Unsupported type 'TEXT'"),
        ("min=INT64:fifteen", "Invalid INT64 value 'fifteen'"),
        ("min=INT64:", "Invalid INT64 value ''"),
        ("ratio=FLOAT64:x", "Invalid FLOAT64 value"),
        ("flag=BOOL:yes", "Invalid BOOL value 'yes'"),
        ("amount=NUMERIC:1,5", "Invalid NUMERIC value"),
        ("since=TIMESTAMP:June 1st", "Invalid TIMESTAMP value"),
        ("at=DATETIME:2013-06-01T00:00:00Z", "has no time zone"),
    ],
)
def test_parse_query_parameter_rejects_bad_specs(spec, message):
    with pytest.raises(ValueError, match=message):
        parse_query_parameter(spec)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({}, "exactly one of table= or query="),
        ({"table": "my-project.ds.t", "query": "SELECT 1", "project": "my-project"}, "exactly one"),
        ({"table": "ds.t"}, "project.dataset.table"),
        ({"query": "SELECT 1"}, "needs project="),
        ({"query": "  ", "project": "my-project"}, "is empty"),
        ({"table": "my-project.ds.t", "max_streams": -1}, "max_streams"),
        (
            {
                "table": "my-project.ds.t",
                "query_parameters": [bigquery.ScalarQueryParameter("a", "INT64", 1)],
            },
            "only apply to query=",
        ),
        (
            {"query": "SELECT @a", "project": "my-project", "query_parameters": ["a=INT64:1"]},
            "ScalarQueryParameter",
        ),
        ({"table": "my-project.ds.t", "selected_fields": "id"}, "sequence of column names"),
        (
            {"query": "SELECT 1", "project": "my-project", "temp_dataset": "bad dataset"},
            "Invalid temp_dataset 'bad dataset'",
        ),
    ],
)
def test_read_rejects_bad_configuration_at_construction(kwargs, message):
    with pytest.raises(ValueError, match=message):
        ReadFromBigQueryStorage(**kwargs)


# --- against the emulator ----------------------------------------------------------------------


@pytest.mark.emulator
@pytest.mark.timeout(120)
def test_read_table_returns_every_row_with_types_and_nulls(bq_emulator, flights_table):
    with BeamTestPipeline(runner="FnApiRunner") as p:
        batches = p | emulator_read(bq_emulator, table=flights_table)
        schemas = batches | "Schema" >> beam.Map(
            lambda batch: tuple((f.name, str(f.type)) for f in batch.schema)
        )
        assert_that(schemas | beam.Distinct(), equal_to([FLIGHT_ARROW_SCHEMA]), label="CheckSchema")
        assert_that(keyed_rows(batches), equal_to([(r["id"], r) for r in FLIGHTS]))
    result = p.result
    assert counter(result, "bigquery_rows_read") == N_FLIGHTS
    assert counter(result, "bigquery_streams") >= 1


@pytest.mark.emulator
@pytest.mark.timeout(120)
def test_read_selected_fields_with_row_restriction(bq_emulator, flights_table):
    expected = [(r["id"], {"id": r["id"], "origin": r["origin"]}) for r in FLIGHTS if r["id"] < 100]
    with BeamTestPipeline(runner="FnApiRunner") as p:
        batches = p | emulator_read(
            bq_emulator,
            table=flights_table,
            selected_fields=["id", "origin"],
            row_restriction="id < 100",
        )
        assert_that(keyed_rows(batches), equal_to(expected))


@pytest.mark.emulator
@pytest.mark.timeout(120)
def test_read_large_table_over_several_streams(bq_emulator):
    # The emulator, like BigQuery, gives a single stream to tables under ~1 MB; this one is
    # about 2.5 MB so it is split (up to 10 streams).
    n = 8000
    table = pa.table(
        {
            "id": pa.array(range(n), pa.int64()),
            "payload": pa.array([f"{i:06d}" * 50 for i in range(n)], pa.string()),
        }
    )
    table_id = bq_emulator.create_table(bq_emulator.create_dataset(), "wide", table)
    with BeamTestPipeline(runner="FnApiRunner") as p:
        batches = p | emulator_read(bq_emulator, table=table_id, max_streams=4)
        assert_that(
            keyed_rows(batches) | beam.Map(lambda kv: (kv[0], kv[1]["payload"])),
            equal_to([(i, f"{i:06d}" * 50) for i in range(n)]),
        )
    result = p.result
    assert counter(result, "bigquery_streams") == 4
    assert counter(result, "bigquery_streams_read") == 4
    assert counter(result, "bigquery_rows_read") == n


@pytest.mark.emulator
@pytest.mark.timeout(120)
def test_read_parameterized_query_returns_exactly_the_matching_rows(bq_emulator, flights_table):
    temp_dataset = f"{bq_emulator.project}.{bq_emulator.create_dataset()}"
    since = START + dt.timedelta(days=3)
    parameters = [
        parse_query_parameter("origin=STRING:JFK"),
        parse_query_parameter("min_delay=FLOAT64:10"),
        parse_query_parameter(f"since=TIMESTAMP:{since.isoformat()}"),
    ]
    # A value that would break the SQL if it were formatted into it, rather than bound.
    parameters.append(bigquery.ScalarQueryParameter("nasty", "STRING", "x' OR '1'='1"))
    query = (
        f"SELECT id, origin, dep_delay FROM `{flights_table}` "
        "WHERE origin = @origin AND dep_delay > @min_delay AND sched_dep >= @since "
        "AND origin != @nasty"
    )
    expected = [
        (r["id"], {"id": r["id"], "origin": r["origin"], "dep_delay": r["dep_delay"]})
        for r in FLIGHTS
        if r["origin"] == "JFK"
        and r["dep_delay"] is not None
        and r["dep_delay"] > 10
        and r["sched_dep"] is not None
        and r["sched_dep"] >= since
    ]
    assert 50 < len(expected) < N_FLIGHTS / 4  # the filter really filters
    with BeamTestPipeline(runner="FnApiRunner") as p:
        batches = p | emulator_read(
            bq_emulator, query=query, query_parameters=parameters, temp_dataset=temp_dataset
        )
        assert_that(keyed_rows(batches), equal_to(expected))
    assert counter(p.result, "bigquery_queries_run") == 1


@pytest.mark.emulator
@pytest.mark.timeout(120)
def test_read_missing_table_fails_with_a_clear_error(bq_emulator):
    missing = f"{bq_emulator.project}.{bq_emulator.create_dataset()}.no_such_table"
    with pytest.raises(Exception, match=rf"BigQuery table {missing} not found"):
        with BeamTestPipeline(runner="FnApiRunner") as p:
            _ = p | emulator_read(bq_emulator, table=missing)


@pytest.mark.emulator
@pytest.mark.timeout(120)
def test_read_empty_table_gives_no_batches(bq_emulator):
    table_id = bq_emulator.create_table(
        bq_emulator.create_dataset(), "empty", [], schema=FLIGHT_SCHEMA
    )
    with BeamTestPipeline(runner="FnApiRunner") as p:
        batches = p | emulator_read(bq_emulator, table=table_id)
        assert_that(batches, equal_to([]))
