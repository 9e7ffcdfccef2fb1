"""The feature-set declaration checks and the as-of rule."""

import dataclasses

import pytest

from skewless.examples.flights import FLIGHTS
from skewless.transforms.featureset import (
    FeatureSetError,
    Field,
    WindowedAggregate,
    as_of_window_end,
    load_feature_set,
)

P = 300_000  # 5 min in ms
S = 3_600_000  # 60 min in ms


def test_event_exactly_on_a_window_end_sees_the_window_that_ends_there():
    t = 1_357_034_400_000  # 2013-01-01T10:00:00Z, a multiple of 5 min
    assert t % P == 0
    w = as_of_window_end(t, P)
    assert w == t
    # ... and that window [W - S, W) excludes t itself: the event is not its own feature.
    assert t not in range(w - S, w)


def test_event_inside_a_period_sees_the_last_window_end_before_it():
    t = 1_357_034_400_000 + 299_999
    assert as_of_window_end(t, P) == 1_357_034_400_000
    assert as_of_window_end(t + 1, P) == 1_357_034_400_000 + P


def test_serving_delay_moves_the_window_back():
    t = 1_357_034_400_000 + 60_000  # 10:01
    assert as_of_window_end(t, P, delay_ms=0) == 1_357_034_400_000  # 10:00
    assert as_of_window_end(t, P, delay_ms=120_000) == 1_357_034_400_000 - P  # 09:55
    assert as_of_window_end(t, P, delay_ms=60_000) == 1_357_034_400_000  # exactly at 10:00


def test_first_window_of_the_data_is_empty_for_the_first_event():
    first_event = 1_357_034_400_000 + 42_000
    w = as_of_window_end(first_event, P)
    assert w <= first_event
    # The window it sees, [W - S, W), ends at or before it: it does not hold the event.
    assert not w - S <= first_event < w


def test_window_size_must_be_a_multiple_of_the_period():
    with pytest.raises(FeatureSetError, match="not a multiple of the period"):
        WindowedAggregate("x", "origin", "count", 3500, 300)


def test_count_takes_no_value_and_others_need_one():
    with pytest.raises(FeatureSetError, match="count"):
        WindowedAggregate("x", "origin", "count", 600, 300, value="dep_delay")
    with pytest.raises(FeatureSetError, match="needs a value field"):
        WindowedAggregate("x", "origin", "mean", 600, 300)
    with pytest.raises(FeatureSetError, match="combiner"):
        WindowedAggregate("x", "origin", "median", 600, 300, "dep_delay")


@pytest.mark.parametrize(
    "change, message",
    [
        ({"event_time": "nope"}, "event_time"),
        ({"label": "nope"}, "label"),
        ({"keys": ("origin", "nope")}, "entity key 'nope'"),
        (
            {"aggregates": (WindowedAggregate("a", "dest", "count", 600, 300),)},
            "not an entity key",
        ),
        (
            {"aggregates": (WindowedAggregate("a", "origin", "mean", 600, 300, "nope"),)},
            "unknown value field",
        ),
        (
            {"aggregates": (WindowedAggregate("a", "origin", "mean", 600, 300, "carrier"),)},
            "mean needs a field of type int or float or bool",
        ),
        (
            {
                "aggregates": (
                    WindowedAggregate("a", "origin", "count", 600, 300),
                    WindowedAggregate("a", "origin", "count", 900, 300),
                )
            },
            "duplicate aggregate",
        ),
        (
            {
                "aggregates": (
                    WindowedAggregate("a", "origin", "count", 600, 300),
                    WindowedAggregate("b", "origin", "count", 600, 600),
                )
            },
            "one period",
        ),
        ({"schema": FLIGHTS.schema + (Field("year", "int"),)}, "duplicate schema field"),
        ({"unexpected_fields": "maybe"}, "unexpected_fields"),
        ({"example_fields": (Field("nope", "int"),)}, "example field 'nope'"),
    ],
)
def test_inconsistent_declarations_fail_when_built(change, message):
    with pytest.raises(FeatureSetError, match=message):
        dataclasses.replace(FLIGHTS, **change)


def test_example_fields_must_carry_the_event_time():
    """The split, the as-of join and scoring read the event time off the examples."""
    without = tuple(f for f in FLIGHTS.example_fields if f.name != FLIGHTS.event_time)
    with pytest.raises(FeatureSetError, match="event_time 'event_time' must be one of the example"):
        dataclasses.replace(FLIGHTS, example_fields=without)


@pytest.mark.parametrize("written, seconds", [("1h", 3600), ("15m", 900), (90, 90), (0, 0)])
def test_serving_delay_takes_a_duration(written, seconds):
    fs = dataclasses.replace(FLIGHTS, serving_delay_s=written)
    assert fs.serving_delay_s == seconds
    assert fs.serving_delay_ms == seconds * 1000


@pytest.mark.parametrize("written", ["1 hour", "-1h", "h", 1.5])
def test_serving_delay_rejects_what_is_not_a_duration(written):
    with pytest.raises(FeatureSetError, match="serving_delay_s"):
        dataclasses.replace(FLIGHTS, serving_delay_s=written)


def test_bad_field_type_is_rejected():
    with pytest.raises(FeatureSetError, match="type"):
        Field("x", "decimal")


def test_load_feature_set_by_bundled_name_and_by_module_path():
    assert load_feature_set("flights") is FLIGHTS
    assert load_feature_set("skewless.examples.flights:FLIGHTS") is FLIGHTS
    assert load_feature_set("tests.support.toy_featureset:CLICKS").name == "clicks"


@pytest.mark.parametrize(
    "spec, message",
    [
        ("nope", "expected 'package.module:NAME'"),
        ("no_such_module_xyz:X", "cannot import"),
        ("skewless.examples.flights:AGGREGATES", "is not a FeatureSet"),
    ],
)
def test_load_feature_set_errors_are_clear(spec, message):
    with pytest.raises(FeatureSetError, match=message):
        load_feature_set(spec)


@pytest.mark.parametrize(
    "calendar, message",
    [
        (("month", "nope"), "calendar_fields: 'nope' is not a raw or derived field"),
        (("month", "month"), "duplicate calendar field name 'month'"),
        (("label",), "calendar_fields: 'label' is the label"),
        ("month", "calendar_fields must be a tuple of names"),
    ],
)
def test_calendar_fields_must_be_known_fields_once(calendar, message):
    with pytest.raises(FeatureSetError, match=message):
        dataclasses.replace(FLIGHTS, calendar_fields=calendar)


def test_calendar_fields_of_the_bundled_sets_follow_the_event_time():
    from skewless.examples.weather import WEATHER

    assert FLIGHTS.calendar_fields == ("year", "month", "day", "hour")
    assert WEATHER.calendar_fields == ("year", "month", "day", "hour")
    assert dataclasses.replace(FLIGHTS, calendar_fields=["month"]).calendar_fields == ("month",)
