"""`skewless cells`, the look at what a replay wrote: the column family follows `--feature_set`, and
`--limit 0` prints every cell."""

from __future__ import annotations

import json

import pytest

from skewless.beam_pipelines.commands import cells
from skewless.beam_pipelines.commands.bigtable_setup import ensure_table
from skewless.beam_pipelines.io.bigtable import cell_row, open_table
from skewless.examples.weather import WEATHER
from skewless.transforms.partials import CellKey

WEATHER_SPEC = "skewless.examples.weather:WEATHER"
DAY_MS = 86_400_000


def test_the_family_is_the_feature_sets_name_unless_given(monkeypatch):
    calls = []
    monkeypatch.setattr(cells, "read", lambda *args: calls.append(args) or [])
    base = ["--bigtable_project=p", "--bigtable_instance=i", "--bigtable_table=t"]
    cells.run(base)
    cells.run([*base, f"--feature_set={WEATHER_SPEC}"])
    cells.run([*base, f"--feature_set={WEATHER_SPEC}", "--family=other", "--limit=0"])
    assert [(family, limit) for _, _, _, family, _, limit in calls] == [
        ("flights", cells.DEFAULT_LIMIT),
        ("weather", cells.DEFAULT_LIMIT),
        ("other", 0),
    ]


def test_help_says_that_limit_0_prints_every_cell(capsys):
    with pytest.raises(SystemExit) as exit_info:
        cells.run(["--help"])
    assert exit_info.value.code == 0
    help_text = " ".join(capsys.readouterr().out.split())
    assert "0: all of them" in help_text
    assert "Default: the feature set's name (--feature_set)" in help_text


@pytest.mark.emulator
@pytest.mark.timeout(120)
def test_limit_0_prints_every_cell_of_the_feature_sets_family_newest_first(
    bigtable_emulator, capsys
):
    bt = bigtable_emulator
    table_id = bt.table_name()
    ensure_table(bt.project, bt.instance, table_id, WEATHER, 600, 20 * 365 * 86_400)
    table = open_table(bt.project, bt.instance, table_id)
    ends = [1_357_000_000_000 // DAY_MS * DAY_MS + i * DAY_MS for i in range(25)]
    rows = [
        cell_row(table, WEATHER.name, CellKey("origin", "JFK", w), {"origin_count_1d": i})
        for i, w in enumerate(ends)
    ]
    assert [s.code for s in table.mutate_rows(rows)] == [0] * len(ends)
    args = [
        f"--bigtable_project={bt.project}", f"--bigtable_instance={bt.instance}",
        f"--bigtable_table={table_id}", f"--feature_set={WEATHER_SPEC}",
    ]  # fmt: skip

    everything = cells.run([*args, "--limit=0"])
    printed = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert printed == everything
    assert [c["window_end_ms"] for c in everything] == sorted(ends, reverse=True)
    assert everything[0]["values"] == {"origin_count_1d": 24}
    assert len(cells.run(args)) == cells.DEFAULT_LIMIT
