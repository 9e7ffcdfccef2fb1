"""Reference features batch == stream: flights_plus (weather at the origin as of the departure
with D_ref = 1 h, the aircraft, the destination airport) scored by the streaming scorer, which
reads the rows publish-reference wrote to the Bigtable emulator, equals batch scoring; a wrong
D_ref at serving time gives other predictions."""

from __future__ import annotations

import csv
import json
import time
from dataclasses import replace

import apache_beam as beam
import numpy as np
import pyarrow.parquet as pq
import pytest
from apache_beam.io.gcp.pubsub import PubsubMessage
from apache_beam.testing.test_stream import TestStream

from beam_pipelines import (
    aggregate,
    bigtable_setup,
    prepare,
    publish_reference,
    score,
    score_stream,
)
from beam_pipelines.common import metric_counters
from beam_pipelines.io.bigtable import WriteCells, open_table
from beam_pipelines.io.online_store import OnlineLookup
from beam_pipelines.replay import ReplayStats, order_events, to_message
from models import train
from models.handler import SkewlessModelHandler, predict, rows_to_feed
from tests.aggregate_support import streaming_options, typed_events
from tests.flights_data import real_flights, write_csv
from transforms.flights import FLIGHTS_PLUS, WEATHER_AT_ORIGIN
from transforms.validation import ms_to_datetime, to_epoch_ms

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
    with open(WEATHER_AT_ORIGIN.resolve_default_input(), newline="") as src:
        reader = csv.DictReader(src)
        rows = [r for r in reader if "2013-02-09" <= r["time_hour"][:10] <= "2013-02-14"]
    with open(weather_path, "w", newline="") as out:
        writer = csv.DictWriter(out, fieldnames=reader.fieldnames)
        writer.writeheader()
        writer.writerows(rows)
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

    events = order_events(FLIGHTS_PLUS, raws, ReplayStats())
    stream = (
        TestStream()
        .advance_watermark_to(events[0][0] / 1000.0 - 1)
        .add_elements(
            [PubsubMessage(to_message(FLIGHTS_PLUS, r), {"event_time": str(t)}) for t, r in events]
        )
        .advance_watermark_to_infinity()
    )
    p = beam.Pipeline(options=streaming_options())
    aggregate.build_pipeline(
        p,
        FLIGHTS_PLUS,
        stream,
        WriteCells(bt.project, bt.instance, table_id, FLIGHTS_PLUS.name),
        beam.Map(print),
    )
    p.run().wait_until_finish()

    inp, out, dead = ps.topic("events"), ps.topic("predictions"), ps.topic("dead")
    inp_sub, out_sub = ps.subscription(inp, "scorer"), ps.subscription(out, "reader")
    pipeline, info = score_stream.make_pipeline(
        ["--streaming", f"--subscription={inp_sub}", f"--output_topic={out}", f"--dead_letter_topic={dead}",
         *connection, f"--model_dir={tmp_path / 'm'}", f"--project={ps.project}"]
    )  # fmt: skip
    assert info["feature_set"] == "flights_plus"
    start = to_epoch_ms(SCORE_START)
    to_score = [r for t, r in events if t >= start]
    result = pipeline.run()
    try:
        publisher = ps.publisher()
        for future in [publisher.publish(inp, to_message(FLIGHTS_PLUS, r)) for r in to_score]:
            future.result(timeout=30)
        streamed: list = []
        deadline = time.monotonic() + 240
        while len(streamed) < len(to_score) and time.monotonic() < deadline:
            streamed += [json.loads(m.data) for m in ps.pull_all(out_sub, expect=1, timeout_s=5)]
    finally:
        result.cancel()
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
    counters = metric_counters(result)
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
