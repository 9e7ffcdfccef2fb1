"""Sinks at the edge of the pipelines: dead letters, the features Parquet, gzip TFRecords."""

from __future__ import annotations

import json
import os
import uuid

import apache_beam as beam
import pyarrow as pa
from apache_beam.metrics import Metrics
from apache_beam.transforms.window import GlobalWindow
from apache_beam.utils.timestamp import MIN_TIMESTAMP
from apache_beam.utils.windowed_value import WindowedValue
from tfx_bsl.coders.example_coder import RecordBatchToExamplesEncoder

NAMESPACE = "skewless"


class WriteDeadLetters(beam.PTransform):
    """Dead-letter dicts -> JSON lines under `prefix` (one object a line, stage and reason first)."""

    def __init__(self, prefix: str):
        super().__init__()
        self.prefix = prefix

    def expand(self, dead):
        return (
            dead
            | "ToJson" >> beam.Map(json.dumps, sort_keys=False)
            | "Write" >> beam.io.WriteToText(self.prefix, file_name_suffix=".jsonl")
        )


class WriteFeaturesParquet(beam.PTransform):
    """Flat example RecordBatches -> Parquet files (one row per example) under `prefix`."""

    def __init__(self, prefix: str, schema: pa.Schema):
        super().__init__()
        self.prefix = prefix
        self.schema = schema

    def expand(self, batches):
        return (
            batches
            | "ToTable" >> beam.Map(lambda rb: pa.Table.from_batches([rb]))
            | "Write"
            >> beam.io.WriteToParquetBatched(
                self.prefix, schema=self.schema, codec="snappy", file_name_suffix=".parquet"
            )
        )


class _WriteShard(beam.DoFn):
    """tf.Transform output batches -> one gzip TFRecord shard per bundle, under a temporary name.

    tf.Examples are encoded by tfx_bsl's C++ encoder and written by TensorFlow's C++ record
    writer (framing, CRCs and gzip outside Python). The shard's path is emitted when the bundle
    finishes; a retried bundle's partial file is simply never renamed.
    """

    def __init__(self, temp_dir: str, counter: str):
        self.temp_dir = temp_dir
        self.counter = counter

    def setup(self) -> None:
        import tensorflow as tf

        self._tf = tf
        self._encoder = RecordBatchToExamplesEncoder()
        self._count = Metrics.counter(NAMESPACE, self.counter)
        tf.io.gfile.makedirs(self.temp_dir)

    def start_bundle(self) -> None:
        self._writer = None
        self._path = None

    def process(self, element):
        batch = element[0] if isinstance(element, tuple) else element
        encoded = self._encoder.encode(batch)
        if not encoded:
            return
        if self._writer is None:
            self._path = f"{self.temp_dir}/{uuid.uuid4().hex}.tfrecord.gz"
            self._writer = self._tf.io.TFRecordWriter(self._path, options="GZIP")
        for example in encoded:
            self._writer.write(example)
        self._count.inc(len(encoded))

    def finish_bundle(self):
        if self._writer is not None:
            self._writer.close()
            yield WindowedValue(self._path, MIN_TIMESTAMP, [GlobalWindow()])


def _finalize_shards(temp_paths: list[str], prefix: str, temp_dir: str) -> list[str]:
    """Rename the written shards to `prefix-0000i-of-0000n.tfrecord.gz` (an empty file if none)."""
    import tensorflow as tf

    paths = sorted(temp_paths)
    n = max(len(paths), 1)
    final = [f"{prefix}-{i:05d}-of-{n:05d}.tfrecord.gz" for i in range(n)]
    for stale in tf.io.gfile.glob(f"{prefix}-*-of-*.tfrecord.gz"):
        tf.io.gfile.remove(stale)  # a previous run's shards would mix with this run's
    if not paths:
        tf.io.TFRecordWriter(final[0], options="GZIP").close()
    for src, dst in zip(paths, final, strict=False):
        tf.io.gfile.rename(src, dst, overwrite=True)
    if tf.io.gfile.exists(temp_dir):
        tf.io.gfile.rmtree(temp_dir)
    return final


class WriteTFRecords(beam.PTransform):
    """Transformed RecordBatches -> gzip TFRecords of tf.Example: `prefix-0000i-of-0000n.tfrecord.gz`.

    Shards are written to a temporary directory next to `prefix` and renamed once every bundle
    has finished, so readers never see a partial file.
    """

    def __init__(self, prefix: str, counter: str):
        super().__init__()
        self.prefix = prefix
        self.counter = counter
        self.temp_dir = f"{os.path.dirname(prefix)}/.temp-{uuid.uuid4().hex}"

    def expand(self, batches):
        return (
            batches
            | "EncodeAndWriteShards" >> beam.ParDo(_WriteShard(self.temp_dir, self.counter))
            | "AllShards" >> beam.combiners.ToList()
            | "Finalize" >> beam.Map(_finalize_shards, self.prefix, self.temp_dir)
        )
