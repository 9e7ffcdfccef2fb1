"""Statistics and schema files: a binary DatasetFeatureStatisticsList and a text Schema
(editable by hand), on local paths or gs:// (Beam FileSystems), and the sinks prepare uses."""

from __future__ import annotations

import os
from collections.abc import Sequence

import apache_beam as beam
from apache_beam.io.filesystems import CompressionTypes, FileSystems
from google.protobuf import text_format
from tensorflow_metadata.proto.v0 import schema_pb2, statistics_pb2

STATISTICS_FILE = os.path.join("statistics", "statistics.pb")
SCHEMA_FILE = os.path.join("schema", "schema.pbtxt")


class SchemaFileError(ValueError):
    """A schema file that does not exist or does not parse as a tensorflow_metadata Schema."""


def statistics_path(output_dir: str) -> str:
    """Where a prepare run under output_dir keeps its statistics (train and eval datasets)."""
    return FileSystems.join(output_dir, STATISTICS_FILE)


def schema_path(output_dir: str) -> str:
    """Where a prepare run under output_dir keeps its schema (inferred, or the user's copy)."""
    return FileSystems.join(output_dir, SCHEMA_FILE)


def _write(path: str, data: bytes) -> None:
    parent, _ = FileSystems.split(path)
    if parent and not FileSystems.exists(parent):
        FileSystems.mkdirs(parent)
    with FileSystems.create(path, compression_type=CompressionTypes.UNCOMPRESSED) as f:
        f.write(data)


def _read(path: str) -> bytes:
    with FileSystems.open(path, compression_type=CompressionTypes.UNCOMPRESSED) as f:
        return f.read()


def write_statistics(path: str, statistics: statistics_pb2.DatasetFeatureStatisticsList) -> None:
    _write(path, statistics.SerializeToString())


def read_statistics(path: str) -> statistics_pb2.DatasetFeatureStatisticsList:
    return statistics_pb2.DatasetFeatureStatisticsList.FromString(_read(path))


def write_schema(path: str, schema: schema_pb2.Schema) -> None:
    _write(path, text_format.MessageToString(schema).encode())


def read_schema(path: str) -> schema_pb2.Schema:
    """The text Schema at path; a SchemaFileError names the path and what is wrong."""
    if not FileSystems.exists(path):
        raise SchemaFileError(f"schema file {path} does not exist")
    try:
        return text_format.Parse(_read(path).decode(), schema_pb2.Schema())
    except (text_format.ParseError, UnicodeDecodeError) as e:
        raise SchemaFileError(f"schema file {path} is not a text Schema proto: {e}") from e


def _statistics_list(
    datasets: list[statistics_pb2.DatasetFeatureStatistics], order: Sequence[str]
) -> statistics_pb2.DatasetFeatureStatisticsList:
    rank = {name: i for i, name in enumerate(order)}
    ordered = sorted(datasets, key=lambda d: (rank.get(d.name, len(rank)), d.name))
    return statistics_pb2.DatasetFeatureStatisticsList(datasets=ordered)


class WriteStatistics(beam.PTransform):
    """DatasetFeatureStatistics elements -> one DatasetFeatureStatisticsList file at `path`,
    datasets in the order of `order` (then by name). Outputs the path once written."""

    def __init__(self, path: str, order: Sequence[str] = ()):
        super().__init__()
        self.path = path
        self.order = tuple(order)

    def expand(self, datasets):
        return (
            datasets
            | "Gather" >> beam.combiners.ToList()
            | "ToList" >> beam.Map(_statistics_list, self.order)
            | "Write" >> beam.Map(_write_and_return_path, self.path, write_statistics)
        )


class WriteSchema(beam.PTransform):
    """One Schema element -> a text proto at `path`. Outputs the path once written."""

    def __init__(self, path: str):
        super().__init__()
        self.path = path

    def expand(self, schemas):
        return schemas | "Write" >> beam.Map(_write_and_return_path, self.path, write_schema)


def _write_and_return_path(message, path: str, write) -> str:
    # A retried bundle writes the same bytes again: the write is idempotent.
    write(path, message)
    return path
