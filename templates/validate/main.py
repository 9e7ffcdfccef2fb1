"""Flex Template entry point (FLEX_TEMPLATE_PYTHON_PY_FILE) of the validate job."""

from beam_pipelines.validate import run

if __name__ == "__main__":
    run()
