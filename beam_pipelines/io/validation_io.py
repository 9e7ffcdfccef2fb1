"""The edges of `skewless validate`: new data read as it is (types inferred, nothing validated),
and the validation outputs (anomalies.json, report.html) written and read back.

The new data is described as read, before any validation: a renamed column or a column whose
values turned from numbers to text must reach the statistics as such, not as dead letters.
"""

from __future__ import annotations

import io
import json
from collections.abc import Iterator, Sequence

import apache_beam as beam
import pyarrow as pa
import pyarrow.json as pajson
import pyarrow.parquet as pq
from apache_beam.io.filesystem import CompressionTypes
from apache_beam.io.filesystems import FileSystems

from beam_pipelines.io.files import (
    BATCH_ROWS,
    InputError,
    _one_line,
    _read_bytes,
    detect_format,
    matched_paths,
    read_csv_table,
)

ANOMALIES_FILE = "anomalies.json"
REPORT_FILE = "report.html"
STATISTICS_FILE = "statistics.pb"


def read_inferred(path: str, fmt: str, batch_rows: int = BATCH_ROWS) -> Iterator[pa.RecordBatch]:
    """One file -> RecordBatches with the types Arrow infers for the whole file (CSV, JSON
    lines) or the file's own (Parquet)."""
    try:
        if fmt == "parquet":
            with FileSystems.open(path, compression_type=CompressionTypes.UNCOMPRESSED) as f:
                yield from pq.ParquetFile(f).iter_batches(batch_size=batch_rows)
            return
        data = _read_bytes(path)
        table = _read_csv(data) if fmt == "csv" else _read_json_lines(data)
    except InputError:
        raise
    except Exception as exc:  # noqa: BLE001 - any unreadable file is one clear error
        raise InputError(f"{path}: cannot be read as {fmt} ({_one_line(exc)})") from None
    for batch in table.combine_chunks().to_batches(max_chunksize=batch_rows):
        yield _compact(batch)


def _compact(batch: pa.RecordBatch) -> pa.RecordBatch:
    """A batch that owns its rows' buffers only. A slice shares its table's buffers, and Beam
    pickles a RecordBatch with every buffer whole: each 20,000-row slice of the year's flights
    would cross a stage boundary as the whole 48 MiB table."""
    return pa.RecordBatch.from_arrays(
        [pa.concat_arrays([c]) for c in batch.columns], schema=batch.schema
    )


# What a text column is read as when all its values convert, narrowest first.
_NARROWER = (pa.int64(), pa.float64(), pa.timestamp("s", tz="UTC"))


def _read_csv(data: bytes) -> pa.Table:
    """A CSV with the types Arrow infers, per column: when one column does not convert (ints in
    the first rows, text further down), Arrow reads the whole file as text; the columns whose
    values all convert get their type back, so only the changed column shows as text."""
    table = read_csv_table(data)[0]
    columns = []
    for column in table.columns:
        if pa.types.is_string(column.type) and column.null_count < len(column):
            column = next(
                (c for c in (_cast(column, t) for t in _NARROWER) if c is not None), column
            )
        columns.append(column)
    return pa.Table.from_arrays(columns, names=table.column_names)


def _cast(column, to: pa.DataType):
    try:
        return column.cast(to)
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
        return None


def _read_json_lines(data: bytes) -> pa.Table:
    """JSON lines with inferred types; a column whose values differ in kind (numbers in some
    lines, text in others) is read as text, as a CSV column would be."""
    try:
        return pajson.read_json(io.BytesIO(data))
    except pa.ArrowInvalid:
        rows = [json.loads(line) for line in data.split(b"\n") if line.strip()]
        return rows_to_batch(rows)


def rows_to_batch(rows: Sequence[dict]) -> pa.Table:
    """Dicts -> an Arrow table, types inferred per column; a column of mixed kinds as text."""
    names = list(dict.fromkeys(k for r in rows for k in r))
    arrays = []
    for name in names:
        values = [r.get(name) for r in rows]
        try:
            arrays.append(pa.array(values))
        except (pa.ArrowInvalid, pa.ArrowTypeError):
            arrays.append(pa.array([None if v is None else json.dumps(v) if not isinstance(v, str) else v for v in values]))  # fmt: skip
    return pa.Table.from_arrays(arrays, names=names)


class _ReadInferred(beam.DoFn):
    def __init__(self, input_format: str | None, batch_rows: int):
        self.input_format = input_format
        self.batch_rows = batch_rows

    def process(self, path: str) -> Iterator[pa.RecordBatch]:
        yield from read_inferred(path, self.input_format or detect_format(path), self.batch_rows)


class ReadInferredFiles(beam.PTransform):
    """A path or glob of CSV, Parquet or JSON-lines files -> RecordBatches as read (types
    inferred per file)."""

    def __init__(self, pattern: str, input_format: str | None = None, batch_rows: int = BATCH_ROWS):
        super().__init__()
        self.pattern = pattern
        self.input_format = input_format
        self.batch_rows = batch_rows

    def expand(self, pbegin):
        return matched_paths(pbegin, self.pattern) | "ReadFile" >> beam.ParDo(
            _ReadInferred(self.input_format, self.batch_rows)
        )


def features_glob(prepared_dir: str) -> str:
    """The features/ Parquet files of a prepare run."""
    return FileSystems.join(prepared_dir, "features", "*.parquet")


class RecordsToBatches(beam.PTransform):
    """Dicts (the `features` of serving log records) -> RecordBatches, `drop` columns left out."""

    def __init__(self, drop: Sequence[str] = (), batch_rows: int = 4096):
        super().__init__()
        self.drop = tuple(drop)
        self.batch_rows = batch_rows

    def expand(self, records):
        drop = self.drop
        return (
            records
            | "Batch" >> beam.BatchElements(min_batch_size=1, max_batch_size=self.batch_rows)
            | "ToArrow"
            >> beam.Map(
                lambda rows: (
                    rows_to_batch([{k: v for k, v in r.items() if k not in drop} for r in rows])
                    .combine_chunks()
                    .to_batches()[0]
                )
            )
        )


# --- outputs --------------------------------------------------------------------------------------


def _write_text(path: str, text: str) -> str:
    parent, _ = FileSystems.split(path)
    if parent and not FileSystems.exists(parent):
        FileSystems.mkdirs(parent)
    with FileSystems.create(path, compression_type=CompressionTypes.UNCOMPRESSED) as f:
        f.write(text.encode())
    return path


def write_anomalies(path: str, anomalies: list[dict]) -> str:
    return _write_text(path, json.dumps(anomalies, indent=2) + "\n")


def read_anomalies(path: str) -> list[dict]:
    with FileSystems.open(path, compression_type=CompressionTypes.UNCOMPRESSED) as f:
        return json.loads(f.read().decode())


class WriteText(beam.PTransform):
    """One element -> a file at `path` (rendered by `render`); outputs the path once written.
    A retried bundle writes the same bytes again."""

    def __init__(self, path: str, render=str):
        super().__init__()
        self.path = path
        self.render = render

    def expand(self, pcoll):
        render = self.render
        return pcoll | "Write" >> beam.Map(lambda x, path: _write_text(path, render(x)), self.path)


class WriteAnomalies(beam.PTransform):
    """One list of anomaly dicts -> `output_dir/anomalies.json` (a JSON list)."""

    def __init__(self, output_dir: str):
        super().__init__()
        self.path = FileSystems.join(output_dir, ANOMALIES_FILE)

    def expand(self, anomalies):
        return anomalies | "Write" >> beam.Map(lambda a, path: write_anomalies(path, a), self.path)
