"""What the tests and the benchmarks share: emulator processes, the bundled data slices, paced
publishers, the runner's ceiling, the brute-force references, the toy feature sets and the
helpers that run a job on the emulators.

No test module imports another; each imports from here (plain functions and classes) and gets
its fixtures from tests/conftest.py. bench/*.py import from here too (the repository root on
sys.path), so a benchmark and the test of the same job start the same emulators and publish
the same way. Nothing here imports pytest at module level: the benchmarks run without it.
"""

from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]
