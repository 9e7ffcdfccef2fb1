"""Examples already built, read back: the features/ Parquet of earlier prepare, label-join or
retrain runs (prepare --examples, retrain --examples).

A directory is one of those outputs: features/*.parquet and summary.json. Its summary must
name the same feature set, and data its own run refused (a blocking validation anomaly, or
examples sharing their key without --allow_duplicate_example_keys) is refused here too, as
train refuses it. Only the example columns are read (label-join's prediction and model_version
are left out), cast to the feature set's example schema, so a file that does not fit it fails
the run instead of training on something else.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator

import apache_beam as beam
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from apache_beam.io.filesystems import FileSystems
from apache_beam.metrics import Metrics

from skewless.transforms.example_schema import features_arrow_schema
from skewless.transforms.featureset import FeatureSet

NAMESPACE = "skewless"
SUMMARY = "summary.json"
BATCH_ROWS = 8192
_GLOB = set("*?[")


def features_glob(directory: str) -> str:
    return os.path.join(directory, "features", "*.parquet")


def example_dirs(spec: str) -> list[str]:
    """'a,b/*,c' -> the directories, in the order given; an entry with a glob is every
    directory it matches that holds a summary.json, sorted by name. ValueError when an entry
    names nothing."""
    dirs: list[str] = []
    for entry in (part.strip().rstrip("/") for part in (spec or "").split(",")):
        if not entry:
            continue
        if _GLOB & set(entry):
            found = FileSystems.match([os.path.join(entry, SUMMARY)])[0].metadata_list
            matched = sorted(os.path.dirname(m.path) for m in found)
            if not matched:
                raise ValueError(f"--examples {entry!r} matches no directory with a {SUMMARY}")
            dirs.extend(matched)
        else:
            dirs.append(entry)
    if not dirs:
        raise ValueError("--examples names no directory")
    duplicated = sorted({d for d in dirs if dirs.count(d) > 1})
    if duplicated:
        raise ValueError(f"--examples names {duplicated[0]!r} twice")
    return dirs


def check_example_dirs(dirs: list[str], fs: FeatureSet) -> None:
    """Each directory is a finished, accepted output of feature set `fs` with the example
    columns; ValueError naming the directory otherwise (before any pipeline runs)."""
    expected = features_arrow_schema(fs)
    for directory in dirs:
        summary_path = os.path.join(directory, SUMMARY)
        if not FileSystems.exists(summary_path):
            raise ValueError(
                f"--examples {directory!r} has no {SUMMARY}: not a finished prepare, label-join "
                "or retrain output"
            )
        with FileSystems.open(summary_path) as f:
            summary = json.loads(f.read())
        if summary.get("feature_set") != fs.name:
            raise ValueError(
                f"--examples {directory!r} holds examples of feature set "
                f"{summary.get('feature_set')!r}, not {fs.name!r}"
            )
        if (summary.get("validation") or {}).get("refused"):
            raise ValueError(
                f"--examples {directory!r} was refused by its validation "
                f"({summary['validation'].get('report')}): train refuses it, and so does this"
            )
        if summary.get("duplicate_example_keys_refused"):
            raise ValueError(
                f"--examples {directory!r} was refused: its examples share example keys"
            )
        files = FileSystems.match([features_glob(directory)])[0].metadata_list
        if not files:
            raise ValueError(f"--examples {directory!r} has no features/*.parquet")
        with FileSystems.open(files[0].path) as f:
            found = pq.read_schema(f)
        missing = [name for name in expected.names if name not in found.names]
        if missing:
            raise ValueError(
                f"--examples {directory!r}: features/ lacks the example columns {missing} of "
                f"feature set {fs.name!r} (written by another version of it?)"
            )


def read_examples(path: str, schema: pa.Schema, batch_rows: int = BATCH_ROWS) -> Iterator:
    """One features Parquet file -> RecordBatches of `schema`'s columns, cast to it."""
    with FileSystems.open(path) as f:
        parquet = pq.ParquetFile(f)
        for batch in parquet.iter_batches(batch_size=batch_rows, columns=schema.names):
            table = pa.Table.from_batches([batch]).select(schema.names)  # the schema's order
            yield table.cast(schema).combine_chunks().to_batches()[0]


class _ReadExampleFile(beam.DoFn):
    def __init__(self, fs: FeatureSet):
        self.fs = fs

    def setup(self) -> None:
        self._schema = features_arrow_schema(self.fs)
        self._read = Metrics.counter(NAMESPACE, "examples_read")

    def process(self, indexed: tuple[int, str]) -> Iterator[tuple[int, pa.RecordBatch]]:
        index, path = indexed
        for batch in read_examples(path, self._schema):
            if batch.num_rows:
                self._read.inc(batch.num_rows)
                yield index, batch


class ReadPreparedExamples(beam.PTransform):
    """Directories (check_example_dirs) -> (position of the directory in the list, RecordBatch
    of the example columns). Counter `examples_read`."""

    def __init__(self, dirs: list[str], fs: FeatureSet):
        super().__init__()
        self.dirs = list(dirs)
        self.fs = fs

    def expand(self, pbegin):
        files = [
            (index, m.path)
            for index, directory in enumerate(self.dirs)
            for m in FileSystems.match([features_glob(directory)])[0].metadata_list
        ]
        return (
            pbegin
            | "Files" >> beam.Create(files)
            | "Spread" >> beam.Reshuffle()
            | "ReadFile" >> beam.ParDo(_ReadExampleFile(self.fs))
        )


def read_columns(directory: str, columns: list[str]) -> pa.Table | None:
    """The named columns of a prepare, label-join or retrain output's features/ (local or
    gs://), every file in name order; None when it holds no file."""
    found = FileSystems.match([features_glob(directory)])[0].metadata_list
    if not found:
        return None
    tables = []
    for m in sorted(found, key=lambda m: m.path):
        with FileSystems.open(m.path) as f:
            tables.append(pq.read_table(f, columns=list(dict.fromkeys(columns))))
    return pa.concat_tables(tables)


def latest_event_ms(dirs: list[str], fs: FeatureSet) -> int | None:
    """The latest event time (epoch ms) of the directories' examples; None when they hold none."""
    latest = None
    for directory in dirs:
        table = read_columns(directory, [fs.event_time])
        column = None if table is None else table.column(0)
        if column is not None and len(column) - column.null_count:
            found = pc.max(column.cast(pa.int64())).as_py()
            latest = found if latest is None else max(latest, found)
    return latest
