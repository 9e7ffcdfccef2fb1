"""`skewless cells`: print feature cells from the Bigtable table, newest window end first, as JSON lines.

A look at what the aggregate job wrote (and what streaming scoring will read): one line per
cell with its row key, entity, window end W (epoch ms and ISO-8601) and values. The column
family is the feature set's name (`--feature_set`, the jobs' default unless given).
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence

from skewless.beam_pipelines.runtime.job import Job
from skewless.beam_pipelines.runtime.launch import launch
from skewless.beam_pipelines.runtime.options import DEFAULT_FEATURE_SET
from skewless.beam_pipelines.runtime.process import configure_logging

DESCRIPTION = "Print the feature cells the aggregate job wrote to Bigtable (JSON lines)."

JOB = Job(
    name="cells",
    summary="print the feature cells in Bigtable (JSON lines)",
    description=DESCRIPTION,
    beam=False,
    # Reading the row keys loads the feature core, which loads TensorFlow: the CLI absorbs
    # its start-up lines before the run.
    native_libraries=("tensorflow",),
)

DEFAULT_LIMIT = 20


def read(
    project: str, instance: str, table_id: str, family: str, prefix: str, limit: int
) -> list[dict]:
    """The cells of `family` under `prefix`, newest window end first; at most `limit` (0: all)."""
    from google.cloud.bigtable.row_set import RowSet

    from skewless.beam_pipelines.io.bigtable import decode_value, open_table, window_end_timestamp
    from skewless.transforms.aggregations import parse_row_key

    table = open_table(project, instance, table_id)
    row_set = RowSet()
    if prefix:
        row_set.add_row_range_with_prefix(prefix)
    cells = []
    for row in table.read_rows(row_set=row_set if prefix else None):
        columns = row.cells.get(family)
        if not columns:
            continue
        key = parse_row_key(row.row_key)
        cells.append(
            {
                "row_key": row.row_key.decode("utf-8"),
                "entity": f"{key.key_name}={key.key_value}",
                "window_end_ms": key.window_end_ms,
                "window_end": window_end_timestamp(key.window_end_ms).isoformat(),
                "values": {n.decode("utf-8"): decode_value(c[0].value) for n, c in columns.items()},
            }
        )
    cells.sort(key=lambda c: (-c["window_end_ms"], c["row_key"]))
    return cells[:limit] if limit else cells


def family_of(feature_set: str | None) -> str:
    """The column family of a feature set's cells: its name. Without `--feature_set`, the
    bundled default, as for the jobs that read raw events (options.feature_set_spec); an empty
    one is an error, as there."""
    from skewless.transforms.featureset import load_feature_set

    return load_feature_set(DEFAULT_FEATURE_SET if feature_set is None else feature_set).name


def run(argv: Sequence[str] | None = None) -> list[dict]:
    configure_logging()
    parser = argparse.ArgumentParser(
        prog="skewless cells", description=DESCRIPTION, allow_abbrev=False
    )
    parser.add_argument("--bigtable_project", required=True)
    parser.add_argument("--bigtable_instance", required=True)
    parser.add_argument("--bigtable_table", required=True)
    parser.add_argument(
        "--feature_set",
        help=f"The feature set whose cells to print: '{DEFAULT_FEATURE_SET}' (bundled, the "
        "default) or package.module:NAME, as given to aggregate.",
    )
    parser.add_argument(
        "--family", help="Column family. Default: the feature set's name (--feature_set)."
    )
    parser.add_argument("--prefix", default="", help="Row-key prefix: <key name>#<key value>#")
    parser.add_argument(
        "--limit",
        type=int,
        default=DEFAULT_LIMIT,
        help=f"At most this many cells, newest first (default {DEFAULT_LIMIT}; 0: all of them).",
    )
    args = parser.parse_args(argv)
    if args.limit < 0:
        parser.error("--limit must be >= 0 (0: all cells)")
    family = args.family or family_of(args.feature_set)
    cells = read(
        args.bigtable_project, args.bigtable_instance, args.bigtable_table, family,
        args.prefix, args.limit,
    )  # fmt: skip
    for cell in cells:
        print(json.dumps(cell))
    return cells


if __name__ == "__main__":
    launch(JOB, run)
