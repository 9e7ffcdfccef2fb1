"""How much of Nov-Dec a prediction cache keyed like flights_schedule would answer (issue 22).

Every scheduled flight of the bundled year is a booking request, cancelled ones included.
Its cache key is `CACHE_KEY_FIELDS` (carrier, origin, dest, hour, distance_band), computed by the feature set's own record checks and `derive`, as prepare
and the scorers compute it. Prints the distinct keys of Jan-Oct and of Nov-Dec, then the
share of Nov-Dec requests whose key is among the N most frequent keys, the keys chosen
(a) from Nov-Dec itself (the schedule is published ahead) and (b) from Sep-Oct (a past
period), for N = 100, 1,000, 10,000 and all keys; ends with one JSON line of the figures.

With `--scores DIR` (a `skewless score --output DIR` run of a flights_schedule model) it
also checks that the cache would be exact: every request of one key got the same
probability (the largest spread within a key is printed). `--key_fields` measures the coverage of
another key instead (e.g. with day_of_week, which the model does not read). `--png` draws the
share of Nov-Dec answered against N, for both choices of period (log scale).

    .venv/bin/python bench/schedule_cache_coverage.py [--scores out/scores] [--png coverage.png]
"""

from __future__ import annotations

import argparse
import json
import time
from collections import Counter

import pandas as pd

from skewless.examples.flights_schedule import CACHE_KEY_FIELDS, FLIGHTS_SCHEDULE
from skewless.transforms.record_checks import RecordChecker

TOP_N = (100, 1_000, 10_000)
FIELDS = (*CACHE_KEY_FIELDS, "day_of_week")  # the key's, and a field the key could take
EVAL_START = "2013-11-01T00:00:00+00:00"
PAST_START = "2013-09-01T00:00:00+00:00"


def requests(path: str) -> pd.DataFrame:
    """Every record of the raw file -> its cache key, flight and scheduled departure (ms)."""
    checker = RecordChecker(FLIGHTS_SCHEDULE)
    raw = pd.read_csv(path, keep_default_na=True)
    rows = []
    for record in raw.astype(object).where(raw.notna(), None).to_dict("records"):
        event = checker.derive(checker.typed(record))
        rows.append((*(event[k] for k in FIELDS), event["flight"], event["event_time"]))
    return pd.DataFrame(rows, columns=[*FIELDS, "flight", "event_time"])


def ms(instant: str) -> int:
    return int(pd.Timestamp(instant).value // 1_000_000)


def coverage(served: pd.Series, chosen_from: pd.Series) -> dict[str, float]:
    """Share of `served` keys among the N most frequent of `chosen_from` (ties by key)."""
    counts = Counter(chosen_from)
    ranked = [k for k, _ in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))]
    out = {}
    for n in (*TOP_N, None):
        cached = set(ranked if n is None else ranked[:n])
        out["all" if n is None else str(n)] = round(float(served.isin(cached).mean()), 4)
    return out


def prediction_spread(scores_dir: str, frame: pd.DataFrame) -> dict:
    """The largest spread of probabilities within one cache key among scored requests."""
    predictions = pd.read_parquet(f"{scores_dir}/predictions")
    departure = predictions.scheduled_departure
    if departure.dtype.kind == "M":
        epoch = pd.Timestamp(0, tz="UTC")
        departure = (departure - epoch) // pd.Timedelta(milliseconds=1)
    predictions = predictions.assign(scheduled_departure=departure.astype("int64"))
    requests_by_key = frame.rename(columns={"event_time": "scheduled_departure"})
    keys = list(FLIGHTS_SCHEDULE.example_key)
    joined = predictions[[*keys, "probability"]].merge(
        requests_by_key, on=keys, how="inner", validate="one_to_one"
    )
    spread = joined.groupby(list(CACHE_KEY_FIELDS)).probability.agg(lambda p: p.max() - p.min())
    return {
        "predictions": len(predictions),
        "predictions_joined": len(joined),
        "keys_scored": int(spread.size),
        "max_spread_within_key": float(spread.max()),
    }


def curve(served: pd.Series, chosen_from: pd.Series) -> tuple[list[int], list[float]]:
    """Share of `served` answered by the N most frequent keys of `chosen_from`, every N."""
    counts = served.value_counts()
    ranked = [k for k, _ in sorted(Counter(chosen_from).items(), key=lambda kv: (-kv[1], kv[0]))]
    answered = counts.reindex(ranked, fill_value=0).cumsum() / len(served)
    return list(range(1, len(ranked) + 1)), answered.tolist()


def draw_curves(path: str, served: pd.Series, periods: dict[str, pd.Series]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.2))
    for label, chosen_from in periods.items():
        n, share = curve(served, chosen_from)
        ax.plot(n, share, label=label)
    for n in TOP_N:
        ax.axvline(n, color="0.85", lw=0.8, zorder=0)
    ax.set_xscale("log")
    ax.set_xlabel("keys precomputed (the N most frequent)")
    ax.set_ylabel("share of Nov-Dec requests answered")
    ax.set_ylim(0, 1)
    ax.set_title("flights_schedule prediction cache: Nov-Dec served from the cache")
    ax.legend(loc="upper left")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--input", default=FLIGHTS_SCHEDULE.resolve_default_input())
    parser.add_argument("--scores", help="a `skewless score --output` directory to check")
    parser.add_argument(
        "--key_fields",
        default=",".join(CACHE_KEY_FIELDS),
        help=f"the coverage of another key: some of {', '.join(FIELDS)}, comma-separated",
    )
    parser.add_argument("--png", help="draw the coverage curves (N = 1 .. all keys) to this PNG")
    args = parser.parse_args()
    key_fields = args.key_fields.split(",")
    unknown = sorted(set(key_fields) - set(FIELDS))
    if unknown:
        parser.error(f"--key_fields: {unknown} not among {', '.join(FIELDS)}")
    started = time.monotonic()
    frame = requests(args.input)
    key = frame[key_fields].astype(str).agg("|".join, axis=1)
    t = frame.event_time
    train, served = key[t < ms(EVAL_START)], key[t >= ms(EVAL_START)]
    past = key[(t >= ms(PAST_START)) & (t < ms(EVAL_START))]
    figures = {
        "key_fields": key_fields,
        "requests": len(frame),
        "requests_jan_oct": len(train),
        "requests_nov_dec": len(served),
        "keys_jan_oct": int(train.nunique()),
        "keys_sep_oct": int(past.nunique()),
        "keys_nov_dec": int(served.nunique()),
        "nov_dec_share_top_keys_of_nov_dec": coverage(served, served),
        "nov_dec_share_top_keys_of_sep_oct": coverage(served, past),
        "nov_dec_share_keys_of_jan_oct": round(float(served.isin(set(train)).mean()), 4),
    }
    if args.scores:
        figures["exactness"] = prediction_spread(args.scores, frame)
    if args.png:
        draw_curves(args.png, served, {"keys from Nov-Dec (the schedule, known ahead)": served,
                                       "keys from Sep-Oct (a past period)": past})  # fmt: skip
        figures["png"] = args.png
    figures["elapsed_seconds"] = round(time.monotonic() - started, 1)
    for name, value in figures.items():
        print(f"{name}: {value}")
    print(json.dumps(figures))


if __name__ == "__main__":
    main()
