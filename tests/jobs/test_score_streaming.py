"""Streaming scoring on the Pub/Sub and Bigtable emulators: no skew with batch scoring, model hot
swap, dead letters, clear model errors.

The scorer does no windowing, so the flights keep their 2013 timestamps: nothing is late. The
Bigtable cells come from the aggregate job's real build_pipeline (Pub/Sub messages through
ParseMessages, validation, the streaming composite, the real Bigtable sink) fed by TestStream,
which makes them deterministic (a live replay through the emulator depends on timing).
"""

from __future__ import annotations

import json
import shutil
import time

import apache_beam as beam
import numpy as np
import pyarrow.parquet as pq
import pytest
from apache_beam.testing.test_pipeline import TestPipeline
from apache_beam.testing.util import assert_that, equal_to

from skewless.beam_pipelines.commands import train
from skewless.beam_pipelines.commands.bigtable_setup import ensure_table
from skewless.beam_pipelines.commands.replay import ReplayStats, order_events, to_message
from skewless.beam_pipelines.io.online_store import cell_keys
from skewless.beam_pipelines.jobs import score, score_streaming
from skewless.beam_pipelines.runtime.parsing import metric_counters
from skewless.examples.flights import FLIGHTS
from skewless.models.handler import SkewlessModelHandler, predict, rows_to_feed
from skewless.transforms.aggregations import attach_aggregates
from skewless.transforms.record_checks import RecordChecker, ms_to_datetime, to_epoch_ms
from tests.support.flights_data import write_jsonl
from tests.support.poison_messages import timestamp_poison
from tests.support.streaming_jobs import write_cells_with_the_aggregate_job

KEY = ["carrier", "flight", "origin", "scheduled_departure"]
INPUT_START, INPUT_END = "2013-01-06T10:00:00Z", "2013-01-06T14:00:00Z"  # by scheduled hour
SCORE_START, SCORE_END = "2013-01-06T11:00:00Z", "2013-01-06T14:00:00Z"  # by event time
RETENTION_S = 20 * 365 * 86_400  # the cells are stamped in 2013: keep them
BAD_MESSAGES = {
    b'{"year": 2013, "month": 1': ("parse", "not JSON"),
    b'{"year": 2013, "carrier": "UA"}': ("validate", "missing required field"),
}


def _slice(trained) -> list[dict]:
    """Raw flights scheduled in [INPUT_START, INPUT_END): the events of both scorers."""
    return [dict(r) for r in trained["rows"] if INPUT_START <= r["time_hour"] < INPUT_END]


def _to_score(raws: list[dict]) -> list[tuple[int, dict]]:
    """(event time, raw) of the departures with event time in [SCORE_START, SCORE_END)."""
    start, end = to_epoch_ms(SCORE_START), to_epoch_ms(SCORE_END)
    return [(t, r) for t, r in order_events(FLIGHTS, raws, ReplayStats()) if start <= t < end]


def _key(prediction: dict) -> tuple:
    return tuple(str(prediction[k]) for k in KEY)


def _raw_key(raw: dict) -> tuple:
    event = RecordChecker(FLIGHTS).validate(dict(raw))
    return (event["carrier"], str(event["flight"]), event["origin"], ms_to_datetime(event["scheduled_departure"]).isoformat())


def _wait_for(pull, subscription: str, predicate, timeout_s: float) -> list:
    """Pull messages (decoded JSON) until predicate(all so far) holds or the timeout."""
    out: list = []
    deadline = time.monotonic() + timeout_s
    while not predicate(out) and time.monotonic() < deadline:
        out.extend(json.loads(m.data) for m in pull(subscription, expect=1, timeout_s=5))
    return out


def _scorer_args(ps, bt, table_id, model_dir, topics: dict, *extra) -> list[str]:
    return [
        "--streaming",
        f"--subscription={topics['input_sub']}",
        f"--output_topic={topics['output']}",
        f"--dead_letter_topic={topics['dead']}",
        f"--bigtable_project={bt.project}",
        f"--bigtable_instance={bt.instance}",
        f"--bigtable_table={table_id}",
        f"--model_dir={model_dir}",
        f"--project={ps.project}",
        *extra,
    ]


def _topics(ps) -> dict:
    inp, out, dead = ps.topic("events"), ps.topic("predictions"), ps.topic("dead")
    return {
        "input": inp,
        "input_sub": ps.subscription(inp, "scorer"),
        "output": out,
        "output_sub": ps.subscription(out, "reader"),
        "dead": dead,
        "dead_sub": ps.subscription(dead, "reader"),
    }


def _publish(publisher, topic: str, messages: list) -> None:
    """Publish raw flights (with their event time attribute, as replay does) or (payload,
    attributes) pairs, in order."""
    validator = RecordChecker(FLIGHTS)
    futures = []
    for message in messages:
        if isinstance(message, dict):
            event_ms = validator.validate(dict(message))[FLIGHTS.event_time]
            message = (to_message(FLIGHTS, message), {"event_time": str(event_ms)})
        data, attributes = message
        futures.append(publisher.publish(topic, data, **attributes))
    for f in futures:
        f.result(timeout=30)




@pytest.fixture(scope="module")
def both_scorers(trained, pubsub_emulator, bigtable_emulator, tmp_path_factory):
    """Batch and streaming scoring of the same flights, plus bad messages to the streaming job."""
    ps, bt = pubsub_emulator, bigtable_emulator
    root = tmp_path_factory.mktemp("score_streaming")
    raws = _slice(trained)
    to_score = _to_score(raws)

    summary = score.run(
        [
            "--model_dir", str(trained["model_dir"]),
            "--input", str(write_jsonl(root / "flights.jsonl", raws)),
            "--output", str(root / "batch"),
            "--start", SCORE_START,
            "--end", SCORE_END,
        ]
    )  # fmt: skip
    batch = pq.read_table(root / "batch" / "predictions").to_pylist()
    for row in batch:
        for name in ("scheduled_departure", "event_time"):
            row[name] = row[name].isoformat()

    table_id = bt.table_name()
    ensure_table(bt.project, bt.instance, table_id, FLIGHTS, 600, RETENTION_S)
    assert write_cells_with_the_aggregate_job(bt, table_id, FLIGHTS, raws)["cells_written"] > 0

    topics = _topics(ps)
    p, info = score_streaming.make_pipeline(_scorer_args(ps, bt, table_id, trained["model_dir"], topics))
    result = p.run()
    try:
        wrong_type = dict(to_score[0][1], dep_delay="late", flight=999_001)
        bad = {**BAD_MESSAGES, json.dumps(wrong_type).encode(): ("validate", "'dep_delay' 'late' is not a number")}
        first_ms, first_raw = to_score[0]
        messages = [(payload, {"event_time": str(first_ms)}) for payload in bad]
        for payload, (attributes, stage, reason) in timestamp_poison(first_raw, first_ms).items():
            bad[payload] = (stage, reason)
            messages.append((payload, attributes))
        _publish(ps.publisher(), topics["input"], [r for _, r in to_score] + messages)
        streamed = _wait_for(ps.pull_all, topics["output_sub"], lambda got: len(got) >= len(to_score), 120)
        dead = ps.pull_all(topics["dead_sub"], expect=len(bad), timeout_s=60)
        time.sleep(1)  # anything extra (duplicates) would arrive now
        streamed += [json.loads(m.data) for m in ps.pull_all(topics["output_sub"], expect=1, timeout_s=2)]
    finally:
        result.cancel()
    return {
        "summary": summary, "batch": batch, "streamed": streamed, "dead": dead, "bad": bad,
        "to_score": to_score, "info": info, "counters": metric_counters(result),
    }  # fmt: skip


@pytest.mark.slow
@pytest.mark.emulator
@pytest.mark.timeout(300)
def test_streaming_and_batch_scoring_give_the_same_probability_for_every_flight(both_scorers):
    batch, streamed = both_scorers["batch"], both_scorers["streamed"]
    assert len(both_scorers["to_score"]) > 100
    assert len(streamed) == len(batch) == len(both_scorers["to_score"]) == both_scorers["summary"]["examples_scored"]
    by_key = {_key(p): p for p in streamed}
    assert len(by_key) == len(streamed), "one prediction per flight"
    assert set(by_key) == {_key(b) for b in batch}
    assert set(by_key) == {_raw_key(r) for _, r in both_scorers["to_score"]}
    expected_version = both_scorers["info"]["model_version"]
    for b in batch:
        s = by_key[_key(b)]
        assert s["event_time"] == b["event_time"]
        assert s["model_version"] == b["model_version"] == expected_version
    np.testing.assert_allclose(
        [by_key[_key(b)]["probability"] for b in batch], [b["probability"] for b in batch], rtol=0, atol=1e-6
    )
    assert sorted(streamed[0]) == sorted([*KEY, "event_time", "probability", "model_version", "source"])
    assert {s["source"] for s in streamed} == {"model"}
    counters = both_scorers["counters"]
    # The lookup really read cells (a table of empty windows would also agree with nothing).
    assert counters["cells_found"] > 0
    assert counters["examples_scored"] == len(batch)


@pytest.mark.slow
@pytest.mark.emulator
@pytest.mark.timeout(300)
def test_bad_messages_reach_the_dead_letter_topic_with_stage_and_reason(both_scorers):
    dead, bad = both_scorers["dead"], both_scorers["bad"]
    assert len(dead) == len(bad)
    by_payload = {m.data: m.attributes for m in dead}
    assert set(by_payload) == set(bad)
    for payload, (stage, reason) in bad.items():
        assert by_payload[payload]["stage"] == stage
        assert reason in by_payload[payload]["reason"], by_payload[payload]
        assert by_payload[payload]["feature_set"] == "flights"
    timestamps = sum(stage == "timestamp" for stage, _ in bad.values())
    assert both_scorers["counters"]["messages_bad_timestamp"] == timestamps - 1  # 1 disagrees
    assert both_scorers["counters"]["records_rejected"] == len(bad) - timestamps + 1


class _ExplodingHandler(SkewlessModelHandler):
    """A model that fails on flight 4242, to send a real inference failure through RunInference."""

    def run_inference(self, batch, model, inference_args=None):
        if any(e["flight"] == 4242 for e in batch):
            raise RuntimeError("model exploded on flight 4242")
        return super().run_inference(batch, model, inference_args)


def _examples(trained, n: int) -> list[dict]:
    """n examples with empty windows (the aggregates' defaults)."""
    validator = RecordChecker(FLIGHTS)
    events = [e for e in map(validator.validate, _slice(trained)) if e]
    return [attach_aggregates(FLIGHTS, e, lambda k: None) for e in events[:n]]


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_failed_inferences_and_unfit_examples_become_dead_letters(trained):
    good, exploding, unfit, other = _examples(trained, 4)
    exploding = dict(exploding, flight=4242)
    unfit = {k: v for k, v in unfit.items() if k != "distance"}
    handler = _ExplodingHandler(str(trained["model_dir"]))
    with TestPipeline(runner="FnApiRunner") as p:
        # Two batches: the unfit example is taken out of the first alone; the second fails as a
        # whole in the model, and each of its examples is dead-lettered with the reason.
        batches = p | beam.Create([[good, unfit], [exploding, other]])
        predictions, dead = batches | score_streaming.ScoreEvents(FLIGHTS, handler)
        assert_that(
            predictions | beam.Map(lambda r: (r["flight"], r["model_version"])),
            equal_to([(good["flight"], handler.version)]),
            label="OnePrediction",
        )
        assert_that(
            dead | beam.Map(lambda d: (d["stage"], d["reason"], d["record"]["flight"])),
            equal_to(
                [
                    ("inference", "RuntimeError: model exploded on flight 4242", 4242),
                    ("inference", "RuntimeError: model exploded on flight 4242", other["flight"]),
                    ("model_input", "missing feature 'distance'", unfit["flight"]),
                ]
            ),
            label="DeadLetters",
        )


_CALLS: dict[str, list[int]] = {"read_rows": [], "model": []}


class _CountingTable:
    """Bigtable stand-in: the cells of a dict, and the size of every read_rows call."""

    def __init__(self, cells: dict):
        self.cells = cells

    def read_rows(self, row_set, filter_=None):
        from types import SimpleNamespace

        _CALLS["read_rows"].append(len(row_set.row_keys))
        out = []
        for key in row_set.row_keys:
            values = self.cells.get(key.decode())
            if values is not None:
                columns = {n.encode(): [SimpleNamespace(value=repr(v).encode())] for n, v in values.items()}
                out.append(SimpleNamespace(row_key=key, cells={FLIGHTS.name: columns}))
        return out


class _CountingHandler(SkewlessModelHandler):
    def run_inference(self, batch, model, inference_args=None):
        _CALLS["model"].append(len(batch))
        return super().run_inference(batch, model, inference_args)


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_one_bigtable_read_and_one_model_call_per_batch_with_the_as_of_cells(trained):
    from skewless.transforms.aggregations import row_key

    events = [e for e in map(RecordChecker(FLIGHTS).validate, _slice(trained)) if e][:25]
    keys = {k for e in events for k in cell_keys(FLIGHTS, e)}
    # Distinct values per cell, so an example paired with the wrong row would show.
    cells = {
        row_key(*k): {a.name: float(i * 10 + j) for j, a in enumerate(FLIGHTS.aggregates) if a.key == k.key_name}
        for i, k in enumerate(sorted(keys))
    }
    some_absent = dict(list(cells.items())[::2])  # the others are empty windows
    handler = _CountingHandler(str(trained["model_dir"]))
    expected_examples = [attach_aggregates(FLIGHTS, e, lambda k: some_absent.get(row_key(*k))) for e in events]
    probabilities = predict(handler.load_model(), rows_to_feed(expected_examples, handler.inputs))
    expected = [(e["flight"], e["scheduled_departure"], round(float(p), 6)) for e, p in zip(expected_examples, probabilities, strict=True)]
    _CALLS["read_rows"].clear()
    _CALLS["model"].clear()
    lookup = score_streaming.LookupAggregates(FLIGHTS, lambda: _CountingTable(some_absent), max_batch=10)
    with TestPipeline(runner="FnApiRunner") as p:
        batches = p | beam.Create(events, reshuffle=False) | lookup
        predictions, dead = batches | score_streaming.ScoreEvents(FLIGHTS, handler)
        assert_that(
            predictions
            | beam.Map(lambda r: (r["flight"], to_epoch_ms(r["scheduled_departure"]), round(r["probability"], 6))),
            equal_to(expected),
        )
        assert_that(dead, equal_to([]), label="NoDeadLetters")
    # One read and one model call per batch of up to 10 events, the reads asking for every
    # cell the rule names (absent rows included).
    assert sorted(_CALLS["model"]) == [5, 10, 10]
    assert len(_CALLS["read_rows"]) == 3 and sum(_CALLS["read_rows"]) >= len(keys)


@pytest.mark.timeout(120)
def test_missing_or_corrupt_model_dir_is_a_clear_error_before_the_job_starts(trained, tmp_path):
    base = [
        "--streaming",
        "--subscription=projects/p/subscriptions/s",
        "--output_topic=projects/p/topics/t",
        "--bigtable_project=p",
        "--bigtable_instance=i",
        "--bigtable_table=t",
    ]
    with pytest.raises(SystemExit, match="score --streaming: model directory .* does not exist"):
        score_streaming.run([*base, f"--model_dir={tmp_path / 'none'}"])
    broken = tmp_path / "models"
    shutil.copytree(trained["result"]["path"], broken / "1")
    (broken / "1" / "saved_model.pb").write_bytes(b"not a saved model")
    with pytest.raises(SystemExit, match="corrupt: saved_model.pb does not parse"):
        score_streaming.run([*base, f"--model_dir={broken}"])
    with pytest.raises(SystemExit, match="give --output_topic, --output_table or both"):
        score_streaming.run([a for a in base if not a.startswith("--output_topic")] + [f"--model_dir={broken}"])
    with pytest.raises(SystemExit, match="batch-only option.*--output, --start"):
        model_dir = str(trained["result"]["path"]).rsplit("/", 1)[0]
        score_streaming.run([*base, f"--model_dir={model_dir}", "--output=/tmp/x", "--start=2013-01-01T00:00:00Z"])
    # The batch job's entry point points to the streaming one (the CLI picks it by --streaming).
    with pytest.raises(SystemExit, match="--streaming is the streaming scorer"):
        score.run([*base, f"--model_dir={model_dir}"])


def _expected(model_dir: str, version: int, raws: list[dict]) -> dict:
    """Version `version`'s probability per flight key, the aggregates being empty windows."""
    handler = SkewlessModelHandler(model_dir, version)
    validator = RecordChecker(FLIGHTS)
    examples = [attach_aggregates(FLIGHTS, validator.validate(dict(r)), lambda k: None) for r in raws]
    probabilities = predict(handler.load_model(), rows_to_feed(examples, handler.inputs))
    return {_raw_key(r): float(p) for r, p in zip(raws, probabilities, strict=True)}


@pytest.mark.slow
@pytest.mark.emulator
@pytest.mark.timeout(300)
def test_a_version_published_while_the_job_runs_takes_over_without_a_restart(
    trained, pubsub_emulator, bigtable_emulator, tmp_path
):
    ps, bt = pubsub_emulator, bigtable_emulator
    model_dir = tmp_path / "models"
    shutil.copytree(trained["result"]["path"], model_dir / "1")
    table_id = bt.table_name()  # empty: every window is empty, the aggregates are the defaults
    ensure_table(bt.project, bt.instance, table_id, FLIGHTS, 600, RETENTION_S)
    flights = [r for _, r in _to_score(_slice(trained))]
    before, probe, after = flights[:20], flights[20], flights[21:41]
    topics = _topics(ps)
    p, _ = score_streaming.make_pipeline(
        _scorer_args(ps, bt, table_id, model_dir, topics, "--model_poll_s=0.5")
    )
    result = p.run()
    publisher = ps.publisher()
    pull = ps.pull_all
    try:
        _publish(publisher, topics["input"], before)
        first = _wait_for(pull, topics["output_sub"], lambda got: len(got) >= len(before), 90)

        # A training run publishes version 2 (staging dir + rename) while the job runs.
        v2 = train.run(
            ["--prepared_dir", str(trained["prepared"]), "--model_dir", str(model_dir), "--epochs", "1", "--seed", "11"]
        )
        assert v2["version"] == 2

        def swapped(got):
            if not any(g["model_version"] == 2 for g in got):
                _publish(publisher, topics["input"], [probe])
                return False
            return True

        _wait_for(pull, topics["output_sub"], swapped, 90)
        _publish(publisher, topics["input"], after)
        after_keys = {_raw_key(r) for r in after}
        second = _wait_for(
            pull, topics["output_sub"], lambda got: len({_key(g) for g in got} & after_keys) >= len(after), 90
        )
    finally:
        result.cancel()

    v1 = _expected(str(model_dir), 1, before + after)
    v2_out = _expected(str(model_dir), 2, before + after)
    assert len(first) == len(before) and {g["model_version"] for g in first} == {1}
    for g in first:
        assert g["probability"] == pytest.approx(v1[_key(g)], abs=1e-6)
    second = [g for g in second if _key(g) in after_keys]
    assert len(second) == len(after) and {g["model_version"] for g in second} == {2}
    for g in second:
        assert g["probability"] == pytest.approx(v2_out[_key(g)], abs=1e-6)
    # The two versions really differ, so matching version 2's outputs means something.
    assert max(abs(v1[k] - v2_out[k]) for k in after_keys) > 1e-3


@pytest.mark.slow
@pytest.mark.timeout(180)
def test_the_watcher_skips_incomplete_and_broken_versions_and_keeps_serving(trained, tmp_path):
    from skewless.models.watch import WatchingModelHandler

    base = tmp_path / "models"
    source = trained["result"]["path"]
    shutil.copytree(source, base / "1")
    handler = WatchingModelHandler(str(base), poll_s=3600)  # checked by hand below
    live = handler.load_model()
    try:
        (base / "2").mkdir()  # being copied: incomplete, tried again at the next poll
        assert not live.check_now() and live.version == 1
        shutil.copytree(source, base / "3")
        (base / "3" / "variables" / "variables.data-00000-of-00001").write_bytes(b"truncated")
        assert not live.check_now() and live.version == 1  # TensorFlow cannot load it: skipped
        shutil.rmtree(base / "2")
        shutil.copytree(source, base / "2")  # complete now: the highest loadable version
        assert live.check_now() and live.version == 2
        shutil.copytree(source, base / "4")
        assert live.check_now() and live.version == 4 and live.swaps == 2
        example = attach_aggregates(FLIGHTS, RecordChecker(FLIGHTS).validate(dict(_slice(trained)[0])), lambda k: None)
        (result,) = handler.run_inference([example], live)
        assert result.model_id == "4" and 0.0 < result.inference < 1.0
    finally:
        live.stop()
