"""The book reads without a horizontal scroll (#30): an output the book shows fits its text column.

The course's progress bars are drawn 90 characters wide, the code cells are formatted to 88, and the
book's column holds about that much monospace text; so no text output line a solution shows may be
wider than 90 characters, and no table it shows may have more than 8 columns (a wider one is
transposed or split). Cells the book removes (``remove-cell``, ``remove-output``) are not checked.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SOLUTIONS = sorted((ROOT / "solutions").glob("*.ipynb"))
WIDTH, COLUMNS = 90, 8


def _shown_outputs(nb: dict):
    for i, cell in enumerate(nb["cells"]):
        tags = set(cell.get("metadata", {}).get("tags", []))
        if cell["cell_type"] != "code" or tags & {"remove-cell", "remove-output"}:
            continue
        yield from ((i, o) for o in cell.get("outputs", []))


def wide_lines(nb: dict) -> list[tuple[int, int]]:
    """(cell, width) of every shown text line wider than WIDTH."""
    out = []
    for i, o in _shown_outputs(nb):
        data = o.get("data", {})
        if o.get("output_type") == "stream":
            text = "".join(o["text"])
        elif "text/html" in data or "image/png" in data:
            continue  # the book shows the HTML or the image, not the text
        else:
            text = "".join(data.get("text/plain", ""))
        out += [(i, len(line)) for line in text.replace("\r", "\n").split("\n") if len(line) > WIDTH]
    return out


def wide_tables(nb: dict) -> list[tuple[int, int]]:
    """(cell, columns) of every shown HTML table with more than COLUMNS columns (index included)."""
    out = []
    for i, o in _shown_outputs(nb):
        html = "".join(o.get("data", {}).get("text/html", ""))
        rows = re.findall(r"<tr.*?</tr>", html, flags=re.S)
        if rows:
            cols = max(len(re.findall(r"<t[hd][\s>]", r)) for r in rows)
            if cols > COLUMNS:
                out.append((i, cols))
    return out


@pytest.mark.parametrize("path", SOLUTIONS, ids=lambda p: p.stem)
def test_no_shown_output_needs_a_horizontal_scroll(path):
    nb = json.loads(path.read_text())
    assert not wide_lines(nb), f"{path.name}: output lines wider than {WIDTH} (cell, width): {wide_lines(nb)}"
    assert not wide_tables(nb), (
        f"{path.name}: tables wider than {COLUMNS} columns (cell, columns): {wide_tables(nb)}"
    )


def test_the_width_check_can_fail():
    line = {"output_type": "stream", "name": "stdout", "text": ["x" * 91 + "\n", "short\n"]}
    table = "<table><tr>" + "<th>c</th>" * 9 + "</tr></table>"
    nb = {
        "cells": [
            {"cell_type": "code", "metadata": {}, "outputs": [line]},
            {
                "cell_type": "code",
                "metadata": {},
                "outputs": [
                    {"output_type": "execute_result", "data": {"text/html": table, "text/plain": "t"}}
                ],
            },
            {"cell_type": "code", "metadata": {"tags": ["remove-cell"]}, "outputs": [line]},
        ]
    }
    assert wide_lines(nb) == [(0, 91)] and wide_tables(nb) == [(1, 9)]
