"""Sinks at the edge of the pipelines: dead letters, the features Parquet, gzip TFRecords."""

from __future__ import annotations

import json

import apache_beam as beam
import pyarrow as pa
from apache_beam.io.filesystem import CompressionTypes
from apache_beam.metrics import Metrics
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


class _EncodeExamples(beam.DoFn):
    """tf.Transform output (RecordBatch, passthrough) -> serialized tf.Examples (C++ encoder)."""

    def __init__(self, counter: str):
        self.counter = counter

    def setup(self) -> None:
        self._encoder = RecordBatchToExamplesEncoder()
        self._count = Metrics.counter(NAMESPACE, self.counter)

    def process(self, element):
        batch = element[0] if isinstance(element, tuple) else element
        encoded = self._encoder.encode(batch)
        self._count.inc(len(encoded))
        yield from encoded


class WriteTFRecords(beam.PTransform):
    """Transformed RecordBatches -> gzip TFRecords of tf.Example under `prefix`."""

    def __init__(self, prefix: str, counter: str):
        super().__init__()
        self.prefix = prefix
        self.counter = counter

    def expand(self, batches):
        return (
            batches
            | "Encode" >> beam.ParDo(_EncodeExamples(self.counter))
            | "Write"
            >> beam.io.WriteToTFRecord(
                self.prefix,
                file_name_suffix=".tfrecord.gz",
                compression_type=CompressionTypes.GZIP,
            )
        )
