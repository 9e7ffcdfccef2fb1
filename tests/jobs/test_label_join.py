"""`skewless label-join`: the serving log joined with labels that arrive later, against an
independent brute force (plain Python) on real flights, and the output trained on.

The serving log is built with the scorer's own record function (`serving_log_record`) from
prepare's features of two real days (Jan 1-2, 2013): the streaming scorer on the emulators
would take minutes more and log the same records (tests/jobs/test_audit.py holds the scorer's
records equal to the batch path's). The labels come from the same flights' raw events (each
label arrives at the flight's arrival: departure + air time) and from a label file with the
edge cases: a label exactly at the window's end, one just past it, two labels for one
example, a prediction never labelled, a label for an example never served, a bad label row.
"""

from __future__ import annotations

import datetime as dt
import json
import os
from collections import Counter

import pyarrow.parquet as pq
import pytest

from skewless.beam_pipelines.jobs import label_join, prepare
from skewless.beam_pipelines.runtime.launch import run_job
from skewless.examples.flights import FLIGHTS
from skewless.transforms.consistency import example_key, plain, serving_log_record
from skewless.transforms.example_schema import example_columns
from skewless.transforms.label_join import join_key, label_window_ms
from skewless.transforms.split import HASH_BUCKETS, key_bucket
from tests.support.flights_data import real_flights, write_csv, write_jsonl
from tests.support.pipelines import typed_events

WINDOW = "3h"
WINDOW_MS = 3 * 3600 * 1000
VERSION = 3
NAMES = [c.name for c in example_columns(FLIGHTS)]


# --- the rules (fast) ------------------------------------------------------------------------


def _record(t=1_000_000, version=VERSION, prediction=0.5) -> dict:
    features = {name: 0 for name in NAMES}
    features.update(carrier="UA", origin="EWR", dest="IAH", event_time=t, label=None)
    record = serving_log_record(FLIGHTS, features, prediction, version)
    return record


def test_the_window_end_is_included_and_the_latest_on_time_label_wins():
    served = [_record(t=1_000)]
    example, counts = join_key(FLIGHTS, served, [(1_000 + 60_000, 1)], 60_000)
    assert example["label"] == 1 and counts["examples_labelled"] == 1  # exactly at the end
    example, counts = join_key(FLIGHTS, served, [(1_000 + 60_001, 1)], 60_000)
    assert example is None and counts == Counter(
        examples_served=1, labels_late=1, examples_labelled_late=1
    )
    two = [(2_000, 0), (50_000, 1), (70_000, 0)]  # the third is late
    example, counts = join_key(FLIGHTS, served, two, 60_000)
    assert example["label"] == 1
    assert (counts["labels_duplicate"], counts["labels_late"]) == (1, 1)
    example, counts = join_key(FLIGHTS, served, [(5_000, 0), (5_000, 1)], 60_000)
    assert example["label"] == 1  # equal arrivals: the greatest value, every run
    example, counts = join_key(FLIGHTS, served, [], 60_000)
    assert example is None and counts["examples_not_yet_labelled"] == 1
    example, counts = join_key(FLIGHTS, [], [(1, 0), (2, 1)], 60_000)
    assert example is None and counts == Counter(labels_without_prediction=2)
    twice = [_record(version=4, prediction=0.1), _record(version=3, prediction=0.9)]
    example, counts = join_key(FLIGHTS, twice, [(1, 0)], 60_000)
    assert (example["model_version"], example["prediction"]) == (3, 0.9)
    assert counts["serving_log_duplicates"] == 1


def test_label_window_values():
    assert label_window_ms("6h") == 6 * 3600 * 1000
    assert label_window_ms("90") == 90_000
    for bad in ("", "0", "6 hours", "-1h", None):
        with pytest.raises(ValueError, match="--label_window"):
            label_window_ms(bad)


def test_the_flights_label_arrives_at_departure_plus_air_time_and_label_time_is_checked():
    import dataclasses

    from skewless.transforms.featureset import FeatureSetError

    (event,) = typed_events(FLIGHTS, real_flights(month=1, day=1)[:1])
    assert event["air_time"] > 0 and event["label"] is not None
    assert FLIGHTS.label_time(event) == event["event_time"] + round(event["air_time"] * 60_000)
    assert FLIGHTS.label_time({**event, "label": None}) is None  # diverted: never labelled
    with pytest.raises(FeatureSetError, match="label_time must be a function"):
        dataclasses.replace(FLIGHTS, label_time="arrival")


@pytest.mark.timeout(120)
def test_bad_log_records_and_served_values_of_the_wrong_type_are_dead_letters():
    import apache_beam as beam
    from apache_beam.testing.test_pipeline import TestPipeline
    from apache_beam.testing.util import assert_that, equal_to

    from skewless.transforms.label_join import served_example
    from skewless.transforms.record_checks import DEAD

    good = served_example(FLIGHTS, _record(t=5), 1)
    wrong = {**good, "flight": "not a number"}
    no_time = {k: v for k, v in _record().items() if k != "event_time"}
    with TestPipeline(runner="FnApiRunner") as p:
        keyed = (
            p
            | "Log" >> beam.Create([_record(t=7), no_time, "[1, 2]"])
            | "Key" >> beam.ParDo(label_join._KeyServed(FLIGHTS)).with_outputs(DEAD, main="served")
        )
        batches = (
            p
            | "Examples" >> beam.Create([[good, wrong, good]])
            | "Batches"
            >> beam.ParDo(label_join._ToRecordBatches(FLIGHTS)).with_outputs(DEAD, main="batches")
        )
        assert_that(keyed.served | beam.Map(lambda kv: kv[1]["event_time"]), equal_to([7]))
        assert_that(
            keyed[DEAD] | "Reasons" >> beam.Map(lambda d: (d["stage"], d["reason"][:30])),
            equal_to([
                ("serving_log", "serving log record has no inte"),
                ("serving_log", "a serving log line is a str, e"),
            ]),
            label="LogDead",
        )  # fmt: skip
        assert_that(batches.batches | beam.Map(lambda b: b.num_rows), equal_to([2]), label="Rows")
        assert_that(
            batches[DEAD] | "Flights" >> beam.Map(lambda d: d["record"]["flight"]),
            equal_to(["not a number"]),
            label="TypeDead",
        )


# --- the job on real flights -------------------------------------------------------------------


def _key(record_or_example) -> tuple:
    return example_key(FLIGHTS, record_or_example)


def _prediction(key: tuple) -> float:
    return round(key_bucket(key) / HASH_BUCKETS, 6)


def _arrival(event: dict) -> int | None:
    """The bundled flights' rule, written again here: actual departure + air time."""
    if event["label"] is None or event["air_time"] is None:
        return None
    return event["event_time"] + round(event["air_time"] * 60_000)


def brute_force(records: list[dict], labels: list[tuple[tuple, int, int]], window_ms: int):
    """(examples by key, counts) of the label join, in plain Python from the rules as written
    in the docs (docs/jobs/label-join.md)."""
    by_key: dict = {}
    for record in records:
        by_key.setdefault(_key(record["example_key"]), []).append(record)
    label_keys: dict = {}
    for key, arrival, value in labels:
        label_keys.setdefault(key, []).append((arrival, value))
    counts = Counter()
    examples = {}
    for key, arrived in label_keys.items():
        if key not in by_key:
            counts["labels_without_prediction"] += len(arrived)
    for key, served in by_key.items():
        counts["examples_served"] += 1
        record = sorted(served, key=lambda r: (r["model_version"], r["prediction"]))[0]
        end = record["event_time"] + window_ms
        arrived = label_keys.get(key, [])
        good = [a for a in arrived if a[0] <= end]
        counts["labels_late"] += len(arrived) - len(good)
        if not arrived:
            counts["examples_not_yet_labelled"] += 1
        elif not good:
            counts["examples_labelled_late"] += 1
        else:
            best = sorted(good, key=lambda a: (a[0], repr(a[1])))[-1]
            counts["labels_duplicate"] += len(good) - 1
            counts["examples_labelled"] += 1
            examples[key] = {
                **record["features"],
                "label": best[1],
                "prediction": record["prediction"],
                "model_version": record["model_version"],
            }
    return examples, counts


def _output(out_dir) -> dict:
    rows = pq.read_table(os.path.join(out_dir, "features")).to_pylist()
    return {_key(row): {k: plain(v) for k, v in row.items()} for row in rows}


@pytest.fixture(scope="module")
def served(tmp_path_factory) -> dict:
    """Two real days prepared; the serving log of 90% of their examples (by key hash), in two
    files; the raw flights CSV."""
    root = tmp_path_factory.mktemp("label_join")
    rows = real_flights(month=1, day=1, days=2)
    csv_path = write_csv(root / "flights.csv", rows)
    prepared = root / "prepared"
    prepare.run(
        ["--input", str(csv_path), "--output_dir", str(prepared), "--eval_fraction", "0.2",
         "--drift_span", "none"]
    )  # fmt: skip
    examples = pq.read_table(prepared / "features").to_pylist()
    records = [
        serving_log_record(FLIGHTS, {**e, "label": None}, _prediction(_key(e)), VERSION)
        for e in examples
        if key_bucket(_key(e)) < 0.9 * HASH_BUCKETS
    ]
    records.sort(key=lambda r: r["event_time"])
    log = root / "log"
    half = len(records) // 2
    write_jsonl(log / "serving_log-a.jsonl", records[:half])
    write_jsonl(log / "serving_log-b.jsonl", records[half:])
    # The labels of the flights scheduled before 22:00 UTC on Jan 2: the later ones have not
    # landed when the join runs (their predictions are not yet labelled).
    landed = [r for r in rows if r["time_hour"] < "2013-01-02T22:00:00Z"]
    assert 100 < len(rows) - len(landed) < 400
    labels_csv = write_csv(root / "landed.csv", landed)
    return {"root": root, "rows": rows, "landed": landed, "labels_csv": labels_csv,
            "examples": examples, "records": records, "log": log}  # fmt: skip


@pytest.fixture(scope="module")
def from_events(served) -> dict:
    """label-join with the raw flights' own labels (arriving at the arrival), window 3h."""
    out = served["root"] / "joined_events"
    summary = label_join.run(
        [f"--serving_log={served['log']}", f"--input={served['labels_csv']}",
         f"--label_window={WINDOW}",
         f"--output_dir={out}", "--eval_fraction=0.2", "--drift_span=none"]
    )  # fmt: skip
    return {"out": out, "summary": summary}


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_labels_from_the_raw_flights_join_as_the_brute_force_does(served, from_events):
    events = typed_events(FLIGHTS, served["landed"])
    labels = [(_key(e), _arrival(e), e["label"]) for e in events if _arrival(e) is not None]
    expected, counts = brute_force(served["records"], labels, WINDOW_MS)
    got = _output(from_events["out"])
    assert got == expected
    summary = from_events["summary"]
    for name, count in counts.items():
        assert summary[name] == count, name
    # A real mix: most labelled, long flights late, the last ones not yet labelled, the labels
    # of examples the log left out without prediction.
    assert counts["examples_labelled"] > 800  # 3h: 30% of the flights are in the air longer
    assert counts["labels_late"] > 20 and counts["examples_not_yet_labelled"] > 20
    assert counts["labels_without_prediction"] > 50
    assert (
        summary["examples_served"] == len(served["records"]) == summary["serving_log_records_read"]
    )
    assert summary["labels_read"] == len(labels)
    assert summary["examples"] == summary["examples_joined"] == len(expected)
    assert summary["examples_train"] + summary["examples_eval"] == len(expected)
    assert summary["examples_eval"] > 0
    # The served features are prepare's, event by event (the log was made from them).
    prepared = {_key(e): e for e in served["examples"]}
    for key, row in got.items():
        assert {n: row[n] for n in NAMES if n != "label"} == {
            n: plain(prepared[key][n]) for n in NAMES if n != "label"
        }
        assert row["label"] == prepared[key]["label"]  # the same label prepare derived


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_the_output_has_prepares_layout_and_trains(served, from_events, tmp_path):
    from skewless.beam_pipelines.commands import train

    out = from_events["out"]
    for part in ("features", "train", "eval", "transform", "statistics", "schema"):
        assert os.listdir(out / part), part
    assert not (out / "tmp").exists()
    prepared_schema = (served["root"] / "prepared" / "schema" / "schema.pbtxt").read_text()
    joined_schema = (out / "schema" / "schema.pbtxt").read_text()
    features = lambda text: sorted(  # noqa: E731
        line.split('"')[1] for line in text.splitlines() if line.strip().startswith("name:")
    )
    assert features(joined_schema) == features(prepared_schema)  # no extra columns there
    result = train.run(
        ["--prepared_dir", str(out), "--model_dir", str(tmp_path / "models"), "--epochs", "4",
         "--batch_size", "64", "--seed", "7"]
    )  # fmt: skip
    assert result["version"] == 1 and os.path.isdir(result["path"])
    model = json.loads(open(os.path.join(result["path"], "model.json")).read())
    assert model["prepared_dir"] == os.path.abspath(out)
    assert 0.5 < result["model"]["auc"] <= 1.0, result["model"]


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_served_examples_first_and_prepares_elsewhere_give_prepares_examples(
    served, from_events, tmp_path
):
    """Log-based bootstrap (prepare --examples, as retrain --examples reads): the label-joined
    examples where they exist, prepare's for the rest; here the same examples, since what was
    served is what prepare computes."""
    prepared, joined = served["root"] / "prepared", from_events["out"]
    summary = prepare.run(
        ["--examples", f"{joined},{prepared}", "--output_dir", str(tmp_path / "both"),
         "--eval_fraction", "0.2", "--drift_span", "none"]
    )  # fmt: skip
    labelled = from_events["summary"]["examples"]
    assert summary["examples_read"] == labelled + len(served["examples"])
    assert summary["examples_superseded"] == labelled > 800
    assert summary["examples_superseded_differing"] == 0
    assert summary["examples"] == len(served["examples"])
    assert _output(tmp_path / "both") == _output(prepared)


def _at(ms: int) -> str:
    return dt.datetime.fromtimestamp(ms / 1000, dt.UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")[:-4] + "Z"


@pytest.fixture(scope="module")
def edge_cases(served) -> dict:
    """Labels of every logged example an hour after serving, but: one exactly at the window's
    end, one 10 ms past it, two for one example (both on time), none for one example, one for
    an example never served."""
    records = served["records"]
    picks = {"at_end": records[10], "past_end": records[20], "twice": records[30],
             "never": records[40]}  # fmt: skip
    rows, labels = [], []

    def label(key, arrival, value):
        carrier, flight, origin, scheduled = key
        rows.append({"carrier": carrier, "flight": flight, "origin": origin,
                     "scheduled_departure": scheduled, "label": value, "label_time": arrival})  # fmt: skip
        labels.append((key, arrival, value))

    for record in records:
        if record is picks["never"]:
            continue
        key, served_at = _key(record["example_key"]), record["event_time"]
        if record is picks["at_end"]:
            label(key, served_at + WINDOW_MS, 1)
        elif record is picks["past_end"]:
            label(key, served_at + WINDOW_MS + 10, 1)
        elif record is picks["twice"]:
            label(key, served_at + 3_600_000, 1)
            label(key, served_at + 7_200_000, 0)  # the latest on time: kept
        else:
            label(key, served_at + 3_600_000, key_bucket(key) % 2)
    label(("ZZ", 1, "JFK", records[0]["event_time"]), records[0]["event_time"], 1)  # not served
    expected, counts = brute_force(records, labels, WINDOW_MS)
    return {"rows": rows, "labels": labels, "picks": picks, "expected": expected,
            "counts": counts}  # fmt: skip


def _check_edge_cases(edge_cases, out, summary) -> None:
    got = _output(out)
    assert got == edge_cases["expected"]
    for name, count in edge_cases["counts"].items():
        assert summary[name] == count, name
    key_of = {name: _key(r["example_key"]) for name, r in edge_cases["picks"].items()}
    assert got[key_of["at_end"]]["label"] == 1
    assert key_of["past_end"] not in got and key_of["never"] not in got
    assert got[key_of["twice"]]["label"] == 0
    assert summary["labels_late"] == 1 and summary["examples_labelled_late"] == 1
    assert summary["labels_duplicate"] == 1 and summary["examples_not_yet_labelled"] == 1
    assert summary["labels_without_prediction"] == 1


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_a_label_file_with_the_edge_cases_joins_as_the_brute_force_does(served, edge_cases):
    rows = [
        {**r, "scheduled_departure": _at(r["scheduled_departure"]),
         "label_time": _at(r["label_time"]), "note": "ignored"}
        for r in edge_cases["rows"]
    ]  # fmt: skip
    path = write_jsonl(served["root"] / "labels.jsonl", rows, ['{"carrier": "UA"}'])
    out = served["root"] / "joined_file"
    summary = label_join.run(
        [f"--serving_log={served['log']}", f"--label_files={path}", f"--label_window={WINDOW}",
         f"--output_dir={out}", "--eval_fraction=0.2", "--drift_span=none"]
    )  # fmt: skip
    _check_edge_cases(edge_cases, out, summary)
    assert (summary["labels_read"], summary["labels_rejected"]) == (len(rows) + 1, 1)
    assert summary["label_files"] == str(path)
    dead = [
        json.loads(line)
        for name in os.listdir(out / "dead_letters")
        for line in open(out / "dead_letters" / name)
    ]
    assert len(dead) == 1 and "flight" in dead[0]["reason"]


@pytest.mark.slow
@pytest.mark.emulator
@pytest.mark.timeout(600)
def test_a_bigquery_label_table_joins_as_the_label_file_does(served, edge_cases, bq_emulator):
    import pyarrow as pa

    rows = edge_cases["rows"]
    columns = {name: [r[name] for r in rows] for name in rows[0]}
    table = pa.table(
        {
            **columns,
            "scheduled_departure": pa.array(columns["scheduled_departure"], pa.int64()).cast(
                pa.timestamp("ms", tz="UTC")
            ),
            "label_time": pa.array(columns["label_time"], pa.int64()).cast(
                pa.timestamp("ms", tz="UTC")
            ),
            "arrived_by": pa.array(["radio"] * len(rows)),  # another column: ignored
        }
    )
    dataset = bq_emulator.create_dataset()
    table_id = bq_emulator.create_table(dataset, "labels", table)
    out = served["root"] / "joined_bigquery"
    summary = label_join.run(
        [f"--serving_log={served['log']}", f"--label_bigquery_table={table_id}",
         f"--label_window={WINDOW}", f"--output_dir={out}", "--eval_fraction=0.2",
         "--drift_span=none", *bq_emulator.args()]
    )  # fmt: skip
    _check_edge_cases(edge_cases, out, summary)
    assert (summary["labels_read"], summary["labels_rejected"]) == (len(rows), 0)
    assert summary["label_bigquery_table"] == table_id


@pytest.mark.timeout(120)
def test_errors_before_the_run_are_one_line(tmp_path, capsys):
    (tmp_path / "log").mkdir()
    write_jsonl(tmp_path / "log" / "a.jsonl", [_record()])
    base = [f"--serving_log={tmp_path / 'log'}", f"--output_dir={tmp_path / 'o'}"]
    assert run_job("label-join", base) == 2
    assert "missing required option(s): --label_window" in capsys.readouterr().err
    assert run_job("label-join", [*base, "--label_window=6 hours"]) == 2
    assert "--label_window" in capsys.readouterr().err
    empty = [f"--serving_log={tmp_path / 'nothing'}", f"--output_dir={tmp_path / 'o'}"]
    assert run_job("label-join", [*empty, "--label_window=6h"]) == 2
    assert "no serving log files" in capsys.readouterr().err
    both = [*base, "--label_window=6h", "--label_files=x.csv", "--input=y.csv"]
    assert run_job("label-join", both) == 2
    assert "give one label source" in capsys.readouterr().err
    assert run_job("label-join", [*base, "--label_window=6h", "--feature_set=weather"]) == 2
    assert "declares no label_time" in capsys.readouterr().err


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_label_join_builds_for_dataflow_from_its_template_parameters(
    served, dataflow_jobs, tmp_path
):
    """The Flex Template's parameters reach the job; the join and prepare's writing steps are
    steps of the Dataflow job (a dry run: nothing is submitted or written)."""
    from tests.support.dataflow import DATAFLOW, JOBS, step_names, template_argv
    from tests.support.dataflow import run_job as run_template

    argv = template_argv(
        "label_join",
        {"serving_log": str(served["log"]), "label_window": "6h",
         "input": str(served["labels_csv"]), "output_dir": str(tmp_path / "out"),
         "eval_fraction": "0.2"},
    )  # fmt: skip
    assert run_template(JOBS["label_join"], [*argv, *DATAFLOW]) is None
    (job,) = dataflow_jobs
    assert job.proto.type.name == "JOB_TYPE_BATCH"
    steps = step_names(job)
    for step in ("ReadLog", "KeyLog", "ReadLabels", "Join", "LabelJoin", "WriteFeatures",
                 "AnalyzeAndTransform", "WriteTrain", "WriteEval", "WriteSchema", "DeadLetters"):  # fmt: skip
        assert any(s == step or s.startswith(step + "/") for s in steps), (step, sorted(steps))
    assert not (tmp_path / "out" / "summary.json").exists()


# --- a real serving log: the streaming scorer on the emulators -----------------------------------


def _served_vs_prepared(out_dir, prepared_dir) -> tuple[int, Counter]:
    """(examples compared, mismatching values per column) of label-join's features/ against
    prepare's features/ of the same events (the audit's tolerance: 1e-6, relative above 1)."""
    from skewless.transforms.consistency import compare_value

    prepared = {
        _key(row): row for row in pq.read_table(os.path.join(prepared_dir, "features")).to_pylist()
    }
    joined = _output(out_dir)
    assert joined and set(joined) <= set(prepared)
    mismatches = Counter()
    for key, row in joined.items():
        for name in NAMES:
            if compare_value(row[name], prepared[key][name])[0] != "equal":
                mismatches[name] += 1
    return len(joined), mismatches


@pytest.mark.slow
@pytest.mark.emulator
@pytest.mark.timeout(1200)
def test_a_real_serving_log_gives_prepares_examples_and_a_wrong_serving_delay_does_not(
    trained, tmp_path, pubsub_emulator, bigtable_emulator, caplog
):
    """Real flights through the aggregate job into the Bigtable emulator and the streaming
    scorer with a serving log (every event logged); label-join of that log with the flights'
    labels gives, event by event, prepare's features and labels: a model trained on either is
    trained on the same data. A scorer whose lookup uses a serving delay 15 minutes off logs
    other aggregates, and the same comparison fails on them."""
    import dataclasses

    from skewless.beam_pipelines.commands.bigtable_setup import ensure_table
    from skewless.beam_pipelines.commands.replay import ReplayStats, order_events
    from skewless.transforms.example_schema import aggregate_column_names
    from skewless.transforms.record_checks import to_epoch_ms
    from tests.jobs.test_audit import (
        INPUT_END,
        INPUT_START,
        RETENTION_S,
        SCORE_END,
        SCORE_START,
        _serve,
    )
    from tests.support.streaming_jobs import write_cells_with_the_aggregate_job

    ps, bt = pubsub_emulator, bigtable_emulator
    raws = [dict(r) for r in trained["rows"] if INPUT_START <= r["time_hour"] < INPUT_END]
    start, end = to_epoch_ms(SCORE_START), to_epoch_ms(SCORE_END)
    to_score = [r for t, r in order_events(FLIGHTS, raws, ReplayStats()) if start <= t < end]
    flights_path = write_jsonl(tmp_path / "flights.jsonl", raws)
    table_id = bt.table_name()
    ensure_table(bt.project, bt.instance, table_id, FLIGHTS, 600, RETENTION_S)
    assert write_cells_with_the_aggregate_job(bt, table_id, FLIGHTS, raws)["cells_written"] > 0
    wrong_d = dataclasses.replace(FLIGHTS, serving_delay_s=FLIGHTS.serving_delay_s + 900)
    results = {}
    for name, lookup_fs in (("clean", None), ("wrong_d", wrong_d)):
        log_dir = tmp_path / f"log_{name}"
        _, logged, _, expected = _serve(
            ps, bt, table_id, trained["model_dir"], to_score, log_dir, 1.0, lookup_fs
        )
        assert len(logged) == expected == len(to_score)
        out = tmp_path / f"joined_{name}"
        summary = label_join.run(
            [f"--serving_log={log_dir}", f"--input={flights_path}", "--label_window=8h",
             f"--output_dir={out}", "--drift_span=none"]
        )  # fmt: skip
        assert summary["examples_served"] == len(to_score)
        assert summary["examples_labelled"] > 0.9 * len(to_score)
        # The feature set's time split (Nov 1) leaves no eval examples in January: said once.
        assert summary["examples_eval"] == 0 and "no eval examples" in caplog.text
        results[name] = _served_vs_prepared(out, trained["prepared"])
    compared, mismatches = results["clean"]
    assert compared > 100 and not mismatches, mismatches
    compared, mismatches = results["wrong_d"]
    assert compared > 100 and mismatches["origin_departures_1h"] > 0.3 * compared
    assert set(mismatches) <= set(aggregate_column_names(FLIGHTS)), mismatches
