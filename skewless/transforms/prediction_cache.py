"""The prediction cache's key: one rule for precompute (which writes entries) and the streaming
scorer (which reads them), so both name a request alike.

The key of an example is the JSON list of its key fields' values, in the declared order
(`PredictionCache.key`), timestamps and lists in the serving log's plain form; the row key
holds the first `hash_chars` hexadecimal characters of its SHA-256, and the entry stores the
key's text itself, which the scorer compares before serving: a hash collision is a miss.
"""

from __future__ import annotations

import hashlib
import json

from skewless.transforms.consistency import plain
from skewless.transforms.featureset import FeatureSet, FeatureSetError

MARKER = "ready"  # the row-key suffix of a version's completion marker (never hexadecimal)


def cache_of(fs: FeatureSet):
    """The feature set's PredictionCache; FeatureSetError if it declares none."""
    if fs.prediction_cache is None:
        raise FeatureSetError(
            f"feature set {fs.name!r} declares no prediction cache (prediction_cache="
            f"PredictionCache(key=(...)) in its FeatureSet)"
        )
    return fs.prediction_cache


def key_text(fs: FeatureSet, example: dict) -> str:
    """The cache key of an example: its key fields' values as a compact JSON list."""
    values = [plain(example.get(name)) for name in fs.prediction_cache.key]
    return json.dumps(values, separators=(",", ":"), ensure_ascii=False)


def key_hash(text: str, chars: int) -> str:
    """The first `chars` hexadecimal characters of the key text's SHA-256."""
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:chars]


def entry_row_key(fs: FeatureSet, version: int, text: str) -> str:
    """`{feature set}#prediction#{version}#{hash}`: one row per key and model version."""
    return f"{fs.name}#prediction#{int(version)}#{key_hash(text, fs.prediction_cache.hash_chars)}"


def marker_row_key(fs: FeatureSet, version: int) -> str:
    """The row precompute writes last for a version: its entries are complete."""
    return f"{fs.name}#prediction#{int(version)}#{MARKER}"


def cache_family(fs: FeatureSet) -> str:
    """The Bigtable column family of the feature set's cached predictions."""
    return f"{fs.name}_predictions"


def uncovered_inputs(fs: FeatureSet, reads_inputs: list[str]) -> list[str]:
    """The raw inputs a model reads that are not key fields: the cache is exact only when
    there are none."""
    key = set(cache_of(fs).key)
    return [name for name in reads_inputs if name not in key]
