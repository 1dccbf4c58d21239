"""Executing a notebook in a Jupyter kernel and measuring it: what the benchmark
(``tools/run_notebooks.py``) and the claims sweep (``tools/claims_sweep.py``) both run."""

from __future__ import annotations

import os
import platform
import time
from datetime import datetime, timezone
from pathlib import Path

from utils.costs import PeakMemory  # (utils is installed: pip install -e .)

# The budgets (README, "Timings"): each notebook at most 2 min (RLHF, Project 2 and Chapter 7 3 min), the
# whole course at most 8 min with today's content (15 min once the chapters add their seeds and bands).
BUDGETS_S = {"03_rlhf": 180, "06_project2": 180, "07_beyond": 180}  # every other notebook: 120 s
DEFAULT_BUDGET_S, MEMORY_BUDGET_MB, TOTAL_BUDGET_S = 120, 3072, 480


def collapse_carriage_returns(nb) -> None:
    """Keep only what a terminal would show of progress bars: a bar's redraws reach the notebook as
    several stream outputs, each starting with ``\r``, so consecutive outputs of one stream are joined
    first, then each line keeps the text after its last ``\r`` - one line per bar."""
    for cell in nb.cells:
        if "outputs" not in cell:
            continue
        joined = []
        for out in cell.outputs:
            last = joined[-1] if joined else None
            if (
                out.get("output_type") == "stream"
                and last is not None
                and last.get("output_type") == "stream"
                and last.get("name") == out.get("name")
            ):
                last["text"] += out.get("text", "")
            else:
                joined.append(out)
        for out in joined:
            if out.get("output_type") == "stream" and "\r" in out.get("text", ""):
                lines = out["text"].split("\n")
                out["text"] = "\n".join(ln.rstrip("\r").split("\r")[-1] for ln in lines)
        cell.outputs = joined


def execute(path: Path, save: bool, timeout: int) -> dict:
    """Execute one notebook top to bottom in a Jupyter kernel (saving its outputs with ``save``); returns
    its wall time and peak memory (over the kernel's process tree) against its budget."""
    import nbformat  # (here, not at the top: tools/run_plain.py imports machine() where Jupyter is absent)
    from nbclient import NotebookClient

    nb = nbformat.read(path, as_version=4)
    client = NotebookClient(
        nb, timeout=timeout, kernel_name="python3", resources={"metadata": {"path": str(path.parent)}}
    )
    profile = os.environ.get("COURSE_PROFILE", "tiny")
    start = time.perf_counter()
    with PeakMemory(os.getpid(), children=True, every=0.2) as mem:
        client.execute()
    wall = time.perf_counter() - start
    collapse_carriage_returns(nb)
    for cell in nb.cells:  # timestamps would make every re-run a diff
        cell.metadata.pop("execution", None)
    if save:
        nbformat.write(nb, path)
    budget = BUDGETS_S.get(path.stem, DEFAULT_BUDGET_S)
    return {
        "notebook": path.name,
        "profile": profile,
        "wall_s": round(wall, 1),
        "peak_mb": round(mem.peak_mb),
        "budget_s": budget,
        "within_budget": wall <= budget and mem.peak / 2**20 <= MEMORY_BUDGET_MB,
    }


def machine() -> dict:
    """This machine, for a timing record: its CPU, cores, Python and torch, and today's date."""
    import torch

    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "date": datetime.now(timezone.utc).strftime("%Y-%m-%d"),
    }
