"""Project 2 checkpoints: run the learner's training (a reward model, an aligned policy) and say whether
it is on track; and the win-rate matrix of the final comparison."""

from __future__ import annotations

import torch

from .core import CheckError, call_learner, passed


def _same_weights(a, b) -> bool:
    pa, pb = list(a.parameters()), list(b.parameters())
    return len(pa) == len(pb) and all(x.shape == y.shape and torch.equal(x, y) for x, y in zip(pa, pb))


def check_reward_model_run(fn, sft_model, tokenizer, train_pairs, held_pairs, min_accuracy: float = 0.6):
    """Run ``fn(sft_model, tokenizer, train_pairs) -> reward model`` and check it on held-out pairs.

    Returns the trained reward model, so the next steps can use it.
    """
    from ..reward import pairwise_accuracy

    name = getattr(fn, "__name__", "train_reward")
    rm = call_learner(fn, name, sft_model, tokenizer, train_pairs)
    if not isinstance(rm, torch.nn.Module) or getattr(getattr(rm, "config", None), "num_labels", None) != 1:
        raise CheckError(
            f"`{name}` should return a reward model with a one-number head (as `reward_model_from` "
            f"builds), got {type(rm).__name__}"
        )
    acc = pairwise_accuracy(rm, tokenizer, held_pairs)
    ceiling = (
        float(torch.tensor(list(held_pairs["label_correct"])).float().mean())
        if "label_correct" in held_pairs.column_names
        else None
    )
    where = f" (chance 0.5{f', noise ceiling {ceiling:.2f}' if ceiling is not None else ''})"
    if acc["vs_labels"] < 1 - min_accuracy:
        raise CheckError(
            f"`{name}`'s reward model agrees with {acc['vs_labels']:.2f} of held-out labels{where}: "
            "it prefers the *rejected* answers - are chosen and rejected swapped in the loss?"
        )
    if acc["vs_labels"] < min_accuracy:
        raise CheckError(
            f"`{name}`'s reward model agrees with only {acc['vs_labels']:.2f} of held-out labels{where}: "
            f"not yet on track (aim above {min_accuracy}). Did it train? Try more epochs or a larger "
            "learning rate, and check it starts from the SFT model"
        )
    extra = f", {acc['vs_gold']:.2f} with the gold ranking" if "vs_gold" in acc else ""
    passed(f"`{name}`: held-out accuracy {acc['vs_labels']:.2f} against the labels{where}{extra} - on track")
    return rm


def check_policy_run(
    fn, *args, start, tokenizer, conversations, max_kl: float | None = 3.0, seed: int = 3, judge=None
):
    """Run ``fn(*args) -> policy`` and compare the policy with ``start`` (the model it was trained
    from) on ``conversations``: sampled answers, gold win rate with a 95% interval, and the KL
    from ``start``. On track = not worse than ``start`` (the interval's top is above one half)
    and, if ``max_kl`` is given, within ``max_kl`` nats of it. ``judge`` goes to
    :func:`utils.evaluate.evaluate` (``None``: the gold judge). Returns the policy.
    """
    from ..evaluate import evaluate, sequence_kl, win_rate

    name = getattr(fn, "__name__", "align")
    policy = call_learner(fn, name, *args)
    if not (isinstance(policy, torch.nn.Module) and hasattr(policy, "generate")):
        raise CheckError(f"`{name}` should return the trained language model, got {type(policy).__name__}")
    if policy is start or _same_weights(policy, start):
        raise CheckError(
            f"`{name}` returned its starting model unchanged: did the training run, on a copy of the model?"
        )
    conversations = list(conversations)
    mine = evaluate(policy, tokenizer, conversations, do_sample=True, seed=seed, judge=judge)
    theirs = evaluate(start, tokenizer, conversations, do_sample=True, seed=seed, judge=judge)
    w = win_rate(mine["gold"], theirs["gold"])
    kl = sequence_kl(policy, start, tokenizer, conversations, list(mine["response"]))
    summary = (
        f"{'judged' if judge is not None else 'gold'} win rate {w['win_rate']:.2f} "
        f"[{w['low']:.2f}, {w['high']:.2f}] against its starting model on "
        f"{len(conversations)} held-out conversations, KL {kl:.2f} nats"
    )
    if w["high"] < 0.5:
        raise CheckError(
            f"`{name}`: {summary} - worse than where it started. Usual causes: a learning rate so "
            "high the policy collapsed, too little KL penalty (reward hacking), or chosen and "
            "rejected swapped"
        )
    if max_kl is not None and kl > max_kl:
        raise CheckError(
            f"`{name}`: {summary} - it drifted more than {max_kl} nats from its starting model, where "
            "learned rewards stop being trustworthy: lower the learning rate or raise the KL penalty"
        )
    passed(f"`{name}`: {summary} - on track")
    return policy


def check_win_rate_matrix(fn) -> None:
    """``fn({name: gold scores}) -> DataFrame`` whose entry ``[a, b]`` is how often ``a``'s answer scores
    higher than ``b``'s on the same prompt, ties counting one half (so ``[a, b] + [b, a] = 1``)."""
    import numpy as np
    import pandas as pd

    name = getattr(fn, "__name__", "win_rate_matrix")
    scores = {
        "A": np.array([1.0, 0.0, 0.5, 1.0, -1.0]),
        "B": np.array([0.0, 0.0, 1.0, 1.0, -1.0]),
        "C": np.array([-1.0, 1.0, 0.5, 0.0, 1.0]),
    }
    got = call_learner(fn, name, {k: v.copy() for k, v in scores.items()})
    if not isinstance(got, pd.DataFrame):
        raise CheckError(f"`{name}` should return a pandas DataFrame, got {type(got).__name__}")
    if list(got.index) != list(scores) or list(got.columns) != list(scores):
        raise CheckError(
            f"`{name}`'s rows and columns should both be the models, in order {list(scores)}; "
            f"got rows {list(got.index)} and columns {list(got.columns)}"
        )
    want = pd.DataFrame(
        {
            b: {a: float(np.mean((scores[a] > scores[b]) + 0.5 * (scores[a] == scores[b]))) for a in scores}
            for b in scores
        }
    ).loc[list(scores), list(scores)]
    if np.allclose(got.to_numpy(dtype=float), want.to_numpy(), atol=1e-6):
        passed(f"`{name}`: pairwise win rates with ties as one half, rows beating columns")
        return
    hint = "entry [a, b] = mean over prompts of 1 if a > b, 1/2 if a == b, 0 if a < b"
    if np.allclose(got.to_numpy(dtype=float), want.to_numpy().T, atol=1e-6):
        hint = "the matrix is transposed: rows should be the winners, columns the opponents"
    elif np.allclose(
        got.to_numpy(dtype=float),
        pd.DataFrame(
            {b: {a: float(np.mean(scores[a] > scores[b])) for a in scores} for b in scores}
        ).to_numpy(),
        atol=1e-6,
    ):
        hint = "ties should count one half (otherwise [a, b] + [b, a] < 1 when answers tie)"
    raise CheckError(f"`{name}` is wrong: {hint}\n got\n{got}\n want\n{want}")
