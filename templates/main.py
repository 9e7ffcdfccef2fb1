"""The Flex Template entry point (FLEX_TEMPLATE_PYTHON_PY_FILE) of every skewless template.

The image is built once per template with SKEWLESS_TEMPLATE=<name> (templates/Dockerfile);
the launcher runs this file with the template's parameters as --name=value flags, and it runs
the job that declares the template, as `skewless <job>` would (one-line errors), with the
template's fixed flags first (score_streaming: --streaming).
"""

import os
import sys

from skewless.beam_pipelines.runtime.job import templates
from skewless.beam_pipelines.runtime.launch import run_command

TEMPLATE_ENV = "SKEWLESS_TEMPLATE"


def main(argv: list[str]) -> int:
    name = os.environ.get(TEMPLATE_ENV)
    found = templates()
    if name not in found:
        print(f"{TEMPLATE_ENV}={name!r}: not a skewless template ({', '.join(sorted(found))})", file=sys.stderr)
        return 2
    _, job = found[name]
    return run_command(job.name, [*job.template.fixed_args, *argv])


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
