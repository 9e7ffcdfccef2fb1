"""Streaming monitoring's comparison (skewless.transforms.monitoring) on real flights: the
`trained` fixture's prepared dir (a week of real January flights) is the training reference,
its features/ (the very example columns the scorer serves) cut into hours are the served
windows; and the Beam step (skewless.beam_pipelines.validation.monitoring) fed by TestStream."""

from __future__ import annotations

import collections
import math

import apache_beam as beam
import numpy as np
import pyarrow.parquet as pq
import pytest
from apache_beam.testing.test_stream import TestStream
from apache_beam.testing.util import assert_that, equal_to
from apache_beam.utils.windowed_value import PaneInfoTiming

from skewless.beam_pipelines.runtime.parsing import metric_counters
from skewless.beam_pipelines.validation.baseline import load_baseline, not_compared
from skewless.beam_pipelines.validation.monitoring import (
    MonitorServedTraffic,
    eval_mean_probability,
    load_monitor_reference,
)
from skewless.examples.flights import FLIGHTS
from skewless.transforms.monitoring import (
    AGGREGATE_NOT_COMPARED,
    MIN_WINDOW_EXAMPLES,
    NOISE_ALPHA,
    WindowCounts,
    binomial_quantile,
    calibrate_on_windows,
    chi2_quantile,
    js_noise_bound,
    monitor_reference,
    training_windows,
    window_anomalies,
)
from tests.support.pipelines import streaming_options

HOUR_S = 3600


@pytest.fixture(scope="module")
def reference(trained):
    """The scorer's reference: calibrated on the week's own hours (its features/)."""
    version = trained["model_dir"] / "1"
    return load_monitor_reference(
        str(trained["prepared"]), FLIGHTS, eval_mean_probability(str(version))
    )


@pytest.fixture(scope="module")
def uncalibrated(trained, reference):
    """The statistics' reference alone: thresholds from the schema and the noise bounds."""
    baseline = load_baseline(str(trained["prepared"]))
    return monitor_reference(
        baseline.statistics, baseline.schema, FLIGHTS, not_compared(FLIGHTS),
        reference.prediction_mean,
    )  # fmt: skip


@pytest.fixture(scope="module")
def hours(trained) -> dict[int, list[dict]]:
    """The prepared examples by hour of event time, event times as the scorer has them (ms)."""
    out = collections.defaultdict(list)
    for row in pq.read_table(trained["prepared"] / "features").to_pylist():
        for name in ("scheduled_departure", "event_time"):
            row[name] = int(row[name].timestamp() * 1000)
        out[row["event_time"] // (HOUR_S * 1000)].append(row)
    return dict(sorted(out.items()))


def _counts(
    reference, examples, scale: float = 1.0, probability: float | None = None
) -> WindowCounts:
    counts = WindowCounts(reference)
    for example in examples:
        counts.add_example(dict(example, dep_delay=example["dep_delay"] * scale), reference)
        counts.add_prediction(example["label"] if probability is None else probability)
    return counts


def test_the_reference_compares_no_time_calendar_label_or_aggregate_column(reference):
    compared = set(reference.numeric) | set(reference.categorical)
    assert {"dep_delay", "distance", "carrier", "origin", "dest"} <= compared
    left_out = {"event_time", "scheduled_departure", "year", "month", "day", "hour", "label"}
    assert not compared & left_out
    assert reference.not_compared["origin_mean_dep_delay_1h"] == AGGREGATE_NOT_COMPARED
    assert "origin_mean_dep_delay_1h" not in compared
    assert "origin_mean_dep_delay_1h" in reference.missing  # its missing rate is still checked
    # Training deciles: ten buckets of about a tenth each (ties merge a few).
    dep = reference.numeric["dep_delay"]
    assert math.isclose(float(dep.mass.sum()), 1.0, abs_tol=1e-9)
    assert len(dep.mass) == len(dep.edges) + 1 >= 8
    assert 0.0 < reference.prediction_mean < 1.0  # the model's eval mean, from metrics.json


def test_a_clean_hour_of_real_flights_raises_nothing(uncalibrated, hours):
    """The noise bounds alone (with their margin) hold a clean January week."""
    reference = uncalibrated
    assert reference.calibrated_windows == 0
    compared = 0
    for examples in hours.values():
        counts = _counts(reference, examples, probability=reference.prediction_mean)
        assert window_anomalies(reference, counts) == [], examples[0]["event_time"]
        compared += counts.examples >= MIN_WINDOW_EXAMPLES
    assert compared >= 100  # a week: most hours hold enough flights to compare


def test_dep_delay_in_seconds_is_named_in_every_hour_and_nothing_else(reference, hours):
    raised = 0
    for examples in hours.values():
        if len(examples) < MIN_WINDOW_EXAMPLES:
            continue
        found = window_anomalies(reference, _counts(reference, examples, scale=60, probability=reference.prediction_mean))  # fmt: skip
        assert [(a.feature, a.kind) for a in found] == [
            ("dep_delay", "distribution_drift"), ("dep_delay", "out_of_range"),
        ]  # fmt: skip
        drift, outside = found
        assert drift.value > drift.threshold >= reference.numeric["dep_delay"].threshold
        assert outside.value > 0.3 > outside.threshold  # most of them, against a tolerance
        raised += 1
    assert raised >= 100


def test_small_windows_are_counted_not_compared(reference, hours):
    examples = next(e for e in hours.values() if len(e) >= MIN_WINDOW_EXAMPLES)
    few = _counts(reference, examples[: MIN_WINDOW_EXAMPLES - 1], scale=60)
    assert few.examples == MIN_WINDOW_EXAMPLES - 1
    assert window_anomalies(reference, few) == []


def test_missing_values_unseen_categories_and_predictions_are_named(reference, hours):
    examples = max(hours.values(), key=len)
    broken = [dict(e, distance=None, dest="XXX") for e in examples]
    wrong = 1.0 if reference.prediction_mean < 0.5 else 0.0
    found = window_anomalies(reference, _counts(reference, broken, probability=wrong))
    kinds = {(a.feature, a.kind) for a in found}
    assert ("distance", "missing_rate") in kinds
    assert ("dest", "unseen_categories") in kinds
    assert ("prediction", "prediction_drift") in kinds
    unseen = next(a for a in found if a.kind == "unseen_categories")
    assert unseen.value == 1.0 and "'XXX'" in unseen.description


def test_noise_bounds_match_the_textbook_quantiles():
    # chi-square 0.9999 quantile with 9 degrees of freedom: 33.72 (tables).
    assert math.isclose(chi2_quantile(0.9999, 9), 33.72, rel_tol=0.03)
    assert math.isclose(chi2_quantile(0.95, 9), 16.92, rel_tol=0.02)

    # Binomial quantiles against the cdf summed from math.comb.
    def cdf(k, n, p):
        return sum(math.comb(n, i) * p**i * (1 - p) ** (n - i) for i in range(k + 1))

    for q, n, rate in ((0.95, 40, 0.25), (0.9999, 40, 0.01), (0.9999, 300, 0.05)):
        k = binomial_quantile(q, n, rate)
        assert cdf(k, n, rate) >= q > cdf(k - 1, n, rate)
    assert binomial_quantile(0.5, 10, 0.0) == 0
    # The bound shrinks with the window: 40 values vs 4,000 (simulated, then chi-square).
    p = np.full(10, 0.1)
    assert js_noise_bound(p, 40) > 50 * js_noise_bound(p, 4000)
    # The simulated bound holds: samples of 40 from the buckets (another seed) exceed it
    # about as often as NOISE_ALPHA says.
    from skewless.transforms.anomalies import jensen_shannon_divergence

    rng = np.random.default_rng(7)
    dep = np.array([0.092, 0.05, 0.145, 0.075, 0.075, 0.13, 0.125, 0.1, 0.105, 0.103])
    bound = js_noise_bound(dep, 40)
    divergences = np.array(
        [jensen_shannon_divergence(dep, rng.multinomial(40, dep) / 40) for _ in range(20_000)]
    )
    assert (divergences > bound).mean() <= 5 * NOISE_ALPHA
    assert (divergences > bound / 2).mean() > 5 * NOISE_ALPHA  # not a bound nothing reaches


def _batches(examples, scale=1.0, size=10):
    rows = [dict(e, dep_delay=e["dep_delay"] * scale) for e in examples]
    return [rows[i : i + size] for i in range(0, len(rows), size)]


def _predictions(examples, probability, version=1):
    from skewless.transforms.record_checks import ms_to_datetime

    return [
        {"event_time": ms_to_datetime(e["event_time"]).isoformat(), "probability": probability,
         "model_version": version}
        for e in examples
    ]  # fmt: skip


class _PaneTiming(beam.DoFn):
    def process(self, record, pane=beam.DoFn.PaneInfoParam):
        yield (record["feature"], pane.timing)


@pytest.mark.timeout(240)
def test_windows_close_on_the_watermark_with_one_record_per_anomaly(reference, hours):
    """Two hours of real flights, the second with dep_delay in seconds, arrive as the scorer's
    batches (stamped anywhere) and predictions: one record, for the second window, when the
    watermark passes its end; counters for windows and anomalies."""
    (h1, first), (h2, second) = [(h, e) for h, e in hours.items() if len(e) >= 40][:2]
    start_s = min(h1, h2) * HOUR_S
    stream = (
        TestStream()
        .advance_watermark_to(start_s)
        # Batches carry no event time of their own: stamped at the first hour's start.
        .add_elements([beam.window.TimestampedValue(("b", b), start_s) for b in _batches(first)])
        .add_elements(
            [beam.window.TimestampedValue(("b", b), start_s) for b in _batches(second, 60)]
        )  # fmt: skip
        .add_elements(
            [
                beam.window.TimestampedValue(("p", p), start_s)
                for p in _predictions(first + second, reference.prediction_mean)
            ]
        )  # fmt: skip
        .advance_watermark_to((h1 + 1) * HOUR_S)
        .advance_watermark_to_infinity()
    )
    p = beam.Pipeline(options=streaming_options())
    items = p | stream
    batches = items | "Batches" >> beam.FlatMap(lambda kv: [kv[1]] if kv[0] == "b" else [])
    predictions = items | "Predictions" >> beam.FlatMap(lambda kv: [kv[1]] if kv[0] == "p" else [])
    records = (batches, predictions) | MonitorServedTraffic(FLIGHTS, reference)
    window_start = beam.window.IntervalWindow(
        h2 * HOUR_S, (h2 + 1) * HOUR_S
    ).start.to_utc_datetime()
    expected_start = window_start.isoformat() + "+00:00"
    assert_that(
        records
        | beam.Map(
            lambda r: (r["feature"], r["kind"], r["window_start"], r["count"], r["model_version"])
        ),  # fmt: skip
        equal_to([
            ("dep_delay", "distribution_drift", expected_start, len(second), 1),
            ("dep_delay", "out_of_range", expected_start, len(second), 1),
        ]),
    )  # fmt: skip
    # Fired once, when the watermark passed the window's end: the on-time pane.
    assert_that(
        records | beam.ParDo(_PaneTiming()),
        equal_to([("dep_delay", PaneInfoTiming.ON_TIME)] * 2),
        label="OnTime",
    )
    result = p.run()
    result.wait_until_finish()
    counters = metric_counters(result)
    assert counters["monitor_windows"] == 2
    assert counters["monitor_anomalies"] == 2
    assert counters["monitor_anomalies_distribution_drift"] == 1
    assert counters["monitor_anomalies_out_of_range"] == 1
    assert counters["monitor_examples"] == len(first) + len(second)
    assert counters["monitor_predictions"] == len(first) + len(second)


def test_thresholds_calibrated_on_the_first_days_hold_the_next_ones_and_see_seconds(
    uncalibrated, hours
):
    """Calibrated on the hours of Jan 1-4 (as the scorer calibrates on its model's training
    data), the hours of Jan 5-7 raise nothing, and in seconds they still raise dep_delay;
    a calibration never lowers a threshold below the noise margin's."""
    cut = sorted(hours)[len(hours) // 2]
    earlier = [e for h, e in hours.items() if h < cut]
    later = [e for h, e in hours.items() if h >= cut and len(e) >= MIN_WINDOW_EXAMPLES]
    windows = [_counts(uncalibrated, e) for e in earlier]  # the label in place of a prediction
    calibrated = calibrate_on_windows(uncalibrated, windows)
    assert calibrated.calibrated_windows == sum(len(e) >= MIN_WINDOW_EXAMPLES for e in earlier) > 40
    assert calibrated.numeric["dep_delay"].window_ratio > 0 and calibrated.prediction_spread > 0
    for examples in later:
        counts = _counts(calibrated, examples, probability=calibrated.prediction_mean)
        assert window_anomalies(calibrated, counts) == []
        seconds = _counts(calibrated, examples, scale=60, probability=calibrated.prediction_mean)
        assert ("dep_delay", "out_of_range") in {(a.feature, a.kind) for a in window_anomalies(calibrated, seconds)}  # fmt: skip
    assert len(later) > 40


def test_the_vectorised_training_windows_count_what_add_example_counts(uncalibrated, hours, trained):
    table = pq.read_table(trained["prepared"] / "features")
    vectorised = training_windows(table, uncalibrated, "event_time", "label", HOUR_S)
    assert len(vectorised) == len(hours)
    for counts, examples in zip(vectorised, hours.values(), strict=True):
        one_by_one = _counts(uncalibrated, examples)  # labels as the predictions
        assert counts.examples == one_by_one.examples and counts.missing == one_by_one.missing
        assert counts.values == one_by_one.values and counts.outside == one_by_one.outside
        assert {n: b.tolist() for n, b in counts.buckets.items()} == {
            n: b.tolist() for n, b in one_by_one.buckets.items()
        }
        assert counts.predictions == one_by_one.predictions
        assert counts.probability_sum == pytest.approx(one_by_one.probability_sum)


def test_a_prepared_dir_without_statistics_is_a_one_line_error(tmp_path):
    with pytest.raises(ValueError, match="run prepare"):
        load_monitor_reference(str(tmp_path), FLIGHTS)
