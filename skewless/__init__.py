"""skewless: one Beam codebase for training features, the online feature store and scoring.

The contract a feature set is written against, in one place:

    from skewless import Aggregate, Baseline, FeatureSet, Field, PredictionCache, ReferenceTable
    from skewless.operations import Count, Mean, ...

The bundled feature sets (`skewless.examples`) are written the same way.
"""

from skewless.transforms.featureset import (
    Aggregate,
    Baseline,
    FeatureSet,
    FeatureSetError,
    Field,
    PredictionCache,
    ReferenceTable,
    load_feature_set,
)

__all__ = [
    "Aggregate",
    "Baseline",
    "FeatureSet",
    "FeatureSetError",
    "Field",
    "PredictionCache",
    "ReferenceTable",
    "load_feature_set",
]
