"""Execute solution notebooks top to bottom, measure them, and (optionally) save the outputs.

This is the course's benchmark command: for each notebook it records the wall time and the peak
resident memory of the kernel (sampled every 0.2 s over the kernel's whole process tree) in
``benchmarks/timings.json`` and in the table of ``README.md`` between its timing markers.

    python tools/run_notebooks.py                     # all solutions, save outputs, record timings
    python tools/run_notebooks.py solutions/01_pretraining.ipynb --no-save
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import re
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import nbformat
from nbclient import NotebookClient

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from utils.evaluate import PeakMemory  # noqa: E402
TIMINGS = ROOT / "benchmarks" / "timings.json"
README = ROOT / "README.md"
START, END = "<!-- timings:start -->", "<!-- timings:end -->"
BUDGETS_S = {"03_rlhf": 240, "06_project2": 240}  # COURSE.md §7; every other notebook: 120 s
DEFAULT_BUDGET_S, MEMORY_BUDGET_MB = 120, 3072


def collapse_carriage_returns(nb) -> None:
    """Keep only what a terminal would show of progress bars (text after the last ``\\r``)."""
    for cell in nb.cells:
        for out in cell.get("outputs", []):
            if out.get("output_type") == "stream" and "\r" in out.get("text", ""):
                lines = out["text"].split("\n")
                out["text"] = "\n".join(ln.rstrip("\r").split("\r")[-1] for ln in lines)


def execute(path: Path, save: bool, timeout: int) -> dict:
    nb = nbformat.read(path, as_version=4)
    client = NotebookClient(nb, timeout=timeout, kernel_name="python3",
                            resources={"metadata": {"path": str(path.parent)}})
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
    return {"notebook": path.name, "profile": profile, "wall_s": round(wall, 1), "peak_mb": round(mem.peak_mb),
            "budget_s": budget, "within_budget": wall <= budget and mem.peak / 2**20 <= MEMORY_BUDGET_MB}


def machine() -> dict:
    import torch

    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {"cpu": cpu, "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "python": platform.python_version(), "torch": torch.__version__,
            "date": datetime.now(timezone.utc).strftime("%Y-%m-%d")}


def write_results(results: list[dict]) -> None:
    old = json.loads(TIMINGS.read_text()) if TIMINGS.exists() else {"notebooks": {}}
    merged = dict(old.get("notebooks", {}))
    merged.update({r["notebook"]: r for r in results})
    data = {"machine": machine(), "notebooks": dict(sorted(merged.items()))}
    data["total_s"] = round(sum(r["wall_s"] for r in data["notebooks"].values()), 1)
    TIMINGS.parent.mkdir(exist_ok=True)
    TIMINGS.write_text(json.dumps(data, indent=2) + "\n")
    if README.exists():
        text = README.read_text()
        if START in text and END in text:
            table = render_table(data)
            text = re.sub(re.escape(START) + r".*?" + re.escape(END), lambda _: f"{START}\n{table}\n{END}", text, flags=re.S)
            README.write_text(text)


def render_table(data: dict) -> str:
    m = data["machine"]
    rows = ["| notebook | wall time | peak memory | budget |", "|---|---:|---:|---|"]
    for r in data["notebooks"].values():
        ok = "within" if r["within_budget"] else "**over**"
        rows.append(f"| `{r['notebook']}` | {r['wall_s']:.0f} s | {r['peak_mb']} MB | {r['budget_s']} s, 3 GB: {ok} |")
    rows.append(f"| **all** | {data['total_s']:.0f} s | | 15 min |")
    rows.append("")
    rows.append(f"Measured by `python tools/run_notebooks.py` on {m['date']}: {m['cpu']}, {m['cores']} cores, "
                f"Python {m['python']}, torch {m['torch']}, `tiny` profile.")
    return "\n".join(rows)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("notebooks", nargs="*", type=Path, help="default: every solutions/*.ipynb")
    ap.add_argument("--no-save", action="store_true", help="do not write outputs back into the notebooks")
    ap.add_argument("--no-record", action="store_true", help="do not write benchmarks/timings.json or README")
    ap.add_argument("--timeout", type=int, default=900, help="per-cell timeout in seconds")
    args = ap.parse_args(argv)
    paths = args.notebooks or sorted((ROOT / "solutions").glob("*.ipynb"))
    os.environ.pop("MPLBACKEND", None)  # let the kernel use its inline backend, so figures are saved
    results = []
    for path in paths:
        print(f"executing {path.name} ...", flush=True)
        r = execute(path.resolve(), save=not args.no_save, timeout=args.timeout)
        print(f"  {r['wall_s']:.1f} s, peak {r['peak_mb']} MB ({'within' if r['within_budget'] else 'OVER'} budget)", flush=True)
        results.append(r)
    if not args.no_record:
        write_results(results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
