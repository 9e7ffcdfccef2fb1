"""The prepare job end to end on real flights: outputs, dead letters, splits, errors."""

import datetime as dt
import gzip
import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import tensorflow_transform as tft

from skewless.beam_pipelines.io.files import InputError
from skewless.beam_pipelines.jobs import prepare
from skewless.examples.flights import FLIGHTS
from skewless.transforms.example_schema import features_arrow_schema
from skewless.transforms.split import Split
from tests.support.flights_data import real_flights, write_csv, write_jsonl
from tests.support.outputs import read_tfrecords

BAD_LINES = {
    "2013,13,1,517,515,2,830,819,11,UA,1545,N14228,EWR,IAH,227,1400,5,15,2013-01-01T10:00:00Z": "'month' = 13 is above the maximum 12",
    "2013,1,1,517,515,abc,830,819,11,UA,1545,N14228,EWR,IAH,227,1400,5,15,2013-01-01T10:00:00Z": "'dep_delay' 'abc' is not a number",
    "2013,1,1,517,515,2,830,819,11,,1545,N14228,EWR,IAH,227,1400,5,15,2013-01-01T10:00:00Z": "'carrier'",
    "2013,1,1,517,515,2,830,819,11,UA,1545,N14228,EWR,IAH,227,1400,5,15,not-a-time": "'time_hour' 'not-a-time' is not an ISO-8601",
    "2013,1,1,517,515,2,830,819,11,UA,1545,N14228,EWR,IAH,227,1400,5,15,": "required field 'time_hour' is null",
    "2013,1,1,517,515,2,830": "expected 19 fields, got 7",
}  # fmt: skip


@pytest.fixture(scope="module")
def flights_csv(tmp_path_factory):
    rows = real_flights(1, 1, days=2)
    path = tmp_path_factory.mktemp("input") / "flights.csv"
    return write_csv(path, rows, list(BAD_LINES)), rows


@pytest.fixture(scope="module")
def prepared(flights_csv, tmp_path_factory):
    path, rows = flights_csv
    out = tmp_path_factory.mktemp("prepared")
    summary = prepare.run(["--input", str(path), "--output_dir", str(out), "--eval_fraction", "0.25"])
    return out, summary, rows


def test_summary_counts_add_up(prepared):
    out, summary, rows = prepared
    assert json.loads((out / "summary.json").read_text()) == summary
    assert summary["records_read"] == len(rows) + len(BAD_LINES)
    assert summary["records_rejected"] == len(BAD_LINES)
    cancelled = sum(1 for r in rows if r["dep_delay"] is None)
    assert summary["records_not_events"] == cancelled
    assert summary["records_valid"] == len(rows) - cancelled
    labelled = sum(1 for r in rows if r["dep_delay"] is not None and r["arr_delay"] is not None)
    assert summary["examples"] == labelled
    assert summary["examples_train"] + summary["examples_eval"] == labelled
    assert summary["split"] == {"mode": "hash", "eval_fraction": 0.25, "key": list(FLIGHTS.example_key)}
    # Real flights: one example per (carrier, flight, origin, scheduled departure).
    assert summary["duplicate_example_keys"] == summary["shared_example_keys"] == 0
    assert summary["duplicate_example_key_sample"] == []
    assert summary["duplicate_example_keys_refused"] is False


def test_every_bad_record_is_a_dead_letter_with_its_reason(prepared):
    out, _, _ = prepared
    letters = [json.loads(line) for f in (out / "dead_letters").glob("*.jsonl") for line in f.open()]
    assert len(letters) == len(BAD_LINES)
    for reason in BAD_LINES.values():
        assert any(reason in d["reason"] for d in letters), reason
    assert all(d["stage"] in ("parse", "validate") and d["feature_set"] == "flights" for d in letters)
    assert any(d["record"] == "2013,1,1,517,515,2,830" for d in letters)  # the original line


def test_features_parquet_has_one_row_per_example_with_the_contract_columns(prepared):
    out, summary, _ = prepared
    table = pq.read_table(out / "features")
    assert table.num_rows == summary["examples"]
    assert table.schema.names == features_arrow_schema(FLIGHTS).names
    assert table.schema.field("event_time").type == pa.timestamp("ms", tz="UTC")
    rows = table.to_pylist()
    for r in rows:
        assert r["event_time"] == r["scheduled_departure"] + dt.timedelta(minutes=r["dep_delay"])
        assert r["label"] in (0, 1)
    # The very first departures of the data see empty windows.
    first = min(rows, key=lambda r: r["event_time"])
    assert first["origin_departures_1h"] == 0 and first["origin_mean_dep_delay_1h"] == 0.0


def test_tfrecords_parse_with_the_transformed_spec_and_match_the_summary(prepared):
    out, summary, _ = prepared
    tft_output = tft.TFTransformOutput(str(out / "transform"))
    spec = tft_output.transformed_feature_spec()
    assert {"label", "dep_delay_z", "carrier_id", "origin_departures_1h_z", "day_of_week"} <= set(spec)
    train = read_tfrecords(out / "train", spec)
    evaluation = read_tfrecords(out / "eval", spec)
    assert len(train) == summary["examples_train"] > 0
    assert len(evaluation) == summary["examples_eval"] > 0
    assert {int(r["label"]) for r in train} == {0, 1}


def test_hashed_split_is_the_same_for_the_same_example(prepared):
    out, summary, _ = prepared
    features = pq.read_table(out / "features")
    split = Split.from_settings(FLIGHTS, None, 0.25)
    is_eval = split.is_eval(FLIGHTS, features.combine_chunks().to_batches()[0])
    assert sum(is_eval.to_pylist()) == summary["examples_eval"]


def test_vocabularies_are_analyzed_on_the_train_split_only(tmp_path, flights_csv):
    path, _ = flights_csv
    out = tmp_path / "out"
    summary = prepare.run(
        ["--input", str(path), "--output_dir", str(out), "--eval_start", "2013-01-02T12:00:00Z"]
    )
    assert summary["examples_eval"] > 0
    features = pq.read_table(out / "features").to_pylist()
    cut = dt.datetime(2013, 1, 2, 12, tzinfo=dt.UTC)
    train_dests = {r["dest"] for r in features if r["event_time"] < cut}
    vocab = tft.TFTransformOutput(str(out / "transform")).vocabulary_by_name("dest")
    assert {v.decode() for v in vocab} == train_dests


def test_only_bad_rows_give_a_valid_empty_output_and_a_clear_summary(tmp_path):
    path = write_csv(tmp_path / "bad.csv", [], list(BAD_LINES))
    out = tmp_path / "out"
    summary = prepare.run(["--input", str(path), "--output_dir", str(out)])
    assert summary["records_read"] == summary["records_rejected"] == len(BAD_LINES)
    assert summary["examples"] == summary["examples_train"] == summary["examples_eval"] == 0
    assert pq.read_table(out / "features").num_rows == 0
    assert (out / "transform" / "transform_fn" / "saved_model.pb").exists()
    lines = [line for f in (out / "dead_letters").glob("*.jsonl") for line in f.open()]
    assert len(lines) == len(BAD_LINES)


def test_missing_input_is_a_clear_error_before_the_pipeline_starts(tmp_path):
    out = tmp_path / "out"
    with pytest.raises(InputError, match="matches no file"):
        prepare.run(["--input", str(tmp_path / "nowhere" / "*.csv"), "--output_dir", str(out)])
    assert not out.exists()


def test_unknown_input_format_is_a_clear_error(tmp_path):
    (tmp_path / "data.xlsx").write_text("x")
    with pytest.raises(InputError, match="--input_format"):
        prepare.run(["--input", str(tmp_path / "data.xlsx"), "--output_dir", str(tmp_path / "o")])


def test_json_lines_and_gzip_input(tmp_path):
    rows = real_flights(2, 1)[:300]
    path = write_jsonl(tmp_path / "f.jsonl", rows, ["{not json", "[1, 2]"])
    gz = tmp_path / "f.jsonl.gz"
    gz.write_bytes(gzip.compress(path.read_bytes()))
    summary = prepare.run(["--input", str(gz), "--output_dir", str(tmp_path / "out")])
    assert summary["records_read"] == 302 and summary["records_rejected"] == 2


def test_a_second_feature_set_declared_elsewhere_runs_unchanged(tmp_path):
    base = dt.datetime(2024, 5, 1, tzinfo=dt.UTC)
    rows = []
    for i in range(600):
        ts = base + dt.timedelta(seconds=37 * i)
        rows.append(
            {
                "ts": ts.isoformat(),
                "user": f"u{i % 7}",
                "site": f"s{i % 3}",
                "price": float(i % 50),
                "bought": None if i % 10 == 0 else i % 4 == 0,
                "campaign": "ignored by policy",
            }
        )
    path = write_jsonl(tmp_path / "clicks.jsonl", rows, ['{"ts": "soon", "user": "u", "site": "s", "price": 1}'])
    out = tmp_path / "out"
    summary = prepare.run(
        ["--input", str(path), "--output_dir", str(out), "--feature_set", "tests.support.toy_featureset:CLICKS"]
    )
    assert summary["feature_set"] == "clicks"
    assert summary["records_rejected"] == 1
    assert summary["examples"] == 540
    features = pq.read_table(out / "features").to_pylist()
    last = max(features, key=lambda r: r["ts"])
    # user u(599 % 7) clicked every 7th event (259 s apart): 3 clicks in the 10 min before.
    assert 1 <= last["user_clicks_10m"] <= 3
    spec = tft.TFTransformOutput(str(out / "transform")).transformed_feature_spec()
    n = len(read_tfrecords(out / "train", spec)) + len(read_tfrecords(out / "eval", spec))
    assert n == 540
