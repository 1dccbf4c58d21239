"""Numbers the solution's text quotes, read from the run that produced them.

A solution's reading of its results ("PPO raised gold to +0.04") must quote the run it sits under,
on whatever machine executed it last. :func:`glue` stores a value under a name in the cell's
output (myst-nb's glue, not displayed), and the text quotes it as ``{glue:text}`name:+.3f```: the
book fills it in from the committed outputs, so re-executing a notebook updates its prose. A name
quoted but never glued fails the book's build (warnings are errors).

Only solution-only cells glue (the student notebooks hold no reading of our numbers). Where myst-nb
is not installed (a GPU machine running the course without the book's tools), the value is only
checked and kept in :data:`GLUED`; nothing renders there.
"""

from __future__ import annotations

import numbers

GLUED: dict[str, float | int | str] = {}


def glue(name: str, value) -> float | int | str:
    """Store ``value`` (a number or a short string) for the text to quote as ``name``; returns it.

    NumPy and torch scalars become plain Python numbers first, so that a format such as ``:.3f``
    applies to them in the book (NumPy 2 would otherwise show ``np.float64(0.1)``); any other type
    is refused. NaN is stored as it is: a smoke run on another profile may produce one, and the
    committed `tiny` outputs, which the book shows, are tested to hold none
    (``tests/test_book_glue.py``)."""
    if hasattr(value, "item") and getattr(value, "ndim", 0) == 0:
        value = value.item()
    if isinstance(value, bool) or not isinstance(value, (numbers.Real, str)):
        raise TypeError(f"glue {name!r}: a number or a string, not {type(value).__name__}")
    if isinstance(value, numbers.Real) and not isinstance(value, numbers.Integral):
        value = float(value)
    GLUED[name] = value
    try:
        from myst_nb import glue as myst_glue
    except ImportError:
        return value
    myst_glue(name, value, display=False)
    return value
