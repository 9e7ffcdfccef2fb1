"""Record validation: every kind of bad record becomes a dead letter with its reason."""

import json

import apache_beam as beam
import pytest
from apache_beam.testing.test_pipeline import TestPipeline
from apache_beam.testing.util import assert_that, equal_to

from skewless.examples.flights import FLIGHTS
from skewless.transforms.record_checks import (
    CheckRecords,
    InvalidRecord,
    RecordChecker,
    to_epoch_ms,
)
from tests.support.flights_data import real_flights

GOOD = {
    "year": 2013, "month": 1, "day": 1, "dep_time": 517, "sched_dep_time": 515, "dep_delay": 2.0,
    "arr_time": 830, "sched_arr_time": 819, "arr_delay": 11.0, "carrier": "UA", "flight": 1545,
    "tailnum": "N14228", "origin": "EWR", "dest": "IAH", "air_time": 227.0, "distance": 1400,
    "hour": 5, "minute": 15, "time_hour": "2013-01-01T10:00:00Z",
}  # fmt: skip


def with_(**changes):
    row = dict(GOOD)
    for k, v in changes.items():
        if v is KeyError:
            row.pop(k)
        else:
            row[k] = v
    return row


BAD = [
    (with_(carrier=KeyError), "validate", "missing required field 'carrier'"),
    (with_(origin=None), "validate", "required field 'origin' is null"),
    (with_(distance="far"), "validate", "field 'distance' 'far' is not a number"),
    (with_(flight=15.5), "validate", "field 'flight' 15.5 is not an integer"),
    (with_(carrier=42), "validate", "field 'carrier' has type int, expected a string"),
    (with_(time_hour="yesterday"), "validate", "field 'time_hour' 'yesterday' is not an ISO-8601"),
    (with_(time_hour=KeyError), "validate", "missing required field 'time_hour'"),
    (with_(month=13), "validate", "field 'month' = 13 is above the maximum 12"),
    (with_(dep_delay=-5000.0), "validate", "field 'dep_delay' = -5000.0 is below the minimum"),
    (with_(dep_delay=float("inf")), "validate", "is not a finite number"),
    (with_(seat="12A"), "validate", "unexpected fields ['seat']"),
    (with_(hour=True), "validate", "field 'hour' is a boolean"),
    ([1, 2, 3], "validate", "record is a list, expected a JSON object"),
]


@pytest.mark.parametrize("raw, stage, reason", BAD)
def test_bad_records_are_rejected_with_a_clear_reason(raw, stage, reason):
    with pytest.raises(InvalidRecord, match=reason.replace("[", r"\[").replace("]", r"\]")):
        RecordChecker(FLIGHTS).validate(raw)


def test_good_record_is_typed_and_derived():
    event = RecordChecker(FLIGHTS).validate(GOOD)
    assert event["time_hour"] == to_epoch_ms("2013-01-01T10:00:00+00:00")
    assert event["scheduled_departure"] == event["time_hour"] + 15 * 60_000
    assert event["event_time"] == event["scheduled_departure"] + 2 * 60_000
    assert event["label"] == 0
    assert event["distance"] == 1400.0 and isinstance(event["distance"], float)


def test_csv_text_values_are_coerced_and_empty_means_null():
    raw = {k: ("" if v is None else str(v)) for k, v in GOOD.items()}
    raw["tailnum"] = None
    raw["air_time"] = ""
    event = RecordChecker(FLIGHTS).validate(raw)
    assert event["flight"] == 1545 and event["dep_delay"] == 2.0
    assert event["air_time"] is None and event["tailnum"] is None


def test_cancelled_flight_is_valid_but_not_an_event_and_unknown_arrival_has_no_label():
    validator = RecordChecker(FLIGHTS)
    assert validator.validate(with_(dep_delay=None, dep_time=None, arr_delay=None)) is None
    diverted = validator.validate(with_(arr_delay=None))
    assert diverted is not None and diverted["label"] is None


def test_timestamps_accept_offsets_naive_utc_and_epoch_seconds():
    utc = to_epoch_ms("2013-01-01T10:00:00Z")
    assert to_epoch_ms("2013-01-01T05:00:00-05:00") == utc
    assert to_epoch_ms("2013-01-01T10:00:00") == utc  # naive = UTC, documented
    assert to_epoch_ms(utc / 1000) == utc


def test_unexpected_fields_policy_ignore_drops_them():
    from tests.support.toy_featureset import CLICKS

    raw = {"ts": "2024-01-01T00:00:00Z", "user": "u", "site": "s", "price": 1, "extra": 1}
    assert "extra" not in RecordChecker(CLICKS).validate(raw)


def test_validate_records_routes_every_bad_record_to_dead_letters_with_stage_and_reason():
    good = real_flights(1, 1)[:50]
    bad = [raw for raw, _, _ in BAD]
    not_json = "{this is not json"
    elements = [*good, *bad, not_json, json.dumps(GOOD).encode()]
    expected_events = sum(1 for r in good if r["dep_delay"] is not None) + 1
    with TestPipeline() as p:
        events, dead = p | beam.Create(elements) | CheckRecords(FLIGHTS)
        assert_that(
            events | "CountEvents" >> beam.combiners.Count.Globally(),
            equal_to([expected_events]),
            label="events",
        )
        expected_dead = [(stage, reason) for _, stage, reason in BAD] + [("parse", "not JSON")]
        assert_that(
            dead | beam.Map(lambda d: (d["stage"], d["reason"])),
            lambda got: _match_reasons(got, expected_dead),
            label="dead",
        )
        assert_that(
            dead | "Records" >> beam.Map(lambda d: d["record"]),
            lambda got: _contains(got, not_json),
            label="original kept",
        )


def _match_reasons(got, expected):
    got = sorted(got)
    assert len(got) == len(expected), got
    for stage, reason in expected:
        assert any(g[0] == stage and reason in g[1] for g in got), (stage, reason, got)


def _contains(got, item):
    assert item in got, got
