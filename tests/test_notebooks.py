"""The notebooks as artifacts: students fresh, solutions executed in order, stubs fail helpfully,
and the book builds with warnings as errors."""

import ast
import re
import shutil
import subprocess
import sys
from pathlib import Path

import nbformat
import pytest
import yaml

from utils.checks import CheckError
from utils.config import REPO_URL

ROOT = Path(__file__).resolve().parent.parent
SOLUTIONS = sorted((ROOT / "solutions").glob("*.ipynb"))
STUDENTS = sorted((ROOT / "notebooks").glob("*.ipynb"))


def test_there_are_chapters():
    assert SOLUTIONS, "no solution notebooks"
    assert [p.name for p in STUDENTS] == [p.name for p in SOLUTIONS]


def test_student_notebooks_are_fresh():
    r = subprocess.run(
        [sys.executable, "tools/make_student_notebooks.py", "--check"],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    assert r.returncode == 0, r.stderr


@pytest.mark.parametrize("path", SOLUTIONS, ids=lambda p: p.name)
def test_solution_is_executed_top_to_bottom(path):
    nb = nbformat.read(path, as_version=4)
    code = [c for c in nb.cells if c.cell_type == "code"]
    counts = [c.execution_count for c in code]
    assert counts == list(range(1, len(code) + 1)), (
        f"{path.name}: execution counts {counts}; re-run it top to bottom"
    )
    errors = [o for c in code for o in c.outputs if o.output_type == "error"]
    assert not errors, f"{path.name}: committed with an error output: {errors[0].get('ename')}"
    assert any("image/png" in o.get("data", {}) for c in code for o in c.outputs), (
        f"{path.name}: no plot saved"
    )


@pytest.mark.parametrize("path", STUDENTS, ids=lambda p: p.name)
def test_student_notebook_has_stubs_and_no_outputs(path):
    nb = nbformat.read(path, as_version=4)
    src = "\n".join(c.source for c in nb.cells)
    assert "raise NotImplementedError()" in src
    assert "### BEGIN SOLUTION" not in src and "### END SOLUTION" not in src
    for c in nb.cells:
        if c.cell_type == "code":
            assert c.outputs == [] and c.execution_count is None


@pytest.mark.parametrize("path", STUDENTS, ids=lambda p: p.name)
def test_checker_on_a_stub_fails_with_a_helpful_message(path):
    """Run the student's notebook up to its first exercise, then each stub and the checker after it."""
    nb = nbformat.read(path, as_version=4)
    code = [c.source.replace("plt.show()", "") for c in nb.cells if c.cell_type == "code"]
    namespace: dict = {}
    stubs = [i for i, s in enumerate(code) if "raise NotImplementedError()" in s]
    assert stubs
    for i in range(stubs[0]):  # setup (the bootstrap cell finds utils in the repo), imports, data
        exec(compile(code[i], f"cell {i}", "exec"), namespace)
    for k, i in enumerate(stubs):
        # the cells between two exercises are not run (they need the stubs' results), but a later
        # exercise or checker may use a name one of them imports: run their imports only
        for j in range(stubs[k - 1] + 2 if k else i, i):
            imports = [n for n in ast.parse(code[j]).body if isinstance(n, (ast.Import, ast.ImportFrom))]
            exec(compile(ast.Module(body=imports, type_ignores=[]), f"cell {j}", "exec"), namespace)
        exec(compile(code[i], f"cell {i}", "exec"), namespace)
        check = code[i + 1]
        # a checker, or a checkpoint whose results the next steps use (`model = check_policy_run(...)`)
        assert re.search(r"^([\w, ]+ = )?check_\w+\(", check, re.M), (
            f"the cell after exercise cell {i} should call its checker"
        )
        for _ in range(5):
            try:
                with pytest.raises(CheckError, match="not implemented yet"):
                    exec(compile(check, f"cell {i + 1}", "exec"), namespace)
                break
            except NameError as e:  # a result of an earlier step the stubs never produced (Project 2)
                namespace[e.name] = None
        else:
            pytest.fail(f"the checker after exercise cell {i} needs more than five earlier results")


def test_repository_url_is_the_same_everywhere():
    config = yaml.safe_load((ROOT / "_config.yml").read_text())
    assert config["repository"]["url"] == REPO_URL
    for path in SOLUTIONS + STUDENTS:
        text = path.read_text()
        assert REPO_URL in text, f"{path.name}: setup cell does not use utils.config.REPO_URL"


def test_ci_runs_the_readme_test_command():
    readme = (ROOT / "README.md").read_text()
    ci = (ROOT / ".ci" / "run").read_text()
    assert "bash tools/test.sh" in readme and "bash tools/course.sh" in readme
    assert "bash tools/test.sh" in ci


@pytest.mark.slow
def test_book_builds_with_warnings_as_errors(tmp_path):
    jb = shutil.which("jupyter-book") or str(Path(sys.executable).parent / "jupyter-book")
    r = subprocess.run(
        [jb, "build", str(ROOT), "--path-output", str(tmp_path), "-W", "-n", "--keep-going"],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-4000:]
    html = tmp_path / "_build" / "html"
    page = (html / "solutions" / "01_pretraining.html").read_text()
    assert "colab-badge.svg" in page, "the Open in Colab badge is missing"
    assert "Show solution" in page, "solutions should sit behind a 'Show solution' toggle"
    assert "<img" in page, "plots should be rendered"
    assert (html / "index.html").exists()
