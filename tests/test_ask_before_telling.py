"""The student notebooks ask; they do not tell. A learner should meet a question about a run before
any reading of it, so a student notebook's prose holds no result of our run (its numbers live in
``<!-- BEGIN SOLUTION -->`` blocks, which the generator replaces with "*Your answer here.*") and no
``claim(...)`` (claim cells are tagged ``solution-only``).

A "result" here is a number with two or more decimals in the markdown that equals, at the precision
written, a number printed by the solution's cells, or a percentage with a decimal ("85.9%") that
equals a printed percentage or a printed fraction times 100. Numbers inside math (``$...$``) and inline code,
library versions ("TRL 1.16") and numbers that are literally in the notebook's code (settings such as
``beta=0.04``) are not results.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SOLUTIONS = sorted((ROOT / "solutions").glob("*.ipynb"))
NUMBER = re.compile(r"(?<![\w.])[−-]?\d+\.\d+")
PERCENT = re.compile(r"(?<![\w.])(\d+\.\d+)\s?%")
VERSION = re.compile(
    r"\b(?:python|torch|transformers|trl|datasets|peft|bitsandbytes|accelerate|version|v)\s+\d+(?:\.\d+)+",
    re.IGNORECASE,
)


PROGRESS_BAR = re.compile(r"\|\s*\d+/\d+ \[")  # tqdm: "...| 41/100 [00:05<00:07, 8.13it/s, loss=0.805]"


def _numbers(text: str) -> list[str]:
    return [m.group(0).replace("−", "-") for m in NUMBER.finditer(text)]


def _prose(markdown: str) -> str:
    """Markdown without math, inline code, link targets and library versions."""
    markdown = re.sub(r"\$\$.*?\$\$", " ", markdown, flags=re.S)
    markdown = re.sub(r"\$[^$\n]*\$", " ", markdown)
    markdown = re.sub(r"`[^`]*`", " ", markdown)
    markdown = re.sub(r"\]\([^)]*\)", "]", markdown)
    return VERSION.sub(" ", markdown)


def _printed_lines(nb: dict) -> list[str]:
    """Every line the executed cells printed or displayed (as text), progress bars aside: their
    redraws (a running loss, a rate) change from run to run and would match prose by chance."""
    out = []
    for cell in nb["cells"]:
        for o in cell.get("outputs", []) if cell["cell_type"] == "code" else []:
            text = o.get("text") if o.get("output_type") == "stream" else o.get("data", {}).get("text/plain")
            lines = "".join(text or []).replace("\r", "\n").splitlines()
            out += [ln for ln in lines if not PROGRESS_BAR.search(ln)]
    return out


def _printed(nb: dict) -> list[float]:
    """Every number of :func:`_printed_lines`."""
    return [float(n) for ln in _printed_lines(nb) for n in _numbers(ln)]


def results_in_prose(markdown_cells: list[str], solution: dict) -> list[tuple[int, str]]:
    """(cell index, number) for each number in ``markdown_cells`` that reads a result of ``solution``."""
    printed = _printed(solution)
    code = "\n".join("".join(c["source"]) for c in solution["cells"] if c["cell_type"] == "code")
    settings = set(_numbers(code))
    hits = []
    for i, markdown in enumerate(markdown_cells):
        prose = _prose(markdown)
        for p in PERCENT.findall(prose):
            decimals = len(p.split(".")[1])
            if any(round(100 * x, decimals) == float(p) or round(x, decimals) == float(p) for x in printed):
                hits.append((i, p + "%"))
        for n in _numbers(PERCENT.sub(" ", prose)):
            decimals = len(n.split(".")[1])
            if decimals < 2 or n in settings:
                continue
            if any(abs(round(x, decimals)) == abs(float(n)) for x in printed):
                hits.append((i, n))
    return hits


def _markdown(nb: dict) -> list[str]:
    return ["".join(c["source"]) if c["cell_type"] == "markdown" else "" for c in nb["cells"]]


@pytest.mark.parametrize("path", SOLUTIONS, ids=lambda p: p.stem)
def test_student_prose_reads_no_result_of_our_run(path):
    solution = json.loads(path.read_text())
    student = json.loads((ROOT / "notebooks" / path.name).read_text())
    hits = results_in_prose(_markdown(student), solution)
    assert not hits, (
        f"{path.name}: the student notebook's markdown quotes results of the solution's run "
        f"(cell, number): {hits}. Put the reading in a <!-- BEGIN SOLUTION --> block and ask a "
        "question in its place."
    )


@pytest.mark.parametrize("path", SOLUTIONS, ids=lambda p: p.stem)
def test_claims_are_solution_only(path):
    student = json.loads((ROOT / "notebooks" / path.name).read_text())
    cells = [
        i
        for i, c in enumerate(student["cells"])
        if c["cell_type"] == "code" and "claim(" in "".join(c["source"])
    ]
    assert not cells, f"{path.name}: student cells {cells} state claims; tag them solution-only"


PREDICT = re.compile(r"\*\*Predict\b")
CHECK = re.compile(r"^\*\*(Check|Read)\b", re.M)


def predicts_without_check(nb: dict) -> list[int]:
    """Cell indices of each "**Predict**" whose run is not followed by a question the learner can
    see: a paragraph opening "**Check" or "**Read" in a markdown cell after at least one code cell,
    before the next prediction."""
    cells = nb["cells"]
    missing, open_at, ran = [], None, False
    for i, cell in enumerate(cells):
        text = "".join(cell["source"])
        if cell["cell_type"] == "code":
            ran = ran or open_at is not None
            continue
        if open_at is not None and ran and CHECK.search(text):
            open_at = None
        if PREDICT.search(text):
            if open_at is not None:
                missing.append(open_at)
            open_at, ran = i, False  # a check in the same cell comes before the run: it does not count
    return missing + ([open_at] if open_at is not None else [])


@pytest.mark.parametrize("path", SOLUTIONS, ids=lambda p: p.stem)
def test_each_prediction_is_checked_after_its_run(path):
    student = json.loads((ROOT / "notebooks" / path.name).read_text())
    n = sum(
        bool(PREDICT.search("".join(c["source"]))) for c in student["cells"] if c["cell_type"] == "markdown"
    )
    assert n >= 3, f"{path.name}: {n} predictions; every chapter asks for at least three before its runs"
    missing = predicts_without_check(student)
    assert not missing, (
        f"{path.name}: the predictions in student cells {missing} are never checked: after the run, "
        "open a paragraph with **Check.** (or **Read ...**) that asks the learner to compare"
    )


def test_the_prediction_check_can_fail():
    def cell(kind, text):
        return {"cell_type": kind, "source": [text]}

    checked = {
        "cells": [
            cell("markdown", "**Predict.** Up or down?"),
            cell("code", "run()"),
            cell("markdown", "**Check.** Which?"),
        ]
    }
    assert predicts_without_check(checked) == []
    unchecked = {
        "cells": [
            cell("markdown", "**Predict.** Up?"),
            cell("code", "run()"),
            cell("markdown", "The answer."),
        ]
    }
    assert predicts_without_check(unchecked) == [0]
    before_run = {"cells": [cell("markdown", "**Predict.** Up?\n\n**Check.** Which?"), cell("code", "run()")]}
    assert predicts_without_check(before_run) == [0]


GLUE_QUOTE = re.compile(r"\{glue:text\}`([^`:]+)(?::([^`]*))?`")


def glued(nb: dict) -> dict[str, str]:
    """name -> the text/plain the committed outputs hold for it."""
    out = {}
    for cell in nb["cells"]:
        for o in cell.get("outputs", []) if cell["cell_type"] == "code" else []:
            name = o.get("metadata", {}).get("scrapbook", {}).get("name")
            if name:
                plain = [v for k, v in o["data"].items() if k.endswith("text/plain")]
                out[name] = "".join(plain[0])
    return out


def rendered(nb: dict) -> list[str]:
    """The markdown as the book shows it: each ``{glue:text}`name:fmt``` replaced by the value the
    committed run glued, formatted (a string value as it is)."""

    def sub(m):
        plain, fmt = glued(nb)[m.group(1)], m.group(2) or ""
        return plain.strip("'\"") if plain[:1] in "'\"" else format(float(plain), fmt)

    return [GLUE_QUOTE.sub(sub, text) for text in _markdown(nb)]


def test_the_check_finds_the_readings_the_solutions_hold():
    """It can fail: the solutions' readings, rendered as the book shows them, quote their results
    (and so would the student notebooks, had the readings been written out instead of glued)."""
    chapter = json.loads((ROOT / "solutions" / "03_rlhf.ipynb").read_text())
    assert not results_in_prose(_markdown(chapter), chapter)  # as written: glued, not hard-coded
    assert len(results_in_prose(rendered(chapter), chapter)) >= 10
    printed = "\n".join(_printed_lines(chapter))
    three = re.search(r"(?<![\w.])[1-9]\.\d{3}(?!\d)|(?<![\w.])0\.\d{3}(?!\d)", printed).group(0)
    share = re.search(r"(?<![\w.])\d+\.\d%", printed).group(0)
    planted = [
        f"In this run PPO won {three} of the prompts; log 2 is $0.693$; TRL 1.16 has no PPO.",
        f"The annotators agree with gold on {share} of the held-out pairs.",
    ]
    assert results_in_prose(planted, chapter) == [(0, three), (1, share)]
