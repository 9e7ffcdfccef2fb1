"""Flex Template entry point (FLEX_TEMPLATE_PYTHON_PY_FILE) of the publish_reference job."""

from beam_pipelines.publish_reference import run

if __name__ == "__main__":
    run()
