"""The online store's reference lookup against the batch join's rule, on the Bigtable emulator:
whatever the batches (sizes, order, going back in time, repeated from the cache), every event
gets the row valid at t - D_ref, as the batch index gives it."""

from __future__ import annotations

import random

import pytest

from skewless.beam_pipelines.commands import bigtable_setup
from skewless.beam_pipelines.io.bigtable import open_table
from skewless.beam_pipelines.io.online_store import OnlineLookup
from skewless.beam_pipelines.jobs import publish_reference
from skewless.examples.flights import FLIGHTS_PLUS, WEATHER_AT_ORIGIN
from skewless.transforms.reference import join_references
from tests.support.flights_data import real_flights, write_weather_slice
from tests.support.pipelines import typed_events
from tests.support.reference_tables import index_of, table_rows

pytestmark = [pytest.mark.emulator, pytest.mark.timeout(300)]

FIRST, LAST = "2013-03-03", "2013-03-08"  # the weather published: a gap-free stretch of days


class Clock:
    def __init__(self):
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def new_table(bt) -> tuple[str, list[str]]:
    """A flights_plus table on the emulator (every version kept): its id and connection flags."""
    table_id = bt.table_name()
    connection = [
        f"--bigtable_project={bt.project}",
        f"--bigtable_instance={bt.instance}",
        f"--bigtable_table={table_id}",
    ]
    bigtable_setup.run(["--feature_set", "flights_plus", *connection, "--retention_s=630720000"])
    return table_id, connection


def test_every_batch_order_gets_the_rows_of_the_batch_rule(tmp_path, bigtable_emulator):
    bt = bigtable_emulator
    table_id, connection = new_table(bt)
    weather_path = tmp_path / "weather.csv"
    # One hour of JFK left out: a key's versions need not be evenly spaced.
    published = write_weather_slice(
        weather_path,
        FIRST,
        LAST,
        drop=lambda r: r["origin"] == "JFK" and r["time_hour"].startswith("2013-03-05T12"),
    )
    for name, extra in (("origin_weather", [f"--input={weather_path}"]), ("plane", [])):
        publish_reference.run(
            ["--feature_set=flights_plus", f"--table={name}", *connection,
             f"--dead_letter_dir={tmp_path / ('dead_' + name)}", *extra]
        )  # fmt: skip
    # The batch index of exactly the published rows (the airports are not published: every
    # event gets nulls for them, in both).
    keep = {(r["origin"], r["time_hour"][:13]) for r in published}
    weather = [
        r for r in table_rows(WEATHER_AT_ORIGIN) if (r["origin"], _hour(r["time_hour"])) in keep
    ]
    indexes = [
        index_of(WEATHER_AT_ORIGIN, weather),
        index_of(FLIGHTS_PLUS.references[1], table_rows(FLIGHTS_PLUS.references[1])),
        {},
    ]
    events = typed_events(FLIGHTS_PLUS, real_flights(month=3, day=4, days=4))
    columns = [c.name for t in FLIGHTS_PLUS.references for c in t.columns]
    expected = [
        tuple(join_references(FLIGHTS_PLUS, e, indexes)[c] for c in columns) for e in events
    ]
    assert sum(x[0] is None for x in expected) < len(events) // 10  # the weather is there

    rng = random.Random(7)
    clock = Clock()
    lookup = OnlineLookup(FLIGHTS_PLUS, open_table(bt.project, bt.instance, table_id), clock=clock)
    order = list(range(len(events)))
    plans = [
        ("in event-time order, batches of 20", sorted(order, key=lambda i: events[i]["event_time"]), 20),
        ("backwards in time", sorted(order, key=lambda i: -events[i]["event_time"]), 33),
        ("shuffled, batches of 1 to 60", rng.sample(order, len(order)), None),
        ("all at once", order, len(order)),
    ]  # fmt: skip
    for what, sequence, size in plans:
        i = 0
        while i < len(sequence):
            n = size or rng.randint(1, 60)
            batch = sequence[i : i + n]
            got = lookup.examples([events[j] for j in batch])
            for j, example in zip(batch, got, strict=True):
                assert tuple(example[c] for c in columns) == expected[j], (what, events[j])
            i += n
            clock.now += 1.0  # every entry lives 60 s: the cache answers part of the time
    assert lookup.stats["reference_cache_hits"] > 0 and lookup.stats["reference_reads"] > 0


def _hour(ms: int) -> str:
    import datetime as dt

    return dt.datetime.fromtimestamp(ms / 1000, dt.UTC).strftime("%Y-%m-%dT%H")


def test_a_version_published_after_a_read_is_seen_by_the_first_batch_past_it(
    tmp_path, bigtable_emulator
):
    """A live stream: the lookup has read each origin up to its newest version (reading a day
    ahead of its batches), then the next days' weather is published. An event past the old
    newest version gets the new rows at once, the cache's entries not expired: an entry is
    complete up to the newest version it read, never up to the end of the read-ahead."""
    bt = bigtable_emulator
    table_id, connection = new_table(bt)
    weather = []

    def publish(first: str, last: str) -> None:
        path = tmp_path / f"weather_{first}.csv"
        published = write_weather_slice(path, first, last)
        publish_reference.run(
            ["--feature_set=flights_plus", "--table=origin_weather", *connection,
             f"--dead_letter_dir={tmp_path / ('dead_' + first)}", f"--input={path}"]
        )  # fmt: skip
        keep = {(r["origin"], r["time_hour"][:13]) for r in published}
        weather.extend(
            r for r in table_rows(WEATHER_AT_ORIGIN) if (r["origin"], _hour(r["time_hour"])) in keep
        )

    def expected(events: list[dict]) -> list[tuple]:
        indexes = [index_of(WEATHER_AT_ORIGIN, weather), {}, {}]
        return [
            tuple(join_references(FLIGHTS_PLUS, e, indexes)[c] for c in columns) for e in events
        ]

    columns = [c.name for c in WEATHER_AT_ORIGIN.columns]
    publish("2013-03-03", "2013-03-05")
    newest = max(r["time_hour"] for r in weather)
    delay = WEATHER_AT_ORIGIN.availability_delay_ms
    events = sorted(
        typed_events(FLIGHTS_PLUS, real_flights(month=3, day=4, days=3)),
        key=lambda e: e["event_time"],
    )
    before = [e for e in events if e["event_time"] - delay <= newest - 3_600_000]
    after = [e for e in events if e["event_time"] - delay > newest + 3_600_000]
    assert len(before) > 500 and len(after) > 500

    lookup = OnlineLookup(
        FLIGHTS_PLUS, open_table(bt.project, bt.instance, table_id), clock=Clock()
    )
    for events_now in (before, "publish", after):
        if events_now == "publish":
            publish("2013-03-06", "2013-03-07")
            continue
        want = expected(events_now)
        for i in range(0, len(events_now), 20):
            got = lookup.examples(events_now[i : i + 20])
            assert [tuple(x[c] for c in columns) for x in got] == want[i : i + 20]
    assert sum(w[0] is not None for w in expected(after)) > len(after) // 2
