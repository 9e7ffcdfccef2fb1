"""New data's statistics checked against a prepared baseline, shared by `skewless validate` and
`prepare --validate_against`: the baseline and its schema, the schema as a source sees it,
and the comparison + outputs as one composite (docs/architecture.md, "Validation")."""

from __future__ import annotations

import json
from dataclasses import dataclass

import apache_beam as beam
from apache_beam.io.filesystems import FileSystems
from tensorflow_metadata.proto.v0 import schema_pb2, statistics_pb2

from beam_pipelines.io.statistics_io import (
    read_schema,
    read_statistics,
    schema_path,
    statistics_path,
)
from beam_pipelines.io.validation_io import (
    ANOMALIES_FILE,
    REPORT_FILE,
    WriteAnomalies,
    WriteText,
    read_anomalies,
)
from beam_pipelines.validation_report import render_report
from transforms.anomalies import FindAnomalies
from transforms.featureset import FeatureSet

EXIT_BLOCKING = 3  # as train's --fail_if_worse_than_baseline
BASELINE_DATASET = "train"
RAW, FEATURES, SERVING_LOG = "raw", "features", "serving_log"


@dataclass(frozen=True)
class Baseline:
    """A prepare run's train statistics and the schema to validate against."""

    directory: str
    statistics: statistics_pb2.DatasetFeatureStatistics
    schema: schema_pb2.Schema
    schema_path: str
    summary: dict


def load_baseline(directory: str, schema_file: str | None = None) -> Baseline:
    """The baseline of a prepare run: its train statistics, and its schema/schema.pbtxt (or
    `schema_file`). ValueError naming what is missing."""
    stats_file = statistics_path(directory)
    if not FileSystems.exists(stats_file):
        raise ValueError(
            f"baseline {directory!r} has no {stats_file}: run prepare (with statistics) on the "
            "baseline data first"
        )
    datasets = {d.name: d for d in read_statistics(stats_file).datasets}
    if not datasets:
        raise ValueError(f"baseline statistics {stats_file} hold no dataset")
    statistics = datasets.get(BASELINE_DATASET) or next(iter(datasets.values()))
    schema_file = schema_file or schema_path(directory)
    schema = read_schema(schema_file)
    summary_file = FileSystems.join(directory, "summary.json")
    summary = {}
    if FileSystems.exists(summary_file):
        with FileSystems.open(summary_file) as f:
            summary = json.loads(f.read().decode())
    return Baseline(directory, statistics, schema, schema_file, summary)


def time_columns(fs: FeatureSet) -> set[str]:
    """Columns holding instants (the event time, timestamps): a later period never overlaps
    the baseline's, so their distributions are not compared."""
    fields = (*fs.schema, *fs.example_fields)
    return {f.name for f in fields if f.type == "timestamp"} | {fs.event_time}


def source_view(
    schema: schema_pb2.Schema, fs: FeatureSet, kind: str
) -> tuple[schema_pb2.Schema, list | None, list]:
    """(the schema as a source is checked against, its expected columns, its known columns).

    - time columns lose their drift comparator (see time_columns);
    - raw records (files, BigQuery) carry the feature set's raw fields, not the aggregates:
      those fields are expected and known, and a field the raw schema declares nullable may be
      missing in any fraction of records (a cancelled event has no outcome), so its presence
      is not checked against the examples' (which only hold complete events);
    - a serving log has every example column but the label.
    """
    view = schema_pb2.Schema()
    view.CopyFrom(schema)
    times = time_columns(fs)
    nullable = {f.name for f in fs.schema if f.nullable}
    for feature in view.feature:
        if feature.name in times:
            feature.ClearField("drift_comparator")
        if kind == RAW and feature.name in nullable:
            feature.ClearField("presence")
    if kind == RAW:
        raw = [f.name for f in fs.schema]
        return view, raw, raw
    if kind == SERVING_LOG:
        return view, [f.name for f in view.feature if f.name != fs.label], []
    return view, None, []


class CheckAgainstBaseline(beam.PTransform):
    """One-element PCollection of new statistics -> one element: the list of anomaly dicts,
    written to `output_dir/anomalies.json` with a one-page `report.html`."""

    def __init__(self, baseline: Baseline, fs: FeatureSet, kind: str, output_dir: str, title: str):
        super().__init__()
        self.baseline = baseline
        self.view, self.expected, self.known = source_view(baseline.schema, fs, kind)
        self.output_dir = output_dir
        self.title = title

    def expand(self, stats):
        anomalies = stats | "FindAnomalies" >> FindAnomalies(
            self.baseline.statistics, self.view, self.expected, self.known
        )
        _ = anomalies | "WriteAnomalies" >> WriteAnomalies(self.output_dir)
        _ = (
            anomalies
            | "Report"
            >> beam.Map(
                lambda found, new, base, title: render_report(found, base, new, title),
                beam.pvalue.AsSingleton(stats),
                self.baseline.statistics,
                self.title,
            )
            | "WriteReport" >> WriteText(FileSystems.join(self.output_dir, REPORT_FILE))
        )
        return anomalies


def validation_outcome(validation_dir: str, against: str, allow: bool) -> dict:
    """What a job that validated its data records in its summary: the anomalies found in
    `validation_dir/anomalies.json`, the blocking ones, and whether the data is refused."""
    anomalies = read_anomalies(FileSystems.join(validation_dir, ANOMALIES_FILE))
    blocked = [a for a in anomalies if a["blocking"]]
    return {
        "against": against,
        "anomalies": len(anomalies),
        "blocking": blocked,
        "refused": bool(blocked) and not allow,
        "allowed": bool(blocked) and allow,
        "report": FileSystems.join(validation_dir, REPORT_FILE),
    }
