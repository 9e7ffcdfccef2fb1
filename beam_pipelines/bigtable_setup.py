"""`skewless bigtable-setup`: create the feature table and the feature set's column family (re-runnable).

GC rule of the family: at most one version, and a max age of
    largest window + allowed lateness + retention (default 7 days).
Bigtable measures the age from the cell timestamp, which is the window end W: a cell stays
readable for the retention after its window can no longer change. Stream scoring looks up the
window ending at W <= now, so a retention of a few periods would do; 7 days leaves room to
inspect and to re-score recent traffic. Backfilling OLD history into the table needs a retention
longer than its age (GC is lazy, but the data is not guaranteed to stay).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence

from apache_beam.options.pipeline_options import PipelineOptions

from beam_pipelines.common import configure_logging, parse_job_options
from beam_pipelines.io.bigtable import BigtableOptions, gc_rule, open_table
from beam_pipelines.options import FeatureSetOptions, LatenessOptions, feature_set_spec
from transforms.featureset import FeatureSet, load_feature_set

LOG = logging.getLogger("skewless.bigtable_setup")
DEFAULT_RETENTION_S = 7 * 86_400
DESCRIPTION = (
    "Create the Bigtable table of the aggregate job and the feature set's column family, with a "
    "GC rule of one version and a max age of the largest window + the allowed lateness + the "
    "retention. Safe to re-run: an existing table is kept and the family's GC rule updated."
)


class BigtableSetupOptions(PipelineOptions):
    """bigtable-setup's own flag; --bigtable_*, --allowed_lateness_s and --feature_set are shared."""

    @classmethod
    def _add_argparse_args(cls, parser):
        parser.add_argument(
            "--retention_s",
            type=int,
            default=DEFAULT_RETENTION_S,
            help="How long a cell stays after its window can no longer change.",
        )


def max_age_s(fs: FeatureSet, allowed_lateness_s: int, retention_s: int) -> int:
    return fs.max_window_ms // 1000 + allowed_lateness_s + retention_s


def ensure_table(
    project: str, instance: str, table_id: str, fs: FeatureSet, allowed_lateness_s: int, retention_s: int
) -> dict:
    """Create the table and family if missing, else set the family's GC rule. Returns a summary."""
    rule = gc_rule(max_age_s(fs, allowed_lateness_s, retention_s))
    table = open_table(project, instance, table_id, admin=True)
    created_table = created_family = False
    if not table.exists():
        table.create(column_families={fs.name: rule})
        created_table = created_family = True
    else:
        families = table.list_column_families()
        family = table.column_family(fs.name, gc_rule=rule)
        if fs.name in families:
            family.update()
        else:
            family.create()
            created_family = True
    return {
        "table": table_id,
        "family": fs.name,
        "created_table": created_table,
        "created_family": created_family,
        "max_age_s": max_age_s(fs, allowed_lateness_s, retention_s),
        "max_versions": 1,
    }


def run(argv: Sequence[str] | None = None) -> dict:
    configure_logging()
    options = parse_job_options(
        argv,
        prog="skewless bigtable-setup",
        description=DESCRIPTION,
        groups=(BigtableSetupOptions, BigtableOptions, LatenessOptions, FeatureSetOptions),
        required=(
            (BigtableOptions, "bigtable_project"),
            (BigtableOptions, "bigtable_instance"),
            (BigtableOptions, "bigtable_table"),
        ),
    )
    bt = options.view_as(BigtableOptions)
    lateness = options.view_as(LatenessOptions).allowed_lateness_s
    retention = options.view_as(BigtableSetupOptions).retention_s
    if lateness < 0 or retention < 0:
        raise SystemExit("skewless bigtable-setup: lateness and retention must be >= 0")
    fs = load_feature_set(feature_set_spec(options))
    summary = ensure_table(
        bt.bigtable_project, bt.bigtable_instance, bt.bigtable_table, fs, lateness, retention
    )
    LOG.info("bigtable-setup: %s", summary)
    print(json.dumps(summary))
    return summary


if __name__ == "__main__":
    run()
