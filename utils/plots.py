"""Small matplotlib helpers with one look across the book."""

from __future__ import annotations

import matplotlib.pyplot as plt
import numpy as np


def smooth(values, window: int = 5) -> np.ndarray:
    """Trailing moving average (the first points average what they have)."""
    v = np.asarray(values, float)
    c = np.cumsum(np.insert(v, 0, 0.0))
    out = np.empty_like(v)
    for i in range(len(v)):
        lo = max(0, i + 1 - window)
        out[i] = (c[i + 1] - c[lo]) / (i + 1 - lo)
    return out


def plot_curves(
    curves: dict,
    xlabel: str = "step",
    ylabel: str = "loss",
    title: str | None = None,
    logy: bool = False,
    hlines: dict | None = None,
    ax=None,
):
    """Plot named curves: ``{"name": (xs, ys)}``; ``hlines`` draws labelled reference levels."""
    if ax is None:
        _, ax = plt.subplots(figsize=(6.4, 3.6))
    for name, (xs, ys) in curves.items():
        ax.plot(xs, ys, label=name, lw=1.8)
    for name, y in (hlines or {}).items():
        ax.axhline(y, ls="--", lw=1, color="grey")
        ax.annotate(
            name,
            (ax.get_xlim()[0], y),
            textcoords="offset points",
            xytext=(4, 3),
            fontsize=8,
            color="dimgrey",
        )
    if logy:
        ax.set_yscale("log")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    if title:
        ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(frameon=False)
    plt.tight_layout()
    return ax


def bar_compare(values: dict, ylabel: str, title: str | None = None, errors: dict | None = None, ax=None):
    """A bar per name; ``errors`` maps name to ``(low, high)`` for interval bars."""
    if ax is None:
        _, ax = plt.subplots(figsize=(5.2, 3.4))
    names = list(values)
    ys = [values[n] for n in names]
    yerr = None
    if errors:
        yerr = np.array([[values[n] - errors[n][0], errors[n][1] - values[n]] for n in names]).T
    ax.bar(
        names, ys, yerr=yerr, capsize=4, color=plt.rcParams["axes.prop_cycle"].by_key()["color"][: len(names)]
    )
    ax.set_ylabel(ylabel)
    if title:
        ax.set_title(title)
    ax.grid(axis="y", alpha=0.3)
    plt.tight_layout()
    return ax
