"""The claims sweep: run every solution notebook for several seeds and float paths, record every
claim it states, and write ``benchmarks/claims.json`` and the book page ``book/claims.md``.

A claim in the text (``utils.claims.claim``) is asserted only if it holds in every run here. The
runs: ``COURSE_SEED`` 0 to 4; seed 0 again with one CPU thread; and seed 0 on other CPU
kernels (``MKL_CBWR=COMPATIBLE``, ``ATEN_CPU_CAPABILITY=avx2``: other float reductions, standing in
for another CPU; one thread alone changed no number of the tiny models on a 2-core machine). Each
run has its own artifact cache, so it trains every model itself, as a fresh machine would. Outputs
are not saved: the committed notebooks stay the seed-0 run of ``tools/run_notebooks.py``.

    python tools/claims_sweep.py                              # the seven runs, every notebook
    python tools/claims_sweep.py --runs seed1 --notebooks 04_dpo   # re-run part of it
    python tools/claims_sweep.py --report                     # rebuild claims.json and the page
                                                              # from the records
    python tools/claims_sweep.py --import-run gpu FILE.jsonl  # add a run recorded elsewhere (a GPU)

Per-run records live in ``benchmarks/claims_runs/RUN.jsonl`` (one line per claim); re-running a
notebook in a run replaces that notebook's lines. A GPU run is made with ``COURSE_CLAIMS_RECORD``
set while ``tools/run_plain.py --claims FILE`` runs the notebooks there, then imported.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

from tools.execution import execute  # the benchmark's executor, one kernel per notebook
from tools.execution import machine as describe

ROOT = Path(__file__).resolve().parent.parent
RECORDS = ROOT / "benchmarks" / "claims_runs"
CLAIMS_JSON = ROOT / "benchmarks" / "claims.json"
PAGE = ROOT / "book" / "claims.md"
# name -> environment; the order is the page's column order
RUNS = {
    "seed0": {"COURSE_SEED": "0"},
    "seed1": {"COURSE_SEED": "1"},
    "seed2": {"COURSE_SEED": "2"},
    "seed3": {"COURSE_SEED": "3"},
    "seed4": {"COURSE_SEED": "4"},
    "seed0-1thread": {"COURSE_SEED": "0", "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"},
    # One thread changed no number of the tiny models here (their matrices are too small to split).
    # What differs between an Intel and an AMD CPU is the kernels: MKL picks its matrix-multiply code
    # by CPU, and ATen its vector width. These two variables make this machine take other kernels.
    "seed0-otherkernels": {"COURSE_SEED": "0", "MKL_CBWR": "COMPATIBLE", "ATEN_CPU_CAPABILITY": "avx2"},
}
REQUIRED_RUNS = list(RUNS)
RUN_TITLES = {
    "seed0": "seed 0",
    "seed1": "seed 1",
    "seed2": "seed 2",
    "seed3": "seed 3",
    "seed4": "seed 4",
    "seed0-1thread": "seed 0, 1 thread",
    "seed0-otherkernels": "seed 0, other CPU kernels",
    "gpu": "seed 0, GPU",
}


def solution_notebooks() -> list[Path]:
    return sorted((ROOT / "solutions").glob("[0-9]*.ipynb"))


def stated_claims() -> list[tuple[str, str]]:
    """``(notebook, sentence)`` of every ``claim(...)`` call in the solution notebooks, in order.

    A claim's sentence must be a plain string: the record keys on it."""
    import ast

    import nbformat

    out = []
    for path in solution_notebooks():
        for cell in nbformat.read(path, as_version=4).cells:
            if cell.cell_type != "code" or "claim(" not in cell.source:
                continue
            src = "\n".join(
                line for line in cell.source.splitlines() if not line.lstrip().startswith(("%", "!"))
            )
            for node in ast.walk(ast.parse(src)):
                if isinstance(node, ast.Call) and getattr(node.func, "id", None) == "claim":
                    first = node.args[0] if node.args else None
                    if not (isinstance(first, ast.Constant) and isinstance(first.value, str)):
                        raise ValueError(
                            f"{path.name}: a claim's sentence must be a plain string, at line {node.lineno}"
                        )
                    out.append((path.stem, first.value))
    return out


def read_jsonl(path: Path) -> list[dict]:
    """The rows of a JSON-lines file (none if it does not exist)."""
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def read_records(run: str) -> list[dict]:
    return read_jsonl(RECORDS / f"{run}.jsonl")


def write_records(run: str, rows: list[dict]) -> None:
    RECORDS.mkdir(parents=True, exist_ok=True)
    (RECORDS / f"{run}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))


def replace_notebook(run: str, notebook: str, new_rows: list[dict]) -> None:
    rows = [r for r in read_records(run) if r.get("notebook") != notebook] + new_rows
    order = {p.stem: i for i, p in enumerate(solution_notebooks())}
    write_records(run, sorted(rows, key=lambda r: order.get(r.get("notebook"), 99)))


@contextlib.contextmanager
def record_claims(run: str, notebook: str, record: Path, env: dict | None = None):
    """While the block executes ``notebook`` (in a kernel started inside it), its claims are recorded to
    ``record``; afterwards they replace that notebook's lines in ``run``'s records, with any error."""
    env = dict(env or {}, COURSE_CLAIMS_RECORD=str(record), COURSE_NOTEBOOK=notebook, COURSE_CLAIMS_RUN=run)
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    error = None
    try:
        yield
    except Exception as e:  # noqa: BLE001 - a failing cell is recorded, then raised again
        error = f"{type(e).__name__}: {str(e)[-1500:]}"
        raise
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        rows = read_jsonl(record)
        for r in rows:
            r["run"] = run
        if error:
            rows.append({"notebook": notebook, "run": run, "error": error})
        replace_notebook(run, notebook, rows)


def run_one(run: str, path: Path, timeout: int) -> dict:
    """Execute one notebook in one run, without saving it; record its claims (and any error)."""
    env = dict(RUNS[run], COURSE_CACHE=str(ROOT / ".cache" / "sweep" / run))
    error, start = None, time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        try:
            with record_claims(run, path.stem, Path(tmp) / "claims.jsonl", env):
                execute(path, save=False, timeout=timeout)
        except Exception as e:  # noqa: BLE001 - a failing cell is recorded, and the sweep goes on
            error = f"{type(e).__name__}: {str(e)[-300:]}"
    rows = [r for r in read_records(run) if r.get("notebook") == path.stem]
    return {
        "run": run,
        "notebook": path.stem,
        "claims": sum("claim" in r for r in rows),
        "failed": [r["claim"] for r in rows if "claim" in r and not r["held"]],
        "error": error,
        "seconds": round(time.perf_counter() - start),
    }


def write_meta(run: str, meta: dict) -> None:
    RECORDS.mkdir(parents=True, exist_ok=True)
    (RECORDS / f"{run}.meta.json").write_text(json.dumps(meta) + "\n")


def machine() -> str:
    """This machine in a few words (the benchmark's description)."""
    m = describe()
    return f"{m['cpu']}, {m['cores']} cores"


def report() -> dict:
    """Merge every run's records into ``benchmarks/claims.json`` and ``book/claims.md``.

    Only claims the notebooks state now are kept: a record of a claim since dropped from the text
    (or reworded) is left out, and listed. A claim stated but not yet recorded shows as "not run"."""
    stated = stated_claims()
    runs = [p.stem for p in sorted(RECORDS.glob("*.jsonl"))]
    runs = [r for r in RUN_TITLES if r in runs] + [r for r in runs if r not in RUN_TITLES]
    claims: dict[tuple, dict] = {}
    errors = []
    meta = {r: json.loads(p.read_text()) for r in runs if (p := RECORDS / f"{r}.meta.json").exists()}
    for run in runs:
        for r in read_records(run):
            if "error" in r:
                errors.append({"run": run, "notebook": r["notebook"], "error": r["error"]})
                continue
            key = (r["notebook"], r["claim"])
            if key not in stated:
                continue
            entry = claims.setdefault(key, {"notebook": r["notebook"], "claim": r["claim"], "runs": {}})
            entry["runs"][run] = {
                "held": r["held"],
                "margin": r["margin"],
                "checks": [c["text"] for c in r["checks"]],
                "values": r.get("values", {}),
            }
            meta.setdefault(run, {}).update({k: r[k] for k in ("seed", "threads", "device") if k in r})
    for nb, sentence in stated:
        claims.setdefault((nb, sentence), {"notebook": nb, "claim": sentence, "runs": {}})
    order = {key: i for i, key in enumerate(stated)}
    out = []
    for entry in sorted(claims.values(), key=lambda e: order[(e["notebook"], e["claim"])]):
        held = [entry["runs"][r]["held"] for r in runs if r in entry["runs"]]
        margins = [
            entry["runs"][r]["margin"]
            for r in runs
            if r in entry["runs"] and entry["runs"][r]["margin"] is not None
        ]
        # held in every required run, and failed in no other recorded run (a GPU run, where one was had)
        entry["held_in_every_run"] = all(held) and all(r in entry["runs"] for r in REQUIRED_RUNS)
        entry["smallest_margin"] = min(margins) if margins else None
        out.append(entry)
    data = {
        "about": "Every claim the solution notebooks state, in every run of tools/claims_sweep.py. "
        "A claim's margin is its tightest comparison's slack, in that comparison's units.",
        "required_runs": REQUIRED_RUNS,
        "runs": {r: meta.get(r, {}) for r in runs},
        "errors": errors,
        "claims": out,
    }
    CLAIMS_JSON.parent.mkdir(exist_ok=True)
    CLAIMS_JSON.write_text(json.dumps(data, indent=1, ensure_ascii=False) + "\n")
    PAGE.write_text(render_page(data))
    return data


def render_page(data: dict) -> str:
    runs = list(data["runs"])
    held = sum(c["held_in_every_run"] for c in data["claims"])
    lines = [
        "# What this course claims, and how robust it is",
        "",
        "Every conclusion a chapter draws from its own training runs is stated through one helper,",
        "`utils.claims.claim`, which names the claim and checks the numbers behind it. A claim stays",
        "in the text as a checked statement only if it held in every run of the **claims sweep**",
        "(`python tools/claims_sweep.py`): each solution notebook executed with `COURSE_SEED` 0, 1, 2, 3",
        "and 4; with seed 0 on a single CPU thread; and with seed 0 on other CPU kernels (MKL's",
        "`MKL_CBWR=COMPATIBLE` matrix multiply and ATen's AVX2 kernels instead of AVX-512) — another order",
        "of floating-point additions, which is what running on another CPU does to a training run (the",
        "same seeds gave different numbers on an Intel and an AMD CPU). A run on a GPU is added when one",
        "is available. Each run trains every model itself.",
        'Findings that held in one run only are written in the text as "in this run", not claimed.',
        "",
        f"**{held} of {len(data['claims'])} claims held in every run.** Each cell shows whether the claim",
        "held and its tightest comparison in that run; the last column is the smallest **margin** over",
        "the runs: how far that comparison was from failing, in its own units (nats, win rate, score",
        "points).",
        "",
        "| run | seed | CPU threads | device |",
        "|---|---:|---:|---|",
    ]
    for r in runs:
        m = data["runs"][r]
        lines.append(
            f"| {RUN_TITLES.get(r, r)} | {m.get('seed', '')} | {m.get('threads', '')} | "
            f"{m.get('device', '')} "
            f"{'(' + m['machine'] + ')' if m.get('machine') else ''} |"
        )
    by_nb: dict[str, list] = {}
    for c in data["claims"]:
        by_nb.setdefault(c["notebook"], []).append(c)
    for nb, claims in by_nb.items():
        lines += [
            "",
            f"## {nb}",
            "",
            "| claim | " + " | ".join(RUN_TITLES.get(r, r) for r in runs) + " | margin |",
            "|---|" + "---|" * len(runs) + "---:|",
        ]
        for c in claims:
            cells = []
            for r in runs:
                x = c["runs"].get(r)
                if x is None:
                    cells.append("not run")
                    continue
                checks = "; ".join(x["checks"])
                cells.append(("✓ " if x["held"] else "**✗** ") + checks.replace("|", "\\|"))
            margin = "" if c["smallest_margin"] is None else f"{c['smallest_margin']:.3g}"
            lines.append(f"| {c['claim']} | " + " | ".join(cells) + f" | {margin} |")
    if data["errors"]:
        lines += ["", "## Runs that stopped with an error", ""]
        lines += [
            f"- {e['notebook']}, {RUN_TITLES.get(e['run'], e['run'])}: `{e['error'][:200]}`"
            for e in data["errors"]
        ]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--runs", nargs="*", default=REQUIRED_RUNS, choices=list(RUNS))
    ap.add_argument(
        "--notebooks", nargs="*", default=None, help="stems like 04_dpo (default: every solution)"
    )
    ap.add_argument("--timeout", type=int, default=1200, help="per-cell timeout in seconds")
    ap.add_argument("--report", action="store_true", help="only rebuild claims.json and the book page")
    ap.add_argument("--import-run", nargs=2, metavar=("NAME", "FILE"), help="add a run recorded elsewhere")
    ap.add_argument("--machine", default=None, help="with --import-run: a description of that machine")
    args = ap.parse_args(argv)
    if args.import_run:
        name, file = args.import_run
        rows = read_jsonl(Path(file))
        for r in rows:
            r["run"] = name
        write_records(name, rows)
        if args.machine:
            write_meta(name, {"machine": args.machine})
    if not args.report and not args.import_run:
        wanted = set(args.notebooks) if args.notebooks else None
        paths = [p for p in solution_notebooks() if wanted is None or p.stem in wanted]
        for run in args.runs:
            for path in paths:
                print(f"[{run}] {path.name} ...", flush=True)
                r = run_one(run, path, args.timeout)
                print(
                    f"  {r['seconds']} s, {r['claims']} claims, failed: {r['failed'] or 'none'}"
                    + (f", ERROR {r['error'][:300]}" if r["error"] else ""),
                    flush=True,
                )
            write_meta(run, {"machine": machine(), "date": datetime.now(timezone.utc).strftime("%Y-%m-%d")})
    data = report()
    bad = [c for c in data["claims"] if not c["held_in_every_run"]]
    print(
        f"{len(data['claims']) - len(bad)} of {len(data['claims'])} claims held in every run "
        f"({', '.join(data['runs'])}); errors: {len(data['errors'])}"
    )
    for c in bad:
        print(
            f"  NOT EVERYWHERE: {c['notebook']}: {c['claim']}: "
            + "; ".join(
                f"{r}: {'held' if x['held'] else 'FAILED ' + ', '.join(x['checks'])}"
                for r, x in c["runs"].items()
            )
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
