"""The solutions' prose quotes its run through myst-nb's glue (``utils.book.glue``): a number in a
reading comes from the outputs it sits under, so re-executing a notebook on another machine updates
its text. These tests hold the two ends together: every quoted name was glued by the committed run,
no glued number is NaN, glue lives only in solution-only cells the book does not show, and no
chapter, its readings all glued, hard-codes a result of its run."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from test_ask_before_telling import GLUE_QUOTE, _markdown, glued, results_in_prose

from utils.book import GLUED, glue

ROOT = Path(__file__).resolve().parent.parent
SOLUTIONS = sorted((ROOT / "solutions").glob("*.ipynb"))


def _quoted(nb: dict) -> set[str]:
    return {m.group(1) for text in _markdown(nb) for m in GLUE_QUOTE.finditer(text)}


@pytest.mark.parametrize("path", SOLUTIONS, ids=lambda p: p.stem)
def test_every_quoted_name_was_glued_by_the_committed_run(path):
    nb = json.loads(path.read_text())
    missing = sorted(_quoted(nb) - set(glued(nb)))
    assert not missing, f"{path.name}: the text quotes names no cell glued: {missing}"


@pytest.mark.parametrize("path", SOLUTIONS, ids=lambda p: p.stem)
def test_no_name_is_glued_twice(path):
    """myst-nb warns (an error under -W) and the text may quote the wrong one of the two."""
    nb = json.loads(path.read_text())
    names = [
        o.get("metadata", {}).get("scrapbook", {}).get("name")
        for c in nb["cells"]
        if c["cell_type"] == "code"
        for o in c.get("outputs", [])
    ]
    twice = sorted({n for n in names if n and names.count(n) > 1})
    assert not twice, f"{path.name}: names glued more than once: {twice}"


@pytest.mark.parametrize("path", SOLUTIONS, ids=lambda p: p.stem)
def test_no_glued_number_is_nan(path):
    values = glued(json.loads(path.read_text()))
    bad = [k for k, v in values.items() if v.strip() in ("nan", "inf", "-inf")]
    assert not bad, f"{path.name}: glued values the book would print as nonsense: {bad}"


@pytest.mark.parametrize("path", SOLUTIONS, ids=lambda p: p.stem)
def test_glue_lives_in_solution_only_cells(path):
    nb = json.loads(path.read_text())
    gluing = [
        i
        for i, c in enumerate(nb["cells"])
        if c["cell_type"] == "code"
        and "glue(" in "".join(c["source"])
        and not {"solution-only", "remove-cell"} <= set(c.get("metadata", {}).get("tags", []))
    ]
    assert not gluing, (
        f"{path.name}: cells {gluing} glue a reading; tag them solution-only (the student notebook "
        "holds no reading) and remove-cell (the book shows the reading, not the gluing)"
    )
    student = json.loads((ROOT / "notebooks" / path.name).read_text())
    assert not any("utils.book" in "".join(c["source"]) for c in student["cells"])


@pytest.mark.parametrize("stem", [p.stem for p in SOLUTIONS])
def test_a_glued_chapter_hard_codes_no_result_of_its_run(stem):
    nb = json.loads((ROOT / "solutions" / f"{stem}.ipynb").read_text())
    assert _quoted(nb), f"{stem}'s readings quote their run through glue"
    hits = results_in_prose(_markdown(nb), nb)
    assert not hits, f"{stem}'s prose hard-codes results of its run (cell, number): {hits}"


def test_the_hard_coded_result_check_can_fail():
    nb = json.loads((ROOT / "solutions" / "07_beyond.ipynb").read_text())
    # the check can fail: one reading written with the table's number instead of its name
    table = next(
        "".join(o["data"]["text/plain"])
        for c in nb["cells"]
        if c["cell_type"] == "code"
        for o in c.get("outputs", [])
        if "kl_table" in "".join(c["source"]) and "text/plain" in o.get("data", {})
    )
    number = re.search(r"\d+\.\d{4}", table).group(0)
    assert results_in_prose([f"k1 lands at {number} nats."], nb) == [(0, number)]


def test_glue_turns_scalars_into_plain_numbers_and_refuses_other_types():
    assert type(glue("test_np", np.float64(0.25))) is float
    assert type(glue("test_torch", torch.tensor(3))) is int
    assert glue("test_text", "PPO") == "PPO" and GLUED["test_np"] == 0.25
    assert math.isnan(glue("test_nan", float("nan")))
    for bad in ([0.1], {"a": 1}, True, np.arange(3)):
        with pytest.raises(TypeError):
            glue("test_bad", bad)
