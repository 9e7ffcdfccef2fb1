"""A probability does not depend on the batch it was scored in: the prediction cache (scored in
precompute's batches), the streaming scorer (its bundles) and the audit (its re-scoring)
compare predictions exactly."""

from __future__ import annotations

import numpy as np
import pyarrow.parquet as pq
import pytest

from skewless.models.handler import SkewlessModelHandler, arrow_to_feed, pad_rows, predict


@pytest.mark.timeout(300)
def test_every_split_of_the_examples_gives_the_same_probabilities_bit_for_bit(trained):
    handler = SkewlessModelHandler(str(trained["model_dir"]))
    model = handler.load_model()
    examples = pq.read_table(trained["prepared"] / "features").combine_chunks()
    examples = examples.slice(0, 1003)
    whole = predict(model, arrow_to_feed(examples, handler.inputs))
    assert len(whole) == examples.num_rows
    for size in (1, 3, 7, 64, 500):
        parts = [
            predict(model, arrow_to_feed(examples.slice(i, size), handler.inputs))
            for i in range(0, examples.num_rows, size)
        ]
        np.testing.assert_array_equal(np.concatenate(parts), whole, err_msg=f"batches of {size}")


def test_padding_repeats_the_first_example_and_gives_lists_no_values():
    feed = {
        "x": np.array([1.0, 2.0, 3.0], dtype=np.float32),
        "x__present": np.array([True, False, True]),
        "tags": np.array([b"a", b"b", b"c"], dtype=object),  # flat values of 3 examples
        "tags__lengths": np.array([2, 0, 1], dtype=np.int64),
    }
    padded, n = pad_rows(feed, 8)
    assert n == 3
    assert padded["x"].tolist() == [1.0, 2.0, 3.0] + [1.0] * 5
    assert padded["x__present"].tolist() == [True, False, True] + [True] * 5
    assert padded["tags__lengths"].tolist() == [2, 0, 1] + [0] * 5
    assert padded["tags"].tolist() == [b"a", b"b", b"c"]
    same, n = pad_rows({k: v[:0] for k, v in feed.items()}, 8)
    assert n == 0 and len(same["x"]) == 0
