"""Feature sets that declare a prediction cache over the bundled flights, for the cache's tests.

FLIGHTS_KEYED keeps the name `flights`, so a model trained on the bundled FLIGHTS can be given
it with --feature_set (its model reads dep_delay, distance, the aggregates, ...: precompute
must refuse it). FLIGHTS_ONE_HEX_KEYED hashes keys to one hexadecimal character: 16 rows for
every key, so collisions are certain.
"""

from dataclasses import replace

from skewless import PredictionCache
from skewless.examples.flights import FLIGHTS
from skewless.examples.flights_schedule import FLIGHTS_SCHEDULE

FLIGHTS_KEYED = replace(FLIGHTS, prediction_cache=PredictionCache(key=("carrier", "origin", "dest")))
FLIGHTS_ONE_HEX_KEYED = replace(
    FLIGHTS, prediction_cache=PredictionCache(key=("carrier", "origin", "dest"), hash_chars=1)
)

# The bundled schedule feature set (same name, so its model takes it) with one-character hashes.
SCHEDULE_ONE_HEX = replace(
    FLIGHTS_SCHEDULE,
    prediction_cache=PredictionCache(key=FLIGHTS_SCHEDULE.prediction_cache.key, hash_chars=1),
)
