"""The solutions -> student notebooks generator, on synthetic notebooks in temporary folders."""

import importlib.util
from pathlib import Path

import nbformat
import pytest
from nbformat.v4 import new_code_cell, new_markdown_cell, new_notebook, new_output

from utils.config import REPO_URL

TOOL = Path(__file__).resolve().parent.parent / "tools" / "make_student_notebooks.py"


@pytest.fixture(scope="module")
def gen():
    spec = importlib.util.spec_from_file_location("make_student_notebooks", TOOL)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


SOLUTION_CODE = """\
import torch

def next_token_loss(logits, input_ids):
    \"\"\"Mean shifted cross-entropy.\"\"\"
    ### BEGIN SOLUTION
    v = logits.size(-1)
    return torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, v), input_ids[:, 1:].reshape(-1))
    ### END SOLUTION

print("defined")"""


def make_solution_notebook():
    nb = new_notebook()
    nb.metadata = {
        "kernelspec": {"name": "python3", "display_name": "Python 3", "language": "python"},
        "language_info": {"name": "python"},
        "widgets": {"state": {}},
    }
    nb.cells = [
        new_markdown_cell("# Chapter 1"),
        new_markdown_cell("old badge", metadata={"tags": ["colab-badge"]}),
        new_code_cell("# stale setup", metadata={"tags": ["bootstrap"]}),
        new_markdown_cell(
            "Why shift?\n\n<!-- BEGIN SOLUTION -->\nBecause position t predicts t+1.\n"
            "<!-- END SOLUTION -->\n\nThe end."
        ),
        new_code_cell(
            SOLUTION_CODE, execution_count=3, outputs=[new_output("stream", name="stdout", text="defined\n")]
        ),
        new_code_cell(
            "check_next_token_loss(next_token_loss)",
            execution_count=4,
            outputs=[new_output("stream", name="stdout", text="[check passed]\n")],
        ),
        new_code_cell("assert secret_answer == 42", metadata={"tags": ["solution-only"]}),
    ]
    return nb


# --- stubbing code ------------------------------------------------------------------------
def test_stub_code_replaces_the_region_at_its_indentation(gen):
    out = gen._stub_code(SOLUTION_CODE, "nb cell 4")
    assert (
        out
        == """\
import torch

def next_token_loss(logits, input_ids):
    \"\"\"Mean shifted cross-entropy.\"\"\"
    # YOUR CODE HERE
    raise NotImplementedError()

print("defined")"""
    )
    compile(out, "<stub>", "exec")  # still valid Python


def test_stub_code_top_level_and_several_regions(gen):
    src = (
        "a = 1\n### BEGIN SOLUTION\nb = 2\n### END SOLUTION\nc = 3\n"
        "if a:\n        ### BEGIN SOLUTION\n        d = 4\n        ### END SOLUTION"
    )
    out = gen._stub_code(src, "x")
    assert out.split("\n") == [
        "a = 1",
        "# YOUR CODE HERE",
        "raise NotImplementedError()",
        "c = 3",
        "if a:",
        "        # YOUR CODE HERE",
        "        raise NotImplementedError()",
    ]


def test_stub_code_without_regions_is_unchanged(gen):
    assert gen._stub_code("x = 1\n\ny = 2\n", "x") == "x = 1\n\ny = 2\n"


@pytest.mark.parametrize(
    "src, message",
    [
        ("### BEGIN SOLUTION\nx = 1", "never closed"),
        ("x = 1\n### END SOLUTION", "without ### BEGIN SOLUTION"),
        ("### BEGIN SOLUTION\n### BEGIN SOLUTION\nx\n### END SOLUTION", "nested"),
    ],
)
def test_unbalanced_code_markers_raise(gen, src, message):
    with pytest.raises(gen.GeneratorError, match=f"chapter.ipynb cell 7: .*{message}"):
        gen._stub_code(src, "chapter.ipynb cell 7")


def test_generator_error_is_a_value_error(gen):
    assert issubclass(gen.GeneratorError, ValueError)


# --- stubbing markdown --------------------------------------------------------------------
def test_stub_markdown_replaces_each_region(gen):
    src = (
        "Q1 <!-- BEGIN SOLUTION -->A1\nmore<!-- END SOLUTION --> and Q2\n"
        "<!-- BEGIN SOLUTION -->A2<!-- END SOLUTION -->"
    )
    assert gen._stub_markdown(src, "x") == "Q1 *Your answer here.* and Q2\n*Your answer here.*"


@pytest.mark.parametrize(
    "src",
    [
        "<!-- BEGIN SOLUTION --> answer",
        "answer <!-- END SOLUTION -->",
        "<!-- BEGIN SOLUTION -->a<!-- END SOLUTION --><!-- BEGIN SOLUTION -->b",
    ],
)
def test_unbalanced_markdown_markers_raise(gen, src):
    with pytest.raises(gen.GeneratorError, match="unbalanced"):
        gen._stub_markdown(src, "x")


# --- the student version ------------------------------------------------------------------
def test_student_version(gen):
    solution = gen.normalize_solution(make_solution_notebook(), "01_pretraining.ipynb")
    student = gen.student_version(solution, "01_pretraining.ipynb")
    sources = [c.source for c in student.cells]
    assert len(student.cells) == len(solution.cells) - 1  # the solution-only cell is dropped
    assert not any("secret_answer" in s for s in sources)
    assert student.cells[3].source == "Why shift?\n\n*Your answer here.*\n\nThe end."
    assert student.cells[4].source == gen._stub_code(SOLUTION_CODE, "x")
    assert "cross_entropy" not in student.cells[4].source
    assert student.cells[5].source == "check_next_token_loss(next_token_loss)"  # the checker cell is kept
    for c in student.cells:
        if c.cell_type == "code":
            assert c.outputs == [] and c.execution_count is None
        assert "hide-input" not in c.metadata.get("tags", [])
    assert student.cells[2].metadata == {"tags": ["bootstrap"], "cellView": "form"}  # a Colab form
    assert student.cells[2].source == solution.cells[2].source  # the setup cell stays
    assert set(student.metadata) == {"kernelspec", "language_info", "colab"}
    nbformat.validate(student)


def test_student_version_does_not_touch_the_solution(gen):
    solution = gen.normalize_solution(make_solution_notebook(), "01.ipynb")
    before = nbformat.writes(solution)
    gen.student_version(solution, "01.ipynb")
    assert nbformat.writes(solution) == before


def test_student_version_reports_where_markers_are_broken(gen):
    nb = make_solution_notebook()
    nb.cells[4].source = "### BEGIN SOLUTION\nx = 1"
    with pytest.raises(gen.GeneratorError, match="02_sft.ipynb cell 4"):
        gen.student_version(nb, "02_sft.ipynb")


# --- normalising the solution -------------------------------------------------------------
def test_normalize_solution_fills_the_managed_cells(gen):
    name = "03_rlhf.ipynb"
    original = make_solution_notebook()
    nb = gen.normalize_solution(original, name)
    slug = REPO_URL.removeprefix("https://github.com/")
    badge = nb.cells[1].source
    url = f"https://colab.research.google.com/github/{slug}/blob/main/notebooks/{name}"
    assert f"]({url})" in badge
    assert "colab-badge.svg" in badge
    assert slug.count("/") == 1 and slug in badge
    assert f'"{REPO_URL}"' in nb.cells[2].source and "REPO_URL = (" in nb.cells[2].source
    compile(nb.cells[2].source, "<bootstrap>", "exec")
    assert original.cells[1].source == "old badge"  # a copy: the input is untouched


def test_normalize_solution_tags_solution_cells(gen):
    nb = gen.normalize_solution(make_solution_notebook(), "01.ipynb")
    assert "hide-input" in nb.cells[4].metadata["tags"]
    assert "hide-input" not in nb.cells[5].metadata.get("tags", [])  # checker cells are shown
    setup = nb.cells[2]  # one line for the reader: a Colab form, and behind a toggle in the book
    assert setup.source.startswith("# @title ") and setup.metadata["cellView"] == "form"
    assert "hide-input" in setup.metadata["tags"] and "setup" in setup.metadata["mystnb"]["code_prompt_show"]
    student = gen.student_version(nb, "01.ipynb")
    assert student.cells[2].metadata == {"tags": ["bootstrap"], "cellView": "form"}
    assert "hide-input" not in nb.cells[3].metadata.get("tags", [])  # markdown answers are not hidden code
    again = gen.normalize_solution(nb, "01.ipynb")
    assert nbformat.writes(again) == nbformat.writes(nb)  # idempotent: no duplicate tags
    assert again.cells[4].metadata["tags"].count("hide-input") == 1


def test_normalize_solution_keeps_outputs(gen):
    nb = gen.normalize_solution(make_solution_notebook(), "01.ipynb")
    assert nb.cells[4].execution_count == 3 and nb.cells[4].outputs


@pytest.mark.parametrize(
    "breakage, message",
    [
        ("no badge", r"exactly one markdown cell tagged 'colab-badge'.*found 0 and 1"),
        ("two badges", r"found 2 and 1"),
        ("no bootstrap", r"found 1 and 0"),
        ("bootstrap not first", r"'bootstrap' must be the first code cell"),
    ],
)
def test_normalize_solution_requires_the_managed_cells(gen, breakage, message):
    nb = make_solution_notebook()
    if breakage == "no badge":
        nb.cells[1].metadata = {}
    elif breakage == "two badges":
        nb.cells.insert(0, new_markdown_cell("another", metadata={"tags": ["colab-badge"]}))
    elif breakage == "no bootstrap":
        nb.cells[2].metadata = {}
    else:
        nb.cells.insert(1, new_code_cell("import torch"))
    with pytest.raises(gen.GeneratorError, match=message):
        gen.normalize_solution(nb, "01.ipynb")


# --- the command --------------------------------------------------------------------------
@pytest.fixture
def folders(gen, tmp_path, monkeypatch):
    solutions, students = tmp_path / "solutions", tmp_path / "notebooks"
    solutions.mkdir()
    monkeypatch.setattr(gen, "SOLUTIONS", solutions)
    monkeypatch.setattr(gen, "STUDENTS", students)
    nbformat.write(make_solution_notebook(), solutions / "01_pretraining.ipynb")
    return solutions, students


def test_run_writes_students_then_check_is_clean(gen, folders):
    solutions, students = folders
    assert gen.run(check=True)  # stale before the first run
    assert not students.exists()  # --check writes nothing
    assert gen.run(check=False) == []
    assert [p.name for p in students.iterdir()] == ["01_pretraining.ipynb"]
    assert gen.run(check=True) == []
    fixed = nbformat.read(solutions / "01_pretraining.ipynb", as_version=4)
    assert REPO_URL in fixed.cells[2].source  # managed cells fixed in the solution itself
    student = nbformat.read(students / "01_pretraining.ipynb", as_version=4)
    assert "raise NotImplementedError()" in student.cells[4].source


def test_check_detects_a_stale_student_and_an_orphan(gen, folders):
    solutions, students = folders
    gen.run(check=False)
    nb = nbformat.read(solutions / "01_pretraining.ipynb", as_version=4)
    nb.cells[5].source = "print('changed')"
    nbformat.write(nb, solutions / "01_pretraining.ipynb")
    (students / "99_orphan.ipynb").write_text(nbformat.writes(new_notebook()))
    problems = gen.run(check=True)
    assert "notebooks/01_pretraining.ipynb: stale or missing" in problems
    assert "notebooks/99_orphan.ipynb: has no solution twin" in problems
    assert gen.main(["--check"]) == 1
    gen.run(check=False)
    assert gen.run(check=True) == [] and not (students / "99_orphan.ipynb").exists()


def test_main_reports_generator_errors(gen, folders, capsys):
    solutions, _ = folders
    nb = nbformat.read(solutions / "01_pretraining.ipynb", as_version=4)
    nb.cells[4].source = "### END SOLUTION"
    nbformat.write(nb, solutions / "01_pretraining.ipynb")
    assert gen.main([]) == 2
    assert "error: " in capsys.readouterr().err
