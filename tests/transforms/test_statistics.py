"""Statistics and schema: equal to numpy on real flights, mergeable in any split, the inferred
schema, the files, and what prepare writes (statistics/, schema/, --schema)."""

from __future__ import annotations

import collections
import json
import math
import random

import apache_beam as beam
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest
from apache_beam.testing.test_pipeline import TestPipeline
from apache_beam.testing.util import assert_that
from tensorflow_metadata.proto.v0 import schema_pb2, statistics_pb2

from skewless.beam_pipelines.io.files import _read_bytes, read_csv_table
from skewless.beam_pipelines.jobs import prepare
from skewless.beam_pipelines.validation.files import (
    SchemaFileError,
    read_schema,
    read_statistics,
    schema_path,
    statistics_path,
    write_schema,
    write_statistics,
)
from skewless.examples.flights import FLIGHTS, bundled_flights_path
from skewless.transforms.example_schema import features_arrow_schema
from skewless.transforms.split import Split
from skewless.transforms.statistics import (
    DEFAULT_CATEGORICAL_THRESHOLD,
    DEFAULT_NUMERIC_THRESHOLD,
    QUANTILES_EPS,
    SOURCE_METADATA_KEY,
    TYPES_SEEN,
    TYPES_SEEN_IN,
    common_stats,
    infer_schema,
    statistics_of_batches,
)
from skewless.transforms.statistics_fn import ComputeStatistics, StatisticsFn
from tests.support.flights_data import real_flights, write_csv

Stats = statistics_pb2.FeatureNameStatistics


@pytest.fixture(scope="module")
def flights() -> pa.Table:
    """All 336,776 bundled flights as read (cancelled ones have null times and delays)."""
    table, bad = read_csv_table(_read_bytes(bundled_flights_path()))
    assert not bad and table.num_rows == 336_776
    return table


@pytest.fixture(scope="module")
def flights_stats(flights):
    return statistics_of_batches(flights.to_batches(max_chunksize=1000), "flights")


def by_name(stats: statistics_pb2.DatasetFeatureStatistics) -> dict[str, Stats]:
    return {f.name: f for f in stats.features}


def numbers(column: pa.ChunkedArray) -> np.ndarray:
    values = column.drop_null()
    if pa.types.is_timestamp(values.type):
        values = values.cast(pa.int64())
    return values.to_numpy().astype(np.float64)


# --- statistics equal an independent computation ------------------------------------------------


def test_counts_and_moments_equal_numpy_on_all_flights(flights, flights_stats):
    assert flights_stats.name == "flights"
    assert flights_stats.num_examples == flights.num_rows
    features = by_name(flights_stats)
    assert list(features) == flights.schema.names
    for name in flights.schema.names:
        column = flights.column(name)
        common = common_stats(features[name])
        assert common.num_missing == column.null_count, name
        assert common.num_non_missing == flights.num_rows - column.null_count, name
        assert common.tot_num_values == common.num_non_missing, name
        assert (common.min_num_values, common.max_num_values, common.avg_num_values) == (1, 1, 1)
        if features[name].type == Stats.STRING:
            continue
        x = numbers(column)
        s = features[name].num_stats
        assert s.mean == pytest.approx(x.mean(), rel=1e-9, abs=1e-12), name
        assert s.std_dev == pytest.approx(x.std(), rel=1e-9, abs=1e-9), name
        assert (s.min, s.max) == (x.min(), x.max()), name
        assert s.num_zeros == np.count_nonzero(x == 0), name
    assert common_stats(features["dep_delay"]).num_missing == 8255  # the cancelled flights


def test_types_follow_arrow():
    batch = pa.RecordBatch.from_pydict(
        {
            "i": pa.array([1, None, 3], pa.int32()),
            "t": pa.array([0, 1000, None], pa.timestamp("ms", tz="UTC")),
            "f": pa.array([0.5, None, 1.5], pa.float32()),
            "s": pa.array(["a", "b", None]),
            "b": pa.array([b"x", b"y", b"x"], pa.large_binary()),
            "flag": pa.array([True, False, None]),
            "nothing": pa.nulls(3),
        }
    )
    features = by_name(statistics_of_batches([batch], "types"))
    types = {name: Stats.Type.Name(f.type) for name, f in features.items()}
    assert types == {
        "i": "INT", "t": "INT", "f": "FLOAT", "s": "STRING", "b": "STRING", "flag": "INT",
        "nothing": "STRING",
    }  # fmt: skip
    assert features["flag"].num_stats.mean == 0.5 and features["t"].num_stats.max == 1000
    assert common_stats(features["nothing"]).num_missing == 3
    assert features["b"].string_stats.top_values[0].value == "x"


def test_quantiles_are_within_the_sketch_s_rank_error(flights, flights_stats):
    features = by_name(flights_stats)
    for name in ("dep_delay", "arr_delay", "air_time", "distance", "dep_time", "time_hour"):
        x = np.sort(numbers(flights.column(name)))
        n = len(x)
        s = features[name].num_stats
        quantiles = next(h for h in s.histograms if h.type == statistics_pb2.Histogram.QUANTILES)
        deciles = [quantiles.buckets[0].low_value] + [b.high_value for b in quantiles.buckets]
        assert len(deciles) == 11
        assert (deciles[0], deciles[-1]) == (x[0], x[-1]), name
        for k, value in [*enumerate(deciles), (5, s.median)]:
            # Some rank of `value` in the data is within eps * n of k * n / 10.
            first, last = np.searchsorted(x, value, "left"), np.searchsorted(x, value, "right")
            wanted = k * n / 10
            distance = (
                0 if first <= wanted <= last else min(abs(first - wanted), abs(last - wanted))
            )
            assert distance <= QUANTILES_EPS * n + 1, (name, k, value, distance)
        assert all(b.sample_count == pytest.approx(n / 10) for b in quantiles.buckets)


def test_standard_histograms_match_numpy(flights, flights_stats):
    features = by_name(flights_stats)
    for name in ("month", "day", "minute", "dep_delay", "arr_delay", "air_time", "dep_time"):
        x = numbers(flights.column(name))
        standard = features[name].num_stats.histograms[0]
        assert standard.type == statistics_pb2.Histogram.STANDARD
        counts = np.array([b.sample_count for b in standard.buckets])
        expected, edges = np.histogram(x, bins=10)
        assert [b.low_value for b in standard.buckets] == pytest.approx(edges[:-1])
        assert counts.sum() == pytest.approx(len(x))
        # Small integer domains are exact; wide ones within 1% of the values per bucket.
        tolerance = 1e-6 if name in ("month", "day", "minute") else 0.01 * len(x)
        assert np.abs(counts - expected).max() <= tolerance, (name, counts, expected)


def test_top_values_and_unique_counts(flights, flights_stats):
    features = by_name(flights_stats)
    for name in ("carrier", "origin", "dest"):
        counts = collections.Counter(flights.column(name).to_pylist())
        s = features[name].string_stats
        assert s.unique == len(counts), name
        ranked = [(b.label, b.sample_count) for b in s.rank_histogram.buckets]
        assert dict(ranked) == dict(counts), name  # every value, counted exactly
        assert [c for _, c in ranked] == sorted(counts.values(), reverse=True)
        top = [(v.value, v.frequency) for v in s.top_values]
        assert top == ranked[:100], name  # dest has 105 values: the top 100
        assert [b.low_rank for b in s.rank_histogram.buckets] == list(range(len(counts)))
    assert {v.value for v in features["origin"].string_stats.top_values} == {"EWR", "JFK", "LGA"}
    tailnums = [t for t in flights.column("tailnum").to_pylist() if t is not None]
    s = features["tailnum"].string_stats
    assert abs(s.unique - len(set(tailnums))) <= 0.05 * len(set(tailnums))
    assert len(s.top_values) == 100
    # Misra-Gries counts are off by at most n / buckets, so near-ties may swap but no busy
    # aircraft is left out of the top values.
    counts = collections.Counter(tailnums)
    slack = len(tailnums) / 1000
    for v in s.top_values:
        assert abs(v.frequency - counts[v.value]) <= slack, v.value
    lowest = s.top_values[-1].frequency
    assert {t for t, c in counts.items() if c > lowest + slack} <= {v.value for v in s.top_values}
    # avg_length is a float32 field.
    assert s.avg_length == pytest.approx(np.mean([len(t) for t in tailnums]), rel=1e-7)


def delays_per_origin_hour(flights: pa.Table) -> pa.Table:
    """A list column from real data: the departure delays of each origin and scheduled hour,
    nulls (cancelled flights) kept inside the lists."""
    return (
        flights.group_by(["origin", "time_hour"])
        .aggregate([("dep_delay", "list")])
        .rename_columns(["origin", "time_hour", "delays"])
    )


def test_list_columns_count_values_per_example(flights):
    table = delays_per_origin_hour(flights)
    lists = table.column("delays").to_pylist()
    # Every third hour loses its list (missing) and every seventh gets an empty one.
    lists = [None if i % 3 == 0 else [] if i % 7 == 0 else v for i, v in enumerate(lists)]
    column = pa.array(lists, pa.list_(pa.float64()))
    table = table.set_column(2, "delays", column)
    stats = by_name(statistics_of_batches(table.to_batches(max_chunksize=500), "hours"))["delays"]
    assert stats.type == Stats.FLOAT
    common = stats.num_stats.common_stats
    present = [v for v in lists if v is not None]
    lengths = np.array([len(v) for v in present])
    assert common.num_missing == len(lists) - len(present)
    assert common.num_non_missing == len(present)
    assert common.tot_num_values == lengths.sum()
    assert (common.min_num_values, common.max_num_values) == (0, lengths.max())
    assert common.avg_num_values == pytest.approx(lengths.mean())
    histogram = common.num_values_histogram
    assert histogram.type == statistics_pb2.Histogram.QUANTILES
    assert histogram.buckets[0].low_value == 0 and histogram.buckets[-1].high_value == lengths.max()
    assert histogram.buckets[4].high_value == pytest.approx(np.median(lengths), abs=1)
    values = np.array([x for v in present for x in v if x is not None])
    assert stats.num_stats.mean == pytest.approx(values.mean(), rel=1e-9)
    assert stats.num_stats.max == values.max()


# --- accumulators merge in any split and order ---------------------------------------------------


def assert_same_statistics(a, b, n: int) -> None:
    assert a.num_examples == b.num_examples
    fa, fb = by_name(a), by_name(b)
    assert list(fa) == list(fb)
    for name in fa:
        x, y = fa[name], fb[name]
        assert x.type == y.type, name
        assert common_stats(x) == common_stats(y) or _close_common(common_stats(x), common_stats(y))
        if x.type == Stats.STRING:
            assert x.string_stats.unique == y.string_stats.unique, name
            if x.string_stats.unique <= 1000:
                assert x.string_stats.top_values == y.string_stats.top_values, name
            assert x.string_stats.avg_length == pytest.approx(y.string_stats.avg_length, rel=1e-12)
            continue
        s, t = x.num_stats, y.num_stats
        assert (s.min, s.max, s.num_zeros) == (t.min, t.max, t.num_zeros), name
        assert s.mean == pytest.approx(t.mean, rel=1e-9, abs=1e-12), name
        assert s.std_dev == pytest.approx(t.std_dev, rel=1e-9, abs=1e-12), name
        for h, k in zip(s.histograms, t.histograms, strict=True):
            for p, q in zip(h.buckets, k.buckets, strict=True):
                assert abs(p.sample_count - q.sample_count) <= 2 * QUANTILES_EPS * n + 1, name


def _close_common(a, b) -> bool:
    return (a.num_non_missing, a.num_missing, a.tot_num_values) == (
        b.num_non_missing,
        b.num_missing,
        b.tot_num_values,
    )


def test_merging_accumulators_in_any_split_equals_one_accumulator(flights, flights_stats):
    fn = StatisticsFn("flights")
    batches = flights.to_batches(max_chunksize=1000)
    rng = random.Random(13)
    for parts in (2, 5, 17):
        order = list(range(len(batches)))
        rng.shuffle(order)
        accumulators = []
        for p in range(parts):
            acc = fn.create_accumulator()
            for i in order[p::parts]:
                acc = fn.add_input(acc, batches[i])
            accumulators.append(fn.compact(acc))
        rng.shuffle(accumulators)
        # A tree of merges, as a runner may do: pairs, then the rest.
        merged = [fn.merge_accumulators(accumulators[i : i + 2]) for i in range(0, parts, 2)]
        merged = fn.merge_accumulators([fn.create_accumulator(), *merged])
        assert_same_statistics(fn.extract_output(merged), flights_stats, flights.num_rows)


def from_file(path: str, **columns) -> pa.RecordBatch:
    """A batch as io/inferred.py reads it: naming its file in the schema's metadata."""
    batch = pa.RecordBatch.from_pydict(columns)
    return batch.replace_schema_metadata({SOURCE_METADATA_KEY: path.encode()})


def custom(feature: Stats) -> dict:
    return {c.name: c for c in feature.custom_stats}


def test_merging_widens_int_to_float_and_keeps_int_with_string_as_several_types():
    """Numbers in one file and text in another: not an error, a column of two types (STRING,
    the widest) that says which types it holds, how many values of each, and where; the same
    in any order of batches and merges."""
    fn = StatisticsFn("d")
    ints = fn.add_input(fn.create_accumulator(), pa.RecordBatch.from_pydict({"x": [1, 2]}))
    floats = fn.add_input(fn.create_accumulator(), pa.RecordBatch.from_pydict({"x": [0.5]}))
    (x,) = fn.extract_output(fn.merge_accumulators([ints, floats])).features
    assert x.type == Stats.FLOAT and x.num_stats.mean == pytest.approx(3.5 / 3)
    assert not x.custom_stats  # int and float are one kind of values: numbers
    batches = [
        from_file("b.csv", x=["F1", "F2", None]),
        from_file("a.csv", x=[1, 2, 3, 4]),
        from_file("c.csv", x=[5]),
    ]
    described = []
    for order in ([0, 1, 2], [2, 1, 0], [1, 0, 2]):
        accumulators = [fn.add_input(fn.create_accumulator(), batches[i]) for i in order]
        described.append(fn.extract_output(fn.merge_accumulators(accumulators)))
    assert described[0] == described[1] == described[2]
    (x,) = described[0].features
    assert x.type == Stats.STRING and common_stats(x).num_non_missing == 7
    assert common_stats(x).tot_num_values == 7 and common_stats(x).num_missing == 1
    assert {v.value for v in x.string_stats.top_values} == {"F1", "F2"}  # the text read as text
    seen = custom(x)
    assert [(b.label, b.sample_count) for b in seen[TYPES_SEEN].rank_histogram.buckets] == [
        ("INT", 5),
        ("STRING", 2),
    ]
    assert seen[TYPES_SEEN_IN].str == "INT in a.csv, c.csv; STRING in b.csv"


def test_a_column_absent_from_some_batches_is_missing_there():
    with_y = pa.RecordBatch.from_pydict({"x": [1, 2], "y": ["a", "b"]})
    without = pa.RecordBatch.from_pydict({"x": [3, 4, 5]})
    features = by_name(statistics_of_batches([without, with_y], "d"))
    assert list(features) == ["x", "y"]
    assert common_stats(features["y"]).num_missing == 3
    assert common_stats(features["x"]).num_missing == 0


def test_nan_and_infinities_are_counted_in_the_histograms_and_left_out_of_the_rest():
    """NaN in each histogram's num_nan, an infinity in a zero-width bucket at its end; moments,
    median and the equal-width and equal-mass buckets of the finite values only."""
    finite = [float(v) for v in range(1, 81)]
    values = finite + [math.nan] * 10 + [math.inf] * 7 + [-math.inf] * 3
    batches = [pa.RecordBatch.from_pydict({"x": values[i::3]}) for i in range(3)]
    (x,) = statistics_of_batches(batches, "d").features
    s = x.num_stats
    assert x.type == Stats.FLOAT and common_stats(x).num_non_missing == 100
    assert s.mean == pytest.approx(np.mean(finite)) and s.std_dev == pytest.approx(np.std(finite))
    assert (s.min, s.max) == (-math.inf, math.inf)
    for h in s.histograms:
        assert h.num_nan == 10
        (low, *inside, high) = h.buckets
        assert (low.low_value, low.high_value, low.sample_count) == (-math.inf, -math.inf, 3)
        assert (high.low_value, high.high_value, high.sample_count) == (math.inf, math.inf, 7)
        assert inside[0].low_value == 1.0 and inside[-1].high_value == 80.0
        assert sum(b.sample_count for b in inside) == pytest.approx(80)


def test_a_column_without_finite_values_still_counts_them():
    batch = pa.RecordBatch.from_pydict(
        {"nan": [math.nan] * 4, "inf": [math.inf] * 4, "none": pa.nulls(4, pa.float64())}
    )
    features = by_name(statistics_of_batches([batch], "d"))
    nan, inf = features["nan"].num_stats, features["inf"].num_stats
    assert [(h.type, h.num_nan, len(h.buckets)) for h in nan.histograms] == [
        (statistics_pb2.Histogram.STANDARD, 4, 0),
        (statistics_pb2.Histogram.QUANTILES, 4, 0),
    ]
    assert [[(b.low_value, b.sample_count) for b in h.buckets] for h in inf.histograms] == [
        [(math.inf, 4)],
        [(math.inf, 4)],
    ]
    assert (inf.min, inf.max) == (math.inf, math.inf)
    assert not features["none"].num_stats.histograms  # no value at all


def test_a_column_with_no_value_has_no_type_until_a_batch_has_one():
    """A header-only or all-empty CSV column reads as Arrow's null type."""
    empty = pa.RecordBatch.from_pydict({"x": pa.nulls(3)})
    features = by_name(statistics_of_batches([empty], "d"))
    assert common_stats(features["x"]).num_non_missing == 0
    ints = pa.RecordBatch.from_pydict({"x": [1, 2]})
    (x,) = statistics_of_batches([empty, ints, empty], "d").features
    assert x.type == Stats.INT and not x.custom_stats and common_stats(x).num_missing == 6


@pytest.mark.timeout(300)
def test_compute_statistics_in_a_pipeline_equals_the_in_process_result(flights):
    table = flights.slice(0, 20_000).combine_chunks()
    batches = [b.take(pa.array(range(b.num_rows))) for b in table.to_batches(max_chunksize=700)]
    expected = statistics_of_batches(batches, "part")

    def check(outputs):
        (stats,) = outputs
        assert_same_statistics(stats, expected, table.num_rows)

    with TestPipeline(runner="FnApiRunner") as p:
        stats = p | beam.Create(batches, reshuffle=True) | ComputeStatistics("part")
        assert_that(stats, check)


@pytest.mark.timeout(120)
def test_no_batches_give_an_empty_dataset():
    def check(outputs):
        assert outputs == [statistics_pb2.DatasetFeatureStatistics(name="none")]

    with TestPipeline(runner="FnApiRunner") as p:
        stats = p | beam.Create([], reshuffle=False) | ComputeStatistics("none")
        assert_that(stats, check)


# --- the inferred schema -------------------------------------------------------------------------


def test_inferred_schema_has_types_presence_value_counts_and_small_domains(flights, flights_stats):
    schema = infer_schema(flights_stats)
    features = {f.name: f for f in schema.feature}
    assert list(features) == flights.schema.names
    assert features["dep_delay"].type == schema_pb2.INT
    assert features["time_hour"].type == schema_pb2.INT
    assert features["carrier"].type == schema_pb2.BYTES
    assert features["carrier"].presence.min_fraction == 1.0
    observed = 1 - 8255 / flights.num_rows
    assert observed - 0.01 <= features["dep_delay"].presence.min_fraction < observed
    assert all(f.presence.min_count == 1 for f in schema.feature)
    assert all((f.value_count.min, f.value_count.max) == (1, 1) for f in schema.feature)
    domains = {d.name: list(d.value) for d in schema.string_domain}
    assert set(domains) == {"carrier", "origin", "dest"}  # tailnum has ~4,000 values
    for name in domains:
        assert features[name].domain == name
        assert domains[name] == sorted(set(flights.column(name).to_pylist()))
    assert not features["tailnum"].domain
    assert (
        features["carrier"].drift_comparator.infinity_norm.threshold
        == DEFAULT_CATEGORICAL_THRESHOLD
    )
    assert (
        features["carrier"].skew_comparator.infinity_norm.threshold == DEFAULT_CATEGORICAL_THRESHOLD
    )
    js = features["dep_delay"].drift_comparator.jensen_shannon_divergence.threshold
    assert js == DEFAULT_NUMERIC_THRESHOLD
    assert features["distance"].skew_comparator.jensen_shannon_divergence.threshold == js
    assert not features["dep_delay"].HasField("int_domain")
    assert not features["dep_delay"].HasField("float_domain")  # ints never hold NaN


def test_inferred_schema_disallows_the_non_finite_values_a_float_feature_did_not_have():
    batch = pa.RecordBatch.from_pydict(
        {
            "clean": [0.5, 1.5, 2.5],
            "nan": [0.5, math.nan, 2.5],
            "inf": [0.5, -math.inf, 2.5],
            "count": [1, 2, 3],
        }
    )
    features = {f.name: f for f in infer_schema(statistics_of_batches([batch], "d")).feature}
    domains = {
        name: (f.float_domain.disallow_nan, f.float_domain.disallow_inf)
        for name, f in features.items()
        if f.HasField("float_domain")
    }
    assert domains == {"clean": (True, True), "nan": (False, True), "inf": (True, False)}


def test_inferred_schema_of_a_list_column_has_its_value_counts(flights):
    table = delays_per_origin_hour(flights)
    (_, _, delays) = infer_schema(statistics_of_batches(table.to_batches(), "h")).feature
    lengths = pc.list_value_length(table.column("delays")).to_numpy()
    assert delays.type == schema_pb2.INT
    assert (delays.value_count.min, delays.value_count.max) == (lengths.min(), lengths.max())


# --- files ----------------------------------------------------------------------------------------


def test_statistics_and_schema_files_round_trip(tmp_path, flights_stats):
    stats = statistics_pb2.DatasetFeatureStatisticsList(datasets=[flights_stats])
    write_statistics(str(tmp_path / "s" / "statistics.pb"), stats)
    assert read_statistics(str(tmp_path / "s" / "statistics.pb")) == stats
    schema = infer_schema(flights_stats)
    path = tmp_path / "schema" / "schema.pbtxt"
    write_schema(str(path), schema)
    assert 'name: "carrier"' in path.read_text()  # text, so it can be edited
    assert read_schema(str(path)) == schema


def test_an_unreadable_schema_file_is_a_clear_error(tmp_path):
    bad = tmp_path / "bad.pbtxt"
    bad.write_text("feature { nme: 'x' }")
    with pytest.raises(SchemaFileError, match="is not a text Schema proto"):
        read_schema(str(bad))
    with pytest.raises(SchemaFileError, match="does not exist"):
        read_schema(str(tmp_path / "none.pbtxt"))


# --- prepare writes them -------------------------------------------------------------------------


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    rows = real_flights(3, 4, days=2)
    path = write_csv(tmp_path_factory.mktemp("input") / "flights.csv", rows)
    out = tmp_path_factory.mktemp("prepared")
    summary = prepare.run(
        ["--input", str(path), "--output_dir", str(out), "--eval_fraction", "0.25"]
    )
    return path, out, summary


@pytest.mark.timeout(600)
def test_prepare_writes_train_and_eval_statistics_of_its_examples(prepared):
    _, out, summary = prepared
    assert json.loads((out / "summary.json").read_text()) == summary
    assert summary["statistics"] == statistics_path(str(out))
    assert summary["schema"] == schema_path(str(out)) and summary["schema_source"] == "inferred"
    stats = read_statistics(str(out / "statistics" / "statistics.pb"))
    train, evaluation = stats.datasets
    assert (train.name, evaluation.name) == ("train", "eval")
    assert train.num_examples == summary["examples_train"] > 0
    assert evaluation.num_examples == summary["examples_eval"] > 0
    names = features_arrow_schema(FLIGHTS).names
    assert [f.name for f in train.features] == names
    # The same statistics as the features/ rows of each split, computed here.
    features = pq.read_table(out / "features").combine_chunks()
    is_eval = Split.from_settings(FLIGHTS, None, 0.25).is_eval(FLIGHTS, features.to_batches()[0])
    for dataset, rows in (
        (train, features.filter(pc.invert(is_eval))),
        (evaluation, features.filter(is_eval)),
    ):
        expected = statistics_of_batches(rows.to_batches(max_chunksize=300), dataset.name)
        assert_same_statistics(dataset, expected, rows.num_rows)


@pytest.mark.timeout(600)
def test_prepare_infers_a_schema_and_keeps_an_edited_one(prepared, tmp_path):
    path, out, _ = prepared
    schema = read_schema(str(out / "schema" / "schema.pbtxt"))
    features = {f.name: f for f in schema.feature}
    assert list(features) == features_arrow_schema(FLIGHTS).names
    assert (
        features["label"].type == schema_pb2.INT and features["dep_delay"].type == schema_pb2.FLOAT
    )
    assert features["origin"].domain == "origin"
    # The user relaxes a presence threshold and widens a domain; the next run keeps that.
    features["dep_delay"].presence.min_fraction = 0.5
    next(d for d in schema.string_domain if d.name == "origin").value.append("PHL")
    edited = tmp_path / "edited.pbtxt"
    write_schema(str(edited), schema)
    again = tmp_path / "again"
    summary = prepare.run(
        [
            "--input",
            str(path),
            "--output_dir",
            str(again),
            "--eval_fraction",
            "0.25",
            "--schema",
            str(edited),
        ]
    )
    assert summary["schema_source"] == str(edited)
    assert read_schema(str(again / "schema" / "schema.pbtxt")) == schema
    assert (
        read_statistics(str(again / "statistics" / "statistics.pb")).datasets[0].num_examples
        == (summary["examples_train"])
    )


@pytest.mark.timeout(120)
def test_prepare_with_a_broken_schema_fails_before_the_pipeline(prepared, tmp_path):
    path, _, _ = prepared
    bad = tmp_path / "schema.pbtxt"
    bad.write_text("feature {")
    out = tmp_path / "out"
    with pytest.raises(SchemaFileError, match="schema.pbtxt"):
        prepare.run(["--input", str(path), "--output_dir", str(out), "--schema", str(bad)])
    assert not out.exists()


def test_statistics_math_helpers_do_not_depend_on_the_batch_size(flights):
    # The moments are exact (Chan's merge), whatever the batching.
    column = flights.select(["dep_delay"]).slice(0, 20_000)
    small = by_name(statistics_of_batches(column.to_batches(max_chunksize=7), "a"))["dep_delay"]
    large = by_name(statistics_of_batches(column.to_batches(), "b"))["dep_delay"]
    assert small.num_stats.mean == pytest.approx(large.num_stats.mean, rel=1e-12)
    assert small.num_stats.std_dev == pytest.approx(large.num_stats.std_dev, rel=1e-12)
    assert math.isfinite(small.num_stats.std_dev)


@pytest.mark.timeout(600)
def test_the_benchmark_switch_leaves_statistics_and_schema_out(prepared, tmp_path, monkeypatch):
    path, _, _ = prepared
    monkeypatch.setenv(prepare.NO_STATISTICS_ENV, "1")
    out = tmp_path / "out"
    summary = prepare.run(["--input", str(path), "--output_dir", str(out)])
    assert summary["statistics"] is None and summary["schema"] is None
    assert summary["examples_train"] > 0
    assert not (out / "statistics").exists() and not (out / "schema").exists()
