"""New data read as it is, for validation: types inferred per file, nothing validated, so a
renamed column or a column whose values turned from numbers to text reaches the statistics as
such, not as dead letters. No Beam here (validate on local files runs in one process)."""

from __future__ import annotations

import io
import json
from collections.abc import Iterator, Sequence

import pyarrow as pa
import pyarrow.json as pajson
import pyarrow.parquet as pq

from skewless.beam_pipelines.io import storage
from skewless.beam_pipelines.io.files import (
    BATCH_ROWS,
    InputError,
    _one_line,
    _read_bytes,
    read_csv_table,
)
from skewless.transforms.statistics import SOURCE_METADATA_KEY


def read_inferred(path: str, fmt: str, batch_rows: int = BATCH_ROWS) -> Iterator[pa.RecordBatch]:
    """One file -> RecordBatches with the types Arrow infers for the whole file (CSV, JSON
    lines) or the file's own (Parquet), each naming the file in its schema's metadata
    (SOURCE_METADATA_KEY: a column of several types names where each was seen). A file
    without rows (a CSV header, a Parquet schema) is one batch of 0 rows with its columns,
    so the statistics see that the columns are there and the data has no examples."""
    try:
        if fmt == "parquet":
            with storage.open_read(path) as f:
                parquet = pq.ParquetFile(f)
                empty = True
                for batch in parquet.iter_batches(batch_size=batch_rows):
                    empty = False
                    yield _named(batch, path)
                if empty:
                    yield _named(_no_rows(parquet.schema_arrow), path)
            return
        data = _read_bytes(path)
        table = _read_csv(data) if fmt == "csv" else _read_json_lines(data)
    except InputError:
        raise
    except Exception as exc:  # noqa: BLE001 - any unreadable file is one clear error
        raise InputError(f"{path}: cannot be read as {fmt} ({_one_line(exc)})") from None
    if not table.num_rows:
        yield _named(_no_rows(table.schema), path)
        return
    for batch in table.combine_chunks().to_batches(max_chunksize=batch_rows):
        yield _named(_compact(batch), path)


def _no_rows(schema: pa.Schema) -> pa.RecordBatch:
    return pa.RecordBatch.from_pylist([], schema=schema)


def _named(batch: pa.RecordBatch, path: str) -> pa.RecordBatch:
    return batch.replace_schema_metadata({SOURCE_METADATA_KEY: path.encode()})


def _compact(batch: pa.RecordBatch) -> pa.RecordBatch:
    """A batch that owns its rows' buffers only. A slice shares its table's buffers, and Beam
    pickles a RecordBatch with every buffer whole: each 20,000-row slice of the year's flights
    would cross a stage boundary as the whole 48 MiB table."""
    return pa.RecordBatch.from_arrays(
        [pa.concat_arrays([c]) for c in batch.columns], schema=batch.schema
    )


# What a text column is read as when all its values convert, narrowest first.
_NARROWER = (pa.int64(), pa.float64(), pa.timestamp("s", tz="UTC"))
_TRIAL_VALUES = 64


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
    """The column as `to`, or None when a value does not convert. Its first values are tried
    first: a failed cast of a whole text column costs milliseconds, and most text is text."""
    try:
        column.drop_null().slice(0, _TRIAL_VALUES).cast(to)
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
