"""The online store read of streaming scoring: a batch of events -> examples, one Bigtable read.

One `read_rows` call per batch fetches every aggregate cell the as-of rule names (latest cell
of the exact row `{key}#{value}#{W}`) and every reference row the events need, through
filters per column family: aggregates and static tables take the latest cell; a slowly
changing table (`{feature set}_ref`, cell timestamp = valid_from) takes, for the span
[earliest, latest] of the batch's as-of times (t - D_ref), every version inside the span plus
the newest one at or before its start. The row joined to an event is then chosen by the batch
join's own rule (`skewless.transforms.reference.join_references` / `row_as_of`): the latest version
with valid_from <= t - D_ref. (Beam's Bigtable enrichment handler reads only the latest cell:
a replayed or late event would see a row that was not valid yet.)

With a prediction cache (hybrid serving), the same read also fetches the entry row of each
event's key for the model version serving now and that version's completion marker; an entry
is served only if the marker came back in the same read and the entry holds the event's own
key text (skewless.beam_pipelines.io.prediction_cache).

So one read knows every version that can apply to an as-of time in the span, and nothing
newer than its end. The in-process cache keeps, per (table, key), the versions and the span
[lo, hi] they are complete for; it answers an as-of time only inside that span, so it can
never return a row that became valid after t - D_ref, and entries expire after
`cache_ttl_s`, so a row published late is seen within that time.
"""

from __future__ import annotations

import datetime as dt
import re
import threading
import time
from collections.abc import Iterable

from skewless.beam_pipelines.io.bigtable import decode_value
from skewless.beam_pipelines.io.prediction_cache import KEY, MARKER, PROBABILITY
from skewless.transforms.aggregations import attach_aggregates, parse_row_key, row_key
from skewless.transforms.featureset import FeatureSet, ReferenceTable
from skewless.transforms.partials import CellKey, entity_value
from skewless.transforms.prediction_cache import (
    cache_family,
    entry_row_key,
    key_text,
    marker_row_key,
)
from skewless.transforms.reference import join_references, reference_family, reference_row_key

DEFAULT_CACHE_TTL_S = 60.0
# How far past a batch's latest as-of time a read of a slowly changing table also fetches
# versions (see OnlineLookup._store): a replay or backfill, whose tables are published ahead
# of its events, then reads each key about once a day of event time instead of every batch.
DEFAULT_READ_AHEAD_MS = 24 * 3_600_000
NEVER = -(2**62)
# Where an example answered from the prediction cache carries (probability, model version).
CACHED = "__prediction_cache"
MAX_MEMO_KEYS = 200_000  # keys (and entries) of the prediction cache remembered per process
_EPOCH = dt.datetime(1970, 1, 1, tzinfo=dt.UTC)


def cells_from_rows(rows: Iterable, family: str) -> dict[CellKey, dict]:
    """Bigtable rows of the feature contract -> {CellKey: {aggregate: value}} (latest cells).

    The one place streaming scoring decodes cells; `.get` of the result is the `lookup` of
    skewless.transforms.aggregations.attach_aggregates, so the as-of rule itself is not repeated here.
    """
    out = {}
    for row in rows:
        columns = row.cells.get(family)
        if columns:
            out[parse_row_key(row.row_key)] = {
                name.decode("utf-8"): decode_value(cells[0].value)
                for name, cells in columns.items()
            }
    return out


def cell_keys(fs: FeatureSet, event: dict) -> list[CellKey]:
    """The cells attach_aggregates will ask for (recorded from a dry run of the rule itself)."""
    keys: list[CellKey] = []
    attach_aggregates(fs, event, keys.append)
    return keys


def read_cells_of(table, family: str, keys: Iterable[CellKey]) -> dict[CellKey, dict]:
    """Read exactly these aggregate rows, latest cells (one request for all of them)."""
    from google.cloud.bigtable.row_filters import CellsColumnLimitFilter
    from google.cloud.bigtable.row_set import RowSet

    wanted = {row_key(*k) for k in keys}
    if not wanted:  # an empty RowSet would read the whole table
        return {}
    row_set = RowSet()
    for key in sorted(wanted):
        row_set.add_row_key(key.encode("utf-8"))
    return cells_from_rows(
        table.read_rows(row_set=row_set, filter_=CellsColumnLimitFilter(1)), family
    )


def _ms(cell) -> int:
    stamp = cell.timestamp
    return round((stamp - _EPOCH).total_seconds() * 1000) if stamp is not None else 0


def _versions(columns: dict, fields: tuple[str, ...]) -> list[tuple[int, tuple]]:
    """A row's cells of one family -> [(valid_from, values in field order)], oldest first."""
    by_time: dict[int, dict] = {}
    for name, cells in columns.items():
        field = name.decode("utf-8")
        for cell in cells:
            by_time.setdefault(_ms(cell), {})[field] = decode_value(cell.value)
    return [(t, tuple(values.get(f) for f in fields)) for t, values in sorted(by_time.items())]


class _Entry:
    """The known versions of one (table, key), complete for as-of times in [lo, hi]."""

    __slots__ = ("versions", "lo", "hi", "expires")

    def __init__(self, versions: list, lo: int, hi: int, expires: float):
        self.versions, self.lo, self.hi, self.expires = versions, lo, hi, expires

    def covers(self, as_of: int, now: float) -> bool:
        return now < self.expires and self.lo <= as_of <= self.hi


class OnlineLookup:
    """Examples for a batch of events from one Bigtable read (plus rare narrower reads).

    `table` is a Bigtable table (or anything with the same `read_rows`). Thread-safe cache.
    """

    def __init__(
        self,
        fs: FeatureSet,
        table,
        cache_ttl_s: float = DEFAULT_CACHE_TTL_S,
        clock=time.monotonic,
        read_ahead_ms: int = DEFAULT_READ_AHEAD_MS,
    ):
        self.fs = fs
        self.table = table
        self.cache_ttl_s = cache_ttl_s
        self.read_ahead_ms = read_ahead_ms
        self.clock = clock
        self._cache: dict[tuple[str, str], _Entry] = {}
        self._lock = threading.Lock()
        self._key_fields = fs.prediction_cache.key if fs.prediction_cache is not None else ()
        self._keys: dict[tuple, tuple[str, str]] = {}
        # (version, entry row key) -> (key text or None: no entry, probability, expiry); and
        # version -> until when its marker counts as seen. See _cache_requests.
        self._entries: dict[tuple[int, str], tuple[str | None, float | None, float]] = {}
        self._ready: dict[int, float] = {}
        self.stats = {
            "cells_found": 0,
            "cells_missing": 0,
            "reference_reads": 0,
            "reference_cache_hits": 0,
            "prediction_cache_hits": 0,
            "prediction_cache_misses": 0,
            "prediction_cache_version_not_ready": 0,
            "prediction_cache_collisions": 0,
        }

    # -- the requests of a batch ---------------------------------------------------------------

    def _reference_requests(self, events: list[dict]) -> dict[tuple[str, str], list[int]]:
        """(table name, key) -> the as-of times (t - D_ref) the events ask for."""
        fs = self.fs
        wanted: dict[tuple[str, str], list[int]] = {}
        for event in events:
            t = event[fs.event_time]
            for table in fs.references:
                key = entity_value(event.get(table.key))
                if key is not None:
                    wanted.setdefault((table.name, key), []).append(t - table.availability_delay_ms)
        return wanted

    # -- the read ------------------------------------------------------------------------------

    def _filter(self, span: tuple[int, int] | None, predictions: bool = False):
        from google.cloud.bigtable import row_filters as rf

        def family(name: str):
            return rf.FamilyNameRegexFilter(re.escape(name))

        # The family filter comes last in each chain: the limits count per column and the time
        # range is per cell, so the order does not change what a chain keeps, but the family
        # regex then sees the few cells left instead of every version of a row (the Bigtable
        # emulator evaluates it per cell: 1.9 s for a year of hourly weather, 20 ms this way).
        latest = rf.CellsColumnLimitFilter(1)
        branches = [rf.RowFilterChain([latest, family(self.fs.name)])]
        if predictions:
            branches.append(rf.RowFilterChain([latest, family(cache_family(self.fs))]))
        families = {reference_family(self.fs, t) for t in self.fs.references}
        for name in sorted(families):
            if name.endswith("_static"):
                branches.append(rf.RowFilterChain([latest, family(name)]))
            elif span is not None:
                earliest, last = (_EPOCH + dt.timedelta(milliseconds=ms) for ms in span)
                after = dt.timedelta(milliseconds=1)  # TimestampRange ends are exclusive
                ahead = dt.timedelta(milliseconds=self.read_ahead_ms)
                inside = rf.TimestampRange(start=earliest, end=last + ahead + after)
                before = rf.TimestampRange(end=earliest + after)
                # Every version inside the span (read ahead), and the newest at or before its
                # start.
                branches.append(rf.RowFilterChain([rf.TimestampRangeFilter(inside), family(name)]))
                branches.append(
                    rf.RowFilterChain([rf.TimestampRangeFilter(before), latest, family(name)])
                )
        return branches[0] if len(branches) == 1 else rf.RowFilterUnion(branches)

    def _read(self, row_keys: Iterable[str], span: tuple[int, int] | None, predictions: bool = False):
        from google.cloud.bigtable.row_set import RowSet

        keys = sorted(set(row_keys))
        if not keys:  # an empty RowSet would read the whole table
            return []
        row_set = RowSet()
        for key in keys:
            row_set.add_row_key(key.encode("utf-8"))
        return list(
            self.table.read_rows(row_set=row_set, filter_=self._filter(span, predictions))
        )

    def _store(
        self, table: ReferenceTable, key: str, columns: dict, span: tuple | None, now: float
    ) -> None:
        versions = _versions(columns, tuple(f.name for f in table.fields))
        if table.valid_from is None:
            lo, hi = NEVER, 2**62  # one version, valid whenever
        else:
            earliest, hi = span
            # Complete from `earliest` when the read found the version valid there; with no
            # version at or before it, nothing older exists either.
            lo = earliest if versions and versions[0][0] <= earliest else NEVER
            # Complete up to the newest version read, when it is past the span (read ahead):
            # every version up to there was read. Not beyond it: the next version may not be
            # published yet, which is what a live stream's next batch asks for.
            if versions:
                hi = max(hi, versions[-1][0])
        with self._lock:
            self._cache[(table.name, key)] = _Entry(versions, lo, hi, now + self.cache_ttl_s)

    # -- the prediction cache --------------------------------------------------------------------

    def _cache_key(self, event: dict, version: int) -> tuple[str, str] | None:
        """(key text, entry row key) of an event's key for `version`, None when a key field is
        null (never cached). Memoised per process: a peaked key space repeats, and the key's
        JSON and its hash cost more than the rest of a hit (bench/prediction_cache.py)."""
        values = tuple(event.get(name) for name in self._key_fields)
        if None in values:
            return None
        memo = (version, values)
        found = self._keys.get(memo)
        if found is None:
            text = key_text(self.fs, event)
            found = (text, entry_row_key(self.fs, version, text))
            if len(self._keys) >= MAX_MEMO_KEYS:
                self._keys.clear()
            self._keys[memo] = found
        return found

    def _cache_requests(
        self, events: list[dict], version: int | None, now: float
    ) -> tuple[list, list[str]]:
        """(per event: its (key text, row key), or None when it is not looked up; the rows to
        read). A version whose marker this process has seen recently reads only the entries
        it does not hold (an entry of a version never changes: precompute writes the same
        cells again); before that, the version's marker and every entry the batch needs, in
        the batch's one read, so the batch that finds the marker is served."""
        if version is None:
            return [None] * len(events), []
        keys = [self._cache_key(event, version) for event in events]
        wanted = {found[1] for found in keys if found is not None}
        if self._ready.get(version, 0.0) > now:
            entries = self._entries
            return keys, [
                k for k in wanted if (e := entries.get((version, k))) is None or e[2] <= now
            ]
        wanted.add(marker_row_key(self.fs, version))
        return keys, list(wanted)

    def _serve_cached(
        self, examples: list[dict], keys: list, version: int | None, rows, read: list[str],
        now: float,
    ) -> None:  # fmt: skip
        """Attach (probability, version) under CACHED to each example whose entry holds its own
        key text (another text: a hash collision, a miss). Nothing is served from a version
        whose marker neither this read found nor this process saw within `cache_ttl_s`:
        precompute has not finished it (or its cells were collected). What was read for a
        ready version is kept for `cache_ttl_s`, a key without an entry too (a re-run of
        precompute that adds keys is seen within that time)."""
        if version is None:
            return
        family = cache_family(self.fs)
        found_rows = {}
        for row in rows:
            columns = row.cells.get(family)
            if columns and KEY in columns and PROBABILITY in columns:
                found_rows[row.row_key.decode("utf-8")] = (
                    columns[KEY][0].value.decode("utf-8"),
                    # precompute writes the probability as the text of a float (encode_value)
                    float(columns[PROBABILITY][0].value),
                )
            elif columns and MARKER in columns:
                found_rows[row.row_key.decode("utf-8")] = MARKER
        stats = self.stats
        if found_rows.get(marker_row_key(self.fs, version)) is MARKER:
            self._ready[version] = now + self.cache_ttl_s
        elif self._ready.get(version, 0.0) <= now:
            stats["prediction_cache_version_not_ready"] += len(examples)
            return
        entries = self._entries
        if len(entries) + len(read) > MAX_MEMO_KEYS:
            entries.clear()
        expires = now + self.cache_ttl_s
        for read_key in read:
            entry = found_rows.get(read_key)
            if entry is not MARKER:
                text, probability = entry if entry is not None else (None, None)
                entries[(version, read_key)] = (text, probability, expires)
        hits = misses = collisions = 0
        for example, found in zip(examples, keys, strict=True):
            entry = entries.get((version, found[1])) if found is not None else None
            if entry is None or entry[0] is None:
                misses += 1
            elif entry[0] != found[0]:
                collisions += 1
            else:
                hits += 1
                example[CACHED] = (entry[1], version)
        stats["prediction_cache_hits"] += hits
        stats["prediction_cache_misses"] += misses + collisions
        stats["prediction_cache_collisions"] += collisions

    def examples(self, events: list[dict], cache_version: int | None = None) -> list[dict]:
        """The events with their as-of aggregates and reference columns; with `cache_version`
        (the model version serving now), an example whose key that version's prediction cache
        holds also carries its cached (probability, version) under CACHED."""
        fs = self.fs
        now = self.clock()
        cache_keys_of_events, cache_rows = self._cache_requests(events, cache_version, now)
        wanted_cells = [cell_keys(fs, e) for e in events]
        requests = self._reference_requests(events) if fs.references else {}
        tables = {t.name: t for t in fs.references}
        with self._lock:
            missing = {
                wanted: as_ofs
                for wanted, as_ofs in requests.items()
                if not all(
                    (e := self._cache.get(wanted)) is not None and e.covers(a, now) for a in as_ofs
                )
            }
        self.stats["reference_cache_hits"] += len(requests) - len(missing)
        changing = [
            a for (name, _), as_ofs in missing.items() if tables[name].valid_from for a in as_ofs
        ]
        span = (min(changing), max(changing)) if changing else None
        row_keys = [row_key(*k) for keys in wanted_cells for k in keys]
        row_keys += [reference_row_key(tables[name], key) for name, key in missing]
        rows = self._read(row_keys + cache_rows, span, predictions=bool(cache_rows))
        self.stats["reference_reads"] += bool(missing)
        cells = cells_from_rows(rows, fs.name)
        seen: set[tuple[str, str]] = set()
        for row in rows:
            name, _, key = row.row_key.decode("utf-8").partition("#")
            table = tables.get(name)
            if table is not None and (name, key) in missing:
                family = row.cells.get(reference_family(fs, table), {})
                self._store(table, key, family, span, now)
                seen.add((name, key))
        for name, key in set(missing) - seen:  # no row at all: known empty up to the span's end
            self._store(tables[name], key, {}, span, now)
        found = sum(k in cells for keys in wanted_cells for k in keys)
        self.stats["cells_found"] += found
        self.stats["cells_missing"] += sum(map(len, wanted_cells)) - found
        indexes = self._indexes(requests)
        examples = [
            join_references(fs, attach_aggregates(fs, e, cells.get), indexes) if fs.references
            else attach_aggregates(fs, e, cells.get)
            for e in events
        ]  # fmt: skip
        self._serve_cached(examples, cache_keys_of_events, cache_version, rows, cache_rows, now)
        return examples

    def _indexes(self, requests) -> list[dict]:
        """Per table (feature set order): {key: (times, rows)} of the versions known now."""
        out = []
        with self._lock:
            for table in self.fs.references:
                index = {}
                for name, key in requests:
                    if name == table.name:
                        versions = self._cache[(name, key)].versions
                        index[key] = ([t for t, _ in versions], [v for _, v in versions])
                out.append(index)
        return out
