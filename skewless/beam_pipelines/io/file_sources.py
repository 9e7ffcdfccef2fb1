"""The Beam sources over files: a path or glob matched, spread over the workers, and each file
read by files.py's readers (raw records for the validator)."""

from __future__ import annotations

from collections.abc import Iterator

import apache_beam as beam
from apache_beam.io import fileio
from apache_beam.metrics import Metrics

from skewless.beam_pipelines.io.files import (
    BATCH_ROWS,
    NAMESPACE,
    _is_local_dir,
    detect_format,
    read_file_records,
)
from skewless.transforms.featureset import FeatureSet


class _ReadFile(beam.DoFn):
    """One file -> RawBatches (CSV, Parquet), RawLines (JSON lines) and UnparseableRows."""

    def __init__(self, input_format: str | None, batch_rows: int, fs: FeatureSet | None = None):
        self.input_format = input_format
        self.batch_rows = batch_rows
        self.fs = fs

    def setup(self) -> None:
        self._files = Metrics.counter(NAMESPACE, "files_read")

    def process(self, path: str) -> Iterator:
        fmt = self.input_format or detect_format(path)
        self._files.inc()
        yield from read_file_records(path, fmt, self.fs, self.batch_rows)


class ReadRawFiles(beam.PTransform):
    """A path or glob (local or gs://) -> raw elements for CheckRecords.

    With `fs`, CSV int/float columns are read with the declared types and headers are checked
    against the schema again (the files may have changed since check_input).
    """

    def __init__(
        self,
        pattern: str,
        input_format: str | None = None,
        batch_rows: int = BATCH_ROWS,
        fs: FeatureSet | None = None,
    ):
        super().__init__()
        self.pattern = pattern
        self.input_format = input_format
        self.batch_rows = batch_rows
        self.fs = fs

    def expand(self, pbegin):
        return matched_paths(pbegin, self.pattern) | "ReadFile" >> beam.ParDo(
            _ReadFile(self.input_format, self.batch_rows, self.fs)
        )


def matched_paths(pbegin, pattern: str):
    """The files a path or glob names (directories left out), spread over the workers: the
    first steps of every file reader (their labels stay the caller's steps)."""
    return (
        pbegin
        | "Match" >> fileio.MatchFiles(pattern)
        | "Paths" >> beam.FlatMap(lambda m: [] if _is_local_dir(m.path) else [m.path])
        | "Spread" >> beam.Reshuffle()
    )
