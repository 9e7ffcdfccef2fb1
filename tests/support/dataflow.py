"""The Dataflow Flex Templates as the tests drive them: each declared job with its template, the
launcher's run, the dry-run flags of the DataflowRunner, template parameters as argv, and the
step names of a job graph."""

from __future__ import annotations

import importlib
import json
from dataclasses import dataclass
from pathlib import Path

from skewless.beam_pipelines.runtime import job as declarations
from templates.render import metadata_path


@dataclass(frozen=True)
class TemplateUnderTest:
    """A template as these tests see it: its name and the declaration of the job that has it."""

    name: str
    module: str
    job: declarations.Job

    @property
    def metadata_path(self) -> Path:
        return metadata_path(self.name)

    @property
    def required(self) -> tuple[str, ...]:
        return self.job.required

    @property
    def not_parameters(self) -> dict[str, str]:
        return self.job.template.not_parameters

    @property
    def fixed_args(self) -> tuple[str, ...]:
        return self.job.template.fixed_args

    @property
    def streaming(self) -> bool:
        return self.job.streaming


JOBS = {name: TemplateUnderTest(name, *found) for name, found in declarations.templates().items()}
def run_job(template: TemplateUnderTest, argv: list[str]):
    """What templates/main.py runs: the job's run() with the template's fixed flags first."""
    return importlib.import_module(template.module).run([*template.fixed_args, *argv])
DATAFLOW = [
    "--runner=DataflowRunner", "--project=fake-project", "--region=us-central1",
    "--temp_location=gs://fake-bucket/tmp", "--dry_run=True",
]  # fmt: skip

def metadata(job) -> dict:
    return json.loads(job.metadata_path.read_text())


def parameters(job) -> dict[str, dict]:
    return {p["name"]: p for p in metadata(job)["parameters"]}


def step_names(job) -> set[str]:
    return {t.unique_name for t in job.proto_pipeline.components.transforms.values()}


def template_argv(name: str, values: dict[str, str]) -> list[str]:
    """The job's argv as the launcher would pass it: --name=value for each template parameter."""
    params = parameters(JOBS[name])
    assert set(values) <= set(params)
    return [f"--{k}={v}" for k, v in values.items()]


BIGTABLE = {"bigtable_project": "fake-project", "bigtable_instance": "skewless-features", "bigtable_table": "features"}
# Dataflow's in-place update (--update) maps running steps to new ones by name: these must stay.
AGGREGATE_STEPS = {"Read", "EventTime", "Validate", "Aggregate", "WriteCells", "AllDeadLetters", "DeadLetters"}
# (issue 20 renamed the scorer's "Payloads" to "EventTime", the aggregate job's step that reads the
# timestamp attribute: updating a scorer that predates it needs --transform_name_mapping.)
SCORE_STREAM_STEPS = {"Read", "EventTime", "Validate", "LookupAggregates", "Score", "Write", "AllDeadLetters", "DeadLetters"}

