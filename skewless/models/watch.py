"""Model hot swap: a RunInference handler that serves the highest numbered version of a base directory.

Why not RunInference's `model_metadata_pcoll` side input: on the local streaming runner
(BundleBasedDirectRunner, Beam 2.77) a global-window side input blocks the main input until the
side input's watermark reaches the end of the global window, i.e. for ever, and PeriodicImpulse
(which WatchFilePattern is built on) does not run there at all. A side input windowed like the
main input would make every prediction wait for the next poll. So the handler watches instead,
and the same code runs on every runner:

- `load_model` (once per worker process, through RunInference's shared-model cache) loads the
  highest version and starts a daemon thread that lists the base directory every `poll_s`.
- The highest complete version (skewless.models.versions.check_version_dir) above the serving one is
  loaded in that thread and swapped in atomically, so no inference call waits for a
  TensorFlow load. Predictions carry the
  version of the model that actually made them (`PredictionResult.model_id`).
- An incomplete version (being copied) is passed over (a lower complete one above the serving
  version is taken meanwhile) and retried at the next poll; one that TensorFlow cannot load is
  logged and skipped for good. The current version keeps serving.
"""

from __future__ import annotations

import logging
import threading
import weakref
from collections.abc import Iterable, Sequence
from typing import Any

from apache_beam.ml.inference.base import PredictionResult

from skewless.models.handler import (
    Example,
    LoadedModel,
    SkewlessModelHandler,
    batch_to_feed,
    keep_alive,
    predict,
)
from skewless.models.versions import ModelDirError, ModelVersion, list_versions, resolve

LOG = logging.getLogger("skewless.watch")


class LiveModel:
    """The version serving now, swapped by a watcher thread when a higher version is published.

    `current()` is a plain attribute read: the (model, inputs) pair is replaced as one tuple.
    A plain class, so RunInference's shared-model cache can hold it through a weak reference;
    the watcher thread holds only a weak reference too and ends when the model is released.
    """

    def __init__(self, base: str, loaded: LoadedModel, inputs: list[dict], poll_s: float):
        self.base = base
        self.poll_s = poll_s
        self._serving: tuple[LoadedModel, list[dict]] = (loaded, inputs)
        self._failed: set[int] = set()
        self.swaps = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(
            target=_watch, args=(weakref.ref(self), self._stop, poll_s), daemon=True,
            name=f"skewless-model-watch-{base}",
        )  # fmt: skip
        self._thread.start()

    @property
    def version(self) -> int:
        return self._serving[0].version

    def current(self) -> tuple[LoadedModel, list[dict]]:
        return self._serving

    def check_now(self) -> bool:
        """Swap in the highest complete, loadable version above the serving one, if there is
        one; True if it swapped. An incomplete version (still being copied) is passed over for
        now and tried again at the next poll; one that does not load is never tried again."""
        versions = [
            v for v in list_versions(self.base) if v > self.version and v not in self._failed
        ]
        for newest in reversed(versions):
            try:
                candidate = resolve(self.base, newest)
            except ModelDirError as exc:  # e.g. still being copied: try again at the next poll
                LOG.info("model version %s not ready yet: %s", newest, exc)
                continue
            try:
                loaded = _load(candidate)
            except Exception as exc:  # noqa: BLE001 - any load failure keeps the serving version
                self._failed.add(newest)
                LOG.error(
                    "model version %s cannot be loaded, keeping version %s: %s",
                    newest,
                    self.version,
                    exc,
                )
                continue
            previous = self.version
            self._serving = (loaded, list(candidate.serving_inputs))
            self.swaps += 1
            LOG.warning("model hot swap: version %s -> %s (%s)", previous, newest, candidate.path)
            return True
        return False

    def stop(self) -> None:
        self._stop.set()

    def watching(self) -> bool:
        return not self._stop.is_set()

    def __del__(self):
        self._stop.set()


def _watch(ref: weakref.ref, stop: threading.Event, poll_s: float) -> None:
    while not stop.wait(poll_s):
        live = ref()
        if live is None:
            return
        try:
            live.check_now()
        except Exception:  # noqa: BLE001 - a listing error must not end the watch
            LOG.exception("model watch of %s failed; retrying", live.base)
        del live


def _load(version: ModelVersion) -> LoadedModel:
    import tensorflow as tf

    from skewless.models.versions import SIGNATURE

    module = tf.saved_model.load(version.path)
    return LoadedModel(module, module.signatures[SIGNATURE], version.version)


class WatchingModelHandler(SkewlessModelHandler):
    """SkewlessModelHandler that follows the highest version under `model_dir` (hot swap).

    The highest version is resolved and checked when the handler is built, so a missing or
    corrupt model directory fails the launch; workers load whatever is highest when they start.
    """

    def __init__(self, model_dir: str, *, poll_s: float = 30.0, **batching: Any):
        if poll_s <= 0:
            raise ValueError(f"the model poll interval must be > 0 seconds, got {poll_s}")
        super().__init__(model_dir, None, **batching)
        self.model_dir = model_dir
        self.poll_s = poll_s

    def load_model(self) -> LiveModel:  # type: ignore[override]
        return keep_alive(("watch", self.model_dir, self.poll_s), self._start, LiveModel.watching)

    def _start(self) -> LiveModel:
        version = resolve(self.model_dir)
        return LiveModel(self.model_dir, _load(version), list(version.serving_inputs), self.poll_s)

    def run_inference(
        self,
        batch: Sequence[Example],
        model: LiveModel,  # type: ignore[override]
        inference_args: dict[str, Any] | None = None,
    ) -> Iterable[PredictionResult]:
        loaded, inputs = model.current()  # one version for the whole batch
        return self._split(
            batch, predict(loaded, batch_to_feed(batch, inputs)), str(loaded.version)
        )
