"""Workarounds for the local streaming runner (BundleBasedDirectRunner) of Beam 2.77.

Metrics: the runner gives every bundle a fresh MetricsContainer, but each worker thread's
StateSampler caches its ScopedState by step name with the FIRST bundle's container. User
counters of later bundles therefore land in a container that was already committed, and the
pipeline result reports only the first bundle of each step. `fix_direct_runner_metrics()`
rebuilds the cached state whenever a different container is passed. The SDK harness (portable
runners, Dataflow) passes the same container for a step, so the patch never acts there; it is
applied only in the process that runs the local runner.
"""

from __future__ import annotations

LOCAL_STREAMING_RUNNERS = ("BundleBasedDirectRunner", "DirectRunner", "SwitchingDirectRunner")


def fix_direct_runner_metrics() -> None:
    """Idempotent: make the local runner commit every bundle's user metrics."""
    from apache_beam.runners.worker import statesampler

    cls = statesampler.StateSampler
    if getattr(cls, "_skewless_metrics_fix", False):
        return
    original = cls.scoped_state

    def scoped_state(self, name_context, state_name, io_target=None, metrics_container=None):
        state = original(self, name_context, state_name, io_target, metrics_container)
        if metrics_container is None or state.metrics_container is metrics_container:
            return state
        for name, cached in list(self._states_by_name.items()):
            if cached is state:
                del self._states_by_name[name]
        return original(self, name_context, state_name, io_target, metrics_container)

    cls.scoped_state = scoped_state
    cls._skewless_metrics_fix = True
