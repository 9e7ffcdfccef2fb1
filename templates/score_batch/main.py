"""Flex Template entry point (FLEX_TEMPLATE_PYTHON_PY_FILE) of the score_batch job."""

from beam_pipelines.score import run

if __name__ == "__main__":
    run()
