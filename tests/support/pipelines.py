"""Beam helpers of the aggregate tests: a toy feature set, pane collection, the batch backfill
of the contract, typed events."""

from __future__ import annotations

import threading
import uuid
from collections import defaultdict
from collections.abc import Iterable

import apache_beam as beam
from apache_beam.options.pipeline_options import PipelineOptions
from apache_beam.utils.windowed_value import PaneInfoTiming

from skewless.beam_pipelines.runtime.local_runner import fix_direct_runner_metrics
from skewless.transforms.aggregations import ComputeAggregates, explode_cells
from skewless.transforms.featureset import FeatureSet, Field, WindowedAggregate
from skewless.transforms.record_checks import RecordChecker
from skewless.transforms.tiles import Cell

TOY = FeatureSet(
    name="toy",
    schema=(
        Field("k", "string", nullable=False),
        Field("v", "float"),
        Field("t", "timestamp", nullable=False),
    ),
    event_time="t",
    keys=("k",),
    aggregates=(
        WindowedAggregate("n_2m", "k", "count", 120, 60),
        WindowedAggregate("mean_v_2m", "k", "mean", 120, 60, "v", -1.0),
        WindowedAggregate("n_1m", "k", "count", 60, 60),
    ),
    label="v",
    example_fields=(),
    preprocessing_fn=lambda inputs: dict(inputs),
    unexpected_fields="reject",
)


def toy(k: str, v: float | None, t_s: float) -> dict:
    """A typed toy event (event time in epoch ms)."""
    return {"k": k, "v": v, "t": int(t_s * 1000)}


def streaming_options(**extra) -> PipelineOptions:
    fix_direct_runner_metrics()
    return PipelineOptions(runner="BundleBasedDirectRunner", streaming=True, **extra)


_PANES: dict[str, list] = defaultdict(list)
_LOCK = threading.Lock()


class _Record(beam.DoFn):
    """Keeps every fired cell with its pane (index, timing) in this process, under `run_id`."""

    def __init__(self, run_id: str):
        self.run_id = run_id

    def process(self, element):
        if isinstance(element, Cell):  # streaming: one emission of one cell
            cells = [(element.key, element.values, element.index, element.timing)]
        else:  # batch: an AggregateBlock, each of its cells computed once
            cells = [(k, v, 0, PaneInfoTiming.ON_TIME) for k, v in explode_cells(element)]
        with _LOCK:
            for key, values, index, timing in cells:
                _PANES[self.run_id].append((tuple(key), dict(values), index, timing))


class CollectPanes(beam.PTransform):
    """Cells or AggregateBlocks -> recorded (cell key, values, emission index, timing); read
    with `panes()`."""

    def __init__(self):
        super().__init__()
        self.run_id = uuid.uuid4().hex

    def expand(self, cells):
        return cells | "Record" >> beam.ParDo(_Record(self.run_id))

    def panes(self) -> list:
        with _LOCK:
            return list(_PANES[self.run_id])

    def final_cells(self) -> dict:
        """(key name, key value, W) -> values of the pane with the highest index."""
        best: dict = {}
        for key, values, index, _ in self.panes():
            if key not in best or index > best[key][0]:
                best[key] = (index, values)
        return {k: v for k, (_, v) in best.items()}


def batch_cells(fs: FeatureSet, events: Iterable[dict]) -> dict:
    """The batch backfill of the contract: ComputeAggregates(fs) in batch, then explode_cells."""
    collect = CollectPanes()
    with beam.Pipeline(options=PipelineOptions(runner="FnApiRunner")) as p:
        _ = p | beam.Create(list(events)) | ComputeAggregates(fs) | collect
    return {k: v for k, v, _, _ in collect.panes()}


def typed_events(fs: FeatureSet, raws: Iterable[dict]) -> list[dict]:
    validator = RecordChecker(fs)
    out = []
    for raw in raws:
        event = validator.validate(dict(raw))
        if event is not None:
            out.append(event)
    return out
