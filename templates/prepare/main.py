"""Flex Template entry point (FLEX_TEMPLATE_PYTHON_PY_FILE) of the prepare job."""

from beam_pipelines.prepare import run

if __name__ == "__main__":
    run()
