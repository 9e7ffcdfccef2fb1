"""The `skewless` console entry point: one subcommand per job."""

from __future__ import annotations

import importlib
import sys

JOBS = {
    "prepare": (
        "beam_pipelines.prepare",
        "batch: raw events -> training data (TFRecords + transform)",
    ),
    "aggregate": (
        "beam_pipelines.aggregate",
        "streaming: Pub/Sub events -> windowed aggregates in Bigtable",
    ),
    "bigtable-setup": (
        "beam_pipelines.bigtable_setup",
        "create the Bigtable table and column family",
    ),
    "replay": ("beam_pipelines.replay", "publish events (default: bundled flights) to Pub/Sub"),
    "train": ("models.train", "train a model on prepared data; export it with its transform graph"),
    "report": ("models.report", "print a model + scoring report and write a PNG chart"),
    "score": ("beam_pipelines.score", "batch or streaming scoring with RunInference"),
}


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in JOBS:
        lines = [f"  {name:<16} {desc}" for name, (_, desc) in JOBS.items()]
        print("usage: skewless <command> [options]   (skewless <command> --help for its options)\n")
        print("commands:\n" + "\n".join(lines))
        if argv and argv[0] not in ("-h", "--help"):
            raise SystemExit(f"\nskewless: unknown command {argv[0]!r}")
        raise SystemExit(0 if argv else 2)
    module = importlib.import_module(JOBS[argv[0]][0])
    module.run(argv[1:])


if __name__ == "__main__":
    main()
