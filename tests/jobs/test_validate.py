"""skewless validate on real flights: a baseline prepared from Jan-Mar 2013, December held out,
drift injected into a copy of it one kind at a time; the comparison on hand-built statistics;
prepare --validate_against and train refusing anomalous data."""

from __future__ import annotations

import csv
import json
import math
import random
import shutil
import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from tensorflow_metadata.proto.v0 import schema_pb2, statistics_pb2

from skewless.beam_pipelines.runtime.launch import run_job
from skewless.beam_pipelines.validation.files import (
    read_schema,
    read_statistics,
    schema_path,
    write_schema,
)
from skewless.examples.weather import weather_path
from skewless.transforms.anomalies import (
    DEFAULT_DRIFT_THRESHOLD,
    find_anomalies,
    jensen_shannon_divergence,
    numeric_distributions,
)
from skewless.transforms.consistency import plain
from skewless.transforms.statistics import common_stats
from tests.support.flights_data import real_flights, write_jsonl

HELD_OUT = 12
SHIFTED_CARRIER = "UA"
WEATHER = "skewless.examples.weather:WEATHER"


def write_rows(path: Path, rows: list[dict]) -> Path:
    """Rows -> CSV with the rows' own columns (a renamed column stays renamed)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        for row in rows:
            writer.writerow({k: "" if v is None else v for k, v in row.items()})
    return path


def run_prepare(*argv: str) -> int:
    """`skewless prepare` in its own process (as a user runs it); its exit code."""
    done = subprocess.run([sys.executable, "-m", "skewless.beam_pipelines.jobs.prepare", *argv], capture_output=True, text=True, timeout=280)  # fmt: skip
    assert done.returncode in (0, 3), done.stderr[-3000:]
    return done.returncode


def month_rows(month: int) -> list[dict]:
    return [r for r in real_flights(month, 1, days=31) if r["month"] == month]


@pytest.fixture(scope="module")
def baseline(tmp_path_factory) -> Path:
    """prepare on the bundled year as a user runs it: the time split keeps November and
    December out of the train statistics (the baseline), the drift thresholds are calibrated
    on the ten train months, and month, day, hour are the feature set's calendar fields.

    Until issue 23 this was prepare on Jan-Mar with the month's drift comparator cleared by
    hand: the thresholds were the 0.1 default, which the finer drift measure no longer suits
    (December against three winter months drifts in `flight` by 0.115), and a three-month
    calibration is tighter than December's normal change."""
    out = tmp_path_factory.mktemp("baseline") / "prepared"
    run_prepare("--output_dir", str(out))
    return out


@pytest.fixture(scope="module")
def december() -> list[dict]:
    return month_rows(HELD_OUT)


def validate(
    tmp_path: Path, baseline: Path, *source: str, name: str = "out"
) -> tuple[int, list[dict], Path]:
    out = tmp_path / name
    code = run_job("validate", ["--baseline", str(baseline), *source, "--output_dir", str(out)])
    anomalies = (
        json.loads((out / "anomalies.json").read_text())
        if (out / "anomalies.json").exists()
        else None
    )
    return code, anomalies, out


def blocking(anomalies: list[dict]) -> list[tuple]:
    return sorted((a["question"], a["feature"], a["kind"]) for a in anomalies if a["blocking"])


def write_header(path: Path, columns) -> Path:
    """A CSV file with its header and no row."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(",".join(columns) + "\n")
    return path


def non_finite(rows: list[dict], column: str, inf_share: float, nan_share: float) -> list[dict]:
    """`column` infinite in the first `inf_share` of each hundred rows, NaN in the next
    `nan_share` (1.0, 0.0: every value infinite)."""
    out = []
    for i, r in enumerate(rows):
        slot = (i % 100) / 100
        value = math.inf if slot < inf_share else math.nan if slot < inf_share + nan_share else r[column]  # fmt: skip
        out.append({**r, column: value})
    return out


def share_of_non_finite(rows: list[dict], column: str, nan: bool = True) -> float:
    present = [r[column] for r in rows if r[column] is not None]
    return sum(math.isinf(v) or (nan and math.isnan(v)) for v in present) / len(present)


# --- real data, end to end ---------------------------------------------------------------------


@pytest.mark.timeout(300)
def test_a_clean_held_out_month_passes(baseline, december, tmp_path):
    code, anomalies, out = validate(
        tmp_path, baseline, "--input", str(write_rows(tmp_path / "dec.csv", december))
    )
    assert code == 0, anomalies
    assert blocking(anomalies) == []
    new = read_statistics(str(out / "statistics.pb")).datasets[0]
    assert new.num_examples == len(december)
    assert {f.name for f in new.features} == set(december[0])  # the raw columns, as read
    report = (out / "report.html").read_text()
    assert "No blocking anomaly" in report


def shifted(rows: list[dict], minutes: int, carrier: str = SHIFTED_CARRIER) -> list[dict]:
    """The rows with one carrier's departure and arrival delays `minutes` later."""
    out = [dict(r) for r in rows]
    for r in out:
        if r["carrier"] == carrier:
            for delay in ("dep_delay", "arr_delay"):
                if r[delay] is not None:
                    r[delay] += minutes
    return out


@pytest.mark.timeout(300)
def test_the_schema_edit_is_honoured(baseline, december, tmp_path):
    """The month with a carrier's delays shifted is refused with prepare's schema and passes
    with a copy whose dep_delay threshold a user raised. (Before issue 23: the month itself
    drifted with the inferred schema; month is now a calendar field, never compared.)"""
    path = write_rows(tmp_path / "shifted.csv", shifted(december, 30))
    code, anomalies, _ = validate(tmp_path, baseline, "--input", str(path), name="calibrated")
    assert code == 3
    assert blocking(anomalies) == [(1, "dep_delay", "distribution_drift")]
    edited = read_schema(schema_path(str(baseline)))
    dep_delay = next(f for f in edited.feature if f.name == "dep_delay")
    dep_delay.drift_comparator.jensen_shannon_divergence.threshold = 0.5
    write_schema(str(tmp_path / "edited.pbtxt"), edited)
    code, anomalies, out = validate(
        tmp_path, baseline, "--input", str(path), "--baseline_schema", str(tmp_path / "edited.pbtxt"),
        name="edited",
    )  # fmt: skip
    assert code == 0 and blocking(anomalies) == []
    assert "schema (edited; calibration gave" in (out / "report.html").read_text()


@pytest.mark.timeout(300)
def test_a_delay_shift_for_one_carrier_is_drift(baseline, december, tmp_path):
    rows = [dict(r) for r in december]
    for r in rows:
        if r["carrier"] == SHIFTED_CARRIER and r["dep_delay"] is not None:
            r["dep_delay"] += 30
    code, anomalies, out = validate(
        tmp_path, baseline, "--input", str(write_rows(tmp_path / "shifted.csv", rows))
    )
    assert code == 3
    assert blocking(anomalies) == [(1, "dep_delay", "distribution_drift")]
    (drift,) = [a for a in anomalies if a["feature"] == "dep_delay"]
    # The threshold prepare calibrated on the ten train months (below the 0.1 default).
    calibrated = json.loads((baseline / "statistics" / "drift_thresholds.json").read_text())
    assert drift["value"] > drift["threshold"] == calibrated["features"]["dep_delay"]["threshold"]
    assert drift["threshold"] < DEFAULT_DRIFT_THRESHOLD
    report = (out / "report.html").read_text()
    assert "<h3>dep_delay</h3><svg" in report and "exit code 3" in report


TRAINING_MONTHS = range(1, 11)  # prepare's time split: eval from 2013-11-01


@pytest.mark.timeout(300)
@pytest.mark.parametrize("month", TRAINING_MONTHS)
def test_each_training_month_alone_passes_and_real_drift_in_it_blocks(baseline, month, tmp_path):
    """Issue 23's acceptance: a month of the bundled training period, validated alone
    against prepare's baseline (its raw CSV lines as they are), exits 0; the same month with
    distance in km, or with a carrier's delays an hour later, exits 3 naming the feature.
    (Before: every month exited 3 on `month`, and summer months on dep_delay too.)"""
    from tests.support.flights_data import flights_csv_lines

    path = tmp_path / f"2013-{month:02d}.csv"
    flights_csv_lines(path, (month,))
    code, anomalies, out = validate(tmp_path, baseline, "--input", str(path), name="as_is")
    assert code == 0 and blocking(anomalies) == [], anomalies
    assert "calendar field: not compared for drift" in (out / "report.html").read_text()
    rows = month_rows(month)
    km = [{**r, "distance": round(r["distance"] * 1.609344, 1)} for r in rows]
    code, anomalies, _ = validate(tmp_path, baseline, "--input", str(write_rows(tmp_path / "km.csv", km)), name="km")  # fmt: skip
    assert code == 3 and blocking(anomalies) == [(1, "distance", "distribution_drift")]
    later = shifted(rows, 60)
    code, anomalies, _ = validate(tmp_path, baseline, "--input", str(write_rows(tmp_path / "late.csv", later)), name="late")  # fmt: skip
    assert code == 3 and blocking(anomalies) == [(1, "dep_delay", "distribution_drift")]
    (drift,) = [a for a in anomalies if a["feature"] == "dep_delay"]
    assert drift["value"] > 1.25 * drift["threshold"]  # clearly, not by a hair


@pytest.mark.timeout(300)
def test_a_renamed_column_is_missing_and_unexpected(baseline, december, tmp_path):
    rows = [
        {("departure_delay" if k == "dep_delay" else k): v for k, v in r.items()} for r in december
    ]
    code, anomalies, _ = validate(
        tmp_path, baseline, "--input", str(write_rows(tmp_path / "renamed.csv", rows))
    )
    assert code == 3
    found = sorted(
        (a["question"], a["feature"], a["kind"], a["blocking"])
        for a in anomalies
        if a["question"] in (2, 3)
    )
    assert found == [
        (2, "dep_delay", "missing_column", True),
        (3, "departure_delay", "unexpected_column", False),
    ]


@pytest.mark.timeout(300)
@pytest.mark.parametrize("share", [1.0, 0.1], ids=["every_row", "last_tenth"])
def test_an_int_column_turned_to_text_is_a_type_change(baseline, december, tmp_path, share):
    """Also when only the last rows change (Arrow then reads the whole file as text: the
    other columns get their types back)."""
    start = int(len(december) * (1 - share))
    rows = [
        {**r, "flight": f"F{r['flight']}" if i >= start else r["flight"]}
        for i, r in enumerate(december)
    ]
    code, anomalies, _ = validate(
        tmp_path, baseline, "--input", str(write_rows(tmp_path / "typed.csv", rows))
    )
    assert code == 3
    assert blocking(anomalies) == [(4, "flight", "type_change")]
    (change,) = [a for a in anomalies if a["question"] == 4]
    assert (change["value"], change["threshold"]) == ("STRING", "INT")


@pytest.mark.timeout(300)
def test_a_fifth_of_a_feature_missing_is_a_presence_anomaly(baseline, december, tmp_path):
    rng = random.Random(13)
    rows = [{**r, "dest": None if rng.random() < 0.2 else r["dest"]} for r in december]
    missing = sum(r["dest"] is None for r in rows) / len(rows)
    code, anomalies, _ = validate(
        tmp_path, baseline, "--input", str(write_rows(tmp_path / "holes.csv", rows))
    )
    assert code == 3
    assert blocking(anomalies) == [(5, "dest", "presence")]
    (presence,) = [a for a in anomalies if a["question"] == 5]
    assert (
        presence["value"] == pytest.approx(1 - missing, abs=1e-6) and presence["threshold"] == 1.0
    )


@pytest.mark.timeout(300)
def test_a_new_airport_code_in_five_percent_of_rows_is_an_unseen_category(
    baseline, december, tmp_path
):
    rows = [{**r, "origin": "XNA" if i % 20 == 0 else r["origin"]} for i, r in enumerate(december)]
    code, anomalies, _ = validate(
        tmp_path, baseline, "--input", str(write_rows(tmp_path / "new_code.csv", rows))
    )
    assert code == 3
    # 5 % of the values moved to a new code is also drift past origin's calibrated threshold
    # (about 0.04: its months differ by up to 0.026).
    assert blocking(anomalies) == [
        (1, "origin", "distribution_drift"),
        (1, "origin", "unseen_categories"),
    ]
    (unseen,) = [a for a in anomalies if a["kind"] == "unseen_categories"]
    assert unseen["value"] == pytest.approx(0.05, abs=0.001) and "'XNA'" in unseen["description"]


@pytest.mark.timeout(300)
def test_the_baseline_s_own_features_pass(baseline, tmp_path):
    """--prepared_dir reads features/ (every example column, the aggregates included)."""
    code, anomalies, out = validate(tmp_path, baseline, "--prepared_dir", str(baseline))
    assert code == 0 and blocking(anomalies) == []
    new = read_statistics(str(out / "statistics.pb")).datasets[0]
    assert {f.name for f in new.features} == {
        f.name for f in read_schema(schema_path(str(baseline))).feature
    }


@pytest.mark.timeout(120)
def test_exit_codes_of_errors(baseline, tmp_path):
    missing = run_job("validate", ["--baseline", str(tmp_path / "nope"), "--input", "x.csv", "--output_dir", str(tmp_path / "o")])  # fmt: skip
    assert missing == 2  # found before the run: a usage error
    both = run_job("validate", ["--baseline", str(baseline), "--input", "x.csv", "--prepared_dir", str(baseline), "--output_dir", str(tmp_path / "o")])  # fmt: skip
    assert both == 2
    broken = write_jsonl(tmp_path / "log" / "serving_log-1.jsonl", [], ["{not json"])
    assert run_job("validate", ["--baseline", str(baseline), "--serving_log", str(broken), "--output_dir", str(tmp_path / "o")]) == 1  # fmt: skip


# --- list features (question 6), through a serving log --------------------------------------------


@pytest.fixture(scope="module")
def weather_baseline(tmp_path_factory) -> Path:
    from skewless.beam_pipelines.io.files import _read_bytes, read_csv_table

    table, _ = read_csv_table(_read_bytes(weather_path()))
    rows = []
    for row in table.to_pylist():
        if row["month"] <= 2:
            row["time_hour"] = row["time_hour"].strftime("%Y-%m-%dT%H:%M:%SZ")
            rows.append(row)
    root = tmp_path_factory.mktemp("weather")
    out = root / "prepared"
    path = write_jsonl(root / "weather.jsonl", rows)
    run_prepare("--feature_set", WEATHER, "--input", str(path), "--output_dir", str(out), "--eval_fraction", "0.2")  # fmt: skip
    return out


def serving_log(path: Path, features: list[dict]) -> Path:
    records = [{"example_key": {}, "event_time": 0, "features": {k: plain(v) for k, v in f.items()}, "model_version": 1, "prediction": 0.5} for f in features]  # fmt: skip
    return write_jsonl(path, records)


@pytest.mark.timeout(300)
def test_a_list_feature_with_too_many_values_in_a_serving_log(weather_baseline, tmp_path):
    table = pq.read_table(weather_baseline / "features")
    lists = [f.name for f in table.schema if str(f.type).startswith("list")]
    schema = {f.name: f for f in read_schema(schema_path(str(weather_baseline))).feature}
    longest = {name: schema[name].value_count.max for name in lists}
    target = "origin_last_k_temp_1d"
    assert target in lists and longest[target] == 3  # k = 3
    rows = table.to_pylist()
    code, anomalies, _ = validate(tmp_path, weather_baseline, "--serving_log", str(serving_log(tmp_path / "clean" / "log.jsonl", rows)), name="clean")  # fmt: skip
    assert code == 0 and blocking(anomalies) == []
    for i, row in enumerate(rows):
        if i % 10 == 0:
            row[target] = row[target] * 4  # the same values, repeated: only the count changes
    code, anomalies, _ = validate(tmp_path, weather_baseline, "--serving_log", str(serving_log(tmp_path / "long" / "log.jsonl", rows)), name="long")  # fmt: skip
    assert code == 3
    assert blocking(anomalies) == [(6, target, "value_count")]
    (count,) = [a for a in anomalies if a["question"] == 6]
    assert (count["value"], count["threshold"]) == (12, 3)


# --- prepare --validate_against and train ---------------------------------------------------------


@pytest.mark.timeout(300)
def test_prepare_refuses_drifted_data_and_train_refuses_it(baseline, december, tmp_path):
    from skewless.beam_pipelines.commands import train

    rows = [dict(r) for r in december]
    for r in rows:
        if r["carrier"] == SHIFTED_CARRIER and r["dep_delay"] is not None:
            r["dep_delay"] += 30
    out = tmp_path / "prepared"
    argv = ["--input", str(write_rows(tmp_path / "shifted.csv", rows)), "--output_dir", str(out), "--validate_against", str(baseline)]  # fmt: skip
    assert run_prepare(*argv) == 3
    summary = json.loads((out / "summary.json").read_text())
    assert summary["validation"]["refused"] is True
    anomalies = json.loads((out / "validation" / "anomalies.json").read_text())
    assert summary["validation"]["blocking"] == [a for a in anomalies if a["blocking"]]
    # the examples: the delay and the mean delays aggregated from it
    assert (1, "dep_delay", "distribution_drift") in blocking(anomalies)
    assert {a["feature"] for a in anomalies if a["blocking"]} <= {
        "dep_delay",
        "origin_mean_dep_delay_1h",
        "carrier_mean_dep_delay_1h",
    }
    with pytest.raises(SystemExit) as exc:
        train.run(["--prepared_dir", str(out), "--model_dir", str(tmp_path / "models")])
    assert exc.value.code == 3
    assert not (tmp_path / "models").exists()


# --- the comparison on hand-built statistics -------------------------------------------------------


def numeric(name: str, values, kind=statistics_pb2.FeatureNameStatistics.FLOAT, missing: int = 0):
    """A numeric feature's statistics with a quantiles histogram of `values` (10 buckets)."""
    import numpy as np

    f = statistics_pb2.FeatureNameStatistics(name=name, type=kind)
    f.num_stats.common_stats.num_non_missing = len(values)
    f.num_stats.common_stats.num_missing = missing
    f.num_stats.common_stats.min_num_values = f.num_stats.common_stats.max_num_values = 1
    edges = np.quantile(values, np.linspace(0, 1, 11), method="inverted_cdf")
    h = f.num_stats.histograms.add(type=statistics_pb2.Histogram.QUANTILES)
    for lo, hi in zip(edges[:-1], edges[1:], strict=True):
        h.buckets.add(low_value=lo, high_value=hi, sample_count=len(values) / 10)
    return f


def strings(name: str, counts: dict[str, int]):
    f = statistics_pb2.FeatureNameStatistics(
        name=name, type=statistics_pb2.FeatureNameStatistics.STRING
    )
    s = f.string_stats
    s.common_stats.num_non_missing = s.common_stats.tot_num_values = sum(counts.values())
    s.common_stats.min_num_values = s.common_stats.max_num_values = 1
    s.unique = len(counts)
    for i, (v, c) in enumerate(sorted(counts.items(), key=lambda kv: -kv[1])):
        s.rank_histogram.buckets.add(low_rank=i, high_rank=i, label=v, sample_count=c)
    return f


def dataset(n: int, *features) -> statistics_pb2.DatasetFeatureStatistics:
    return statistics_pb2.DatasetFeatureStatistics(name="d", num_examples=n, features=features)


def schema_of(text: str) -> schema_pb2.Schema:
    from google.protobuf import text_format

    return text_format.Parse(text, schema_pb2.Schema())


def test_jensen_shannon_is_zero_for_the_same_and_one_for_disjoint_histograms():
    same = numeric_distributions(numeric("x", list(range(100))), numeric("x", list(range(100))))
    assert jensen_shannon_divergence(same[1], same[2]) == pytest.approx(0.0, abs=1e-12)
    apart = numeric_distributions(
        numeric("x", list(range(100))), numeric("x", list(range(1000, 1100)))
    )
    assert jensen_shannon_divergence(apart[1], apart[2]) == pytest.approx(1.0)
    edges, p, q = numeric_distributions(
        numeric("x", [0.0] * 50 + [1.0] * 50), numeric("x", [0.0] * 90 + [1.0] * 10)
    )
    assert list(edges) == [0.0, 1.0] and p.sum() == pytest.approx(1) and q.sum() == pytest.approx(1)
    assert p[0] < q[0]  # the point mass at 0 grew


def test_thresholds_come_from_the_schema_and_every_question_can_fire():
    schema = schema_of(
        """
        feature { name: "x" type: FLOAT presence { min_fraction: 1.0 }
                  value_count { min: 1 max: 1 } drift_comparator { jensen_shannon_divergence { threshold: 0.5 } } }
        feature { name: "c" type: BYTES domain: "c" presence { min_fraction: 0.5 }
                  drift_comparator { infinity_norm { threshold: 0.05 } } }
        feature { name: "n" type: INT }
        feature { name: "gone" type: INT }
        string_domain { name: "c" value: "a" value: "b" }
        """
    )
    base = dataset(
        100,
        numeric("x", list(range(100))),
        strings("c", {"a": 50, "b": 50}),
        numeric("n", list(range(100))),
    )
    shifted = [v + 30.0 for v in range(100)]
    new = dataset(
        100,
        numeric("x", shifted, missing=10),
        strings("c", {"a": 20, "b": 20, "z": 5}),
        strings("n", {"1": 100}),
        numeric("extra", [1.0]),
    )
    new.features[0].num_stats.common_stats.num_non_missing = 90
    new.features[0].num_stats.common_stats.max_num_values = 3
    found = {(a.question, a.feature, a.kind): a for a in find_anomalies(base, schema, new)}
    assert set(found) == {
        (2, "gone", "missing_column"),
        (3, "extra", "unexpected_column"),
        (4, "n", "type_change"),
        (5, "x", "presence"),
        (5, "c", "presence"),
        (6, "x", "value_count"),
        (1, "c", "unseen_categories"),
        (1, "c", "distribution_drift"),
    }
    # the JSD of a 30 % shift is under the schema's 0.5; the default 0.1 would flag it
    assert found[(5, "c", "presence")].value == pytest.approx(0.45)
    assert found[(1, "c", "unseen_categories")].value == pytest.approx(5 / 45, abs=1e-6)
    assert found[(1, "c", "distribution_drift")].threshold == pytest.approx(0.05)
    schema.feature[0].drift_comparator.jensen_shannon_divergence.threshold = 0.0  # unset: default
    found = {(a.question, a.feature, a.kind): a for a in find_anomalies(base, schema, new)}
    assert found[(1, "x", "distribution_drift")].threshold == DEFAULT_DRIFT_THRESHOLD
    assert not found[(3, "extra", "unexpected_column")].blocking


def test_ints_are_accepted_as_floats_and_a_small_unseen_share_does_not_block():
    schema = schema_of(
        """
        feature { name: "x" type: FLOAT }
        feature { name: "c" type: BYTES string_domain { value: "a" value: "b" } }
        feature { name: "d" type: BYTES string_domain { value: "a" } distribution_constraints { min_domain_mass: 1.0 } }
        """
    )
    base = dataset(1000, numeric("x", list(range(1000))))
    new = dataset(
        1000,
        numeric("x", list(range(1000)), kind=statistics_pb2.FeatureNameStatistics.INT),
        strings("c", {"a": 995, "new": 5}),
        strings("d", {"a": 999, "new": 1}),
    )
    found = find_anomalies(base, schema, new)
    assert [(a.feature, a.kind, a.blocking) for a in found] == [
        ("c", "unseen_categories", False),  # 0.5 % is within the default 1 %
        ("d", "unseen_categories", True),  # the schema tolerates none
    ]


def test_a_calendar_field_never_drifts_and_another_field_still_does(tmp_path):
    """month is one of FLIGHTS' calendar fields: a month of data has its own month. The same
    change in a field that is not declared one (and month, undeclared) is drift."""
    import dataclasses

    from skewless.beam_pipelines.validation.baseline import (
        FEATURES,
        Baseline,
        check_statistics,
        source_view,
    )
    from skewless.examples.flights import FLIGHTS

    int_ = statistics_pb2.FeatureNameStatistics.INT
    base = dataset(
        100, numeric("month", [1] * 50 + [2] * 50, int_), numeric("minute", list(range(100)))
    )
    new = dataset(
        100, numeric("month", [12] * 100, int_), numeric("minute", [v + 50 for v in range(100)])
    )
    schema = schema_of(
        """
        feature { name: "month" type: INT drift_comparator { jensen_shannon_divergence { threshold: 0.1 } } }
        feature { name: "minute" type: FLOAT drift_comparator { jensen_shannon_divergence { threshold: 0.1 } } }
        """
    )  # fmt: skip
    view, _, _ = source_view(schema, FLIGHTS, FEATURES)
    drifted = [(a.feature, a.kind) for a in find_anomalies(base, view, new) if a.blocking]
    assert drifted == [("minute", "distribution_drift")]
    undeclared = dataclasses.replace(FLIGHTS, calendar_fields=("year",))
    view, _, _ = source_view(schema, undeclared, FEATURES)
    drifted = [(a.feature, a.kind) for a in find_anomalies(base, view, new) if a.blocking]
    assert drifted == [("minute", "distribution_drift"), ("month", "distribution_drift")]
    # The report lists the compared feature with its threshold, and month as not compared.
    held = Baseline(str(tmp_path), base, schema, str(tmp_path / "schema.pbtxt"), {})
    _, report = check_statistics(new, held, FLIGHTS, FEATURES, "t")
    not_compared = "<td>month</td><td></td><td></td><td></td><td>calendar field: not compared"
    assert not_compared in report
    assert "<td>minute</td><td>Jensen-Shannon divergence</td>" in report


def test_expected_and_known_columns_limit_questions_2_and_3():
    schema = schema_of(
        'feature { name: "raw" type: INT } feature { name: "aggregate" type: FLOAT }'
    )
    new = dataset(
        10,
        numeric("raw", list(range(10)), kind=statistics_pb2.FeatureNameStatistics.INT),
        numeric("other_raw", [1.0]),
    )
    assert [a.kind for a in find_anomalies(dataset(0), schema, new)] == [
        "missing_column",
        "unexpected_column",
    ]
    found = find_anomalies(
        dataset(0),
        schema,
        new,
        expected_columns=["raw", "other_raw"],
        known_columns=["raw", "other_raw"],
    )
    assert found == []


# --- BigQuery (the Storage Read API emulator) ---------------------------------------------------


@pytest.mark.emulator
@pytest.mark.timeout(300)
def test_a_bigquery_table_is_validated_as_read(baseline, december, bq_emulator, tmp_path):
    """No schema check against the feature set first: a renamed column is an anomaly, not an
    error before the run."""
    from tests.support.flights_data import flights_arrow_table as flights_table

    week = [r for r in december if r["day"] <= 7]  # the emulator streams messages under 4 MB
    dataset = bq_emulator.create_dataset()
    clean = bq_emulator.create_table(dataset, "december", flights_table(week))
    code, anomalies, _ = validate(tmp_path, baseline, "--bigquery_table", clean, *bq_emulator.args(), name="clean")  # fmt: skip
    # BigQuery's types are the files' (no question 2-6 anomaly); a week of the baseline's kind
    # differs in `day` only, a calendar field (not compared for drift): it passes
    assert [a for a in anomalies if a["question"] > 1] == []
    assert blocking(anomalies) == [] and code == 0
    renamed = flights_table(week).rename_columns(
        ["departure_delay" if n == "dep_delay" else n for n in flights_table(week[:1]).column_names]
    )
    table = bq_emulator.create_table(dataset, "renamed", renamed)
    code, anomalies, _ = validate(tmp_path, baseline, "--bigquery_table", table, *bq_emulator.args(), name="renamed")  # fmt: skip
    assert code == 3
    assert {(a["question"], a["feature"]) for a in anomalies if a["question"] in (2, 3)} == {(2, "dep_delay"), (3, "departure_delay")}  # fmt: skip


# --- in process or as a Beam job -----------------------------------------------------------------


def test_local_files_on_the_local_default_run_in_process_and_nothing_else_does(tmp_path):
    from skewless.beam_pipelines.runtime.launch import job_module

    local = ["--baseline", "b", "--output_dir", "o"]
    assert (
        job_module("validate", [*local, "--input", "new/*.csv"]) == "skewless.beam_pipelines.validation.in_process"
    )
    assert job_module("validate", [*local, "--prepared_dir", "p", "--feature_set", "flights"]) == "skewless.beam_pipelines.validation.in_process"  # fmt: skip
    assert job_module("validate", [*local, "--input=x.csv", "--input_format=csv"]) == "skewless.beam_pipelines.validation.in_process"  # fmt: skip
    for beam_run in (
        [*local, "--input", "x.csv", "--runner", "FnApiRunner"],
        [*local, "--input", "x.csv", "--runner=DataflowRunner"],
        ["--baseline", "b", "--output_dir", "gs://bucket/o", "--input", "x.csv"],
        ["--baseline", "gs://bucket/b", "--output_dir", "o", "--input", "x.csv"],
        [*local, "--input", "gs://bucket/x.csv"],
        [*local, "--serving_log", "log/"],
        [*local, "--bigquery_table", "p.d.t"],
        [*local, "--input", "x.csv", "--prepared_dir", "p"],
        [*local, "--input", "x.csv", "--input_format", "xml"],
        [*local, "--input", "x.csv", "--dry_run"],
        [*local, "--input", "x.csv", "--help"],
        [*local, "--inp", "x.csv"],
        ["--output_dir", "o", "--input", "x.csv"],
    ):
        assert job_module("validate", beam_run) == "skewless.beam_pipelines.jobs.validate", beam_run


@pytest.mark.timeout(300)
def test_the_in_process_run_loads_neither_beam_nor_tensorflow(baseline, december, tmp_path):
    """What makes a month fast (bench/validate.py): Beam alone takes about 2 s to load."""
    path = write_rows(tmp_path / "dec.csv", december)
    argv = ["--baseline", str(baseline), "--input", str(path), "--output_dir", str(tmp_path / "o")]
    script = (
        "import sys; from skewless.beam_pipelines.runtime.launch import run_job; "
        f"code = run_job('validate', {argv!r}); "
        "print(code, sorted({m.split('.')[0] for m in sys.modules} & {'apache_beam', 'tensorflow', 'tensorflow_transform'}))"  # fmt: skip
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=280)  # fmt: skip
    assert done.stdout.split("\n")[-2] == "0 []", done.stdout + done.stderr[-2000:]


@pytest.mark.timeout(300)
def test_the_beam_job_finds_what_the_in_process_run_finds(baseline, december, tmp_path):
    """The same data with --runner (the Beam job, as on Dataflow): the same anomalies with the
    same values, the same exit code, the same counts (sketch read-offs may differ in ties)."""
    rows = [
        {("departure_time" if k == "dep_time" else k): v for k, v in r.items()} for r in december
    ]
    for i, r in enumerate(rows):
        if r["carrier"] == SHIFTED_CARRIER and r["dep_delay"] is not None:
            r["dep_delay"] += 30
        if i % 5 == 0:
            r["dest"] = None
    path = str(write_rows(tmp_path / "drifted.csv", rows))
    here = validate(tmp_path, baseline, "--input", path, name="here")
    beam = validate(tmp_path, baseline, "--input", path, "--runner", "FnApiRunner", name="beam")
    assert here[0] == beam[0] == 3
    assert (
        blocking(here[1])
        == blocking(beam[1])
        == [
            (1, "dep_delay", "distribution_drift"),
            (2, "dep_time", "missing_column"),
            (5, "dest", "presence"),
        ]
    )
    close = [
        {**a, "value": pytest.approx(a["value"], rel=1e-6)} if isinstance(a["value"], float) else a
        for a in here[1]
    ]
    assert close == beam[1]
    stats = [read_statistics(str(out / "statistics.pb")).datasets[0] for _, _, out in (here, beam)]
    counts = [
        {f.name: (f.type, common_stats(f).num_non_missing) for f in s.features} for s in stats
    ]
    assert stats[0].num_examples == stats[1].num_examples == len(rows)
    assert counts[0] == counts[1]


# --- issue 20: what the data can hold that is not drift -------------------------------------------


@pytest.mark.timeout(300)
@pytest.mark.parametrize(
    "inf_share, nan_share", [(1.0, 0.0), (0.0, 1.0), (0.1, 0.1)], ids=["all_inf", "all_nan", "tenth_each"]
)  # fmt: skip
def test_non_finite_values_the_baseline_did_not_have_block(
    baseline, december, tmp_path, inf_share, nan_share
):
    """The baseline's schema disallows NaN and infinities for its float features (it had none);
    the anomaly gives the share measured and the schema's tolerance (none)."""
    rows = non_finite(december, "dep_delay", inf_share, nan_share)
    code, anomalies, _ = validate(
        tmp_path, baseline, "--input", str(write_rows(tmp_path / "odd.csv", rows))
    )
    assert code == 3
    (odd,) = [a for a in anomalies if a["kind"] == "non_finite_values"]
    assert (odd["question"], odd["feature"], odd["blocking"]) == (1, "dep_delay", True)
    assert odd["value"] == pytest.approx(share_of_non_finite(rows, "dep_delay"), abs=1e-6)
    assert odd["threshold"] == 0.0 and "float_domain" in odd["description"]
    if inf_share:
        assert "inf" in odd["description"]
    if nan_share:
        assert "NaN" in odd["description"]
    if inf_share + nan_share == 1.0:  # no finite value: nothing to compare for drift
        assert blocking(anomalies) == [(1, "dep_delay", "non_finite_values")]


@pytest.mark.timeout(300)
def test_the_finite_values_beside_non_finite_ones_are_checked_for_drift(
    baseline, december, tmp_path
):
    """A delay shift in the finite values is found with NaN and infinities around it, as large
    as without them (the same finite values, the other cells empty)."""
    shifted = [dict(r) for r in december]
    for r in shifted:
        if r["carrier"] == SHIFTED_CARRIER and r["dep_delay"] is not None:
            r["dep_delay"] += 30
    odd = non_finite(shifted, "dep_delay", 0.1, 0.1)
    empty = [{**r, "dep_delay": r["dep_delay"] if math.isfinite(r["dep_delay"] or 0) else None} for r in odd]  # fmt: skip
    code, anomalies, _ = validate(tmp_path, baseline, "--input", str(write_rows(tmp_path / "odd.csv", odd)), name="odd")  # fmt: skip
    assert code == 3
    assert blocking(anomalies) == [
        (1, "dep_delay", "distribution_drift"),
        (1, "dep_delay", "non_finite_values"),
    ]
    _, without, _ = validate(tmp_path, baseline, "--input", str(write_rows(tmp_path / "empty.csv", empty)), name="empty")  # fmt: skip
    (drift,) = [a for a in anomalies if a["kind"] == "distribution_drift"]
    (same,) = [a for a in without if a["kind"] == "distribution_drift"]
    assert drift["value"] == pytest.approx(same["value"], rel=1e-9)
    assert drift["value"] > drift["threshold"]


@pytest.mark.timeout(300)
def test_the_schema_s_tolerance_for_non_finite_values_is_honoured(baseline, december, tmp_path):
    """`distribution_constraints.min_domain_mass` tolerates a share (reported, not blocking);
    without `disallow_nan`, NaN are not counted."""
    rows = non_finite(december, "dep_delay", 0.01, 0.01)
    path = write_rows(tmp_path / "odd.csv", rows)
    schema = read_schema(schema_path(str(baseline)))
    (dep_delay,) = [f for f in schema.feature if f.name == "dep_delay"]
    dep_delay.distribution_constraints.min_domain_mass = 0.95
    write_schema(str(tmp_path / "tolerant.pbtxt"), schema)
    code, anomalies, _ = validate(tmp_path, baseline, "--input", str(path), "--baseline_schema", str(tmp_path / "tolerant.pbtxt"), name="tolerant")  # fmt: skip
    (odd,) = [a for a in anomalies if a["kind"] == "non_finite_values"]
    assert odd["blocking"] is False and odd["threshold"] == pytest.approx(0.05)
    assert odd["value"] == pytest.approx(share_of_non_finite(rows, "dep_delay"), abs=1e-6)
    assert (1, "dep_delay", "non_finite_values") not in blocking(anomalies)
    dep_delay.ClearField("distribution_constraints")
    dep_delay.float_domain.disallow_nan = False
    write_schema(str(tmp_path / "nan_ok.pbtxt"), schema)
    code, anomalies, _ = validate(tmp_path, baseline, "--input", str(path), "--baseline_schema", str(tmp_path / "nan_ok.pbtxt"), name="nan_ok")  # fmt: skip
    (odd,) = [a for a in anomalies if a["kind"] == "non_finite_values"]
    assert code == 3 and odd["blocking"] and "NaN" not in odd["description"]
    assert odd["value"] == pytest.approx(share_of_non_finite(rows, "dep_delay", nan=False), abs=1e-6)  # fmt: skip


@pytest.mark.timeout(300)
@pytest.mark.parametrize("fmt", ["csv", "parquet"])
def test_a_file_without_rows_is_one_no_examples_anomaly_not_missing_columns(
    baseline, december, tmp_path, fmt
):
    path = write_header(tmp_path / "header.csv", december[0])
    if fmt == "parquet":
        from skewless.beam_pipelines.io.files import read_csv_table

        pq.write_table(read_csv_table(path.read_bytes())[0], tmp_path / "empty.parquet")
        path = tmp_path / "empty.parquet"
    code, anomalies, out = validate(tmp_path, baseline, "--input", str(path))
    assert code == 3
    assert [(a["question"], a["feature"], a["kind"], a["blocking"]) for a in anomalies] == [
        (5, "", "no_examples", True)
    ]
    new = read_statistics(str(out / "statistics.pb")).datasets[0]
    assert new.num_examples == 0 and {f.name for f in new.features} == set(december[0])


@pytest.mark.timeout(300)
def test_a_header_only_file_beside_others_changes_nothing(baseline, december, tmp_path):
    write_rows(tmp_path / "in" / "dec.csv", december)
    write_header(tmp_path / "in" / "empty.csv", december[0])
    code, anomalies, out = validate(tmp_path, baseline, "--input", str(tmp_path / "in" / "*.csv"))
    assert code == 0 and blocking(anomalies) == []
    assert read_statistics(str(out / "statistics.pb")).datasets[0].num_examples == len(december)


@pytest.mark.timeout(300)
@pytest.mark.parametrize(
    "column, kinds",
    [("dep_delay", ["presence_count"]), ("dest", ["presence", "presence_count"])],
    ids=["nullable", "required"],
)
def test_an_all_empty_column_is_a_presence_anomaly_not_a_type_change(
    baseline, december, tmp_path, column, kinds
):
    """Every cell empty: Arrow reads the column as type null, which has no type to compare. A
    raw field the feature set declares nullable may be missing in any fraction of the records,
    but not in all of them (the schema's presence.min_count)."""
    rows = [{**r, column: None} for r in december]
    code, anomalies, _ = validate(
        tmp_path, baseline, "--input", str(write_rows(tmp_path / "empty.csv", rows))
    )
    assert code == 3
    assert blocking(anomalies) == [(5, column, kind) for kind in kinds]
    assert not [a for a in anomalies if a["question"] == 4]


def corrupt_copy(baseline: Path, root: Path, damage) -> Path:
    """A copy of the baseline's statistics, schema and summary, `damage(copy)` applied."""
    copy = root / "corrupt"
    for part in ("statistics", "schema"):
        shutil.copytree(baseline / part, copy / part)
    shutil.copy(baseline / "summary.json", copy / "summary.json")
    damage(copy)
    return copy


def truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


@pytest.mark.timeout(300)
@pytest.mark.parametrize("runner", [[], ["--runner", "FnApiRunner"]], ids=["in_process", "beam"])
@pytest.mark.parametrize(
    "damage, file, message",
    [
        (lambda d: truncate(d / "statistics" / "statistics.pb"), "statistics/statistics.pb", "is not a DatasetFeatureStatisticsList: Error parsing message"),
        (lambda d: (d / "schema" / "schema.pbtxt").write_bytes(b"\x00\xff garbage {"), "schema/schema.pbtxt", "is not a text Schema proto"),
        (lambda d: (d / "schema" / "schema.pbtxt").write_text(""), "schema/schema.pbtxt", "describes no feature"),
    ],
    ids=["statistics", "schema", "empty_schema"],
)  # fmt: skip
def test_a_corrupt_baseline_is_a_one_line_error_naming_the_file_before_the_run(
    baseline, december, tmp_path, capsys, damage, file, message, runner
):
    broken = corrupt_copy(baseline, tmp_path, damage)
    path = write_rows(tmp_path / "dec.csv", december[:100])
    out = tmp_path / "out"
    code = run_job("validate", ["--baseline", str(broken), "--input", str(path), "--output_dir", str(out), *runner])  # fmt: skip
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert code == 2, err
    assert err.startswith("skewless validate: ") and str(broken / file) in err and message in err
    assert not out.exists()


@pytest.mark.timeout(300)
def test_a_column_numeric_in_one_file_and_text_in_another_is_a_type_anomaly(
    baseline, december, tmp_path
):
    half = len(december) // 2
    write_rows(tmp_path / "in" / "a.csv", december[:half])
    text = write_rows(tmp_path / "in" / "b.csv", [{**r, "flight": f"F{r['flight']}"} for r in december[half:]])  # fmt: skip
    code, anomalies, out = validate(tmp_path, baseline, "--input", str(tmp_path / "in" / "*.csv"))
    assert code == 3
    assert blocking(anomalies) == [(4, "flight", "mixed_types")]
    (mixed,) = [a for a in anomalies if a["question"] == 4]
    assert (mixed["value"], mixed["threshold"]) == ("INT, STRING", "INT")
    assert f"INT in {tmp_path / 'in' / 'a.csv'}; STRING in {text}" in mixed["description"]
    assert f"INT ({half:,} values) and as STRING ({len(december) - half:,} values)" in mixed["description"]  # fmt: skip
    (flight,) = [f for f in read_statistics(str(out / "statistics.pb")).datasets[0].features if f.name == "flight"]  # fmt: skip
    assert common_stats(flight).num_non_missing == len(december)


def issue_20_inputs(root: Path, december: list[dict]) -> str:
    """Three files of December: `flight` as text in the second, `distance` a tenth infinite
    and a tenth NaN in the first, `dep_delay` empty everywhere, and a file with its header only."""
    rows = [{**r, "dep_delay": None} for r in december]
    half = len(rows) // 2
    write_rows(root / "a.csv", non_finite(rows[:half], "distance", 0.1, 0.1))
    write_rows(root / "b.csv", [{**r, "flight": f"F{r['flight']}"} for r in rows[half:]])
    write_header(root / "c.csv", rows[0])
    return str(root / "*.csv")


@pytest.mark.timeout(300)
@pytest.mark.parametrize("data", ["issue_20", "header_only"])
def test_the_beam_job_finds_the_same_odd_data_as_the_in_process_run(
    baseline, december, tmp_path, data
):
    if data == "issue_20":
        pattern = issue_20_inputs(tmp_path / "in", december)
        expected = [
            (1, "distance", "non_finite_values"),
            (4, "flight", "mixed_types"),
            (5, "dep_delay", "presence_count"),
        ]
    else:
        pattern = str(write_header(tmp_path / "in" / "header.csv", december[0]))
        expected = [(5, "", "no_examples")]
    here = validate(tmp_path, baseline, "--input", pattern, name="here")
    beam = validate(tmp_path, baseline, "--input", pattern, "--runner", "FnApiRunner", name="beam")
    assert here[0] == beam[0] == 3
    assert [b for b in blocking(here[1]) if b[2] != "distribution_drift"] == expected
    close = [
        {**a, "value": pytest.approx(a["value"], rel=1e-6)} if isinstance(a["value"], float) else a
        for a in here[1]
    ]
    assert close == beam[1]
