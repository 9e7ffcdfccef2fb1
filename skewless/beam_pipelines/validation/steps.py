"""The Beam steps of validation: new data read as it is (inferred.py, one file per element),
serving log features as batches, the check against a baseline (baseline_check.py), and the
sinks of the validation files (statistics_io.py): statistics, schema, anomalies, report."""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import apache_beam as beam
import pyarrow as pa
from apache_beam.io.filesystems import FileSystems

from skewless.beam_pipelines.io.file_sources import matched_paths
from skewless.beam_pipelines.io.files import BATCH_ROWS, detect_format
from skewless.beam_pipelines.validation.baseline import Baseline, check_statistics
from skewless.beam_pipelines.validation.files import (
    ANOMALIES_FILE,
    REPORT_FILE,
    statistics_list,
    write_anomalies,
    write_schema,
    write_statistics,
    write_text,
)
from skewless.beam_pipelines.validation.read_as_is import read_inferred, rows_to_batch
from skewless.transforms.featureset import FeatureSet


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


class WriteText(beam.PTransform):
    """One element -> a file at `path` (rendered by `render`); outputs the path once written.
    A retried bundle writes the same bytes again."""

    def __init__(self, path: str, render=str):
        super().__init__()
        self.path = path
        self.render = render

    def expand(self, pcoll):
        render = self.render
        return pcoll | "Write" >> beam.Map(lambda x, path: write_text(path, render(x)), self.path)


class WriteAnomalies(beam.PTransform):
    """One list of anomaly dicts -> `output_dir/anomalies.json` (a JSON list)."""

    def __init__(self, output_dir: str):
        super().__init__()
        self.path = FileSystems.join(output_dir, ANOMALIES_FILE)

    def expand(self, anomalies):
        return anomalies | "Write" >> beam.Map(lambda a, path: write_anomalies(path, a), self.path)


class WriteStatistics(beam.PTransform):
    """DatasetFeatureStatistics elements -> one DatasetFeatureStatisticsList file at `path`,
    datasets in the order of `order` (then by name). Outputs the path once written."""

    def __init__(self, path: str, order: Sequence[str] = ()):
        super().__init__()
        self.path = path
        self.order = tuple(order)

    def expand(self, datasets):
        return (
            datasets
            | "Gather" >> beam.combiners.ToList()
            | "ToList" >> beam.Map(statistics_list, self.order)
            | "Write" >> beam.Map(_write_and_return_path, self.path, write_statistics)
        )


class WriteSchema(beam.PTransform):
    """One Schema element -> a text proto at `path`. Outputs the path once written."""

    def __init__(self, path: str):
        super().__init__()
        self.path = path

    def expand(self, schemas):
        return schemas | "Write" >> beam.Map(_write_and_return_path, self.path, write_schema)


def _write_and_return_path(message, path: str, write) -> str:
    # A retried bundle writes the same bytes again: the write is idempotent.
    write(path, message)
    return path


class CheckAgainstBaseline(beam.PTransform):
    """One-element PCollection of new statistics -> one element: the list of anomaly dicts,
    written to `output_dir/anomalies.json` with a one-page `report.html` (check_statistics)."""

    def __init__(self, baseline: Baseline, fs: FeatureSet, kind: str, output_dir: str, title: str):
        super().__init__()
        self.baseline = baseline
        self.fs = fs
        self.kind = kind
        self.output_dir = output_dir
        self.title = title

    def expand(self, stats):
        checked = stats | "FindAnomalies" >> beam.Map(
            check_statistics, self.baseline, self.fs, self.kind, self.title
        )
        anomalies = checked | "Anomalies" >> beam.Map(lambda c: c[0])
        _ = anomalies | "WriteAnomalies" >> WriteAnomalies(self.output_dir)
        _ = (
            checked
            | "Report" >> beam.Map(lambda c: c[1])
            | "WriteReport" >> WriteText(FileSystems.join(self.output_dir, REPORT_FILE))
        )
        return anomalies
