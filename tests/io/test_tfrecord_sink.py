"""The TFRecord sink: every example written once, a bundle's batches in order, a failure fails
the job and leaves no shard."""

from __future__ import annotations

import gzip

import apache_beam as beam
import numpy as np
import pyarrow as pa
import pytest
import tensorflow as tf
from apache_beam.metrics.metric import MetricsFilter
from apache_beam.testing.test_pipeline import TestPipeline

from skewless.beam_pipelines.io import file_sinks as sinks

ROWS = 1_000
BATCHES = 25


def batch(i: int) -> pa.RecordBatch:
    """Rows as tf.Transform outputs them: each value a list of one."""
    x = np.arange(i * ROWS, (i + 1) * ROWS, dtype=np.int64)
    return pa.RecordBatch.from_pydict(
        {"x": [[int(v)] for v in x], "name": [[f"n{v}".encode()] for v in x]}
    )


def read_back(directory) -> list[list[int]]:
    """Per shard file, its x values in file order."""
    spec = {"x": tf.io.FixedLenFeature([], tf.int64), "name": tf.io.FixedLenFeature([], tf.string)}
    shards = []
    for path in sorted(directory.glob("train-*.tfrecord.gz")):
        xs = []
        for record in tf.data.TFRecordDataset(str(path), compression_type="GZIP"):
            parsed = tf.io.parse_single_example(record, spec)
            assert parsed["name"].numpy() == f"n{int(parsed['x'])}".encode()
            xs.append(int(parsed["x"]))
        shards.append(xs)
    return shards


@pytest.mark.timeout(300)
def test_every_example_is_written_once_each_shard_in_bundle_order(tmp_path):
    batches = [batch(i) for i in range(BATCHES)] + [batch(0).slice(0, 0)]
    with TestPipeline(runner="FnApiRunner") as p:
        _ = (
            p
            | beam.Create(batches, reshuffle=False)
            | sinks.WriteTFRecords(str(tmp_path / "out" / "train"), "examples_written")
        )
    shards = read_back(tmp_path / "out")
    assert sorted(x for shard in shards for x in shard) == list(range(BATCHES * ROWS))
    for shard in shards:  # a bundle's batches arrive in order; each keeps its rows' order
        runs = [shard[i : i + ROWS] for i in range(0, len(shard), ROWS)]
        assert all(r == list(range(r[0], r[0] + ROWS)) for r in runs)


class _FailingEncoder:
    def __init__(self):
        self.batches = 0

    def encode(self, record_batch):
        self.batches += 1
        if self.batches == 3:
            raise ValueError("cannot encode this batch")
        return [b"x"] * record_batch.num_rows


@pytest.mark.timeout(300)
def test_a_failure_while_encoding_fails_the_job_and_leaves_no_shard(tmp_path, monkeypatch):
    monkeypatch.setattr(sinks, "RecordBatchToExamplesEncoder", _FailingEncoder)
    with pytest.raises(Exception, match="cannot encode this batch"):
        with TestPipeline(runner="FnApiRunner") as p:
            _ = (
                p
                | beam.Create([batch(i) for i in range(BATCHES)], reshuffle=False)
                | sinks.WriteTFRecords(str(tmp_path / "out" / "train"), "examples_written")
            )
    assert not list((tmp_path / "out").glob("train-*"))


def test_the_framing_is_tensorflows_record_format_byte_for_byte(tmp_path):
    records = [b"", b"x", bytes(range(256)) * 40, *(f"example {i}".encode() for i in range(100))]
    path = str(tmp_path / "tf.tfrecord")
    with tf.io.TFRecordWriter(path) as writer:
        for record in records:
            writer.write(record)
    with open(path, "rb") as f:
        assert sinks.frame_records(records) == f.read()


@pytest.mark.timeout(300)
def test_a_shard_is_gzip_members_read_whole_and_every_example_counted(tmp_path):
    """Several batches in one bundle: one gzip member each, one file that TensorFlow's reader
    (which checks every CRC) and Python's gzip read whole; the counter counts every example."""
    with TestPipeline(runner="FnApiRunner") as p:
        _ = (
            p
            | beam.Create([batch(i) for i in range(BATCHES)], reshuffle=False)
            | sinks.WriteTFRecords(str(tmp_path / "out" / "train"), "examples_written")
        )
    result = p.result
    shards = sorted((tmp_path / "out").glob("train-*.tfrecord.gz"))
    members = 0
    for path in shards:
        data = path.read_bytes()
        members += data.count(b"\x1f\x8b\x08")  # each member starts with gzip's magic + deflate
        assert len(gzip.decompress(data)) == sum(
            len(r.numpy()) + 16 for r in tf.data.TFRecordDataset(str(path), compression_type="GZIP")
        )
    assert members >= BATCHES
    assert sorted(x for shard in read_back(tmp_path / "out") for x in shard) == list(
        range(BATCHES * ROWS)
    )
    counters = result.metrics().query(MetricsFilter().with_name("examples_written"))["counters"]
    assert sum(c.committed for c in counters) == BATCHES * ROWS
