"""Numbered model versions under a base directory: atomic publishing, lookup and validation.

Layout: BASE/1, BASE/2, ... each a complete SavedModel plus MODEL_FILE (metadata) and
METRICS_FILE. A training run writes into BASE/.tmp-<id> and renames it to the next number, so
a reader never sees a half-written version. That holds on local disks; object stores (gs://)
have no atomic rename, so there a reader could see a version while it is being copied.
"""

from __future__ import annotations

import json
import os
import uuid
from dataclasses import dataclass

import tensorflow as tf

MODEL_FILE = "model.json"
METRICS_FILE = "metrics.json"
KERAS_FILE = "model.keras"
SIGNATURE = "serving_default"
OUTPUT = "probability"


class ModelDirError(ValueError):
    """The model directory or version is missing, incomplete or corrupt."""


class FeatureSetMismatch(ValueError):
    """A --feature_set that is not the one the model or the prepared data was made with."""


@dataclass(frozen=True)
class ModelVersion:
    path: str
    version: int
    metadata: dict

    @property
    def serving_inputs(self) -> list[dict]:
        return self.metadata["serving_inputs"]

    def feature_set(self, override: str | None = None):
        """The FeatureSet this version was trained on (model.json), or `override` when it is
        the same feature set (same name); anything else is a FeatureSetMismatch."""
        return recorded_feature_set(
            {"feature_set": self.metadata.get("feature_set"),
             "feature_set_spec": self.metadata.get("feature_set_spec")},
            override,
            f"model version {self.version}",
            "was trained on",
        )  # fmt: skip


def recorded_feature_set(
    recorded: dict, override: str | None, what: str, verb: str = "was made with"
):
    """Load the feature set `recorded` names ({"feature_set": name, "feature_set_spec": spec},
    as prepare's summary.json and model.json hold them), or `override` if it has that name.

    `what` and `verb` word the error: "model version 3 was trained on feature set 'a', not 'b'".
    """
    from skewless.transforms.featureset import load_feature_set

    name, spec = recorded.get("feature_set"), recorded.get("feature_set_spec")
    if override is not None:  # '' too: load_feature_set says it names no feature set
        fs = load_feature_set(override)
        if name is not None and fs.name != name:
            raise FeatureSetMismatch(
                f"{what} {verb} feature set {name!r}, not {fs.name!r} (--feature_set "
                f"{override}); leave out --feature_set to use {spec or name!r}"
            )
        return fs
    if not (spec or name):
        raise FeatureSetMismatch(f"{what} records no feature set: give --feature_set")
    fs = load_feature_set(spec or name)
    if name is not None and fs.name != name:
        raise FeatureSetMismatch(
            f"{what} {verb} feature set {name!r}, but {spec!r} is now {fs.name!r}"
        )
    return fs


def list_versions(base: str) -> list[int]:
    """Published version numbers under `base`, ascending (temp and other entries ignored)."""
    if not tf.io.gfile.isdir(base):
        return []
    names = (n.rstrip("/") for n in tf.io.gfile.listdir(base))
    return sorted(int(n) for n in names if n.isdigit())


def new_staging_dir(base: str) -> str:
    tf.io.gfile.makedirs(base)
    path = os.path.join(base, f".tmp-{uuid.uuid4().hex}")
    tf.io.gfile.makedirs(path)
    return path


def publish(base: str, staging: str, attempts: int = 20) -> tuple[int, str]:
    """Rename the complete staging dir to the next free version number; returns (n, path).

    Two trainers racing for the same number: the rename of the loser fails (the target exists
    and is not empty), and it takes the next number.
    """
    for _ in range(attempts):
        versions = list_versions(base)
        number = (versions[-1] + 1) if versions else 1
        target = os.path.join(base, str(number))
        try:
            if "://" in base:
                if tf.io.gfile.exists(target):
                    continue
                tf.io.gfile.rename(staging, target, overwrite=False)
            else:
                os.rename(staging, target)
            return number, target
        except (OSError, tf.errors.OpError):
            continue
    raise ModelDirError(f"could not publish {staging} under {base} after {attempts} attempts")


def resolve(base: str, version: int | None = None) -> ModelVersion:
    """The requested (default: highest) version under `base`, checked to be complete.

    Raises ModelDirError with a message a user can act on: no directory, no version, a
    missing file, a SavedModel that does not parse or lacks the serving signature.
    """
    if not base:
        raise ModelDirError("no model directory given (--model_dir)")
    if not tf.io.gfile.isdir(base):
        raise ModelDirError(f"model directory {base!r} does not exist")
    versions = list_versions(base)
    if not versions:
        if tf.io.gfile.exists(os.path.join(base, "saved_model.pb")):
            raise ModelDirError(
                f"{base!r} is a single SavedModel, not a base directory of numbered versions: "
                "pass its parent as --model_dir"
            )
        raise ModelDirError(f"model directory {base!r} holds no numbered model version (1, 2, ...)")
    if version is None:
        version = versions[-1]
    elif version not in versions:
        raise ModelDirError(f"model version {version} not found in {base!r}; available: {versions}")
    path = os.path.join(base, str(version))
    return ModelVersion(path, version, check_version_dir(path))


def check_version_dir(path: str) -> dict:
    """Cheap completeness check of one version (no TensorFlow graph is loaded); its metadata."""
    from tensorflow.core.protobuf import saved_model_pb2

    def need(name: str) -> str:
        full = os.path.join(path, name)
        if not tf.io.gfile.exists(full):
            raise ModelDirError(f"model version {path!r} is incomplete or corrupt: {name} is missing")
        return full

    try:
        metadata = json.loads(tf.io.gfile.GFile(need(MODEL_FILE), "r").read())
    except json.JSONDecodeError as exc:
        raise ModelDirError(f"model version {path!r} is corrupt: {MODEL_FILE} is not JSON ({exc})") from None
    if not isinstance(metadata, dict) or "serving_inputs" not in metadata:
        raise ModelDirError(f"model version {path!r} is corrupt: {MODEL_FILE} has no serving_inputs")
    need(os.path.join("variables", "variables.index"))
    saved = saved_model_pb2.SavedModel()
    try:
        saved.ParseFromString(tf.io.gfile.GFile(need("saved_model.pb"), "rb").read())
    except Exception as exc:  # noqa: BLE001 - protobuf raises its own DecodeError family
        raise ModelDirError(f"model version {path!r} is corrupt: saved_model.pb does not parse ({exc})") from None
    signatures = saved.meta_graphs[0].signature_def if saved.meta_graphs else {}
    if SIGNATURE not in signatures:
        raise ModelDirError(f"model version {path!r} is corrupt: no {SIGNATURE!r} signature")
    missing = {i["name"] for i in metadata["serving_inputs"]} - set(signatures[SIGNATURE].inputs)
    if missing:
        raise ModelDirError(f"model version {path!r}: signature lacks inputs {sorted(missing)}")
    return metadata


def write_json(path: str, value: dict) -> None:
    with tf.io.gfile.GFile(path, "w") as f:
        f.write(json.dumps(value, indent=2, sort_keys=True, default=str))
