"""tools/export_loops.py: the loop a notebook teaches is the code utils runs; a stale copy fails a test."""

import shutil

import nbformat
import pytest

from tools import export_loops

ROOT = export_loops.ROOT


def test_utils_is_up_to_date_with_the_notebooks():
    assert export_loops.run(check=True) == [], "run `python tools/export_loops.py`"


def test_chapter1_loop_lives_in_the_notebook_and_in_utils():
    from utils import pretrain

    cells = export_loops.exported_cells(ROOT / "solutions" / "01_pretraining.ipynb")
    assert list(cells) == ["utils/pretrain.py"]
    assert "def train_lm(" in cells["utils/pretrain.py"][0]
    assert pretrain.train_lm.__code__.co_filename.endswith("utils/pretrain.py")


@pytest.fixture
def tree(tmp_path, monkeypatch):
    """A copy of Chapter 1's solution and utils/pretrain.py, with the exporter pointed at it."""
    (tmp_path / "solutions").mkdir()
    (tmp_path / "utils").mkdir()
    shutil.copy(ROOT / "solutions" / "01_pretraining.ipynb", tmp_path / "solutions")
    shutil.copy(ROOT / "utils" / "pretrain.py", tmp_path / "utils")
    monkeypatch.setattr(export_loops, "ROOT", tmp_path)
    monkeypatch.setattr(export_loops, "SOLUTIONS", tmp_path / "solutions")
    return tmp_path


def _edit_exported_cell(path, old, new):
    nb = nbformat.read(path, as_version=4)
    (cell,) = [c for c in nb.cells if c.cell_type == "code" and c.source.startswith("# saved in utils/")]
    assert old in cell.source
    cell.source = cell.source.replace(old, new)
    nbformat.write(nb, path)


def test_a_loop_changed_in_the_notebook_makes_utils_stale_until_exported(tree):
    nb = tree / "solutions" / "01_pretraining.ipynb"
    drift = ('group["lr"] = lr_at(step, lr, warmup, steps)', 'group["lr"] = lr')  # no schedule
    _edit_exported_cell(nb, *drift)
    assert export_loops.run(check=True) == ["utils/pretrain.py: stale (exported from 01_pretraining.ipynb)"]
    assert drift[0] in (tree / "utils" / "pretrain.py").read_text()  # --check writes nothing
    export_loops.run(check=False)
    text = (tree / "utils" / "pretrain.py").read_text()
    assert drift[1] in text and drift[0] not in text
    assert export_loops.run(check=True) == []


def test_a_saved_cell_may_only_define(tree):
    nb = tree / "solutions" / "01_pretraining.ipynb"
    _edit_exported_cell(nb, "def lr_at(", "print('side effect')\n\n\ndef lr_at(")
    with pytest.raises(export_loops.ExportError, match="may only define things"):
        export_loops.run(check=True)


def test_a_module_without_the_region_is_an_error(tree):
    module = tree / "utils" / "pretrain.py"
    text = module.read_text()
    start = text.index("# fmt: off\n# --- from solutions/01_pretraining.ipynb")
    end = text.index("# fmt: on\n", start) + len("# fmt: on\n")
    module.write_text(text[:start] + text[end:])
    with pytest.raises(export_loops.ExportError, match="needs one region"):
        export_loops.run(check=True)
