"""Streaming monitoring of served traffic (issue 23): the scorer's served examples and
predictions, windowed by event time, counted per window on the training statistics' buckets
(skewless.transforms.monitoring) and compared with them when the watermark closes the window;
each anomaly becomes a record on a topic and Beam counters (docs/jobs/score.md, "Monitoring")."""

from __future__ import annotations

import datetime as dt
import json
from collections.abc import Iterable, Iterator

import apache_beam as beam
from apache_beam.metrics import Metrics
from apache_beam.transforms import trigger, window
from apache_beam.utils.timestamp import Duration

from skewless.transforms.featureset import FeatureSet
from skewless.transforms.monitoring import (
    DEFAULT_WINDOW_S,
    KINDS,
    MIN_WINDOW_EXAMPLES,
    MonitorReference,
    WindowCounts,
    window_anomalies,
)
from skewless.transforms.record_checks import NAMESPACE

EXAMPLE, PREDICTION = "example", "prediction"


def load_monitor_reference(
    prepared_dir: str,
    fs: FeatureSet,
    prediction_mean: float | None = None,
    window_s: int = DEFAULT_WINDOW_S,
) -> MonitorReference:
    """The reference of a model version's prepared dir (its statistics, its schema with the
    thresholds prepare calibrated) and its mean eval probability (metrics.json, None: not
    recorded), its thresholds calibrated on the prepared examples (features/) counted in
    windows of `window_s` seconds (calibrate_on_windows; not calibrated when the dir has no
    features/): ValueError naming the file when one is missing or broken."""
    from skewless.beam_pipelines.io.prepared_examples import read_columns
    from skewless.beam_pipelines.validation.baseline import load_baseline, not_compared
    from skewless.transforms.monitoring import (
        calibrate_on_windows,
        monitor_reference,
        training_windows,
    )

    baseline = load_baseline(prepared_dir)
    reference = monitor_reference(
        baseline.statistics, baseline.schema, fs, not_compared(fs), prediction_mean
    )
    table = read_columns(prepared_dir, [fs.event_time, fs.label, *reference.missing])
    if table is None:
        return reference
    windows = training_windows(table, reference, fs.event_time, fs.label, window_s)
    return calibrate_on_windows(reference, windows)


def eval_mean_probability(model_path: str) -> float | None:
    """The model version's mean probability on its eval split (metrics.json `model`), or None
    when training did not record it."""
    from skewless.beam_pipelines.io import storage
    from skewless.models.versions import METRICS_FILE

    path = storage.join(model_path, METRICS_FILE)
    if not storage.exists(path):
        return None
    value = json.loads(storage.read_bytes(path).decode()).get("model", {}).get("mean_probability")
    return None if value is None or value != value else float(value)


def _event_seconds(value) -> float | None:
    """An event time as an example (epoch ms) or a prediction (ISO-8601) carries it -> seconds."""
    if value is None:
        return None
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return value / 1000.0
    if isinstance(value, dt.datetime):
        return value.timestamp()
    return dt.datetime.fromisoformat(str(value)).timestamp()


class _StampExamples(beam.DoFn):
    """Batches (lists) of served examples -> (EXAMPLE, the monitored columns) at their event
    time (a batch carries no single event time: BatchElements stamps it as it likes)."""

    def __init__(self, fs: FeatureSet, columns: Iterable[str]):
        self.event_time = fs.event_time
        self.columns = tuple(columns)

    def setup(self) -> None:
        self._read = Metrics.counter(NAMESPACE, "monitor_examples")
        self._untimed = Metrics.counter(NAMESPACE, "monitor_examples_without_event_time")

    def process(self, batch: list[dict]) -> Iterator:
        for example in batch:
            seconds = _event_seconds(example.get(self.event_time))
            if seconds is None:
                self._untimed.inc()
                continue
            self._read.inc()
            # Only the monitored columns: the example dict is shared with the scoring branch.
            values = {name: example.get(name) for name in self.columns}
            yield window.TimestampedValue((EXAMPLE, values), seconds)


class _StampPredictions(beam.DoFn):
    """Prediction dicts -> (PREDICTION, (probability, model version)) at their event time."""

    def __init__(self, fs: FeatureSet):
        self.event_time = fs.event_time

    def setup(self) -> None:
        self._read = Metrics.counter(NAMESPACE, "monitor_predictions")

    def process(self, prediction: dict) -> Iterator:
        seconds = _event_seconds(prediction.get(self.event_time))
        if seconds is None:
            return
        self._read.inc()
        value = (float(prediction["probability"]), prediction.get("model_version"))
        yield window.TimestampedValue((PREDICTION, value), seconds)


class WindowCountsFn(beam.CombineFn):
    """(EXAMPLE, example) / (PREDICTION, (probability, version)) -> the window's WindowCounts
    and the model versions that served it: counts, never the examples."""

    def __init__(self, reference: MonitorReference):
        super().__init__()
        self.reference = reference

    def create_accumulator(self) -> tuple[WindowCounts, set]:
        return WindowCounts(self.reference), set()

    def add_input(self, acc, item):
        counts, versions = acc
        kind, value = item
        if kind == EXAMPLE:
            counts.add_example(value, self.reference)
        else:
            probability, version = value
            counts.add_prediction(probability)
            if version is not None:
                versions.add(int(version))
        return acc

    def merge_accumulators(self, accumulators):
        merged_counts, merged_versions = self.create_accumulator()
        for counts, versions in accumulators:
            merged_counts.merge(counts)
            merged_versions |= versions
        return merged_counts, merged_versions

    def extract_output(self, acc):
        return acc


class _WindowAnomalies(beam.DoFn):
    """A closed window's counts -> one anomaly record per anomaly; counters of windows,
    windows too small to compare, and anomalies (all and per kind)."""

    def __init__(self, reference: MonitorReference, min_examples: int):
        self.reference = reference
        self.min_examples = min_examples

    def setup(self) -> None:
        self._windows = Metrics.counter(NAMESPACE, "monitor_windows")
        self._small = Metrics.counter(NAMESPACE, "monitor_windows_too_small")
        self._anomalies = Metrics.counter(NAMESPACE, "monitor_anomalies")
        self._kinds = {k: Metrics.counter(NAMESPACE, f"monitor_anomalies_{k}") for k in KINDS}

    def process(self, acc, win=beam.DoFn.WindowParam) -> Iterator[dict]:
        counts, versions = acc
        self._windows.inc()
        if counts.examples < self.min_examples:
            self._small.inc()
        start = win.start.to_utc_datetime().replace(tzinfo=dt.UTC).isoformat()
        end = win.end.to_utc_datetime().replace(tzinfo=dt.UTC).isoformat()
        for found in window_anomalies(self.reference, counts, self.min_examples):
            self._anomalies.inc()
            self._kinds[found.kind].inc()
            yield {
                **found.to_dict(),
                "window_start": start,
                "window_end": end,
                "model_version": max(versions) if versions else None,
            }


class MonitorServedTraffic(beam.PTransform):
    """(batches of served examples, prediction dicts) -> anomaly records, one per anomaly of
    each window of `window_s` seconds of event time, emitted once when the watermark passes the
    window's end (AfterWatermark; elements later than that are dropped by Beam, after
    `allowed_lateness_s` at the latest). Counts per window, not lists of examples."""

    def __init__(
        self,
        fs: FeatureSet,
        reference: MonitorReference,
        window_s: int = DEFAULT_WINDOW_S,
        allowed_lateness_s: int = 0,
        min_examples: int = MIN_WINDOW_EXAMPLES,
    ):
        super().__init__()
        if window_s <= 0:
            raise ValueError(f"--monitor_window_s must be positive, got {window_s}")
        if allowed_lateness_s < 0:
            raise ValueError(f"--monitor_allowed_lateness_s must be >= 0, got {allowed_lateness_s}")
        self.fs = fs
        self.reference = reference
        self.window_s = window_s
        self.allowed_lateness_s = allowed_lateness_s
        self.min_examples = min_examples

    def expand(self, inputs):
        batches, predictions = inputs
        examples = batches | "StampExamples" >> beam.ParDo(
            _StampExamples(self.fs, self.reference.missing)
        )
        scored = predictions | "StampPredictions" >> beam.ParDo(_StampPredictions(self.fs))
        return (
            (examples, scored)
            | "Together" >> beam.Flatten()
            | "Window"
            >> beam.WindowInto(
                window.FixedWindows(self.window_s),
                trigger=trigger.AfterWatermark(),
                accumulation_mode=trigger.AccumulationMode.DISCARDING,
                allowed_lateness=Duration(seconds=self.allowed_lateness_s),
            )
            | "Count" >> beam.CombineGlobally(WindowCountsFn(self.reference)).without_defaults()
            | "Compare" >> beam.ParDo(_WindowAnomalies(self.reference, self.min_examples))
        )


def to_anomaly_message(record: dict):
    from apache_beam.io.gcp.pubsub import PubsubMessage

    data = json.dumps(record, separators=(",", ":")).encode("utf-8")
    return PubsubMessage(
        data=data, attributes={"feature": record["feature"], "kind": record["kind"]}
    )


class _ToAnomalyMessage(beam.DoFn):
    def process(self, record: dict):
        yield to_anomaly_message(record)


class PublishAnomalies(beam.PTransform):
    """Anomaly records -> JSON messages on a Pub/Sub topic (attributes `feature`, `kind`)."""

    def __init__(self, topic: str):
        super().__init__()
        self.topic = topic

    def expand(self, records):
        from apache_beam.io.gcp.pubsub import WriteToPubSub

        return (
            records
            | "ToMessage" >> beam.ParDo(_ToAnomalyMessage())
            | "Publish" >> WriteToPubSub(self.topic, with_attributes=True)
        )
