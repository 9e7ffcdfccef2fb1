"""Flex Template entry point (FLEX_TEMPLATE_PYTHON_PY_FILE) of the streaming score job.

`--streaming` is added here, not in metadata.json: gcloud drops `streaming` from template
metadata, and the job sets Beam's streaming option in code anyway.
"""

import sys

from beam_pipelines.score_stream import run

if __name__ == "__main__":
    run(["--streaming", *sys.argv[1:]])
