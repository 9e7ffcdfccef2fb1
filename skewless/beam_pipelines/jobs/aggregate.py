"""The aggregate job (streaming): Pub/Sub events -> the shared windowed aggregates -> Bigtable cells."""

from __future__ import annotations

import logging
from collections.abc import Sequence

import apache_beam as beam
from apache_beam.options.pipeline_options import PipelineOptions, StandardOptions

from skewless.beam_pipelines.io.bigtable import (
    BigtableOptions,
    BigtableSetupError,
    BigtableWriteOptions,
    WriteCells,
    check_table,
)
from skewless.beam_pipelines.io.pubsub import (
    DEFAULT_TIMESTAMP_ATTRIBUTE,
    EventTimeOptions,
    ParseMessages,
    PublishDeadLetters,
    read_messages,
)
from skewless.beam_pipelines.runtime.job import FLAG_ONLY, Job, Template
from skewless.beam_pipelines.runtime.launch import launch
from skewless.beam_pipelines.runtime.local_runner import (
    LOCAL_STREAMING_RUNNER,
    LOCAL_STREAMING_RUNNERS,
    prepare_local_runner,
)
from skewless.beam_pipelines.runtime.options import (
    DEFAULT_ALLOWED_LATENESS_S,
    FeatureSetOptions,
    LatenessOptions,
    SubscriptionOptions,
    TableCheckOptions,
    feature_set_spec,
)
from skewless.beam_pipelines.runtime.parsing import parse_job_options
from skewless.beam_pipelines.runtime.process import configure_logging
from skewless.transforms.aggregations import ComputeAggregates
from skewless.transforms.featureset import FeatureSet, load_feature_set
from skewless.transforms.record_checks import CheckRecords

LOG = logging.getLogger("skewless.aggregate")
DESCRIPTION = (
    "Streaming job: read JSON events of the feature set's raw schema from a Pub/Sub "
    "subscription (event time in a message attribute), validate them, compute the shared "
    "windowed aggregates (a cell per entity and window end W when the watermark passes W, "
    "updated for events within the allowed lateness) and write them to Bigtable as the cells "
    "of the feature contract. Bad messages go to "
    "the dead-letter topic with their stage and reason."
)


class AggregateOptions(PipelineOptions):
    """The aggregate job's own flags. Shared ones live with their owner (Beam parses every
    options class of the process with one parser): --bigtable_* and --write_retry_s in
    io/bigtable.py, --timestamp_attribute in io/pubsub.py; --subscription, --dead_letter_topic,
    --allowed_lateness_s, --skip_table_check and --feature_set in options.py."""

    @classmethod
    def _add_argparse_args(cls, parser):
        parser.add_argument(
            "--source_timestamps",
            choices=("auto", "on", "off"),
            default="auto",
            help="on: the Pub/Sub source reads the timestamp attribute (Dataflow's watermark "
            "follows event time; a garbled attribute fails in the source). off: the job parses "
            "it and dead-letters garbled ones (on Dataflow the watermark then follows publish "
            "time; the local runner's follows the attribute either way). auto: on for "
            "DataflowRunner, off otherwise.",
        )


GROUPS = (
    AggregateOptions,
    SubscriptionOptions,
    LatenessOptions,
    TableCheckOptions,
    BigtableOptions,
    BigtableWriteOptions,
    EventTimeOptions,
    FeatureSetOptions,
)


JOB = Job(
    name="aggregate",
    summary="streaming: Pub/Sub events -> windowed aggregates in Bigtable",
    description=DESCRIPTION,
    groups=GROUPS,
    required=("subscription", "bigtable_project", "bigtable_instance", "bigtable_table"),
    streaming=True,
    template=Template("aggregate", not_parameters={"skip_table_check": FLAG_ONLY}),
)


def build_pipeline(
    p: beam.Pipeline,
    fs: FeatureSet,
    source: beam.PTransform,
    sink: beam.PTransform,
    dead_letters: beam.PTransform,
    *,
    timestamp_attribute: str = DEFAULT_TIMESTAMP_ATTRIBUTE,
    allowed_lateness_s: int = DEFAULT_ALLOWED_LATENESS_S,
) -> None:
    """Wire the aggregate job. `source` yields PubsubMessages; `sink` takes Cells."""
    messages = p | "Read" >> source
    payloads, bad_timestamps = messages | "EventTime" >> ParseMessages(timestamp_attribute, fs)
    events, invalid = payloads | "Validate" >> CheckRecords(fs)
    cells = events | "Aggregate" >> ComputeAggregates(
        fs, streaming=True, allowed_lateness_s=allowed_lateness_s
    )
    unwritten = cells | "WriteCells" >> sink
    letters = [bad_timestamps, invalid]
    if isinstance(unwritten, beam.PCollection):  # WriteCells: cells that could not be written
        letters.append(unwritten)
    _ = letters | "AllDeadLetters" >> beam.Flatten() | "DeadLetters" >> dead_letters


def source_timestamps(opts: AggregateOptions, runner: str | None) -> bool:
    if opts.source_timestamps == "auto":
        return runner == "DataflowRunner"
    return opts.source_timestamps == "on"


def make_pipeline(argv: Sequence[str] | None) -> tuple[beam.Pipeline, SubscriptionOptions]:
    """Parse options, check the table, and build (not run) the job."""
    options = parse_job_options(argv, JOB, default_runner=LOCAL_STREAMING_RUNNER)
    # Streaming is set in code: Flex Template metadata cannot carry it (docs/dataflow.md).
    std = options.view_as(StandardOptions)
    std.streaming = True
    opts = options.view_as(AggregateOptions)
    pubsub = options.view_as(SubscriptionOptions)
    lateness_s = options.view_as(LatenessOptions).allowed_lateness_s
    bt = options.view_as(BigtableOptions)
    timestamp_attribute = options.view_as(EventTimeOptions).timestamp_attribute
    if lateness_s < 0:
        raise SystemExit("skewless aggregate: --allowed_lateness_s must be >= 0")
    write_retry_s = options.view_as(BigtableWriteOptions).write_retry_s
    if write_retry_s < 0:
        raise SystemExit("skewless aggregate: --write_retry_s must be >= 0")
    fs = load_feature_set(feature_set_spec(options))
    if not options.view_as(TableCheckOptions).skip_table_check:
        try:
            check_table(bt.bigtable_project, bt.bigtable_instance, bt.bigtable_table, fs.name)
        except BigtableSetupError as exc:
            raise SystemExit(f"skewless aggregate: {exc}") from None
    if std.runner in LOCAL_STREAMING_RUNNERS:
        # Bigger pulls, and a watermark that follows the event-time attribute as on Dataflow.
        prepare_local_runner(event_time_attribute=timestamp_attribute)
    p = beam.Pipeline(options=options)
    build_pipeline(
        p,
        fs,
        read_messages(pubsub.subscription, timestamp_attribute, source_timestamps(opts, std.runner)),
        WriteCells(
            bt.bigtable_project,
            bt.bigtable_instance,
            bt.bigtable_table,
            fs.name,
            retry_s=write_retry_s,
        ),
        PublishDeadLetters(pubsub.dead_letter_topic),
        timestamp_attribute=timestamp_attribute,
        allowed_lateness_s=lateness_s,
    )
    return p, pubsub


def run(argv: Sequence[str] | None = None):
    """Parse options, build and start the job; blocks until it ends (the local runner: Ctrl-C)."""
    configure_logging()
    p, pubsub = make_pipeline(argv)
    if pubsub.dead_letter_topic is None:
        LOG.warning("no --dead_letter_topic: bad messages are only counted and logged")
    result = p.run()
    LOG.info("aggregate job started, reading %s", pubsub.subscription)
    result.wait_until_finish()
    return result


if __name__ == "__main__":
    launch(JOB, run)
