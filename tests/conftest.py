from tests.fixtures_bigquery import bq_emulator  # noqa: F401
from tests.fixtures_emulators import bigtable_emulator, pubsub_emulator  # noqa: F401
