"""`make mutation`: mutmut over skewless/transforms/ and skewless/models/versions.py, then a report per file.

    .venv/bin/python scripts/mutation.py [--files skewless/transforms/operations.py ...] [--jobs 1]
    .venv/bin/python scripts/mutation.py --report-only

Mutmut (configured in pyproject.toml, [tool.mutmut]) copies the sources to mutants/, runs the
fast tests once to learn which tests run which function, then runs each mutant against those
tests only (`-x`, stopping at the first failure). This script starts from a clean mutants/
(results of older sources would be stale), runs the mutants of the given files (default: every
file mutmut is configured for), and writes out/mutation/report.md and report.json: killed /
survived / timeout / no tests per file, each survivor with its diff. The last line printed is
the summary as one JSON object.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from collections import Counter, defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "out" / "mutation"
MUTMUT = [sys.executable, "-m", "mutmut"]

# mutmut's exit codes per mutant (mutmut/stats.py), folded into the report's columns.
STATUS = {1: "killed", 3: "killed", 0: "survived", 36: "timeout", 24: "timeout", -24: "timeout",
          152: "timeout", 255: "timeout", 5: "no tests", 33: "no tests", 34: "skipped",
          37: "killed", None: "not checked"}  # fmt: skip
COLUMNS = ("killed", "survived", "timeout", "no tests", "other")


def module_glob(path: str) -> str:
    """skewless/transforms/operations.py -> skewless.transforms.operations.* (mutmut's mutant names)."""
    return path.removesuffix(".py").replace("/", ".") + ".*"


def results(files: list[str] | None) -> dict[str, dict[str, int | None]]:
    """{source file: {mutant name: exit code}} from mutants/**/*.py.meta."""
    out = {}
    for meta in sorted((ROOT / "mutants").rglob("*.py.meta")):
        source = str(meta.relative_to(ROOT / "mutants")).removesuffix(".meta")
        if files and source not in files:
            continue
        out[source] = json.loads(meta.read_text())["exit_code_by_key"]
    return out


def diff_of(name: str) -> str:
    shown = subprocess.run([*MUTMUT, "show", name], cwd=ROOT, capture_output=True, text=True)
    return shown.stdout.strip()


def report(files: list[str] | None, seconds: float | None, command: str) -> dict:
    by_file = results(files)
    table: dict[str, Counter] = defaultdict(Counter)
    survivors: dict[str, list[str]] = defaultdict(list)
    for source, codes in by_file.items():
        for name, code in sorted(codes.items()):
            status = STATUS.get(code, "other")
            table[source][status if status in COLUMNS else "other"] += 1
            if status in ("survived", "timeout", "no tests"):
                survivors[source].append(name)
    total = sum((table[f] for f in table), Counter())
    summary = {
        "command": command,
        "seconds": None if seconds is None else round(seconds),
        "mutants": sum(total.values()),
        **{c: total[c] for c in COLUMNS},
        "files": {f: dict(table[f]) for f in sorted(table)},
        "survivors": {f: names for f, names in sorted(survivors.items())},
    }
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "report.json").write_text(json.dumps(summary, indent=2) + "\n")
    lines = [
        "# Mutation report",
        "",
        f"`{command}`" + (f": {summary['seconds']} s" if seconds is not None else ""),
        "",
        "| file | mutants | " + " | ".join(COLUMNS) + " |",
        "|---|---|" + "---|" * len(COLUMNS),
    ]
    for source in sorted(table):
        row = table[source]
        lines.append(
            f"| {source} | {sum(row.values())} | " + " | ".join(str(row[c]) for c in COLUMNS) + " |"
        )
    lines.append(
        f"| **all** | {summary['mutants']} | " + " | ".join(str(total[c]) for c in COLUMNS) + " |"
    )
    for source, names in sorted(survivors.items()):
        lines += ["", f"## Not killed in {source}", ""]
        for name in names:
            status = STATUS.get(by_file[source][name], "other")
            lines += [f"### {name} ({status})", "", "```diff", diff_of(name), "```", ""]
    (OUT / "report.md").write_text("\n".join(lines) + "\n")
    return summary


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--files", nargs="*", default=None, help="source files (default: all)")
    parser.add_argument("--jobs", type=int, default=1, help="mutants run at once (default 1)")
    parser.add_argument("--report-only", action="store_true", help="report the last run")
    args = parser.parse_args(argv)
    files = args.files or None
    command = "make mutation" + (f" FILES='{' '.join(files)}'" if files else "")
    seconds = None
    if not args.report_only:
        shutil.rmtree(ROOT / "mutants", ignore_errors=True)
        run = [*MUTMUT, "run", "--max-children", str(args.jobs)]
        run += [module_glob(f) for f in files or []]
        start = time.monotonic()
        code = subprocess.run(run, cwd=ROOT).returncode
        seconds = time.monotonic() - start
        if code != 0:
            print(f"mutmut run failed (exit {code})", file=sys.stderr)
            return code
    summary = report(files, seconds, command)
    print(f"report: {OUT / 'report.md'}")
    print(json.dumps({k: v for k, v in summary.items() if k != "survivors"}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
