"""`pip install .` (not editable) into a fresh virtualenv, then the CLI from an empty directory
outside the repository: one `skewless` package, nothing else installed at the top level.

The fresh virtualenv reaches the pinned stack through a .pth line naming this interpreter's
site-packages (the same `pip install -r requirements.txt`, not installed a second time: that
would download about 2 GB per run); the project itself is installed into it from the
repository as a wheel, not in editable mode, and the repository is not on its path."""

from __future__ import annotations

import json
import os
import site
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]

USER_FEATURE_SET = '''
"""A user's own feature set, next to their data: it imports the contract from skewless only."""

from skewless import Aggregate, FeatureSet, Field
from skewless.operations import Mean

CLICKS = FeatureSet(
    name="clicks",
    schema=(
        Field("user", "string", nullable=False),
        Field("price", "float"),
        Field("clicked_at", "timestamp", nullable=False),
        Field("bought", "int", nullable=False),
    ),
    event_time="clicked_at",
    keys=("user",),
    aggregates=(Aggregate("user", Mean("price"), windows=("1h",), period="5m", default=0.0),),
    label="bought",
    example_fields=(
        Field("user", "string"),
        Field("price", "float"),
        Field("clicked_at", "timestamp"),
        Field("bought", "int"),
    ),
    preprocessing_fn=lambda inputs: dict(inputs),
    eval_fraction=0.5,
)
'''


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> dict:
    """A fresh virtualenv with skewless installed (not editable) from the repository, and an empty
    working directory outside the repository."""
    root = tmp_path_factory.mktemp("installed")
    venv = root / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=120)
    deps = next(Path(p) for p in site.getsitepackages() if p.endswith("site-packages"))
    (next((venv / "lib").glob("python3.*")) / "site-packages" / "pinned_stack.pth").write_text(
        f"{deps}\n"
    )
    python = venv / "bin" / "python"
    subprocess.run(
        [str(python), "-m", "pip", "install", "--quiet", "--no-deps", "--no-build-isolation", str(ROOT)],
        check=True, timeout=300, cwd=root,
    )  # fmt: skip
    work = root / "empty"
    work.mkdir()
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH",)}
    return {"python": python, "skewless": venv / "bin" / "skewless", "cwd": work, "env": env}


def _run(
    installed: dict, *args: str, timeout: float = 300, env: dict | None = None
) -> subprocess.CompletedProcess:
    return subprocess.run(
        [str(a) for a in args], cwd=installed["cwd"], env=env or installed["env"],
        capture_output=True, text=True, timeout=timeout,
    )  # fmt: skip


def test_only_skewless_is_installed_and_it_is_not_the_repository(installed):
    probe = _run(
        installed,
        installed["python"],
        "-c",
        "import importlib.util as u, json, skewless; print(json.dumps({"
        "'skewless': skewless.__file__, "
        "'others': [m for m in ('transforms', 'models', 'beam_pipelines', 'templates')"
        " if u.find_spec(m) is not None]}))",
    )
    assert probe.returncode == 0, probe.stderr
    found = json.loads(probe.stdout)
    assert found["others"] == []  # `import transforms` fails: no top-level collision
    assert "site-packages" in found["skewless"] and str(ROOT) not in found["skewless"]
    top = _run(installed, installed["python"], "-c", "import transforms")
    assert top.returncode == 1 and "No module named 'transforms'" in top.stderr


def test_the_cli_and_prepare_of_the_bundled_flights_run_outside_the_repository(installed):
    listing = _run(installed, installed["skewless"], "--help")
    assert listing.returncode == 0 and "prepare" in listing.stdout and "score" in listing.stdout
    out = installed["cwd"] / "prepared"
    prepared = _run(installed, installed["skewless"], "prepare", "--output_dir", out, timeout=500)
    assert prepared.returncode == 0, prepared.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["records_read"] == 336_776 and summary["feature_set"] == "flights"
    assert summary["examples_train"] > 0 and (out / "transform" / "transform_fn").is_dir()


def test_a_user_feature_set_in_a_file_next_to_the_data_runs(installed):
    work = installed["cwd"]
    (work / "my_features.py").write_text(textwrap.dedent(USER_FEATURE_SET))
    lines = ["user,price,clicked_at,bought"]
    for i in range(200):
        lines.append(f"u{i % 7},{(i * 37) % 100 / 10},2024-03-01T{8 + i // 60:02d}:{i % 60:02d}:00Z,{i % 3 == 0:d}")
    (work / "clicks.csv").write_text("\n".join(lines) + "\n")
    out = work / "clicks_prepared"
    env = {**installed["env"], "PYTHONPATH": str(work)}  # the user's module, not the repository
    run = _run(
        installed, installed["skewless"], "prepare", "--feature_set", "my_features:CLICKS",
        "--input", work / "clicks.csv", "--output_dir", out, env=env,
    )  # fmt: skip
    assert run.returncode == 0, run.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["records_valid"] == 200 and summary["feature_set"] == "clicks"
    assert summary["feature_set_spec"] == "my_features:CLICKS"
