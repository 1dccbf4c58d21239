"""Run solution notebooks without Jupyter: each notebook's code cells, in order, in a fresh Python process.

For a machine where installing Jupyter is a burden (a rented GPU with a bare Python): the course's
GPU timings and GPU claims runs are made with this. Each notebook runs in its own process, as a kernel
would, with ``MPLBACKEND=Agg``; IPython-only lines (``%...``, ``!...``) are skipped and ``display``
prints. Outputs are not saved into the notebooks (``tools/run_notebooks.py`` does that, with Jupyter).

    python tools/run_plain.py OUT_DIR                       # every solutions/*.ipynb
    python tools/run_plain.py OUT_DIR 02_sft 04_dpo         # some of them
    python tools/run_plain.py OUT_DIR --claims OUT_DIR/claims.jsonl   # also record every claim

Writes ``OUT_DIR/timings.json`` after each notebook, in the format of ``benchmarks/gpu_timings.json``
(wall time, peak memory: ``torch.cuda.max_memory_allocated`` on a GPU, else the process's peak resident
memory; the first error with its cell and traceback). With ``--claims`` the claims are recorded, not
raised (``COURSE_CLAIMS_RECORD``), for ``python tools/claims_sweep.py --import-run gpu FILE``; copy
``timings.json`` to ``benchmarks/gpu_timings.json`` (adding a ``machine`` note) for the README's table.
A machine without the pinned packages can take them as wheels: ``pip install --no-index --no-deps
--target DIR wheels/*.whl`` and ``PYTHONPATH=DIR``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

# Run in the child process: argv = notebook, result file. It writes the result file at the end.
CHILD = r"""
import json, os, resource, sys, time, traceback
nb_path, out_path = sys.argv[1], sys.argv[2]
cells = [c for c in json.load(open(nb_path))["cells"] if c["cell_type"] == "code"]

def display(*objs):
    for o in objs:
        print(o.to_string() if hasattr(o, "to_string") else o)

import builtins
builtins.display = display
scope = {"__name__": "__main__", "display": display}
result = {"cells": [], "error": None}
start = time.perf_counter()
for i, cell in enumerate(cells):
    src = "".join(cell["source"])
    src = "\n".join(ln for ln in src.splitlines() if not ln.lstrip().startswith(("%", "!")))
    t = time.perf_counter()
    try:
        exec(compile(src, f"{os.path.basename(nb_path)}#code-cell-{i}", "exec"), scope)
    except BaseException as e:  # a failing cell ends the notebook, as in a kernel run top to bottom
        result["error"] = {"cell": i, "type": type(e).__name__, "message": str(e)[:500],
                           "traceback": traceback.format_exc()[-2000:]}
        break
    finally:
        result["cells"].append(round(time.perf_counter() - t, 2))
        plt = sys.modules.get("matplotlib.pyplot")
        if plt is not None:
            plt.close("all")
result["wall_s"] = round(time.perf_counter() - start, 1)
torch = sys.modules.get("torch")
if torch is not None and torch.cuda.is_available():
    result["peak_gpu_mb"] = round(torch.cuda.max_memory_allocated() / 2**20, 1)
    result["gpu"] = torch.cuda.get_device_name()
result["peak_rss_mb"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
json.dump(result, open(out_path, "w"))
"""


def machine() -> dict:
    """The benchmark's description of this machine, and how the notebooks were run."""
    from tools.execution import machine as host

    return host() | {
        "runner": "tools/run_plain.py (cells executed in a fresh process per notebook, no Jupyter)",
        "profile": os.environ.get("COURSE_PROFILE", "tiny"),
    }


def run(path: Path, out_dir: Path, env: dict, timeout: int) -> dict:
    """One notebook in a fresh process; returns its timing row (with ``error``: None or what failed)."""
    from utils.claims import NOTEBOOK_ENV

    env = dict(env, **{NOTEBOOK_ENV: path.stem})  # the claims record names the notebook
    result_file = out_dir / f".{path.stem}.result.json"
    result_file.unlink(missing_ok=True)
    start = time.perf_counter()
    try:
        proc = subprocess.run(
            [sys.executable, "-c", CHILD, str(path), str(result_file)],
            cwd=path.parent,
            env=env,
            timeout=timeout,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        output, code = proc.stdout, proc.returncode
    except subprocess.TimeoutExpired as e:
        output, code = (e.stdout or b"").decode() if isinstance(e.stdout, bytes) else (e.stdout or ""), None
    (out_dir / f"{path.stem}.log").write_text(output)
    if result_file.exists():
        result = json.loads(result_file.read_text())
        result_file.unlink()
    else:  # killed (time limit, memory) before it could write its result
        why = f"no result: the process {'ran past the time limit' if code is None else f'exited with {code}'}"
        result = {
            "error": {"type": "Killed", "message": why},
            "wall_s": round(time.perf_counter() - start, 1),
        }
    row = {"wall_s": result["wall_s"], "error": result["error"]}
    for key in ("peak_gpu_mb", "peak_rss_mb", "gpu", "cells"):
        if key in result:
            row[key] = result[key]
    return row


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("out_dir", type=Path)
    ap.add_argument("notebooks", nargs="*", help="names like 02_sft (default: every solution notebook)")
    ap.add_argument("--claims", type=Path, help="record every claim into this file (not raised)")
    ap.add_argument("--timeout", type=int, default=1800, help="seconds per notebook")
    args = ap.parse_args(argv)
    paths = sorted((ROOT / "solutions").glob("*.ipynb"))
    if args.notebooks:
        wanted = {n.removesuffix(".ipynb") for n in args.notebooks}
        unknown = wanted - {p.stem for p in paths}
        if unknown:
            ap.error(f"no such solution notebook: {', '.join(sorted(unknown))}")
        paths = [p for p in paths if p.stem in wanted]
    args.out_dir.mkdir(parents=True, exist_ok=True)
    env = dict(
        os.environ,
        MPLBACKEND="Agg",
        PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
    )
    if args.claims is not None:
        env["COURSE_CLAIMS_RECORD"] = str(args.claims.resolve())
    report = {"machine": machine(), "notebooks": {}}
    failed = 0
    for path in paths:
        print(f"{path.name} ...", flush=True)
        row = run(path, args.out_dir, env, args.timeout)
        report["notebooks"][path.name] = row
        if "gpu" in row:
            report["machine"]["gpu"] = row.pop("gpu")
        (args.out_dir / "timings.json").write_text(json.dumps(report, indent=2) + "\n")
        if row["error"]:
            failed += 1
            e = row["error"]
            print(f"  FAILED at code cell {e.get('cell', '?')}: {e['type']}: {e['message']}", flush=True)
        else:
            peak = (
                f"{row['peak_gpu_mb']:.0f} MB on the GPU"
                if "peak_gpu_mb" in row
                else f"{row['peak_rss_mb']} MB"
            )
            print(f"  {row['wall_s']:.1f} s, peak {peak}", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
