"""A second, small feature set declared outside the project's transforms/: clicks on ads.

It proves another team can declare its own features and run every job with
`--feature_set tests.support.toy_featureset:CLICKS`, without editing the project.
"""

import tensorflow as tf
import tensorflow_transform as tft

from skewless.transforms.featureset import FeatureSet, Field, WindowedAggregate


def preprocessing_fn(inputs):
    return {
        "price_z": tft.scale_to_z_score(tf.cast(inputs["price"], tf.float32)),
        "site_id": tft.compute_and_apply_vocabulary(inputs["site"], num_oov_buckets=1),
        "user_clicks_10m_z": tft.scale_to_z_score(tf.cast(inputs["user_clicks_10m"], tf.float32)),
        "site_max_price_30m": tf.cast(inputs["site_max_price_30m"], tf.float32),
        "bought": tf.cast(inputs["bought"], tf.int64),
    }


CLICKS = FeatureSet(
    name="clicks",
    schema=(
        Field("ts", "timestamp", nullable=False),
        Field("user", "string", nullable=False),
        Field("site", "string", nullable=False),
        Field("price", "float", nullable=False, min_value=0),
        Field("bought", "bool"),
    ),
    event_time="ts",
    keys=("user", "site"),
    aggregates=(
        WindowedAggregate("user_clicks_10m", "user", "count", 600, 120),
        WindowedAggregate("site_max_price_30m", "site", "max", 1800, 120, "price", -1.0),
        WindowedAggregate("site_total_price_30m", "site", "sum", 1800, 120, "price"),
    ),
    label="bought",
    example_fields=(
        Field("ts", "timestamp", nullable=False),
        Field("user", "string", nullable=False),
        Field("site", "string", nullable=False),
        Field("price", "float", nullable=False),
        Field("bought", "bool", nullable=False),
    ),
    preprocessing_fn=preprocessing_fn,
    unexpected_fields="ignore",
    example_key=("user", "ts"),
)
