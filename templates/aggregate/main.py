"""Flex Template entry point (FLEX_TEMPLATE_PYTHON_PY_FILE) of the aggregate job."""

from beam_pipelines.aggregate import run

if __name__ == "__main__":
    run()
