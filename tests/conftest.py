from tests.fixtures_bigquery import bq_emulator  # noqa: F401
