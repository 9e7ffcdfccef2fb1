"""Benchmark: hybrid serving. The streaming scorer at rate with the prediction cache off, at the
measured hit rate, and with every request a hit (issue 22).

Setup (built unless given --model_dir): the bundled flights_schedule feature set prepared on
the whole year and trained (Jan-Oct train, Nov-Dec eval), a Pub/Sub and a Bigtable emulator,
two tables: one whose cache holds the --top_n most frequent keys of Sep-Oct (a past period:
the measured hit rate), one holding every key of the requests served (all hits). The requests
are Nov-Dec's scheduled flights in event-time order.

For each rate (--rates) and mode, a fresh scorer process runs the real job
(`score_streaming.make_pipeline`, local runner), real requests are published one by one at the
rate for --seconds, and each request's latency is the time its prediction reached a
streaming-pull subscriber minus the time just before its publish. Reported per run: sustained
events/s, p50/p99 latency, the scorer process's CPU microseconds per event, model calls
(RunInference batches) and examples scored per 1,000 events, the share answered from the
cache, and whether every prediction equals the cache-off run's for the same request (to 1e-9).

Next to them, measured in the same run: the job code per event with no runner (the lookup
with its Bigtable rows from memory, the cache split, the model call on the misses, the
predictions), per mode, on batches of --code_batch requests; its model-call share gives the
fall in CPU the hit rate predicts (hit rate x the model's share of the job code).

Ends with one JSON line: {"hit_rate": ..., "hit_rate_by_n": {"100": ..., "1000": ...,
"10000": ..., "all": ...}, "runs": [{"mode", "rate", "events_per_s", "p50_s", "p99_s",
"job_code_us_per_event", "process_cpu_us_per_event", "model_calls_per_1000", ...}],
"mismatches": 0, ...}.

Usage: .venv/bin/python bench/prediction_cache.py [--model_dir DIR] [--rates 400 800]
           [--seconds 15] [--top_n 10000]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.score_streaming import Laps, Topics, cpu_seconds, stop_process_group, summarize  # noqa: E402
from tests.support.emulators import pubsub_and_bigtable  # noqa: E402
from tests.support.traffic import Receiver, publish_paced  # noqa: E402

PROJECT, INSTANCE = "skewless-bench", "bench"
WARM = 20
SERVED = ("2013-11-01T00:00:00+00:00", "2014-01-01T00:00:00+00:00")
PAST = ("2013-09-01T00:00:00+00:00", "2013-11-01T00:00:00+00:00")
MODES = ("off", "measured", "all_hits")


def build_model(root: Path) -> str:
    """prepare + train the bundled flights_schedule (its default split: Nov-Dec evaluates)."""
    from skewless.beam_pipelines.commands import train
    from skewless.beam_pipelines.jobs import prepare

    prepare.run(["--feature_set", "flights_schedule", "--output_dir", str(root / "prepared")])
    train.run(["--prepared_dir", str(root / "prepared"), "--model_dir", str(root / "models"),
               "--epochs", "3", "--seed", "7"])  # fmt: skip
    return str(root / "models")


def served_requests() -> list[tuple[int, dict]]:
    """(event time, raw) of every scheduled Nov-Dec flight, in event-time order."""
    import pandas as pd

    from skewless.beam_pipelines.commands.replay import ReplayStats, order_events
    from skewless.examples.flights_schedule import FLIGHTS_SCHEDULE

    raw = pd.read_csv(FLIGHTS_SCHEDULE.resolve_default_input())
    raw = raw[raw.month >= 11]
    records = raw.astype(object).where(raw.notna(), None).to_dict("records")
    return order_events(FLIGHTS_SCHEDULE, records, ReplayStats())


def request_key(record: dict) -> tuple:
    """(carrier, flight, origin, scheduled departure ISO) of a raw request or a prediction."""
    from skewless.transforms.record_checks import ms_to_datetime, to_epoch_ms

    if "probability" in record:
        return (record["carrier"], int(record["flight"]), record["origin"], record["scheduled_departure"])
    departure = to_epoch_ms(record["time_hour"]) + int(record["minute"]) * 60_000
    return (record["carrier"], int(record["flight"]), record["origin"], ms_to_datetime(departure).isoformat())


def _prediction_key(message):
    prediction = json.loads(message.data)
    return request_key(prediction), (prediction["probability"], prediction["source"])


def setup_tables(model_dir: str, requests_csv: str, top_n: int, work: Path) -> dict:
    """Two tables, each with the cache of one mode; the precompute summaries."""
    from skewless.beam_pipelines.commands import bigtable_setup
    from skewless.beam_pipelines.jobs import precompute

    out = {}
    for mode, extra in (
        ("measured", ["--start", PAST[0], "--end", PAST[1], "--top_n", str(top_n)]),
        ("all_hits", ["--input", requests_csv, "--top_n", "0"]),
    ):
        table = f"features-{mode.replace('_', '-')}-{uuid.uuid4().hex[:6]}"
        flags = [f"--bigtable_project={PROJECT}", f"--bigtable_instance={INSTANCE}", f"--bigtable_table={table}"]
        bigtable_setup.run(["--feature_set=flights_schedule", *flags])
        summary = precompute.run(["--model_dir", model_dir, "--output_dir", str(work / f"precompute-{mode}"),
                                  *flags, *extra])  # fmt: skip
        out[mode] = {"table": table, "precompute": summary}
    out["off"] = {"table": out["measured"]["table"], "precompute": None}
    return out


# --- the job's own code, no runner -------------------------------------------------------------


class _MemoryTable:
    """The rows of a table in memory, answering `read_rows` for the row keys asked (the read
    itself is the emulator's cost, not the job's)."""

    def __init__(self, rows: list):
        self.rows = {row.row_key: row for row in rows}

    def read_rows(self, row_set, filter_=None):
        return [self.rows[k] for k in row_set.row_keys if k in self.rows]


def job_code_us(model_dir: str, table_id: str, events: list[tuple[int, dict]], batch: int, cache: bool) -> dict:
    from google.cloud.bigtable.row_set import RowSet

    from skewless.beam_pipelines.io.bigtable import open_table
    from skewless.beam_pipelines.jobs import score_streaming as ss
    from skewless.beam_pipelines.score_core import CheckExamples, ToPredictionDict
    from skewless.examples.flights_schedule import FLIGHTS_SCHEDULE as fs
    from skewless.models.watch import WatchingModelHandler
    from skewless.transforms.record_checks import RecordChecker

    handler = WatchingModelHandler(model_dir, poll_s=3600)
    model = handler.load_model()
    row_set = RowSet()
    row_set.add_row_range_from_keys(b"", b"\xff")
    rows = list(open_table(PROJECT, INSTANCE, table_id).read_rows(row_set=row_set))
    lookup = ss._LookupAggregatesFn(fs, lambda: _MemoryTable(rows), handler if cache else None)
    lookup.setup()
    split = ss.ServeFromCache(fs)
    split.setup()
    check = CheckExamples(handler.inputs)
    check.setup()
    to_prediction = ToPredictionDict(fs)
    checker = RecordChecker(fs)
    typed = [checker.validate(dict(raw)) for _, raw in events]
    stages = ("lookup", "cache_split", "check_inputs", "inference", "to_predictions")
    calls = scored = 0
    try:
        for _ in range(2):  # the first pass warms the model's graph; the second is timed
            laps, calls, scored = Laps(stages), 0, 0
            for i in range(0, len(typed), batch):
                laps.start()
                (examples,) = lookup.process([dict(e) for e in typed[i : i + batch]])
                laps.lap("lookup")
                misses = []
                for out in split.process(examples):
                    if isinstance(out, list):
                        misses = out
                laps.lap("cache_split")
                fit = [b for b in check.process(misses)] if misses else []
                laps.lap("check_inputs")
                results = []
                for chunk in fit:
                    results += list(handler.with_no_batching().run_inference(chunk, model))
                    calls += 1
                laps.lap("inference")
                _ = [to_prediction(r) for r in results]
                scored += len(results)
                laps.lap("to_predictions")
    finally:
        model.stop()
    n = len(typed)
    return {"events": n, "batch": batch, "model_calls_per_1000": round(calls / n * 1000, 1),
            "examples_scored_per_1000": round(scored / n * 1000, 1),
            **{f"{k}_us": round(v / n * 1e6, 1) for k, v in laps.spent.items()},
            "total_us": round(sum(laps.spent.values()) / n * 1e6, 1)}  # fmt: skip


# --- the job at rate ---------------------------------------------------------------------------


def scorer_child(counters_path: str, argv: list[str]) -> None:
    """In a child process: the real streaming scorer, its counters written every second."""
    from skewless.beam_pipelines.jobs import score_streaming
    from skewless.beam_pipelines.runtime.parsing import metric_counters

    p, _ = score_streaming.make_pipeline(argv)
    result = p.run()
    while True:
        time.sleep(1.0)
        try:
            counters = metric_counters(result)
            batches = [
                r.committed.count
                for r in result.metrics().query()["distributions"]
                if r.key.metric.name.endswith("inference_request_batch_size")
            ]
            counters["model_calls"] = sum(batches)
            Path(counters_path).write_text(json.dumps(counters))
        except Exception:  # noqa: BLE001 - a read while a bundle commits: next second
            pass


def run_scorer(topics, env, table_id, model_dir, events, rate, seconds, cache, log_path) -> dict:
    from skewless.beam_pipelines.commands.replay import to_message
    from skewless.examples.flights_schedule import FLIGHTS_SCHEDULE as fs

    events_topic, events_sub = topics.pair("requests")
    out_topic, out_sub = topics.pair("predictions")
    receiver = Receiver(out_sub, _prediction_key)
    counters_path = f"{log_path}.counters.json"
    Path(counters_path).unlink(missing_ok=True)
    argv = [
        "--streaming", f"--subscription={events_sub}", f"--output_topic={out_topic}",
        f"--bigtable_project={PROJECT}", f"--bigtable_instance={INSTANCE}", f"--bigtable_table={table_id}",
        f"--model_dir={model_dir}", f"--project={PROJECT}", *(["--prediction_cache"] if cache else []),
    ]  # fmt: skip
    with open(log_path, "wb") as log:
        scorer = subprocess.Popen([sys.executable, __file__, "--_scorer", counters_path, *argv], cwd=ROOT,
                                  env={**os.environ, **env}, stdout=log, stderr=subprocess.STDOUT,
                                  start_new_session=True)  # fmt: skip
    try:
        warm = [(request_key(raw), raw, t) for t, raw in events[:WARM]]
        for key, raw, t in warm:
            topics.publisher.publish(events_topic, to_message(fs, raw), event_time=str(t)).result(timeout=30)
            if receiver.wait_for([key], 0.5):
                break
        if not receiver.wait_for([warm[0][0]], 240):
            raise SystemExit(f"the scorer never answered; see {log_path}")
        receiver.wait_for([k for k, _, _ in warm], 30)
        time.sleep(2)
        before = json.loads(Path(counters_path).read_text()) if Path(counters_path).exists() else {}
        n = int(rate * seconds)
        items = [(request_key(raw), raw, t) for t, raw in events[WARM : WARM + n]]
        cpu_before = cpu_seconds(scorer.pid)
        sent = publish_paced(topics.publisher, events_topic, items, rate,
                             lambda it: (to_message(fs, it[1]), {"event_time": str(it[2])}))  # fmt: skip
        receiver.wait_for(list(sent), max(30.0, 3 * seconds))
        cpu = cpu_seconds(scorer.pid) - cpu_before
        time.sleep(2.5)  # the counters of the last bundles
        after = json.loads(Path(counters_path).read_text())
        result = summarize(sent, receiver.arrived)
        got = result["received"] or 1
        delta = {k: after.get(k, 0) - before.get(k, 0) for k in
                 ("model_calls", "examples_scored", "prediction_cache_hits", "prediction_cache_misses")}  # fmt: skip
        result.update(
            process_cpu_us_per_event=round(cpu / got * 1e6),
            model_calls_per_1000=round(delta["model_calls"] / got * 1000, 1),
            examples_scored_per_1000=round(delta["examples_scored"] / got * 1000, 1),
            cache_share=round(delta["prediction_cache_hits"] / got, 4),
            duplicates=receiver.duplicates,
        )
        result["predictions"] = {k: receiver.versions[k] for k in sent if k in receiver.versions}
        return result
    finally:
        receiver.close()
        stop_process_group(scorer)


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--_scorer":
        return scorer_child(sys.argv[2], sys.argv[3:])
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model_dir", help="A flights_schedule model directory (default: build one).")
    parser.add_argument("--rates", type=float, nargs="+", default=[400.0, 800.0], help="Events per second.")
    parser.add_argument("--seconds", type=float, default=15.0, help="How long to publish at each rate.")
    parser.add_argument("--top_n", type=int, default=10_000, help="Keys of Sep-Oct cached (measured mode).")
    parser.add_argument("--code_batch", type=int, default=100, help="Requests per batch for the job-code cost.")
    parser.add_argument("--work_dir", default="/tmp/skewless-bench-prediction-cache")
    args = parser.parse_args()
    work = Path(args.work_dir)
    work.mkdir(parents=True, exist_ok=True)
    model_dir = str(Path(args.model_dir).resolve()) if args.model_dir else build_model(Path(tempfile.mkdtemp(dir=work)))

    from bench.schedule_cache_coverage import coverage, ms, requests
    from skewless.examples.flights_schedule import CACHE_KEY_FIELDS, FLIGHTS_SCHEDULE

    frame = requests(FLIGHTS_SCHEDULE.resolve_default_input())
    key = frame[list(CACHE_KEY_FIELDS)].astype(str).agg("|".join, axis=1)
    t = frame.event_time
    served_keys = key[t >= ms(SERVED[0])]
    hit_rate_by_n = coverage(served_keys, key[(t >= ms(PAST[0])) & (t < ms(PAST[1]))])
    hit_rate_by_n_served = coverage(served_keys, served_keys)

    events = served_requests()
    requests_csv = work / "nov_dec.csv"
    import pandas as pd

    pd.DataFrame([raw for _, raw in events]).to_csv(requests_csv, index=False)
    with pubsub_and_bigtable(work, PROJECT, INSTANCE) as emulators:
        tables = setup_tables(model_dir, str(requests_csv), args.top_n, work)
        print(json.dumps({mode: t["precompute"] for mode, t in tables.items() if t["precompute"]}), flush=True)
        code = {mode: job_code_us(model_dir, tables[mode]["table"], events[:4000], args.code_batch, mode != "off")
                for mode in MODES}  # fmt: skip
        print(json.dumps({"job_code": code}), flush=True)
        topics = Topics()
        runs, off_predictions, mismatches = [], {}, 0
        for rate in args.rates:
            for mode in MODES:
                log = str(work / f"scorer-{mode}-{int(rate)}.log")
                job = run_scorer(topics, emulators.env, tables[mode]["table"], model_dir, events, rate,
                                 args.seconds, mode != "off", log)  # fmt: skip
                predictions = job.pop("predictions")
                if mode == "off":
                    off_predictions.update({k: p for k, (p, _) in predictions.items()})
                compared = [k for k in predictions if k in off_predictions]
                bad = sum(abs(predictions[k][0] - off_predictions[k]) > 1e-9 for k in compared)
                mismatches += bad
                row = {"mode": mode, "rate": rate, "events_per_s": job["events_per_s"], "p50_s": job["p50_s"],
                       "p99_s": job["p99_s"], "job_code_us_per_event": code[mode]["total_us"],
                       "process_cpu_us_per_event": job["process_cpu_us_per_event"],
                       "model_calls_per_1000": job["model_calls_per_1000"],
                       "examples_scored_per_1000": job["examples_scored_per_1000"],
                       "cache_share": job["cache_share"], "sent": job["sent"], "received": job["received"],
                       "p90_s": job["p90_s"], "max_s": job["max_s"], "duplicates": job["duplicates"],
                       "compared_with_off": len(compared), "mismatches": bad}  # fmt: skip
                runs.append(row)
                print(json.dumps(row), flush=True)
    off, measured = code["off"], code["measured"]
    model_share = (off["inference_us"] + off["check_inputs_us"]) / off["total_us"]
    hit_rate = next(r["cache_share"] for r in runs if r["mode"] == "measured")
    figures = {
        "hit_rate": hit_rate,
        "hit_rate_by_n": hit_rate_by_n,
        "hit_rate_by_n_keys_from_served_period": hit_rate_by_n_served,
        "model_share_of_job_code": round(model_share, 3),
        "job_code_fall_predicted": round((hit_rate or 0) * model_share, 3),
        "job_code_fall_measured": round(1 - measured["total_us"] / off["total_us"], 3),
        "runs": runs,
        "mismatches": mismatches,
        "job_code": code,
        "precompute": {m: tables[m]["precompute"] for m in ("measured", "all_hits")},
    }
    print(json.dumps(figures))


if __name__ == "__main__":
    main()
