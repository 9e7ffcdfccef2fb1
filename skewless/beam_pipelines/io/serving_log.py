"""The serving log's files: streaming scoring writes its sampled records as JSON lines, windowed
by processing time; audit (and validate) read them back.

Layout: `--serving_log` is a directory (local or gs://); each window of `window_s` seconds of
scoring writes `serving_log-{window start}-{window end}-{pane}-{shard}-of-{n}.jsonl` (a late
pane gets its own file instead of replacing the window's). Record format:
skewless/transforms/consistency.py.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from dataclasses import dataclass

import apache_beam as beam
from apache_beam.io import fileio
from apache_beam.io.filesystems import FileSystems
from apache_beam.transforms import trigger, window
from apache_beam.utils.timestamp import Duration

FILE_PREFIX = "serving_log"
SUFFIX = ".jsonl"
LATE_WINDOWS = 10  # a record up to this many windows late still gets written (its own pane)


def log_glob(path: str) -> str:
    """The files of a serving log: a directory's *.jsonl, or a glob / file as given."""
    if any(ch in path for ch in "*?[") or path.endswith(SUFFIX):
        return path
    return FileSystems.join(path.rstrip("/"), f"*{SUFFIX}")


class _FileNaming:
    """Window, pane and shard in the name: a late pane of a window writes a new file."""

    def __call__(self, win, pane, shard_index, total_shards, compression, destination) -> str:
        parts = [FILE_PREFIX]
        if isinstance(win, window.IntervalWindow):
            parts += [
                win.start.to_utc_datetime().strftime("%Y%m%dT%H%M%S"),
                win.end.to_utc_datetime().strftime("%Y%m%dT%H%M%S"),
            ]
        parts.append(f"p{pane.index if pane is not None else 0}")
        if shard_index is not None:
            parts.append(f"{int(shard_index):05d}-of-{int(total_shards or 0):05d}")
        return "-".join(parts) + SUFFIX


class _StampNow(beam.DoFn):
    """Log records -> JSON lines stamped with the time they were logged (processing time: the
    scorer's elements carry their Pub/Sub publish time, or none once batched)."""

    def process(self, record: dict) -> Iterator:
        yield window.TimestampedValue(json.dumps(record, separators=(",", ":")), time.time())


class WriteServingLog(beam.PTransform):
    """Serving log records (dicts) -> JSON-lines files under `path`, one set per window."""

    def __init__(self, path: str, sample: float, window_s: int = 60):
        super().__init__()
        if window_s <= 0:
            raise ValueError(f"--serving_log_window_s must be positive, got {window_s}")
        self.path = path
        self.sample = sample
        self.window_s = window_s

    def expand(self, records):
        return (
            records
            | "StampNow" >> beam.ParDo(_StampNow())
            | "Window"
            >> beam.WindowInto(
                window.FixedWindows(self.window_s),
                trigger=trigger.AfterWatermark(late=trigger.AfterCount(1)),
                accumulation_mode=trigger.AccumulationMode.DISCARDING,
                allowed_lateness=Duration(seconds=LATE_WINDOWS * self.window_s),
            )
            | "WriteFiles"
            >> fileio.WriteToFiles(
                self.path, file_naming=_FileNaming(), sink=fileio.TextSink, shards=1
            )
        )


class ReadServingLog(beam.PTransform):
    """Serving log files (a directory, glob or file) -> records (dicts)."""

    def __init__(self, path: str):
        super().__init__()
        self.path = path

    def expand(self, pbegin):
        return (
            pbegin
            | "ReadLines" >> beam.io.ReadFromText(log_glob(self.path))
            | "Parse" >> beam.Map(json.loads)
        )


@dataclass(frozen=True)
class LogSummary:
    """What the audit needs to know before it builds its pipeline: the model versions named in
    the log (events per version) and the span of the logged event times."""

    files: int
    events: int
    versions: dict[int, int]
    start_ms: int | None
    end_ms: int | None


def scan_serving_log(path: str) -> LogSummary:
    """One pass over a serving log's lines in this process (a sample: small). ValueError when
    there are no files or a line is not a log record."""
    found = FileSystems.match([log_glob(path)])[0].metadata_list
    if not found:
        raise ValueError(f"--serving_log {path!r}: no serving log files ({log_glob(path)})")
    versions: dict[int, int] = {}
    times: list[int] = []
    for meta in found:
        with FileSystems.open(meta.path) as f:
            for number, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                    version = int(record["model_version"])
                    times.append(int(record["event_time"]))
                except (ValueError, KeyError, TypeError) as exc:
                    raise ValueError(
                        f"--serving_log: {meta.path} line {number} is not a serving log record "
                        f"({type(exc).__name__}: {exc})"
                    ) from None
                versions[version] = versions.get(version, 0) + 1
    return LogSummary(
        len(found), len(times), versions, min(times, default=None), max(times, default=None)
    )
