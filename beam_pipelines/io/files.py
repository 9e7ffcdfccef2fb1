"""File sources at the edge of the pipelines: CSV (plain, gzip, zip), Parquet and JSON lines."""

from __future__ import annotations

import io
import zipfile
from collections.abc import Iterator

import apache_beam as beam
import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq
from apache_beam.io import fileio
from apache_beam.io.filesystem import CompressionTypes
from apache_beam.io.filesystems import FileSystems
from apache_beam.metrics import Metrics

from transforms.validation import UnparseableRow

NAMESPACE = "skewless"
FORMATS = ("csv", "parquet", "jsonl")
BATCH_ROWS = 20_000


class InputError(ValueError):
    """The input cannot be read at all (missing path, unknown format); raised before the run."""


def detect_format(path: str) -> str:
    name = path.lower()
    for suffix in (".gz", ".bz2"):
        if name.endswith(suffix):
            name = name[: -len(suffix)]
    if name.endswith((".csv", ".csv.zip", ".zip")):
        return "csv"
    if name.endswith((".parquet", ".pq")):
        return "parquet"
    if name.endswith((".json", ".jsonl", ".ndjson")):
        return "jsonl"
    raise InputError(
        f"cannot tell the format of {path!r}: use --input_format {{{','.join(FORMATS)}}}"
    )


def check_input(pattern: str, input_format: str | None = None) -> list[str]:
    """Fail fast, before any pipeline is built, if the input matches no file."""
    try:
        matches = FileSystems.match([pattern])[0].metadata_list
    except Exception as exc:  # noqa: BLE001 - any filesystem error means the same to the user
        raise InputError(f"input {pattern!r} cannot be listed: {exc}") from exc
    paths = sorted(m.path for m in matches)
    if not paths:
        raise InputError(f"input {pattern!r} matches no file")
    if input_format is None:
        for path in paths:
            detect_format(path)
    elif input_format not in FORMATS:
        raise InputError(f"unknown input format {input_format!r}: one of {FORMATS}")
    return paths


def _read_bytes(path: str) -> bytes:
    with FileSystems.open(path, compression_type=CompressionTypes.AUTO) as f:
        data = f.read()
    if path.lower().endswith(".zip"):
        with zipfile.ZipFile(io.BytesIO(data)) as archive:
            members = [n for n in archive.namelist() if not n.endswith("/")]
            if len(members) != 1:
                raise InputError(f"{path}: expected one file in the zip archive, found {members}")
            data = archive.read(members[0])
    return data


def read_csv_table(data: bytes) -> tuple[pa.Table, list[UnparseableRow]]:
    """Typed read first (fast); if a column does not parse as its inferred type, read all as text.

    The text fallback keeps every row: the record validator then rejects the bad values one
    record at a time, with the reason, instead of the whole file failing. Lines that do not
    even have the header's number of fields come back as UnparseableRow (dead letters).
    """
    bad: list[UnparseableRow] = []

    def skip(row) -> str:
        bad.append(
            UnparseableRow(
                row.text,
                f"CSV line {row.number}: expected {row.expected_columns} fields, got {row.actual_columns}",
            )
        )
        return "skip"

    parse = pacsv.ParseOptions(invalid_row_handler=skip)
    convert = pacsv.ConvertOptions(strings_can_be_null=True)
    try:
        return pacsv.read_csv(io.BytesIO(data), parse_options=parse, convert_options=convert), bad
    except pa.ArrowInvalid:
        bad.clear()
        text = pacsv.ConvertOptions(
            column_types={name: pa.string() for name in _header(data)}, strings_can_be_null=True
        )
        return pacsv.read_csv(io.BytesIO(data), parse_options=parse, convert_options=text), bad


def _header(data: bytes) -> list[str]:
    first = data.split(b"\n", 1)[0].decode("utf-8").strip("\r")
    return pacsv.read_csv(io.BytesIO(first.encode() + b"\n")).schema.names


class _ReadFile(beam.DoFn):
    """One file -> RecordBatches (CSV, Parquet) or JSON text lines (parsed by the validator)."""

    def __init__(self, input_format: str | None, batch_rows: int):
        self.input_format = input_format
        self.batch_rows = batch_rows

    def setup(self) -> None:
        self._files = Metrics.counter(NAMESPACE, "files_read")
        self._bytes = Metrics.counter(NAMESPACE, "bytes_read")

    def process(self, path: str) -> Iterator:
        fmt = self.input_format or detect_format(path)
        self._files.inc()
        if fmt == "parquet":
            with FileSystems.open(path, compression_type=CompressionTypes.UNCOMPRESSED) as f:
                parquet = pq.ParquetFile(f)
                yield from parquet.iter_batches(batch_size=self.batch_rows)
            return
        data = _read_bytes(path)
        self._bytes.inc(len(data))
        if fmt == "csv":
            table, unparseable = read_csv_table(data)
            yield from table.to_batches(max_chunksize=self.batch_rows)
            yield from unparseable
            return
        for line in data.decode("utf-8", errors="replace").splitlines():
            if line.strip():
                yield line


class ReadRawFiles(beam.PTransform):
    """A path or glob (local or gs://) -> raw elements for ValidateRecords."""

    def __init__(self, pattern: str, input_format: str | None = None, batch_rows: int = BATCH_ROWS):
        super().__init__()
        self.pattern = pattern
        self.input_format = input_format
        self.batch_rows = batch_rows

    def expand(self, pbegin):
        return (
            pbegin
            | "Match" >> fileio.MatchFiles(self.pattern)
            | "Paths" >> beam.Map(lambda m: m.path)
            | "Spread" >> beam.Reshuffle()
            | "ReadFile" >> beam.ParDo(_ReadFile(self.input_format, self.batch_rows))
        )
