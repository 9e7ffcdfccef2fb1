"""A reference table read from BigQuery (`--reference NAME=bigquery:PROJECT.DATASET.TABLE`,
through the Storage Read API of the BigQuery emulator) gives prepare and batch score the same
examples as the same rows read from a file; publish-reference reads it too."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pv
import pyarrow.parquet as pq
import pytest

from skewless.beam_pipelines.commands import train
from skewless.beam_pipelines.io.files import InputError, _read_bytes, read_csv_table
from skewless.beam_pipelines.jobs import prepare, score
from skewless.examples.flights import FLIGHTS_PLUS, WEATHER_AT_ORIGIN
from tests.support.flights_data import real_flights, write_csv
from tests.support.outputs import sorted_features as features

pytestmark = [pytest.mark.emulator, pytest.mark.timeout(600)]

SCORE_START = "2013-02-12T00:00:00Z"
KEY = list(FLIGHTS_PLUS.example_key)


def weather_rows(first: str, last: str) -> pa.Table:
    """The bundled hourly weather from `first` to before `last` (ISO dates), as Arrow reads
    the CSV (time_hour a UTC timestamp)."""
    weather, _ = read_csv_table(_read_bytes(WEATHER_AT_ORIGIN.resolve_default_input()))
    hours = pc.cast(weather.column("time_hour"), pa.string())
    weather = weather.filter(pc.and_(pc.greater_equal(hours, first), pc.less(hours, last)))
    time_hour = pc.cast(weather.column("time_hour"), pa.timestamp("s", tz="UTC"))
    return weather.set_column(weather.schema.get_field_index("time_hour"), "time_hour", time_hour)


@pytest.fixture(scope="module")
def weather(bq_emulator, tmp_path_factory):
    """Two days of flights; the weather of their days and the two before, once as a CSV file
    and once as a BigQuery table."""
    root = tmp_path_factory.mktemp("reference_bigquery")
    flights = write_csv(root / "flights.csv", real_flights(2, 11, days=2))
    rows = weather_rows("2013-02-09", "2013-02-14")
    csv = root / "weather.csv"
    pv.write_csv(rows, csv)
    table = bq_emulator.create_table(bq_emulator.create_dataset(), "weather", rows)
    return {"root": root, "flights": flights, "rows": rows, "csv": csv, "table": table}


@pytest.fixture(scope="module")
def trained(weather):
    """prepare with the weather file, and a model trained on its examples."""
    root = weather["root"]
    summary = prepare.run(
        ["--feature_set", "flights_plus", "--input", str(weather["flights"]),
         "--reference", f"origin_weather={weather['csv']}", "--eval_start", SCORE_START,
         "--output_dir", str(root / "prepared")]
    )  # fmt: skip
    train.run(
        ["--prepared_dir", str(root / "prepared"), "--model_dir", str(root / "models"),
         "--epochs", "1"]
    )  # fmt: skip
    return {"prepared": root / "prepared", "summary": summary, "models": root / "models"}


def test_prepare_reads_a_reference_table_from_bigquery_like_from_a_file(
    weather, trained, bq_emulator, tmp_path
):
    from_bq = prepare.run(
        ["--feature_set", "flights_plus", "--input", str(weather["flights"]),
         "--reference", f"origin_weather=bigquery:{weather['table']}",
         "--eval_start", SCORE_START, "--output_dir", str(tmp_path / "bq"),
         *bq_emulator.args()]
    )  # fmt: skip
    from_file = trained["summary"]
    assert from_bq["references"] == from_file["references"]
    assert from_bq["references"]["origin_weather"]["rows_valid"] == weather["rows"].num_rows
    assert from_bq["reference_inputs"]["origin_weather"] == f"bigquery:{weather['table']}"
    for key in ("examples", "examples_train", "examples_eval", "duplicate_example_keys"):
        assert from_bq[key] == from_file[key], key
    joined = features(tmp_path / "bq")
    assert joined == features(trained["prepared"])
    assert sum(r["origin_weather_temp"] is not None for r in joined) > 0.9 * len(joined)


def predictions(out) -> pa.Table:
    return pq.read_table(out / "predictions").sort_by([(k, "ascending") for k in KEY])


@pytest.mark.slow
def test_batch_score_reads_a_reference_table_from_bigquery_like_from_a_file(
    weather, trained, bq_emulator, tmp_path
):
    runs = {}
    for name, source in (("bq", f"bigquery:{weather['table']}"), ("file", str(weather["csv"]))):
        runs[name] = score.run(
            ["--model_dir", str(trained["models"]), "--input", str(weather["flights"]),
             "--reference", f"origin_weather={source}", "--start", SCORE_START,
             "--output", str(tmp_path / name), *bq_emulator.args()]
        )  # fmt: skip
    from_bq, from_file = runs["bq"], runs["file"]
    assert from_bq["references"] == from_file["references"]
    assert from_bq["references"]["origin_weather"]["rows_valid"] == weather["rows"].num_rows
    assert from_bq["reference_inputs"]["origin_weather"] == f"bigquery:{weather['table']}"
    assert from_bq["examples_scored"] == from_file["examples_scored"] > 500
    bq, file = predictions(tmp_path / "bq"), predictions(tmp_path / "file")
    assert bq.drop_columns(["probability"]).equals(file.drop_columns(["probability"]))
    np.testing.assert_allclose(
        bq.column("probability").to_numpy(), file.column("probability").to_numpy(), atol=1e-6
    )


def test_publish_reference_reads_a_reference_table_from_bigquery(weather, bq_emulator):
    """publish-reference's source (`--reference NAME=bigquery:TABLE`): the BigQuery table,
    checked before the run; a missing table is an error then."""
    from apache_beam.options.pipeline_options import PipelineOptions

    from skewless.beam_pipelines.io.bigquery import ReadFromBigQueryStorage
    from skewless.beam_pipelines.runtime.inputs import reference_table_source
    from skewless.beam_pipelines.runtime.options import SourceOptions

    def source(table):
        argv = ["--reference", f"origin_weather=bigquery:{table}", *bq_emulator.args()]
        options = PipelineOptions(argv)
        options.view_as(SourceOptions)
        return reference_table_source(options, FLIGHTS_PLUS, WEATHER_AT_ORIGIN)

    read, described = source(weather["table"])
    assert isinstance(read, ReadFromBigQueryStorage)
    assert described == {"bigquery_table": weather["table"]}
    with pytest.raises(InputError, match="not found"):
        source(weather["table"] + "_missing")
