"""The bundled reference tables in the tests: FLIGHTS_TABLES (flights joined with weather at the
origin, the aircraft and the destination airport), their rows typed, the batch index of a
table, and publish-reference on the Bigtable emulator with readers of what it wrote."""

from __future__ import annotations

import csv
import datetime as dt
import functools
import json
from dataclasses import replace
from pathlib import Path

from skewless.beam_pipelines.io.files import _read_bytes, read_csv_table
from skewless.examples.flights import FLIGHTS, REFERENCE_TABLES, WEATHER_AT_ORIGIN
from skewless.transforms.featureset import ReferenceTable
from skewless.transforms.records import TracedRecord
from skewless.transforms.reference import ReferenceIndex, _BuildIndex, reference_row_validator

FLIGHTS_TABLES = replace(
    FLIGHTS,
    name="flights_tables",
    references=REFERENCE_TABLES,
    example_fields=(*FLIGHTS.example_fields, FLIGHTS.fields_by_name["tailnum"]),
)
# How a job's --feature_set names it.
FLIGHTS_TABLES_SPEC = "tests.support.reference_tables:FLIGHTS_TABLES"
NULLS = ("", "NA")


@functools.cache
def table_rows(table: ReferenceTable) -> tuple[dict, ...]:
    """The bundled table's rows, typed by the table's own schema."""
    data, _ = read_csv_table(_read_bytes(table.resolve_default_input()))
    validator = reference_row_validator(table)
    return tuple(validator.validate(row) for row in data.to_pylist())


def traced(rows) -> list[TracedRecord]:
    """Typed rows as CheckReferenceRows hands them on (the row itself as its original)."""
    return [TracedRecord(row, row, None) for row in rows]


def index_of(table: ReferenceTable, rows) -> dict:
    (index,) = [
        x for x in _BuildIndex(table).process(traced(rows)) if isinstance(x, ReferenceIndex)
    ]
    return index


def number(text: str, kind):
    """A CSV field typed by hand: "" and "NA" are null."""
    return None if text in NULLS else kind(text)


def epoch_ms(text: str) -> int:
    return round(dt.datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp() * 1000)


def typed_weather(line: dict) -> tuple[str, int, dict]:
    """(row key, valid_from ms, {field: value}) of a weather.csv line, typed by hand."""
    values = {f.name: number(line[f.name], float) for f in WEATHER_AT_ORIGIN.fields}
    return f"origin_weather#{line['origin']}", epoch_ms(line["time_hour"]), values


@functools.cache
def csv_lines(path: str) -> tuple[list[str], list[dict]]:
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        return list(reader.fieldnames), list(reader)


def dump(bt, table_id: str) -> dict:
    """Every cell of the table, all versions: {row key: {family: {column: [(ts ms, bytes)]}}}."""
    from skewless.beam_pipelines.io.bigtable import open_table

    out = {}
    for row in open_table(bt.project, bt.instance, table_id).read_rows():
        out[row.row_key.decode()] = {
            family: {
                q.decode(): [(round(c.timestamp.timestamp() * 1000), c.value) for c in cells]
                for q, cells in columns.items()
            }
            for family, columns in row.cells.items()
        }
    return out


def reference_versions(row, family: str) -> dict[int, dict]:
    """A Bigtable row -> {cell timestamp ms: {field: value}}, every version read."""
    from skewless.beam_pipelines.io.bigtable import decode_value

    versions: dict[int, dict] = {}
    for qualifier, cells in row.cells.get(family, {}).items():
        for cell in cells:
            stamp = round(cell.timestamp.timestamp() * 1000)
            versions.setdefault(stamp, {})[qualifier.decode()] = decode_value(cell.value)
    return versions


def published(bt, table_id: str, family: str, prefix: str) -> dict[str, dict[int, dict]]:
    """{row key: {valid_from ms: {field: value}}} of one reference table's rows."""
    from skewless.beam_pipelines.io.bigtable import open_table

    table = open_table(bt.project, bt.instance, table_id)
    return {
        row.row_key.decode(): reference_versions(row, family)
        for row in table.read_rows()
        if row.row_key.decode().startswith(prefix)
    }


def dead_letters(directory: Path) -> list[dict]:
    return [json.loads(line) for p in sorted(directory.glob("*.jsonl")) for line in p.open()]


def publish(bt, table_id: str, table: str, dead_dir: Path, *extra: str) -> dict:
    """publish-reference of FLIGHTS_TABLES' `table` to the emulator's `table_id`."""
    from skewless.beam_pipelines.jobs import publish_reference

    return publish_reference.run(
        [
            f"--feature_set={FLIGHTS_TABLES_SPEC}",
            f"--table={table}",
            f"--bigtable_project={bt.project}",
            f"--bigtable_instance={bt.instance}",
            f"--bigtable_table={table_id}",
            f"--dead_letter_dir={dead_dir}",
            *extra,
        ]
    )
