"""Streaming predictions to BigQuery (`score --streaming --output_table`) on the Pub/Sub, Bigtable
and BigQuery emulators: one row per scored event with the batch scorer's columns plus `source`,
the same probabilities as the Pub/Sub output and as batch scoring to BigQuery, rows BigQuery
refuses as dead letters with its reason, and the start-up checks as one-line errors.

The BigQuery emulator (bqemulator 1.4.0) implements streaming inserts with skipInvalidRows
(per-row insertErrors when a value does not convert to its column's type) and ignores
insertIds, so de-duplication is not tested here. Refused rows are provoked the way they happen
in production: the table is replaced, while the job runs, by one whose columns do not take them.
"""

from __future__ import annotations

import json
import time

import numpy as np
import pytest

from skewless.beam_pipelines.commands.bigtable_setup import ensure_table
from skewless.beam_pipelines.jobs import score, score_streaming
from skewless.beam_pipelines.runtime.parsing import metric_counters
from skewless.examples.flights import FLIGHTS
from tests.jobs.test_score_streaming import (
    KEY,
    RETENTION_S,
    SCORE_END,
    SCORE_START,
    _publish,
    _slice,
    _to_score,
    _topics,
    _wait_for,
)
from tests.support.flights_data import write_jsonl
from tests.support.streaming_jobs import wait_for, write_cells_with_the_aggregate_job

COLUMNS = [*KEY, "event_time", "probability", "model_version", "source"]


def _rows(bq, table: str) -> list[dict]:
    """The table's rows as dicts, timestamps as the ISO-8601 text of the Pub/Sub predictions."""
    with bq.client() as client:
        rows = [dict(r.items()) for r in client.list_rows(table, timeout=60)]
    for row in rows:
        for name in ("scheduled_departure", "event_time"):
            if hasattr(row.get(name), "isoformat"):
                row[name] = row[name].isoformat()
    return rows


def _schema(bq, table: str) -> list[tuple[str, str, str]]:
    with bq.client() as client:
        fields = client.get_table(table, timeout=60).schema
    standard = {"INTEGER": "INT64", "FLOAT": "FLOAT64"}
    return [(f.name, standard.get(f.field_type, f.field_type), f.mode) for f in fields]


def _key(prediction: dict) -> tuple:
    return tuple(str(prediction[k]) for k in KEY)


def _args(ps, bt, table_id: str, model_dir, topics: dict, bq, output_table: str, *extra) -> list[str]:
    return [
        "--streaming",
        f"--subscription={topics['input_sub']}",
        f"--dead_letter_topic={topics['dead']}",
        f"--bigtable_project={bt.project}",
        f"--bigtable_instance={bt.instance}",
        f"--bigtable_table={table_id}",
        f"--model_dir={model_dir}",
        f"--project={ps.project}",
        f"--output_table={output_table}",
        f"--bigquery_endpoint={bq.rest_endpoint}",
        *extra,
    ]


@pytest.fixture(scope="module")
def bigtable_cells(trained, bigtable_emulator):
    """A Bigtable table with the aggregate job's cells of the flights both scorers see."""
    bt = bigtable_emulator
    table_id = bt.table_name()
    ensure_table(bt.project, bt.instance, table_id, FLIGHTS, 600, RETENTION_S)
    assert write_cells_with_the_aggregate_job(bt, table_id, FLIGHTS, _slice(trained))["cells_written"] > 0
    return table_id


@pytest.fixture(scope="module")
def to_both(trained, pubsub_emulator, bigtable_emulator, bq_emulator, bigtable_cells, tmp_path_factory):
    """Batch scoring to one BigQuery table; streaming scoring of the same flights to a topic and
    to another table (created by the job)."""
    ps, bt, bq = pubsub_emulator, bigtable_emulator, bq_emulator
    root = tmp_path_factory.mktemp("score_streaming_bigquery")
    dataset = bq.create_dataset()
    batch_table = f"{bq.project}.{dataset}.batch"
    stream_table = f"{bq.project}:{dataset}.streamed"  # the legacy form works too
    raws = _slice(trained)
    to_score = _to_score(raws)
    summary = score.run(
        [
            "--model_dir", str(trained["model_dir"]),
            "--input", str(write_jsonl(root / "flights.jsonl", raws)),
            "--start", SCORE_START,
            "--end", SCORE_END,
            "--output_table", batch_table,
            "--bigquery_endpoint", bq.rest_endpoint,
            "--dead_letter_dir", str(root / "dead"),
        ]
    )  # fmt: skip
    topics = _topics(ps)
    argv = _args(ps, bt, bigtable_cells, trained["model_dir"], topics, bq, stream_table,
                 f"--output_topic={topics['output']}")  # fmt: skip
    p, info = score_streaming.make_pipeline(argv)
    result = p.run()
    table = stream_table.replace(":", ".")
    try:
        _publish(ps.publisher(), topics["input"], [r for _, r in to_score])
        streamed = _wait_for(ps.pull_all, topics["output_sub"], lambda got: len(got) >= len(to_score), 120)
        wait_for(lambda: len(_rows(bq, table)) >= len(to_score), 60)
        time.sleep(2)  # anything extra (duplicates) would arrive now
        rows = _rows(bq, table)
        dead = ps.pull_all(topics["dead_sub"], expect=1, timeout_s=2)
    finally:
        result.cancel()
    return {
        "summary": summary, "batch": _rows(bq, batch_table), "streamed": streamed, "rows": rows,
        "dead": dead, "to_score": to_score, "info": info, "counters": metric_counters(result),
        "schemas": (_schema(bq, batch_table), _schema(bq, table)),
    }  # fmt: skip


@pytest.mark.slow
@pytest.mark.emulator
@pytest.mark.timeout(400)
def test_every_streamed_prediction_is_one_row_with_the_batch_columns_plus_source(to_both):
    rows, streamed, to_score = to_both["rows"], to_both["streamed"], to_both["to_score"]
    assert len(to_score) > 100
    assert len(streamed) == len(rows) == len(to_score)
    by_key = {_key(r): r for r in rows}
    assert len(by_key) == len(rows), "one row per flight"
    assert set(by_key) == {_key(s) for s in streamed}
    batch_schema, stream_schema = to_both["schemas"]
    assert stream_schema == [*batch_schema, ("source", "STRING", "REQUIRED")]
    assert [name for name, _, _ in stream_schema] == COLUMNS
    for s in streamed:
        row = by_key[_key(s)]
        assert row["source"] == "model"
        assert {k: row[k] for k in s} == s, "the row is the Pub/Sub prediction, plus source"
    assert {r["model_version"] for r in rows} == {to_both["info"]["model_version"]}
    assert to_both["info"]["output_table"] and not to_both["dead"]
    counters = to_both["counters"]
    assert counters["rows_written"] == len(rows) and counters.get("rows_write_failed", 0) == 0
    assert counters["cells_found"] > 0  # real aggregates, not only empty windows


@pytest.mark.slow
@pytest.mark.emulator
@pytest.mark.timeout(400)
def test_streamed_rows_agree_with_batch_scoring_to_bigquery(to_both):
    batch = {_key(b): b for b in to_both["batch"]}
    rows = {_key(r): r for r in to_both["rows"]}
    assert len(batch) == to_both["summary"]["examples_scored"] == len(rows)
    assert set(batch) == set(rows)
    keys = sorted(batch)
    assert [rows[k]["event_time"] for k in keys] == [batch[k]["event_time"] for k in keys]
    np.testing.assert_allclose(
        [rows[k]["probability"] for k in keys], [batch[k]["probability"] for k in keys], rtol=0, atol=1e-6
    )


@pytest.mark.slow
@pytest.mark.emulator
@pytest.mark.timeout(400)
def test_output_table_alone_and_rows_bigquery_refuses_become_dead_letters(
    trained, pubsub_emulator, bigtable_emulator, bq_emulator, bigtable_cells
):
    """Without --output_topic the rows land; then the table is replaced (while the job runs) by
    one whose `origin` is INT64: BigQuery refuses every later row, each becomes a dead letter
    with BigQuery's reason and the row itself, and nothing else is lost."""
    from google.cloud import bigquery

    ps, bt, bq = pubsub_emulator, bigtable_emulator, bq_emulator
    table = f"{bq.project}.{bq.create_dataset()}.predictions"
    flights = [r for _, r in _to_score(_slice(trained))]
    first, second = flights[:30], flights[30:50]
    topics = _topics(ps)
    p, info = score_streaming.make_pipeline(_args(ps, bt, bigtable_cells, trained["model_dir"], topics, bq, table))
    assert info["output_topic"] is None
    with bq.client() as client:  # created at start, before any row
        assert [f.name for f in client.get_table(table, timeout=60).schema] == COLUMNS
    result = p.run()
    try:
        _publish(ps.publisher(), topics["input"], first)
        assert wait_for(lambda: len(_rows(bq, table)) >= len(first), 120), "the first rows land"
        written = _rows(bq, table)
        with bq.client() as client:
            client.delete_table(table, timeout=60)
            unfit = [bigquery.SchemaField("origin", "INT64"), bigquery.SchemaField("flight", "INT64")]
            client.create_table(bigquery.Table(table, schema=unfit), timeout=60)
        _publish(ps.publisher(), topics["input"], second)
        dead = ps.pull_all(topics["dead_sub"], expect=len(second), timeout_s=120)
        time.sleep(1)
        dead += ps.pull_all(topics["dead_sub"], expect=1, timeout_s=2)
        after = _rows(bq, table)
    finally:
        result.cancel()
    counters = metric_counters(result)
    assert len(written) == len(first) and {r["source"] for r in written} == {"model"}
    assert after == []
    assert len(dead) == len(second)
    refused = [json.loads(m.data) for m in dead]
    assert sorted(map(_key, refused)) == sorted(map(_key, _predicted_keys(second)))
    assert all(sorted(r) == sorted(COLUMNS) and r["source"] == "model" for r in refused)
    for m in dead:
        assert m.attributes["stage"] == "write"
        assert m.attributes["feature_set"] == "flights"
        # The emulator's wording of BigQuery's per-row insertErrors entry.
        assert m.attributes["reason"].startswith("BigQuery refused the row: invalid"), m.attributes
        assert "Cannot convert value to integer" in m.attributes["reason"], m.attributes
    assert counters["rows_written"] == len(first)
    assert counters["rows_write_failed"] == len(second)
    assert counters["messages_dead_lettered"] == len(second)


def _predicted_keys(raws: list[dict]) -> list[dict]:
    """The example key of each raw flight, as a prediction carries it."""
    from skewless.transforms.record_checks import RecordChecker, ms_to_datetime

    out = []
    for raw in raws:
        event = RecordChecker(FLIGHTS).validate(dict(raw))
        out.append(
            {**{k: event[k] for k in KEY}, "scheduled_departure": ms_to_datetime(event["scheduled_departure"]).isoformat()}
        )
    return out


@pytest.mark.emulator
@pytest.mark.timeout(180)
def test_an_existing_table_that_does_not_fit_is_a_one_line_error_at_start(
    trained, bigtable_emulator, bq_emulator, bigtable_cells
):
    from google.cloud import bigquery

    bt, bq = bigtable_emulator, bq_emulator
    dataset = bq.create_dataset()
    base = [
        "--streaming",
        "--subscription=projects/demo-project/subscriptions/s",
        f"--bigtable_project={bt.project}",
        f"--bigtable_instance={bt.instance}",
        f"--bigtable_table={bigtable_cells}",
        f"--model_dir={trained['model_dir']}",
        f"--bigquery_endpoint={bq.rest_endpoint}",
    ]
    fields = score_streaming.prediction_row_fields(FLIGHTS)
    unfit, fits = f"{bq.project}.{dataset}.unfit", f"{bq.project}.{dataset}.fits"
    with bq.client() as client:
        changed = [bigquery.SchemaField("probability", "STRING") if f.name == "probability" else f for f in fields]
        client.create_table(bigquery.Table(unfit, schema=changed[:-1]), timeout=60)
        # An extra NULLABLE column, and NULLABLE columns where ours are REQUIRED, take the rows.
        relaxed = [bigquery.SchemaField(f.name, f.field_type) for f in fields]
        client.create_table(bigquery.Table(fits, schema=[*relaxed, bigquery.SchemaField("note", "STRING")]), timeout=60)
    with pytest.raises(SystemExit) as exc:
        score_streaming.make_pipeline([*base, f"--output_table={unfit}"])
    message = str(exc.value)
    assert "\n" not in message and message.startswith(f"skewless score --streaming: BigQuery table {unfit} exists")
    assert "probability is STRING, expected FLOAT64" in message and "no column source" in message
    _, info = score_streaming.make_pipeline([*base, f"--output_table={fits}"])
    assert info["output_table"] == fits and info["output_topic"] is None
    with pytest.raises(SystemExit, match="skewless score --streaming: BigQuery dataset .*no_such_dataset not found"):
        score_streaming.make_pipeline([*base, f"--output_table={bq.project}.no_such_dataset.t"])
    with pytest.raises(SystemExit, match="must look like project.dataset.table"):
        score_streaming.make_pipeline([*base, "--output_table=not-a-table", "--skip_table_check"])


@pytest.mark.timeout(120)
def test_neither_output_is_a_one_line_usage_error_and_batch_only_flags_still_are():
    base = [
        "--streaming",
        "--subscription=projects/demo-project/subscriptions/s",
        "--bigtable_project=demo-project",
        "--bigtable_instance=i",
        "--bigtable_table=t",
        "--model_dir=/nonexistent/models",
    ]
    with pytest.raises(SystemExit) as exc:
        score_streaming.make_pipeline(base)
    assert str(exc.value) == (
        "skewless score --streaming: give --output_topic, --output_table or both: where the predictions go"
    )
    with pytest.raises(SystemExit, match=r"batch-only option\(s\) --output_method: .*--output_table"):
        score_streaming.make_pipeline([*base, "--output_table=demo-project.d.t", "--output_method=load"])
