"""Events -> point-in-time-correct examples: the composite shared by prepare and batch scoring."""

from __future__ import annotations

import apache_beam as beam

from transforms.aggregations import AsOfJoin, ComputeAggregates
from transforms.featureset import FeatureSet


class BuildExamples(beam.PTransform):
    """Typed events -> flat RecordBatches of examples with their as-of aggregates.

    The heart of prepare and of batch scoring: the same aggregate transform as the streaming
    job, then the point-in-time join, then columnar batches for the writers and tf.Transform.

    Training needs a label (`require_label=True`, events without one are not examples);
    scoring does not: every event is scored. A feature set with reference tables needs
    `references` ({table name: its BuildReferenceIndex output}): their columns are joined as
    of each event, columnar, in the block after the shuffle (reference.py).
    """

    def __init__(
        self, fs: FeatureSet, *, require_label: bool = True, references: dict | None = None
    ):
        super().__init__()
        missing = [t.name for t in fs.references if t.name not in (references or {})]
        if missing:
            raise ValueError(
                f"feature set {fs.name!r} declares reference tables: give their indexes "
                f"(no rows given for {missing})"
            )
        self.fs = fs
        self.require_label = require_label
        self.references = references or {}

    def expand(self, events):
        fs = self.fs
        blocks = events | "Aggregate" >> ComputeAggregates(fs)
        examples = events
        if self.require_label:
            label = fs.label
            examples = events | "Examples" >> beam.Filter(lambda e: e.get(label) is not None)
        return (examples, blocks) | "AsOfJoin" >> AsOfJoin(fs, references=self.references)
