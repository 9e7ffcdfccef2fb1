"""Benchmark: the record checks and derive per record, one record at a time against Arrow
batches of each size.

    python bench/record_checks.py [--rows 16384] [--sizes 1,16,64,256,1024,16384] [--repeat 3]

The streaming jobs check each message alone (`CheckRecords(fs)`: a dict at a time); the batch
jobs check a reader's Arrow batch column by column (`CheckRecords(fs, batches=True)`, with
`derive_batch`). Both run here in this process (CheckRecordsFn called directly, one bundle) on
the first --rows flights of the bundled year: as dicts one at a time, and cut into batches of
each size. A batch pays a fixed cost (each rule a pyarrow call per column, the derive, the
event batch) that its rows share: the size from which the columnar checks are the cheaper
tells whether a streaming bundle (a few to a few hundred messages at 400 events/s) would gain
from being checked as one batch. Best of --repeat. The last line is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


class _Counter:
    def __init__(self) -> None:
        self.value = 0

    def inc(self, n: int = 1) -> None:
        self.value += n


def seconds(fs, elements: list, batches: bool) -> float:
    """CheckRecordsFn over the elements in one bundle, its output drained."""
    from skewless.transforms.record_checks import CheckRecordsFn

    fn = CheckRecordsFn(fs, batches=batches)
    fn.setup()
    for name in ("_read", "_valid", "_rejected", "_not_events"):
        setattr(fn, name, _Counter())
    started = time.perf_counter()
    fn.start_bundle()
    for element in elements:
        for _ in fn.process(element):
            pass
    for _ in fn.finish_bundle() or []:
        pass
    took = time.perf_counter() - started
    assert fn._read.value == sum(
        len(e.positions) if hasattr(e, "positions") else 1 for e in elements
    )
    return took


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("--rows", type=int, default=16384)
    parser.add_argument("--sizes", default="1,16,64,256,1024,16384")
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()

    import pyarrow as pa

    from skewless.beam_pipelines.io.files import read_file_records
    from skewless.examples.flights import FLIGHTS, bundled_flights_path
    from skewless.transforms.record_checks import iter_raw_records
    from skewless.transforms.records import RawBatch

    first = next(iter(read_file_records(bundled_flights_path(), "csv", FLIGHTS)))
    table = pa.Table.from_batches([first.batch]).slice(0, args.rows).combine_chunks()
    n = table.num_rows
    whole = RawBatch(table.to_batches()[0], "flights.csv", list(range(n)), "line")
    dicts = [raw for _, raw, _ in iter_raw_records(whole)]  # as parsed messages arrive

    def best(elements, batches: bool) -> float:
        return min(seconds(FLIGHTS, elements, batches) for _ in range(args.repeat)) / n * 1e6

    one_at_a_time = best(dicts, False)
    columnar = {}
    for size in (int(s) for s in args.sizes.split(",")):
        parts = [
            RawBatch(table.slice(i, size).to_batches()[0], "flights.csv", list(range(i, min(i + size, n))), "line")
            for i in range(0, n, size)
        ]
        columnar[size] = best(parts, True)
    print(f"{n:,} flights; µs per record, best of {args.repeat}")
    print(f"{'one record at a time (dicts, the streaming path)':<52}{one_at_a_time:>9.2f}")
    for size, us in columnar.items():
        print(f"{f'Arrow batches of {size:,} rows, columnar':<52}{us:>9.2f}")
    cheaper = [size for size, us in columnar.items() if us < one_at_a_time]
    print(f"columnar is the cheaper from batches of {min(cheaper):,} rows" if cheaper else "columnar is never the cheaper")
    print(
        json.dumps(
            {
                "rows": n,
                "one_at_a_time_us": round(one_at_a_time, 2),
                "columnar_us": {str(k): round(v, 2) for k, v in columnar.items()},
                "columnar_cheaper_from": min(cheaper) if cheaper else None,
            }
        )
    )


if __name__ == "__main__":
    main()
