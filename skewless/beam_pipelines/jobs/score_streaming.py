"""The score job (streaming): Pub/Sub events -> validate -> Bigtable as-of aggregates -> RunInference -> Pub/Sub and/or BigQuery.

The aggregates an event sees are the cells the aggregate job wrote, looked up by the exact row
key of the as-of rule (`skewless.transforms.aggregations.attach_aggregates`, the same function the
backfill tests use): an absent row is an empty window, i.e. the declared defaults. The model is
the highest numbered version under --model_dir, hot-swapped without a restart when a higher
one is published (skewless/models/watch.py); every prediction names the version that made it.

Cost per event: after validation, events travel as batches (one per bundle, up to
LOOKUP_BATCH): one Bigtable `read_rows` per batch, one check of the model inputs per batch and
one model call per batch (RunInference on pre-batched elements). The local runner pays a fixed
price per bundle and step (a pickle round trip of the DoFn, its setup and teardown, empty
bundles included), so setups are cheap (the Bigtable table is opened once per process, the
model kept loaded) and the local runner gets the patches of skewless.beam_pipelines.runtime.local_runner.
bench/score_streaming.py measures it.

Predictions go to --output_topic (JSON messages), --output_table (BigQuery streaming inserts,
the batch scorer's columns plus `source`) or both (WritePredictions fans out). The table is
created at start if missing and an existing one must take the rows (TableCheckOptions skips
both); a row BigQuery refuses is a dead letter (stage `write`) with BigQuery's reason.
"""

from __future__ import annotations

import json
import logging
import sys
import threading
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import apache_beam as beam
from apache_beam.metrics import Metrics
from apache_beam.options.pipeline_options import PipelineOptions, StandardOptions

from skewless.beam_pipelines.io.bigtable import (
    BigtableOptions,
    BigtableSetupError,
    check_table,
    open_table,
)
from skewless.beam_pipelines.io.online_store import CACHED, OnlineLookup
from skewless.beam_pipelines.io.pubsub import (
    DEFAULT_TIMESTAMP_ATTRIBUTE,
    EventTimeOptions,
    ParseMessages,
    PublishDeadLetters,
)
from skewless.beam_pipelines.io.serving_log import WriteServingLog
from skewless.beam_pipelines.runtime.job import EMULATOR_ONLY, FLAG_ONLY, Job, Template
from skewless.beam_pipelines.runtime.launch import launch
from skewless.beam_pipelines.runtime.local_runner import (
    LOCAL_STREAMING_RUNNER,
    LOCAL_STREAMING_RUNNERS,
    prepare_local_runner,
)
from skewless.beam_pipelines.runtime.options import (
    BigQueryEndpointOptions,
    FeatureSetOptions,
    ModelOptions,
    PredictionTableOptions,
    ServingLogOptions,
    SubscriptionOptions,
    TableCheckOptions,
)
from skewless.beam_pipelines.runtime.parsing import parse_job_options
from skewless.beam_pipelines.runtime.process import configure_logging
from skewless.beam_pipelines.score_core import (
    MODEL_ERRORS,
    MODEL_VERSION,
    PROBABILITY,
    SOURCE,
    SOURCE_CACHE,
    LoadedVersion,
    ScoreWithModel,
    ToPredictionDict,
    load_model,
)
from skewless.beam_pipelines.validation.monitoring import (
    MonitorServedTraffic,
    PublishAnomalies,
    eval_mean_probability,
    load_monitor_reference,
)
from skewless.models.handler import SkewlessModelHandler
from skewless.models.watch import WatchingModelHandler
from skewless.transforms.consistency import (
    example_key,
    is_sampled,
    sample_threshold,
    serving_log_record,
)
from skewless.transforms.featureset import FeatureSet
from skewless.transforms.monitoring import DEFAULT_WINDOW_S
from skewless.transforms.prediction_cache import cache_family, cache_of
from skewless.transforms.record_checks import NAMESPACE, CheckRecords

LOG = logging.getLogger("skewless.score_streaming")
DEFAULT_MODEL_POLL_S = 30.0
LOOKUP_BATCH = 500  # events per Bigtable read and model call, at most (--max_batch_size lowers it)
DESCRIPTION = (
    "Streaming scoring (score --streaming): read JSON events of the feature set's raw schema "
    "from --subscription, validate them, look up their as-of aggregates in the Bigtable table "
    "the aggregate job writes (absent row = empty window), score them with the highest model "
    "version under --model_dir (a newly published version is picked up without a restart; "
    "--model_version pins one) and publish one JSON prediction per event to --output_topic "
    "and/or insert it as a row into the BigQuery table --output_table (created if missing; "
    "the batch scorer's columns plus source). Bad messages, failed inferences and rows "
    "BigQuery refuses go to --dead_letter_topic with their stage and reason. "
    "The feature set is the one recorded with the model version. With --serving_log, a "
    "sample of the scored events (--serving_log_sample, by a stable hash of the example key) "
    "is logged with its served features and prediction as JSON lines, for `skewless audit`."
)


class ScoreStreamingOptions(PipelineOptions):
    """Streaming scoring's own flags. Shared ones live in options.py (one parser per process):
    --subscription, --dead_letter_topic, --skip_table_check, --model_dir, --model_version, the
    batch sizes, --feature_set; --bigtable_* in io/bigtable.py."""

    @classmethod
    def _add_argparse_args(cls, parser):
        parser.add_argument(
            "--output_topic",
            help="projects/P/topics/T for JSON predictions (this and/or --output_table).",
        )
        parser.add_argument(
            "--model_poll_s",
            type=float,
            default=DEFAULT_MODEL_POLL_S,
            help="How often the scorer looks for a higher model version under --model_dir.",
        )
        parser.add_argument(
            "--prediction_cache",
            nargs="?",
            const=True,
            default=False,
            type=on_off,
            help="Hybrid serving: answer a request whose key `skewless precompute` wrote for "
            "the model version serving now from Bigtable (same read as the aggregates), and "
            "only the rest with the model. Needs a feature set that declares a prediction "
            "cache. `--prediction_cache` alone or =true (a Flex Template passes a value).",
        )
        parser.add_argument(
            "--monitor_topic",
            help="projects/P/topics/T: monitor the served features and predictions against "
            "the model's training statistics (its prepared dir) per window of event time and "
            "publish one JSON anomaly record per anomaly when a window closes.",
        )
        parser.add_argument(
            "--monitor_window_s",
            type=int,
            default=DEFAULT_WINDOW_S,
            help="Monitoring window in seconds of event time (default one hour).",
        )
        parser.add_argument(
            "--monitor_allowed_lateness_s",
            type=int,
            default=0,
            help="Examples up to this late (behind the watermark) still count in their "
            "window until it closes; later ones are dropped.",
        )


def on_off(text: str) -> bool:
    """true/false (also 1/0, yes/no, on/off) -> bool, for a flag a Flex Template passes with a
    value."""
    value = str(text).strip().lower()
    if value in ("true", "1", "yes", "on"):
        return True
    if value in ("false", "0", "no", "off"):
        return False
    raise ValueError(f"{text!r} is not true or false")


GROUPS = (
    ScoreStreamingOptions,
    PredictionTableOptions,
    ModelOptions,
    SubscriptionOptions,
    TableCheckOptions,
    BigtableOptions,
    FeatureSetOptions,
    ServingLogOptions,
    EventTimeOptions,
    BigQueryEndpointOptions,
)


JOB = Job(
    name="score",
    mode="--streaming",
    summary="batch or streaming scoring with RunInference",
    description=DESCRIPTION,
    groups=GROUPS,
    required=(
        "model_dir",
        "subscription",
        "bigtable_project",
        "bigtable_instance",
        "bigtable_table",
    ),
    streaming=True,
    template=Template(
        "score_streaming",
        fixed_args=("--streaming",),
        not_parameters={
            "skip_table_check": FLAG_ONLY,
            "bigquery_endpoint": EMULATOR_ONLY["bigquery_endpoint"],
        },
    ),
)
# The batch scorer's flags: given with --streaming they would be silently ignored.
BATCH_ONLY_FLAGS = ("output", "output_format", "output_method", "start", "end", "dead_letter_dir")


class _LookupAggregatesFn(beam.DoFn):
    """A batch of events -> one element: the batch's examples with their as-of aggregates and
    reference columns, read from Bigtable in one request (io/online_store.py).

    A failed read raises, so the runner retries the bundle (reads are idempotent): a Bigtable
    outage delays predictions instead of scoring events with made-up empty windows.
    """

    def __init__(
        self,
        fs: FeatureSet,
        open_cells: Callable[[], object],
        cache_handler: SkewlessModelHandler | None = None,
    ):
        self.fs = fs
        self.open_cells = open_cells
        self.cache_handler = cache_handler

    def setup(self) -> None:
        self._lookup = _shared_lookup(self.fs, self.open_cells)
        self._counters = {
            name: Metrics.counter(NAMESPACE, name)
            for name in (
                "cells_found",
                "cells_missing",
                "reference_reads",
                "reference_cache_hits",
                *(PREDICTION_CACHE_COUNTERS if self.cache_handler is not None else ()),
            )
        }

    def _serving_version(self) -> int | None:
        """The version the model step serves now (the process's one loaded model, shared with
        RunInference), whose cache entries alone may be served."""
        if self.cache_handler is None:
            return None
        return self.cache_handler.load_model().version

    def process(self, events: list[dict]) -> Iterator[list[dict]]:
        lookup = self._lookup
        before = dict(lookup.stats)
        examples = lookup.examples(events, self._serving_version())
        for name, counter in self._counters.items():
            delta = lookup.stats[name] - before[name]
            if delta:
                counter.inc(delta)
        yield examples


_LOOKUPS: dict[tuple, OnlineLookup] = {}
_LOOKUPS_LOCK = threading.Lock()


def _shared_lookup(fs: FeatureSet, open_cells: Callable[[], object]) -> OnlineLookup:
    """One lookup (its reference and prediction caches) per feature set and table in a
    process: the local runner calls setup for every bundle, on a DoFn unpickled for the
    bundle, so its feature set is a new object each time; the declaration's text (what the
    lookup reads of it) says whether it is the same feature set. (Keyed by the object, as it
    was, every bundle got a new lookup and its caches were never reused.)"""
    key = (fs.name, _declaration(fs), getattr(open_cells, "args", id(open_cells)))
    table = open_cells()  # before taking the lock: the opener takes _TABLES_LOCK itself
    with _LOOKUPS_LOCK:
        found = _LOOKUPS.get(key)
        if found is None or found.table is not table:
            found = _LOOKUPS[key] = OnlineLookup(fs, table)
        return found


def _declaration(fs: FeatureSet) -> str:
    """What the online lookup reads of a feature set, as text (stable across unpickling:
    module functions keep their identity)."""
    return repr(
        (fs.event_time, fs.serving_delay_s, fs.keys, fs.aggregates, fs.references,
         fs.example_fields, fs.prediction_cache)
    )  # fmt: skip


class LookupAggregates(beam.PTransform):
    """Typed events -> batches (lists) of examples with the aggregates as of their event time.

    A batch is the events of one bundle, up to `max_batch`: BatchElements with a fixed size
    (its adaptive sizing would restart at one event in every bundle of the local runner).
    `open_cells()` (called on the worker) returns a Bigtable table, or anything with the same
    `read_rows(row_set=..., filter_=...)`.
    """

    def __init__(
        self,
        fs: FeatureSet,
        open_cells: Callable[[], object],
        max_batch: int = LOOKUP_BATCH,
        cache_handler: SkewlessModelHandler | None = None,
    ):
        super().__init__()
        self.fs = fs
        self.open_cells = open_cells
        self.max_batch = max_batch
        self.cache_handler = cache_handler

    @classmethod
    def from_bigtable(
        cls,
        fs: FeatureSet,
        project: str,
        instance: str,
        table: str,
        max_batch: int = LOOKUP_BATCH,
        cache_handler: SkewlessModelHandler | None = None,
    ) -> LookupAggregates:
        return cls(fs, _TableOpener(project, instance, table), max_batch, cache_handler)

    def expand(self, events):
        return (
            events
            | "Batch" >> beam.BatchElements(min_batch_size=self.max_batch, max_batch_size=self.max_batch)
            | "ReadCells"
            >> beam.ParDo(_LookupAggregatesFn(self.fs, self.open_cells, self.cache_handler))
        )


_TABLES: dict[tuple, object] = {}
_TABLES_LOCK = threading.Lock()


class _TableOpener:
    """Opens the Bigtable table once per process: the local runner calls DoFn.setup for every
    bundle, and a new client per bundle costs more than the read."""

    def __init__(self, project: str, instance: str, table: str):
        self.args = (project, instance, table)

    def __call__(self):
        with _TABLES_LOCK:
            if self.args not in _TABLES:
                _TABLES[self.args] = open_table(*self.args)
            return _TABLES[self.args]


# --- scoring ---------------------------------------------------------------------------------


SERVING_LOG = "serving_log"  # the tag, and the key a sampled prediction carries its record in
PREDICTION_CACHE_COUNTERS = (
    "prediction_cache_hits",
    "prediction_cache_misses",
    "prediction_cache_version_not_ready",
    "prediction_cache_collisions",
)
CACHE_HITS = "cache_hits"


class ServeFromCache(beam.DoFn):
    """Batches of examples -> the batch of misses (main, for the model) and, to CACHE_HITS,
    the prediction dict of every example the lookup found in the prediction cache (`source`
    "cache", the version whose entry it is; with the serving log's record when sampled)."""

    def __init__(self, fs: FeatureSet, log_sample: float | None = None):
        self.fs = fs
        self.log_sample = log_sample

    def setup(self) -> None:
        self._format = ToPredictionDict(self.fs)

    def process(self, examples: list[dict]) -> Iterator:
        misses = []
        for example in examples:
            cached = example.get(CACHED)  # (probability, version) of a hit; misses have none
            if cached is None:
                misses.append(example)
                continue
            probability, version = cached
            out = self._format.format(example, probability, version, SOURCE_CACHE)
            if self.log_sample is not None and is_sampled(example_key(self.fs, example), self.log_sample):
                out[SERVING_LOG] = serving_log_record(
                    self.fs, example, probability, version, SOURCE_CACHE
                )
            yield beam.pvalue.TaggedOutput(CACHE_HITS, out)
        if misses:
            yield misses


class ToLoggedPredictionDict(ToPredictionDict):
    """ToPredictionDict that also carries, for an example in the serving log's sample, its log
    record (served features, model version, prediction) under SERVING_LOG; SplitServingLog
    takes it off. Built inside RunInference, where the example and its prediction meet."""

    def __init__(self, fs: FeatureSet, sample: float):
        super().__init__(fs)
        self.fs = fs
        self.sample = sample

    def __call__(self, result) -> dict:
        out = super().__call__(result)
        example = result.example
        if is_sampled(example_key(self.fs, example), self.sample):
            out[SERVING_LOG] = serving_log_record(
                self.fs, example, out[PROBABILITY], out[MODEL_VERSION], out[SOURCE]
            )
        return out


class SplitServingLog(beam.DoFn):
    """Prediction dicts -> the predictions (main) and the serving log records (SERVING_LOG)."""

    def setup(self) -> None:
        self._logged = Metrics.counter(NAMESPACE, "serving_log_events")

    def process(self, prediction: dict) -> Iterator:
        if SERVING_LOG not in prediction:
            yield prediction
            return
        prediction = dict(prediction)  # an input element is not ours to change
        self._logged.inc()
        yield beam.pvalue.TaggedOutput(SERVING_LOG, prediction.pop(SERVING_LOG))
        yield prediction


class ScoreEvents(ScoreWithModel):
    """Batches (lists) of examples, timestamps as epoch ms -> (prediction dicts, dead letters).

    RunInference gets the batches as they are (`with_no_batching`): one model call per batch.
    A batch whose inference fails is dead-lettered example by example (skewless.beam_pipelines.score_core).
    With `log_sample`, the predictions of sampled examples carry their serving log record.
    """

    def __init__(
        self, fs: FeatureSet, handler: SkewlessModelHandler, log_sample: float | None = None
    ):
        postprocess = (
            ToPredictionDict(fs) if log_sample is None else ToLoggedPredictionDict(fs, log_sample)
        )
        super().__init__(handler, postprocess, prebatched=True)
        self.fs = fs


def to_prediction_message(prediction: dict):
    from apache_beam.io.gcp.pubsub import PubsubMessage

    data = json.dumps(prediction, separators=(",", ":")).encode("utf-8")
    return PubsubMessage(data=data, attributes={"model_version": str(prediction["model_version"])})


class _ToMessage(beam.DoFn):
    """A DoFn class rather than a Map: the local runner's memoised DoFn specs key on the class
    (a Map's wrapped function is a new object after every bundle's pickle round trip)."""

    def process(self, prediction: dict):
        yield to_prediction_message(prediction)


def prediction_row_fields(fs: FeatureSet) -> list:
    """The BigQuery columns of a streamed prediction: the batch scorer's (the example key,
    the event time, probability, model_version; io/bigquery_sink.bigquery_schema of
    score_core.prediction_schema), then `source` (STRING, REQUIRED)."""
    from google.cloud import bigquery

    from skewless.beam_pipelines.io.bigquery_sink import bigquery_schema
    from skewless.beam_pipelines.score_core import prediction_schema

    return [
        *bigquery_schema(prediction_schema(fs)),
        bigquery.SchemaField(SOURCE, "STRING", mode="REQUIRED"),
    ]


class _ToRow(beam.DoFn):
    """Prediction dict -> the row of prediction_row_fields (a DoFn class: see _ToMessage).
    Timestamps stay the ISO-8601 text of the prediction dict, which BigQuery takes."""

    def __init__(self, names: list[str]):
        self.names = names

    def process(self, prediction: dict) -> Iterator[dict]:
        row = {name: prediction.get(name) for name in self.names}
        row[SOURCE] = prediction[SOURCE]  # "model" or "cache": every prediction dict has it
        yield row


@dataclass(frozen=True)
class PredictionTable:
    """Where --output_table rows go: the table, the REST endpoint (emulators), the feature set
    (its columns and the dead letters' feature_set)."""

    table: str
    fs: FeatureSet
    endpoint: str | None = None


class WritePredictions(beam.PTransform):
    """Prediction dicts -> JSON messages on a Pub/Sub topic (attribute `model_version`) and/or
    rows of a BigQuery table (streaming inserts); the rows BigQuery refuses go to
    `dead_letters` (default: counted and logged). The Pub/Sub steps keep their labels
    (ToMessage, Publish) whether or not a table is written: Dataflow's update matches steps by
    name."""

    def __init__(
        self,
        topic: str | None = None,
        table: PredictionTable | None = None,
        dead_letters: beam.PTransform | None = None,
    ):
        super().__init__()
        if topic is None and table is None:
            raise ValueError("WritePredictions needs a topic, a table or both")
        self.topic = topic
        self.table = table
        self.dead_letters = dead_letters

    def expand(self, predictions):
        published = None
        if self.topic is not None:
            from apache_beam.io.gcp.pubsub import WriteToPubSub

            published = (
                predictions
                | "ToMessage" >> beam.ParDo(_ToMessage())
                | "Publish" >> WriteToPubSub(self.topic, with_attributes=True)
            )
        if self.table is None:
            return published
        from skewless.beam_pipelines.io.bigquery_sink import InsertRowsToBigQuery

        t = self.table
        names = [f.name for f in prediction_row_fields(t.fs) if f.name != SOURCE]
        refused = (
            predictions
            | "ToRow" >> beam.ParDo(_ToRow(names))
            | "Insert" >> InsertRowsToBigQuery(t.table, endpoint=t.endpoint, feature_set=t.fs.name)
        )
        return refused | "RefusedRows" >> (self.dead_letters or PublishDeadLetters(None))


def build_pipeline(
    p: beam.Pipeline,
    fs: FeatureSet,
    handler: SkewlessModelHandler,
    source: beam.PTransform,
    lookup: beam.PTransform,
    sink: beam.PTransform,
    dead_letters: beam.PTransform,
    serving_log: WriteServingLog | None = None,
    timestamp_attribute: str = DEFAULT_TIMESTAMP_ATTRIBUTE,
    prediction_cache: bool = False,
    monitor: beam.PTransform | None = None,
) -> None:
    """Wire streaming scoring. `source` yields PubsubMessages, `lookup` turns events into
    batches (lists) of examples (LookupAggregates), `sink` takes prediction dicts,
    `dead_letters` dead-letter dicts, `serving_log` (optional) the log records of its sample.
    With `prediction_cache` (the lookup built with the handler as its `cache_handler`), the
    examples the lookup found in the cache are answered from it and only the rest is scored.
    Messages are read as the aggregate job reads them (ParseMessages: the event time of the
    `timestamp_attribute`, which must agree with the payload's), so both jobs accept and
    reject the same messages. `monitor` (optional, MonitorServedTraffic and its sink) takes
    (every served example's batch, the predictions), cache hits included."""
    messages = p | "Read" >> source
    payloads, bad_timestamps = messages | "EventTime" >> ParseMessages(timestamp_attribute, fs)
    events, invalid = payloads | "Validate" >> CheckRecords(fs)
    batches = served = events | "LookupAggregates" >> lookup
    sample = serving_log.sample if serving_log is not None else None
    if prediction_cache:
        split = batches | "ServeFromCache" >> beam.ParDo(
            ServeFromCache(fs, sample)
        ).with_outputs(CACHE_HITS, main="misses")
        batches = split.misses
    predictions, failed = batches | "Score" >> ScoreEvents(fs, handler, sample)
    if prediction_cache:
        predictions = (predictions, split[CACHE_HITS]) | "ModelAndCache" >> beam.Flatten()
    if serving_log is not None:
        split = predictions | "SplitServingLog" >> beam.ParDo(SplitServingLog()).with_outputs(
            SERVING_LOG, main="predictions"
        )
        predictions = split.predictions
        _ = split[SERVING_LOG] | "ServingLog" >> serving_log
    _ = predictions | "Write" >> sink
    if monitor is not None:
        _ = (served, predictions) | "Monitor" >> monitor
    _ = (
        (bad_timestamps, invalid, failed)
        | "AllDeadLetters" >> beam.Flatten()
        | "DeadLetters" >> dead_letters
    )


def _fail(message: str) -> SystemExit:
    return SystemExit(f"skewless score --streaming: {message}")


def _batch_only(argv: Sequence[str]) -> list[str]:
    given = {a.split("=", 1)[0] for a in argv if a.startswith("--")}
    return [f"--{name}" for name in BATCH_ONLY_FLAGS if f"--{name}" in given]


@dataclass(frozen=True)
class ScoreStreamingConfig:
    """The streaming scorer resolved from its options before the job starts (every error
    here is a one-line usage error): the model (watched for new versions unless pinned), the
    Bigtable table (checked), the topics, the BigQuery table (created if missing, checked)
    and the optional serving log."""

    model: LoadedVersion
    model_dir: str
    subscription: str
    output_topic: str | None
    dead_letter_topic: str | None
    project: str
    instance: str
    table: str
    max_batch: int
    timestamp_attribute: str
    serving_log: WriteServingLog | None
    serving_log_path: str | None
    serving_log_sample: float
    prediction_cache: bool = False
    output_table: str | None = None
    bigquery_endpoint: str | None = None
    monitor: beam.PTransform | None = None
    monitor_topic: str | None = None

    @classmethod
    def from_options(cls, options: PipelineOptions) -> ScoreStreamingConfig:
        opts = options.view_as(ScoreStreamingOptions)
        model_opts = options.view_as(ModelOptions)
        pubsub = options.view_as(SubscriptionOptions)
        bt = options.view_as(BigtableOptions)
        log_opts = options.view_as(ServingLogOptions)
        output_table = options.view_as(PredictionTableOptions).output_table
        endpoint = options.view_as(BigQueryEndpointOptions).bigquery_endpoint
        skip_checks = options.view_as(TableCheckOptions).skip_table_check
        if not opts.output_topic and not output_table:
            raise _fail("give --output_topic, --output_table or both: where the predictions go")
        try:
            model = load_model(
                model_opts.model_dir,
                model_opts.model_version,
                options.view_as(FeatureSetOptions).feature_set,
                min_batch_size=model_opts.min_batch_size,
                max_batch_size=model_opts.max_batch_size,
                watch_poll_s=opts.model_poll_s,
            )
            serving_log = None
            if log_opts.serving_log:
                sample_threshold(log_opts.serving_log_sample)
                serving_log = WriteServingLog(
                    log_opts.serving_log, log_opts.serving_log_sample, log_opts.serving_log_window_s
                )
            families = [model.fs.name]
            if opts.prediction_cache:
                cache_of(model.fs)  # one line if the feature set declares none
                families.append(cache_family(model.fs))
            if not skip_checks:
                check_table(bt.bigtable_project, bt.bigtable_instance, bt.bigtable_table, families)
            if output_table:
                _check_output_table(output_table, model.fs, endpoint, create=not skip_checks)
            monitor = _monitor(opts, model) if opts.monitor_topic else None
        except (*MODEL_ERRORS, BigtableSetupError, ValueError) as exc:
            raise _fail(str(exc)) from None
        return cls(
            model=model,
            model_dir=model_opts.model_dir,
            subscription=pubsub.subscription,
            output_topic=opts.output_topic,
            dead_letter_topic=pubsub.dead_letter_topic,
            project=bt.bigtable_project,
            instance=bt.bigtable_instance,
            table=bt.bigtable_table,
            max_batch=min(model_opts.max_batch_size, LOOKUP_BATCH),
            timestamp_attribute=options.view_as(EventTimeOptions).timestamp_attribute,
            serving_log=serving_log,
            serving_log_path=log_opts.serving_log,
            serving_log_sample=log_opts.serving_log_sample,
            prediction_cache=opts.prediction_cache,
            output_table=output_table,
            bigquery_endpoint=endpoint,
            monitor=monitor,
            monitor_topic=opts.monitor_topic,
        )

    def sink(self) -> WritePredictions:
        """The predictions' sink: the topic and/or the table, refused rows to the dead letters."""
        table = None
        if self.output_table:
            table = PredictionTable(self.output_table, self.model.fs, self.bigquery_endpoint)
        return WritePredictions(self.output_topic, table, PublishDeadLetters(self.dead_letter_topic))

    def describe(self) -> dict:
        """What the job reads, writes and serves, for its start-up log line."""
        handler = self.model.handler
        return {
            "subscription": self.subscription,
            "output_topic": self.output_topic,
            "output_table": self.output_table,
            "dead_letter_topic": self.dead_letter_topic,
            "model_dir": self.model_dir,
            "model_version": handler.version,
            "feature_set": self.model.fs.name,
            "hot_swap": isinstance(handler, WatchingModelHandler),
            "serving_log": self.serving_log_path,
            "serving_log_sample": self.serving_log_sample if self.serving_log_path else None,
            "prediction_cache": self.prediction_cache,
            "monitor_topic": self.monitor_topic,
        }


def _check_output_table(table: str, fs: FeatureSet, endpoint: str | None, create: bool) -> None:
    """The table's name (always), and unless `create` is False: the table, created with
    prediction_row_fields if missing, or an existing one whose columns take the rows. Raises
    ValueError with one line a user can act on."""
    from skewless.beam_pipelines.io.bigquery import validate_table_name
    from skewless.beam_pipelines.io.bigquery_sink import ensure_table

    validate_table_name(table)
    if not create:
        return
    from google.api_core.exceptions import GoogleAPIError
    from google.auth.exceptions import GoogleAuthError

    try:
        ensure_table(table, prediction_row_fields(fs), endpoint)
    except (GoogleAPIError, GoogleAuthError) as exc:
        message = getattr(exc, "message", None) or str(exc)
        raise ValueError(f"--output_table {table}: {type(exc).__name__}: {message}") from None


class _Monitor(beam.PTransform):
    """MonitorServedTraffic, its records published to the monitoring topic."""

    def __init__(self, monitor: MonitorServedTraffic, topic: str):
        super().__init__()
        self.monitor = monitor
        self.topic = topic

    def expand(self, inputs):
        return inputs | "Windows" >> self.monitor | "Publish" >> PublishAnomalies(self.topic)


def _monitor(opts: ScoreStreamingOptions, model: LoadedVersion) -> _Monitor:
    """The monitoring branch of --monitor_topic, against the training statistics of the model
    version loaded now (its model.json `prepared_dir`); ValueError when there are none."""
    version = model.handler.model_version
    prepared = version.metadata.get("prepared_dir")
    if not prepared:
        raise ValueError(
            f"--monitor_topic: model version {version.version} records no prepared_dir to "
            "read its training statistics from"
        )
    reference = load_monitor_reference(
        prepared, model.fs, eval_mean_probability(version.path), opts.monitor_window_s
    )
    windows = MonitorServedTraffic(
        model.fs, reference, opts.monitor_window_s, opts.monitor_allowed_lateness_s
    )
    return _Monitor(windows, opts.monitor_topic)


def make_pipeline(argv: Sequence[str] | None) -> tuple[beam.Pipeline, dict]:
    """Parse options, check the model and the table, and build (not run) the job."""
    argv = list(sys.argv[1:] if argv is None else argv)
    batch_only = _batch_only(argv)  # before the unknown-flag check, which would name another
    if batch_only:
        raise _fail(
            f"batch-only option(s) {', '.join(batch_only)}: streaming predictions go to "
            "--output_topic and/or --output_table and dead letters to --dead_letter_topic"
        )
    options = parse_job_options(argv, JOB, default_runner=LOCAL_STREAMING_RUNNER)
    std = options.view_as(StandardOptions)
    std.streaming = True  # set in code: Flex Template metadata cannot carry it
    config = ScoreStreamingConfig.from_options(options)
    if std.runner in LOCAL_STREAMING_RUNNERS:
        # Pulls of many messages per bundle instead of Beam's 10: the local runner's price per
        # bundle of every step is paid once per pull.
        prepare_local_runner()
    from apache_beam.io.gcp.pubsub import ReadFromPubSub

    fs = config.model.fs
    p = beam.Pipeline(options=options)
    build_pipeline(
        p,
        fs,
        config.model.handler,
        ReadFromPubSub(subscription=config.subscription, with_attributes=True),
        LookupAggregates.from_bigtable(
            fs,
            config.project,
            config.instance,
            config.table,
            max_batch=config.max_batch,
            cache_handler=config.model.handler if config.prediction_cache else None,
        ),
        config.sink(),
        PublishDeadLetters(config.dead_letter_topic),
        config.serving_log,
        timestamp_attribute=config.timestamp_attribute,
        prediction_cache=config.prediction_cache,
        monitor=config.monitor,
    )
    return p, config.describe()


def run(argv: Sequence[str] | None = None):
    """Parse options, build and start the job; blocks until it ends (the local runner: Ctrl-C)."""
    configure_logging()
    p, info = make_pipeline(argv)
    if info["dead_letter_topic"] is None:
        LOG.warning("no --dead_letter_topic: bad messages are only counted and logged")
    result = p.run()
    LOG.info("streaming scorer started: %s", json.dumps(info))
    result.wait_until_finish()
    return result


if __name__ == "__main__":
    launch(JOB, run)
