"""Generate the student notebooks in ``notebooks/`` from the solutions in ``solutions/``.

The solutions are the only hand-edited notebooks. For each one this tool

* replaces every region between ``### BEGIN SOLUTION`` and ``### END SOLUTION`` in a code cell
  with a stub (``raise NotImplementedError()``, indented like the region), and every region
  between ``<!-- BEGIN SOLUTION -->`` and ``<!-- END SOLUTION -->`` in a markdown cell with
  "*Your answer here.*";
* drops cells tagged ``solution-only``; clears outputs and execution counts;
* keeps two managed cells in step with ``utils.config.REPO_URL`` (the one place the
  repository's address lives): the "Open in Colab" badge (tag ``colab-badge``) and the setup
  cell (tag ``bootstrap``), which shows one line, its title (a Colab form; behind a toggle in the
  book);
* tags each solution cell ``hide-input`` (with myst-nb prompts) in the solution notebook, so
  the book shows it behind a "Show solution" toggle;
* copies the cells marked ``# saved in utils/NAME.py`` into ``utils`` (``tools/export_loops.py``).

Usage::

    python tools/make_student_notebooks.py          # write notebooks/ (and fix managed cells in solutions/)
    python tools/make_student_notebooks.py --check  # exit 1 if anything is stale; writes nothing
"""

from __future__ import annotations

import argparse
import copy
import re
import sys
from pathlib import Path

import nbformat

from tools import export_loops
from utils.config import REPO_URL  # (utils is installed: pip install -e .)

ROOT = Path(__file__).resolve().parent.parent

SOLUTIONS, STUDENTS = ROOT / "solutions", ROOT / "notebooks"
CODE_BEGIN, CODE_END = "### BEGIN SOLUTION", "### END SOLUTION"
MD_BEGIN, MD_END = "<!-- BEGIN SOLUTION -->", "<!-- END SOLUTION -->"
CODE_STUB = ["# YOUR CODE HERE", "raise NotImplementedError()"]
MD_STUB = "*Your answer here.*"
SOLUTION_TAG, BADGE_TAG, BOOTSTRAP_TAG, SOLUTION_ONLY_TAG = (
    "hide-input",
    "colab-badge",
    "bootstrap",
    "solution-only",
)
# The setup cell shows one line: its title, as a Colab form (``cellView``), and behind a toggle in the book.
BOOTSTRAP_METADATA = {
    "cellView": "form",
    "mystnb": {"code_prompt_show": "Show the setup code", "code_prompt_hide": "Hide the setup code"},
}
TOGGLE_PROMPTS = {
    "code_prompt_show": "Show solution",
    "code_prompt_hide": "Hide solution",
}  # myst-nb, per cell

BOOTSTRAP = """\
# @title Setup: run this cell first (it makes the course's `utils` importable)
# In the course's environment (the README's commands run `pip install -e .`) it
# already is; in a downloaded copy this installs it; on Colab it clones the course and
# installs it with its requirements first.
import subprocess
import sys
from pathlib import Path

try:
    import utils.config  # noqa: F401
except ImportError:
    REPO_URL = (
        "{repo_url}"
    )
    here = Path.cwd().resolve()
    marker = ("pyproject.toml", "utils/__init__.py")
    found = [p for p in (here, *here.parents) if all((p / m).is_file() for m in marker)]
    pip = [sys.executable, "-m", "pip", "install", "-q"]
    if found:
        root = found[0]
    else:
        root = here / "llm-course"
        if not (root / "utils").is_dir():
            git = ["git", "clone", "--depth", "1", REPO_URL, str(root)]
            subprocess.run(git, check=True)
        subprocess.run([*pip, "-r", str(root / "requirements.txt")], check=True)
    subprocess.run([*pip, "--no-deps", "-e", str(root)], check=True)
    sys.path.insert(0, str(root))  # this kernel started before the install"""


def colab_url(name: str) -> str:
    slug = REPO_URL.removeprefix("https://github.com/")
    return f"https://colab.research.google.com/github/{slug}/blob/main/notebooks/{name}"


def badge(name: str) -> str:
    return (
        f"[![Open In Colab](https://colab.research.google.com/assets/colab-badge.svg)]({colab_url(name)})"
        " — the exercise version of this chapter, to fill in yourself."
    )


class GeneratorError(ValueError):
    pass


def _stub_code(source: str, where: str) -> str:
    out, inside, indent = [], False, ""
    for line in source.split("\n"):
        stripped = line.strip()
        if stripped == CODE_BEGIN:
            if inside:
                raise GeneratorError(f"{where}: nested {CODE_BEGIN}")
            inside, indent = True, line[: len(line) - len(line.lstrip())]
            out += [indent + s for s in CODE_STUB]
        elif stripped == CODE_END:
            if not inside:
                raise GeneratorError(f"{where}: {CODE_END} without {CODE_BEGIN}")
            inside = False
        elif not inside:
            out.append(line)
    if inside:
        raise GeneratorError(f"{where}: {CODE_BEGIN} is never closed")
    return "\n".join(out)


def _stub_markdown(source: str, where: str) -> str:
    pattern = re.compile(re.escape(MD_BEGIN) + r".*?" + re.escape(MD_END), re.S)
    out = pattern.sub(MD_STUB, source)
    if MD_BEGIN in out or MD_END in out:
        raise GeneratorError(f"{where}: unbalanced {MD_BEGIN} / {MD_END}")
    return out


def has_solution(cell) -> bool:
    return (cell.cell_type == "code" and CODE_BEGIN in cell.source) or (
        cell.cell_type == "markdown" and MD_BEGIN in cell.source
    )


def normalize_solution(nb, name: str):
    """The solution notebook with its managed cells and tags brought up to date (a copy); the badge
    cell holds only the badge."""
    nb = copy.deepcopy(nb)
    cells = nb.cells
    badge_cells = [c for c in cells if BADGE_TAG in c.metadata.get("tags", [])]
    boot_cells = [c for c in cells if BOOTSTRAP_TAG in c.metadata.get("tags", [])]
    if len(badge_cells) != 1 or len(boot_cells) != 1:
        raise GeneratorError(
            f"{name}: needs exactly one markdown cell tagged {BADGE_TAG!r} and one code cell "
            f"tagged {BOOTSTRAP_TAG!r} (found {len(badge_cells)} and {len(boot_cells)})"
        )
    badge_cells[0].source = badge(name)
    boot = boot_cells[0]
    boot.source = BOOTSTRAP.format(repo_url=REPO_URL)
    boot.metadata.update(copy.deepcopy(BOOTSTRAP_METADATA))
    if SOLUTION_TAG not in boot.metadata["tags"]:
        boot.metadata["tags"] = boot.metadata["tags"] + [SOLUTION_TAG]
    code_cells = [c for c in cells if c.cell_type == "code"]
    if not code_cells or code_cells[0] is not boot_cells[0]:
        raise GeneratorError(f"{name}: the cell tagged {BOOTSTRAP_TAG!r} must be the first code cell")
    for c in cells:
        tags = list(c.metadata.get("tags", []))
        if c.cell_type == "code" and has_solution(c):
            if SOLUTION_TAG not in tags:
                c.metadata["tags"] = tags + [SOLUTION_TAG]
            c.metadata["mystnb"] = dict(TOGGLE_PROMPTS)
    return nb


def student_version(solution_nb, name: str):
    nb = copy.deepcopy(solution_nb)
    cells = []
    for i, c in enumerate(nb.cells):
        tags = [t for t in c.metadata.get("tags", []) if t != SOLUTION_TAG]
        if SOLUTION_ONLY_TAG in tags:
            continue
        where = f"{name} cell {i}"
        if c.cell_type == "code":
            c.source = _stub_code(c.source, where)
            c.outputs, c.execution_count = [], None
        elif c.cell_type == "markdown":
            c.source = _stub_markdown(c.source, where)
        c.metadata = {"tags": tags} if tags else {}
        if BOOTSTRAP_TAG in tags:
            c.metadata["cellView"] = BOOTSTRAP_METADATA["cellView"]  # collapsed to its title on Colab
        cells.append(c)
    nb.cells = cells
    # nothing that an execution of the solution changes (language_info gains versions when it runs)
    nb.metadata = {
        "kernelspec": {"display_name": "Python 3", "language": "python", "name": "python3"},
        "language_info": {"name": "python"},
        "colab": {"provenance": []},
    }
    return nb


def _dump(nb) -> str:
    return nbformat.writes(nb) + "\n"


def run(check: bool) -> list[str]:
    problems = []
    sources = sorted(SOLUTIONS.glob("*.ipynb"))
    if not sources:
        problems.append(f"no solution notebooks in {SOLUTIONS}")
    expected_students = set()
    for path in sources:
        name = path.name
        nb = nbformat.read(path, as_version=4)
        fixed = normalize_solution(nb, name)
        if not any(has_solution(c) for c in fixed.cells) and not name.startswith("00"):
            problems.append(f"{name}: has no {CODE_BEGIN} region, so its student version has no exercise")
        student = _dump(student_version(fixed, name))
        target = STUDENTS / name
        expected_students.add(name)
        if check:
            if nbformat.writes(fixed) != nbformat.writes(nb):
                problems.append(f"solutions/{name}: badge, setup cell or solution tags are out of date")
            if not target.exists() or target.read_text() != student:
                problems.append(f"notebooks/{name}: stale or missing")
        else:
            if nbformat.writes(fixed) != nbformat.writes(nb):
                path.write_text(_dump(fixed))
            STUDENTS.mkdir(exist_ok=True)
            if not target.exists() or target.read_text() != student:
                target.write_text(student)
    exported = export_loops.run(check, SOLUTIONS, SOLUTIONS.parent)  # utils' copies of the saved cells
    if check:
        problems += exported
    else:
        for line in exported:
            print(f"wrote {line.split(':')[0]}")
    for extra in sorted(STUDENTS.glob("*.ipynb")):
        if extra.name not in expected_students:
            if check:
                problems.append(f"notebooks/{extra.name}: has no solution twin")
            else:
                extra.unlink()
    return problems


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--check", action="store_true", help="report stale files and exit 1; write nothing")
    args = ap.parse_args(argv)
    try:
        problems = run(args.check)
    except (GeneratorError, export_loops.ExportError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    for p in problems:
        print(p, file=sys.stderr)
    if problems and args.check:
        print("run `python tools/make_student_notebooks.py` to regenerate", file=sys.stderr)
    elif not problems:
        print("student notebooks are up to date" if args.check else f"wrote student notebooks to {STUDENTS}")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
