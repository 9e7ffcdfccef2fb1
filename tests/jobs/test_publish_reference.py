"""publish-reference and the reference families of bigtable-setup, against the Bigtable emulator:
every published version equals its CSV row (typed here, independently), a re-run leaves the
table as it was, bad rows reach the dead letters with stage and reason while the job goes on,
and a missing table or family is a clear error before the run."""

from __future__ import annotations

import csv
import random

import apache_beam as beam
import pytest
from apache_beam.testing.util import assert_that

from skewless.beam_pipelines.commands.bigtable_setup import ensure_table
from skewless.beam_pipelines.io.bigtable import (
    BigtableSetupError,
    WriteReferenceRows,
    check_reference_families,
    open_table,
)
from skewless.beam_pipelines.jobs import publish_reference
from skewless.examples.flights import FLIGHTS, PLANES, WEATHER_AT_ORIGIN
from tests.support.reference_tables import FLIGHTS_TABLES as FS
from tests.support.reference_tables import (
    NULLS,
    csv_lines,
    dead_letters,
    dump,
    number,
    publish,
    published,
    typed_weather,
)

pytestmark = [pytest.mark.emulator]
RETENTION_S = 20 * 365 * 86_400  # the 2013 rows must outlive the GC rule's age
MONTH = "2013-01"
def typed_plane(line: dict) -> tuple[str, int, dict]:
    ints = {"year", "engines", "seats"}
    values = {}
    for f in PLANES.fields:
        text = line[f.name]
        if f.name in ints:
            values[f.name] = number(text, int)
        elif f.name == "speed":
            values[f.name] = number(text, float)
        else:
            values[f.name] = None if text in NULLS else text
    return f"plane#{line['tailnum']}", 0, values


@pytest.fixture(scope="module")
def weather_month(tmp_path_factory):
    """A month of the bundled weather, plus three bad rows: a humidity of 150 %, a second row
    for an origin and hour already there (other values), and a row without an origin."""
    header, lines = csv_lines(WEATHER_AT_ORIGIN.resolve_default_input())
    month = [line for line in lines if line["time_hour"].startswith(MONTH)]
    assert len({(x["origin"], x["time_hour"]) for x in month}) == len(month) > 2000
    out_of_range = dict(month[10], time_hour="2013-01-31T23:30:00Z", humid="150")
    # Kept is the first row by value order (temp first): "99.5" sorts after the original.
    duplicate = dict(month[20], temp="99.5")
    assert month[20]["temp"] < "99.5"
    no_key = dict(month[30], origin="", time_hour="2013-01-31T23:45:00Z")
    path = tmp_path_factory.mktemp("weather") / "weather_2013_01.csv"
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, header, lineterminator="\n")
        writer.writeheader()
        writer.writerows([*month, out_of_range, duplicate, no_key])
    return {"path": path, "rows": month, "bad": (out_of_range, duplicate, no_key)}


@pytest.fixture(scope="module")
def table_id(bigtable_emulator):
    bt = bigtable_emulator
    name = bt.table_name("reference")
    ensure_table(bt.project, bt.instance, name, FS, 600, RETENTION_S)
    return name


@pytest.mark.timeout(60)
def test_bigtable_setup_creates_the_reference_families_with_their_gc_rules(bigtable_emulator):
    bt = bigtable_emulator
    name = bt.table_name()
    first = ensure_table(bt.project, bt.instance, name, FS, 600, 86_400)
    assert first["created_table"]
    assert first["reference_families"] == {
        "flights_tables_ref": {
            "created": True,
            "static": False,
            "max_age_s": 86_400,
            "max_versions": None,
            "keeps_newest_version": True,
            "tables": ["origin_weather"],
        },
        "flights_tables_static": {
            "created": True,
            "static": True,
            "max_age_s": None,
            "max_versions": 1,
            "keeps_newest_version": True,
            "tables": ["plane", "dest_airport"],
        },
    }
    again = ensure_table(bt.project, bt.instance, name, FS, 600, 2 * 86_400)
    assert not again["created_table"] and not again["created_family"]
    assert not any(f["created"] for f in again["reference_families"].values())
    families = open_table(bt.project, bt.instance, name, admin=True).list_column_families()
    assert set(families) == {"flights_tables", "flights_tables_ref", "flights_tables_static"}
    versioned = families["flights_tables_ref"].gc_rule.to_pb()
    # Collected when older than the retention AND not the newest version of its column.
    assert type(versioned).pb(versioned).WhichOneof("rule") == "intersection"
    age, versions = versioned.intersection.rules
    assert age.max_age.total_seconds() == 2 * 86_400  # updated (lengthened)
    assert versions.max_num_versions == 1
    static = families["flights_tables_static"].gc_rule.to_pb()
    assert type(static).pb(static).WhichOneof("rule") == "max_num_versions"
    assert static.max_num_versions == 1

    # A table made for a feature set without the references gets the families when set up again.
    plain = bt.table_name()
    ensure_table(bt.project, bt.instance, plain, FLIGHTS, 600, 86_400)
    with pytest.raises(BigtableSetupError, match="no column family 'flights_tables_ref'"):
        check_reference_families(bt.project, bt.instance, plain, FS)
    added = ensure_table(bt.project, bt.instance, plain, FS, 600, 86_400)
    assert all(f["created"] for f in added["reference_families"].values())
    check_reference_families(bt.project, bt.instance, plain, FS)


@pytest.mark.timeout(120)
def test_planes_are_published_once_per_key_and_a_rerun_changes_nothing(
    bigtable_emulator, table_id, tmp_path
):
    bt = bigtable_emulator
    _, lines = csv_lines(PLANES.resolve_default_input())
    summary = publish(bt, table_id, "plane", tmp_path / "dead")
    assert summary["rows_read"] == summary["rows_valid"] == summary["rows_written"] == len(lines)
    assert summary["rows_dead_lettered"] == 0 and summary["family"] == "flights_tables_static"
    assert dead_letters(tmp_path / "dead") == []

    got = published(bt, table_id, "flights_tables_static", "plane#")
    expected = {}
    for line in lines:
        key, stamp, values = typed_plane(line)
        expected[key] = {stamp: values}
    assert got == expected  # one version, at timestamp 0, every field (nulls as null)
    assert sum(v is None for versions in got.values() for v in versions[0].values()) > 0

    before = dump(bt, table_id)
    again = publish(bt, table_id, "plane", tmp_path / "dead2")
    assert again["rows_written"] == len(lines)
    assert dump(bt, table_id) == before


@pytest.mark.timeout(150)
def test_a_month_of_weather_keeps_every_version_and_bad_rows_are_dead_letters(
    bigtable_emulator, table_id, weather_month, tmp_path
):
    bt = bigtable_emulator
    month = weather_month["rows"]
    dead_dir = tmp_path / "dead"
    summary = publish(bt, table_id, "origin_weather", dead_dir, f"--input={weather_month['path']}")
    assert summary["rows_read"] == len(month) + 3
    assert summary["rows_valid"] == len(month) + 1  # the duplicate is valid on its own
    assert summary["rows_rejected"] == 2 and summary["rows_duplicate"] == 1
    assert summary["rows_written"] == len(month) and summary["rows_write_failed"] == 0
    assert summary["rows_dead_lettered"] == 3

    got = published(bt, table_id, "flights_tables_ref", "origin_weather#")
    expected: dict[str, dict[int, dict]] = {}
    for line in month:
        key, stamp, values = typed_weather(line)
        expected.setdefault(key, {})[stamp] = values
    assert set(got) == set(expected) == {f"origin_weather#{o}" for o in ("EWR", "JFK", "LGA")}
    for key in expected:
        assert len(got[key]) == len(expected[key])  # every hour is a version of its own
    # 20 random rows: the cell at timestamp valid_from holds that row's values.
    for line in random.Random(12).sample(month, 20):
        key, stamp, values = typed_weather(line)
        assert got[key][stamp] == values, (key, stamp)
    assert got == expected  # and all of them (the duplicate kept the original row)

    letters = dead_letters(dead_dir)
    assert sorted(x["stage"] for x in letters) == ["reference", "validate", "validate"]
    # Every dead letter keeps its CSV line's text and number, the duplicate's too.
    by_record = {(x["record"].split(",")[0], x["stage"]): x for x in letters}
    assert all(isinstance(x["record"], str) and x["line"] > 1 for x in letters)
    out_of_range, duplicate, no_key = weather_month["bad"]
    humid = by_record[(out_of_range["origin"], "validate")]
    assert "humid" in humid["reason"] and "150" in humid["reason"]
    missing = next(x for x in letters if x["stage"] == "validate" and x is not humid)
    assert "origin" in missing["reason"]
    dup = by_record[(duplicate["origin"], "reference")]
    assert dup["reason"].startswith(f"duplicate row for origin={duplicate['origin']!r} valid from")
    assert ",99.5," in dup["record"] and dup["line"] == len(month) + 3  # its own CSV line
    assert {x["feature_set"] for x in letters} == {"reference:origin_weather"}

    before = dump(bt, table_id)
    again = publish(
        bt, table_id, "origin_weather", tmp_path / "dead2", f"--input={weather_month['path']}"
    )
    assert again["rows_written"] == len(month)
    after = dump(bt, table_id)
    assert after == before
    for row in after.values():
        for columns in row.values():
            for cells in columns.values():
                stamps = [t for t, _ in cells]
                assert len(stamps) == len(set(stamps))  # one version per timestamp


@pytest.mark.timeout(60)
def test_a_missing_table_family_or_reference_table_is_an_error_before_the_run(
    bigtable_emulator, tmp_path
):
    bt = bigtable_emulator
    with pytest.raises(
        SystemExit, match="'nope' is not a reference table of feature set 'flights_tables'"
    ):
        publish(bt, "any", "nope", tmp_path / "dead")
    with pytest.raises(SystemExit, match="does not exist.*skewless bigtable-setup"):
        publish(bt, bt.table_name("missing"), "plane", tmp_path / "dead")
    plain = bt.table_name()
    ensure_table(bt.project, bt.instance, plain, FLIGHTS, 600, 86_400)
    with pytest.raises(
        SystemExit, match="no column family 'flights_tables_static'.*bigtable-setup"
    ):
        publish(bt, plain, "plane", tmp_path / "dead")
    with pytest.raises(SystemExit, match="missing required option.*--dead_letter_dir"):
        publish_reference.run(
            ["--table=plane", "--bigtable_project=p", "--bigtable_instance=i", "--bigtable_table=t"]
        )
    assert not (tmp_path / "dead").exists()


@pytest.mark.timeout(60)
def test_rows_that_cannot_be_written_are_dead_letters_with_stage_write(bigtable_emulator):
    """The family vanished after the check: every row is rejected, none is lost silently."""
    bt = bigtable_emulator
    plain = bt.table_name()
    ensure_table(bt.project, bt.instance, plain, FLIGHTS, 600, 86_400)
    rows = [
        {"tailnum": "N1", "year": 2004, "type": "t", "manufacturer": None, "model": "m",
         "engines": 2, "seats": 55, "speed": None, "engine": "e", "valid_from": 0},
    ]  # fmt: skip
    with beam.Pipeline("FnApiRunner") as p:
        letters = (
            p
            | beam.Create(rows)
            | WriteReferenceRows(bt.project, bt.instance, plain, FS, PLANES, retry_s=1.0)
        )
        assert_that(letters, _one_write_letter)


def _one_write_letter(letters: list) -> None:
    (letter,) = letters
    assert letter["stage"] == "write" and letter["reason"].startswith("Bigtable write failed")
    assert letter["feature_set"] == "reference:plane"
    assert letter["record"]["row_key"] == "plane#N1"
    assert letter["record"]["row"]["seats"] == 55
