"""File sources at the edge of the pipelines: CSV (plain, gzip, zip), Parquet and JSON lines.

Two promises, kept here:
- A file that cannot be read as a whole (empty, not the format its name says, a corrupt
  archive, a header that does not match the feature set) is one clear InputError before the
  pipeline is built (`check_input`), never a traceback from inside a worker.
- Readers never split or merge records. CSV is parsed by Arrow with quote-aware record
  boundaries (`newlines_in_values`), so a quoted value with newlines stays one record across
  Arrow's blocks; JSON lines are split on "\\n" only (a raw U+2028 or U+0085 inside a string
  is valid JSON, not a line break). Each record carries its file and first line (CSV, JSON
  lines) or row index (Parquet) into its dead letter.
"""

from __future__ import annotations

import bz2
import codecs
import gzip
import io
import logging
import os
import zipfile
from collections.abc import Iterator, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

from skewless.beam_pipelines.io import storage
from skewless.transforms.featureset import FeatureSet
from skewless.transforms.records import INVALID_UTF8_MARK, RawBatch, RawLine, UnparseableRow

NAMESPACE = "skewless"
FORMATS = ("csv", "parquet", "jsonl")
BATCH_ROWS = 20_000
HEAD_BYTES = 1 << 16
# Compressed files up to this size are decompressed whole by the check, so a truncated or
# corrupt archive fails before the run; larger ones only have their head checked.
FULL_CHECK_BYTES = 256 << 20
LOG = logging.getLogger("skewless.files")

_MAGIC = {
    b"\x1f\x8b": "gzip-compressed (name it .gz)",
    b"PK\x03\x04": "a zip archive (name it .zip)",
    b"PAR1": "a Parquet file (name it .parquet or use --input_format parquet)",
    b"BZh": "bzip2-compressed (name it .bz2)",
}
# CSV null markers: Arrow's defaults without the NaN spellings, so "NaN" reads as a number
# (which the validator rejects unless the field allows it), never as a missing value.
CSV_NULL_VALUES = ["", "NA", "N/A", "n/a", "#N/A", "#N/A N/A", "#NA", "NULL", "null"]
# Arrow types of the first, typed CSV read. Arrow's timestamp parser is stricter than the
# validator's (ISO-8601 with a zone, at most milliseconds), so what it accepts means the same
# in both; anything else (epoch seconds, naive text) makes the file read as text and parsed
# by the validator, with the same rules as JSON lines. Booleans are always read as text.
_CSV_TYPES = {"int": pa.int64(), "float": pa.float64(), "timestamp": pa.timestamp("ms", tz="UTC")}


_MARK_ERRORS = "skewless-mark-invalid-utf8"
codecs.register_error(
    _MARK_ERRORS, lambda exc: (INVALID_UTF8_MARK * (exc.end - exc.start), exc.end)
)


class InputError(ValueError):
    """The input cannot be read at all (missing path, unknown format, a bad file); raised before
    the run."""


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


# --- checks before the pipeline is built ----------------------------------------------------------


def check_input(
    pattern: str, input_format: str | None = None, fs: FeatureSet | None = None
) -> list[str]:
    """Fail fast, before any pipeline is built, unless every matched file can be read.

    Checks: the pattern matches files (not directories); each file's format is known; it is not
    empty (0 bytes: a CSV without rows still has its header, a Parquet file its schema); a
    compressed file decompresses (whole, up to FULL_CHECK_BYTES); a zip holds exactly one
    file; a Parquet file
    has a valid footer; a CSV has a UTF-8 header line and a JSON-lines file is text; with `fs`,
    the CSV header or Parquet schema matches the feature set (no duplicate columns, no missing
    required ones, no unexpected ones if the feature set rejects unexpected fields).
    Returns the paths to read.
    """
    if input_format is not None and input_format not in FORMATS:
        raise InputError(f"unknown input format {input_format!r}: one of {FORMATS}")
    if _is_local_dir(pattern):
        raise InputError(
            f"input {pattern!r} is a directory: give a file or a glob such as "
            f"{os.path.join(pattern, '*.csv')!r}"
        )
    try:
        files = storage.match(pattern)
    except Exception as exc:  # noqa: BLE001 - any filesystem error means the same to the user
        raise InputError(f"input {pattern!r} cannot be listed: {_one_line(exc)}") from exc
    if not files:
        raise InputError(f"input {pattern!r} matches no file")
    for path, size in files:
        fmt = input_format or detect_format(path)
        if size == 0:
            raise InputError(f"{path}: the file is empty (0 bytes)")
        check_file(path, fmt, fs, size)
    return [path for path, _ in files]


def check_file(path: str, fmt: str, fs: FeatureSet | None = None, size: int | None = None) -> None:
    """Raise InputError unless `path` reads as `fmt` (see check_input)."""
    if fmt == "parquet":
        try:
            with storage.open_read(path) as f:
                names = pq.ParquetFile(f).schema_arrow.names
        except Exception as exc:  # noqa: BLE001 - pyarrow raises several types for a bad file
            raise InputError(f"{path}: not a readable Parquet file ({_one_line(exc)})") from None
        check_columns(path, names, fs)
        return
    whole = _is_compressed(path) and (size or 0) <= FULL_CHECK_BYTES
    head = _read_bytes(path) if whole else _read_head(path)
    if not head:
        raise InputError(f"{path}: the file is empty once decompressed")
    if not _is_compressed(path):
        for magic, what in _MAGIC.items():
            if head.startswith(magic):
                raise InputError(f"{path}: the file is {what}, not {fmt} text")
    if fmt == "csv":
        check_columns(path, csv_header(head, path), fs)
    elif b"\x00" in head[:1024]:
        raise InputError(f"{path}: binary content (NUL bytes), not JSON lines text")


def check_columns(path: str, names: Sequence[str], fs: FeatureSet | None) -> None:
    """The columns of a file against the feature set's schema; one error naming every problem."""
    seen: set[str] = set()
    duplicates = sorted({n for n in names if n in seen or seen.add(n)})
    problems = []
    if duplicates:
        problems.append(f"duplicate column(s) {duplicates}")
    if fs is not None:
        schema = {f.name: f for f in fs.schema}
        missing = [f.name for f in fs.schema if not f.nullable and f.name not in seen]
        unexpected = [n for n in dict.fromkeys(names) if n not in schema]
        if missing:
            problems.append(f"missing required column(s) {missing}")
        if unexpected and fs.unexpected_fields == "reject":
            problems.append(
                f"unexpected column(s) {unexpected} (feature set {fs.name!r} rejects "
                "unexpected fields)"
            )
        absent = [f.name for f in fs.schema if f.nullable and f.name not in seen]
        if absent and not problems:
            LOG.warning("%s: no column for nullable field(s) %s: read as null", path, absent)
    if problems:
        raise InputError(f"{path}: the columns do not match the schema: {'; '.join(problems)}")


def csv_header(data: bytes, path: str = "") -> list[str]:
    """Column names of the CSV whose first bytes are `data`; InputError if not a text header."""
    end = _first_record_end(data)
    first = data[:end].rstrip(b"\r")
    if b"\x00" in first:
        raise InputError(f"{path}: binary content (NUL bytes), not CSV text")
    try:
        first.decode("utf-8-sig")
    except UnicodeDecodeError:
        raise InputError(f"{path}: the first line is not UTF-8 text: not a CSV file") from None
    if not first.strip():
        raise InputError(f"{path}: the first line is empty: a CSV file starts with its header")
    try:
        return pacsv.read_csv(
            io.BytesIO(first + b"\n"),
            read_options=pacsv.ReadOptions(use_threads=False),
            parse_options=pacsv.ParseOptions(newlines_in_values=True),
        ).column_names
    except pa.ArrowException as exc:
        raise InputError(f"{path}: the header line does not parse: {_one_line(exc)}") from None


def _first_record_end(data: bytes) -> int:
    """Offset of the newline ending the first CSV record (quotes may hold newlines)."""
    start = 0
    while True:
        nl = data.find(b"\n", start)
        if nl < 0:
            return len(data)
        if data.count(b'"', 0, nl) % 2 == 0:
            return nl
        start = nl + 1


def _is_local_dir(path: str) -> bool:
    return "://" not in path and os.path.isdir(path)


def _is_compressed(path: str) -> bool:
    return path.lower().endswith((".gz", ".bz2", ".zip"))


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__


def _read_head(path: str) -> bytes:
    """The first HEAD_BYTES of a file's (decompressed) content, without reading it all."""
    name = path.lower()
    try:
        with storage.open_read(path) as f:
            if name.endswith(".gz"):
                return gzip.GzipFile(fileobj=f).read(HEAD_BYTES)
            if name.endswith(".bz2"):
                return bz2.BZ2File(f).read(HEAD_BYTES)
            if name.endswith(".zip"):
                with zipfile.ZipFile(f) as archive, archive.open(_only_member(path, archive)) as m:
                    return m.read(HEAD_BYTES)
            return f.read(HEAD_BYTES)
    except InputError:
        raise
    except Exception as exc:  # noqa: BLE001
        raise InputError(f"{path}: {_unreadable(path)} ({_one_line(exc)})") from None


def _only_member(path: str, archive: zipfile.ZipFile) -> str:
    members = [n for n in archive.namelist() if not n.endswith("/")]
    if len(members) != 1:
        raise InputError(
            f"{path}: expected one file in the zip archive, found {len(members)}: {members[:5]}"
        )
    return members[0]


def _unreadable(path: str) -> str:
    name = path.lower()
    if name.endswith(".gz"):
        return "not a valid gzip file"
    if name.endswith(".bz2"):
        return "not a valid bzip2 file"
    if name.endswith(".zip"):
        return "not a valid zip archive"
    return "cannot be read"


# --- readers ---------------------------------------------------------------------------------------


def _read_bytes(path: str) -> bytes:
    """The whole (decompressed) content of a file; InputError for an unreadable one.

    gzip and bzip2 are decompressed here rather than by Beam's CompressedFile, which returns
    the data of a truncated file without an error: a cut file must fail, not lose its tail.
    """
    try:
        with storage.open_read(path) as f:
            data = f.read()
        name = path.lower()
        if name.endswith(".gz"):
            data = gzip.decompress(data)
        elif name.endswith(".bz2"):
            data = bz2.decompress(data)
    except IsADirectoryError:
        raise InputError(f"{path}: is a directory, not a file") from None
    except Exception as exc:  # noqa: BLE001 - zlib.error, EOFError, OSError: all "bad file"
        raise InputError(f"{path}: {_unreadable(path)} ({_one_line(exc)})") from None
    if path.lower().endswith(".zip"):
        try:
            with zipfile.ZipFile(io.BytesIO(data)) as archive:
                data = archive.read(_only_member(path, archive))
        except (zipfile.BadZipFile, zipfile.LargeZipFile, EOFError, OSError) as exc:
            raise InputError(f"{path}: not a valid zip archive ({_one_line(exc)})") from None
    return data


def _parse_csv(data: bytes, column_types: dict) -> tuple[pa.Table, list]:
    """Arrow's CSV parser, with quote-aware record boundaries and every record accounted for.

    Single-threaded so that each invalid row has its record number; blank lines are kept as
    rows (ignore_empty_lines=False) so record numbers and rows line up (read_csv_records drops
    them again). Null markers: CSV_NULL_VALUES ("NaN" is a number).
    """
    invalid: list[tuple] = []

    def skip(row) -> str:
        invalid.append((row.number, row.text, row.expected_columns, row.actual_columns))
        return "skip"

    if not data.endswith(b"\n"):
        data += b"\n"
    table = pacsv.read_csv(
        io.BytesIO(data),
        read_options=pacsv.ReadOptions(use_threads=False),
        parse_options=pacsv.ParseOptions(
            newlines_in_values=True, ignore_empty_lines=False, invalid_row_handler=skip
        ),
        convert_options=pacsv.ConvertOptions(
            column_types=column_types, strings_can_be_null=True, null_values=CSV_NULL_VALUES
        ),
    )
    return table, invalid


def _read_csv_typed(data: bytes, names: Sequence[str], types: dict) -> tuple[pa.Table, list, bool]:
    """Typed read first (fast); if a column does not convert, all text; if not UTF-8, all bytes.

    The fallbacks keep every row: the validator then rejects the bad values one record at a
    time, with the reason, instead of the whole file failing. Bytes that are not UTF-8 are
    marked first (INVALID_UTF8_MARK; the third value says so): Arrow cannot hand an invalid
    row with such bytes to the invalid-row handler, and would fail the whole file.
    """
    marked = False
    try:
        data.decode("utf-8")
    except UnicodeDecodeError:
        data = data.decode("utf-8", errors=_MARK_ERRORS).encode("utf-8")
        marked = True
    try:
        return (*_parse_csv(data, types), marked)
    except pa.ArrowInvalid:
        pass
    try:
        return (*_parse_csv(data, {n: pa.string() for n in names}), marked)
    except pa.ArrowInvalid:
        return (*_parse_csv(data, {n: pa.binary() for n in names}), marked)


def _marked_rows(table: pa.Table) -> np.ndarray:
    """Rows holding a byte that was not UTF-8 (marked by _read_csv_typed)."""
    marked = np.zeros(table.num_rows, bool)
    for column in table.columns:
        if pa.types.is_string(column.type):
            hits = pc.match_substring(column, INVALID_UTF8_MARK).fill_null(False)
            marked |= hits.to_numpy(zero_copy_only=False)
    return marked


def read_csv_table(data: bytes) -> tuple[pa.Table, list[UnparseableRow]]:
    """A whole CSV (inferred types) and its rows that do not have the header's field count."""
    names = csv_header(data)
    table, invalid, _ = _read_csv_typed(data, names, {})
    blank = _blank_rows(table, data, _record_lines(table, invalid, data)[0])
    if blank.any():
        table = table.filter(pa.array(~blank))
    return table, [_unparseable(row, "") for row in invalid]


def _unparseable(row: tuple, path: str, line: int | None = None) -> UnparseableRow:
    _, text, expected, actual = row
    return UnparseableRow(text, f"expected {expected} fields, got {actual}", path, line)


def _record_lines(
    table: pa.Table, invalid: list, data: bytes
) -> tuple[np.ndarray, list, np.ndarray]:
    """First physical line (1-based, "\\n"-separated) of every row and of every invalid record.

    Records follow each other: the header, then rows and invalid records in file order (an
    invalid record's number says where it was). A record spans 1 + the newlines inside its
    quoted values; only text columns can hold them.
    """
    n_rows = table.num_rows
    if any(number is None for number, *_ in invalid):
        return np.full(n_rows, -1, np.int64), [None] * len(invalid), np.ones(n_rows, np.int64)
    n_records = n_rows + len(invalid)
    spans = np.ones(n_records, np.int64)
    is_invalid = np.zeros(n_records, bool)
    invalid_at = np.array([number - 2 for number, *_ in invalid], np.int64)
    is_invalid[invalid_at] = True
    if b'"' in data:  # without quotes no value holds a newline
        row_spans = np.ones(n_rows, np.int64)
        for column in table.columns:
            if pa.types.is_string(column.type) or pa.types.is_binary(column.type):
                counts = pc.count_substring(column, "\n").fill_null(0)
                row_spans += counts.to_numpy(zero_copy_only=False).astype(np.int64)
        spans[~is_invalid] = row_spans
        spans[invalid_at] = [1 + text.count("\n") for _, text, *_ in invalid]
    header_lines = 1 + sum(name.count("\n") for name in table.column_names)
    starts = header_lines + 1 + np.concatenate([[0], np.cumsum(spans)[:-1]])
    return starts[~is_invalid], starts[invalid_at].tolist(), spans[~is_invalid]


def _record_bytes(data: bytes, lines: np.ndarray, spans: np.ndarray):
    """Byte offsets [start, end) of each record's text (its lines, without the final newline
    or carriage return); -1 where the line is unknown."""
    newlines = np.flatnonzero(np.frombuffer(data, np.uint8) == 10)
    line_starts = np.concatenate([[0], newlines + 1])  # of line k (1-based) at k - 1
    line_ends = np.concatenate([newlines, [len(data)]])
    known = lines > 0
    first = np.where(known, lines - 1, 0)
    last = np.minimum(first + spans - 1, len(line_ends) - 1)
    starts = np.where(known, line_starts[np.minimum(first, len(line_starts) - 1)], -1)
    ends = np.where(known, line_ends[last], -1)
    return starts, ends


def _texts(data: bytes, starts: np.ndarray, ends: np.ndarray) -> tuple | None:
    """The bytes chunk covering some records and their offsets in it (see RawBatch.texts)."""
    known = starts >= 0
    if not known.any():
        return None
    lo, hi = int(starts[known].min()), int(ends[known].max())
    chunk = data[lo:hi]
    # A record's text ends before its line's carriage return (CRLF files).
    last = np.frombuffer(data, np.uint8)[np.maximum(ends - 1, 0)]
    ends = np.where(known & (ends > starts) & (last == 13), ends - 1, ends)
    return chunk, np.where(known, starts - lo, -1), np.where(known, ends - lo, -1)


def _blank_rows(table: pa.Table, data: bytes, lines: np.ndarray) -> np.ndarray:
    """Rows that are blank lines (all null and nothing on their line), not records."""
    blank = np.zeros(table.num_rows, bool)
    if table.num_rows == 0 or table.num_columns == 0:
        return blank
    all_null = table.column(0).is_null()
    for column in table.columns[1:]:
        all_null = pc.and_(all_null, column.is_null())
    candidates = np.flatnonzero(all_null.to_numpy(zero_copy_only=False))
    if not len(candidates):
        return blank
    if (lines[candidates] < 0).any():
        blank[candidates] = True  # no line numbers: Arrow only gives all-null rows for blanks
        return blank
    newlines = np.flatnonzero(np.frombuffer(data, np.uint8) == 10)
    for i in candidates:
        line = int(lines[i])
        start = 0 if line == 1 else int(newlines[line - 2]) + 1
        end = int(newlines[line - 1]) if line - 1 < len(newlines) else len(data)
        blank[i] = not data[start:end].strip(b"\r")
    return blank


def read_csv_records(
    data: bytes, path: str, fs: FeatureSet | None, batch_rows: int = BATCH_ROWS
) -> Iterator[RawBatch | UnparseableRow]:
    """A CSV file -> RawBatches of rows (with their first lines) and UnparseableRows.

    Int and float fields are read typed when every value converts, everything else as text, so
    no value is rounded through an inferred type (an int column that Arrow would read as
    float64 because one value overflows int64 would lose the digits of every other value).
    """
    names = csv_header(data, path)
    check_columns(path, names, fs)
    types = {}
    if fs is not None:
        types = {f.name: _CSV_TYPES.get(f.type, pa.string()) for f in fs.schema if f.name in names}
    try:
        table, invalid, marked = _read_csv_typed(data, names, types)
    except pa.ArrowException as exc:
        raise InputError(f"{path}: not a readable CSV file ({_one_line(exc)})") from None
    lines, invalid_lines, spans = _record_lines(table, invalid, data)
    blank = _blank_rows(table, data, lines)
    if blank.any():
        table = table.filter(pa.array(~blank))
        lines, spans = lines[~blank], spans[~blank]
    if marked:
        not_utf8 = _marked_rows(table)
        for i in np.flatnonzero(not_utf8):
            values = table.slice(int(i), 1).to_pylist()[0].values()
            text = ",".join("" if v is None else str(v) for v in values)
            text = text.replace(INVALID_UTF8_MARK, "\ufffd")
            yield UnparseableRow(text, "the record is not UTF-8 text", path, int(lines[i]))
        table = table.filter(pa.array(~not_utf8))
        lines, spans = lines[~not_utf8], spans[~not_utf8]
    starts, ends = _record_bytes(data, lines, spans)
    for batch_start in range(0, table.num_rows, batch_rows):
        batch = table.slice(batch_start, batch_rows).combine_chunks().to_batches()
        if batch:
            window = slice(batch_start, batch_start + batch_rows)
            yield RawBatch(
                batch[0], path, lines[window], texts=_texts(data, starts[window], ends[window])
            )
    for row, line in zip(invalid, invalid_lines, strict=True):
        yield _unparseable(row, path, line)


def iter_json_lines(data: bytes, path: str = "") -> Iterator[RawLine | UnparseableRow]:
    """JSON-lines content -> one RawLine per non-blank line, split on "\\n" only.

    str.splitlines() would also split on U+2028, U+0085, \\x1c.. inside JSON strings, turning
    one valid record into two broken ones. A line that is not UTF-8 is an UnparseableRow.
    """
    if data.startswith(codecs.BOM_UTF8):
        data = data[len(codecs.BOM_UTF8) :]
    for number, line in enumerate(data.split(b"\n"), 1):
        if not line.strip():
            continue
        if line.endswith(b"\r"):
            line = line[:-1]
        try:
            text = line.decode("utf-8")
        except UnicodeDecodeError as exc:
            yield UnparseableRow(
                line.decode("utf-8", errors="replace"),
                f"line is not UTF-8 text ({exc.reason})",
                path,
                number,
            )
            continue
        yield RawLine(text, path, number)


def read_parquet_records(
    path: str, fs: FeatureSet | None, batch_rows: int = BATCH_ROWS
) -> Iterator[RawBatch]:
    try:
        with storage.open_read(path) as f:
            parquet = pq.ParquetFile(f)
            check_columns(path, parquet.schema_arrow.names, fs)
            offset = 0
            for batch in parquet.iter_batches(batch_size=batch_rows):
                yield RawBatch(batch, path, range(offset, offset + batch.num_rows), "row")
                offset += batch.num_rows
    except InputError:
        raise
    except Exception as exc:  # noqa: BLE001 - a corrupt page is a bad file, said once, clearly
        raise InputError(f"{path}: not a readable Parquet file ({_one_line(exc)})") from None


def read_file_records(
    path: str, fmt: str, fs: FeatureSet | None = None, batch_rows: int = BATCH_ROWS
) -> Iterator[RawBatch | RawLine | UnparseableRow]:
    """Every record of one file, each exactly once, as the validator's input elements."""
    if fmt == "parquet":
        yield from read_parquet_records(path, fs, batch_rows)
        return
    data = _read_bytes(path)
    if not data:
        raise InputError(f"{path}: the file is empty")
    if fmt == "csv":
        yield from read_csv_records(data, path, fs, batch_rows)
    else:
        yield from iter_json_lines(data, path)
