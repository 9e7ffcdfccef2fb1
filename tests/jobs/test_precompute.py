"""skewless precompute on real flights and the Bigtable emulator: the schedule model's most
frequent keys, scored once, written with the version's marker last; exact (every entry is the
model's prediction for its key), refused for a model that reads outside the key, idempotent,
and kept by the family's declared GC rule."""

from __future__ import annotations

import collections
import json

import pyarrow as pa
import pytest

from skewless.beam_pipelines.commands import bigtable_setup
from skewless.beam_pipelines.io.bigtable import gc_max_age_s, open_table
from skewless.beam_pipelines.io.prediction_cache import read_marker, version_timestamp_ms
from skewless.beam_pipelines.jobs import precompute
from skewless.examples.flights_schedule import FLIGHTS_SCHEDULE
from skewless.models.handler import SkewlessModelHandler, arrow_to_feed, predict
from skewless.transforms.example_schema import features_arrow_schema
from skewless.transforms.prediction_cache import cache_family, key_hash, key_text
from tests.support.flights_data import write_csv
from tests.support.pipelines import typed_events
from tests.support.schedule import NOVEMBER_WEEK, requests_of

pytestmark = [pytest.mark.emulator, pytest.mark.timeout(600)]
FS = FLIGHTS_SCHEDULE
BAD_LINE = "2013,11,1,,,,,,,,,,,,,,,,"  # a record without its required fields: a dead letter


@pytest.fixture(scope="module")
def model(schedule_trained) -> dict:
    return schedule_trained


def _table(bt) -> list[str]:
    table_id = bt.table_name()
    flags = [f"--bigtable_project={bt.project}", f"--bigtable_instance={bt.instance}",
             f"--bigtable_table={table_id}"]  # fmt: skip
    bigtable_setup.run(["--feature_set=flights_schedule", *flags])
    return flags


def _all_cells(bt, flags) -> dict:
    table = open_table(bt.project, bt.instance, flags[2].split("=", 1)[1])
    out = {}
    for row in table.read_rows():
        for family, columns in row.cells.items():
            for column, cells in columns.items():
                out[(row.row_key, family, column)] = [(c.value, c.timestamp) for c in cells]
    return out


def test_precompute_writes_the_most_frequent_keys_with_the_models_predictions(
    model, bigtable_emulator, tmp_path
):
    bt = bigtable_emulator
    flags = _table(bt)
    rows = requests_of(NOVEMBER_WEEK)
    source = write_csv(tmp_path / "week.csv", rows, extra_lines=[BAD_LINE])
    args = ["--model_dir", str(model["model_dir"]), "--input", str(source), "--top_n", "300", *flags]
    summary = precompute.run([*args, "--output_dir", str(tmp_path / "first")])

    # The keys, their counts and the coverage, by brute force over the same requests.
    requests = typed_events(FS, rows)
    counts = collections.Counter(key_text(FS, r) for r in requests)
    ranked = sorted(counts.items(), key=lambda kv: (kv[1], kv[0]), reverse=True)[:300]
    assert summary["requests"] == len(requests) == sum(counts.values())
    assert summary["requests_covered"] == sum(n for _, n in ranked)
    assert summary["coverage"] == pytest.approx(summary["requests_covered"] / len(requests), abs=1e-6)
    counters = summary["counters"]
    assert counters["keys_considered"] == len(counts)
    assert counters["prediction_cache_entries_written"] == 300
    assert counters["records_rejected"] == 1
    assert counters["key_hash_collisions"] == 0
    dead = (tmp_path / "first" / "dead_letters").glob("part*")
    assert sum(1 for path in dead for _ in open(path)) == 1

    # Every entry is what the model returns for a request with its key: one request of each
    # key, scored now through the serving signature.
    cells = _all_cells(bt, flags)
    family = cache_family(FS)
    stored = {
        cells[key][0][0].decode(): float(cells[(key[0], family, b"probability")][0][0])
        for key in cells if key[1] == family and key[2] == b"key"
    }
    assert set(stored) == {text for text, _ in ranked}
    handler = SkewlessModelHandler(str(model["model_dir"]))
    first = {}
    for request in requests:
        first.setdefault(key_text(FS, request), request)
    examples = pa.Table.from_pylist(
        [first[text] for text in stored], schema=features_arrow_schema(FS).remove(
            features_arrow_schema(FS).get_field_index(FS.label))
    )
    expected = predict(handler.load_model(), arrow_to_feed(examples.combine_chunks(), handler.inputs))
    for text, probability in zip(stored, expected, strict=True):
        assert stored[text] == float(probability), text

    table = open_table(bt.project, bt.instance, flags[2].split("=", 1)[1])
    marker = read_marker(table, FS, 1)
    assert marker["requests_covered"] == summary["requests_covered"]
    stamp = version_timestamp_ms(json.loads((model["model_dir"] / "1" / "model.json").read_text())["created_at"])
    assert {c[0][1].timestamp() * 1000 for c in cells.values()} == {stamp}

    # A second run writes the same table: same cells, same timestamps, nothing more.
    again = precompute.run([*args, "--output_dir", str(tmp_path / "second")])
    assert again["requests_covered"] == summary["requests_covered"]
    assert _all_cells(bt, flags) == cells

    # The family's GC rule is the declared retention.
    admin = open_table(bt.project, bt.instance, flags[2].split("=", 1)[1], admin=True)
    rule = admin.list_column_families()[family].gc_rule
    assert gc_max_age_s(rule) == FS.prediction_cache.retention


def test_a_model_that_reads_outside_the_key_is_refused_naming_the_inputs(trained, tmp_path, capsys):
    with pytest.raises(SystemExit) as refused:
        precompute.run(
            ["--model_dir", str(trained["model_dir"]),
             "--feature_set", "tests.support.cache_feature_sets:FLIGHTS_KEYED",
             "--output_dir", str(tmp_path / "out"), "--bigtable_project=p",
             "--bigtable_instance=i", "--bigtable_table=t", "--skip_table_check"]
        )  # fmt: skip
    message = str(refused.value)
    assert message.startswith("skewless precompute: model version 1 reads ")
    assert "\n" not in message
    for name in ("dep_delay", "distance", "origin_mean_dep_delay_1h", "hour"):
        assert name in message
    assert "(carrier, origin, dest)" in message
    assert not (tmp_path / "out").exists()


def test_keys_that_share_a_hash_keep_the_most_frequent_and_dead_letter_the_others(
    model, bigtable_emulator, tmp_path
):
    """One hexadecimal character of hash: 16 rows for every key of the week; each row keeps the
    key asked most often, and every other key is a dead letter naming the one it lost to."""
    bt = bigtable_emulator
    flags = _table(bt)
    rows = requests_of(NOVEMBER_WEEK)
    source = write_csv(tmp_path / "week.csv", rows)
    summary = precompute.run(
        ["--model_dir", str(model["model_dir"]), "--input", str(source), "--top_n", "0",
         "--feature_set", "tests.support.cache_feature_sets:SCHEDULE_ONE_HEX",
         "--output_dir", str(tmp_path / "out"), *flags]
    )  # fmt: skip
    counts = collections.Counter(key_text(FS, r) for r in typed_events(FS, rows))
    by_hash: dict[str, list] = {}
    for text, n in counts.items():
        by_hash.setdefault(key_hash(text, 1), []).append((n, text))
    winners = {max(keys) for keys in by_hash.values()}
    counters = summary["counters"]
    assert counters["prediction_cache_entries_written"] == len(by_hash) == 16
    assert counters["key_hash_collisions"] == len(counts) - 16
    assert summary["requests_covered"] == sum(n for n, _ in winners)
    cells = _all_cells(bt, flags)
    stored = {v[0][0].decode() for (k, f, c), v in cells.items() if c == b"key"}
    assert stored == {text for _, text in winners}
    letters = [json.loads(line) for path in (tmp_path / "out" / "dead_letters").glob("part*")
               for line in open(path)]  # fmt: skip
    assert len(letters) == len(counts) - 16
    assert all(letter["stage"] == "key" and "collides with the more frequent key" in letter["reason"]
               for letter in letters)  # fmt: skip
