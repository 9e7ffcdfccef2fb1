"""New data's statistics checked against a prepared baseline, shared by `skewless validate` (as
a Beam job or in process) and `prepare --validate_against`: the baseline and its schema, the
schema as a source sees it, and the comparison with its report (docs/architecture.md,
"Validation"). No Beam here: validation_io.CheckAgainstBaseline runs the check in a job."""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field

from tensorflow_metadata.proto.v0 import schema_pb2, statistics_pb2

from skewless.beam_pipelines.io import storage
from skewless.beam_pipelines.validation.files import (
    ANOMALIES_FILE,
    REPORT_FILE,
    SchemaFileError,
    StatisticsFileError,
    drift_thresholds_path,
    read_anomalies,
    read_schema,
    read_statistics,
    schema_path,
    statistics_path,
)
from skewless.beam_pipelines.validation.report import render_report
from skewless.transforms.anomalies import NO_FEATURE, blocking, drift_measures, find_anomalies
from skewless.transforms.featureset import FeatureSet, load_feature_set

LOG = logging.getLogger("skewless.validate")
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
    drift_thresholds: dict = field(default_factory=dict)  # prepare's record, if any


def load_baseline(directory: str, schema_file: str | None = None) -> Baseline:
    """The baseline of a prepare run: its train statistics, and its schema/schema.pbtxt (or
    `schema_file`). ValueError naming the file and what is missing or wrong with it (a
    file that does not parse, no dataset, a schema without features), raised before any run."""
    stats_file = statistics_path(directory)
    if not storage.exists(stats_file):
        raise ValueError(
            f"baseline {directory!r} has no {stats_file}: run prepare (with statistics) on the "
            "baseline data first"
        )
    try:
        datasets = {d.name: d for d in read_statistics(stats_file).datasets}
    except StatisticsFileError as e:
        raise StatisticsFileError(f"baseline {e}") from e
    if not datasets:
        raise ValueError(f"baseline statistics {stats_file} hold no dataset")
    statistics = datasets.get(BASELINE_DATASET) or next(iter(datasets.values()))
    schema_file = schema_file or schema_path(directory)
    schema = read_schema(schema_file)
    if not schema.feature:
        # An empty (or emptied) file parses as a Schema that checks nothing: every run passes.
        raise SchemaFileError(f"schema file {schema_file} describes no feature")
    summary_file = storage.join(directory, "summary.json")
    summary = {}
    if storage.exists(summary_file):
        summary = json.loads(storage.read_bytes(summary_file).decode())
    thresholds_file = drift_thresholds_path(directory)
    thresholds = {}
    if storage.exists(thresholds_file):
        thresholds = json.loads(storage.read_bytes(thresholds_file).decode())
    return Baseline(directory, statistics, schema, schema_file, summary, thresholds)


def not_compared(fs: FeatureSet) -> dict[str, str]:
    """Columns whose drift validation never compares, with why: time columns (instants: a
    later period never overlaps the baseline's) and the feature set's calendar fields (a span
    of time has its own months, days, hours)."""
    fields = (*fs.schema, *fs.example_fields)
    out = {f.name: "time column: not compared for drift" for f in fields if f.type == "timestamp"}
    out[fs.event_time] = "time column: not compared for drift"
    for name in fs.calendar_fields:
        out.setdefault(name, "calendar field: not compared for drift")
    return out


def source_view(
    schema: schema_pb2.Schema, fs: FeatureSet, kind: str
) -> tuple[schema_pb2.Schema, list | None, list]:
    """(the schema as a source is checked against, its expected columns, its known columns).

    - time columns and calendar fields lose their drift comparator
      (not_compared): a span of time has its own instants, months, days;
    - raw records (files, BigQuery) carry the feature set's raw fields, not the aggregates:
      those fields are expected and known, and a field the raw schema declares nullable may be
      missing in any fraction of records (a cancelled event has no outcome), so its presence
      fraction is not checked against the examples' (which only hold complete events), but
      its `presence.min_count` is: a field missing from every record is an anomaly;
    - a serving log has every example column but the label.
    """
    view = schema_pb2.Schema()
    view.CopyFrom(schema)
    times = not_compared(fs)
    nullable = {f.name for f in fs.schema if f.nullable}
    for feature in view.feature:
        if feature.name in times:
            feature.ClearField("drift_comparator")
        if kind == RAW and feature.name in nullable:
            feature.presence.ClearField("min_fraction")
    if kind == RAW:
        raw = [f.name for f in fs.schema]
        return view, raw, raw
    if kind == SERVING_LOG:
        return view, [f.name for f in view.feature if f.name != fs.label], []
    return view, None, []


def check_statistics(
    new: statistics_pb2.DatasetFeatureStatistics,
    baseline: Baseline,
    fs: FeatureSet,
    kind: str,
    title: str,
) -> tuple[list[dict], str]:
    """New statistics against the baseline, as a source of `kind` sees its schema: (the
    anomaly dicts, the one-page HTML report). The same step in the Beam job and in process."""
    view, expected, known = source_view(baseline.schema, fs, kind)
    found = find_anomalies(
        baseline.statistics,
        view,
        new,
        expected_columns=None if expected is None else sorted(expected),
        known_columns=sorted(known),
    )
    anomalies = [a.to_dict() for a in found]
    checks = drift_checks(baseline, view, new, fs)
    return anomalies, render_report(anomalies, baseline.statistics, new, title, checks)


def drift_checks(
    baseline: Baseline,
    view: schema_pb2.Schema,
    new: statistics_pb2.DatasetFeatureStatistics,
    fs: FeatureSet,
) -> list[dict]:
    """One row per feature of both statistics for the report: its drift, the threshold and
    where the threshold comes from (prepare's calibration, or the schema), or why it is not
    compared (a time column, a calendar field)."""
    calibrated = baseline.drift_thresholds.get("features", {})
    rows = []
    for m in drift_measures(baseline.statistics, view, new):
        entry = calibrated.get(m.feature, {})
        if entry.get("threshold") == m.threshold:
            source = f"calibrated: {entry['derived']}"
        elif "threshold" in entry:
            source = f"schema (edited; calibration gave {entry['threshold']:g})"
        else:
            source = "schema" + (f" ({entry['not_calibrated']})" if entry else "")
        rows.append(
            {"feature": m.feature, "measure": m.measure, "value": m.distance,
             "threshold": m.threshold, "blocking": m.drifted, "source": source}
        )  # fmt: skip
    fresh = {f.name for f in new.features}
    base = {f.name for f in baseline.statistics.features}
    for name, why in sorted(not_compared(fs).items()):
        if name in fresh and name in base:
            rows.append(
                {"feature": name, "measure": None, "value": None, "threshold": None,
                 "blocking": False, "source": why}
            )  # fmt: skip
    return rows


def validation_outcome(validation_dir: str, against: str, allow: bool) -> dict:
    """What a job that validated its data records in its summary: the anomalies found in
    `validation_dir/anomalies.json`, the blocking ones, and whether the data is refused."""
    anomalies = read_anomalies(storage.join(validation_dir, ANOMALIES_FILE))
    blocked = [a for a in anomalies if a["blocking"]]
    return {
        "against": against,
        "anomalies": len(anomalies),
        "blocking": blocked,
        "refused": bool(blocked) and not allow,
        "allowed": bool(blocked) and allow,
        "report": storage.join(validation_dir, REPORT_FILE),
    }


def report_title(described: str, baseline_dir: str) -> str:
    """The report's title: what was validated, against which baseline."""
    return f"skewless validate: {described} against {baseline_dir}"


def feature_set_of(spec: str | None, baseline: Baseline) -> FeatureSet:
    """--feature_set, else the one the baseline's prepare run recorded."""
    recorded = baseline.summary.get("feature_set_spec") or baseline.summary.get("feature_set")
    if spec is None and not recorded:
        raise ValueError(
            f"baseline {baseline.directory!r} records no feature set: give --feature_set"
        )
    return load_feature_set(recorded if spec is None else spec)  # '' is an error there


def conclude(anomalies: list[dict], output_dir: str) -> dict:
    """The end of a validate run: each anomaly logged, then the count; exits EXIT_BLOCKING when
    one blocks, else returns {anomalies, blocking}."""
    blocked = blocking(anomalies)
    for a in anomalies:
        where = "" if a["feature"] == NO_FEATURE else f", {a['feature']}"
        (LOG.error if a["blocking"] else LOG.warning)("question %d%s: %s", a["question"], where, a["description"])  # fmt: skip
    LOG.info(
        "validate finished: %d anomalies, %d blocking; %s", len(anomalies), len(blocked), output_dir
    )
    if blocked:
        raise SystemExit(EXIT_BLOCKING)
    return {"anomalies": anomalies, "blocking": len(blocked)}
