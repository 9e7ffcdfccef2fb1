"""RunInference model handler for skewless SavedModels: raw examples in, delay probabilities out.

An element is either a `pyarrow.RecordBatch` of examples (batch scoring: thousands of rows) or
one example as a dict (streaming scoring). Columns are the model's raw serving inputs, i.e. the
example columns of the feature set minus the label; extra columns (keys, label) are ignored.
`run_inference` turns the whole RunInference batch into one NumPy array per input, calls the
serving signature once, and slices the probabilities once per element: no per-row tensors.

For (key, example) elements wrap it in `KeyedModelHandler`; batch sizes count examples, not
elements, in both cases (`example_count`).
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import Any, TypeVar

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from apache_beam.ml.inference.base import ModelHandler, PredictionResult

from skewless.models.model import LENGTHS_SUFFIX, PRESENT_SUFFIX
from skewless.models.versions import OUTPUT, SIGNATURE, ModelVersion, resolve

Example = pa.RecordBatch | Mapping[str, Any]

_NUMPY = {"string": object, "int64": np.int64, "float32": np.float32}
_ARROW = {"string": pa.string(), "int64": pa.int64(), "float32": pa.float32()}
_FILL = {"string": "", "int64": 0, "float32": 0.0}


class ModelInputError(ValueError):
    """An example does not fit the model's serving inputs (missing column, wrong type)."""


def example_count(element: Any) -> int:
    """Examples in one element (also for KeyedModelHandler's (key, example) pairs)."""
    if isinstance(element, tuple) and len(element) == 2:
        element = element[1]
    return element.num_rows if isinstance(element, pa.RecordBatch) else 1


def arrow_to_feed(
    batch: pa.RecordBatch | pa.Table, inputs: Sequence[dict]
) -> dict[str, np.ndarray]:
    """Columns of a batch -> {signature input: 1-D NumPy array}; ModelInputError if one does not fit."""
    feed = {}
    names = batch.schema.names
    for spec in inputs:
        name, dtype = spec["name"], spec["dtype"]
        if name not in names:
            raise ModelInputError(f"missing feature {name!r}")
        column = batch.column(name)
        if isinstance(column, pa.ChunkedArray):
            column = column.combine_chunks()
        if spec.get("repeated"):
            feed.update(_arrow_list_to_feed(name, dtype, column))
            continue
        try:
            if pa.types.is_timestamp(column.type):
                column = column.cast(pa.int64())
            values = column.cast(_ARROW[dtype])
        except (pa.ArrowInvalid, pa.ArrowNotImplementedError) as exc:
            raise ModelInputError(
                f"feature {name!r} of type {column.type} is not {dtype}: {exc}"
            ) from None
        if values.null_count:
            if not spec["nullable"]:
                raise ModelInputError(
                    f"required feature {name!r} is null in {values.null_count} example(s)"
                )
            feed[name + PRESENT_SUFFIX] = values.is_valid().to_numpy(zero_copy_only=False)
            values = pc.fill_null(values, _FILL[dtype])
        elif spec["nullable"]:
            feed[name + PRESENT_SUFFIX] = np.ones(len(values), dtype=bool)
        feed[name] = values.to_numpy(zero_copy_only=False)
    return feed


def _arrow_list_to_feed(name: str, dtype: str, column: pa.Array) -> dict[str, np.ndarray]:
    """A list column -> its values flat and one length per example (a null list is empty)."""
    if not (pa.types.is_list(column.type) or pa.types.is_large_list(column.type)):
        raise ModelInputError(f"feature {name!r} of type {column.type} is not a list")
    lengths = pc.fill_null(pc.list_value_length(column), 0).cast(pa.int64())
    try:
        values = pc.list_flatten(column).cast(_ARROW[dtype])
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError) as exc:
        raise ModelInputError(
            f"feature {name!r} of type {column.type} is not a list of {dtype}: {exc}"
        ) from None
    if values.null_count:
        raise ModelInputError(f"list feature {name!r} holds null values")
    return {name: values.to_numpy(zero_copy_only=False), name + LENGTHS_SUFFIX: lengths.to_numpy()}


def _rows_list_to_feed(name: str, dtype: str, lists: list) -> dict[str, np.ndarray]:
    flat, lengths = [], []
    for value in lists:
        if value is None:
            value = []
        if not isinstance(value, (list, tuple)):
            raise ModelInputError(f"feature {name!r} is not a list: {value!r}")
        flat.extend(value)
        lengths.append(len(value))
    try:
        if dtype == "string":
            if not all(isinstance(v, (str, bytes)) for v in flat):
                raise TypeError("not a string")
            values = np.array(flat, dtype=object)
        else:
            if any(isinstance(v, (str, bytes)) or v is None for v in flat):
                raise TypeError("a string or a null")
            values = np.asarray(flat, dtype=_NUMPY[dtype])
    except (TypeError, ValueError) as exc:
        raise ModelInputError(f"list feature {name!r} is not a list of {dtype}: {exc}") from None
    return {name: values, name + LENGTHS_SUFFIX: np.asarray(lengths, dtype=np.int64)}


def rows_to_feed(
    rows: Sequence[Mapping[str, Any]], inputs: Sequence[dict]
) -> dict[str, np.ndarray]:
    """Example dicts (timestamps as epoch ms) -> {signature input: 1-D NumPy array}."""
    feed = {}
    for spec in inputs:
        name, dtype = spec["name"], spec["dtype"]
        try:
            values = [row[name] for row in rows]
        except KeyError:
            raise ModelInputError(f"missing feature {name!r}") from None
        except TypeError:
            raise ModelInputError("an example is not a mapping of feature names to values") from None
        if spec.get("repeated"):
            feed.update(_rows_list_to_feed(name, dtype, values))
            continue
        present = np.array([v is not None for v in values], dtype=bool)
        if not present.all():
            if not spec["nullable"]:
                raise ModelInputError(f"required feature {name!r} is null")
            values = [v if v is not None else _FILL[dtype] for v in values]
        if spec["nullable"]:
            feed[name + PRESENT_SUFFIX] = present
        try:
            if dtype == "string":
                if not all(isinstance(v, (str, bytes)) for v in values):
                    raise TypeError("not a string")
                feed[name] = np.array(values, dtype=object)
            else:
                if any(isinstance(v, (str, bytes)) for v in values):
                    raise TypeError("a string")
                feed[name] = np.asarray(values, dtype=_NUMPY[dtype])
        except (TypeError, ValueError) as exc:
            raise ModelInputError(f"feature {name!r} is not {dtype}: {exc}") from None
    return feed


def to_feed(element: Example, inputs: Sequence[dict]) -> dict[str, np.ndarray]:
    if isinstance(element, (pa.RecordBatch, pa.Table)):
        return arrow_to_feed(element, inputs)
    if isinstance(element, Mapping):
        return rows_to_feed([element], inputs)
    raise ModelInputError(f"an example is a {type(element).__name__}, expected a RecordBatch or a dict")


def batch_to_feed(batch: Sequence[Example], inputs: Sequence[dict]) -> dict[str, np.ndarray]:
    """A RunInference batch -> one feed: example dicts in one pass, RecordBatches concatenated."""
    if all(isinstance(e, Mapping) for e in batch):
        return rows_to_feed(batch, inputs)
    feeds = [to_feed(e, inputs) for e in batch]
    if len(feeds) == 1:
        return feeds[0]
    return {k: np.concatenate([f[k] for f in feeds]) for k in feeds[0]}


T = TypeVar("T")
_KEPT: list = [None]  # (key, model) of the last model loaded in this process
_KEPT_LOCK = threading.Lock()


def keep_alive(
    key: tuple, load: Callable[[], T], usable: Callable[[T], bool] = lambda _: True
) -> T:
    """The model last loaded under `key` in this process, or `load()` (then kept).

    RunInference shares a model between DoFn instances through a weak reference, and the local
    runner builds a new DoFn for every bundle: between two bundles nothing may hold the model,
    and it was dropped and loaded again (about a second of stalled predictions). One strong
    reference per process, to the last model loaded, keeps it; a handler for another model
    replaces it.
    """
    with _KEPT_LOCK:
        kept = _KEPT[0]
    if kept is not None and kept[0] == key and usable(kept[1]):
        return kept[1]
    model = load()
    with _KEPT_LOCK:
        _KEPT[0] = (key, model)
    return model


class LoadedModel:
    """A loaded version: the SavedModel (kept alive for its variables) and its signature.

    A plain class: Beam's shared-model cache holds it through a weak reference.
    """

    def __init__(self, module: Any, signature: Any, version: int):
        self.module = module
        self.signature = signature
        self.version = version


# Rows per call are padded to a multiple of this (see `predict`).
ROW_BLOCK = 8


def predict(model: LoadedModel, feed: Mapping[str, np.ndarray]) -> np.ndarray:
    """One call of the serving signature on whole arrays -> probabilities, float32 array.

    The same example gets the same probability, bit for bit, whatever batch it is scored in:
    TensorFlow's CPU matrix kernels take one code path for full blocks of rows and another
    for a remainder, so an example's float32 result depended on its batch's size (up to
    1.8e-7 apart on the bundled model, in 1,424 of 2,000 examples scored one at a time).
    Padding every call to a multiple of ROW_BLOCK rows (copies of the first example; list
    inputs get empty lists) sends every row down the full-block path. Batch and streaming
    scoring, the prediction cache and the audit's re-scoring then agree exactly.
    """
    import tensorflow as tf

    padded, n = pad_rows(feed, ROW_BLOCK)
    tensors = {k: tf.constant(v) for k, v in padded.items()}
    return model.signature(**tensors)[OUTPUT].numpy()[:n]


def pad_rows(feed: Mapping[str, np.ndarray], block: int) -> tuple[dict[str, np.ndarray], int]:
    """A feed padded to a multiple of `block` examples, and its example count. Per-example
    arrays repeat their first example; a list input's `__lengths` gets zeros (empty lists),
    its flat values stay as they are."""
    flat = {k[: -len(LENGTHS_SUFFIX)] for k in feed if k.endswith(LENGTHS_SUFFIX)}
    per_example = [k for k in feed if k not in flat]
    n = len(feed[per_example[0]]) if per_example else 0
    extra = (-n) % block
    if not n or not extra:
        return dict(feed), n
    out = dict(feed)
    for key in per_example:
        values = feed[key]
        if key.endswith(LENGTHS_SUFFIX):
            fill = np.zeros(extra, dtype=values.dtype)
        else:
            fill = np.repeat(values[:1], extra, axis=0)
        out[key] = np.concatenate([values, fill])
    return out, n


class SkewlessModelHandler(ModelHandler[Example, PredictionResult, LoadedModel]):
    """Loads one numbered version of a skewless model and scores raw examples with it.

    The version is resolved and checked when the handler is built (a missing or corrupt
    model fails the launch, not a worker); TensorFlow loads it only in `load_model`, on the
    worker. `model_id` of every PredictionResult is the version number as text. For a
    RecordBatch element `inference` is an array of probabilities; for a dict a float.
    """

    def __init__(
        self,
        model_dir: str,
        model_version: int | None = None,
        *,
        min_batch_size: int = 1,
        max_batch_size: int = 8192,
        max_batch_duration_secs: int | None = None,
    ):
        if min_batch_size < 1 or max_batch_size < min_batch_size:
            raise ValueError(
                f"need 1 <= min_batch_size <= max_batch_size, got {min_batch_size}, {max_batch_size}"
            )
        super().__init__(
            min_batch_size=min_batch_size,
            max_batch_size=max_batch_size,
            max_batch_duration_secs=max_batch_duration_secs,
            element_size_fn=example_count,
        )
        self.model_version: ModelVersion = resolve(model_dir, model_version)
        self.inputs = list(self.model_version.serving_inputs)

    @property
    def version(self) -> int:
        return self.model_version.version

    def load_model(self) -> LoadedModel:
        return keep_alive(("version", self.model_version.path), self._load)

    def _load(self) -> LoadedModel:
        import tensorflow as tf

        module = tf.saved_model.load(self.model_version.path)
        return LoadedModel(module, module.signatures[SIGNATURE], self.model_version.version)

    def run_inference(
        self,
        batch: Sequence[Example],
        model: LoadedModel,
        inference_args: dict[str, Any] | None = None,
    ) -> Iterable[PredictionResult]:
        probabilities = predict(model, batch_to_feed(batch, self.inputs))
        return self._split(batch, probabilities, str(model.version))

    @staticmethod
    def _split(
        batch: Sequence[Example], probabilities: np.ndarray, model_id: str
    ) -> Iterator[PredictionResult]:
        start = 0
        for element in batch:
            if isinstance(element, (pa.RecordBatch, pa.Table)):
                end = start + element.num_rows
                yield PredictionResult(element, probabilities[start:end], model_id)
            else:
                end = start + 1
                yield PredictionResult(element, float(probabilities[start]), model_id)
            start = end

    def get_num_bytes(self, batch: Sequence[Example]) -> int:
        return sum(
            e.nbytes if isinstance(e, (pa.RecordBatch, pa.Table)) else 64 * len(e) for e in batch
        )

    def get_metrics_namespace(self) -> str:
        return "skewless_inference"
