"""Each Dataflow Flex Template's metadata.json, rendered from the job declarations.

A job with `template=Template(...)` in its `JOB = Job(...)` (skewless/beam_pipelines/runtime/
job.py) has a template named after it; its parameters are the job's options minus the
template's `not_parameters`, each with its --help text as helpText, optional unless the job
requires it, its argparse default and choices; the label, regexes, parameter type and group
of each flag name come from parameters.json (one entry per flag: a name means the same thing
in every template, with per-template overrides where a template needs its own).

    python templates/render.py            # write templates/<name>/metadata.json
    python templates/render.py --check    # exit 1 if a written file differs from the render
    python templates/render.py --list     # each template: its name and "streaming" or "batch"
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from skewless.beam_pipelines.runtime.job import Job, templates

TEMPLATES_DIR = Path(__file__).resolve().parent
CATALOG = TEMPLATES_DIR / "parameters.json"
KEY_ORDER = (
    "name", "label", "helpText", "isOptional", "regexes", "paramType", "enumOptions",
    "groupName", "parentName", "defaultValue",
)  # fmt: skip


def job_flags(job: Job) -> dict[str, argparse.Action]:
    """Every flag of the job's own option groups, by name (dest), in declaration order."""
    parser = argparse.ArgumentParser(add_help=False)
    for group in job.groups:
        group._add_argparse_args(parser)
    return {action.dest: action for action in parser._actions}


def parameter(name: str, template: str, action: argparse.Action, required: bool) -> dict:
    """One metadata parameter: the catalog's entry for the flag, the job's text and default."""
    catalog = json.loads(CATALOG.read_text())
    if name not in catalog:
        raise KeyError(f"templates/parameters.json has no entry for --{name} (template {template})")
    entry = dict(catalog[name])
    entry.update(entry.pop("by_template", {}).get(template, {}))
    entry["name"] = name
    entry["helpText"] = " ".join((action.help or "").split())
    if not required:
        entry["isOptional"] = True
    default = action.default
    if default is not None and not isinstance(default, (bool, list)):
        entry["defaultValue"] = str(default)
    return {k: entry[k] for k in KEY_ORDER if k in entry}


def render(name: str) -> dict:
    """The metadata of template `name`."""
    _, job = templates()[name]
    flags = job_flags(job)
    names = [n for n in job.required if n in flags]
    names += [n for n in flags if n not in names and n not in job.template.not_parameters]
    return {
        "name": f"skewless {name.replace('_', ' ')}",
        "description": job.description,
        "parameters": [parameter(n, name, flags[n], n in job.required) for n in names],
    }


def metadata_path(name: str) -> Path:
    return TEMPLATES_DIR / name / "metadata.json"


def text_of(name: str) -> str:
    return json.dumps(render(name), indent=2, ensure_ascii=False) + "\n"


def main(argv: list[str]) -> int:
    if argv[:1] == ["--list"]:
        for name, (_, job) in sorted(templates().items()):
            print(name, "streaming" if job.streaming else "batch")
        return 0
    stale = []
    for name in sorted(templates()):
        path = metadata_path(name)
        text = text_of(name)
        if argv[:1] == ["--check"]:
            if not path.is_file() or path.read_text() != text:
                stale.append(str(path))
        else:
            path.parent.mkdir(exist_ok=True)
            path.write_text(text)
    if stale:
        print("out of date (python templates/render.py rewrites them): " + ", ".join(stale), file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
