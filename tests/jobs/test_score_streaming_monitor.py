"""Streaming monitoring end to end: the streaming scorer (its real make_pipeline, --monitor_topic)
on the Pub/Sub and Bigtable emulators, fed 50 minutes of real flights moved into the monitoring
window that is open now; when the wall clock (the local runner's Pub/Sub watermark) passes the
window's end, the window's anomaly records reach the monitoring topic.

The window is made to close within a minute or two: its length is chosen near an hour so that
the window holding now ends soon (FixedWindows are aligned to the epoch). Two scorers run at
once, one fed the flights as they are and one fed them with dep_delay in seconds (the event
time the feature set derives moves with it, as it would with that upstream bug).
"""

from __future__ import annotations

import json
import shutil
import time

import pytest

from skewless.beam_pipelines.commands.bigtable_setup import ensure_table
from skewless.beam_pipelines.commands.replay import ReplayStats, order_events, publish_events
from skewless.beam_pipelines.jobs import score_streaming
from skewless.beam_pipelines.runtime.parsing import metric_counters
from skewless.examples.flights import FLIGHTS
from skewless.transforms.record_checks import ms_to_datetime, to_epoch_ms
from tests.support.streaming_jobs import HOUR_MS, write_cells_with_the_aggregate_job

SLICE_START = "2013-01-02T13:00:00Z"  # by event time: 8 a.m. in New York, a busy hour
SLICE_S = 50 * 60
# The window holding now ends this many seconds from now: the jobs start, the cells are
# written and the events published in a few seconds; the margin is for a loaded machine.
CLOSE_IN_S = (60, 90)
RETENTION_S = 20 * 365 * 86_400


def _window_closing_soon(now_s: float) -> int:
    """A window length near an hour whose window holding `now_s` ends CLOSE_IN_S from now."""
    for window_s in range(3600, 4800):
        left = window_s - int(now_s) % window_s
        if CLOSE_IN_S[0] <= left <= CLOSE_IN_S[1]:
            return window_s
    raise AssertionError("no window length near an hour closes soon")  # 1,200 tries: never


def _events(rows: list[dict], scale: float) -> list[tuple[int, dict]]:
    """(event ms, raw) of the flights whose event time falls in the slice or the three hours
    before it (their aggregates), dep_delay scaled."""
    raws = [dict(r, dep_delay=None if r["dep_delay"] is None else r["dep_delay"] * scale) for r in rows]  # fmt: skip
    lo = to_epoch_ms(SLICE_START)
    return [(t, r) for t, r in order_events(FLIGHTS, raws, ReplayStats()) if lo - 3 * HOUR_MS <= t < lo + SLICE_S * 1000]  # fmt: skip


def _shifted(events: list[tuple[int, dict]], shift_ms: int) -> list[tuple[int, dict]]:
    """The events moved by shift_ms (whole periods: the aggregate windows stay aligned)."""
    return [
        (
            t + shift_ms,
            dict(r, time_hour=ms_to_datetime(to_epoch_ms(r["time_hour"]) + shift_ms).isoformat()),
        )  # fmt: skip
        for t, r in events
    ]


def _start_scorer(ps, bt, model_dir, window_s: int, name: str):
    table_id = bt.table_name()
    ensure_table(bt.project, bt.instance, table_id, FLIGHTS, 600, RETENTION_S)
    inp, out, monitor = ps.topic(f"events-{name}"), ps.topic(f"predictions-{name}"), ps.topic(f"monitor-{name}")  # fmt: skip
    p, info = score_streaming.make_pipeline(
        [
            "--streaming", f"--subscription={ps.subscription(inp, 'scorer')}",
            f"--output_topic={out}", f"--bigtable_project={bt.project}",
            f"--bigtable_instance={bt.instance}", f"--bigtable_table={table_id}",
            f"--model_dir={model_dir}", f"--project={ps.project}",
            f"--monitor_topic={monitor}", f"--monitor_window_s={window_s}",
        ]
    )  # fmt: skip
    subscriptions = ps.subscription(out, "reader"), ps.subscription(monitor, "reader")
    return p.run(), inp, *subscriptions, info, table_id


@pytest.mark.slow
@pytest.mark.timeout(420)
def test_a_clean_replay_raises_nothing_and_dep_delay_in_seconds_is_named_in_its_window(
    trained, pubsub_emulator, bigtable_emulator
):
    ps, bt = pubsub_emulator, bigtable_emulator
    clean, seconds = _events(trained["rows"], 1), _events(trained["rows"], 60)

    window_s = _window_closing_soon(time.time())
    jobs = {
        name: _start_scorer(ps, bt, trained["model_dir"], window_s, name)
        for name in ("clean", "seconds")
    }
    try:
        assert "/topics/monitor-clean-" in jobs["clean"][4]["monitor_topic"]
        now_ms = int(time.time() * 1000)
        window_end_s = (now_ms // 1000 // window_s + 1) * window_s
        window_start_ms = (window_end_s - window_s) * 1000
        scored = {}
        for name, events in (("clean", clean), ("seconds", seconds)):
            # The slice's last event up to a period before now: all of it inside the open
            # window, the hours before it (aggregates only) before the window.
            period = FLIGHTS.period_ms
            moved = _shifted(events, (now_ms - 5000 - events[-1][0]) // period * period)
            scored[name] = [e for e in moved if e[0] >= window_start_ms]
            assert len(scored[name]) >= 30 and to_epoch_ms(SLICE_START) + moved[-1][0] - events[-1][0] >= window_start_ms  # fmt: skip
            written = write_cells_with_the_aggregate_job(bt, jobs[name][5], FLIGHTS, [r for _, r in moved])  # fmt: skip
            assert written["cells_written"] > 0
        for name in jobs:  # the window is still open: the cells took less than CLOSE_IN_S
            assert time.time() < window_end_s - 20
            publish_events(ps.publisher(), jobs[name][1], FLIGHTS, scored[name])
        predicted = {name: [] for name in jobs}
        records = {name: [] for name in jobs}
        deadline = window_end_s + 90
        while time.time() < deadline and not records["seconds"]:
            for name, (_, _, out_sub, monitor_sub, _, _) in jobs.items():
                predicted[name] += ps.pull_all(out_sub, expect=1, timeout_s=1)
                records[name] += [json.loads(m.data) for m in ps.pull_all(monitor_sub, expect=1, timeout_s=1)]  # fmt: skip
        # The clean job's window closed at the same time: anything it sends is there by now.
        records["clean"] += [json.loads(m.data) for m in ps.pull_all(jobs["clean"][3], expect=1, timeout_s=5)]  # fmt: skip
    finally:
        for result, *_ in jobs.values():
            result.cancel()
    counters = {name: metric_counters(job[0]) for name, job in jobs.items()}

    clean, seconds = scored["clean"], scored["seconds"]
    assert len(predicted["clean"]) == len(clean) and len(predicted["seconds"]) == len(seconds)
    assert records["clean"] == []
    # In seconds, the departure delay drifts, and most of its values leave the training range.
    assert sorted((r["feature"], r["kind"]) for r in records["seconds"]) == [
        ("dep_delay", "distribution_drift"), ("dep_delay", "out_of_range"),
    ]  # fmt: skip
    for record in records["seconds"]:
        assert record["count"] == len(seconds) and record["model_version"] == 1
        assert record["value"] > record["threshold"] > 0
        assert to_epoch_ms(record["window_end"]) == window_end_s * 1000
    assert counters["clean"]["monitor_windows"] == 1 and counters["clean"].get("monitor_anomalies", 0) == 0  # fmt: skip
    assert counters["seconds"]["monitor_anomalies"] == 2
    assert counters["seconds"]["monitor_examples"] == len(seconds)


@pytest.mark.timeout(120)
def test_a_model_version_without_training_statistics_is_a_one_line_error(trained, tmp_path):
    """--monitor_topic reads the version's prepared dir before the job starts: a version whose
    prepared dir is gone is refused with a line naming the missing statistics."""
    models = tmp_path / "models"
    shutil.copytree(trained["model_dir"] / "1", models / "1")
    record = json.loads((models / "1" / "model.json").read_text())
    record["prepared_dir"] = str(tmp_path / "gone")
    (models / "1" / "model.json").write_text(json.dumps(record))
    with pytest.raises(SystemExit) as exc:
        score_streaming.make_pipeline(
            [
                "--streaming", "--subscription=projects/p/subscriptions/s",
                "--output_topic=projects/p/topics/out", "--bigtable_project=p",
                "--bigtable_instance=i", "--bigtable_table=t", "--skip_table_check",
                f"--model_dir={models}", "--monitor_topic=projects/p/topics/monitor",
            ]
        )  # fmt: skip
    message = str(exc.value)
    assert message.startswith("skewless score --streaming: ") and "\n" not in message
    assert "gone" in message and "run prepare" in message
