"""`skewless bigtable-setup`: create the feature table and the feature set's column family (re-runnable).

GC rule of the family: at most one version, and a max age of
    largest window + allowed lateness + retention (default 7 days).
Bigtable measures the age from the cell timestamp, which is the window end W: a cell stays
readable for the retention after its window can no longer change. Stream scoring looks up the
window ending at W <= now, so a retention of a few periods would do; 7 days leaves room to
inspect and to re-score recent traffic. Backfilling OLD history into the table needs a retention
longer than its age (GC is lazy, but the data is not guaranteed to stay).

A feature set that declares reference tables also gets their families (transforms/reference.py,
written by `skewless publish-reference`):
- `{feature set}_ref` (slowly changing tables): no version limit (an as-of read needs the row
  valid at t - D_ref, not only the latest) and a max age of the retention, counted from the
  cell timestamp, which is the row's valid_from. So a version older than the retention may be
  collected even while it is still the valid row of its key: the retention must exceed both the
  longest time a row stays current and how far back events are scored; publishing or replaying
  OLD data (e.g. the bundled 2013 weather) needs a retention longer than its age.
- `{feature set}_static` (static tables): one version, no age limit (its cells are stamped 0).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence

from apache_beam.options.pipeline_options import PipelineOptions

from beam_pipelines.common import configure_logging, parse_job_options
from beam_pipelines.io.bigtable import BigtableOptions, gc_rule, open_table, reference_gc_rules
from beam_pipelines.options import FeatureSetOptions, LatenessOptions, feature_set_spec
from transforms.featureset import FeatureSet, load_feature_set
from transforms.reference import reference_family

LOG = logging.getLogger("skewless.bigtable_setup")
DEFAULT_RETENTION_S = 7 * 86_400
DESCRIPTION = (
    "Create the Bigtable table of the aggregate job and the feature set's column family, with a "
    "GC rule of one version and a max age of the largest window + the allowed lateness + the "
    "retention; and, if the feature set declares reference tables, their families: "
    "<feature set>_ref (every version, max age = the retention counted from valid_from) and "
    "<feature set>_static (one version). Safe to re-run: an existing table is kept and the "
    "families' GC rules updated."
)


class BigtableSetupOptions(PipelineOptions):
    """bigtable-setup's own flag; --bigtable_*, --allowed_lateness_s and --feature_set are shared."""

    @classmethod
    def _add_argparse_args(cls, parser):
        parser.add_argument(
            "--retention_s",
            type=int,
            default=DEFAULT_RETENTION_S,
            help="How long a cell stays after its window can no longer change; also the max age "
            "of a slowly changing reference row, counted from its valid_from.",
        )


def max_age_s(fs: FeatureSet, allowed_lateness_s: int, retention_s: int) -> int:
    return fs.max_window_ms // 1000 + allowed_lateness_s + retention_s


def ensure_table(
    project: str, instance: str, table_id: str, fs: FeatureSet, allowed_lateness_s: int, retention_s: int
) -> dict:
    """Create the table and the families if missing, else set their GC rules. Returns a summary."""
    rules = {fs.name: gc_rule(max_age_s(fs, allowed_lateness_s, retention_s))}
    rules.update(reference_gc_rules(fs, retention_s))
    table = open_table(project, instance, table_id, admin=True)
    created_table = False
    if not table.exists():
        table.create(column_families=rules)
        created_table = True
        created = set(rules)
    else:
        families = table.list_column_families()
        created = set()
        for name, rule in rules.items():
            family = table.column_family(name, gc_rule=rule)
            if name in families:
                family.update()
            else:
                family.create()
                created.add(name)
    summary = {
        "table": table_id,
        "family": fs.name,
        "created_table": created_table,
        "created_family": fs.name in created,
        "max_age_s": max_age_s(fs, allowed_lateness_s, retention_s),
        "max_versions": 1,
    }
    tables_of: dict[str, list] = {}
    for ref in fs.references:
        tables_of.setdefault(reference_family(fs, ref), []).append(ref)
    if tables_of:
        summary["reference_families"] = {
            name: {
                "created": name in created,
                "static": refs[0].valid_from is None,
                "max_age_s": None if refs[0].valid_from is None else retention_s,
                "max_versions": 1 if refs[0].valid_from is None else None,
                "tables": [ref.name for ref in refs],
            }
            for name, refs in tables_of.items()
        }
    return summary


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
