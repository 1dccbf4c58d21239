"""Less padding: a batch's rows computed in groups of similar length.

A batch of chat answers is mostly padding: TinyWorld's prompts and answers are a few tokens to a few
dozen, and one long row sets the width of all the others (about 60% of the positions in a PPO
minibatch or a DPO batch of the tiny profile are padding). Every padded position costs a forward
and a backward pass like a real one. So the course's loops run a batch as a few groups of rows of
similar length, each cut to its own longest row, and put the per-row results back in the batch's
order: the same rows, the same loss, the same gradient (up to float rounding), in about half the
arithmetic. This is what ``group_by_length`` and padding-free batches do in ``transformers`` and TRL.
"""

from __future__ import annotations

from typing import Callable

import numpy as np
import torch

# A group costs its rows times its longest row, plus about this many positions of fixed overhead per
# forward pass (launching the layers' operations): more groups cut padding but add overhead.
GROUP_OVERHEAD = 256
MAX_GROUPS = 4


def length_groups(lengths, max_groups: int | None = None, overhead: int | None = None) -> list[torch.Tensor]:
    """Row indices in groups of similar length: the rows sorted by length (stably) and cut into at most
    ``max_groups`` runs, where the cuts make ``rows x longest row`` summed over the runs, plus
    ``overhead`` per run, smallest (an exact dynamic programme over the cut points). ``lengths``
    ``[B]``; returns CPU index tensors, shortest rows first, that together hold each row once.
    The defaults are :data:`MAX_GROUPS` and :data:`GROUP_OVERHEAD`."""
    max_groups = MAX_GROUPS if max_groups is None else max_groups
    overhead = GROUP_OVERHEAD if overhead is None else overhead
    lengths = torch.as_tensor(lengths).detach().cpu()
    order = torch.argsort(lengths, stable=True)
    sl = lengths[order].tolist()
    n = len(sl)
    if n == 0:
        return []
    # best[g][j]: the cheapest cut of the first j sorted rows into g runs (run i..j-1 costs (j-i) * sl[j-1]),
    # one row of the table at a time over every (i, j) at once; argmin takes the first (smallest) i
    # among equal costs. The costs are integers, exact in float64.
    sl = np.asarray(sl, dtype=np.float64)
    i = np.arange(n + 1)[:, None]
    j = np.arange(n + 1)[None, :]
    run = np.where(i < j, (j - i) * sl[np.maximum(j - 1, 0)] + overhead, np.inf)  # run[i, j]
    best = np.full((max_groups + 1, n + 1), np.inf)
    cut = np.zeros((max_groups + 1, n + 1), dtype=np.int64)
    best[0, 0] = 0.0
    for g in range(1, max_groups + 1):
        # total[i, j]: g - 1 runs up to i, then one run i..j-1 (inf where g - 1 runs cannot fit in i rows)
        total = best[g - 1][:, None] + run
        cut[g] = total.argmin(0)
        best[g] = total[cut[g], np.arange(n + 1)]
    g = min(range(1, max_groups + 1), key=lambda k: best[k][n])
    bounds, j = [n], n
    for k in range(g, 0, -1):
        j = int(cut[k][j])
        bounds.append(j)
    bounds.reverse()
    return [order[a:b] for a, b in zip(bounds, bounds[1:])]


def in_order(parts: list[torch.Tensor], groups: list[torch.Tensor]) -> torch.Tensor:
    """Per-row results of the ``groups`` (``parts[i]`` ``[len(groups[i]), ...]``, equal trailing shapes)
    back in the batch's row order. Differentiable."""
    index = torch.cat(groups).to(parts[0].device)
    out = torch.cat(parts)
    inverse = torch.empty_like(index)
    inverse[index] = torch.arange(len(index), device=index.device)
    return out[inverse]


def pad_right(x: torch.Tensor, width: int, value=0) -> torch.Tensor:
    """``x`` ``[rows, w, ...]`` padded with ``value`` to ``[rows, width, ...]`` along dim 1."""
    if x.shape[1] == width:
        return x
    pad = x.new_full((x.shape[0], width - x.shape[1], *x.shape[2:]), value)
    return torch.cat([x, pad], 1)


def by_length(batch: dict[str, torch.Tensor], fn: Callable[[dict], torch.Tensor]) -> torch.Tensor:
    """``fn(batch)`` for a right-padded batch (``attention_mask`` 1 on real tokens, every other ``[B, T]``
    tensor cut the same way), computed in :func:`length_groups`: ``fn`` takes a sub-batch and returns
    one value per row (``[rows]`` or ``[rows, ...]``); the values come back in the batch's order."""
    lengths = batch["attention_mask"].sum(1)
    groups = length_groups(lengths)
    if len(groups) == 1:
        return fn(batch)
    device = batch["attention_mask"].device
    parts = []
    for rows in groups:
        width = int(lengths[rows].max())
        rows_d = rows.to(device)
        parts.append(fn({k: v[rows_d, :width] for k, v in batch.items()}))
    return in_order(parts, groups)


def token_mean(batch: dict[str, torch.Tensor], fn: Callable[[dict], torch.Tensor], ignore_index: int = -100):
    """A loss that is a mean over a batch's labelled tokens (``fn(sub_batch)``: the mean over that
    sub-batch's labelled tokens, the label at ``t + 1`` predicted at ``t``, as ``F.cross_entropy`` with
    ``ignore_index`` gives it), computed in :func:`length_groups` of a right-padded batch and recombined
    as the mean over all the batch's labelled tokens: ``fn(batch)``, to float rounding."""
    counts = (batch["labels"][:, 1:] != ignore_index).sum(1)
    lengths = batch["attention_mask"].sum(1)
    groups = length_groups(lengths)
    if len(groups) == 1:
        return fn(batch)
    device = lengths.device
    total, out = counts.sum(), 0.0
    for rows in groups:
        rows_d = rows.to(device)
        n = counts[rows_d].sum()
        if int(n) == 0:  # no labelled token in these rows: nothing to add (their mean is undefined)
            continue
        width = int(lengths[rows_d].max())
        out = out + fn({k: v[rows_d, :width] for k, v in batch.items()}) * (n / total)
    return out
