"""Where the course's time goes: each chapter's wall time by phase, and each loop against the machine.

    python tools/profile_course.py --label after                 # every solution notebook
    python tools/profile_course.py --label after solutions/03_rlhf.ipynb
    python tools/profile_course.py --label before --root ../old  # another checkout of the course
    python tools/profile_course.py --report                      # rebuild the README tables

For each notebook it executes the solution in a fresh kernel (outputs not saved) with phase timers
(``tools/profile_hooks.py``: sampling, forward passes with and without gradients, backward, optimiser,
the gold judge, TRL trainers' own overhead, dataset mapping, tokenising, evaluation helpers, plotting,
imports, and the rest) and token counters, so each cell's loop reports its throughput. Before the
notebooks it measures this machine's fp32 matmul peak (``torch.mm`` of two 1024 x 1024 matrices) and,
on a model of the tiny profile's size with a 64-prompt batch, a forward pass without gradients, a
training step (forward, backward, AdamW), ``generate`` and the course's sampler where the checkout
has one. Results go to ``benchmarks/profile.json`` under ``--label`` and to the README's tables.

With ``--root`` the notebooks, ``utils`` and the kernel's Python are the other checkout's (its
``.venv``), so two versions of the course are profiled by the same instruments: run one after the
other, on the same machine, with nothing else running.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PROFILE = ROOT / "benchmarks" / "profile.json"
README = ROOT / "README.md"
HOOKS = Path(__file__).resolve().parent / "profile_hooks.py"
START, END = "<!-- profile:start -->", "<!-- profile:end -->"
PHASES = [
    "sampling",
    "forward (no grad)",
    "gold judge",
    "forward (train)",
    "backward",
    "optimiser",
    "trainer overhead",
    "dataset map",
    "tokenising",
    "evaluation (other)",
    "plotting",
    "imports",
    "start-up",
    "other",
]

# --- the machine and the loops, outside the notebooks -------------------------------------------
MICRO = r"""
import json, sys, time
import torch
from transformers import LlamaConfig, LlamaForCausalLM

def best(fn, reps):
    fn()
    times = []
    for _ in range(reps):
        t = time.perf_counter(); fn(); times.append(time.perf_counter() - t)
    times.sort()
    return times[len(times) // 2]

torch.manual_seed(0)
a, b = torch.randn(1024, 1024), torch.randn(1024, 1024)
t_mm = best(lambda: torch.mm(a, b), 30)
peak = 2 * 1024**3 / t_mm / 1e9

try:
    from utils.models import TINY_MODEL
except Exception:
    TINY_MODEL = dict(hidden_size=128, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=4,
                      intermediate_size=384, max_position_embeddings=256)
V, B, P, NEW = 1024, 64, 29, 40
config = LlamaConfig(vocab_size=V, tie_word_embeddings=True, pad_token_id=0, bos_token_id=1, eos_token_id=2,
                     **TINY_MODEL)
model = LlamaForCausalLM(config).eval()
n = sum(p.numel() for p in model.parameters())
ids = torch.randint(3, V, (B, P + NEW))
mask = torch.ones_like(ids)

@torch.no_grad()
def forward():
    model(input_ids=ids, attention_mask=mask)

opt = torch.optim.AdamW(model.parameters(), lr=1e-5)
def train_step():
    out = model(input_ids=ids, attention_mask=mask, labels=ids)
    opt.zero_grad(set_to_none=True)
    out.loss.backward()
    opt.step()

prompts = ids[:, :P]
pmask = torch.ones_like(prompts)
pmask[: B // 2, :5] = 0  # left padding in half the rows, as chat prompts of different lengths have

@torch.no_grad()
def hf_generate():
    torch.manual_seed(0)
    model.generate(input_ids=prompts, attention_mask=pmask, do_sample=True, temperature=1.0, top_k=0,
                   top_p=1.0, max_new_tokens=NEW, min_new_tokens=NEW, pad_token_id=0, eos_token_id=None)

out = {"matmul_peak_gflops": peak, "params": n, "batch": B, "prompt_tokens": P, "new_tokens": NEW}
t = best(forward, 10)
out["forward"] = {"s": t, "tokens_per_s": B * (P + NEW) / t, "gflops": 2 * n * B * (P + NEW) / t / 1e9}
t = best(train_step, 5)
out["train_step"] = {"s": t, "tokens_per_s": B * (P + NEW) / t, "gflops": 6 * n * B * (P + NEW) / t / 1e9}
t = best(hf_generate, 5)
out["generate"] = {"s": t, "tokens_per_s": B * NEW / t, "gflops": 2 * n * B * (P + NEW) / t / 1e9,
                   "ms_per_step": 1e3 * t / NEW}
try:
    from utils.sampling import sample_tokens
except Exception:
    sample_tokens = None
if sample_tokens is not None:
    def course_sample():
        torch.manual_seed(0)
        sample_tokens(model, prompts, pmask, max_new_tokens=NEW, temperature=1.0, stop_ids=())
    t = best(course_sample, 5)
    out["course_sampler"] = {"s": t, "tokens_per_s": B * NEW / t, "gflops": 2 * n * B * (P + NEW) / t / 1e9,
                             "ms_per_step": 1e3 * t / NEW}
for k in ("forward", "train_step", "generate", "course_sampler"):
    if k in out:
        out[k]["of_peak"] = out[k]["gflops"] / peak
json.dump(out, sys.stdout)
"""


def run_micro(python: str, cwd: Path) -> dict:
    res = subprocess.run([python, "-c", MICRO], cwd=cwd, capture_output=True, text=True, check=True)
    return json.loads(res.stdout.strip().splitlines()[-1])


# --- the notebooks ------------------------------------------------------------------------------
def profile_notebook(path: Path, python: str, timeout: int) -> dict:
    import nbformat
    from nbclient import NotebookClient

    nb = nbformat.read(path, as_version=4)
    with tempfile.TemporaryDirectory() as tmp:
        dump = Path(tmp) / "profile.json"
        nb.cells.insert(0, nbformat.v4.new_code_cell(HOOKS.read_text()))
        nb.cells.append(nbformat.v4.new_code_cell(f"_course_profile_dump({str(dump)!r})"))
        client = NotebookClient(
            nb,
            timeout=timeout,
            kernel_name="python3",
            resources={"metadata": {"path": str(path.parent)}},
        )
        # the kernel runs the checkout's own Python (its venv), so its utils are the ones profiled
        client.kernel_manager_class = _kernel_manager(python)
        start = time.perf_counter()
        client.execute()
        wall = time.perf_counter() - start
        cells = json.loads(dump.read_text())["cells"]
    # (the hooks' own cell registers the timers while it runs and the dump runs before its cell
    # ends, so neither is among the records)
    phases: dict[str, float] = {}
    counts: dict[str, float] = {}
    for c in cells:
        for k, v in c["phases"].items():
            phases[k] = phases.get(k, 0.0) + v
        for k, v in c["counts"].items():
            counts[k] = counts.get(k, 0) + v
    phases["start-up"] = max(0.0, wall - sum(c["wall_s"] for c in cells))
    return {"wall_s": wall, "phases": phases, "counts": counts, "cells": cells}


def _kernel_manager(python: str):
    from jupyter_client.manager import KernelManager

    class Manager(KernelManager):
        def format_kernel_cmd(self, extra_arguments=None):
            cmd = super().format_kernel_cmd(extra_arguments)
            return [python if i == 0 else a for i, a in enumerate(cmd)]

    return Manager


def machine() -> dict:
    from tools.execution import machine as m

    return m()


# --- the report ---------------------------------------------------------------------------------
# The README's columns: the timers' phases, a few merged so the table fits a page.
COLUMNS = {
    "sampling": ["sampling"],
    "scoring": ["forward (no grad)", "gold judge"],
    "training": ["forward (train)", "backward", "optimiser"],
    "TRL's own": ["trainer overhead", "dataset map"],
    "tokenising, tables": ["tokenising", "evaluation (other)"],
    "plots": ["plotting"],
    "start-up, imports": ["start-up", "imports"],
    "other": ["other"],
}
TRAIN_PHASES = ("forward (train)", "backward", "optimiser")


def rates(phases: dict, counts: dict, peak: float) -> dict:
    """Throughput of a stretch of work (a notebook or a cell): GFLOP/s and share of the matmul peak of its
    training steps (6N per position), sampling (2N per position, prompt and answer) and no-grad forwards,
    and sampled tokens per second."""
    out = {}
    train_t = sum(phases.get(k, 0.0) for k in TRAIN_PHASES)
    if train_t > 0.5 and counts.get("train_flop"):
        out["train_gflops"] = 3 * counts["train_flop"] / train_t / 1e9  # forward's 2N + backward's 4N
    if phases.get("sampling", 0) > 0.5 and counts.get("sampled_positions"):
        out["sampling_tokens_per_s"] = counts["sampled_positions"] / phases["sampling"]
        out["sampling_gflops"] = counts["sampling_flop"] / phases["sampling"] / 1e9
    if phases.get("forward (no grad)", 0) > 0.5 and counts.get("no_grad_flop"):
        out["no_grad_gflops"] = counts["no_grad_flop"] / phases["forward (no grad)"] / 1e9
    for k in ("train_gflops", "sampling_gflops", "no_grad_gflops"):
        if k in out:
            out[k.replace("gflops", "of_peak")] = out[k] / peak
    return out


def loop_rows(nb: dict, peak: float, min_share: float = 0.05) -> list[dict]:
    """The cells that take at least ``min_share`` of the notebook, with their loops' throughput."""
    rows = []
    for c in nb["cells"]:
        if c["wall_s"] < min_share * nb["wall_s"]:
            continue
        p = c["phases"]
        row = {
            "index": c.get("index"),
            "cell": c["label"],
            "s": c["wall_s"],
            "top": max(p, key=p.get) if p else "",
        }
        rows.append(row | rates(p, c["counts"], peak))
    return rows


def _labels(runs: dict) -> list[str]:
    return [k for k in ("before", "after") if k in runs] + sorted(
        k for k in runs if k not in ("before", "after")
    )


def _rate(r: dict, key: str) -> str:
    if key == "sampling":
        if "sampling_gflops" not in r:
            return "–"
        return f"{r['sampling_tokens_per_s'] / 1e3:.1f}k tok/s, {100 * r['sampling_of_peak']:.0f}%"
    if f"{key}_gflops" not in r:
        return "–"
    return f"{r[f'{key}_gflops']:.0f} GFLOP/s, {100 * r[f'{key}_of_peak']:.0f}%"


def render(data: dict) -> str:
    runs = data.get("runs", {})
    labels = [k for k in _labels(runs) if k in ("before", "after")] or _labels(runs)
    if not labels:
        return "(no profile recorded)"
    out = []
    names = sorted({nb for label in labels for nb in runs[label]["notebooks"]})
    # One peak for every percentage: the highest matmul rate measured in these runs. A run's own
    # measurement moves by up to a third from hour to hour on a shared machine, and a low one would
    # make that run's loops look closer to the limit than they are.
    peak = max(runs[label]["micro"]["matmul_peak_gflops"] for label in labels)
    # 1. each chapter's wall time by phase
    out.append("| notebook | run | wall | " + " | ".join(COLUMNS) + " |")
    out.append("|---|---|---:|" + "---:|" * len(COLUMNS))

    def row(label, name, wall, phases):
        cells = " | ".join(f"{sum(phases.get(p, 0.0) for p in ps):.0f}" for ps in COLUMNS.values())
        return f"| {name} | {label} | {wall:.0f} | {cells} |"

    for name in names:
        for label in labels:
            nb = runs[label]["notebooks"].get(name)
            if nb is not None:
                out.append(row(label, f"`{name}`", nb["wall_s"], nb["phases"]))
    for label in labels:
        nbs = runs[label]["notebooks"].values()
        total = {p: sum(nb["phases"].get(p, 0.0) for nb in nbs) for ps in COLUMNS.values() for p in ps}
        out.append(
            row(label, "**all**", sum(nb["wall_s"] for nb in nbs), total).replace(
                f"| {label} |", f"| **{label}** |"
            )
        )
    out.append("")
    out.append(
        "Seconds, from `python tools/profile_course.py`: *scoring* is forward passes without "
        "gradients (log-probabilities for the KL and PPO's ratio, the reward and value models) and the "
        "gold judge; *training* is forward, backward and optimiser steps; *TRL's own* is what TRL's "
        "trainers spend outside those (their batching, log-probability kernels, logging, dataset "
        "mapping). The timers add about 2%."
    )
    for label in labels:
        m = runs[label]["machine"]
        out.append(
            f"*{label}*: commit `{runs[label].get('commit', '?')}`, measured {m['date']} on {m['cpu']}, "
            f"{m['cores']} cores, torch {m['torch']}."
        )
    out.append("")
    # 2. the machine and the loops on a model of the tiny size
    out.append("| run | matmul peak | forward, no grad | training step | `generate` | course sampler |")
    out.append("|---|---:|---:|---:|---:|---:|")
    for label in labels:
        mi = runs[label]["micro"]

        def cell(k, sampled=False):
            if k not in mi:
                return "–"
            v = mi[k]
            extra = f", {v['ms_per_step']:.1f} ms/step" if sampled else ""
            rate = f"{v['tokens_per_s'] / 1e3:.1f}k tok/s, {v['gflops']:.0f} GFLOP/s"
            return f"{rate} ({100 * v['gflops'] / peak:.0f}%){extra}"

        out.append(
            f"| {label} | {mi['matmul_peak_gflops']:.0f} GFLOP/s | {cell('forward')} | "
            f"{cell('train_step')} | {cell('generate', True)} | {cell('course_sampler', True)} |"
        )
    out.append("")
    mi = runs[labels[-1]]["micro"]
    out.append(
        f"A model of the tiny profile's size ({mi['params'] / 1e6:.2f} M parameters), {mi['batch']} "
        f"prompts of {mi['prompt_tokens']} tokens: one forward pass over prompt and {mi['new_tokens']} "
        f"answer tokens, one training step on them, and sampling the {mi['new_tokens']} answer tokens "
        "(tokens/s counts sampled tokens; GFLOP/s counts 2N per position processed, prompt included, "
        "and 6N per position trained). Every % in these tables is of one peak, the highest rate of a "
        f"product of two 1024 x 1024 fp32 matrices measured in these runs ({peak:.0f} GFLOP/s); each "
        "run's own measurement is in the first column, and it moves from hour to hour."
    )
    out.append("")
    # 3. each chapter's loops against the machine
    out.append(
        "Each chapter's loops, over the whole notebook: GFLOP/s counts every position a call "
        "processes, padding included, so a loop that stopped computing padding does less work in "
        "less time, at a lower rate. Sampling's tokens/s counts rows times new tokens."
    )
    out.append("")
    out.append("| notebook | run | training steps | sampling | forward, no grad |")
    out.append("|---|---|---:|---:|---:|")
    for name in names:
        for label in labels:
            nb = runs[label]["notebooks"].get(name)
            if nb is None:
                continue
            r = rates(nb["phases"], nb["counts"], peak)
            out.append(
                f"| `{name}` | {label} | {_rate(r, 'train')} | {_rate(r, 'sampling')} | "
                f"{_rate(r, 'no_grad')} |"
            )
    return "\n".join(out)


def write_readme(data: dict) -> None:
    text = README.read_text()
    if START not in text or END not in text:
        return
    table = render(data)
    text = re.sub(
        re.escape(START) + r".*?" + re.escape(END), lambda _: f"{START}\n{table}\n{END}", text, flags=re.S
    )
    README.write_text(text)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("notebooks", nargs="*", type=Path, help="default: every solutions/*.ipynb of --root")
    ap.add_argument("--label", default="after", help="the run's name in benchmarks/profile.json")
    ap.add_argument("--root", type=Path, default=ROOT, help="the checkout to profile (default: this one)")
    ap.add_argument("--timeout", type=int, default=900, help="per-cell timeout in seconds")
    ap.add_argument("--report", action="store_true", help="only rebuild the README tables")
    args = ap.parse_args(argv)
    data = json.loads(PROFILE.read_text()) if PROFILE.exists() else {"runs": {}}
    if args.report:
        write_readme(data)
        return 0
    root = args.root.resolve()
    venv_python = root / ".venv" / "bin" / "python"
    python = str(venv_python) if venv_python.exists() else sys.executable
    paths = [p.resolve() for p in args.notebooks] or sorted((root / "solutions").glob("*.ipynb"))
    commit = subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True, text=True
    ).stdout.strip()
    env_before = dict(os.environ)
    os.environ.pop("MPLBACKEND", None)
    print("measuring the machine and the loops ...", flush=True)
    micro = run_micro(python, root)
    rates_ = [f"matmul peak {micro['matmul_peak_gflops']:.0f} GFLOP/s"]
    for k in ("forward", "generate", "course_sampler"):
        if k in micro:
            rates_.append(f"{k} {micro[k]['tokens_per_s']:.0f} tok/s")
    print("  " + "; ".join(rates_), flush=True)
    run = data["runs"].get(args.label, {})
    if not args.notebooks:
        run = {}
    run.update({"machine": machine(), "commit": commit, "micro": micro})
    run.setdefault("notebooks", {})
    for path in paths:
        print(f"profiling {path.name} ...", flush=True)
        nb = profile_notebook(path, python, args.timeout)
        top = sorted(nb["phases"].items(), key=lambda kv: -kv[1])[:4]
        print(f"  {nb['wall_s']:.1f} s: " + ", ".join(f"{k} {v:.1f}" for k, v in top), flush=True)
        run["notebooks"][path.name] = nb
        data["runs"][args.label] = run
        PROFILE.parent.mkdir(exist_ok=True)
        PROFILE.write_text(json.dumps(data, indent=1) + "\n")
    os.environ.clear()
    os.environ.update(env_before)
    write_readme(data)
    return 0


if __name__ == "__main__":
    sys.exit(main())
