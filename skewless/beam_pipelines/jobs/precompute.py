"""The precompute job (batch): the most frequent requests of a period, scored once per model
version and written to Bigtable as a prediction cache (hybrid serving).

The requests are the events of a period (files or BigQuery, the source options of prepare,
--start/--end) or the examples of a serving log. Each is keyed by the feature set's
PredictionCache key (skewless.transforms.prediction_cache.key_text: the scorer's rule); the
`--top_n` keys asked most often (ties: the larger key text, so a re-run picks the same keys)
are scored once with model version V through the scoring core, and written with the version's
completion marker last (skewless.beam_pipelines.io.prediction_cache).

Exact by construction: the job refuses a model whose transform graph reads an input outside
the key (model.json `reads_inputs`, from the graph's dependency map): every request with a
key gets the prediction the model would compute for it, so the cache changes where a
prediction comes from, never what it is. That is also why a key's representative request
(its earliest event) may be scored with empty windows and no reference rows: the model does
not read them.
"""

from __future__ import annotations

import functools
import json
import logging
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import apache_beam as beam
from apache_beam.io.filesystems import FileSystems
from apache_beam.metrics import Metrics
from apache_beam.options.pipeline_options import PipelineOptions
from apache_beam.pvalue import AsSingleton, TaggedOutput

from skewless.beam_pipelines.io.bigtable import (
    BigtableOptions,
    BigtableSetupError,
    BigtableWriteOptions,
    check_table,
    shared_table,
)
from skewless.beam_pipelines.io.file_sinks import WriteDeadLetterFiles
from skewless.beam_pipelines.io.prediction_cache import (
    WriteEntriesFn,
    version_timestamp_ms,
    write_marker,
)
from skewless.beam_pipelines.io.serving_log import ReadServingLog
from skewless.beam_pipelines.runtime.inputs import describe_source, read_source
from skewless.beam_pipelines.runtime.job import EMULATOR_ONLY, FLAG_ONLY, Job, Template
from skewless.beam_pipelines.runtime.launch import launch
from skewless.beam_pipelines.runtime.options import (
    BigQueryEndpointOptions,
    FeatureSetOptions,
    ModelOptions,
    OutputDirOptions,
    PeriodOptions,
    ServingLogOptions,
    SourceOptions,
    TableCheckOptions,
    parse_period,
)
from skewless.beam_pipelines.runtime.parsing import parse_job_options, run_and_summarise
from skewless.beam_pipelines.runtime.process import before_run, check_output_dir, configure_logging
from skewless.beam_pipelines.score_core import (
    MODEL_ERRORS,
    LoadedVersion,
    ScoreWithModel,
    load_model,
)
from skewless.models.versions import ModelVersion
from skewless.transforms.aggregations import attach_aggregates
from skewless.transforms.featureset import FeatureSet, FeatureSetError
from skewless.transforms.prediction_cache import (
    cache_family,
    cache_of,
    key_hash,
    key_text,
    uncovered_inputs,
)
from skewless.transforms.record_checks import NAMESPACE, CheckRecords, dead_letter, event_records

LOG = logging.getLogger("skewless.precompute")
SUMMARY = "summary.json"
KEY_FIELD = "__cache_key"  # carried on a request through the scoring core (not a model input)
REQUESTS_FIELD = "__cache_requests"
DEAD = "dead"
SCORE_BATCH = 2048  # requests per model call, at most
DESCRIPTION = (
    "Prediction cache (hybrid serving): key the requests of a period (the raw events of "
    "--input or BigQuery between --start and --end, default the feature set's bundled input; "
    "or the examples of a --serving_log) by the feature set's prediction cache key, score the "
    "--top_n most frequent keys once with the model version (--model_version, default the "
    "highest under --model_dir) and write them to the Bigtable table the streaming scorer "
    "reads (family <feature set>_predictions), with the version's completion marker last. "
    "Refuses a model that reads an input outside the key. Writes summary.json (keys "
    "considered and written, the share of the period's requests they cover) and dead "
    "letters to --output_dir."
)


class PrecomputeOptions(PipelineOptions):
    """precompute's own flag; the period, source, model, serving log and Bigtable ones are
    shared."""

    @classmethod
    def _add_argparse_args(cls, parser):
        parser.add_argument(
            "--top_n",
            type=int,
            help="How many of the most frequent keys to precompute (default: the feature set's "
            "PredictionCache.top_n; 0: every key of the period).",
        )


GROUPS = (
    PrecomputeOptions,
    PeriodOptions,
    ModelOptions,
    SourceOptions,
    ServingLogOptions,
    BigQueryEndpointOptions,
    FeatureSetOptions,
    BigtableOptions,
    BigtableWriteOptions,
    TableCheckOptions,
    OutputDirOptions,
)

JOB = Job(
    name="precompute",
    summary="batch: precomputed predictions of the most frequent keys -> Bigtable",
    description=DESCRIPTION,
    groups=GROUPS,
    required=("model_dir", "output_dir", "bigtable_project", "bigtable_instance", "bigtable_table"),
    template=Template(
        "precompute",
        not_parameters={
            **EMULATOR_ONLY,
            "skip_table_check": FLAG_ONLY,
            "serving_log_sample": "precompute reads every record of the log it is given",
            "serving_log_window_s": "only the streaming scorer writes serving logs",
        },
    ),
)


# --- the requests ------------------------------------------------------------------------------


def request_example(fs: FeatureSet, event: dict) -> dict:
    """A typed event as a request the model can score: empty windows and no reference rows
    (the model reads neither: precompute checked that it reads only key fields)."""
    example = attach_aggregates(fs, event, lambda _: None)
    for table in fs.references:
        for column in table.columns:
            example[column.name] = None
    return example


class _InPeriod(beam.DoFn):
    """Requests -> those with event time in [start, end)."""

    def __init__(self, fs: FeatureSet, start_ms: int | None, end_ms: int | None):
        self.fs = fs
        self.start_ms = start_ms
        self.end_ms = end_ms

    def process(self, example: dict) -> Iterator[dict]:
        t = example.get(self.fs.event_time)
        if t is None:
            return
        if (self.start_ms is None or t >= self.start_ms) and (self.end_ms is None or t < self.end_ms):
            yield example


class _EventRequests(beam.DoFn):
    def __init__(self, fs: FeatureSet):
        self.fs = fs

    def process(self, event: dict) -> Iterator[dict]:
        yield request_example(self.fs, event)


class _LoggedRequests(beam.DoFn):
    """Serving log records -> the examples as served (a record without them: a dead letter)."""

    def setup(self) -> None:
        self._read = Metrics.counter(NAMESPACE, "serving_log_records_read")

    def process(self, record) -> Iterator:
        self._read.inc()
        features = record.get("features") if isinstance(record, dict) else None
        if not isinstance(features, dict):
            yield TaggedOutput(DEAD, dead_letter("request", "serving log record without features", record))
            return
        yield dict(features)


class _KeyRequests(beam.DoFn):
    """Requests -> (key text, request); a request with a null key field is never cached (the
    scorer sends it to the model): a dead letter naming the field."""

    def __init__(self, fs: FeatureSet):
        self.fs = fs

    def setup(self) -> None:
        self._keyed = Metrics.counter(NAMESPACE, "requests_keyed")
        self._null = Metrics.counter(NAMESPACE, "requests_with_null_key_field")

    def process(self, example: dict) -> Iterator:
        missing = [name for name in self.fs.prediction_cache.key if example.get(name) is None]
        if missing:
            self._null.inc()
            yield TaggedOutput(
                DEAD, dead_letter("key", f"key field(s) {missing} are null: not cached", example, self.fs.name)
            )
            return
        self._keyed.inc()
        yield key_text(self.fs, example), example


class KeyStats(beam.CombineFn):
    """Requests of one key -> (how many, the earliest by event time: a representative)."""

    def __init__(self, event_time: str):
        self.event_time = event_time

    def create_accumulator(self):
        return 0, None

    def _earlier(self, a: dict | None, b: dict | None) -> dict | None:
        if a is None or b is None:
            return a if b is None else b
        ta, tb = a.get(self.event_time), b.get(self.event_time)
        if ta != tb:
            return a if ta < tb else b
        # The same time: the smaller text, so the choice does not depend on the order of input.
        return a if json.dumps(a, sort_keys=True, default=str) <= json.dumps(b, sort_keys=True, default=str) else b

    def add_input(self, acc, example):
        return acc[0] + 1, self._earlier(acc[1], example)

    def merge_accumulators(self, accs):
        count, best = 0, None
        for n, example in accs:
            count, best = count + n, self._earlier(best, example)
        return count, best

    def extract_output(self, acc):
        return acc


def _rank(item) -> tuple:
    text, (count, _) = item
    return count, text


class _CountKeys(beam.DoFn):
    def setup(self) -> None:
        self._keys = Metrics.counter(NAMESPACE, "keys_considered")

    def process(self, item) -> Iterator:
        self._keys.inc()
        yield item


class _OnePerHash(beam.DoFn):
    """(hash, keys sharing it) -> the key asked most often (ties: the larger text); the
    others are counted and dead-lettered: a row holds one key, and the scorer compares the
    stored text, so they would only ever be misses."""

    def __init__(self, fs: FeatureSet):
        self.fs = fs

    def setup(self) -> None:
        self._collisions = Metrics.counter(NAMESPACE, "key_hash_collisions")
        self._selected = Metrics.counter(NAMESPACE, "keys_selected")

    def process(self, item) -> Iterator:
        digest, keys = item
        ranked = sorted(keys, key=_rank, reverse=True)
        text, (count, example) = ranked[0]
        self._selected.inc()
        yield {**example, KEY_FIELD: text, REQUESTS_FIELD: count}
        for other, (n, _) in ranked[1:]:
            self._collisions.inc()
            yield TaggedOutput(
                DEAD,
                dead_letter(
                    "key",
                    f"key hash {digest} collides with the more frequent key {text}: not cached",
                    {"key": other, "requests": n},
                    self.fs.name,
                ),
            )


class ToEntry:
    """Postprocess fn: PredictionResult of one request -> a cache entry."""

    def __call__(self, result) -> dict:
        example = result.example
        Metrics.counter(NAMESPACE, "examples_scored").inc()
        return {
            "key": example[KEY_FIELD],
            "requests": int(example[REQUESTS_FIELD]),
            "probability": float(result.inference),
            "model_version": int(result.model_id),
        }


class _WriteMarkerFn(beam.DoFn):
    """After every entry was written (its input is the writes' global result): the version's
    completion marker, with the run's figures, and the same figures as the job's output."""

    def __init__(self, project: str, instance: str, table: str, fs: FeatureSet, version: int,
                 stamp_ms: int, top_n: int):  # fmt: skip
        self.args = (project, instance, table)
        self.fs = fs
        self.version = version
        self.stamp_ms = stamp_ms
        self.top_n = top_n

    def process(self, failed_requests: int, requests: int, scored: dict) -> Iterator[dict]:
        covered = scored["requests"] - failed_requests
        marker = {
            "model_version": self.version,
            "top_n": self.top_n,
            "requests": requests,
            "requests_covered": covered,
            "coverage": round(covered / requests, 6) if requests else 0.0,
        }
        write_marker(shared_table(*self.args), self.fs, self.version, self.stamp_ms, marker)
        Metrics.counter(NAMESPACE, "prediction_cache_markers_written").inc()
        yield marker


def _sum_entries(entries: list) -> dict:
    return {"entries": len(entries), "requests": sum(e["requests"] for e in entries)}


def _failed_requests(letters) -> int:
    return sum(int(letter["record"]["entry"]["requests"]) for letter in letters)


def build_pipeline(
    p: beam.Pipeline,
    fs: FeatureSet,
    loaded: LoadedVersion,
    requests: beam.PTransform,
    bigtable: tuple[str, str, str],
    dead_letters: beam.PTransform,
    *,
    top_n: int,
    stamp_ms: int,
    period: tuple[int | None, int | None] = (None, None),
    retry_s: float = 600.0,
):
    """Wire precompute. `requests` is a PTransform from the pipeline's root to example dicts
    (events through `RequestsFromEvents`, or a log through `RequestsFromLog`); returns the
    marker's PCollection (one element)."""
    handler = loaded.handler
    examples, bad = p | "Requests" >> requests
    examples = examples | "InPeriod" >> beam.ParDo(_InPeriod(fs, *period))
    keyed = examples | "Key" >> beam.ParDo(_KeyRequests(fs)).with_outputs(DEAD, main="keyed")
    total = keyed.keyed | "CountRequests" >> beam.combiners.Count.Globally()
    per_key = (
        keyed.keyed
        | "PerKey" >> beam.CombinePerKey(KeyStats(fs.event_time))
        | "CountKeys" >> beam.ParDo(_CountKeys())
    )
    if top_n > 0:
        per_key = (
            per_key
            | "Top" >> beam.combiners.Top.Of(top_n, key=_rank)
            | "Unlist" >> beam.FlatMap(lambda items: items)
        )
    hashes = fs.prediction_cache.hash_chars
    chosen = (
        per_key
        | "ByHash" >> beam.Map(lambda item: (key_hash(item[0], hashes), item))
        | "GroupByHash" >> beam.GroupByKey()
        | "OnePerHash" >> beam.ParDo(_OnePerHash(fs)).with_outputs(DEAD, main="chosen")
    )
    batch = min(handler.batch_elements_kwargs().get("max_batch_size", SCORE_BATCH), SCORE_BATCH)
    entries, failed = (
        chosen.chosen
        | "Batch" >> beam.BatchElements(min_batch_size=1, max_batch_size=batch)
        | "Score" >> ScoreWithModel(handler, ToEntry(), prebatched=True)
    )
    write_failures = entries | "Write" >> beam.ParDo(
        WriteEntriesFn(*bigtable, fs, handler.version, stamp_ms, retry_s)
    )
    scored = entries | "AllEntries" >> beam.combiners.ToList() | "SumEntries" >> beam.Map(_sum_entries)
    failed_requests = (
        write_failures
        | "AllWriteFailures" >> beam.combiners.ToList()
        | "FailedRequests" >> beam.Map(_failed_requests)
    )
    marker = failed_requests | "Marker" >> beam.ParDo(
        _WriteMarkerFn(*bigtable, fs, handler.version, stamp_ms, top_n),
        AsSingleton(total),
        AsSingleton(scored),
    )
    _ = (
        (bad, keyed[DEAD], chosen[DEAD], failed, write_failures)
        | "AllDeadLetters" >> beam.Flatten()
        | "DeadLetters" >> dead_letters
    )
    return marker


class RequestsFromEvents(beam.PTransform):
    """Raw records -> (requests, dead letters): validated and derived like every job's."""

    def __init__(self, fs: FeatureSet, source: beam.PTransform):
        super().__init__()
        self.fs = fs
        self.source = source

    def expand(self, pbegin):
        read = pbegin | "Read" >> self.source
        events, invalid = read | "Validate" >> CheckRecords(self.fs, batches=True)
        one_by_one = events | "Events" >> beam.FlatMap(event_records)
        return one_by_one | "AsRequests" >> beam.ParDo(_EventRequests(self.fs)), invalid


class RequestsFromLog(beam.PTransform):
    """Serving log files -> (the examples as served, dead letters)."""

    def __init__(self, path: str):
        super().__init__()
        self.path = path

    def expand(self, pbegin):
        out = (
            pbegin
            | "ReadLog" >> ReadServingLog(self.path)
            | "Examples" >> beam.ParDo(_LoggedRequests()).with_outputs(DEAD, main="examples")
        )
        return out.examples, out[DEAD]


# --- the run -------------------------------------------------------------------------------------


def _fail(message: str) -> SystemExit:
    return SystemExit(f"skewless precompute: {message}")


def check_exact(fs: FeatureSet, version: ModelVersion) -> None:
    """FeatureSetError unless every raw input the version reads is a key field."""
    cache_of(fs)
    reads = version.metadata.get("reads_inputs")
    if reads is None:
        reads = _reads_from_prepared(version)
    outside = uncovered_inputs(fs, reads)
    if outside:
        raise FeatureSetError(
            f"model version {version.version} reads {', '.join(outside)}, which "
            f"{'is' if len(outside) == 1 else 'are'} not in the prediction cache key "
            f"({', '.join(fs.prediction_cache.key)}): a cached prediction would not be the "
            f"model's for every request with its key"
        )


def _reads_from_prepared(version: ModelVersion) -> list[str]:
    """A model trained before model.json recorded `reads_inputs`: the dependency map of its
    prepared transform graph, if that is still there."""
    from skewless.models.dependencies import inputs_read, transform_dependencies

    prepared = version.metadata.get("prepared_dir")
    transform = os.path.join(prepared or "", "transform")
    if not prepared or not os.path.isdir(os.path.join(transform, "transform_fn")):
        raise FeatureSetError(
            f"model version {version.version} records no input dependencies and its prepared "
            f"directory {prepared!r} is gone: train it again to use a prediction cache"
        )
    features = version.metadata.get("transformed_features", {})
    return inputs_read(
        transform_dependencies(transform),
        [*features.get("numeric", []), *features.get("categorical", {})],
    )


@dataclass(frozen=True)
class PrecomputeConfig:
    """A precompute run resolved from its options (every error here is one line)."""

    model: LoadedVersion
    requests: beam.PTransform
    described_source: dict
    bigtable: tuple[str, str, str]
    top_n: int
    period: tuple[int | None, int | None]
    stamp_ms: int
    output_dir: str
    retry_s: float

    @classmethod
    def from_options(cls, options: PipelineOptions) -> PrecomputeConfig:
        with before_run():
            opts = options.view_as(PrecomputeOptions)
            model_opts = options.view_as(ModelOptions)
            bt = options.view_as(BigtableOptions)
            log = options.view_as(ServingLogOptions).serving_log
            span = options.view_as(PeriodOptions)
            try:
                period = parse_period(span.start, span.end)
            except ValueError as exc:
                raise _fail(str(exc)) from None
            try:
                model = load_model(
                    model_opts.model_dir,
                    model_opts.model_version,
                    options.view_as(FeatureSetOptions).feature_set,
                    min_batch_size=model_opts.min_batch_size,
                    max_batch_size=model_opts.max_batch_size,
                )
                fs = model.fs
                version = model.handler.model_version
                check_exact(fs, version)
                top_n = fs.prediction_cache.top_n if opts.top_n is None else opts.top_n
                if top_n < 0:
                    raise ValueError(f"--top_n must be >= 0 (0: every key), got {top_n}")
                source_opts = options.view_as(SourceOptions)
                if log and (source_opts.input or source_opts.bigquery_table or source_opts.bigquery_query):
                    raise ValueError("give --serving_log or an event source (--input, --bigquery_*), not both")
                if log:
                    requests, described = RequestsFromLog(log), {"serving_log": log}
                else:
                    requests = RequestsFromEvents(fs, read_source(options, fs))
                    described = describe_source(options, fs)
                if not options.view_as(TableCheckOptions).skip_table_check:
                    check_table(bt.bigtable_project, bt.bigtable_instance, bt.bigtable_table, cache_family(fs))
            except (*MODEL_ERRORS, BigtableSetupError) as exc:
                raise _fail(str(exc)) from None
            output_dir = options.view_as(OutputDirOptions).output_dir
            check_output_dir(output_dir, "--output_dir")
            return cls(
                model=model,
                requests=requests,
                described_source=described,
                bigtable=(bt.bigtable_project, bt.bigtable_instance, bt.bigtable_table),
                top_n=top_n,
                period=period,
                stamp_ms=version_timestamp_ms(version.metadata["created_at"]),
                output_dir=output_dir,
                retry_s=options.view_as(BigtableWriteOptions).write_retry_s,
            )


COUNTED = (
    "records_read", "records_rejected", "records_not_events", "serving_log_records_read",
    "requests_keyed", "requests_with_null_key_field", "keys_considered", "keys_selected",
    "key_hash_collisions", "examples_scored", "examples_rejected_by_model_inputs",
    "inference_failures", "prediction_cache_entries_written",
    "prediction_cache_entries_write_failed", "prediction_cache_markers_written",
)  # fmt: skip


def finish(config: PrecomputeConfig, counters: dict[str, int], elapsed_seconds: float) -> dict:
    """summary.json: the marker's figures, the counters and what was read."""
    path = os.path.join(config.output_dir, "marker.json")
    with FileSystems.open(path) as f:
        marker = json.loads(f.read())
    summary = {
        "feature_set": config.model.fs.name,
        "model_version": config.model.handler.version,
        "bigtable_table": "/".join(config.bigtable),
        "source": config.described_source,
        **marker,
        "counters": {name: counters.get(name, 0) for name in COUNTED},
        "elapsed_seconds": elapsed_seconds,
    }
    with FileSystems.create(os.path.join(config.output_dir, SUMMARY)) as f:
        f.write(json.dumps(summary, indent=2).encode("utf-8"))
    return summary


class _WriteJson(beam.DoFn):
    def __init__(self, path: str):
        self.path = path

    def process(self, value: dict) -> Iterator:
        with FileSystems.create(self.path) as f:
            f.write(json.dumps(value, indent=2).encode("utf-8"))
        yield value


def run(argv: Sequence[str] | None = None) -> dict | None:
    """`skewless precompute`: build and run the job; returns summary.json's content."""
    configure_logging(batch=True)
    options = parse_job_options(argv, JOB)
    config = PrecomputeConfig.from_options(options)
    if not FileSystems.exists(config.output_dir):
        FileSystems.mkdirs(config.output_dir)
    p = beam.Pipeline(options=options)
    marker = build_pipeline(
        p,
        config.model.fs,
        config.model,
        config.requests,
        config.bigtable,
        WriteDeadLetterFiles(os.path.join(config.output_dir, "dead_letters", "part")),
        top_n=config.top_n,
        stamp_ms=config.stamp_ms,
        period=config.period,
        retry_s=config.retry_s,
    )
    _ = marker | "WriteMarkerJson" >> beam.ParDo(_WriteJson(os.path.join(config.output_dir, "marker.json")))
    return run_and_summarise(
        p,
        options,
        functools.partial(finish, config),
        LOG,
        shown=lambda s: {k: s[k] for k in ("model_version", "requests", "requests_covered", "coverage")}
        | {"keys_written": s["counters"]["prediction_cache_entries_written"]},
    )


if __name__ == "__main__":
    launch(JOB, run)
