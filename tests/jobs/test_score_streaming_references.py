"""Reference features batch == stream: flights_plus (weather at the origin as of the departure
with D_ref = 1 h, the aircraft, the destination airport) scored by the streaming scorer, which
reads the rows publish-reference wrote to the Bigtable emulator, equals batch scoring; a wrong
D_ref at serving time gives other predictions."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pyarrow.parquet as pq
import pytest

from skewless.beam_pipelines.commands import bigtable_setup, train
from skewless.beam_pipelines.commands.replay import ReplayStats, order_events
from skewless.beam_pipelines.io.bigtable import open_table
from skewless.beam_pipelines.io.online_store import OnlineLookup
from skewless.beam_pipelines.jobs import prepare, publish_reference, score
from skewless.examples.flights import FLIGHTS_PLUS, WEATHER_AT_ORIGIN
from skewless.models.handler import SkewlessModelHandler, predict, rows_to_feed
from skewless.transforms.record_checks import ms_to_datetime, to_epoch_ms
from tests.support.flights_data import real_flights, write_csv, write_weather_slice
from tests.support.pipelines import typed_events
from tests.support.streaming_jobs import score_streaming, write_cells_with_the_aggregate_job

SCORE_START = "2013-02-13T00:00:00Z"
RETENTION_S = 20 * 365 * 86_400


def _key(p: dict) -> tuple:
    return (p["carrier"], str(p["flight"]), p["origin"], to_epoch_ms(p["scheduled_departure"]))


@pytest.mark.slow
@pytest.mark.emulator
@pytest.mark.timeout(900)
def test_streaming_scoring_with_reference_rows_equals_batch(
    tmp_path, pubsub_emulator, bigtable_emulator
):
    ps, bt = pubsub_emulator, bigtable_emulator
    raws = real_flights(month=2, day=10, days=4)
    flights_path = write_csv(tmp_path / "flights.csv", raws)
    weather_path = tmp_path / "weather.csv"
    write_weather_slice(weather_path, "2013-02-09", "2013-02-14")
    reference = ["--reference", f"origin_weather={weather_path}"]

    prepare.run(
        ["--feature_set", "flights_plus", "--input", str(flights_path), *reference,
         "--output_dir", str(tmp_path / "prepared"), "--eval_start", SCORE_START]
    )  # fmt: skip
    train.run(
        [
            "--prepared_dir",
            str(tmp_path / "prepared"),
            "--model_dir",
            str(tmp_path / "m"),
            "--epochs",
            "2",
        ]
    )
    score.run(
        ["--model_dir", str(tmp_path / "m"), "--input", str(flights_path), *reference,
         "--output", str(tmp_path / "scores"), "--start", SCORE_START]
    )  # fmt: skip
    batch = pq.read_table(tmp_path / "scores" / "predictions").to_pylist()
    assert len(batch) > 500

    table_id = bt.table_name()
    connection = [
        f"--bigtable_project={bt.project}",
        f"--bigtable_instance={bt.instance}",
        f"--bigtable_table={table_id}",
    ]
    bigtable_setup.run(
        ["--feature_set", "flights_plus", *connection, f"--retention_s={RETENTION_S}"]
    )
    for name, extra in (
        ("origin_weather", [f"--input={weather_path}"]),
        ("plane", []),
        ("dest_airport", []),
    ):
        summary = publish_reference.run(
            ["--feature_set=flights_plus", f"--table={name}", *connection,
             f"--dead_letter_dir={tmp_path / ('dead_' + name)}", *extra]
        )  # fmt: skip
        assert summary["rows_written"] > 0 and summary["rows_dead_lettered"] == 0

    write_cells_with_the_aggregate_job(bt, table_id, FLIGHTS_PLUS, raws)
    start = to_epoch_ms(SCORE_START)
    to_score = [r for t, r in order_events(FLIGHTS_PLUS, raws, ReplayStats()) if t >= start]
    streamed, counters, info = score_streaming(
        ps, bt, table_id, tmp_path / "m", FLIGHTS_PLUS, to_score, 240
    )
    assert info["feature_set"] == "flights_plus"
    by_key = {_key(s): s for s in streamed}
    assert len(by_key) == len(streamed) == len(batch)
    expected = {
        _key({**b, "scheduled_departure": b["scheduled_departure"].isoformat()}): b for b in batch
    }
    assert set(by_key) == set(expected)
    np.testing.assert_allclose(
        [by_key[k]["probability"] for k in expected],
        [b["probability"] for b in expected.values()],
        rtol=0,
        atol=1e-6,
    )
    assert counters["reference_reads"] > 0 and counters["cells_found"] > 0

    # The same events through the serving lookup with D_ref = 0 for the weather (an observation
    # used during its own hour): other features, other predictions.
    wrong = replace(
        FLIGHTS_PLUS,
        references=(
            replace(WEATHER_AT_ORIGIN, availability_delay_s=0),
            *FLIGHTS_PLUS.references[1:],
        ),
    )
    typed = typed_events(FLIGHTS_PLUS, to_score)
    handler = SkewlessModelHandler(str(tmp_path / "m"))
    table = open_table(bt.project, bt.instance, table_id)
    served = predict(
        handler.load_model(),
        rows_to_feed(OnlineLookup(wrong, table).examples(typed), handler.inputs),
    )
    right = predict(
        handler.load_model(),
        rows_to_feed(OnlineLookup(FLIGHTS_PLUS, table).examples(typed), handler.inputs),
    )
    keys = [(e["carrier"], str(e["flight"]), e["origin"], e["scheduled_departure"]) for e in typed]
    np.testing.assert_allclose(right, [expected[k]["probability"] for k in keys], rtol=0, atol=1e-6)
    assert np.max(np.abs(np.asarray(served) - np.asarray(right))) > 1e-4
    assert ms_to_datetime(start).year == 2013
