"""Execute solution notebooks top to bottom, measure them, and (optionally) save the outputs.

This is the course's benchmark command: for each notebook it records the wall time and the peak
resident memory of the kernel (sampled every 0.2 s over the kernel's whole process tree) in
``benchmarks/timings.json`` and in the table of ``README.md`` between its timing markers.

    python tools/run_notebooks.py                     # all solutions, save outputs, record timings
    python tools/run_notebooks.py solutions/01_pretraining.ipynb --no-save
    python tools/run_notebooks.py --record-claims     # also record the claims as the sweep's run
                                                      # "seed<COURSE_SEED>"

With ``--record-claims`` (``tools/course.sh`` passes it) this run is also the claims sweep's run for
its seed: every claim is recorded (not raised) into ``benchmarks/claims_runs/``, the claims record
and its book page are rebuilt, and the command fails at the end, after saving, if a claim did not hold.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import tempfile
from pathlib import Path

from tools.claims_sweep import record_claims, report
from tools.execution import TOTAL_BUDGET_S, execute, machine

ROOT = Path(__file__).resolve().parent.parent
TIMINGS = ROOT / "benchmarks" / "timings.json"
GPU_TIMINGS = ROOT / "benchmarks" / "gpu_timings.json"  # from a run of tools/run_plain.py on a GPU
README = ROOT / "README.md"
START, END = "<!-- timings:start -->", "<!-- timings:end -->"


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
            text = re.sub(
                re.escape(START) + r".*?" + re.escape(END),
                lambda _: f"{START}\n{table}\n{END}",
                text,
                flags=re.S,
            )
            README.write_text(text)


def render_table(data: dict) -> str:
    m = data["machine"]
    gpu = json.loads(GPU_TIMINGS.read_text()) if GPU_TIMINGS.exists() else None
    head = "| notebook | CPU wall time | CPU peak memory | budget (CPU) |"
    rows = [
        head + (" GPU wall time | GPU peak memory |" if gpu else ""),
        "|---|---:|---:|---|" + ("---:|---:|" if gpu else ""),
    ]
    for r in data["notebooks"].values():
        ok = "within" if r["within_budget"] else "**over**"
        row = (
            f"| `{r['notebook']}` | {r['wall_s']:.0f} s | {r['peak_mb']} MB | {r['budget_s']} s, 3 GB: {ok} |"
        )
        if gpu:
            g = gpu["notebooks"].get(r["notebook"])
            row += f" {g['wall_s']:.0f} s | {g['peak_gpu_mb']:.0f} MB |" if g else " | |"
        rows.append(row)
    ok = "within" if data["total_s"] <= TOTAL_BUDGET_S else "**over**"
    total = f"| **all** | {data['total_s']:.0f} s | | {TOTAL_BUDGET_S // 60} min: {ok} |"
    if gpu:
        measured = [n for n in data["notebooks"] if n in gpu["notebooks"]]
        n_all = len(data["notebooks"])
        partial = f" ({len(measured)} of {n_all})" if len(measured) < n_all else ""
        total += f" {sum(gpu['notebooks'][n]['wall_s'] for n in measured):.0f} s{partial} | |"
    rows += [total, ""]
    rows.append(
        f"CPU: measured by `python tools/run_notebooks.py` on {m['date']}: {m['cpu']}, {m['cores']} cores, "
        f"Python {m['python']}, torch {m['torch']}, `tiny` profile; "
        "peak memory is the kernel's resident memory."
    )
    if gpu:
        g = gpu["machine"]
        rows.append(
            f"GPU: measured on {g['date']} on one {g['gpu']} ({g['cpu']}), torch {g['torch']}, transformers "
            f"{g['transformers']}, trl {g['trl']}, `tiny` profile, with {g['runner']}; peak memory is "
            "`torch.cuda.max_memory_allocated`." + (f" {g['code']}" if g.get("code") else "")
        )
    return "\n".join(rows)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("notebooks", nargs="*", type=Path, help="default: every solutions/*.ipynb")
    ap.add_argument("--no-save", action="store_true", help="do not write outputs back into the notebooks")
    ap.add_argument("--no-record", action="store_true", help="do not write benchmarks/timings.json or README")
    ap.add_argument("--timeout", type=int, default=900, help="per-cell timeout in seconds")
    ap.add_argument(
        "--record-claims", action="store_true", help="record the claims as the sweep's run for this seed"
    )
    args = ap.parse_args(argv)
    claims_run = None
    if args.record_claims:
        from utils.config import run_seed

        claims_run = f"seed{run_seed()}"
    paths = args.notebooks or sorted((ROOT / "solutions").glob("*.ipynb"))
    os.environ.pop("MPLBACKEND", None)  # let the kernel use its inline backend, so figures are saved
    for path in paths:
        print(f"executing {path.name} ...", flush=True)
        if claims_run is None:
            r = execute(path.resolve(), save=not args.no_save, timeout=args.timeout)
        else:  # record the claims as the sweep would, into that run's records
            with tempfile.TemporaryDirectory() as tmp:
                with record_claims(claims_run, path.stem, Path(tmp) / "claims.jsonl"):
                    r = execute(path.resolve(), save=not args.no_save, timeout=args.timeout)
        print(
            f"  {r['wall_s']:.1f} s, peak {r['peak_mb']} MB "
            f"({'within' if r['within_budget'] else 'OVER'} budget)",
            flush=True,
        )
        if not args.no_record:  # after each notebook: a later failure keeps the earlier measurements
            write_results([r])
    if claims_run is not None:
        data = report()
        failed = [c for c in data["claims"] if claims_run in c["runs"] and not c["runs"][claims_run]["held"]]
        for c in failed:
            print(
                f"CLAIM FAILED in this run: {c['notebook']}: {c['claim']}: "
                f"{'; '.join(c['runs'][claims_run]['checks'])}"
            )
        if failed:
            return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
