"""The Keras model (a small wide-and-deep) and its export with the tf.Transform layer inside."""

from __future__ import annotations

import math

import keras
import numpy as np
import tensorflow as tf

from skewless.transforms.example_schema import example_columns
from skewless.transforms.featureset import FeatureSet

PRESENT_SUFFIX = "__present"
LENGTHS_SUFFIX = "__lengths"
# Serving dtypes follow the raw feature spec tf.Transform was analyzed with (example_schema).
_SERVING_DTYPES = {
    "string": "string",
    "int": "int64",
    "float": "float32",
    "bool": "int64",
    "timestamp": "int64",
}


def serving_inputs(fs: FeatureSet) -> list[dict]:
    """The raw inputs of the serving signature: every example column except the label.

    Each is a dense 1-D tensor (one value per example). A nullable column also takes a bool
    `<name>__present` tensor; the signature turns the pair into the SparseTensor tf.Transform
    was analyzed with, so a missing value is handled by the same graph as in training.
    A list column (last_k, histogram) takes its values flat, every example's after the
    previous one's, and an int64 `<name>__lengths` tensor (one length per example); the
    signature turns the pair into the SparseTensor of the VarLen feature.
    """
    return [
        {
            "name": c.name,
            "field_type": c.type,
            "dtype": _SERVING_DTYPES[c.type],
            "nullable": c.nullable,
            "repeated": c.repeated,
        }
        for c in example_columns(fs)
        if c.name != fs.label
    ]


def signature_specs(inputs: list[dict]) -> dict[str, tf.TensorSpec]:
    specs = {}
    for i in inputs:
        specs[i["name"]] = tf.TensorSpec([None], tf.as_dtype(i["dtype"]), name=i["name"])
        if i["nullable"]:
            present = i["name"] + PRESENT_SUFFIX
            specs[present] = tf.TensorSpec([None], tf.bool, name=present)
        if i.get("repeated"):
            lengths = i["name"] + LENGTHS_SUFFIX
            specs[lengths] = tf.TensorSpec([None], tf.int64, name=lengths)
    return specs


def _to_sparse(values: tf.Tensor, present: tf.Tensor) -> tf.SparseTensor:
    rows = tf.where(present)
    indices = tf.concat([rows, tf.zeros_like(rows)], axis=1)
    shape = tf.stack([tf.shape(values, out_type=tf.int64)[0], tf.constant(1, tf.int64)])
    return tf.SparseTensor(indices, tf.gather_nd(values, rows), shape)


def embedding_dim(size: int) -> int:
    return int(min(16, max(2, math.ceil(1.6 * size**0.5))))


def build_model(
    numeric: list[str],
    categorical: dict[str, int],
    hidden_units: tuple[int, ...] = (64, 32),
    dropout: float = 0.1,
    learning_rate: float = 1e-3,
) -> keras.Model:
    """Wide-and-deep over transformed features: returns P(label = 1).

    Deep: an embedding per categorical id (vocabularies incl. their OOV bucket, quantile
    buckets, day of week) concatenated with the numeric (z-scored) features, then dense layers.
    Wide: one learned weight per id and a linear term per numeric feature, added to the logit,
    so strong near-linear signals need no depth.
    """
    inputs, deep, wide = {}, [], []
    for name in numeric:
        inputs[name] = keras.Input(shape=(), name=name, dtype="float32")
    numeric_block = (
        keras.layers.Concatenate(name="numeric")(
            [keras.ops.expand_dims(inputs[n], -1) for n in numeric]
        )
        if numeric
        else None
    )
    for name, size in categorical.items():
        inputs[name] = keras.Input(shape=(), name=name, dtype="int64")
        # Ids outside the training range (a schema drift) land on the last id instead of failing.
        ids = keras.ops.clip(inputs[name], 0, size - 1)
        deep.append(
            keras.layers.Embedding(size, embedding_dim(size), name=f"{name}_embedding")(ids)
        )
        wide.append(keras.layers.Embedding(size, 1, name=f"{name}_wide")(ids))
    if numeric_block is not None:
        deep.append(numeric_block)
        wide.append(keras.layers.Dense(1, name="numeric_wide")(numeric_block))
    x = keras.layers.Concatenate(name="deep_input")(deep) if len(deep) > 1 else deep[0]
    for i, units in enumerate(hidden_units):
        x = keras.layers.Dense(units, activation="relu", name=f"dense_{i}")(x)
        if dropout:
            x = keras.layers.Dropout(dropout, name=f"dropout_{i}")(x)
    logit = keras.layers.Add(name="logit")([keras.layers.Dense(1, name="deep_logit")(x), *wide])
    probability = keras.layers.Activation("sigmoid", name="probability")(logit)
    model = keras.Model(inputs, keras.ops.squeeze(probability, -1), name="wide_and_deep")
    model.compile(
        optimizer=keras.optimizers.Adam(learning_rate),
        loss="binary_crossentropy",
        metrics=[keras.metrics.AUC(name="auc"), keras.metrics.BinaryAccuracy(name="accuracy")],
    )
    return model


class ServingModule(tf.Module):
    """What the SavedModel holds: the tf.Transform layer and the Keras model, tracked together."""

    def __init__(self, model: keras.Model, tft_layer, inputs: list[dict]):
        super().__init__()
        self.model = model
        self.tft_layer = tft_layer
        model_inputs = (
            list(model.input.keys()) if isinstance(model.input, dict) else model.input_names
        )
        nullable = [i["name"] for i in inputs if i["nullable"]]
        repeated = [i["name"] for i in inputs if i.get("repeated")]

        @tf.function(input_signature=[signature_specs(inputs)])
        def serve(features):
            raw = {
                k: v
                for k, v in features.items()
                if not k.endswith(PRESENT_SUFFIX) and not k.endswith(LENGTHS_SUFFIX)
            }
            for name in nullable:
                raw[name] = _to_sparse(raw[name], features[name + PRESENT_SUFFIX])
            for name in repeated:
                lengths = features[name + LENGTHS_SUFFIX]
                raw[name] = tf.RaggedTensor.from_row_lengths(raw[name], lengths).to_sparse()
            transformed = self.tft_layer(raw)
            probability = self.model({k: transformed[k] for k in model_inputs}, training=False)
            return {"probability": tf.reshape(probability, [-1])}

        self.serve = serve


def export_serving_model(path: str, model: keras.Model, tft_output, inputs: list[dict]) -> None:
    """SavedModel at `path` whose `serving_default` maps raw features to `probability`."""
    module = ServingModule(model, tft_output.transform_features_layer(), inputs)
    tf.saved_model.save(module, path, signatures={"serving_default": module.serve})


def predict_numpy(
    model: keras.Model, features: dict[str, np.ndarray], batch_size: int = 8192
) -> np.ndarray:
    names = list(model.input.keys()) if isinstance(model.input, dict) else model.input_names
    return np.asarray(
        model.predict({k: features[k] for k in names}, batch_size=batch_size, verbose=0)
    ).reshape(-1)
