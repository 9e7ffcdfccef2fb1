"""What the online store keeps of a reference table, on the Bigtable emulator (which applies a
GC rule at once): a re-run of bigtable-setup never shortens a family's retention by accident,
the row that is still valid is served however old it is, rows valid before 1970 and validity
times below the millisecond are served as the batch join finds them."""

from __future__ import annotations

import csv
import datetime as dt
import json
import time
from pathlib import Path

import pytest

from skewless.beam_pipelines.commands import bigtable_setup
from skewless.beam_pipelines.io.bigtable import open_table
from skewless.beam_pipelines.io.online_store import OnlineLookup
from skewless.beam_pipelines.runtime.launch import run_job
from skewless.examples.flights import WEATHER_AT_ORIGIN
from skewless.transforms.record_checks import to_epoch_ms
from skewless.transforms.reference import join_references, reference_row_validator
from tests.support.reference_tables import FLIGHTS_TABLES as FS
from tests.support.reference_tables import (
    FLIGHTS_TABLES_SPEC,
    csv_lines,
    dead_letters,
    dump,
    index_of,
    publish,
    published,
    table_rows,
    typed_weather,
)

pytestmark = [pytest.mark.emulator, pytest.mark.timeout(300)]
REF = "flights_tables_ref"
LONG_S = 20 * 365 * 86_400  # longer than the 2013 rows are old
DAY_S = 86_400
COLUMNS = [c.name for c in WEATHER_AT_ORIGIN.columns]


def connection(bt, table_id: str) -> list[str]:
    return [
        f"--feature_set={FLIGHTS_TABLES_SPEC}",
        f"--bigtable_project={bt.project}",
        f"--bigtable_instance={bt.instance}",
        f"--bigtable_table={table_id}",
    ]


def typed_rows(rows: list[dict]) -> list[dict]:
    """CSV lines typed as the file reader and validator type them ("NA" and "" are null)."""
    validator = reference_row_validator(WEATHER_AT_ORIGIN)
    return [
        validator.validate({k: None if v in ("", "NA") else v for k, v in r.items()}) for r in rows
    ]


def write_weather(path: Path, lines: list[dict]) -> Path:
    header, _ = csv_lines(WEATHER_AT_ORIGIN.resolve_default_input())
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, header, lineterminator="\n")
        writer.writeheader()
        writer.writerows(lines)
    return path


def two_days_of_weather(tmp_path: Path) -> tuple[Path, list[dict]]:
    _, lines = csv_lines(WEATHER_AT_ORIGIN.resolve_default_input())
    days = [x for x in lines if x["time_hour"][:10] in ("2013-03-03", "2013-03-04")]
    return write_weather(tmp_path / "weather.csv", days), days


def assert_newest_versions_kept(bt, table_id: str, lines: list[dict]) -> None:
    """Each key's latest version is still in the table, with its values.

    (Real Bigtable also collects the older versions past the max age. The Cloud SDK's
    emulator ignores intersection rules: it logs "Unsupported GC rule type" and keeps every
    version, so only the part that matters to serving, the newest version, is checked.)"""
    newest: dict[str, tuple[int, dict]] = {}
    for line in lines:
        key, stamp, values = typed_weather(line)
        if key not in newest or stamp > newest[key][0]:
            newest[key] = (stamp, values)
    stored = published(bt, table_id, REF, "origin_weather#")
    assert set(stored) == set(newest) == {f"origin_weather#{o}" for o in ("EWR", "JFK", "LGA")}
    for key, (stamp, values) in newest.items():
        assert stored[key][stamp] == values, key


def test_a_rerun_without_retention_keeps_every_published_row(bigtable_emulator, tmp_path):
    """The finding: a plain re-run reset the _ref family's max age to 7 days and the emulator
    dropped 1,269 of 1,278 published 2013 cells. Now the longer age stays, a typo is refused,
    and only --allow_shorter_retention shortens it, keeping the newest version of each key."""
    bt = bigtable_emulator
    table_id = bt.table_name()
    args = connection(bt, table_id)
    first = bigtable_setup.run([*args, f"--retention_s={LONG_S}"])
    assert first["families"][REF]["action"] == "created"
    path, days = two_days_of_weather(tmp_path)
    summary = publish(bt, table_id, "origin_weather", tmp_path / "dead", f"--input={path}")
    assert summary["rows_written"] == len(days) > 100
    before = dump(bt, table_id)
    assert sum(len(c) for row in before.values() for c in row[REF].values()) == 9 * len(days)

    again = bigtable_setup.run(args)  # no --retention_s: the README says re-runs are fine
    assert again["families"][REF] == {
        "action": "kept longer max age",  # the default (7 days) would shorten it
        "before": f"age > {LONG_S} s and beyond 1 version",
        "after": f"age > {LONG_S} s and beyond 1 version",
    }
    assert again["reference_families"][REF]["max_age_s"] == LONG_S
    assert dump(bt, table_id) == before

    assert run_job("bigtable-setup", [*args, "--retention_sec", "60"]) == 2  # a typo: refused
    with pytest.raises(SystemExit, match="--allow_shorter_retention"):
        bigtable_setup.run([*args, "--retention_s=60"])
    assert dump(bt, table_id) == before

    shorter = bigtable_setup.run([*args, "--retention_s=60", "--allow_shorter_retention"])
    assert shorter["families"][REF]["action"] == "shortened"
    # Every 2013 version is older than 60 s: the newest of each key is still there.
    time.sleep(2)  # the emulator collects about once a second
    assert_newest_versions_kept(bt, table_id, days)


def test_setup_prints_each_family_s_rule_and_lengthens_without_the_flag(bigtable_emulator):
    bt = bigtable_emulator
    table_id = bt.table_name()
    args = connection(bt, table_id)
    bigtable_setup.run([*args, f"--retention_s={DAY_S}"])
    longer = bigtable_setup.run([*args, f"--retention_s={2 * DAY_S}"])
    assert longer["families"][REF]["action"] == "lengthened"
    assert longer["families"]["flights_tables_static"]["action"] == "unchanged"
    # No --retention_s: the default (7 days) is longer than 2 days, so it lengthens too.
    default = bigtable_setup.run(args)
    assert default["families"][REF]["after"] == "age > 604800 s and beyond 1 version"
    families = open_table(bt.project, bt.instance, table_id, admin=True).list_column_families()
    rule = families[REF].gc_rule.to_pb()
    assert type(rule).pb(rule).WhichOneof("rule") == "intersection"


def test_an_unchanged_row_older_than_the_retention_is_still_served(bigtable_emulator, tmp_path):
    """A table set up with one day of retention, 2013 weather published: every version but
    each key's newest is collected at once, and an event today (2026) gets the newest row, as
    the batch join does. With the old rule (max age only) the row was gone: serving saw null
    where prepare joined a value."""
    bt = bigtable_emulator
    table_id = bt.table_name()
    bigtable_setup.run([*connection(bt, table_id), f"--retention_s={DAY_S}"])
    path, days = two_days_of_weather(tmp_path)
    publish(bt, table_id, "origin_weather", tmp_path / "dead", f"--input={path}")
    time.sleep(2)  # the emulator collects about once a second
    assert_newest_versions_kept(bt, table_id, days)

    now = to_epoch_ms(dt.datetime.now(dt.UTC))
    events = [{"event_time": now, "origin": o, "carrier": "UA", "dest": None, "tailnum": None} for o in ("EWR", "JFK", "LGA")]  # fmt: skip
    lookup = OnlineLookup(FS, open_table(bt.project, bt.instance, table_id))
    served = lookup.examples(events)
    start, end = to_epoch_ms("2013-03-03"), to_epoch_ms("2013-03-05")
    rows = [r for r in table_rows(WEATHER_AT_ORIGIN) if start <= r["time_hour"] < end]
    batch = [join_references(FS, e, [index_of(WEATHER_AT_ORIGIN, rows), {}, {}]) for e in events]
    for got, want in zip(served, batch, strict=True):
        assert [got[c] for c in COLUMNS] == [want[c] for c in COLUMNS]
        assert got["origin_weather_temp"] is not None


def test_rows_valid_before_1970_are_served_as_the_batch_join_finds_them(
    bigtable_emulator, tmp_path
):
    """Bigtable holds no timestamp before 1970: of a key's pre-1970 versions the latest is
    written at 0 and answers every as-of time from 1970 on; the earlier ones are dead letters
    with the reason and their line. Every other row is written (the job used to abort)."""
    bt = bigtable_emulator
    table_id = bt.table_name()
    bigtable_setup.run([*connection(bt, table_id), f"--retention_s={LONG_S}"])
    _, lines = csv_lines(WEATHER_AT_ORIGIN.resolve_default_input())
    jfk, lga, ewr = ([x for x in lines if x["origin"] == o][:3] for o in ("JFK", "LGA", "EWR"))
    rows = [
        dict(jfk[0], time_hour="1969-06-01T00:00:00Z"),
        dict(jfk[1], time_hour="1969-12-31T23:00:00.5Z"),  # superseded by the next one
        dict(jfk[2], time_hour="1970-01-01T00:00:00Z"),
        dict(lga[0], time_hour="1965-03-01T12:00:00Z"),
        dict(ewr[0], time_hour="1960-01-01T00:00:00Z"),
        dict(ewr[1], time_hour="1964-01-01T00:00:00Z"),
        dict(ewr[2], time_hour="2013-01-01T06:00:00Z"),
    ]
    path = write_weather(tmp_path / "old.csv", rows)
    summary = publish(bt, table_id, "origin_weather", tmp_path / "dead", f"--input={path}")
    assert summary["rows_written"] == 4 and summary["rows_superseded_before_1970"] == 3
    assert summary["rows_dead_lettered"] == 3 and summary["rows_rejected"] == 0
    letters = dead_letters(tmp_path / "dead")
    assert sorted(x["line"] for x in letters) == [2, 3, 6]  # header is line 1
    for letter in letters:
        assert letter["stage"] == "reference" and "superseded" in letter["reason"]
        assert letter["record"].split(",")[0] in ("JFK", "EWR")  # the CSV line itself
    stored = published(bt, table_id, REF, "origin_weather#")
    assert {k: sorted(v) for k, v in stored.items()} == {
        "origin_weather#JFK": [0],
        "origin_weather#LGA": [0],
        "origin_weather#EWR": [0, to_epoch_ms("2013-01-01T06:00:00Z")],
    }

    index = index_of(WEATHER_AT_ORIGIN, typed_rows(rows))
    times = ["1970-01-01T01:00:00Z", "1999-05-05T00:00:00Z", "2013-01-01T06:59:59.999Z",
             "2013-01-01T07:00:00Z", "2026-01-01T00:00:00Z"]  # fmt: skip
    events = [
        {"event_time": to_epoch_ms(t), "origin": o, "carrier": "UA", "dest": None, "tailnum": None}
        for t in times
        for o in ("JFK", "LGA", "EWR")
    ]
    lookup = OnlineLookup(FS, open_table(bt.project, bt.instance, table_id))
    served = lookup.examples(events)
    for event, got in zip(events, served, strict=True):
        want = join_references(FS, event, [index, {}, {}])
        assert [got[c] for c in COLUMNS] == [want[c] for c in COLUMNS], event
        assert got["origin_weather_temp"] is not None


def test_a_validity_time_below_the_millisecond_is_served_from_the_next_millisecond(
    bigtable_emulator, tmp_path
):
    """Publish rounds valid_from up as prepare does: a row valid 0.5 ms after t - D_ref is not
    served to the event at t, and is from t + 1 ms on, online and in the batch join alike."""
    bt = bigtable_emulator
    table_id = bt.table_name()
    bigtable_setup.run([*connection(bt, table_id), f"--retention_s={LONG_S}"])
    _, lines = csv_lines(WEATHER_AT_ORIGIN.resolve_default_input())
    first, second = [x for x in lines if x["origin"] == "JFK"][:2]
    rows = [
        dict(first, time_hour="2013-01-01T05:00:00Z"),
        dict(second, time_hour="2013-01-01T06:00:00.0005Z"),
    ]
    path = write_weather(tmp_path / "sub_ms.csv", rows)
    publish(bt, table_id, "origin_weather", tmp_path / "dead", f"--input={path}")
    t = to_epoch_ms("2013-01-01T07:00:00Z")  # t - D_ref = 06:00:00.000
    events = [
        {"event_time": t + d, "origin": "JFK", "carrier": "UA", "dest": None, "tailnum": None}
        for d in (0, 1)
    ]
    lookup = OnlineLookup(FS, open_table(bt.project, bt.instance, table_id))
    served = [x["origin_weather_temp"] for x in lookup.examples(events)]
    index = index_of(WEATHER_AT_ORIGIN, typed_rows(rows))
    batch = [join_references(FS, e, [index, {}, {}])["origin_weather_temp"] for e in events]
    assert served == batch == [float(first["temp"]), float(second["temp"])]


def test_a_duplicate_row_s_dead_letter_is_its_line(bigtable_emulator, tmp_path):
    bt = bigtable_emulator
    table_id = bt.table_name()
    bigtable_setup.run([*connection(bt, table_id), f"--retention_s={LONG_S}"])
    _, lines = csv_lines(WEATHER_AT_ORIGIN.resolve_default_input())
    assert lines[0]["temp"] < "99.5"  # kept: the first by value order, the original
    path = write_weather(tmp_path / "dup.csv", [lines[0], dict(lines[0], temp="99.5")])
    summary = publish(bt, table_id, "origin_weather", tmp_path / "dead", f"--input={path}")
    assert summary["rows_duplicate"] == 1
    (letter,) = dead_letters(tmp_path / "dead")
    text = path.read_text().splitlines()[2]
    assert letter["record"] == text and letter["line"] == 3 and letter["file"] == str(path)
    assert letter["reason"] == (
        f"duplicate row for origin={lines[0]['origin']!r} valid from "
        f"{lines[0]['time_hour'].replace('Z', '.000Z')}"
    )
    json.dumps(letter)
