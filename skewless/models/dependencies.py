"""Which raw inputs a model reads: the dependency map of its tf.Transform graph.

A prediction cache is exact only if the model's output is a function of the cache key, i.e.
every raw input the model reads is a key field. The serving signature takes every example
column (identifiers and the event time too), so the signature's inputs say nothing; what the
transform graph's outputs are computed from does. tf.Transform computes exactly that map
when it applies a graph to fewer inputs than it was built with (it walks the graph from each
output back to the input placeholders, control dependencies aside): `SavedModelLoader`'s
`_output_to_inputs_map`. It is private API of the pinned tf.Transform (1.21); a change of it
fails the tests of this module, not silently.
"""

from __future__ import annotations

import os
from collections.abc import Iterable


def transform_dependencies(transform_dir: str) -> dict[str, list[str]]:
    """{transformed feature: the raw inputs it is computed from} of the graph prepare wrote
    under `transform_dir` (the directory holding transform_fn/)."""
    import tensorflow as tf
    from tensorflow_transform.saved import saved_transform_io_v2

    loader = saved_transform_io_v2.SavedModelLoader(os.path.join(transform_dir, "transform_fn"))
    by_tensor = {}
    for name, tensor in loader._structured_inputs.items():
        for component in tf.nest.flatten(tensor, expand_composites=True):
            by_tensor[component.ref()] = name
    return {
        output: sorted({by_tensor[s.ref()] for s in sources if s.ref() in by_tensor})
        for output, sources in sorted(loader._output_to_inputs_map.items())
    }


def inputs_read(dependencies: dict[str, list[str]], features: Iterable[str]) -> list[str]:
    """The raw inputs the transformed `features` (those the model takes) are computed from."""
    return sorted({raw for feature in features for raw in dependencies.get(feature, ())})
