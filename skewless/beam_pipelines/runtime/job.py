"""A `skewless` command, declared once: `JOB = Job(...)` at the top of its own module.

The declaration is the one place that says what a command is: its name, the one-line summary
`skewless --help` lists, its --help description, its option groups and required flags, whether
it is a Beam pipeline and a streaming one, the flag that selects it as a mode of another
command (`score --streaming`), and its Flex Template. The CLI, the template metadata and the
layer test read it; adding a command is adding one module to `jobs/` (Beam pipelines) or
`commands/` (the others).

The CLI lists the commands without importing them (importing a job loads Beam, often
TensorFlow): `declared()` reads each module's `JOB = Job(...)` statement with `ast`, so its
name, summary, mode and in-process module must be plain literals (a test holds the static
reading equal to the imported declarations).
"""

from __future__ import annotations

import ast
import functools
import importlib
import importlib.util
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

PACKAGES = ("skewless.beam_pipelines.jobs", "skewless.beam_pipelines.commands")
# Why an option is not a template parameter (Template.not_parameters), for the common cases.
EMULATOR_ONLY = {
    "bigquery_endpoint": "BigQuery emulator endpoint; Dataflow talks to BigQuery itself",
    "bigquery_storage_endpoint": "BigQuery emulator endpoint; Dataflow talks to BigQuery itself",
}
# A Flex Template passes every parameter as --name=value; a store_true flag rejects a value
# ("ignored explicit argument"), so it cannot be a parameter.
FLAG_ONLY = "store_true flag: Flex Templates pass --name=value, which such a flag rejects"


@dataclass(frozen=True)
class Template:
    """A job's Dataflow Flex Template: its name (templates/<name>/metadata.json), the flags
    the launcher always passes, and the job's options that are not template parameters, each
    with the reason."""

    name: str
    fixed_args: tuple[str, ...] = ()
    not_parameters: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class Job:
    """One command. `groups`: its PipelineOptions classes in parse order (empty for a command
    that parses plain argparse flags itself); `required`: flags (dest names) that must be set;
    `mode`: a flag that selects this module when given to the command `name` (the job's
    default module has none); `in_process`: a module whose `runs_here(args)` may take the run
    over in the CLI's own process, without loading this one (validate of local files)."""

    name: str
    summary: str
    description: str = ""
    groups: tuple[type, ...] = ()
    required: tuple[str, ...] = ()
    beam: bool = True
    streaming: bool = False
    mode: str | None = None
    in_process: str | None = None
    template: Template | None = None
    # Libraries the command imports only when it runs (so its --help stays fast) whose native
    # start-up lines the CLI absorbs before the run (TensorFlow's).
    native_libraries: tuple[str, ...] = ()

    @property
    def prog(self) -> str:
        return f"skewless {self.name}" + (f" {self.mode}" if self.mode else "")


class Entry(NamedTuple):
    """What the CLI knows of a command without importing it."""

    name: str
    summary: str
    module: str
    mode: str | None
    in_process: str | None


_STATIC = ("name", "summary", "mode", "in_process")


def _package_dir(package: str) -> Path:
    spec = importlib.util.find_spec(package)
    return Path(next(iter(spec.submodule_search_locations)))


def _static_declaration(path: Path) -> dict[str, Any] | None:
    """The literal keywords (name, summary, mode, in_process) of `JOB = Job(...)` in a file."""
    for node in ast.parse(path.read_text(), filename=str(path)).body:
        if (
            isinstance(node, ast.Assign)
            and [getattr(t, "id", None) for t in node.targets] == ["JOB"]
            and isinstance(node.value, ast.Call)
            and getattr(node.value.func, "id", None) == "Job"
        ):
            found = {}
            for keyword in node.value.keywords:
                if keyword.arg in _STATIC:
                    try:
                        found[keyword.arg] = ast.literal_eval(keyword.value)
                    except ValueError:
                        raise ValueError(
                            f"{path}: JOB's {keyword.arg} must be a literal (the CLI reads it "
                            "without importing the module)"
                        ) from None
            return found
    return None


@functools.cache
def declared() -> tuple[Entry, ...]:
    """Every command, from the `JOB = Job(...)` of each module in jobs/ and commands/."""
    entries = []
    for package in PACKAGES:
        for path in sorted(_package_dir(package).glob("*.py")):
            if path.name.startswith("_"):
                continue
            found = _static_declaration(path)
            if found is not None:
                entries.append(
                    Entry(
                        found["name"],
                        found.get("summary", ""),
                        f"{package}.{path.stem}",
                        found.get("mode"),
                        found.get("in_process"),
                    )
                )
    return tuple(entries)


def commands() -> dict[str, Entry]:
    """{command name: its default entry (no mode)}, in declaration order."""
    return {e.name: e for e in declared() if e.mode is None}


def job_modules() -> set[str]:
    """Every module the CLI may run as a command."""
    return {e.module for e in declared()}


def module_for(name: str, args: list[str]) -> str:
    """The module that runs `skewless <name> <args>`: a mode's when its flag is given."""
    for entry in declared():
        if entry.name == name and entry.mode is not None and entry.mode in args:
            return entry.module
    return commands()[name].module


def load(module: str) -> Job:
    """The declaration of a command module (imports it)."""
    return importlib.import_module(module).JOB


def templates() -> dict[str, tuple[str, Job]]:
    """{template name: (module, declaration)} of every job that has a Flex Template."""
    out = {}
    for entry in declared():
        job = load(entry.module)
        if job.template is not None:
            out[job.template.name] = (entry.module, job)
    return out
