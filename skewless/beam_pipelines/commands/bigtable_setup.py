"""`skewless bigtable-setup`: create the feature table and the feature set's column family (re-runnable).

GC rule of the family: at most one version, and a max age of
    largest window + allowed lateness + retention (default 7 days).
Bigtable measures the age from the cell timestamp, which is the window end W: a cell stays
readable for the retention after its window can no longer change. Stream scoring looks up the
window ending at W <= now, so a retention of a few periods would do; 7 days leaves room to
inspect and to re-score recent traffic. Backfilling OLD history into the table needs a retention
longer than its age (GC is lazy, but the data is not guaranteed to stay).

A feature set that declares reference tables also gets their families (skewless/transforms/reference.py,
written by `skewless publish-reference`):
- `{feature set}_ref` (slowly changing tables): every version, and a cell is collected only
  when it is older than the retention (counted from its timestamp, the row's valid_from) AND
  not the newest version of its column. So the row that is valid now is never collected, however
  old; an older version is kept for the retention, which must cover how far back events are
  scored (replaying OLD data, e.g. the bundled 2013 weather, needs a retention longer than its
  age).
- `{feature set}_static` (static tables): one version, no age limit (its cells are stamped 0).

A feature set that declares a prediction cache also gets `{feature set}_predictions`
(written by `skewless precompute`): one version, and the max age the PredictionCache declares
(`retention`), counted from the cells' time, the model version's training time.

Re-runs never shorten what a table keeps by accident: a family's max age only grows unless
`--allow_shorter_retention` is given (a shorter --retention_s without it is an error; without
--retention_s a longer existing max age is kept). Every family's rule before and after is
printed, so what changed is on the screen.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence

from apache_beam.options.pipeline_options import PipelineOptions

from skewless.beam_pipelines.io.bigtable import (
    BigtableOptions,
    describe_gc_rule,
    gc_max_age_s,
    gc_rule,
    open_table,
    reference_gc_rules,
    with_max_age,
)
from skewless.beam_pipelines.runtime.job import Job
from skewless.beam_pipelines.runtime.launch import launch
from skewless.beam_pipelines.runtime.options import (
    FeatureSetOptions,
    LatenessOptions,
    feature_set_spec,
)
from skewless.beam_pipelines.runtime.parsing import parse_job_options
from skewless.beam_pipelines.runtime.process import configure_logging
from skewless.transforms.featureset import FeatureSet, load_feature_set
from skewless.transforms.prediction_cache import cache_family
from skewless.transforms.reference import reference_family

LOG = logging.getLogger("skewless.bigtable_setup")
DEFAULT_RETENTION_S = 7 * 86_400
DESCRIPTION = (
    "Create the Bigtable table of the aggregate job and the feature set's column family, with a "
    "GC rule of one version and a max age of the largest window + the allowed lateness + the "
    "retention; and, if the feature set declares reference tables, their families: "
    "<feature set>_ref (every version up to the retention counted from valid_from, and always "
    "the newest) and <feature set>_static (one version); with a prediction cache, "
    "<feature set>_predictions (one version, the cache's declared retention). Safe to "
    "re-run: an existing table is kept and a family's max age only grows (see "
    "--allow_shorter_retention); each family's rule before and after is printed."
)


class BigtableSetupOptions(PipelineOptions):
    """bigtable-setup's own flags; --bigtable_*, --allowed_lateness_s and --feature_set are shared."""

    @classmethod
    def _add_argparse_args(cls, parser):
        parser.add_argument(
            "--retention_s",
            type=int,
            help="How long a cell stays after its window can no longer change; also how long a "
            "slowly changing reference row is kept once a newer version exists (counted from "
            f"its valid_from). Default: {DEFAULT_RETENTION_S} (7 days) for a new family; an "
            "existing family keeps a longer max age.",
        )
        parser.add_argument(
            "--allow_shorter_retention",
            action="store_true",
            help="Allow a re-run to shorten an existing family's max age (Bigtable may then "
            "delete the cells past it at once). Without it a shorter --retention_s is an error.",
        )


JOB = Job(
    name="bigtable-setup",
    summary="create the Bigtable table and its column families",
    description=DESCRIPTION,
    groups=(BigtableSetupOptions, BigtableOptions, LatenessOptions, FeatureSetOptions),
    required=("bigtable_project", "bigtable_instance", "bigtable_table"),
    beam=False,
)


class ShorterRetentionError(ValueError):
    """A re-run asked for a max age shorter than a family's current one, without the flag."""


def max_age_s(fs: FeatureSet, allowed_lateness_s: int, retention_s: int) -> int:
    return fs.max_window_ms // 1000 + allowed_lateness_s + retention_s


def wanted_rules(fs: FeatureSet, allowed_lateness_s: int, retention_s: int) -> dict:
    """{family: GC rule} for the feature set: its cells family and its reference families."""
    rules = {fs.name: gc_rule(max_age_s(fs, allowed_lateness_s, retention_s))}
    rules.update(reference_gc_rules(fs, retention_s))
    if fs.prediction_cache is not None:
        # Cached predictions: one version, collected the declared retention after the model
        # version was trained (their cells' time), whatever --retention_s says.
        rules[cache_family(fs)] = gc_rule(fs.prediction_cache.retention)
    return rules


def ensure_table(
    project: str,
    instance: str,
    table_id: str,
    fs: FeatureSet,
    allowed_lateness_s: int,
    retention_s: int | None,
    allow_shorter: bool = False,
) -> dict:
    """Create the table and the families if missing, else set their GC rules without shortening
    a max age (unless `allow_shorter`). `retention_s` None: the default for new families, and
    an existing family keeps a longer max age. Returns a summary with each family's rule
    before and after."""
    explicit = retention_s is not None
    rules = wanted_rules(
        fs, allowed_lateness_s, retention_s if explicit else DEFAULT_RETENTION_S
    )
    table = open_table(project, instance, table_id, admin=True)
    created_table = not table.exists()
    existing = {} if created_table else table.list_column_families()
    changes = {}
    for name, rule in rules.items():
        before = existing[name].gc_rule if name in existing else None
        rule, action = _next_rule(name, before, rule, name in existing, explicit, allow_shorter)
        rules[name] = rule
        changes[name] = {
            "action": action,
            "before": describe_gc_rule(before) if name in existing else None,
            "after": describe_gc_rule(rule),
        }
    if created_table:
        table.create(column_families=rules)
    else:
        for name, rule in rules.items():
            family = table.column_family(name, gc_rule=rule)
            if name not in existing:
                family.create()
            elif changes[name]["before"] != changes[name]["after"]:
                family.update()
    for name, change in changes.items():
        LOG.info("family %s: %s (%s -> %s)", name, change["action"], change["before"], change["after"])
    summary = {
        "table": table_id,
        "family": fs.name,
        "created_table": created_table,
        "created_family": changes[fs.name]["action"] == "created",
        "max_age_s": int(gc_max_age_s(rules[fs.name])),
        "max_versions": 1,
        "families": changes,
    }
    tables_of: dict[str, list] = {}
    for ref in fs.references:
        tables_of.setdefault(reference_family(fs, ref), []).append(ref)
    if tables_of:
        summary["reference_families"] = {
            name: {
                "created": changes[name]["action"] == "created",
                "static": refs[0].valid_from is None,
                "max_age_s": None
                if refs[0].valid_from is None
                else int(gc_max_age_s(rules[name])),
                # _ref: every version within the max age, and the newest one always.
                "max_versions": 1 if refs[0].valid_from is None else None,
                "keeps_newest_version": True,
                "tables": [ref.name for ref in refs],
            }
            for name, refs in tables_of.items()
        }
    if fs.prediction_cache is not None:
        name = cache_family(fs)
        summary["prediction_cache_family"] = {
            "name": name,
            "created": changes[name]["action"] == "created",
            "max_age_s": int(gc_max_age_s(rules[name])),
            "max_versions": 1,
        }
    return summary


def _next_rule(name: str, before, wanted, exists: bool, explicit: bool, allow_shorter: bool):
    """(rule to set, action) for one family: the wanted rule, unless it would shorten the
    existing max age (kept without an explicit retention, refused with one)."""
    if not exists:
        return wanted, "created"
    old_age, new_age = gc_max_age_s(before), gc_max_age_s(wanted)
    shorter = new_age is not None and (old_age is None or new_age < old_age)
    if shorter and not allow_shorter:
        if explicit:
            raise ShorterRetentionError(
                f"family {name!r} keeps cells up to {_age(old_age)}; the options ask for "
                f"{_age(new_age)}, and Bigtable may delete the cells in between at once: give "
                "--allow_shorter_retention to shorten it, or a longer --retention_s"
            )
        wanted = with_max_age(wanted, old_age) if old_age is not None else before
        action = "kept longer max age"
    elif shorter:
        action = "shortened"
    elif new_age is not None and old_age is not None and new_age > old_age:
        action = "lengthened"
    else:
        action = "updated"
    if describe_gc_rule(before) == describe_gc_rule(wanted):
        return before, "unchanged" if action == "updated" else action
    return wanted, action


def _age(seconds: float | None) -> str:
    if seconds is None:
        return "no age limit"
    return f"{int(seconds) if seconds.is_integer() else seconds} s"


def run(argv: Sequence[str] | None = None) -> dict:
    configure_logging()
    options = parse_job_options(argv, JOB)
    bt = options.view_as(BigtableOptions)
    lateness = options.view_as(LatenessOptions).allowed_lateness_s
    setup = options.view_as(BigtableSetupOptions)
    if lateness < 0 or (setup.retention_s is not None and setup.retention_s < 0):
        raise SystemExit("skewless bigtable-setup: lateness and retention must be >= 0")
    fs = load_feature_set(feature_set_spec(options))
    try:
        summary = ensure_table(
            bt.bigtable_project,
            bt.bigtable_instance,
            bt.bigtable_table,
            fs,
            lateness,
            setup.retention_s,
            setup.allow_shorter_retention,
        )
    except ShorterRetentionError as exc:
        raise SystemExit(f"skewless bigtable-setup: {exc}") from None
    LOG.info("bigtable-setup: %s", summary)
    print(json.dumps(summary))
    return summary


if __name__ == "__main__":
    launch(JOB, run)
