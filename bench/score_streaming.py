"""Benchmark: streaming scoring at rate on the emulators: sustained events/s and publish -> prediction latency.

Setup: a Pub/Sub and a Bigtable emulator; the Bigtable cells of the published flights written by
the batch backfill through the aggregate job's Bigtable sink (so every lookup hits real rows).
For each local Pub/Sub read setting (`--pulls`: messages per pull of the local runner's read;
1000 is the patched read `score --streaming` uses, 10 is Beam's own) and each offered rate
(`--rates`), a fresh scorer process runs the real job (`score_streaming.make_pipeline`, local
runner), real flights are published one by one at the rate for `--seconds`, and each event's
latency is the time its prediction (matched by flight key) reached a streaming-pull subscriber
of the output topic minus the time just before its publish call. Sustained events/s = events
received / (last arrival - first publish).

Next to each figure, measured in the same run:
- floor: the emulator's own publish -> streaming-pull round trip at the same rate (no job), and
  one Bigtable `read_rows` of a bundle's rows;
- ceiling: the local runner alone, `ReadFromPubSub` -> count with the same read setting, fed a
  backlog (the most the runner can read, before any of the job's work);
- job code: microseconds per event of the job's own code called directly, no runner (payload,
  validation, the as-of cell keys and lookup, the model-input check, the inference batch with
  its model call, the prediction and its message), on batches of `--code_batch` events.

Ends with one JSON line: {"results": [{rate, pull_max_messages, events_per_s, p50_s, p99_s,
job_code_us_per_event, floor_*, ceiling_events_per_s, ...}], "floor": ..., "ceiling": ...,
"job_code": ...}. `--profile DIR` runs each scorer under py-spy (`pip install py-spy`) and
splits its samples into runner and job code.

Usage: .venv/bin/python bench/score_streaming.py [--model_dir out/demo/models] [--rates 50 200 400]
           [--seconds 15] [--pulls 1000 10] [--profile /tmp/score-prof]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tests.support.ceiling import runner_ceiling as drain_ceiling  # noqa: E402
from tests.support.emulators import pubsub_and_bigtable  # noqa: E402
from tests.support.flights_data import departures_from  # noqa: E402
from tests.support.traffic import Receiver, publish_paced  # noqa: E402

PROJECT, INSTANCE = "skewless-bench", "bench"
FIRST_DAY = "2013-01-06"
WARM = 20  # events published one by one until the scorer answers (imports, model load)
BEAM_PULL = 10  # messages per pull of Beam 2.77's own local Pub/Sub read


def flights(n: int) -> list[tuple[int, dict]]:
    """(event time, raw record) of at least n departures from FIRST_DAY on, in event-time order."""
    return departures_from(FIRST_DAY, n)


def write_cells(table_id: str, events: list[tuple[int, dict]], fs=None) -> None:
    """The batch backfill of these flights through the aggregate job's Bigtable sink (feature
    set `fs`, default the bundled flights)."""
    import apache_beam as beam
    from apache_beam.options.pipeline_options import PipelineOptions

    from skewless.beam_pipelines.commands.bigtable_setup import ensure_table
    from skewless.beam_pipelines.io.bigtable import WriteCells
    from skewless.examples.flights import FLIGHTS
    from skewless.transforms.aggregations import ComputeAggregates
    from skewless.transforms.record_checks import RecordChecker

    fs = fs or FLIGHTS
    ensure_table(PROJECT, INSTANCE, table_id, fs, 600, 20 * 365 * 86_400)
    validator = RecordChecker(fs)
    typed = [validator.validate(dict(raw)) for _, raw in events]
    with beam.Pipeline(options=PipelineOptions([], runner="FnApiRunner")) as p:
        _ = p | beam.Create(typed) | ComputeAggregates(fs) | WriteCells(PROJECT, INSTANCE, table_id, fs.name)


def flight_key(record: dict) -> tuple:
    from skewless.examples.flights import FLIGHTS
    from skewless.transforms.record_checks import RecordChecker, ms_to_datetime

    if "probability" in record:  # a prediction: timestamps are ISO text already
        return (record["carrier"], int(record["flight"]), record["origin"], record["scheduled_departure"])
    event = RecordChecker(FLIGHTS).validate(dict(record))
    return (event["carrier"], event["flight"], event["origin"], ms_to_datetime(event["scheduled_departure"]).isoformat())


def _prediction_key(message):
    prediction = json.loads(message.data)
    return flight_key(prediction), prediction["model_version"]


def _echo_key(message):
    return message.attributes["key"], None


def summarize(sent: dict, arrived: dict) -> dict:
    import numpy as np

    got = [k for k in sent if k in arrived]
    if not got:
        return {"sent": len(sent), "received": 0, "events_per_s": 0.0, "p50_s": None, "p99_s": None}
    latencies = np.array([arrived[k] - sent[k] for k in got])
    span = max(arrived[k] for k in got) - min(sent.values())
    return {
        "sent": len(sent),
        "received": len(got),
        "events_per_s": round(len(got) / span, 1),
        "p50_s": round(float(np.percentile(latencies, 50)), 3),
        "p90_s": round(float(np.percentile(latencies, 90)), 3),
        "p99_s": round(float(np.percentile(latencies, 99)), 3),
        "max_s": round(float(latencies.max()), 3),
    }


class Topics:
    """Fresh topics and subscriptions on the emulator, named uniquely per use."""

    def __init__(self):
        from google.cloud import pubsub_v1

        self.publisher = pubsub_v1.PublisherClient(
            batch_settings=pubsub_v1.types.BatchSettings(max_messages=100, max_latency=0.001)
        )
        self.subscriber = pubsub_v1.SubscriberClient()

    def pair(self, name: str) -> tuple[str, str]:
        tag = f"{name}-{uuid.uuid4().hex[:8]}"
        topic = f"projects/{PROJECT}/topics/{tag}"
        sub = f"projects/{PROJECT}/subscriptions/{tag}"
        self.publisher.create_topic(name=topic)
        self.subscriber.create_subscription(name=sub, topic=topic, ack_deadline_seconds=60)
        return topic, sub


# --- floor -----------------------------------------------------------------------------------


def pubsub_floor(topics: Topics, rate: float, n: int) -> dict:
    """The emulator's own publish -> streaming-pull round trip at `rate`, no job in between."""
    topic, sub = topics.pair("echo")
    echo = Receiver(sub, _echo_key)
    sent = publish_paced(topics.publisher, topic, [(f"k{i}",) for i in range(n)], rate, lambda it: (b"x", {"key": it[0]}))
    echo.wait_for(list(sent), 60)
    echo.close()
    return summarize(sent, echo.arrived)


def bigtable_floor(table_id: str, events: list[tuple[int, dict]], batch: int, repeats: int = 30) -> dict:
    """One read_rows of the cells `batch` events need, as the job issues it (median, p99 ms)."""
    import numpy as np

    from skewless.beam_pipelines.io.bigtable import open_table
    from skewless.beam_pipelines.io.online_store import cell_keys, read_cells_of
    from skewless.examples.flights import FLIGHTS
    from skewless.transforms.record_checks import RecordChecker

    validator = RecordChecker(FLIGHTS)
    table = open_table(PROJECT, INSTANCE, table_id)
    times, found = [], 0
    for i in range(repeats):
        chunk = [validator.validate(dict(raw)) for _, raw in events[i * batch : (i + 1) * batch]]
        keys = [k for e in chunk for k in cell_keys(FLIGHTS, e)]
        t0 = time.perf_counter()
        found += len(read_cells_of(table, FLIGHTS.name, keys))
        times.append(time.perf_counter() - t0)
    return {
        "events_per_read": batch,
        "read_p50_ms": round(float(np.percentile(times, 50)) * 1000, 2),
        "read_p99_ms": round(float(np.percentile(times, 99)) * 1000, 2),
        "rows_found_per_read": round(found / repeats, 1),
    }


# --- the runner's ceiling --------------------------------------------------------------------


def ceiling_child(subscription: str, pull: int, expect: int) -> None:
    """In a child process: ReadFromPubSub -> count on the local runner, `pull` messages per pull."""
    measured = drain_ceiling(subscription, expect, PROJECT, pull, timeout_s=180, poll_s=0.02)
    print(json.dumps(measured), flush=True)
    os._exit(0)


def runner_ceiling(topics: Topics, events: list[tuple[int, dict]], pull: int, env: dict) -> dict:
    """Messages/s of the local runner's read -> count, on a backlog of the same flight messages."""
    from skewless.beam_pipelines.commands.replay import to_message
    from skewless.examples.flights import FLIGHTS

    topic, sub = topics.pair("ceiling")
    futures = [topics.publisher.publish(topic, to_message(FLIGHTS, raw), event_time=str(t)) for t, raw in events]
    for f in futures:
        f.result(timeout=60)
    out = subprocess.run(
        [sys.executable, __file__, "--_ceiling", sub, str(pull), str(len(events))],
        cwd=ROOT, env={**os.environ, **env}, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    lines = [line for line in out.stdout.splitlines() if line.startswith("{")]
    if not lines:
        raise SystemExit(f"the ceiling pipeline failed:\n{out.stderr[-3000:]}")
    return json.loads(lines[-1])


# --- the job's own code, no runner -----------------------------------------------------------


class _DictTable:
    """A Bigtable table stand-in over rows read once from the emulator (no I/O in the timing)."""

    def __init__(self, rows: list):
        self.rows = {r.row_key: r for r in rows}

    def read_rows(self, row_set, filter_=None):
        return [self.rows[k] for k in row_set.row_keys if k in self.rows]


class Laps:
    """Seconds spent per stage, summed over laps."""

    def __init__(self, stages):
        self.spent = dict.fromkeys(stages, 0.0)
        self._t = time.perf_counter()

    def start(self) -> None:
        self._t = time.perf_counter()

    def lap(self, stage: str) -> None:
        now = time.perf_counter()
        self.spent[stage] += now - self._t
        self._t = now


def job_code_cost_us(table_id: str, events: list[tuple[int, dict]], model_dir: str, batch: int) -> dict:
    """Microseconds per event of the job's own DoFns called directly (no runner) on batches of
    `batch` events, the Bigtable rows served from memory (the read itself is in the floor)."""
    from apache_beam.io.gcp.pubsub import PubsubMessage
    from google.cloud.bigtable.row_set import RowSet

    from skewless.beam_pipelines.commands.replay import to_message
    from skewless.beam_pipelines.io.bigtable import open_table
    from skewless.beam_pipelines.io.pubsub import _ParseMessages
    from skewless.beam_pipelines.jobs import score_streaming as ss
    from skewless.beam_pipelines.score_core import CheckExamples, ToPredictionDict
    from skewless.examples.flights import FLIGHTS
    from skewless.models.watch import WatchingModelHandler
    from skewless.transforms.record_checks import CheckRecordsFn

    handler = WatchingModelHandler(model_dir, poll_s=3600)
    model = handler.load_model()
    row_set = RowSet()
    row_set.add_row_range_from_keys(b"", b"\xff")
    rows = list(open_table(PROJECT, INSTANCE, table_id).read_rows(row_set=row_set))
    fns = {
        "payloads": _ParseMessages("event_time", FLIGHTS),
        "validate": CheckRecordsFn(FLIGHTS),
        "lookup": ss._LookupAggregatesFn(FLIGHTS, lambda: _DictTable(rows)),
        "check_inputs": CheckExamples(handler.inputs),
    }
    for fn in fns.values():
        fn.setup()
    to_prediction = ToPredictionDict(FLIGHTS)
    messages = [PubsubMessage(to_message(FLIGHTS, raw), {"event_time": str(t)}) for t, raw in events]
    stages = ("payloads", "validate", "lookup", "check_inputs", "inference", "to_predictions", "to_messages")
    try:
        for _ in range(2):  # the first pass warms the model's graph; the second is timed
            laps = Laps(stages)
            out = 0
            for i in range(0, len(messages), batch):
                laps.start()
                payloads = [p.value for m in messages[i : i + batch] for p in fns["payloads"].process(m)]
                laps.lap("payloads")
                typed = [e for p in payloads for e in fns["validate"].process(p)]
                laps.lap("validate")
                (examples,) = fns["lookup"].process(typed)
                laps.lap("lookup")
                (fit,) = fns["check_inputs"].process(examples)
                laps.lap("check_inputs")
                results = list(handler.with_no_batching().run_inference(fit, model))
                laps.lap("inference")
                predictions = [to_prediction(r) for r in results]
                laps.lap("to_predictions")
                out += len([ss.to_prediction_message(p) for p in predictions])
                laps.lap("to_messages")
    finally:
        model.stop()
    n = len(messages)
    if out != n:
        raise SystemExit(f"the job's code scored {out} of {n} events")
    return {"events": n, "batch": batch, **{f"{k}_us": round(v / n * 1e6, 1) for k, v in laps.spent.items()},
            "total_us": round(sum(laps.spent.values()) / n * 1e6, 1)}  # fmt: skip


# --- the job at rate -------------------------------------------------------------------------


def scorer_child(pull: int, argv: list[str]) -> None:
    """In a child process: the real streaming scorer, its local read set to `pull` per pull."""
    from skewless.beam_pipelines.jobs import score_streaming
    from skewless.beam_pipelines.runtime.local_runner import patch_local_pubsub_read

    p, _ = score_streaming.make_pipeline(argv)
    patch_local_pubsub_read(max_messages=pull)  # replaces the job's setting (same evaluator code)
    p.run().wait_until_finish()


def run_scorer(topics, env, table_id, model_dir, events, rate, seconds, pull, log_path, profile) -> dict:
    from skewless.beam_pipelines.commands.replay import to_message
    from skewless.examples.flights import FLIGHTS

    events_topic, events_sub = topics.pair("events")
    out_topic, out_sub = topics.pair("predictions")
    dead_topic, _ = topics.pair("dead")
    receiver = Receiver(out_sub, _prediction_key)
    argv = [
        "--streaming", f"--subscription={events_sub}", f"--output_topic={out_topic}",
        f"--dead_letter_topic={dead_topic}", f"--bigtable_project={PROJECT}", f"--bigtable_instance={INSTANCE}",
        f"--bigtable_table={table_id}", f"--model_dir={model_dir}", f"--project={PROJECT}",
    ]  # fmt: skip
    command = [sys.executable, __file__, "--_scorer", str(pull), *argv]
    if profile:
        command = [shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy"), "record", "--rate", "100",
                   "--format", "raw", "--threads", "--gil", "-o", profile, "--", *command]  # fmt: skip
    with open(log_path, "wb") as log:
        scorer = subprocess.Popen(
            command, cwd=ROOT, env={**os.environ, **env}, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )
    try:
        started = time.perf_counter()
        # Every message carries its event time as the attribute the scorer reads (a message
        # without one is a dead letter, as aggregate's).
        warm = [(flight_key(raw), raw, t) for t, raw in events[:WARM]]
        for key, raw, t in warm:
            topics.publisher.publish(events_topic, to_message(FLIGHTS, raw), event_time=str(t)).result(timeout=30)
            if receiver.wait_for([key], 0.5):
                break
        if not receiver.wait_for([warm[0][0]], 240):
            raise SystemExit(f"the scorer never answered; see {log_path}")
        startup_s = time.perf_counter() - started
        receiver.wait_for([k for k, _, _ in warm], 30)

        n = int(rate * seconds)
        items = [(flight_key(raw), raw, t) for t, raw in events[WARM : WARM + n]]
        cpu_before = None if profile else cpu_seconds(scorer.pid)
        sent = publish_paced(topics.publisher, events_topic, items, rate, lambda it: (to_message(FLIGHTS, it[1]), {"event_time": str(it[2])}))
        receiver.wait_for(list(sent), max(30.0, 3 * seconds))
        result = summarize(sent, receiver.arrived)
        if cpu_before is not None and result["received"]:
            result["process_cpu_us_per_event"] = round((cpu_seconds(scorer.pid) - cpu_before) / result["received"] * 1e6)
        result["startup_s"] = round(startup_s, 1)
        result["duplicates"] = receiver.duplicates
        result["model_versions"] = sorted({receiver.versions[k] for k in sent if k in receiver.versions})
        return result
    finally:
        receiver.close()
        if profile:
            os.kill(scorer.pid, signal.SIGINT)  # py-spy writes its samples and stops the job
            try:
                scorer.wait(timeout=60)
            except subprocess.TimeoutExpired:
                pass
        stop_process_group(scorer)


def stop_process_group(process: subprocess.Popen) -> None:
    """SIGTERM the process group of a child started with start_new_session; SIGKILL after 20 s."""
    try:
        os.killpg(process.pid, signal.SIGTERM)
        process.wait(timeout=20)
    except ProcessLookupError:
        pass
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of a process so far (all its threads)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


# --- profile: runner vs job ------------------------------------------------------------------

_OURS = ("(skewless/",)  # py-spy prints paths from sys.path
_INFERENCE = ("(tensorflow/", "(keras/")
_CLIENTS = ("(grpc/", "(bigtable/", "(api_core/", "(pubsub_v1/", "(google/", "(proto/")


def split_profile(path: str) -> dict:
    """py-spy samples (taken with --gil: the thread holding the GIL, i.e. the Python work of a
    GIL-bound process) of the pipeline's worker threads -> shares: the job's own code (its
    frames, innermost), the model call (TensorFlow under it), the Bigtable/Pub/Sub clients
    called by the job, and the runner (everything else: the local runner, Beam's transforms,
    the Pub/Sub read patch). The one model load at start is left out."""
    shares = {"job_code": 0, "model_call": 0, "job_io_clients": 0, "runner": 0}
    for line in Path(path).read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        frames = stack.split(";")
        if "ExecutorServiceWorker" not in frames[0] or any("load_model" in f for f in frames):
            continue  # not a pipeline thread (main thread, gRPC pollers, watcher), or the load
        ours = [i for i, f in enumerate(frames) if f.rpartition(" ")[2].startswith(_OURS) and "local_runner" not in f]
        if not ours:
            shares["runner"] += int(count)
            continue
        below = frames[ours[-1] + 1 :]
        if any(f.rpartition(" ")[2].startswith(_INFERENCE) for f in below):
            shares["model_call"] += int(count)
        elif any(f.rpartition(" ")[2].startswith(_CLIENTS) for f in below):
            shares["job_io_clients"] += int(count)
        else:
            shares["job_code"] += int(count)
    total = sum(shares.values()) or 1
    return {**{k: round(v / total, 3) for k, v in shares.items()}, "samples": total}


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--_scorer":
        return scorer_child(int(sys.argv[2]), sys.argv[3:])
    if len(sys.argv) > 1 and sys.argv[1] == "--_ceiling":
        return ceiling_child(sys.argv[2], int(sys.argv[3]), int(sys.argv[4]))
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model_dir", default=str(ROOT / "out" / "demo" / "models"))
    parser.add_argument("--rates", type=float, nargs="+", default=[50.0, 200.0, 400.0], help="Events per second.")
    parser.add_argument("--seconds", type=float, default=15.0, help="How long to publish at each rate.")
    parser.add_argument("--pulls", type=int, nargs="+", default=[1000, BEAM_PULL],
                        help="Messages per pull of the local runner's Pub/Sub read (10 = Beam's own).")  # fmt: skip
    parser.add_argument("--ceiling_events", type=int, default=6000, help="Backlog read by the ceiling pipeline.")
    parser.add_argument("--code_batch", type=int, default=100, help="Events per batch for the job-code cost.")
    parser.add_argument("--profile", help="Directory for py-spy profiles of each scorer run (runner vs job split).")
    parser.add_argument("--log_dir", default="/tmp/skewless-bench-score-streaming")
    args = parser.parse_args()
    model_dir = str(Path(args.model_dir).resolve())

    from skewless.models.versions import ModelDirError, resolve

    try:
        resolve(model_dir)
    except ModelDirError as exc:
        raise SystemExit(f"{exc}: run `make demo` first or pass --model_dir") from None
    Path(args.log_dir).mkdir(parents=True, exist_ok=True)
    if args.profile:
        Path(args.profile).mkdir(parents=True, exist_ok=True)

    with pubsub_and_bigtable(Path(args.log_dir), PROJECT, INSTANCE) as emulators:
        env = emulators.env
        n_max = int(max(args.rates) * args.seconds)
        events = flights(max(n_max + WARM, args.ceiling_events))
        table_id = f"features-{uuid.uuid4().hex[:8]}"
        write_cells(table_id, events)
        topics = Topics()

        job_code = job_code_cost_us(table_id, events[:3000], model_dir, args.code_batch)
        print(json.dumps({"job_code": job_code}), flush=True)
        floor = {"bigtable": bigtable_floor(table_id, events, 10), "pubsub": {}}
        ceiling = {}
        for pull in args.pulls:
            ceiling[str(pull)] = runner_ceiling(topics, events[: args.ceiling_events], pull, env)
            print(json.dumps({"ceiling": {"pull_max_messages": pull, **ceiling[str(pull)]}}), flush=True)
        results = []
        for rate in args.rates:
            floor["pubsub"][str(int(rate))] = echo = pubsub_floor(topics, rate, int(rate * args.seconds))
            for pull in args.pulls:
                log = f"{args.log_dir}/scorer-{int(rate)}-{pull}.log"
                profile = f"{args.profile}/scorer-{int(rate)}-{pull}.txt" if args.profile else None
                job = run_scorer(topics, env, table_id, model_dir, events, rate, args.seconds, pull, log, profile)
                row = {
                    "rate": rate, "pull_max_messages": pull, "events_per_s": job["events_per_s"],
                    "p50_s": job["p50_s"], "p99_s": job["p99_s"], "job_code_us_per_event": job_code["total_us"],
                    "floor_events_per_s": echo["events_per_s"], "floor_p50_s": echo["p50_s"],
                    "floor_p99_s": echo["p99_s"], "ceiling_events_per_s": ceiling[str(pull)]["events_per_s"],
                    "sent": job["sent"], "received": job["received"], "p90_s": job["p90_s"], "max_s": job["max_s"],
                    "duplicates": job["duplicates"], "startup_s": job["startup_s"], "model_versions": job["model_versions"],
                    "process_cpu_us_per_event": job.get("process_cpu_us_per_event"),
                }  # fmt: skip
                if row["process_cpu_us_per_event"]:  # the rest of the scorer's CPU: runner, clients, threads
                    row["job_code_share_of_cpu"] = round(job_code["total_us"] / row["process_cpu_us_per_event"], 3)
                if profile:
                    row["profile"] = split_profile(profile)
                results.append(row)
                print(json.dumps(row), flush=True)
        print(json.dumps({"results": results, "floor": floor, "ceiling": ceiling, "job_code": job_code}))


if __name__ == "__main__":
    main()
