"""flights_schedule: the declaration, its derive on real flights, and prepare -> train -> batch
score on two real days, its transform graph reading only the five cache-key fields."""

import datetime as dt
import json
from zoneinfo import ZoneInfo

import pyarrow.parquet as pq
import pytest

from skewless import load_feature_set
from skewless.examples.flights_schedule import (
    CACHE_KEY_FIELDS,
    DISTANCE_BAND_EDGES_MI,
    FLIGHTS_SCHEDULE,
    distance_band,
)
from skewless.models.dependencies import transform_dependencies
from skewless.transforms.record_checks import InvalidRecord, RecordChecker
from tests.support.flights_data import real_flights, write_csv

NEW_YORK = ZoneInfo("America/New_York")
# Oct 31 (train) and Nov 1 (eval, from the feature set's eval_start): 42 cancelled flights
# (no dep_delay) and 14 diverted ones (no arr_delay) among them.
DAYS = {"month": 10, "day": 31, "days": 2}


def derived(raw: dict) -> dict:
    checker = RecordChecker(FLIGHTS_SCHEDULE)
    return checker.derive(checker.typed(dict(raw)))


def test_declaration_keys_are_example_fields_and_no_aggregates():
    assert load_feature_set("flights_schedule") is FLIGHTS_SCHEDULE
    examples = {f.name: f for f in FLIGHTS_SCHEDULE.example_fields}
    assert set(CACHE_KEY_FIELDS) <= set(examples)
    assert set(FLIGHTS_SCHEDULE.example_key) <= set(examples)
    assert FLIGHTS_SCHEDULE.example_key == ("carrier", "flight", "origin", "scheduled_departure")
    assert not any(examples[n].nullable for n in CACHE_KEY_FIELDS)
    # Nothing that is only known after booking reaches an example.
    assert not {"dep_delay", "dep_time", "arr_delay", "month", "day"} & set(examples)
    assert FLIGHTS_SCHEDULE.aggregates == () and FLIGHTS_SCHEDULE.baseline is None


def test_a_cancelled_flight_is_a_request_without_label_at_its_scheduled_time():
    flights = real_flights(**DAYS)
    cancelled = next(r for r in flights if r["dep_delay"] is None)
    event = derived(cancelled)
    scheduled = dt.datetime.fromisoformat(cancelled["time_hour"].replace("Z", "+00:00"))
    scheduled += dt.timedelta(minutes=cancelled["minute"])
    assert event is not None and event["label"] is None
    assert event["event_time"] == event["scheduled_departure"] == scheduled.timestamp() * 1000

    late = next(r for r in flights if r["dep_delay"] and r["dep_delay"] > 60)
    event = derived(late)
    assert event["label"] == 1
    # The request is made at booking: the actual departure (dep_delay later) is not its time.
    assert event["event_time"] == event["scheduled_departure"]
    diverted = next(r for r in flights if r["dep_delay"] is not None and r["arr_delay"] is None)
    assert derived(diverted)["label"] is None


def test_day_of_week_is_that_of_the_local_scheduled_date():
    """Against the New York weekday of the scheduled instant (time_hour is UTC): evening flights
    are on the next UTC day, so a UTC weekday would fail here."""
    flights = real_flights(1, 1, days=2) + real_flights(12, 31)
    evening = [r for r in flights if r["hour"] >= 20]
    assert len(evening) > 50
    for raw in [*evening, *flights[:: len(flights) // 40]]:
        instant = dt.datetime.fromisoformat(raw["time_hour"].replace("Z", "+00:00"))
        local = (instant + dt.timedelta(minutes=raw["minute"])).astimezone(NEW_YORK)
        assert derived(raw)["day_of_week"] == local.weekday(), raw
    assert derived(flights[0])["day_of_week"] == 1  # 2013-01-01, a Tuesday


def test_distance_band_edges():
    miles = (17, 249.9, 250, 499, 500, 999, 1000, 1999, 2000, 2999.9, 3000, 4983)
    assert [distance_band(d) for d in miles] == [0, 0, 1, 1, 2, 3, 4, 6, 7, 7, 8, 8]
    assert [distance_band(e) for e in DISTANCE_BAND_EDGES_MI] == list(range(1, 9))
    raw = dict(real_flights(**DAYS)[0], distance=2475.0)
    assert derived(raw)["distance_band"] == 7


def test_an_impossible_local_date_is_a_one_line_error():
    raw = dict(real_flights(**DAYS)[0], month=2, day=30)
    with pytest.raises((ValueError, InvalidRecord), match="no such local date 2013-2-30"):
        derived(raw)


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """prepare (default split: Nov 1), train (1 epoch) and batch score (Nov 1 on) two days."""
    from skewless.beam_pipelines.commands import train
    from skewless.beam_pipelines.jobs import prepare, score

    root = tmp_path_factory.mktemp("schedule")
    rows = real_flights(**DAYS)
    csv_path = write_csv(root / "flights.csv", rows)
    prepared, models, scores = root / "prepared", root / "models", root / "scores"
    common = ["--feature_set", "flights_schedule", "--input", str(csv_path)]
    summary = prepare.run([*common, "--output_dir", str(prepared)])
    trained = train.run(
        ["--prepared_dir", str(prepared), "--model_dir", str(models), "--epochs", "1"]
    )
    scored = score.run(
        [*common, "--model_dir", str(models), "--start", "2013-11-01T00:00:00Z",
         "--output", str(scores)]
    )  # fmt: skip
    return {"rows": rows, "prepared": prepared, "summary": summary, "trained": trained,
            "scored": scored, "scores": scores, "model_dir": models}  # fmt: skip


def test_prepare_keeps_cancelled_flights_as_unlabelled_events(run):
    rows, summary = run["rows"], run["summary"]
    unlabelled = sum(1 for r in rows if r["arr_delay"] is None)
    assert unlabelled >= 50
    assert summary["records_valid"] == len(rows)
    assert summary["records_not_events"] == 0 and summary["aggregate_blocks"] == 0
    assert summary["events_unlabeled"] == unlabelled
    assert summary["examples"] == len(rows) - unlabelled
    assert summary["examples_train"] > 500 and summary["examples_eval"] > 500


def test_the_transform_graph_reads_only_the_cache_key(run):
    read = {k: set(v) for k, v in transform_dependencies(str(run["prepared"] / "transform")).items()}
    assert read.pop("label") == {"label"}
    assert read and all(names and names <= set(CACHE_KEY_FIELDS) for names in read.values()), read
    # ...and the model uses all five (a key field nothing reads would split the cache for nothing).
    assert set().union(*read.values()) == set(CACHE_KEY_FIELDS)
    # The model records it (precompute checks it) and ignores the example's other fields.
    metadata = json.loads((run["model_dir"] / "1" / "model.json").read_text())
    assert set(metadata["reads_inputs"]) == set(CACHE_KEY_FIELDS)
    assert {"flight", "scheduled_departure", "event_time", "day_of_week"} <= {
        i["name"] for i in metadata["serving_inputs"]
    }


def test_train_and_batch_score_every_request_one_probability_per_key(run):
    rows, scored, trained = run["rows"], run["scored"], run["trained"]
    assert trained["baselines"]["majority"]["auc"] == 0.5 and "rule" not in trained["baselines"]
    requests = {}
    for raw in rows:
        event = derived(raw)
        if event["event_time"] >= 1383264000000:  # 2013-11-01T00:00:00Z
            example_key = (raw["carrier"], raw["flight"], raw["origin"], event["event_time"])
            requests[example_key] = tuple(event[k] for k in CACHE_KEY_FIELDS)
    # Cancelled and diverted flights are scored too: every scheduled request of the period.
    assert scored["examples_scored"] == len(requests) and scored["records_rejected"] == 0
    predictions = pq.read_table(run["scores"] / "predictions").to_pylist()
    assert len(predictions) == len(requests)
    by_key: dict[tuple, list[float]] = {}
    for p in predictions:
        departure = int(p["scheduled_departure"].timestamp() * 1000)
        key = requests[(p["carrier"], p["flight"], p["origin"], departure)]
        by_key.setdefault(key, []).append(p["probability"])
    repeated = [v for v in by_key.values() if len(v) > 1]
    assert len(repeated) > 20
    # One prediction per cache key, exactly (predictions do not depend on their batch).
    assert all(len(set(v)) == 1 for v in repeated)
