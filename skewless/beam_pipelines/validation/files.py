"""The files of validation, on local paths or gs:// (storage.py; no Beam for a local path):
statistics (a binary DatasetFeatureStatisticsList), the schema (a text Schema, editable by
hand), anomalies.json and the report. The Beam sinks that write them are in validation_io."""

from __future__ import annotations

import json
import os
from collections.abc import Sequence

from google.protobuf import message, text_format
from tensorflow_metadata.proto.v0 import schema_pb2, statistics_pb2

from skewless.beam_pipelines.io import storage

STATISTICS_FILE = os.path.join("statistics", "statistics.pb")
SCHEMA_FILE = os.path.join("schema", "schema.pbtxt")
# How prepare derived the schema's drift thresholds from the data (drift_calibration.py).
DRIFT_THRESHOLDS_FILE = os.path.join("statistics", "drift_thresholds.json")
# What `skewless validate` writes under its --output_dir.
ANOMALIES_FILE = "anomalies.json"
REPORT_FILE = "report.html"
NEW_STATISTICS_FILE = "statistics.pb"
NEW_DATASET = "new"  # the name of the new data's statistics


class SchemaFileError(ValueError):
    """A schema file that does not exist or does not parse as a tensorflow_metadata Schema."""


class StatisticsFileError(ValueError):
    """A statistics file that does not parse as a DatasetFeatureStatisticsList."""


def statistics_path(output_dir: str) -> str:
    """Where a prepare run under output_dir keeps its statistics (train and eval datasets)."""
    return storage.join(output_dir, STATISTICS_FILE)


def schema_path(output_dir: str) -> str:
    """Where a prepare run under output_dir keeps its schema (inferred, or the user's copy)."""
    return storage.join(output_dir, SCHEMA_FILE)


def drift_thresholds_path(output_dir: str) -> str:
    """Where a prepare run under output_dir records its calibrated drift thresholds."""
    return storage.join(output_dir, DRIFT_THRESHOLDS_FILE)


def features_glob(prepared_dir: str) -> str:
    """The features/ Parquet files of a prepare run."""
    return storage.join(prepared_dir, "features", "*.parquet")


def write_statistics(path: str, statistics: statistics_pb2.DatasetFeatureStatisticsList) -> None:
    storage.write_bytes(path, statistics.SerializeToString())


def read_statistics(path: str) -> statistics_pb2.DatasetFeatureStatisticsList:
    """The binary statistics at path; a StatisticsFileError names the path when they do not
    parse."""
    try:
        return statistics_pb2.DatasetFeatureStatisticsList.FromString(storage.read_bytes(path))
    except message.DecodeError as e:
        raise StatisticsFileError(
            f"statistics {path} is not a DatasetFeatureStatisticsList: {e}"
        ) from e


def write_schema(path: str, schema: schema_pb2.Schema) -> None:
    storage.write_bytes(path, text_format.MessageToString(schema).encode())


def read_schema(path: str) -> schema_pb2.Schema:
    """The text Schema at path; a SchemaFileError names the path and what is wrong."""
    if not storage.exists(path):
        raise SchemaFileError(f"schema file {path} does not exist")
    try:
        return text_format.Parse(storage.read_bytes(path).decode(), schema_pb2.Schema())
    except (text_format.ParseError, UnicodeDecodeError) as e:
        raise SchemaFileError(f"schema file {path} is not a text Schema proto: {e}") from e


def statistics_list(
    datasets: list[statistics_pb2.DatasetFeatureStatistics], order: Sequence[str]
) -> statistics_pb2.DatasetFeatureStatisticsList:
    rank = {name: i for i, name in enumerate(order)}
    ordered = sorted(datasets, key=lambda d: (rank.get(d.name, len(rank)), d.name))
    return statistics_pb2.DatasetFeatureStatisticsList(datasets=ordered)


def write_text(path: str, text: str) -> str:
    storage.write_bytes(path, text.encode())
    return path


def write_anomalies(path: str, anomalies: list[dict]) -> str:
    return write_text(path, json.dumps(anomalies, indent=2) + "\n")


def read_anomalies(path: str) -> list[dict]:
    return json.loads(storage.read_bytes(path).decode())
