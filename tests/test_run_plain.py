"""tools/run_plain.py: notebooks run without Jupyter, one fresh process each, errors and claims recorded."""

import json

import nbformat
import pytest

from tools import run_plain


def _notebook(path, *cells):
    nb = nbformat.v4.new_notebook()
    nb.cells = [nbformat.v4.new_markdown_cell("# a notebook")] + [nbformat.v4.new_code_cell(c) for c in cells]
    nbformat.write(nb, path)
    return path


def test_cells_run_in_order_with_ipython_lines_skipped_and_claims_recorded(tmp_path, monkeypatch):
    nb = _notebook(
        tmp_path / "09_demo.ipynb",
        "%matplotlib inline\nx = 2",
        "import pandas as pd\ndisplay(pd.DataFrame({'a': [x]}))\nprint('x is', x)",
        "from utils.claims import claim\nclaim('two is more than one', (x, '>', 1))",
    )
    monkeypatch.setenv("COURSE_PROFILE", "tiny")
    record = tmp_path / "claims.jsonl"
    env = dict(run_plain.os.environ, PYTHONPATH=str(run_plain.ROOT), COURSE_CLAIMS_RECORD=str(record))
    row = run_plain.run(nb, tmp_path, env, timeout=120)
    assert row["error"] is None and len(row["cells"]) == 3 and row["wall_s"] >= 0
    log = (tmp_path / "09_demo.log").read_text()
    assert "x is 2" in log and "a" in log
    claims = [json.loads(line) for line in record.read_text().splitlines()]
    got = [(c["claim"], c["notebook"], c["held"]) for c in claims]
    assert got == [("two is more than one", "09_demo", True)]


def test_a_failing_cell_stops_the_notebook_and_is_named(tmp_path):
    nb = _notebook(tmp_path / "09_broken.ipynb", "a = 1", "raise ValueError('planted')", "print('never')")
    env = dict(run_plain.os.environ, PYTHONPATH=str(run_plain.ROOT))
    row = run_plain.run(nb, tmp_path, env, timeout=120)
    assert row["error"]["cell"] == 1 and row["error"]["type"] == "ValueError"
    assert "planted" in row["error"]["message"] and len(row["cells"]) == 2
    assert "never" not in (tmp_path / "09_broken.log").read_text()


def test_a_process_that_dies_is_reported(tmp_path):
    nb = _notebook(tmp_path / "09_dies.ipynb", "import os\nos._exit(3)")
    row = run_plain.run(nb, tmp_path, dict(run_plain.os.environ), timeout=120)
    assert row["error"]["type"] == "Killed" and "exited with 3" in row["error"]["message"]


def test_unknown_notebooks_are_refused(tmp_path):
    with pytest.raises(SystemExit):
        run_plain.main([str(tmp_path), "99_nothing"])
