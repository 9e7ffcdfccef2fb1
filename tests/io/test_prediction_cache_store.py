"""The prediction cache's reads on the Bigtable emulator: the lookup serves a version's entries
only when the same read finds its marker, only the version it is asked for, and never another key's entry
when two keys share a row (a hash collision is a miss)."""

from __future__ import annotations

import pytest

from skewless.beam_pipelines.commands import bigtable_setup
from skewless.beam_pipelines.io.bigtable import open_table
from skewless.beam_pipelines.io.online_store import CACHED, OnlineLookup
from skewless.beam_pipelines.io.prediction_cache import entry_row, read_marker, write_marker
from skewless.transforms.prediction_cache import entry_row_key, key_hash, key_text
from tests.support.cache_feature_sets import FLIGHTS_KEYED, FLIGHTS_ONE_HEX_KEYED
from tests.support.flights_data import real_flights
from tests.support.pipelines import typed_events

pytestmark = [pytest.mark.emulator, pytest.mark.timeout(120)]
STAMP_MS = 1_790_000_000_000


def _table(bt, spec: str):
    table_id = bt.table_name()
    bigtable_setup.run(
        [f"--feature_set={spec}", f"--bigtable_project={bt.project}",
         f"--bigtable_instance={bt.instance}", f"--bigtable_table={table_id}"]
    )  # fmt: skip
    return open_table(bt.project, bt.instance, table_id)


def _events(fs, n: int) -> list[dict]:
    return typed_events(fs, real_flights(month=3, day=4, days=1))[:n]


def _write(table, fs, version: int, entries: list[dict]) -> None:
    statuses = table.mutate_rows([entry_row(table, fs, version, STAMP_MS, e) for e in entries])
    assert all(s.code == 0 for s in statuses)


def test_a_version_is_served_only_after_its_marker_and_only_its_own_entries(bigtable_emulator):
    fs = FLIGHTS_KEYED
    table = _table(bigtable_emulator, "tests.support.cache_feature_sets:FLIGHTS_KEYED")
    events = _events(fs, 200)
    texts = sorted({key_text(fs, e) for e in events})
    cached = texts[: len(texts) // 2]
    _write(table, fs, 1, [{"key": t, "probability": 0.25 + i / 1e4, "requests": 1} for i, t in enumerate(cached)])
    lookup = OnlineLookup(fs, table)

    before = lookup.examples(events, cache_version=1)
    assert not any(CACHED in e for e in before), "entries without their marker are never served"
    assert lookup.stats["prediction_cache_version_not_ready"] == len(events)
    assert read_marker(table, fs, 1) is None

    write_marker(table, fs, 1, STAMP_MS, {"requests": 200})
    after = lookup.examples(events, cache_version=1)
    probability = {t: 0.25 + i / 1e4 for i, t in enumerate(cached)}
    for example in after:
        text = key_text(fs, example)
        if text in probability:
            assert example[CACHED] == (probability[text], 1)
        else:
            assert CACHED not in example
    hits = sum(CACHED in e for e in after)
    assert hits == sum(key_text(fs, e) in probability for e in events) > 0
    assert lookup.stats["prediction_cache_hits"] == hits
    assert lookup.stats["prediction_cache_misses"] == len(events) - hits
    assert read_marker(table, fs, 1) == {"requests": 200}

    # Version 2 is serving now: version 1's entries are not its predictions.
    other = lookup.examples(events, cache_version=2)
    assert not any(CACHED in e for e in other)
    assert lookup.stats["prediction_cache_version_not_ready"] == 2 * len(events)


def test_a_hash_collision_is_a_miss_never_another_keys_prediction(bigtable_emulator):
    fs = FLIGHTS_ONE_HEX_KEYED
    table = _table(bigtable_emulator, "tests.support.cache_feature_sets:FLIGHTS_ONE_HEX_KEYED")
    events = _events(fs, 300)
    by_hash: dict[str, list[str]] = {}
    for text in sorted({key_text(fs, e) for e in events}):
        by_hash.setdefault(key_hash(text, 1), []).append(text)
    shared = [texts for texts in by_hash.values() if len(texts) > 1]
    assert shared, "with one hexadecimal character, keys share rows"
    stored = {texts[0]: 0.5 + i / 100 for i, texts in enumerate(by_hash.values())}
    _write(table, fs, 3, [{"key": t, "probability": p, "requests": 1} for t, p in stored.items()])
    write_marker(table, fs, 3, STAMP_MS, {})
    lookup = OnlineLookup(fs, table)
    served = lookup.examples(events, cache_version=3)
    for example in served:
        text = key_text(fs, example)
        assert entry_row_key(fs, 3, text).endswith("#" + key_hash(text, 1))
        if text in stored:
            assert example[CACHED] == (stored[text], 3)
        else:
            assert CACHED not in example, f"{text} got the entry of another key"
    collided = sum(key_text(fs, e) not in stored for e in events)
    assert collided > 0
    assert lookup.stats["prediction_cache_collisions"] == collided


class _RecordingTable:
    """The emulator's table, recording the row keys each read asks for."""

    def __init__(self, table):
        self.table = table
        self.reads: list[set[bytes]] = []

    def read_rows(self, row_set, filter_=None):
        self.reads.append(set(row_set.row_keys))
        return self.table.read_rows(row_set=row_set, filter_=filter_)


class _Clock:
    def __init__(self):
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_a_ready_versions_entries_are_read_once_per_ttl_and_served_from_the_process(bigtable_emulator):
    fs = FLIGHTS_KEYED
    table = _table(bigtable_emulator, "tests.support.cache_feature_sets:FLIGHTS_KEYED")
    events = _events(fs, 150)
    texts = sorted({key_text(fs, e) for e in events})
    _write(table, fs, 1, [{"key": t, "probability": 0.125, "requests": 1} for t in texts[::2]])
    write_marker(table, fs, 1, STAMP_MS, {})
    recording, clock = _RecordingTable(table), _Clock()
    lookup = OnlineLookup(fs, recording, clock=clock)
    first = lookup.examples(events, cache_version=1)
    entry_rows = {entry_row_key(fs, 1, t).encode() for t in texts}
    assert entry_rows <= recording.reads[-1], "the first batch reads every key's entry"
    second = lookup.examples(events, cache_version=1)
    assert not entry_rows & recording.reads[-1], "a ready version's entries come from the process"
    assert [CACHED in e for e in first] == [CACHED in e for e in second]
    assert sum(CACHED in e for e in second) > 0
    clock.now += 61  # past cache_ttl_s: read again (a key precompute added since is seen)
    lookup.examples(events, cache_version=1)
    assert entry_rows <= recording.reads[-1]
