"""Claims: the one way a chapter states a conclusion it measured.

A claim is a sentence and the comparisons that make it true::

    claim("KL falls as β grows past 0.1",
          (kl[1.0], "<", kl[0.3]), (kl[0.3], "<", min(kl[0.03], kl[0.1])),
          values={"KL β=1": kl[1.0], "KL β=0.3": kl[0.3]})

Each comparison is ``(left, op, right)`` with ``op`` one of ``<  <=  >  >=``, or a plain boolean for
a condition that has no size (``series.is_monotonic_increasing``). The claim holds when every
comparison does; its **margin** is the smallest slack among them (``right - left`` for ``<``), in
the comparison's own units, so a sweep can show how close each claim came to failing.

When a claim does not hold, :class:`ClaimFailed` (an ``AssertionError``) names it and shows every
value. With the environment variable ``COURSE_CLAIMS_RECORD=path.jsonl``, each claim is appended
to that file as one JSON line (held or not, with its values, the run's seed, threads and device)
and a failing one does not stop the notebook: that is how ``tools/claims_sweep.py`` runs every
solution for several seeds and float paths and writes ``benchmarks/claims.json``.

Plain ``assert`` stays for sanity checks of the code (shapes, a loss matching the library's);
``claim`` is for findings about training, which could come out otherwise on another machine.
"""

from __future__ import annotations

import json
import math
import operator
import os
from pathlib import Path

import numpy as np

RECORD_ENV = "COURSE_CLAIMS_RECORD"
NOTEBOOK_ENV = "COURSE_NOTEBOOK"
_OPS = {"<": operator.lt, "<=": operator.le, ">": operator.gt, ">=": operator.ge}


class ClaimFailed(AssertionError):
    """A claim of the text did not hold in this run."""


def _number(x):
    """A plain Python number from a tensor, NumPy or pandas scalar."""
    if hasattr(x, "item"):
        x = x.item()
    return float(x)


def _check(c) -> dict:
    if isinstance(c, (bool, np.bool_)):
        return {"text": str(bool(c)), "holds": bool(c), "slack": None}
    if not (isinstance(c, tuple) and len(c) == 3 and c[1] in _OPS):
        raise TypeError(f"a comparison is (left, op, right) with op in {sorted(_OPS)}, or a bool; got {c!r}")
    left, op, right = _number(c[0]), c[1], _number(c[2])
    holds = bool(_OPS[op](left, right)) and not (math.isnan(left) or math.isnan(right))
    slack = right - left if op in ("<", "<=") else left - right
    return {
        "text": f"{left:.4g} {op} {right:.4g}",
        "holds": holds,
        "slack": slack,
        "left": left,
        "right": right,
    }


def _notebook() -> str | None:
    """The notebook stating the claim: named by the runner, or read from the cell's file name."""
    name = os.environ.get(NOTEBOOK_ENV)
    if name:
        return name
    import inspect

    for frame in inspect.stack()[2:8]:
        stem = Path(frame.filename.split("#")[0]).name
        if stem.endswith(".ipynb"):
            return stem.removesuffix(".ipynb")
    return None


def _run() -> dict:
    import torch

    from .config import run_seed

    device = "cuda" if torch.cuda.is_available() else "cpu"
    return {
        "seed": run_seed(),
        "threads": torch.get_num_threads(),
        "device": device,
        "run": os.environ.get("COURSE_CLAIMS_RUN"),
    }


class Verdict:
    """What :func:`claim` returns: true when the claim held. It tests and compares like that bool
    (``if claim(...)``, ``claim(...) == True``), and shows nothing as a cell's last value, where a
    bool would print ``True`` under every claim in the book."""

    __slots__ = ("held",)

    def __init__(self, held: bool):
        self.held = bool(held)

    def __bool__(self) -> bool:
        return self.held

    def __eq__(self, other) -> bool:
        return self.held == bool(other) if isinstance(other, (bool, Verdict)) else NotImplemented

    def __hash__(self) -> int:
        return hash(self.held)

    def __repr__(self) -> str:
        return repr(self.held)

    def _ipython_display_(self) -> None:  # IPython displays nothing for it
        pass


def claim(sentence: str, *comparisons, values: dict | None = None) -> Verdict:
    """State a conclusion: raise :class:`ClaimFailed` (or record it) unless every comparison holds.

    ``sentence`` says what the text claims, in the text's words; ``comparisons`` are
    ``(left, op, right)`` triples or booleans; ``values`` are extra measured numbers to show.
    Returns whether it held (a :class:`Verdict`: a bool that a notebook does not echo).
    """
    if not comparisons:
        raise TypeError("a claim needs at least one comparison")
    checks = [_check(c) for c in comparisons]
    held = all(c["holds"] for c in checks)
    slacks = [c["slack"] for c in checks if c["slack"] is not None]
    shown = {k: _number(v) for k, v in (values or {}).items()}
    record_to = os.environ.get(RECORD_ENV)
    if record_to:
        row = {
            "claim": sentence,
            "notebook": _notebook(),
            "held": held,
            "margin": min(slacks) if slacks else None,
            "checks": checks,
            "values": shown,
            **_run(),
        }
        with open(record_to, "a") as f:
            f.write(json.dumps(row) + "\n")
        return Verdict(held)
    from .config import get_profile

    if not get_profile().checks_claims:  # measured on the full tiny profile: elsewhere, say, not raise
        print(f"[{'holds' if held else 'does not hold'} here; claimed for the full tiny profile] {sentence}")
        return Verdict(held)
    if not held:
        failed = "; ".join(f"{c['text']} is false" for c in checks if not c["holds"])
        extra = ", ".join(f"{k} = {v:.4g}" for k, v in shown.items())
        raise ClaimFailed(
            f"claim failed: {sentence!r}: {failed}"
            + (f" ({extra})" if extra else "")
            + ". The sweep (tools/claims_sweep.py) shows how this claim fared in other runs."
        )
    return Verdict(held)
