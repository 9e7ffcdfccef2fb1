"""The README's local streaming recipe, run exactly as written: live cells within about a minute."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest

from tests.emulator_process import free_port

pytestmark = [pytest.mark.emulator, pytest.mark.slow]
ROOT = Path(__file__).resolve().parent.parent


def recipe() -> str:
    """The shell block between the README's local-recipe markers."""
    text = (ROOT / "README.md").read_text()
    block = re.search(r"<!-- local-recipe:begin -->\n```sh\n(.*?)```\n<!-- local-recipe:end -->", text, re.S)
    assert block, "README.md has no local-recipe block"
    return block.group(1)


@pytest.mark.timeout(400)
def test_the_readme_recipe_shows_cells_for_many_window_ends_within_about_a_minute(tmp_path):
    if shutil.which("gcloud") is None:
        pytest.skip("the recipe needs the Cloud SDK (gcloud and its emulators)")
    script = tmp_path / "recipe.sh"
    script.write_text("set -euo pipefail\n" + recipe())
    env = {**os.environ, "PUBSUB_PORT": str(free_port()), "BIGTABLE_PORT": str(free_port())}
    env.pop("PUBSUB_EMULATOR_HOST", None)
    env.pop("BIGTABLE_EMULATOR_HOST", None)
    started = time.monotonic()
    proc = subprocess.Popen(
        ["bash", str(script)], cwd=ROOT, env=env, stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT, text=True, start_new_session=True,
    )  # fmt: skip
    try:
        out, _ = proc.communicate(timeout=360)
    finally:
        try:
            os.killpg(proc.pid, signal.SIGKILL)  # whatever the recipe left running
        except ProcessLookupError:
            pass
    elapsed = time.monotonic() - started
    assert proc.returncode == 0, out[-3000:]
    cells = [json.loads(line) for line in out.splitlines() if line.startswith('{"row_key"')]
    ends = {c["window_end_ms"] for c in cells}
    assert len(ends) >= 10, out[-3000:]
    assert all(c["entity"] == "origin=JFK" for c in cells)
    assert max(c["values"]["origin_departures_1h"] for c in cells) >= 10
    assert "flights:origin_departures_1h" in out  # cbt read the same cells
    # Emulators + setup + job start + 30 s replay + 30 s linger: cells within about a minute
    # of the replay's start; the whole recipe (four commands' imports included) within four minutes.
    assert elapsed < 240, elapsed
