"""Sinks at the edge of the pipelines: dead letters, the features Parquet, gzip TFRecords."""

from __future__ import annotations

import json
import os
import struct
import threading
import uuid
import zlib
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import wait as futures_wait

import apache_beam as beam
import google_crc32c
import pyarrow as pa
from apache_beam.metrics import Metrics
from apache_beam.transforms.window import GlobalWindow
from apache_beam.utils.timestamp import MIN_TIMESTAMP
from apache_beam.utils.windowed_value import WindowedValue
from tfx_bsl.coders.example_coder import RecordBatchToExamplesEncoder

NAMESPACE = "skewless"


class WriteDeadLetterFiles(beam.PTransform):
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


# TFRecord framing: length, masked CRC-32C of the length, data, masked CRC-32C of the data.
_LENGTH = struct.Struct("<Q")
_CRC = struct.Struct("<I")
_CRC_MASK_DELTA = 0xA282EAD8
# gzip (zlib's wrapper 16 + the largest window), TensorFlow's default level for GZIP records.
_GZIP_WBITS = 16 + zlib.MAX_WBITS
_GZIP_LEVEL = 6
# Threads encoding and compressing batches (the bundle's thread writes them, in order), and
# the batches in flight at most; process() waits beyond this.
_ENCODE_THREADS = 2
_QUEUED_BATCHES = 4


def _masked_crc(data: bytes) -> int:
    crc = google_crc32c.value(data)
    return ((((crc >> 15) | (crc << 17)) & 0xFFFFFFFF) + _CRC_MASK_DELTA) & 0xFFFFFFFF


def frame_records(records: list[bytes]) -> bytes:
    """Serialized records -> their TFRecord framing, concatenated (what TFRecordWriter writes)."""
    parts = []
    for record in records:
        length = _LENGTH.pack(len(record))
        parts += (length, _CRC.pack(_masked_crc(length)), record, _CRC.pack(_masked_crc(record)))
    return b"".join(parts)


def gzip_member(data: bytes) -> bytes:
    """`data` as one gzip member. A file of several members is one gzip file (RFC 1952):
    TensorFlow's record reader, Python's gzip and zcat read it whole."""
    compressor = zlib.compressobj(_GZIP_LEVEL, zlib.DEFLATED, _GZIP_WBITS)
    return compressor.compress(data) + compressor.flush()


class _ShardFile:
    """One gzip TFRecord file, each batch encoded, framed and compressed on a worker thread into
    a gzip member of its own, and the members written in the batches' order.

    The tfx_bsl encoder, the CRCs and zlib run in C with the GIL released, a whole batch per
    call, so a shard is encoded and compressed on the other core while the bundle's thread goes
    on; the framing's few Python operations per record are all that hold the GIL.
    """

    def __init__(self, path: str, encode: Callable[[pa.RecordBatch], list[bytes]], executor):
        import tensorflow as tf

        self.path = path
        self._encode = encode
        self._executor = executor
        self._file = tf.io.gfile.GFile(path, "wb")
        self._pending: deque[Future] = deque()

    def add(self, batch: pa.RecordBatch) -> int:
        """Queue a batch; the number of examples written by the batches now written."""
        self._pending.append(self._executor.submit(self._compress, batch))
        return self._write(keep=_QUEUED_BATCHES)

    def close(self) -> int:
        """Write every queued batch and close; the number of examples written."""
        written = self._write(keep=0)
        self._file.close()
        return written

    def _compress(self, batch: pa.RecordBatch) -> tuple[bytes, int]:
        encoded = self._encode(batch)
        return gzip_member(frame_records(encoded)), len(encoded)

    def _write(self, keep: int) -> int:
        """Write the batches, oldest first, that are finished or more than `keep` in the queue
        (waiting for those); a failed batch cancels the rest, closes the file (never renamed)
        and raises."""
        written = 0
        try:
            while self._pending and (len(self._pending) > keep or self._pending[0].done()):
                member, examples = self._pending.popleft().result()
                self._file.write(member)
                written += examples
        except BaseException:
            self.abandon()
            raise
        return written

    def abandon(self) -> None:
        """Drop the queued batches and close the file, which is never renamed (idempotent)."""
        for future in self._pending:
            future.cancel()
        futures_wait(self._pending)
        self._pending.clear()
        self._file.close()  # closing a closed GFile does nothing


class _WriteShard(beam.DoFn):
    """tf.Transform output batches -> one gzip TFRecord shard per bundle, under a temporary name.

    tf.Examples are encoded by tfx_bsl's C++ encoder and compressed on worker threads
    (_ShardFile). The shard's path is emitted when the bundle finishes; a retried bundle's
    partial file is simply never renamed.
    """

    def __init__(self, temp_dir: str, counter: str):
        self.temp_dir = temp_dir
        self.counter = counter

    def setup(self) -> None:
        import tensorflow as tf

        self._encoders = threading.local()  # one encoder per worker thread
        self._executor = ThreadPoolExecutor(_ENCODE_THREADS, thread_name_prefix="tfrecord-encode")
        self._count = Metrics.counter(NAMESPACE, self.counter)
        tf.io.gfile.makedirs(self.temp_dir)

    def start_bundle(self) -> None:
        if getattr(self, "_shard", None) is not None:
            self._shard.abandon()  # the last bundle failed after this DoFn's process()
        self._shard = None

    def process(self, element):
        batch = element[0] if isinstance(element, tuple) else element
        if not batch.num_rows:
            return
        if self._shard is None:
            path = f"{self.temp_dir}/{uuid.uuid4().hex}.tfrecord.gz"
            self._shard = _ShardFile(path, self._encode, self._executor)
        self._count.inc(self._shard.add(batch))

    def finish_bundle(self):
        if self._shard is not None:
            shard, self._shard = self._shard, None
            self._count.inc(shard.close())
            yield WindowedValue(shard.path, MIN_TIMESTAMP, [GlobalWindow()])

    def _encode(self, batch: pa.RecordBatch) -> list[bytes]:
        encoder = getattr(self._encoders, "encoder", None)
        if encoder is None:
            encoder = self._encoders.encoder = RecordBatchToExamplesEncoder()
        return encoder.encode(batch)

    def teardown(self) -> None:
        executor = getattr(self, "_executor", None)
        if executor is not None:
            executor.shutdown(wait=True, cancel_futures=True)


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
