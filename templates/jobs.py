"""The Dataflow Flex Template of each job: its entry point, the option classes it parses, its
required flags and the flags that cannot be template parameters. templates/<name>/metadata.json
is checked against this table (tests/test_templates.py), and build.sh builds one template per entry.
"""

from __future__ import annotations

import argparse
import importlib
from dataclasses import dataclass, field
from pathlib import Path

TEMPLATES_DIR = Path(__file__).resolve().parent

# Flags that exist only to point the jobs at local emulators: Dataflow workers cannot reach them.
_EMULATOR_ONLY = {
    "bigquery_endpoint": "BigQuery emulator endpoint; Dataflow talks to BigQuery itself",
    "bigquery_storage_endpoint": "BigQuery emulator endpoint; Dataflow talks to BigQuery itself",
}
# A Flex Template passes every parameter as --name=value; a store_true flag rejects a value
# ("ignored explicit argument"), so it cannot be a parameter.
_FLAG_ONLY = "store_true flag: Flex Templates pass --name=value, which such a flag rejects"


@dataclass(frozen=True)
class TemplateJob:
    """One Flex Template: `python templates/<name>/main.py` runs `module.run(fixed_args + argv)`."""

    name: str
    module: str
    option_classes: tuple[str, ...]  # "module:Class", in the order the job parses them
    required: tuple[str, ...]
    streaming: bool
    fixed_args: tuple[str, ...] = ()
    not_parameters: dict[str, str] = field(default_factory=dict)

    @property
    def metadata_path(self) -> Path:
        return TEMPLATES_DIR / self.name / "metadata.json"

    @property
    def main_path(self) -> Path:
        return TEMPLATES_DIR / self.name / "main.py"


JOBS: dict[str, TemplateJob] = {
    job.name: job
    for job in (
        TemplateJob(
            name="prepare",
            module="beam_pipelines.prepare",
            option_classes=(
                "beam_pipelines.prepare:PrepareOptions",
                "beam_pipelines.options:OutputDirOptions",
                "beam_pipelines.options:SourceOptions",
                "beam_pipelines.options:FeatureSetOptions",
            ),
            required=("output_dir",),
            streaming=False,
            not_parameters={
                **_EMULATOR_ONLY,
                "allow_anomalies": _FLAG_ONLY,
                "allow_duplicate_example_keys": _FLAG_ONLY,
            },
        ),
        TemplateJob(
            name="aggregate",
            module="beam_pipelines.aggregate",
            option_classes=(
                "beam_pipelines.aggregate:AggregateOptions",
                "beam_pipelines.options:SubscriptionOptions",
                "beam_pipelines.options:LatenessOptions",
                "beam_pipelines.options:TableCheckOptions",
                "beam_pipelines.io.bigtable:BigtableOptions",
                "beam_pipelines.io.bigtable:BigtableWriteOptions",
                "beam_pipelines.io.pubsub:EventTimeOptions",
                "beam_pipelines.options:FeatureSetOptions",
            ),
            required=("subscription", "bigtable_project", "bigtable_instance", "bigtable_table"),
            streaming=True,
            not_parameters={"skip_table_check": _FLAG_ONLY},
        ),
        TemplateJob(
            name="score_batch",
            module="beam_pipelines.score",
            option_classes=(
                "beam_pipelines.score:ScoreOptions",
                "beam_pipelines.options:DeadLetterDirOptions",
                "beam_pipelines.options:ModelOptions",
                "beam_pipelines.options:SourceOptions",
                "beam_pipelines.options:FeatureSetOptions",
            ),
            required=("model_dir",),
            streaming=False,
            not_parameters=dict(_EMULATOR_ONLY),
        ),
        TemplateJob(
            name="publish_reference",
            module="beam_pipelines.publish_reference",
            option_classes=(
                "beam_pipelines.publish_reference:PublishReferenceOptions",
                "beam_pipelines.options:DeadLetterDirOptions",
                "beam_pipelines.options:SourceOptions",
                "beam_pipelines.io.bigtable:BigtableOptions",
                "beam_pipelines.io.bigtable:BigtableWriteOptions",
                "beam_pipelines.options:FeatureSetOptions",
            ),
            required=(
                "table",
                "bigtable_project",
                "bigtable_instance",
                "bigtable_table",
                "dead_letter_dir",
            ),
            streaming=False,
            not_parameters={
                **_EMULATOR_ONLY,
                "reference": "publish_reference reads one table: its file is the input parameter",
            },
        ),
        TemplateJob(
            name="validate",
            module="beam_pipelines.validate",
            option_classes=(
                "beam_pipelines.validate:ValidateOptions",
                "beam_pipelines.options:OutputDirOptions",
                "beam_pipelines.options:SourceOptions",
                "beam_pipelines.options:ServingLogOptions",
                "beam_pipelines.options:FeatureSetOptions",
            ),
            required=("baseline", "output_dir"),
            streaming=False,
            not_parameters={
                **_EMULATOR_ONLY,
                "reference": "validate reads no reference tables (their columns are in features/)",
                "serving_log_sample": "the scorer's sampling: validate reads every logged event",
                "serving_log_window_s": "the scorer's log files: validate reads every logged event",
            },
        ),
        TemplateJob(
            name="score_streaming",
            module="beam_pipelines.score_stream",
            option_classes=(
                "beam_pipelines.score_stream:ScoreStreamOptions",
                "beam_pipelines.options:ModelOptions",
                "beam_pipelines.options:SubscriptionOptions",
                "beam_pipelines.options:TableCheckOptions",
                "beam_pipelines.io.bigtable:BigtableOptions",
                "beam_pipelines.options:FeatureSetOptions",
                "beam_pipelines.options:ServingLogOptions",
                "beam_pipelines.io.pubsub:EventTimeOptions",
            ),
            required=(
                "model_dir",
                "subscription",
                "output_topic",
                "bigtable_project",
                "bigtable_instance",
                "bigtable_table",
            ),
            streaming=True,
            fixed_args=("--streaming",),
            not_parameters={"skip_table_check": _FLAG_ONLY},
        ),
    )
}


def option_classes(job: TemplateJob) -> list[type]:
    """The PipelineOptions subclasses the job parses (imported on demand: they pull in Beam)."""
    classes = []
    for spec in job.option_classes:
        module_name, _, attr = spec.partition(":")
        classes.append(getattr(importlib.import_module(module_name), attr))
    return classes


def job_flags(job: TemplateJob) -> dict[str, argparse.Action]:
    """Every flag of the job's own option classes, by name (dest), with its argparse action."""
    parser = argparse.ArgumentParser(add_help=False)
    for cls in option_classes(job):
        cls._add_argparse_args(parser)
    return {action.dest: action for action in parser._actions}


def run_job(job: TemplateJob, argv: list[str]):
    """What templates/<name>/main.py does: the job's run() with its fixed flags first."""
    module = importlib.import_module(job.module)
    return module.run([*job.fixed_args, *argv])
