"""The aggregate operations a feature set declares (`Aggregate("user", Mean("price"), ...)`).

Each is one class of skewless.transforms.operations, where its exact, mergeable arithmetic
lives; this module is the contract's name for them.
"""

from skewless.transforms.operations import (
    Count,
    First,
    Histogram,
    Last,
    LastK,
    Max,
    Mean,
    Min,
    Operation,
    StdDev,
    Sum,
    UniqueCount,
    Variance,
)

__all__ = [
    "Count",
    "First",
    "Histogram",
    "Last",
    "LastK",
    "Max",
    "Mean",
    "Min",
    "Operation",
    "StdDev",
    "Sum",
    "UniqueCount",
    "Variance",
]
