"""Example layouts derived from a FeatureSet: flat Arrow (features/ output) and tf.Transform input."""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import numpy as np
import pyarrow as pa
import tensorflow as tf
from tensorflow_transform.tf_metadata import schema_utils
from tfx_bsl.tfxio import tensor_adapter, tensor_representation_util

from skewless.transforms.featureset import FeatureSet

_ARROW = {
    "string": pa.string(),
    "int": pa.int64(),
    "float": pa.float64(),
    "bool": pa.bool_(),
    "timestamp": pa.timestamp("ms", tz="UTC"),
}
# tf.Transform sees timestamps as int64 epoch ms, floats as float32, strings as bytes.
_TF = {
    "string": tf.string,
    "int": tf.int64,
    "float": tf.float32,
    "bool": tf.int64,
    "timestamp": tf.int64,
}
_TF_ARROW_VALUES = {
    "string": pa.large_binary(),
    "int": pa.int64(),
    "float": pa.float32(),
    "bool": pa.int64(),
    "timestamp": pa.int64(),
}


class Column(NamedTuple):
    """One column of an example: a declared example field, or one column of an aggregate
    (most aggregates have one; list operations give lists, a histogram two aligned lists)."""

    name: str
    type: str
    nullable: bool = True
    repeated: bool = False


def example_columns(fs: FeatureSet) -> list[Column]:
    """Columns of one example: the declared example fields, then the aggregates' columns.

    Aggregates are never null (an empty window has the declared default); list columns may
    be empty."""
    cols = [Column(f.name, f.type, f.nullable) for f in fs.example_fields]
    for agg in fs.aggregates:
        for name, kind, repeated in agg.columns:
            cols.append(Column(name, kind, nullable=False, repeated=repeated))
    return cols


def aggregate_column_names(fs: FeatureSet) -> list[str]:
    return [name for agg in fs.aggregates for name, _, _ in agg.columns]


def _arrow_type(col: Column) -> pa.DataType:
    kind = _ARROW[col.type]
    return pa.list_(kind) if col.repeated else kind


def features_arrow_schema(fs: FeatureSet) -> pa.Schema:
    return pa.schema(
        [pa.field(c.name, _arrow_type(c), nullable=c.nullable) for c in example_columns(fs)]
    )


def arrow_schema(fields: Sequence) -> pa.Schema:
    """Arrow schema of scalar fields (Field or Column)."""
    return pa.schema([pa.field(f.name, _ARROW[f.type], nullable=f.nullable) for f in fields])


def event_arrow_schema(fs: FeatureSet) -> pa.Schema:
    """Typed events as Arrow (what the batch jobs carry from validation to the examples): the
    raw schema's fields, then the derived ones, every one nullable (the validator enforces
    the declared nullability; a derive may leave a field of a non-event unset)."""
    return pa.schema(
        [pa.field(f.name, _ARROW[f.type]) for f in (*fs.schema, *fs.derived_fields)]
    )


def example_fields_record_batch(
    fs: FeatureSet, examples: Sequence[dict], fields: Sequence | None = None
) -> pa.RecordBatch:
    """Example dicts -> RecordBatch of the declared example fields only (no aggregates yet);
    `fields`: these fields instead."""
    schema = arrow_schema(fs.example_fields if fields is None else fields)
    return pa.RecordBatch.from_pylist(list(examples), schema=schema)


def with_aggregate_columns(fs: FeatureSet, table: pa.Table, columns: dict) -> pa.Table:
    """Example-field table + {aggregate column: values (a list or an Arrow array)} -> table
    of the features/ schema."""
    schema = features_arrow_schema(fs)
    arrays = [table.column(f.name) for f in fs.example_fields]
    for name in aggregate_column_names(fs):
        values, kind = columns[name], schema.field(name).type
        arrays.append(values.cast(kind) if isinstance(values, pa.Array) else pa.array(values, type=kind))
    return pa.Table.from_arrays(arrays, schema=schema)


def tft_feature_spec(fs: FeatureSet) -> dict:
    """Raw feature spec of the preprocessing_fn: required -> dense scalar, nullable or list
    -> VarLen (a SparseTensor of 0 or 1 values per row, or of the list's values)."""
    spec = {}
    for col in example_columns(fs):
        dtype = _TF[col.type]
        spec[col.name] = (
            tf.io.VarLenFeature(dtype)
            if col.nullable or col.repeated
            else tf.io.FixedLenFeature([], dtype)
        )
    return spec


def tft_schema(fs: FeatureSet):
    return schema_utils.schema_from_feature_spec(tft_feature_spec(fs))


def tft_arrow_schema(fs: FeatureSet) -> pa.Schema:
    return pa.schema(
        [pa.field(c.name, pa.large_list(_TF_ARROW_VALUES[c.type])) for c in example_columns(fs)]
    )


def tft_tensor_adapter_config(fs: FeatureSet) -> tensor_adapter.TensorAdapterConfig:
    reps = tensor_representation_util.InferTensorRepresentationsFromSchema(tft_schema(fs))
    return tensor_adapter.TensorAdapterConfig(tft_arrow_schema(fs), reps)


def to_tft_record_batch(fs: FeatureSet, flat: pa.RecordBatch) -> pa.RecordBatch:
    """Flat features batch -> tf.Transform input: one list per cell (empty for null)."""
    arrays = []
    target = tft_arrow_schema(fs)
    one_each = pa.array(np.arange(flat.num_rows + 1, dtype=np.int64))  # offsets: a value per row
    for col, field in zip(example_columns(fs), target, strict=True):
        values = flat.column(col.name)
        if col.repeated:
            arrays.append(values.cast(field.type))
            continue
        if col.type == "timestamp":
            values = values.cast(pa.int64())
        values = values.cast(_TF_ARROW_VALUES[col.type])
        if values.null_count:
            valid = values.is_valid()
            lengths = pa.compute.cast(valid, pa.int64())
            offsets = pa.concat_arrays(
                [pa.array([0], pa.int64()), pa.compute.cumulative_sum(lengths)]
            )
            values = pa.compute.filter(values, valid)
        else:
            offsets = one_each
        arrays.append(pa.LargeListArray.from_arrays(offsets, values).cast(field.type))
    return pa.RecordBatch.from_arrays(arrays, schema=target)
