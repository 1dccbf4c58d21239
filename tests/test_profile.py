"""tools/profile_course.py: a notebook's wall time split into phases, every second to one phase, with
the sampled tokens counted; and the README tables drawn against one matmul peak."""

import sys
from pathlib import Path

import nbformat
import pytest

from tools import profile_course

ROOT = Path(__file__).resolve().parent.parent

CELLS = [
    """import time
import torch
from utils.models import make_model, generate_texts
from utils.tokenizer import train_tokenizer
from utils.data import pretraining_dataset
tok = train_tokenizer(pretraining_dataset(300, seed=0)["train"]["text"])
model = make_model(tok, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                   num_key_value_heads=1, intermediate_size=64)""",
    """opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
ids = torch.randint(0, len(tok), (8, 16))
for _ in range(3):
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    opt.step()
    opt.zero_grad()""",
    """outs = generate_texts(model, tok, ["Alba eats"] * 16, max_new_tokens=5, do_sample=True)""",
    """time.sleep(0.5)""",
]


@pytest.mark.slow
def test_a_notebook_is_split_into_phases_that_add_up(tmp_path):
    path = tmp_path / "nb.ipynb"
    nb = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell(c) for c in CELLS])
    nbformat.write(nb, path)
    prof = profile_course.profile_notebook(path, sys.executable, timeout=300)
    cells = prof["cells"]
    assert len(cells) == len(CELLS)
    for c in cells:  # every second of a cell goes to exactly one phase
        assert sum(c["phases"].values()) == pytest.approx(c["wall_s"], rel=0.02, abs=0.005), c
    train, sample, sleep = cells[1], cells[2], cells[3]
    for phase in ("forward (train)", "backward", "optimiser"):
        assert train["phases"].get(phase, 0) > 0, (phase, train["phases"])
    assert train["counts"]["train_positions"] == 3 * 8 * 16
    assert sample["phases"].get("sampling", 0) > 0.5 * sample["wall_s"], sample["phases"]
    assert sample["counts"]["sampled_positions"] == 16 * 5  # rows x new tokens
    assert sleep["phases"].get("other", 0) >= 0.5
    assert prof["wall_s"] == pytest.approx(sum(c["wall_s"] for c in cells) + prof["phases"]["start-up"])


def _run(peak, wall, sampling_s):
    nb = {
        "wall_s": wall,
        "phases": {"sampling": sampling_s, "backward": wall - sampling_s},
        "counts": {"sampled_positions": 1000, "sampling_flop": 2e9},
        "cells": [],
    }
    micro = {
        "matmul_peak_gflops": peak,
        "params": 1e6,
        "batch": 64,
        "prompt_tokens": 29,
        "new_tokens": 40,
        "forward": {"tokens_per_s": 3e4, "gflops": 60.0, "of_peak": 60.0 / peak},
    }
    machine = {"date": "2026-12-05", "cpu": "CPU", "cores": 2, "torch": "2.13"}
    return {"machine": machine, "commit": "abc", "micro": micro, "notebooks": {"01.ipynb": nb}}


def test_the_report_puts_every_run_against_one_peak(tmp_path, monkeypatch):
    # a run whose own peak measurement came out low must not look closer to the limit
    data = {"runs": {"before": _run(60.0, 10.0, 2.0), "after": _run(120.0, 8.0, 1.0)}}
    text = profile_course.render(data)
    assert "| `01.ipynb` | before | 10 |" in text and "| **all** | **after** | 8 |" in text
    assert "60k tok/s, 60 GFLOP/s (50%)" not in text  # 60 GFLOP/s of the low peak would read 100%
    assert "30.0k tok/s, 60 GFLOP/s (50%)" in text  # the forward pass, both runs, of 120 GFLOP/s
    assert "1.0k tok/s, 1%" not in text
    assert "0.5k tok/s, 1%" in text and "1.0k tok/s, 2%" in text  # 1 and 2 GFLOP/s of 120
    readme = tmp_path / "README.md"
    readme.write_text(f"intro\n{profile_course.START}\nstale table\n{profile_course.END}\nrest\n")
    monkeypatch.setattr(profile_course, "README", readme)
    profile_course.write_readme(data)
    new = readme.read_text()
    assert new.startswith("intro\n") and new.endswith("rest\n") and "stale table" not in new and text in new
