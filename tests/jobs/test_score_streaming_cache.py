"""Hybrid serving end to end on the emulators: the streaming scorer with --prediction_cache
answers the keys precompute wrote for the version it serves, and its outputs are the model's
to 1e-9; after a hot swap it serves only the new version's entries, and only once their
marker exists; the audit checks the cached predictions like the model's."""

from __future__ import annotations

import json
import shutil
import time

import pytest

from skewless.beam_pipelines.commands import bigtable_setup
from skewless.beam_pipelines.commands.replay import ReplayStats, order_events, publish_events
from skewless.beam_pipelines.jobs import audit, precompute, score_streaming
from skewless.beam_pipelines.runtime.parsing import metric_counters
from skewless.examples.flights_schedule import FLIGHTS_SCHEDULE
from skewless.models import versions
from tests.support.flights_data import write_csv
from tests.support.schedule import requests_of
from tests.support.streaming_jobs import wait_for

pytestmark = [pytest.mark.emulator, pytest.mark.slow, pytest.mark.timeout(900)]
FS = FLIGHTS_SCHEDULE
DAYS = {"month": 11, "day": 4, "days": 2}  # the requests served: a Monday and a Tuesday
KEY = ("carrier", "flight", "origin", "scheduled_departure")


@pytest.fixture(scope="module")
def served(schedule_trained, tmp_path_factory, pubsub_emulator, bigtable_emulator) -> dict:
    """The schedule model, its table with version 1 precomputed from the served days' own
    schedule, and the days replayed through the scorer with and without the cache."""
    root = tmp_path_factory.mktemp("cache")
    made = schedule_trained
    bt, ps = bigtable_emulator, pubsub_emulator
    table_id = bt.table_name()
    flags = [f"--bigtable_project={bt.project}", f"--bigtable_instance={bt.instance}",
             f"--bigtable_table={table_id}"]  # fmt: skip
    bigtable_setup.run(["--feature_set=flights_schedule", *flags])
    raws = requests_of(DAYS)
    source = write_csv(root / "requests.csv", raws)
    summary = precompute.run(
        ["--model_dir", str(made["model_dir"]), "--input", str(source), "--top_n", "400",
         "--output_dir", str(root / "precompute"), *flags]
    )  # fmt: skip
    events = order_events(FS, raws, ReplayStats())
    log = root / "serving_log"
    with_cache = _score(
        ps, flags, made["model_dir"], events, "--prediction_cache", f"--serving_log={log}",
        "--serving_log_sample=1.0", "--serving_log_window_s=1",
        until=lambda _: wait_for(lambda: len(_log_records(log)) >= len(events), 60),
    )  # fmt: skip
    without = _score(ps, flags, made["model_dir"], events)
    return {**made, "flags": flags, "raws": raws, "events": events, "source": source,
            "precompute": summary, "with_cache": with_cache, "without": without, "log": log}  # fmt: skip


def _score(ps, flags, model_dir, events, *extra, until=None) -> dict:
    inp, out = ps.topic("events"), ps.topic("predictions")
    inp_sub, out_sub = ps.subscription(inp, "scorer"), ps.subscription(out, "reader")
    p, info = score_streaming.make_pipeline(
        ["--streaming", f"--subscription={inp_sub}", f"--output_topic={out}",
         f"--model_dir={model_dir}", f"--project={ps.project}", *flags, *extra]
    )  # fmt: skip
    result = p.run()
    try:
        publish_events(ps.publisher(), inp, FS, events)
        got: list = []
        deadline = time.monotonic() + 240
        while len(got) < len(events) and time.monotonic() < deadline:
            got += [json.loads(m.data) for m in ps.pull_all(out_sub, expect=1, timeout_s=5)]
        if until is not None:
            until(got)
    finally:
        result.cancel()
    return {"predictions": got, "counters": metric_counters(result), "info": info}


def _by_key(predictions: list[dict]) -> dict:
    out = {tuple(str(p[k]) for k in KEY): p for p in predictions}
    assert len(out) == len(predictions), "one prediction per request"
    return out


def test_cached_predictions_are_the_models_and_the_cache_serves_its_share(served):
    cached, model = _by_key(served["with_cache"]["predictions"]), _by_key(served["without"]["predictions"])
    assert len(model) == len(served["events"]) > 1000
    assert set(cached) == set(model)
    for key, prediction in cached.items():
        assert prediction["model_version"] == model[key]["model_version"] == 1
        assert abs(prediction["probability"] - model[key]["probability"]) <= 1e-9, key
        assert model[key]["source"] == "model"
    hits = [p for p in cached.values() if p["source"] == "cache"]
    # The cache holds the 400 most frequent keys of these very days: it answers exactly the
    # requests precompute says they cover.
    assert len(hits) == served["precompute"]["requests_covered"]
    assert len(hits) / len(cached) >= 0.2
    counters = served["with_cache"]["counters"]
    assert counters["prediction_cache_hits"] == len(hits)
    assert counters["prediction_cache_misses"] == len(cached) - len(hits)
    assert counters.get("prediction_cache_version_not_ready", 0) == 0, "V1 was ready from the start"
    assert counters["examples_scored"] == len(cached) - len(hits)
    assert served["without"]["counters"]["examples_scored"] == len(model)


def test_the_serving_log_says_where_each_prediction_came_from_and_the_audit_checks_both(
    served, tmp_path
):
    by_key = _by_key(served["with_cache"]["predictions"])
    logged = _log_records(served["log"])
    assert len(logged) == len(by_key)
    for record in logged:
        key = tuple(str(record["example_key"][k]) for k in KEY[:3]) + (
            by_key_time(record["example_key"]["scheduled_departure"]),
        )
        assert record["source"] == by_key[key]["source"]
    report = audit.run(
        ["--serving_log", str(served["log"]), "--serving_log_sample=1.0",
         "--model_dir", str(served["model_dir"]), "--input", str(served["source"]),
         "--output_dir", str(tmp_path / "audit")]
    )  # fmt: skip
    assert report["clean"]
    by_source = report["prediction_by_source"]
    assert by_source["cache"]["count"] == served["precompute"]["requests_covered"]
    assert by_source["cache"]["mismatches"] == by_source["model"]["mismatches"] == 0
    assert by_source["cache"]["count"] + by_source["model"]["count"] == len(by_key)


def _log_records(log_dir) -> list[dict]:
    return [json.loads(line) for path in sorted(log_dir.glob("*.jsonl"))
            for line in path.read_text().splitlines() if line.strip()]  # fmt: skip


def by_key_time(ms: int) -> str:
    from skewless.transforms.record_checks import ms_to_datetime

    return ms_to_datetime(ms).isoformat()


def test_after_a_hot_swap_only_the_new_versions_entries_are_served_once_its_marker_exists(
    served, pubsub_emulator, tmp_path
):
    ps = pubsub_emulator
    model_dir = tmp_path / "models"
    shutil.copytree(served["model_dir"] / "1", model_dir / "1")
    events = served["events"]
    thirds = [events[i::3] for i in range(3)]
    inp, out = ps.topic("events"), ps.topic("predictions")
    inp_sub, out_sub = ps.subscription(inp, "scorer"), ps.subscription(out, "reader")
    p, _ = score_streaming.make_pipeline(
        ["--streaming", f"--subscription={inp_sub}", f"--output_topic={out}",
         f"--model_dir={model_dir}", f"--project={ps.project}", "--prediction_cache",
         "--model_poll_s=0.5", *served["flags"]]
    )  # fmt: skip
    result = p.run()
    got: list = []

    def pull_until(n: int) -> None:
        deadline = time.monotonic() + 180
        while len(got) < n and time.monotonic() < deadline:
            got.extend(json.loads(m.data) for m in ps.pull_all(out_sub, expect=1, timeout_s=5))
        assert len(got) >= n

    try:
        publish_events(ps.publisher(), inp, FS, thirds[0])
        pull_until(len(thirds[0]))
        first = list(got)
        assert {p["model_version"] for p in first} == {1}
        assert any(p["source"] == "cache" for p in first), "version 1 was precomputed"

        # Version 2 (the same weights under a new number: a cached V1 entry would still be
        # right, and must not be served under V2 anyway) is published: until precompute
        # writes its marker, the scorer asks the model.
        staging = versions.new_staging_dir(str(model_dir))
        shutil.rmtree(staging)
        shutil.copytree(served["model_dir"] / "1", staging)
        metadata = json.loads((model_dir / "1" / "model.json").read_text())
        # A training time of its own (its cells' time), recent: the family's GC rule collects a
        # version's entries `retention` after it was trained, and the emulator does collect.
        metadata["created_at"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(time.time() + 1))
        (__import__("pathlib").Path(staging) / "model.json").write_text(json.dumps(metadata))
        versions.publish(str(model_dir), staging)
        time.sleep(3)  # the watcher polls every 0.5 s
        publish_events(ps.publisher(), inp, FS, thirds[1])
        pull_until(len(thirds[0]) + len(thirds[1]))
        second = got[len(first):]
        assert {p["model_version"] for p in second} == {2}
        assert all(p["source"] == "model" for p in second), "no entry of V2 before its marker"

        precompute.run(
            ["--model_dir", str(model_dir), "--input", str(served["source"]), "--top_n", "400",
             "--output_dir", str(tmp_path / "precompute2"), *served["flags"]]
        )  # fmt: skip
        publish_events(ps.publisher(), inp, FS, thirds[2])
        pull_until(len(events))
        third = got[len(first) + len(second):]
    finally:
        result.cancel()
    assert {p["model_version"] for p in third} == {2}
    # V2's entries are served once its marker exists: precompute read the same requests, so
    # V2 caches the keys V1 did, and exactly the requests V1 answered from its cache are hits.
    v1 = _by_key(served["with_cache"]["predictions"])
    third_by_key = _by_key(third)
    hits = {k for k, p in third_by_key.items() if p["source"] == "cache"}
    counters = metric_counters(result)
    expected = {k for k in third_by_key if v1[k]["source"] == "cache"}
    assert hits == expected, (len(hits), len(expected), counters)
    assert len(hits) > 50
    for key in hits:
        assert third_by_key[key]["probability"] == v1[key]["probability"]
    counters = metric_counters(result)
    assert counters["prediction_cache_version_not_ready"] >= len(thirds[1])
