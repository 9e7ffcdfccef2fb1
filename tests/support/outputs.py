"""Readers of what the jobs write, for comparisons: TFRecord examples and the features/ Parquet."""

from __future__ import annotations

from pathlib import Path

EXAMPLE_KEY_ORDER = ["carrier", "flight", "origin", "scheduled_departure"]


def read_tfrecords(pattern_dir: Path, spec: dict) -> list[dict]:
    """Every gzip TFRecord example under `pattern_dir`, parsed with the feature `spec`."""
    import tensorflow as tf

    files = sorted(str(p) for p in pattern_dir.glob("*.tfrecord.gz"))
    rows = []
    for record in tf.data.TFRecordDataset(files, compression_type="GZIP"):
        rows.append(tf.io.parse_single_example(record, spec))
    return rows


def sorted_features(out: Path, order: list[str] = EXAMPLE_KEY_ORDER) -> list[dict]:
    """prepare's features/ rows sorted by the flights' example key."""
    import pyarrow.parquet as pq

    return pq.read_table(out / "features").sort_by([(k, "ascending") for k in order]).to_pylist()
