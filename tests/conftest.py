"""Session fixtures of the whole suite: the three emulators, one trained model, and the
DataflowRunner dry-run recorder. Each pytest-xdist worker is a session of its own (its own
emulators on free ports, its own model); the helpers they are built from live in tests/support/.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support import emulators
from tests.support.training import prepared_and_trained_once


def _started(context_manager):
    """Enter an emulator's context; a missing emulator skips (fails under CI), a failed start
    fails the tests that need it."""
    try:
        return context_manager.__enter__()
    except emulators.EmulatorMissing as exc:
        if os.environ.get("CI"):
            pytest.fail(str(exc))
        pytest.skip(str(exc))
    except emulators.StartupError as exc:
        pytest.fail(str(exc))


@pytest.fixture(scope="session")
def pubsub_emulator(tmp_path_factory) -> Iterator[emulators.PubSubEmulator]:
    running = emulators.pubsub_emulator(tmp_path_factory.mktemp("pubsub"))
    yield _started(running)
    running.__exit__(None, None, None)


@pytest.fixture(scope="session")
def bigtable_emulator(tmp_path_factory) -> Iterator[emulators.BigtableEmulator]:
    running = emulators.bigtable_emulator(tmp_path_factory.mktemp("bigtable"))
    yield _started(running)
    running.__exit__(None, None, None)


@pytest.fixture(scope="session")
def bq_emulator(tmp_path_factory) -> Iterator[emulators.BigQueryEmulator]:
    running = emulators.bigquery_emulator(tmp_path_factory.mktemp("bqemulator"))
    yield _started(running)
    running.__exit__(None, None, None)


@pytest.fixture(scope="session")
def trained(tmp_path_factory) -> dict:
    """A week of real flights, prepared (eval from Jan 6) and trained once per test run, the
    pytest-xdist workers sharing it: {root, rows, csv, prepared, model_dir, result}. Read it,
    never write into it (tests that add versions copy it first)."""
    return prepared_and_trained_once(_run_wide_temp(tmp_path_factory) / "trained")


@pytest.fixture(scope="session")
def schedule_trained(tmp_path_factory) -> dict:
    """The flights_schedule model (two weeks of October, tests/support/schedule.py), trained
    once per test run: {root, prepared, model_dir, result}. Read it, never write into it."""
    from tests.support.schedule import schedule_model_once

    return schedule_model_once(_run_wide_temp(tmp_path_factory) / "schedule")


def _run_wide_temp(tmp_path_factory) -> Path:
    """The temporary directory of the whole run: a worker's basetemp is a child of it."""
    base = tmp_path_factory.getbasetemp()
    return base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base


@pytest.fixture()
def dataflow_jobs(monkeypatch) -> list:
    """The Dataflow job each dry run would have submitted."""
    from apache_beam.runners.dataflow.dataflow_runner import DataflowRunner

    jobs = []
    original = DataflowRunner.run_pipeline

    def recording(self, pipeline, options, *args, **kwargs):
        result = original(self, pipeline, options, *args, **kwargs)
        jobs.append(result.job)
        return result

    monkeypatch.setattr(DataflowRunner, "run_pipeline", recording)
    return jobs


# Seconds each module took in the whole suite on 2 cores with two pytest-xdist workers
# (`--durations`, summed per module). `make test` hands modules out whole (--dist loadscope,
# one module's fixtures built once) in collection order, so the longest go first and no long
# module starts last; within a module the order is the file's. Only the order depends on this
# table: a module missing from it (or costing less) just runs after the listed ones.
MODULE_SECONDS = {
    "tests/jobs/test_label_join.py": 297,
    "tests/jobs/test_score_streaming_cache.py": 170,
    "tests/jobs/test_precompute.py": 70,
    "tests/contract/test_batch_checks.py": 45,
    "tests/models/test_batch_invariance.py": 15,
    "tests/io/test_prediction_cache_store.py": 15,
    "tests/jobs/test_audit.py": 187,
    "tests/jobs/test_aggregate_faults.py": 175,
    "tests/jobs/test_score_streaming_monitor.py": 150,  # waits for a window to close
    "tests/commands/test_retrain.py": 147,  # alone, building the `trained` fixture too
    "tests/test_local_recipe.py": 143,
    "tests/jobs/test_score_streaming_references.py": 102,
    "tests/jobs/test_validate.py": 95,
    "tests/commands/test_replay_parity.py": 86,
    "tests/jobs/test_score_streaming_bigquery.py": 80,
    "tests/jobs/test_score_streaming.py": 78,
    "tests/dataflow/test_flex_templates.py": 75,
    "tests/transforms/test_reference_join.py": 69,
    "tests/jobs/test_weather_feature_set.py": 63,
    "tests/jobs/test_aggregate_poison_messages.py": 53,
    "tests/contract/test_hostile_inputs.py": 52,
    "tests/jobs/test_prepare_period.py": 50,
    "tests/jobs/test_prepare_examples.py": 50,
    "tests/jobs/test_references_from_bigquery.py": 49,
    "tests/packaging/test_installed_package.py": 49,
    "tests/examples/test_flights_schedule.py": 49,
    "tests/jobs/test_aggregate_parity.py": 39,
    "tests/jobs/test_prepare.py": 39,
    "tests/transforms/test_drift_calibration.py": 37,
    "tests/jobs/test_prepare_runners.py": 35,
    "tests/transforms/test_statistics.py": 32,
    "tests/jobs/test_aggregate.py": 31,
    "tests/io/test_online_store.py": 29,
    "tests/examples/test_flights_preprocessing.py": 25,
    "tests/transforms/test_monitoring.py": 25,
    "tests/io/test_tfrecord_sink.py": 24,
    "tests/jobs/test_prepare_duplicate_keys.py": 23,
    "tests/runtime/test_cli.py": 22,
    "tests/contract/test_fuzz_inputs.py": 22,
    "tests/jobs/test_prepare_bigquery.py": 18,
    "tests/jobs/test_score_runners.py": 13,
    "tests/transforms/test_aggregations.py": 11,
    "tests/models/test_training.py": 11,
    "tests/commands/test_replay.py": 10,
    "tests/jobs/test_publish_reference.py": 9,
    "tests/transforms/test_operations.py": 7,
    "tests/io/test_online_store_retention.py": 6,
}


def pytest_collection_modifyitems(config, items) -> None:
    """Longest modules first (MODULE_SECONDS), each module's tests in their file's order."""

    def cost(item) -> int:
        return MODULE_SECONDS.get(item.nodeid.split("::", 1)[0], 0)

    items.sort(key=lambda item: -cost(item))  # stable: ties keep the collection order
