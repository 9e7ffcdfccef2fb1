"""`skewless replay`: publish raw events (default: the bundled flights) to Pub/Sub in event-time order.

Each message is one JSON record of the feature set's raw schema; its event time (derived by the
feature set, epoch ms) travels in the `--timestamp_attribute` attribute. Records that are not
valid events (schema errors, cancelled flights) are skipped and counted: they have no event time
to order or stamp them by.

- `--speedup N` paces publishing at N times event time (0: as fast as possible).
- `--shift_to_now` moves every timestamp field of the records by a whole number of periods so
  that the first event lands at the current time (window alignment is kept, so the cells equal
  the unshifted ones moved by the same amount). Other calendar fields (year, hour, ...) are
  left as they are.
- `--heartbeat_s S` also publishes a heartbeat message (attribute `skewless_heartbeat`, ignored
  by the jobs) every S seconds while publishing and for `--linger_s` after the last event. It
  carries the replay's event time (ReplayClock) in the timestamp attribute: the local runner's
  watermark follows that attribute (beam_pipelines/local_runner.py) and would otherwise stop at
  the last event, leaving its last windows open.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import threading
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

from apache_beam.options.pipeline_options import PipelineOptions

from beam_pipelines.common import configure_logging, parse_job_options
from beam_pipelines.io.pubsub import (
    DEFAULT_TIMESTAMP_ATTRIBUTE,
    HEARTBEAT_ATTRIBUTE,
    EventTimeOptions,
)
from beam_pipelines.options import FeatureSetOptions, SourceOptions, feature_set_spec
from transforms.featureset import FeatureSet, load_feature_set
from transforms.validation import (
    InvalidRecord,
    RawLine,
    RecordValidator,
    ms_to_datetime,
    to_epoch_ms,
)

LOG = logging.getLogger("skewless.replay")
DESCRIPTION = (
    "Publish raw events (default: the bundled NYC flights of 2013) to a Pub/Sub topic in "
    "event-time order, with the event time (epoch ms) in a message attribute."
)


class ReplayOptions(PipelineOptions):
    """replay's own flags; --input, --input_format and --feature_set are prepare's, and
    --timestamp_attribute is io/pubsub.py's (one declaration per flag in a process)."""

    @classmethod
    def _add_argparse_args(cls, parser):
        parser.add_argument("--topic", help="projects/P/topics/T to publish to (required).")
        parser.add_argument(
            "--start_time", help="Only events at or after this ISO-8601 instant (before any shift)."
        )
        parser.add_argument("--end_time", help="Only events before this ISO-8601 instant.")
        parser.add_argument("--limit", type=int, help="Publish at most this many events.")
        parser.add_argument(
            "--speedup",
            type=float,
            default=0.0,
            help="Publish at N times event time (e.g. 60: an hour a minute); 0 = no pacing.",
        )
        parser.add_argument(
            "--shift_to_now",
            action="store_true",
            help="Move the events by whole periods so that the first lands at the current time.",
        )
        parser.add_argument(
            "--heartbeat_s", type=float, default=0.0, help="Heartbeat interval (0: none)."
        )
        parser.add_argument(
            "--linger_s", type=float, default=0.0, help="Keep heart-beating this long at the end."
        )


class _InputFlags:
    """--input, --input_format for --help (declared by SourceOptions; replay reads files only)."""

    @classmethod
    def _add_argparse_args(cls, parser):
        parser.add_argument(
            "--input", help="CSV/Parquet/JSON-lines file. Default: the feature set's bundled input."
        )
        parser.add_argument("--input_format", choices=("csv", "parquet", "jsonl"))


@dataclass
class ReplayStats:
    published: int = 0
    skipped_invalid: int = 0
    skipped_not_events: int = 0
    heartbeats: int = 0
    shift_ms: int = 0
    first_event_ms: int | None = None
    last_event_ms: int | None = None
    extra: dict = field(default_factory=dict)


def read_raw_records(
    path: str, input_format: str | None = None, stats: ReplayStats | None = None
) -> list[dict]:
    """Raw records (dicts) of a CSV, Parquet or JSON-lines file, through the job's file readers.

    CSV lines that do not parse at all, and JSON lines that are not JSON, are counted in
    `stats.skipped_invalid`."""
    import pyarrow.parquet as pq
    from apache_beam.io.filesystems import FileSystems

    from beam_pipelines.io.files import (
        _read_bytes,
        check_input,
        detect_format,
        iter_json_lines,
        read_csv_table,
    )

    rows: list[dict] = []
    skipped = 0
    for one in check_input(path, input_format):
        fmt = input_format or detect_format(one)
        if fmt == "parquet":
            with FileSystems.open(one) as f:
                rows.extend(pq.read_table(f).to_pylist())
        elif fmt == "csv":
            table, unparseable = read_csv_table(_read_bytes(one))
            rows.extend(table.to_pylist())
            skipped += len(unparseable)
        else:
            for record in iter_json_lines(_read_bytes(one), one):  # split on "\n" only
                try:
                    if not isinstance(record, RawLine):  # not UTF-8
                        raise ValueError(record.reason)
                    rows.append(json.loads(record.text))
                except ValueError:
                    skipped += 1
    if stats is not None:
        stats.skipped_invalid += skipped
    return rows


def order_events(
    fs: FeatureSet, raws: Iterable[dict], stats: ReplayStats
) -> list[tuple[int, dict]]:
    """(event time ms, raw record) for every valid event, in event-time order (stable)."""
    validator = RecordValidator(fs)
    out = []
    for raw in raws:
        try:
            event = validator.validate(dict(raw))
        except InvalidRecord:
            stats.skipped_invalid += 1
            continue
        if event is None:
            stats.skipped_not_events += 1
            continue
        out.append((event[fs.event_time], raw))
    out.sort(key=lambda item: item[0])
    return out


def shift_for_now(fs: FeatureSet, first_event_ms: int, now_ms: int) -> int:
    """A whole number of periods that moves the first event to (just before) now."""
    period = fs.period_ms
    return ((now_ms - first_event_ms) // period) * period


def to_message(fs: FeatureSet, raw: dict, shift_ms: int = 0) -> bytes:
    """Raw record -> JSON payload; timestamp fields moved by shift_ms and written as ISO-8601."""
    out = {}
    timestamp_fields = {f.name for f in fs.schema if f.type == "timestamp"}
    for name, value in raw.items():
        if name in timestamp_fields and value is not None:
            value = ms_to_datetime(to_epoch_ms(value) + shift_ms).isoformat()
        elif isinstance(value, (dt.datetime, dt.date)):
            value = value.isoformat()
        elif isinstance(value, float) and value != value:
            value = None
        out[name] = value
    return json.dumps(out, separators=(",", ":")).encode("utf-8")


def wall_clock_ms() -> int:
    return int(time.time() * 1000)


class Heartbeat:
    """Publishes a heartbeat message every `interval_s` in a background thread.

    Each heartbeat carries `clock()` (epoch ms, default the wall clock) in the event-time
    attribute: the local runner's event-time watermark (beam_pipelines/local_runner.py) moves
    to it while no events arrive, as Dataflow's moves on for an idle subscription.
    """

    def __init__(
        self,
        publisher,
        topic: str,
        interval_s: float,
        clock=wall_clock_ms,
        timestamp_attribute: str = DEFAULT_TIMESTAMP_ATTRIBUTE,
    ):
        self.publisher = publisher
        self.topic = topic
        self.interval_s = interval_s
        self.clock = clock
        self.timestamp_attribute = timestamp_attribute
        self.count = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="skewless-heartbeat", daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            attributes = {HEARTBEAT_ATTRIBUTE: "1"}
            stamp = self.clock()
            if stamp is not None:
                attributes[self.timestamp_attribute] = str(stamp)
            self.publisher.publish(self.topic, b"", **attributes)
            self.count += 1

    def __enter__(self):
        if self.interval_s > 0:
            self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join()


class ReplayClock:
    """The replay's event time, for heartbeats: where the replayed events have got to.

    With a speedup it runs at that speed from the first event, during and after publishing;
    without one it is the last event published, and once publishing is over it jumps by
    `tail_ms` (the largest window: enough for every window of the last events to close).
    """

    def __init__(self, stats: ReplayStats, speedup: float, tail_ms: int):
        self.stats = stats
        self.speedup = speedup
        self.tail_ms = tail_ms
        self.done = False
        self._started = time.monotonic()

    def __call__(self) -> int:
        first, last = self.stats.first_event_ms, self.stats.last_event_ms
        if first is None:
            return None  # nothing published yet: the heartbeat carries no event time
        if self.speedup > 0:
            return first + int((time.monotonic() - self._started) * 1000 * self.speedup)
        return last + (self.tail_ms if self.done else 0)


def publish_events(
    publisher,
    topic: str,
    fs: FeatureSet,
    events: Sequence[tuple[int, dict]],
    *,
    shift_ms: int = 0,
    speedup: float = 0.0,
    timestamp_attribute: str = DEFAULT_TIMESTAMP_ATTRIBUTE,
    stats: ReplayStats | None = None,
) -> ReplayStats:
    """Publish (event ms, raw) pairs in the given order, paced by speedup; wait for every ack."""
    stats = stats or ReplayStats()
    stats.shift_ms = shift_ms
    futures = []
    started = time.monotonic()
    first = events[0][0] if events else 0
    for event_ms, raw in events:
        if speedup > 0:
            due = started + (event_ms - first) / 1000.0 / speedup
            delay = due - time.monotonic()
            if delay > 0:
                time.sleep(delay)
        shifted = event_ms + shift_ms
        futures.append(
            publisher.publish(
                topic, to_message(fs, raw, shift_ms), **{timestamp_attribute: str(shifted)}
            )
        )
        stats.published += 1
        if stats.first_event_ms is None:
            stats.first_event_ms = shifted
        stats.last_event_ms = shifted
    for future in futures:
        future.result(timeout=120)
    return stats


def run(argv: Sequence[str] | None = None) -> ReplayStats:
    configure_logging()
    options = parse_job_options(
        argv,
        prog="skewless replay",
        description=DESCRIPTION,
        groups=(ReplayOptions, _InputFlags, FeatureSetOptions, EventTimeOptions),
        required=((ReplayOptions, "topic"),),
    )
    opts = options.view_as(ReplayOptions)
    source = options.view_as(SourceOptions)
    timestamp_attribute = options.view_as(EventTimeOptions).timestamp_attribute
    from google.cloud import pubsub_v1

    fs = load_feature_set(feature_set_spec(options))
    path = source.input
    if path is None:
        path = fs.resolve_default_input()
        if path is None:
            raise SystemExit(f"skewless replay: feature set {fs.name!r} has no default input")
    stats = ReplayStats()
    events = order_events(fs, read_raw_records(path, source.input_format, stats), stats)
    if opts.start_time:
        events = [e for e in events if e[0] >= to_epoch_ms(opts.start_time)]
    if opts.end_time:
        events = [e for e in events if e[0] < to_epoch_ms(opts.end_time)]
    if opts.limit is not None:
        events = events[: opts.limit]
    if not events:
        raise SystemExit("skewless replay: no events to publish")
    shift_ms = shift_for_now(fs, events[0][0], int(time.time() * 1000)) if opts.shift_to_now else 0
    publisher = pubsub_v1.PublisherClient()
    LOG.info("publishing %d events to %s (shift %d ms)", len(events), opts.topic, shift_ms)
    clock = ReplayClock(stats, opts.speedup, fs.max_window_ms + fs.period_ms)
    heartbeat = Heartbeat(publisher, opts.topic, opts.heartbeat_s, clock, timestamp_attribute)
    with heartbeat:
        publish_events(
            publisher,
            opts.topic,
            fs,
            events,
            shift_ms=shift_ms,
            speedup=opts.speedup,
            timestamp_attribute=timestamp_attribute,
            stats=stats,
        )
        clock.done = True
        if opts.linger_s > 0:
            time.sleep(opts.linger_s)
    stats.heartbeats = heartbeat.count
    LOG.info("replay done: %s", stats)
    print(json.dumps(stats.__dict__, default=str))
    return stats


if __name__ == "__main__":
    run()
