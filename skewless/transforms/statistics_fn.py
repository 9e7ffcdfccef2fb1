"""Dataset statistics as a Beam step: a CombineFn over Arrow example batches around the
accumulator of statistics.py (one pass; accumulators merge in any order)."""

from __future__ import annotations

from collections.abc import Iterable

import apache_beam as beam
import pyarrow as pa
from tensorflow_metadata.proto.v0 import statistics_pb2

from skewless.transforms.drift_calibration import Span, span_label, split_by_span
from skewless.transforms.featureset import FeatureSet
from skewless.transforms.statistics import StatisticsAccumulator


class StatisticsFn(beam.CombineFn):
    """RecordBatches -> DatasetFeatureStatistics named `name`."""

    def __init__(self, name: str):
        super().__init__()
        self.name = name

    def create_accumulator(self) -> StatisticsAccumulator:
        return StatisticsAccumulator()

    def add_input(self, acc: StatisticsAccumulator, batch: pa.RecordBatch) -> StatisticsAccumulator:
        return acc.add(batch)

    def merge_accumulators(
        self, accumulators: Iterable[StatisticsAccumulator]
    ) -> StatisticsAccumulator:
        merged = StatisticsAccumulator()
        for acc in accumulators:
            merged.merge(acc)
        return merged

    def compact(self, acc: StatisticsAccumulator) -> StatisticsAccumulator:
        return acc.compact()

    def extract_output(self, acc: StatisticsAccumulator) -> statistics_pb2.DatasetFeatureStatistics:
        return acc.to_proto(self.name)


class ComputeStatistics(beam.PTransform):
    """PCollection of RecordBatches -> one DatasetFeatureStatistics named `name`, in one pass."""

    def __init__(self, name: str):
        super().__init__()
        self.name = name

    def expand(self, batches):
        return batches | "Combine" >> beam.CombineGlobally(StatisticsFn(self.name))


class SpanStatisticsFn(beam.CombineFn):
    """RecordBatches -> (the statistics of all of them named `name`, {span label: the
    statistics of its examples}): one accumulator per span of the event time
    (drift_calibration.split_by_span), the whole their merge, so the spans cost no second
    pass over the sketches."""

    def __init__(self, name: str, fs: FeatureSet, span: Span):
        super().__init__()
        self.name = name
        self.fs = fs
        self.span = span

    def create_accumulator(self) -> dict[int, StatisticsAccumulator]:
        return {}

    def add_input(self, acc: dict, batch: pa.RecordBatch) -> dict:
        for key, part in split_by_span(self.fs, batch, self.span):
            acc.setdefault(key, StatisticsAccumulator()).add(part)
        return acc

    def merge_accumulators(self, accumulators: Iterable[dict]) -> dict:
        merged: dict[int, StatisticsAccumulator] = {}
        for acc in accumulators:
            for key, part in acc.items():
                merged.setdefault(key, StatisticsAccumulator()).merge(part)
        return merged

    def compact(self, acc: dict) -> dict:
        for part in acc.values():
            part.compact()
        return acc

    def extract_output(self, acc: dict) -> tuple[statistics_pb2.DatasetFeatureStatistics, dict]:
        whole = StatisticsAccumulator()
        spans = {}
        for key in sorted(acc):
            label = span_label(key, self.span)
            spans[label] = acc[key].to_proto(label)
            whole.merge(acc[key])
        return whole.to_proto(self.name), spans


class ComputeSpanStatistics(beam.PTransform):
    """PCollection of RecordBatches -> one (statistics named `name`, {span label: statistics})
    in one pass (SpanStatisticsFn)."""

    def __init__(self, name: str, fs: FeatureSet, span: Span):
        super().__init__()
        self.name = name
        self.fs = fs
        self.span = span

    def expand(self, batches):
        return batches | "Combine" >> beam.CombineGlobally(
            SpanStatisticsFn(self.name, self.fs, self.span)
        )
