"""The scoring core shared by batch scoring (score.py) and streaming scoring (score_streaming.py).

Both jobs score examples the same way: the model version and the feature set it was trained on
(`load_model`), a check of each example against the model's serving inputs (an example that
does not fit becomes a dead letter alone instead of failing the inference batch it would
join), RunInference with the handler's postprocess function making the prediction output
(the example key, the event time, the probability and the version that made it), and
RunInference's own dead-letter output for failed inferences. The jobs differ only in the
element they score: a RecordBatch of examples (batch) or a list of example dicts (streaming).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import apache_beam as beam
import pyarrow as pa
from apache_beam.metrics import Metrics
from apache_beam.ml.inference.base import PredictionResult, RunInference
from apache_beam.pvalue import TaggedOutput

from skewless.models.handler import (
    ModelInputError,
    SkewlessModelHandler,
    example_count,
    rows_to_feed,
)
from skewless.models.versions import FeatureSetMismatch, ModelDirError
from skewless.models.watch import WatchingModelHandler
from skewless.transforms.example_schema import features_arrow_schema
from skewless.transforms.featureset import FeatureSet, FeatureSetError
from skewless.transforms.record_checks import NAMESPACE, dead_letter, ms_to_datetime

DEAD = "dead"
PROBABILITY = "probability"


def _give_run_inference_its_resource_module() -> None:
    """Beam 2.77's ml/inference/base.py imports the standard `resource` module in one try block
    with its torch-only ModelManager, so without torch `resource` is None there and every
    RunInference step logs "Resource module is not available for current platform" on the
    root logger (and reports no memory). The module exists on every POSIX platform: hand it
    over. Runs wherever this module is imported (the launcher and every worker)."""
    import apache_beam.ml.inference.base as inference_base

    if getattr(inference_base, "resource", None) is None:
        try:
            import resource
        except ImportError:  # pragma: no cover - not POSIX: Beam's own warning is right
            return
        inference_base.resource = resource


_give_run_inference_its_resource_module()
MODEL_VERSION = "model_version"
SOURCE = "source"  # where a streaming prediction came from:
SOURCE_MODEL = "model"
SOURCE_CACHE = "cache"


@dataclass(frozen=True)
class LoadedVersion:
    """A model handler and the feature set its version was trained on."""

    handler: SkewlessModelHandler
    fs: FeatureSet


def load_model(
    model_dir: str,
    model_version: int | None,
    feature_set: str | None,
    *,
    min_batch_size: int = 1,
    max_batch_size: int = 8192,
    watch_poll_s: float | None = None,
) -> LoadedVersion:
    """The handler of the model version (the highest one, followed when `watch_poll_s` is given
    and no version is pinned) and the feature set recorded with it; `feature_set` may only name
    that same feature set. Raises ValueError (ModelDirError, FeatureSetMismatch, ...) with a
    message a user can act on, before any worker starts."""
    batching = {"min_batch_size": min_batch_size, "max_batch_size": max_batch_size}
    if watch_poll_s is not None and model_version is None:
        handler = WatchingModelHandler(model_dir, poll_s=watch_poll_s, **batching)
    else:
        handler = SkewlessModelHandler(model_dir, model_version, **batching)
    return LoadedVersion(handler, handler.model_version.feature_set(feature_set))


MODEL_ERRORS = (ModelDirError, FeatureSetMismatch, FeatureSetError, ValueError)


# --- the prediction output -----------------------------------------------------------------------


def prediction_fields(fs: FeatureSet) -> list[str]:
    """The example key fields, then the event time: the columns that name a prediction."""
    return list(dict.fromkeys([*fs.example_key, fs.event_time]))


def prediction_schema(fs: FeatureSet) -> pa.Schema:
    """Prediction rows: the example key, the event time, the probability and the model version."""
    by_name = {f.name: f for f in features_arrow_schema(fs)}
    return pa.schema(
        [
            *(by_name[name] for name in prediction_fields(fs)),
            pa.field(PROBABILITY, pa.float64()),
            pa.field(MODEL_VERSION, pa.int64()),
        ]
    )


class ToPredictionBatch:
    """Postprocess fn: PredictionResult of a RecordBatch of examples -> a prediction RecordBatch.

    A class, not a closure: the local runner memoises DoFn specs per class.
    """

    def __init__(self, fs: FeatureSet):
        self.schema = prediction_schema(fs)
        self.names = prediction_fields(fs)

    def __call__(self, result: PredictionResult) -> pa.RecordBatch:
        batch, probabilities = result.example, result.inference
        arrays = [batch.column(name) for name in self.names]
        arrays.append(pa.array(probabilities, type=pa.float32()).cast(pa.float64()))
        arrays.append(pa.array([int(result.model_id)] * batch.num_rows, type=pa.int64()))
        Metrics.counter(NAMESPACE, "examples_scored").inc(batch.num_rows)
        return pa.RecordBatch.from_arrays(arrays, schema=self.schema)


class ToPredictionDict:
    """Postprocess fn: PredictionResult of one example dict -> {key fields, event time
    (ISO-8601 UTC), probability, model_version, source} (source: "model"; the streaming
    scorer's prediction cache makes the same dict with "cache")."""

    def __init__(self, fs: FeatureSet):
        by_name = fs.fields_by_name
        self.fields = [(n, by_name[n].type == "timestamp") for n in prediction_fields(fs)]

    def format(self, example: dict, probability: float, version: int, source: str) -> dict:
        out = {}
        for name, is_time in self.fields:
            value = example.get(name)
            out[name] = (
                ms_to_datetime(value).isoformat() if is_time and value is not None else value
            )
        out[PROBABILITY] = float(probability)
        out[MODEL_VERSION] = int(version)
        out[SOURCE] = source
        return out

    def __call__(self, result: PredictionResult) -> dict:
        Metrics.counter(NAMESPACE, "examples_scored").inc()
        return self.format(result.example, result.inference, result.model_id, SOURCE_MODEL)


# --- the example check ---------------------------------------------------------------------------


def check_batch(batch: pa.RecordBatch, inputs: Sequence[dict]) -> None:
    """ModelInputError unless every model input is a column of `batch` of a usable type, non-null
    where the model needs a value."""
    names = set(batch.schema.names)
    for spec in inputs:
        if spec["name"] not in names:
            raise ModelInputError(f"missing feature {spec['name']!r}")
        column = batch.column(spec["name"])
        if spec.get("repeated"):
            if not (pa.types.is_list(column.type) or pa.types.is_large_list(column.type)):
                raise ModelInputError(
                    f"feature {spec['name']!r} has type {column.type}, expected a list"
                )
            continue
        if not spec["nullable"] and column.null_count:
            raise ModelInputError(f"required feature {spec['name']!r} is null")
        if not _castable(column.type, spec["dtype"]):
            raise ModelInputError(
                f"feature {spec['name']!r} has type {column.type}, expected {spec['dtype']}"
            )


def _castable(arrow_type: pa.DataType, dtype: str) -> bool:
    if dtype == "string":
        return pa.types.is_string(arrow_type) or pa.types.is_large_string(arrow_type)
    return (
        pa.types.is_integer(arrow_type)
        or pa.types.is_floating(arrow_type)
        or pa.types.is_timestamp(arrow_type)
        or pa.types.is_boolean(arrow_type)
    )


def rows_of(element) -> list:
    """The examples of an element, as dicts (for dead letters)."""
    if isinstance(element, pa.RecordBatch):
        return element.to_pylist()
    if isinstance(element, list):
        return element
    return [element]


class CheckExamples(beam.DoFn):
    """Elements -> the elements that fit the model's serving inputs; the rest to DEAD.

    A RecordBatch is checked (and rejected) as a whole; a list of example dicts is checked in
    one pass, and only a list that fails is checked example by example, so its examples that
    fit are still scored.
    """

    def __init__(self, inputs: list[dict]):
        self.inputs = inputs

    def setup(self) -> None:
        self._rejected = Metrics.counter(NAMESPACE, "examples_rejected_by_model_inputs")

    def process(self, element) -> Iterator:
        if isinstance(element, list):
            yield from self._check_rows(element)
            return
        try:
            if not isinstance(element, pa.RecordBatch):
                raise ModelInputError(
                    f"an example is a {type(element).__name__}, expected a RecordBatch"
                )
            check_batch(element, self.inputs)
        except ModelInputError as exc:
            self._rejected.inc(example_count(element))
            for row in rows_of(element):
                yield TaggedOutput(DEAD, dead_letter("model_input", str(exc), row))
            return
        yield element

    def _check_rows(self, examples: list[dict]) -> Iterator:
        try:
            rows_to_feed(examples, self.inputs)
        except ModelInputError:
            pass
        else:
            yield examples
            return
        fit = []
        for example in examples:
            try:
                rows_to_feed([example], self.inputs)
            except ModelInputError as exc:
                self._rejected.inc()
                yield TaggedOutput(DEAD, dead_letter("model_input", str(exc), example))
                continue
            fit.append(example)
        if fit:
            yield fit


# --- failed inferences ---------------------------------------------------------------------------


class FailedInferences(beam.DoFn):
    """(failed batch or element, error) from RunInference's dead-letter output -> one dead
    letter per example, with the stage and the reason."""

    def __init__(self, stage: str = "inference", counter: str = "inference_failures"):
        self.stage = stage
        self.counter = counter

    def setup(self) -> None:
        self._failed = Metrics.counter(NAMESPACE, self.counter)

    def process(self, failure) -> Iterator[dict]:
        elements, error = failure
        reason = failure_reason(error)
        if not isinstance(elements, (list, tuple)):
            elements = [elements]
        for element in elements:
            if isinstance(element, PredictionResult):
                element = element.example
            rows = rows_of(element)
            self._failed.inc(len(rows))
            for row in rows:
                yield dead_letter(self.stage, reason, row)


def failure_reason(error) -> str:
    """RunInference reports (exception type, repr, traceback lines); keep 'Type: message'."""
    if isinstance(error, BaseException):
        return f"{type(error).__name__}: {error}"
    if isinstance(error, tuple) and len(error) == 3 and error[2]:
        return str(error[2][-1]).strip()
    return str(error)


# --- the composite -------------------------------------------------------------------------------


class ScoreWithModel(beam.PTransform):
    """Examples -> (predictions, dead letters).

    `postprocess` turns a PredictionResult into the job's prediction (ToPredictionBatch or
    ToPredictionDict); it runs inside RunInference (the handler's postprocess fn). With
    `prebatched`, each element is already one model call's batch (a list of example dicts):
    RunInference does not batch again (`with_no_batching`). Examples that do not fit the model,
    failed inferences and failed postprocessing become dead letters.
    """

    def __init__(self, handler: SkewlessModelHandler, postprocess, prebatched: bool = False):
        super().__init__()
        self.handler = handler
        self.postprocess = postprocess
        self.prebatched = prebatched

    def expand(self, examples):
        checked = examples | "CheckInputs" >> beam.ParDo(
            CheckExamples(self.handler.inputs)
        ).with_outputs(DEAD, main="ok")
        handler = self.handler.with_no_batching() if self.prebatched else self.handler
        predictions, failures = (
            checked.ok
            | "RunInference"
            >> RunInference(handler.with_postprocess_fn(self.postprocess)).with_exception_handling()
        )
        failed = failures.failed_inferences | "FailedInferences" >> beam.ParDo(FailedInferences())
        unformatted = (
            failures.failed_postprocessing
            | "FlattenPostprocessFailures" >> beam.Flatten()
            | "FailedPredictions"
            >> beam.ParDo(FailedInferences("prediction", "prediction_failures"))
        )
        dead = (checked[DEAD], failed, unformatted) | "DeadLetters" >> beam.Flatten()
        return predictions, dead
