"""The architecture as tests (docs/architecture.md, "Layout and layers"): every module has a
role, imports point one way between roles, no job imports another, nothing imports a job or
the CLI, and no flights column is named outside the bundled feature sets."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

from skewless.beam_pipelines.runtime.job import job_modules
from tests.support import REPO_ROOT

ROOT = REPO_ROOT
BP = "skewless.beam_pipelines"
CLI = f"{BP}.runtime.cli"
# Roles, from the bottom up: a module may import its own role and the ones below it. Features
# (the data-validation feature, the scoring core) may not import each other.
ROLES = (
    ("contract", ("skewless.transforms", "skewless.operations", "skewless")),
    ("models", ("skewless.models",)),
    ("examples", ("skewless.examples",)),
    ("io", (f"{BP}.io",)),
    ("runtime", (f"{BP}.runtime",)),
    ("feature", (f"{BP}.validation", f"{BP}.score_core")),
    # The stages of prepare's layout (split, statistics, tf.Transform), built on validation.
    ("stages", (f"{BP}.training_data",)),
    ("job", (f"{BP}.jobs", f"{BP}.commands")),
    ("top", ("templates", "bench")),
)
RANK = {name: i for i, (name, _) in enumerate(ROLES)}
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
FEATURE_SETS = "skewless/examples/"  # where columns are named: the feature sets themselves
# A feature set imports the contract (`skewless`, `skewless.operations`), none of these.
INTERNALS = ("skewless.transforms", "skewless.models", "skewless.beam_pipelines")


def role_of(module: str) -> str | None:
    """The role of a module, by the longest package prefix that holds it."""
    best, length = None, -1
    for name, prefixes in ROLES:
        for prefix in prefixes:
            if (module == prefix or module.startswith(prefix + ".")) and len(prefix) > length:
                best, length = name, len(prefix)
    return best


def feature_of(module: str) -> str | None:
    for prefix in dict(ROLES)["feature"]:
        if module == prefix or module.startswith(prefix + "."):
            return prefix
    return None


def module_name(path: Path, root: Path = ROOT) -> str:
    rel = path.relative_to(root).with_suffix("")
    parts = rel.parts[:-1] if rel.name == "__init__" else rel.parts
    return ".".join(parts)


def python_files(*folders: str) -> list[Path]:
    return sorted(p for folder in folders for p in (ROOT / folder).rglob("*.py"))


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
            # `from pkg import mod` imports the module pkg.mod
            found += [(node.lineno, f"{base}.{alias.name}") for alias in node.names]
    return found




def violations(paths: list[Path], jobs: set[str], root: Path = ROOT) -> list[str]:
    """'file:line: what' for each import that breaks a rule."""
    out: dict[str, str] = {}  # one problem per import statement
    for path in paths:
        me = module_name(path, root)
        mine = role_of(me)
        if mine is None:
            continue
        for line, imported in imports_of(path, root):
            theirs = role_of(imported)
            if theirs is None:
                continue
            where = f"{path.relative_to(root)}:{line}"
            if imported == CLI or imported.startswith(CLI + "."):
                problem = f"{me} imports the CLI ({imported}): only the entry point runs it"
            elif (
                mine != "top"
                and imported in jobs
                and imported != me
            ):
                problem = f"{me} imports the job module {imported}: nothing imports a job"
            elif RANK[theirs] > RANK[mine]:
                problem = f"{me} ({mine}) imports {imported} ({theirs}), a role above it"
            elif mine == "examples" and imported.startswith(INTERNALS):
                problem = f"{me} (a feature set) imports {imported}: the contract is `skewless`"
            elif mine == theirs == "feature" and feature_of(me) != feature_of(imported):
                problem = f"{me} imports another feature's module {imported}"
            else:
                continue
            out.setdefault(where, f"{where}: {problem}")
    return list(out.values())


def flights_names(paths: list[Path], root: Path = ROOT) -> list[str]:
    """'file:line: text' for each flights column named in the files."""
    out = []
    for path in paths:
        if path.relative_to(root).as_posix().startswith(FEATURE_SETS):
            continue
        for number, line in enumerate(path.read_text().splitlines(), 1):
            if FLIGHTS_NAMES.search(line):
                out.append(f"{path.relative_to(root)}:{number}: {line.strip()}")
    return out


def product_files() -> list[Path]:
    return sorted(
        p
        for folder in ("skewless", "templates")
        for p in (ROOT / folder).rglob("*")
        if p.is_file() and p.suffix in (".py", ".json", ".sh", "") and "__pycache__" not in p.parts
    )


# --- the rules hold ------------------------------------------------------------------------------


def test_every_product_module_has_a_role():
    modules = [module_name(p) for p in python_files("skewless")]
    assert len(modules) > 50
    assert [m for m in modules if role_of(m) is None] == []


def test_the_job_modules_are_the_cli_s_and_in_the_job_role():
    jobs = job_modules()
    assert {f"{BP}.jobs.prepare", f"{BP}.jobs.score", f"{BP}.jobs.score_streaming"} <= jobs
    for module in jobs:
        assert role_of(module) == "job", module
        assert (ROOT / (module.replace(".", "/") + ".py")).is_file(), module


def test_imports_point_one_way_and_nothing_imports_a_job_or_the_cli():
    paths = python_files("skewless", "templates", "bench")
    problems = violations(paths, job_modules())
    assert not problems, "\n".join(problems)


def test_no_flights_column_outside_the_feature_sets():
    files = product_files()
    assert any(p.suffix == ".json" for p in files)  # the template metadata is checked too
    problems = flights_names(files)
    assert not problems, "flights columns named outside skewless/examples/:\n" + "\n".join(
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


JOBS = {f"{BP}.jobs.score", f"{BP}.jobs.score_streaming", f"{BP}.jobs.aggregate", f"{BP}.commands.bigtable_setup"}


@pytest.mark.parametrize(
    ("rel", "text", "expected"),
    [
        ("skewless/transforms/x.py", "from skewless.models import training\n", "a role above it"),
        ("skewless/transforms/x.py", "def f():\n    import skewless.beam_pipelines.io.files\n", "a role above it"),
        ("skewless/models/x.py", "from skewless.beam_pipelines.runtime.options import X\n", "a role above it"),
        ("skewless/beam_pipelines/io/x.py", "from skewless.beam_pipelines.validation import baseline\n", "a role above it"),
        ("skewless/beam_pipelines/io/x.py", "from ..runtime import options\n", "a role above it"),
        ("skewless/beam_pipelines/runtime/x.py", "import bench.common\n", "a role above it"),
        ("skewless/beam_pipelines/validation/x.py", "from skewless.beam_pipelines.score_core import load_model\n", "another feature"),
        ("skewless/beam_pipelines/jobs/score.py", "def run():\n    from skewless.beam_pipelines.jobs import score_streaming\n", "nothing imports a job"),
        ("skewless/beam_pipelines/commands/bigtable_setup.py", "from skewless.beam_pipelines.jobs.aggregate import X\n", "nothing imports a job"),
        ("skewless/beam_pipelines/runtime/x.py", "from skewless.beam_pipelines.jobs.score import run\n", "nothing imports a job"),
        ("skewless/beam_pipelines/jobs/x.py", "from skewless.beam_pipelines.runtime.cli import main\n", "imports the CLI"),
        ("skewless/examples/x.py", "from skewless.transforms.featureset import Field\n", "the contract is `skewless`"),
    ],
)  # fmt: skip
def test_an_upward_cross_job_or_cli_import_fails(fake_project, rel, text, expected):
    path = fake_project(rel, text)
    (problem,) = violations([path], JOBS, fake_project.root)
    assert expected in problem and problem.startswith(f"{rel}:")


@pytest.mark.parametrize(
    ("rel", "text"),
    [
        ("skewless/transforms/x.py", "from skewless.transforms.featureset import FeatureSet\n"),
        ("skewless/examples/x.py", "from skewless import FeatureSet\nfrom skewless.operations import Mean\n"),
        ("skewless/beam_pipelines/jobs/score.py", "from skewless.beam_pipelines.score_core import ScoreWithModel\n"),
        ("skewless/beam_pipelines/jobs/score_streaming.py", "from skewless.beam_pipelines.runtime.options import ModelOptions\n"),
        ("skewless/beam_pipelines/validation/x.py", "from skewless.beam_pipelines.io import storage\n"),
        ("templates/x.py", "import skewless.beam_pipelines.jobs.score\n"),
        ("bench/x.py", "from skewless.beam_pipelines.jobs import score, score_streaming\n"),
    ],
)  # fmt: skip
def test_downward_and_shared_imports_pass(fake_project, rel, text):
    assert violations([fake_project(rel, text)], JOBS, fake_project.root) == []


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
    path = fake_project("skewless/models/x.py", f"x = 1\n{line}\n")
    assert flights_names([path], fake_project.root) == [f"skewless/models/x.py:2: {line.strip()}"]


def test_common_words_in_prose_and_the_feature_sets_pass(fake_project):
    ok = fake_project(
        "skewless/transforms/record_checks_like.py", '"""`origin` says where a record came from."""\n'
    )
    flights = fake_project(FEATURE_SETS + "flights.py", 'Field("dep_delay", "float")\n')
    assert flights_names([ok, flights], fake_project.root) == []
