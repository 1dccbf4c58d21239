"""Every solution notebook, top to bottom, on the ``hub`` profile against the local stand-in of the
Hub (tools/hub_standin.py), cut to a smoke test (``COURSE_SMOKE=1``: a handful of steps, a few dozen
rows). A cell that only works on TinyWorld, or a loader that only works on the course's own models,
fails here first. Its numbers mean nothing; claims are said, not checked (see utils.claims).

About 4 minutes on a 2-core CPU: the slow tier (``-m slow``). Run alone:
``python -m pytest -q tests/test_hub_notebooks.py``.
"""

from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

from tools import hub_standin

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parent.parent
SOLUTIONS = sorted((ROOT / "solutions").glob("*.ipynb"))


@pytest.fixture(scope="module")
def standin(tmp_path_factory):
    return hub_standin.build(tmp_path_factory.mktemp("hub-standin"), "small", n_rows=300)


@pytest.mark.parametrize("path", SOLUTIONS, ids=lambda p: p.name)
def test_solution_runs_on_the_hub_profile(path, standin, tmp_path, monkeypatch):
    for key, value in {
        "COURSE_PROFILE": "hub",
        "COURSE_SMOKE": "1",
        "COURSE_HUB_MIRROR": str(standin),
        "COURSE_CACHE": str(tmp_path / "cache"),  # the tiny profile's cache is not touched
        "HF_DATASETS_CACHE": str(tmp_path / "hf-datasets"),
        "HF_HUB_OFFLINE": "1",
        "HF_DATASETS_OFFLINE": "1",
        "MPLBACKEND": "Agg",
    }.items():
        monkeypatch.setenv(key, value)  # the kernel inherits this process's environment
    nb = nbformat.read(path, as_version=4)
    NotebookClient(
        nb, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(ROOT / "solutions")}}
    ).execute()
    printed = "".join(
        o.get("text", "") for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", [])
    )
    assert "profile=hub (smoke test)" in printed  # it ran on the profile it was asked to
