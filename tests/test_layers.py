"""The architecture as tests: one-way layers, no job importing another job, and no flights
column named outside the flights feature set (docs/architecture.md)."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

from beam_pipelines.cli import IN_PROCESS, JOBS, MODES

ROOT = Path(__file__).resolve().parents[1]
# Lower layers first: a module may import its own layer and the ones before it.
LAYERS = ("transforms", "models", "beam_pipelines", "templates")
TOP = ("templates", "bench")  # the same (top) layer: both use the jobs, neither is used
PRODUCT = ("transforms", "models", "beam_pipelines", "templates")
FLIGHTS_MODULE = "transforms/flights.py"
# Columns of the flights data that no other feature set has; the common words among them
# (origin, dest, distance) count only as string literals ("origin") or in flights idioms.
FLIGHTS_COLUMNS = (
    "dep_delay", "arr_delay", "sched_dep_time", "sched_arr_time", "tailnum", "time_hour",
    "air_time", "carrier",
)  # fmt: skip
COMMON_WORDS = ("origin", "dest", "distance")
FLIGHTS_NAMES = re.compile(
    r"\b(?:" + "|".join(FLIGHTS_COLUMNS) + r")\b"
    r"|[\"'](?:" + "|".join(COMMON_WORDS) + r")[\"']"
    r"|\b(?:" + "|".join(COMMON_WORDS) + r")(?:#|=STRING:)"
)


def job_modules() -> set[str]:
    """The modules the `skewless` CLI runs as jobs (one per subcommand and mode)."""
    return {module for module, _ in JOBS.values()} | set(MODES.values()) | set(IN_PROCESS.values())


def module_name(path: Path, root: Path = ROOT) -> str:
    rel = path.relative_to(root).with_suffix("")
    parts = rel.parts[:-1] if rel.name == "__init__" else rel.parts
    return ".".join(parts)


def python_files(*packages: str) -> list[Path]:
    return sorted(p for package in packages for p in (ROOT / package).rglob("*.py"))


def imports_of(path: Path, root: Path = ROOT) -> list[tuple[int, str]]:
    """(line, module) of every import in the file: top level, in functions, relative resolved."""
    tree = ast.parse(path.read_text(), filename=str(path))
    me = module_name(path, root)
    package = me if path.name == "__init__.py" else me.rsplit(".", 1)[0]
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parent = package.split(".")
                parent = parent[: len(parent) - node.level + 1]
                base = ".".join([*parent, base] if base else parent)
            found.append((node.lineno, base))
            # `from beam_pipelines import score` imports the module beam_pipelines.score
            found += [(node.lineno, f"{base}.{alias.name}") for alias in node.names]
    return found


def layer_of(module: str) -> str | None:
    top = module.split(".", 1)[0]
    return top if top in (*LAYERS, "bench") else None


def rank(layer: str) -> int:
    return len(LAYERS) - 1 if layer in TOP else LAYERS.index(layer)


def layer_violations(paths: list[Path], jobs: set[str], root: Path = ROOT) -> list[str]:
    """'file:line: what' for each import of a higher layer or of another job's module."""
    out: dict[str, str] = {}  # one problem per import statement
    for path in paths:
        me = module_name(path, root)
        mine = layer_of(me)
        if mine is None:
            continue
        for line, imported in imports_of(path, root):
            theirs = layer_of(imported)
            where = f"{path.relative_to(root)}:{line}"
            if theirs is None:
                continue
            if rank(theirs) > rank(mine) or (theirs in TOP and mine in TOP and theirs != mine):
                problem = f"{me} ({mine}) imports {imported} ({theirs}), a layer above it"
            elif me in jobs and imported in jobs and imported != me:
                problem = f"job {me} imports another job's module {imported}"
            else:
                continue
            out.setdefault(where, f"{where}: {problem}")
    return list(out.values())


def flights_names(paths: list[Path], root: Path = ROOT) -> list[str]:
    """'file:line: text' for each flights column named in the files."""
    out = []
    for path in paths:
        if path.relative_to(root).as_posix() == FLIGHTS_MODULE:
            continue
        for number, line in enumerate(path.read_text().splitlines(), 1):
            if FLIGHTS_NAMES.search(line):
                out.append(f"{path.relative_to(root)}:{number}: {line.strip()}")
    return out


def product_files() -> list[Path]:
    return sorted(
        p
        for package in PRODUCT
        for p in (ROOT / package).rglob("*")
        if p.is_file() and p.suffix in (".py", ".json", ".sh", "") and "__pycache__" not in p.parts
    )


# --- the rules hold ------------------------------------------------------------------------------


def test_the_job_modules_are_the_cli_s():
    jobs = job_modules()
    assert {"beam_pipelines.prepare", "beam_pipelines.score", "beam_pipelines.score_stream"} <= jobs
    assert {"models.train", "models.report", "beam_pipelines.aggregate"} <= jobs
    for module in jobs:
        assert (ROOT / (module.replace(".", "/") + ".py")).is_file(), module


def test_layers_point_one_way_and_no_job_imports_another():
    paths = python_files(*LAYERS, "bench")
    assert len(paths) > 40
    problems = layer_violations(paths, job_modules())
    assert not problems, "\n".join(problems)


def test_no_flights_column_outside_the_flights_feature_set():
    files = product_files()
    assert any(p.suffix == ".json" for p in files)  # the template metadata is checked too
    problems = flights_names(files)
    assert not problems, "flights columns named outside transforms/flights.py:\n" + "\n".join(
        problems
    )


# --- the checks can fail -------------------------------------------------------------------------


@pytest.fixture()
def fake_project(tmp_path):
    """Write a module into a throw-away copy of the layout; returns its path."""

    def write(rel: str, text: str) -> Path:
        path = tmp_path / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
        return path

    write.root = tmp_path
    return write


@pytest.mark.parametrize(
    ("rel", "text", "expected"),
    [
        ("transforms/x.py", "from models import train\n", "a layer above it"),
        ("transforms/x.py", "def f():\n    import beam_pipelines.io.files\n", "a layer above it"),
        ("models/x.py", "from beam_pipelines.prepare import Split\n", "a layer above it"),
        ("models/x.py", "import templates.jobs\n", "a layer above it"),
        ("beam_pipelines/x.py", "from bench import common\n", "a layer above it"),
        ("beam_pipelines/io/x.py", "from ...templates import jobs\n", "a layer above it"),
        (
            "beam_pipelines/score.py",
            "def run():\n    from beam_pipelines import score_stream\n",
            "another job",
        ),
        (
            "beam_pipelines/bigtable_setup.py",
            "from beam_pipelines.aggregate import X\n",
            "another job",
        ),
        ("models/train.py", "from models.report import report\n", "another job"),
    ],
)
def test_an_upward_or_cross_job_import_fails(fake_project, rel, text, expected):
    path = fake_project(rel, text)
    (problem,) = layer_violations([path], job_modules(), fake_project.root)
    assert expected in problem and problem.startswith(f"{rel}:")


@pytest.mark.parametrize(
    ("rel", "text"),
    [
        ("transforms/x.py", "from transforms.featureset import FeatureSet\n"),
        ("beam_pipelines/score.py", "from beam_pipelines.scoring import ScoreWithModel\n"),
        ("beam_pipelines/score_stream.py", "from beam_pipelines.options import ModelOptions\n"),
        ("templates/jobs.py", "import beam_pipelines.score\n"),
        ("bench/x.py", "from beam_pipelines import score, score_stream\n"),
    ],
)
def test_downward_and_shared_imports_pass(fake_project, rel, text):
    assert layer_violations([fake_project(rel, text)], job_modules(), fake_project.root) == []


@pytest.mark.parametrize(
    "line",
    [
        'parser.add_argument("--baseline_feature", default="dep_delay")',
        "    rows = table.column('tailnum')",
        '"helpText": "e.g. origin=STRING:JFK"',
        'key = "origin"',
        'help="Row-key prefix, e.g. dest#LAX#"',
    ],
)
def test_a_flights_column_in_product_code_fails_naming_the_line(fake_project, line):
    path = fake_project("models/x.py", f"x = 1\n{line}\n")
    assert flights_names([path], fake_project.root) == [f"models/x.py:2: {line.strip()}"]


def test_common_words_in_prose_and_the_flights_module_pass(fake_project):
    ok = fake_project(
        "transforms/validation_like.py", '"""`origin` says where a record came from."""\n'
    )
    flights = fake_project(FLIGHTS_MODULE, 'Field("dep_delay", "float")\n')
    assert flights_names([ok, flights], fake_project.root) == []
