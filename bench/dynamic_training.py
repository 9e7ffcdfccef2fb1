"""The retraining loop on the bundled year (issue 23): a static model against monthly retraining.

Scenario "clean": `skewless retrain --start 2013-01-01 --end 2013-03-01` trains version 1 on
Jan-Feb (the static model); then at the first of every month from April to December `skewless
retrain --end <first of the month> --window 60d --holdout 7d` trains a candidate on the
trailing window and the gate promotes it (exit 0), refuses it (4) or validation stops it (3).
Every month from March to December is scored (AUC, log loss; prepare's examples of the whole
year, sliced by event time) with the static version 1 and with the version serving that month
(the highest published at its first day). Once, at SHUFFLED_MONTH, a candidate trained on
shuffled labels is retrained into a copy of the model directory: it must be refused.

Scenario "drift": the same year with `dep_delay` in seconds instead of minutes in every event
scheduled from 2013-07-01 on (a producer changing a field's unit). The clean scenario's model
directory as it was on July 1 (before that month's retrain) is copied and the monthly retrains
continue on the drifted events; July to December are scored on the drifted examples (events
whose dep_delay in seconds exceeds the schema's maximum are dead letters, not examples). The
streaming monitor's Beam step (MonitorServedTraffic, 1-hour windows of event time, the
DirectRunner in batch) reads July's served examples and the serving version's predictions,
drifted and clean: the first window naming the drifted feature, counted among the windows with
enough examples to be compared.

Prints a table and ends with one JSON line (also written to WORK_DIR/result.json). `--png`
draws AUC and log loss per month; `--redraw WORK_DIR/result.json --png P` redraws it only.
About 15 minutes on 2 shared cores at 5 epochs (each retrain 30-50 s).

    .venv/bin/python bench/dynamic_training.py [--epochs 5] [--work_dir DIR] \
        [--png docs/dynamic_training.png]
"""

from __future__ import annotations

import argparse
import csv
import glob
import io
import json
import os
import shutil
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import apache_beam as beam
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from apache_beam.options.pipeline_options import PipelineOptions

from skewless.beam_pipelines.commands.retrain import score_slice
from skewless.beam_pipelines.validation.monitoring import (
    MonitorServedTraffic,
    eval_mean_probability,
    load_monitor_reference,
)
from skewless.examples.flights import FLIGHTS, bundled_flights_path
from skewless.models import versions
from skewless.models.metrics import binary_metrics
from skewless.transforms.monitoring import DEFAULT_WINDOW_S, MIN_WINDOW_EXAMPLES

MONTHS = [f"2013-{m:02d}" for m in range(3, 13)]  # scored; the static model trains on Jan-Feb
SHUFFLED_MONTH = "2013-06"
DRIFT_START = "2013-07"
DRIFT_FEATURE = "dep_delay"
DRIFT_FACTOR = 60  # minutes -> seconds
OUTCOMES = {0: "promoted", 4: "refused", 3: "blocked"}  # retrain's exit codes
SKEWLESS = str(Path(sys.executable).parent / "skewless")


def first_of(month: str) -> str:
    return f"{month}-01T00:00:00+00:00"


def month_after(month: str) -> str:
    year, m = map(int, month.split("-"))
    return f"{year + m // 12}-{m % 12 + 1:02d}"


def skewless(args: list[str], log_path: str) -> int:
    with open(log_path, "wb") as log:
        return subprocess.run([SKEWLESS, *args], stdout=log, stderr=subprocess.STDOUT).returncode


def retrain(raw: str, model_dir: str, month: str, logs: str, epochs: int, *extra: str) -> dict:
    """One `skewless retrain` whose window ends at the first of `month` -> its outcome and why
    (the gate's reasons when refused, the blocking features when validation stopped it)."""
    scenario = os.path.basename(os.path.dirname(model_dir))  # clean, drift or shuffled
    prepared = os.path.join(model_dir, "prepared", month)
    window = list(extra) if "--start" in extra else ["--window", "60d", *extra]
    argv = ["retrain", "--input", raw, "--model_dir", model_dir, "--end", first_of(month),
            "--holdout", "7d", "--epochs", str(epochs), "--prepared_dir", prepared, *window]  # fmt: skip
    log = os.path.join(logs, f"retrain-{scenario}-{month}.log")
    started = time.monotonic()
    code = skewless(argv, log)
    if code not in OUTCOMES:
        raise SystemExit(f"retrain at {month} failed (exit {code}); see {log}")
    outcome = {"outcome": OUTCOMES[code], "why": why(model_dir, prepared, OUTCOMES[code])}
    print(f"  {scenario}: retrain at {first_of(month)[:10]}: {outcome['outcome']} (exit {code}, "
          f"{time.monotonic() - started:.0f} s) {outcome['why'] or ''}", flush=True)  # fmt: skip
    return outcome


def why(model_dir: str, prepared: str, outcome: str) -> list[str] | None:
    if outcome == "blocked":
        found = json.loads(Path(prepared, "validation", "anomalies.json").read_text())
        return sorted(f"{a['feature']}: {a['kind']}" for a in found if a["blocking"])
    if outcome == "refused":
        for path in glob.glob(os.path.join(model_dir, "refused", "*", "evaluation.json")):
            evaluation = json.loads(Path(path).read_text())
            if evaluation["prepared_dir"] == os.path.abspath(prepared):
                return evaluation["reasons"]
    return None


def newest(model_dir: str) -> int:
    return versions.list_versions(model_dir)[-1]


def write_drifted(raw: str, path: str) -> int:
    """The raw year with dep_delay x DRIFT_FACTOR in every event scheduled from DRIFT_START on
    (time_hour is UTC ISO-8601, so a string comparison orders it) -> rows changed."""
    changed = 0
    with zipfile.ZipFile(raw) as z, z.open(z.namelist()[0]) as f, open(path, "w") as out:
        reader = csv.DictReader(io.TextIOWrapper(f, encoding="utf-8", newline=""))
        writer = csv.DictWriter(out, fieldnames=reader.fieldnames, lineterminator="\n")
        writer.writeheader()
        for row in reader:
            if row["time_hour"] >= DRIFT_START and row[DRIFT_FEATURE] not in ("", "NA"):
                row[DRIFT_FEATURE] = str(int(row[DRIFT_FEATURE]) * DRIFT_FACTOR)
                changed += 1
            writer.writerow(row)
    return changed


def prepare_year(raw: str, out: str, logs: str, name: str) -> pa.Table:
    """prepare over the whole year -> its examples (features/), event_time as epoch ms."""
    log = os.path.join(logs, f"prepare-{name}.log")
    if skewless(["prepare", "--input", raw, "--output_dir", out], log):
        raise SystemExit(f"prepare of {raw} failed; see {log}")
    table = pq.read_table(os.path.join(out, "features"))
    ms = pc.cast(table.column("event_time"), pa.int64())  # timestamp[ms, tz=UTC]
    return table.set_column(table.schema.get_field_index("event_time"), "event_time", ms)


def epoch_ms(instant: str) -> int:
    import datetime as dt

    return int(dt.datetime.fromisoformat(instant).timestamp() * 1000)


def month_rows(table: pa.Table, month: str) -> pa.Table:
    t = table.column("event_time")
    start, end = epoch_ms(first_of(month)), epoch_ms(first_of(month_after(month)))
    return table.filter(pc.and_(pc.greater_equal(t, start), pc.less(t, end)))


def metrics(model_dir: str, version: int, rows: pa.Table) -> dict:
    path = versions.resolve(model_dir, version).path
    found = binary_metrics(rows.column(FLIGHTS.label).to_numpy(), score_slice(path, rows))
    return {"auc": round(found["auc"], 4), "log_loss": round(found["log_loss"], 4)}


def score_months(
    table: pa.Table, static_dir: str, model_dir: str, serving: dict, decisions: dict
) -> list[dict]:
    """Each month's examples with the static version 1 and the version serving that month."""
    out = []
    for month, version in serving.items():
        rows = month_rows(table, month)
        static = metrics(static_dir, 1, rows)
        same = (model_dir, version) == (static_dir, 1)
        dynamic = static if same else metrics(model_dir, version, rows)
        out.append({
            "month": month, "examples": rows.num_rows,
            "static_auc": static["auc"], "dynamic_auc": dynamic["auc"],
            "static_log_loss": static["log_loss"], "dynamic_log_loss": dynamic["log_loss"],
            "promoted": decisions[month]["outcome"] == "promoted",
            "retrain": decisions[month]["outcome"], "why": decisions[month]["why"],
            "dynamic_version": version,
        })  # fmt: skip
        print(f"  scored {month}: {out[-1]}", flush=True)
    return out


def monitor(rows: pa.Table, model_dir: str, version: int, out: str) -> dict:
    """MonitorServedTraffic over `rows` (served examples, event time in ms) and the serving
    version's predictions, on the DirectRunner in batch -> its anomaly records and the windows
    with enough examples to be compared."""
    served = versions.resolve(model_dir, version)
    reference = load_monitor_reference(
        served.metadata["prepared_dir"], FLIGHTS, eval_mean_probability(served.path)
    )
    probabilities = score_slice(served.path, rows)
    examples = rows.to_pylist()
    batches = [examples[i : i + 100] for i in range(0, len(examples), 100)]
    predictions = [
        {"event_time": e["event_time"], "probability": float(p), "model_version": version}
        for e, p in zip(examples, probabilities, strict=True)
    ]
    shutil.rmtree(out, ignore_errors=True)
    with beam.Pipeline(options=PipelineOptions(["--runner", "DirectRunner"])) as p:
        records = (
            p | "Batches" >> beam.Create(batches),
            p | "Predictions" >> beam.Create(predictions),
        ) | MonitorServedTraffic(FLIGHTS, reference)
        _ = records | beam.Map(json.dumps) | beam.io.WriteToText(os.path.join(out, "anomalies"))
    found = []
    for shard in sorted(glob.glob(os.path.join(out, "anomalies*"))):
        found += [json.loads(line) for line in Path(shard).read_text().splitlines()]
    hour = rows.column("event_time").to_numpy() // (DEFAULT_WINDOW_S * 1000)
    hours, counts = np.unique(hour, return_counts=True)
    compared = [int(h) * DEFAULT_WINDOW_S for h, n in zip(hours, counts, strict=True) if n >= MIN_WINDOW_EXAMPLES]
    return {"anomalies": found, "compared_window_starts_s": compared}


def first_named(
    result: dict, feature: str, quiet_in: dict | None = None
) -> tuple[str | None, int | None]:
    """(the first window naming `feature`, how many compared windows had closed by its end);
    with `quiet_in`, only windows whose hour another run did not name `feature` in."""
    import datetime as dt

    named = {r["window_start"] for r in (quiet_in or {}).get("anomalies", []) if r["feature"] == feature}  # fmt: skip
    starts = sorted(
        r["window_start"]
        for r in result["anomalies"]
        if r["feature"] == feature and r["window_start"] not in named
    )
    if not starts:
        return None, None
    first_s = dt.datetime.fromisoformat(starts[0]).timestamp()
    return starts[0], sum(1 for s in result["compared_window_starts_s"] if s <= first_s)


def by_feature(records: list[dict]) -> dict[str, int]:
    out: dict[str, int] = {}
    for r in records:
        key = f"{r['feature']}:{r['kind']}"
        out[key] = out.get(key, 0) + 1
    return dict(sorted(out.items()))


def monitor_note(drift: dict) -> str:
    named = drift["july_anomalies"].get(f"{DRIFT_FEATURE}:distribution_drift", 0)
    return (
        f"monitor (1-hour windows): {drift['feature']} named\n"
        f"in drifted July's window {drift['detected_after_windows']} and in {named} of its "
        f"{drift['july_compared_windows']} hours;\nin clean July: in "
        f"{drift['clean_july_windows_naming_it']} of {drift['clean_july_compared_windows']} hours"
    )


def draw(path: str, result: dict) -> None:
    clean, drift = result["months"], result["drift"]["months"]
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    markers = {"promoted": ("o", "promoted"), "refused": ("X", "refused by the gate"),
               "blocked": ("s", "stopped by validation")}  # fmt: skip
    fig, axes = plt.subplots(2, 1, figsize=(8.5, 7), sharex=True)
    x = {m["month"]: i for i, m in enumerate(clean)}
    for ax, metric in zip(axes, ("auc", "log_loss"), strict=True):
        for rows, style, name in ((clean, "-", "clean"), (drift, "--", "dep_delay in seconds from July")):
            xs = [x[m["month"]] for m in rows]
            ax.plot(xs, [m[f"static_{metric}"] for m in rows], style, color="0.45",
                    label=f"static (Jan-Feb), {name}")
            ax.plot(xs, [m[f"dynamic_{metric}"] for m in rows], style,
                    color="tab:blue" if rows is clean else "tab:red", label=f"retrained monthly, {name}")  # fmt: skip
            for m in rows:
                marker, _ = markers[m["retrain"]]
                ax.plot(x[m["month"]], m[f"dynamic_{metric}"], marker, ms=7, mfc="white",
                        color="tab:blue" if rows is clean else "tab:red")  # fmt: skip
        ax.axvline(x[DRIFT_START] - 0.5, color="tab:red", lw=0.8, ls=":")
        ax.set_ylabel({"auc": "AUC on the month", "log_loss": "log loss on the month"}[metric])
        if metric == "log_loss" and max(m["static_log_loss"] for m in drift) > 1.0:
            ax.set_yscale("log")
            ax.yaxis.set_major_locator(matplotlib.ticker.LogLocator(subs=(1.0, 2.0, 3.0, 5.0)))
            ax.yaxis.set_major_formatter(matplotlib.ticker.FormatStrFormatter("%g"))
            ax.yaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
    bottom = axes[0].get_ylim()[0]
    axes[0].text(x[DRIFT_START] - 0.45, bottom, " drift injected", color="tab:red", va="bottom")
    for marker, label in markers.values():
        axes[1].plot([], [], marker, mfc="white", color="0.3", ls="none", label=f"retrain: {label}")
    axes[1].legend(fontsize=7.5, ncol=2, loc="best")
    axes[1].set_xticks(range(len(clean)), [m["month"] for m in clean])
    axes[0].set_title(f"Static model vs monthly retraining on a 60-day window ({result['epochs']} epochs)")
    note = monitor_note(result["drift"])
    axes[1].text(0.01, 0.93, note, fontsize=7.5, va="top", transform=axes[1].transAxes)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def print_table(title: str, months: list[dict]) -> None:
    print(f"\n{title}")
    print(f"{'month':<9}{'examples':>9}{'static AUC':>12}{'dynamic AUC':>13}{'static LL':>11}"
          f"{'dynamic LL':>12}{'version':>9}  retrain at the month's start")  # fmt: skip
    for m in months:
        print(f"{m['month']:<9}{m['examples']:>9,}{m['static_auc']:>12.4f}{m['dynamic_auc']:>13.4f}"
              f"{m['static_log_loss']:>11.4f}{m['dynamic_log_loss']:>12.4f}{m['dynamic_version']:>9}  {m['retrain']}")  # fmt: skip


def clean_year(raw: str, work: str, logs: str, epochs: int) -> tuple[dict, dict, dict]:
    """Version 1 on Jan-Feb, then a retrain at the first of every month -> (outcome per month,
    version serving each month, the shuffled-labels check). Copies the model directory as it
    is on DRIFT_START's first day (before that retrain) to work/drift/models."""
    models = os.path.join(work, "clean", "models")
    start = ("--start", "2013-01-01T00:00:00+00:00")
    decisions = {MONTHS[0]: retrain(raw, models, MONTHS[0], logs, epochs, *start)}
    serving = {MONTHS[0]: newest(models)}
    shuffled = {}
    for month in MONTHS[1:]:
        if month == SHUFFLED_MONTH:  # into a copy: a refused candidate changes nothing anyway
            copy = os.path.join(work, "shuffled", "models")
            shutil.copytree(models, copy)
            before = versions.list_versions(copy)
            outcome = retrain(raw, copy, month, logs, epochs, "--shuffle_train_labels")
            shuffled = {"month": month, **outcome,
                        "versions_unchanged": versions.list_versions(copy) == before}  # fmt: skip
        if month == DRIFT_START:
            shutil.copytree(models, os.path.join(work, "drift", "models"))
        decisions[month] = retrain(raw, models, month, logs, epochs)
        serving[month] = newest(models)
    return decisions, serving, shuffled


def drift_year(drifted: str, models: str, logs: str, epochs: int) -> tuple[dict, dict]:
    """The monthly retrains from DRIFT_START on, on the drifted events."""
    decisions, serving = {}, {}
    for month in MONTHS[MONTHS.index(DRIFT_START) :]:
        decisions[month] = retrain(drifted, models, month, logs, epochs)
        serving[month] = newest(models)
    return decisions, serving


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--epochs", type=int, default=5, help="retrain's --epochs (its own default: 10)")
    parser.add_argument("--work_dir", default="out/bench/dynamic_training")
    parser.add_argument("--png", help="draw AUC and log loss per month to this PNG")
    parser.add_argument("--redraw", metavar="JSON", help="only draw --png from a run's result.json")
    args = parser.parse_args()
    if args.redraw:
        done = json.loads(Path(args.redraw).read_text())
        draw(args.png, done)
        return
    started = time.monotonic()
    work = os.path.abspath(args.work_dir)
    shutil.rmtree(work, ignore_errors=True)
    logs = os.path.join(work, "logs")
    os.makedirs(logs)
    raw = bundled_flights_path()
    clean_dir, drift_dir = (os.path.join(work, n, "models") for n in ("clean", "drift"))

    print(f"clean year ({raw}), {args.epochs} epochs per retrain", flush=True)
    decisions, serving, shuffled = clean_year(raw, work, logs, args.epochs)
    drifted = os.path.join(work, "flights_drift.csv")
    changed = write_drifted(raw, drifted)
    print(f"\ndrifted year: {DRIFT_FEATURE} x{DRIFT_FACTOR} in {changed:,} events from "
          f"{DRIFT_START}-01 ({drifted})", flush=True)  # fmt: skip
    drift_decisions, drift_serving = drift_year(drifted, drift_dir, logs, args.epochs)

    print("\nscoring", flush=True)
    clean_table = prepare_year(raw, os.path.join(work, "clean", "year"), logs, "clean")
    clean_months = score_months(clean_table, clean_dir, clean_dir, serving, decisions)
    drift_table = prepare_year(drifted, os.path.join(work, "drift", "year"), logs, "drift")
    drift_months = score_months(drift_table, clean_dir, drift_dir, drift_serving, drift_decisions)

    print("\nmonitoring July", flush=True)
    july = month_rows(clean_table, DRIFT_START)
    clean_july = monitor(july, clean_dir, serving[DRIFT_START], os.path.join(work, "monitor", "clean"))
    july = month_rows(drift_table, DRIFT_START)
    drift_july = monitor(july, drift_dir, drift_serving[DRIFT_START], os.path.join(work, "monitor", "drift"))
    window, after = first_named(drift_july, DRIFT_FEATURE)
    reaction = {"blocked": "stopped", "promoted": "adapted", "refused": "refused"}[
        drift_decisions[month_after(DRIFT_START)]["outcome"]
    ]
    clean_window, _ = first_named(clean_july, DRIFT_FEATURE)
    _, beyond_clean = first_named(drift_july, DRIFT_FEATURE, quiet_in=clean_july)

    print_table("clean year: each month scored with the static version 1 and the version serving it", clean_months)
    print_table(f"drifted year ({DRIFT_FEATURE} x{DRIFT_FACTOR} from {DRIFT_START}-01)", drift_months)
    gains = [m["dynamic_auc"] - m["static_auc"] for m in clean_months[1:]]
    print(f"\nclean, April-December: retrained minus static AUC, mean {np.mean(gains):+.4f}, "
          f"min {min(gains):+.4f}, max {max(gains):+.4f}")  # fmt: skip
    print(f"shuffled labels at {shuffled['month']}: {shuffled['outcome']}, versions unchanged: "
          f"{shuffled['versions_unchanged']}")  # fmt: skip
    for name, found in (("clean", clean_july), ("drifted", drift_july)):
        print(f"monitor, {name} July: {len(found['anomalies'])} anomalies in "
              f"{len(found['compared_window_starts_s'])} compared windows {by_feature(found['anomalies'])}")  # fmt: skip
    print(f"{DRIFT_FEATURE} first named in the drifted July window starting {window}, after {after} "
          f"compared window(s); {beyond_clean} counting only the hours the clean run did not name it "
          f"in (clean July first named it at {clean_window})")  # fmt: skip
    result = {
        "months": clean_months,
        "shuffled_candidate_refused": shuffled["outcome"] == "refused" and shuffled["versions_unchanged"],
        "drift": {
            "feature": DRIFT_FEATURE if window else None,
            "detected_after_windows": after,
            "retrain_stopped_or_adapted": reaction,
            "injected": f"{DRIFT_FEATURE} x{DRIFT_FACTOR} in events scheduled from {DRIFT_START}-01",
            "first_named_window": window,
            "detected_after_windows_where_clean_july_named_it_not": beyond_clean,
            "clean_july_first_named_window": clean_window,
            "clean_july_windows_naming_it": len(
                {r["window_start"] for r in clean_july["anomalies"] if r["feature"] == DRIFT_FEATURE}
            ),
            "clean_july_windows_with_an_anomaly": len({r["window_start"] for r in clean_july["anomalies"]}),
            "clean_july_compared_windows": len(clean_july["compared_window_starts_s"]),
            "july_anomalies": by_feature(drift_july["anomalies"]),
            "july_compared_windows": len(drift_july["compared_window_starts_s"]),
            "clean_july_anomalies": len(clean_july["anomalies"]),
            "clean_july_anomalies_by_feature": by_feature(clean_july["anomalies"]),
            "months": drift_months,
        },
        "shuffled": shuffled,
        "epochs": args.epochs,
        "elapsed_seconds": round(time.monotonic() - started),
    }
    if args.png:
        result["png"] = args.png
    line = json.dumps(result)
    Path(work, "result.json").write_text(line + "\n")
    if args.png:
        draw(args.png, result)
    print(line)


if __name__ == "__main__":
    main()
