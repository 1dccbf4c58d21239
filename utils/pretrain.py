"""Chapter 1's reference code: the next-token loss, the pretraining loop, perplexity.

Chapter 1 writes the same loss and loop from scratch (``pretrain`` in the notebook);
:func:`train_lm` is that loop (``tests/test_twins.py`` keeps the two identical), and
``utils.artifacts`` calls it to rebuild the base model when Chapter 1 has not been run.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from .config import seed_everything
from .data import lm_batches
from .progress import progress


def next_token_loss(logits: torch.Tensor, input_ids: torch.Tensor, ignore_index: int = -100) -> torch.Tensor:
    """Mean cross-entropy of predicting token ``t+1`` from positions ``<= t``.

    logits: ``[batch, seq, vocab]``; input_ids: ``[batch, seq]`` (positions equal to
    ``ignore_index`` are not predicted). Returns a scalar.
    """
    shift_logits = logits[:, :-1, :].reshape(-1, logits.size(-1)).float()
    targets = input_ids[:, 1:].reshape(-1)
    return F.cross_entropy(shift_logits, targets, ignore_index=ignore_index)


def warmup_cosine(warmup: int, total: int):
    """Learning-rate multiplier for step ``s`` (0-based): linear warmup to 1, then cosine to 0.

    The same schedule the chapters write by hand, so the reference loops rebuild their models exactly.
    """

    def factor(s: int) -> float:
        if s < warmup:
            return (s + 1) / warmup
        return 0.5 * (1 + math.cos(math.pi * (s - warmup) / max(1, total - warmup)))

    return factor


def lr_at(step: int, lr: float, warmup: int, total: int) -> float:
    """The learning rate at ``step`` (0-based): linear warmup to ``lr``, then cosine decay to 0
    (Chapter 1's schedule, written the same way so the two loops compute the same numbers)."""
    if step < warmup:
        return lr * (step + 1) / warmup
    return lr * 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))


def train_lm(
    model,
    blocks: torch.Tensor,
    *,
    steps: int,
    batch_size: int,
    lr: float,
    warmup: int = 20,
    seed: int = 0,
    loss_fn=next_token_loss,
    log_every: int = 10,
    show_progress: bool = True,
    desc: str = "pretraining",
) -> list[dict]:
    """Chapter 1's loop: AdamW, the warmup + cosine schedule set by hand, gradient clipping, on
    random batches of ``blocks``.

    Returns the history: one ``{"step", "loss", "lr"}`` per ``log_every`` steps (loss averaged).
    """
    seed_everything(seed)
    model.train()
    device = next(model.parameters()).device
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.95), weight_decay=0.1)
    history, running = [], []
    bar = progress(total=steps, desc=desc, disable=not show_progress)
    for step, batch in enumerate(lm_batches(blocks, batch_size, steps, seed=seed)):
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step, lr, warmup, steps)
        batch = batch.to(device)
        loss = loss_fn(model(input_ids=batch).logits, batch)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        running.append(loss.item())
        if (step + 1) % log_every == 0 or step + 1 == steps:
            history.append(
                {"step": step + 1, "loss": sum(running) / len(running), "lr": optimizer.param_groups[0]["lr"]}
            )
            bar.set_postfix(loss=f"{history[-1]['loss']:.3f}")
            running = []
        bar.update(1)
    bar.close()
    model.eval()
    return history


@torch.no_grad()
def perplexity(model, blocks: torch.Tensor, batch_size: int = 64, loss_fn=next_token_loss) -> float:
    """``exp`` of the mean next-token loss over ``blocks`` (each block weighted equally)."""
    model.eval()
    device = next(model.parameters()).device
    losses = []
    for i in range(0, len(blocks), batch_size):
        b = blocks[i : i + batch_size].to(device)
        losses.append(loss_fn(model(input_ids=b).logits, b).item() * len(b))
    return math.exp(sum(losses) / len(blocks))
