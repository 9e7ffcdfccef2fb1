"""`skewless validate` of local files on the local default, in this process.

A month of data is validated in well under a second, while loading Beam alone takes about two
and its local runner adds a fixed start-up to every run. So when a run names only local paths
(`--input` files or another prepare's `--prepared_dir`), no `--runner` and no other option,
the CLI runs it here: the same steps as the Beam job (validate.py) in one process, with the
same functions, one file after another: read_inferred, the statistics accumulator the job's
CombineFn wraps, check_statistics, and the same output files. Anything else (a `--runner`, a
gs:// path, BigQuery, a serving log, a Beam option) runs the Beam job.
"""

from __future__ import annotations

import argparse
import logging
from collections.abc import Sequence

from skewless.beam_pipelines.io import storage
from skewless.beam_pipelines.io.files import FORMATS, check_input, detect_format
from skewless.beam_pipelines.runtime.process import before_run, check_output_dir, configure_logging
from skewless.beam_pipelines.validation.baseline import (
    FEATURES,
    RAW,
    check_statistics,
    conclude,
    feature_set_of,
    load_baseline,
    report_title,
)
from skewless.beam_pipelines.validation.files import (
    ANOMALIES_FILE,
    NEW_DATASET,
    NEW_STATISTICS_FILE,
    REPORT_FILE,
    features_glob,
    statistics_list,
    write_anomalies,
    write_statistics,
    write_text,
)
from skewless.beam_pipelines.validation.read_as_is import read_inferred
from skewless.transforms.statistics import StatisticsAccumulator

LOG = logging.getLogger("skewless.validate")
_FLAGS = (
    "--baseline",
    "--baseline_schema",
    "--input",
    "--input_format",
    "--prepared_dir",
    "--output_dir",
    "--feature_set",
)


def local_options(args: Sequence[str]) -> argparse.Namespace | None:
    """The options of a run this module can do, else None (the Beam job runs, and reports
    any problem with the options as it always does)."""
    parser = argparse.ArgumentParser(add_help=False, allow_abbrev=False, exit_on_error=False)
    for flag in _FLAGS:
        parser.add_argument(flag)
    try:
        options, rest = parser.parse_known_args(list(args))
    except argparse.ArgumentError:
        return None
    inputs = [p for p in (options.input, options.prepared_dir) if p]
    paths = [*inputs, options.baseline, options.output_dir, options.baseline_schema]
    if rest or len(inputs) != 1 or not (options.baseline and options.output_dir):
        return None
    if options.input_format not in (None, *FORMATS) or (
        options.prepared_dir and options.input_format
    ):
        return None
    return options if all(storage.is_local(p) for p in paths if p) else None


def runs_here(args: Sequence[str]) -> bool:
    return local_options(args) is not None


def run(args: Sequence[str]) -> dict:
    """Validate in this process; returns {anomalies, blocking} and exits EXIT_BLOCKING when an
    anomaly blocks (as validate.run)."""
    configure_logging(batch=True)
    options = local_options(args)
    if options is None:
        raise ValueError("not a local validate run: run skewless.beam_pipelines.jobs.validate")
    output_dir = options.output_dir
    with before_run():
        baseline = load_baseline(options.baseline, options.baseline_schema)
        fs = feature_set_of(options.feature_set, baseline)
        if options.prepared_dir:
            kind, fmt, pattern = FEATURES, "parquet", features_glob(options.prepared_dir)
            described = f"features of {options.prepared_dir}"
        else:
            kind, fmt, pattern = RAW, options.input_format, options.input
            described = options.input
        paths = check_input(pattern, fmt)
        check_output_dir(output_dir, "--output_dir")
    LOG.info("validating %d local file(s) in this process (--runner: as a Beam job)", len(paths))
    acc = StatisticsAccumulator()
    for path in paths:
        for batch in read_inferred(path, fmt or detect_format(path)):
            acc.add(batch)
    new = acc.to_proto(NEW_DATASET)
    write_statistics(storage.join(output_dir, NEW_STATISTICS_FILE), statistics_list([new], ()))
    title = report_title(described, options.baseline)
    anomalies, report = check_statistics(new, baseline, fs, kind, title)
    write_anomalies(storage.join(output_dir, ANOMALIES_FILE), anomalies)
    write_text(storage.join(output_dir, REPORT_FILE), report)
    return conclude(anomalies, output_dir)
