"""Dataset statistics as a Beam step: a CombineFn over Arrow example batches around the
accumulator of statistics.py (one pass; accumulators merge in any order)."""

from __future__ import annotations

from collections.abc import Iterable

import apache_beam as beam
import pyarrow as pa
from tensorflow_metadata.proto.v0 import statistics_pb2

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
