"""prepare reading BigQuery (table and parameterized query) through the Storage Read API emulator."""

import pytest

from skewless.beam_pipelines.jobs import prepare
from tests.support.flights_data import flights_arrow_table as flights_table
from tests.support.flights_data import real_flights, write_csv
from tests.support.outputs import sorted_features as features

pytestmark = [pytest.mark.emulator, pytest.mark.timeout(300)]


def test_prepare_from_a_bigquery_table_equals_prepare_from_files(bq_emulator, tmp_path):
    rows = real_flights(6, 1)
    dataset = bq_emulator.create_dataset()
    table = bq_emulator.create_table(dataset, "flights", flights_table(rows))
    from_bq = prepare.run(
        [
            "--bigquery_table",
            table,
            "--output_dir",
            str(tmp_path / "bq"),
            *bq_emulator.args(),
        ]
    )
    csv = write_csv(tmp_path / "flights.csv", rows)
    from_files = prepare.run(["--input", str(csv), "--output_dir", str(tmp_path / "files")])
    for key in ("records_read", "records_valid", "records_not_events", "examples"):
        assert from_bq[key] == from_files[key], key
    assert from_bq["bigquery_table"] == table
    assert features(tmp_path / "bq") == features(tmp_path / "files")


def test_prepare_from_a_parameterized_query(bq_emulator, tmp_path):
    rows = real_flights(6, 2)
    dataset = bq_emulator.create_dataset()
    table = bq_emulator.create_table(dataset, "flights", flights_table(rows))
    hostile = "JFK' OR '1'='1"
    query = f"SELECT * FROM `{table}` WHERE origin = @origin OR origin = @hostile"
    summary = prepare.run(
        [
            "--bigquery_query", query,
            "--bigquery_query_param", "origin=STRING:JFK",
            "--bigquery_query_param", f"hostile=STRING:{hostile}",
            "--bigquery_temp_dataset", f"{bq_emulator.project}.{dataset}",
            "--output_dir", str(tmp_path / "q"),
            *bq_emulator.args(),
        ]
    )  # fmt: skip
    assert summary["records_read"] == sum(1 for r in rows if r["origin"] == "JFK")
    assert {r["origin"] for r in features(tmp_path / "q")} == {"JFK"}


def test_bad_table_name_is_a_clear_error_before_the_pipeline(tmp_path):
    with pytest.raises(ValueError, match="table"):
        prepare.run(["--bigquery_table", "not a table", "--output_dir", str(tmp_path / "o")])
    assert not (tmp_path / "o").exists()
