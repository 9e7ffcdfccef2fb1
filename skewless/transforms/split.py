"""The train/eval split: which example goes to eval, by event time or by a stable hash of its key.

Pure: prepare applies it to the examples it writes, train re-applies it to features/ for the
baselines, and both get the same answer for the same example in every run and process.
"""

from __future__ import annotations

import datetime as dt
import zlib
from dataclasses import dataclass

import pyarrow as pa
import pyarrow.compute as pc

from skewless.transforms.featureset import FeatureSet
from skewless.transforms.record_checks import to_epoch_ms

HASH_BUCKETS = 10_000


def key_bucket(key: tuple) -> int:
    """The stable hash bucket (0 .. HASH_BUCKETS - 1) of an example key: crc32 of its repr, so
    the same key gets the same bucket in every run and process (the hashed split, the serving
    log's sample)."""
    return zlib.crc32(repr(key).encode()) % HASH_BUCKETS


@dataclass(frozen=True)
class Split:
    """A deterministic train/eval split: by event time, or by a stable hash of the example key."""

    eval_start_ms: int | None = None
    eval_fraction: float | None = None
    key_fields: tuple[str, ...] = ()

    @classmethod
    def from_settings(
        cls, fs: FeatureSet, eval_start: str | None = None, eval_fraction: float | None = None
    ) -> Split:
        """The split asked for (a fraction wins over a start), else the feature set's default:
        a time split at `fs.eval_start` when it has one, else a hashed `fs.eval_fraction`."""
        key_fields = tuple(fs.example_key)
        if eval_fraction is not None:
            if not 0.0 <= eval_fraction <= 1.0:
                raise ValueError(f"--eval_fraction must be in [0, 1], got {eval_fraction}")
            return cls(eval_fraction=eval_fraction, key_fields=key_fields)
        eval_start = eval_start or fs.eval_start
        if eval_start:
            return cls(eval_start_ms=to_epoch_ms(eval_start), key_fields=key_fields)
        return cls(eval_fraction=fs.eval_fraction, key_fields=key_fields)

    @classmethod
    def from_description(cls, fs: FeatureSet, described: dict | None) -> Split:
        """The split `describe()` recorded (prepare's summary), or the feature set's default."""
        described = described or {}
        return cls.from_settings(fs, described.get("eval_start"), described.get("eval_fraction"))

    def is_eval(self, fs: FeatureSet, batch: pa.RecordBatch) -> pa.Array:
        """A boolean per example of `batch`: True for eval."""
        if self.eval_start_ms is not None:
            times = batch.column(fs.event_time).cast(pa.int64())
            return pc.greater_equal(times, self.eval_start_ms)
        cols = [batch.column(k).to_pylist() for k in self.key_fields]
        threshold = int(self.eval_fraction * HASH_BUCKETS)
        return pa.array(
            [key_bucket(key) < threshold for key in zip(*cols, strict=True)], type=pa.bool_()
        )

    def describe(self) -> dict:
        if self.eval_start_ms is not None:
            start = dt.datetime.fromtimestamp(self.eval_start_ms / 1000, dt.UTC).isoformat()
            return {"mode": "time", "eval_start": start}
        return {"mode": "hash", "eval_fraction": self.eval_fraction, "key": list(self.key_fields)}
