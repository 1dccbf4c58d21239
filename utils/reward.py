"""The reward model (Chapter 3, Part 1): the SFT model with a scalar head, fitted to preference pairs.

It is ``AutoModelForSequenceClassification`` with one label, which reads the last non-padding
token - the layout ``trl.RewardTrainer`` trains - fitted with the Bradley-Terry loss
``-log sigmoid(r(x, y_w) - r(x, y_l))`` (InstructGPT, eq. 1). Chapter 3 writes the loss (its checker
compares it with ``trl.RewardTrainer``'s) and trains with :func:`train_reward_model` grouped by prompt,
as InstructGPT did; Project 2 and Chapter 7 call it on flat pairs, as ``RewardTrainer`` trains.
"""

from __future__ import annotations

import json
import tempfile

import torch
import torch.nn.functional as F

from .config import course_seed, seed_everything, training_precision
from .formats import require_columns
from .padding import by_length
from .progress import progress, quiet_transformers
from .tokenizer import memo_render


def bradley_terry_loss(reward_chosen: torch.Tensor, reward_rejected: torch.Tensor) -> torch.Tensor:
    """Mean of ``-log sigmoid(r_chosen - r_rejected)``: the negative log-likelihood of the labels."""
    return -F.logsigmoid(reward_chosen - reward_rejected).mean()


def reward_model_from(model, tokenizer):
    """A scalar-head reward model whose backbone is a copy of ``model`` (the head starts at random)."""
    from transformers import AutoModelForSequenceClassification

    # errors only: "some weights were newly initialised" is the head, by design
    with quiet_transformers(errors_only=True), tempfile.TemporaryDirectory() as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        rm = AutoModelForSequenceClassification.from_pretrained(tmp, num_labels=1, use_safetensors=True)
    rm.config.pad_token_id = tokenizer.pad_token_id
    return rm.to(next(model.parameters()).device)


def _encode(tokenizer, conversations, device):
    """The conversations' token ids, right-padded (the head reads the last non-padding token). Each
    conversation is rendered and tokenised once per tokenizer (a memo): training scores the same
    answers in several comparisons, and held-out pairs at every evaluation."""

    def ids(c):
        text = tokenizer.apply_chat_template(c, tokenize=False)
        return tuple(tokenizer(text, add_special_tokens=False)["input_ids"])

    rows = [memo_render(tokenizer, "reward-ids", c, lambda c=c: ids(c)) for c in conversations]
    width = max((len(r) for r in rows), default=0)
    input_ids = torch.full((len(rows), width), tokenizer.pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
    for k, r in enumerate(rows):
        input_ids[k, : len(r)] = torch.tensor(r, dtype=torch.long)
        attention_mask[k, : len(r)] = 1
    return {"input_ids": input_ids.to(device), "attention_mask": attention_mask.to(device)}


def reward_scores(
    rm, tokenizer, prompts, completions, batch_size: int = 64, grad: bool = False
) -> torch.Tensor:
    """The reward of each (prompt, completion) pair; prompts and completions are message lists.

    Returns ``[N]`` on the reward model's device (training needs it there, with ``grad``); call
    ``.cpu()`` before mixing it with CPU data or calling ``.numpy()``. Each batch runs in groups of
    similar length (:mod:`utils.padding`).
    """
    device = next(rm.parameters()).device
    out = []
    with torch.set_grad_enabled(grad):
        for i in range(0, len(prompts), batch_size):
            convs = [p + c for p, c in zip(prompts[i : i + batch_size], completions[i : i + batch_size])]
            out.append(by_length(_encode(tokenizer, convs, device), lambda b: rm(**b).logits[:, 0]))
    return torch.cat(out).float()  # (a half-precision head, under autocast, gives half)


def score_answers(rm, tokenizer, conversations, texts) -> torch.Tensor:
    """The reward of each text as the assistant's answer to its conversation, without gradients: ``[N]``
    on the reward model's device (a judge's score on the hub profile, a learned reward's anywhere)."""
    return reward_scores(rm, tokenizer, conversations, [[{"role": "assistant", "content": t}] for t in texts])


def _by_prompt(rows) -> list[tuple[list, list, list[tuple[int, int]]]]:
    """Group comparisons by prompt: (prompt, distinct answers, [(chosen, rejected) indices])."""
    groups: dict[str, tuple[list, list, list, dict]] = {}
    for r in rows:
        key = json.dumps(r["prompt"], sort_keys=True)
        prompt, answers, pairs, index = groups.setdefault(key, (r["prompt"], [], [], {}))
        ids = []
        for answer in (r["chosen"], r["rejected"]):
            a = json.dumps(answer, sort_keys=True)
            if a not in index:
                index[a] = len(answers)
                answers.append(answer)
            ids.append(index[a])
        pairs.append(tuple(ids))
    return [(p, a, c) for p, a, c, _ in groups.values()]


def _pair_rewards(rm, tokenizer, pairs) -> tuple[torch.Tensor, torch.Tensor]:
    """The rewards of each pair's chosen and of its rejected answer, ``[N]`` each, on the CPU (where
    the metrics beside them are computed). Call with ``rm`` in eval mode."""
    prompts = list(pairs["prompt"])
    rc = reward_scores(rm, tokenizer, prompts, list(pairs["chosen"])).cpu()
    rr = reward_scores(rm, tokenizer, prompts, list(pairs["rejected"])).cpu()
    return rc, rr


def heldout_loss(rm, tokenizer, pairs) -> dict[str, float]:
    """Bradley-Terry loss and accuracy of ``rm`` on labelled pairs, without gradients."""
    was_training = rm.training
    rm.eval()
    rc, rr = (r.float() for r in _pair_rewards(rm, tokenizer, pairs))
    rm.train(was_training)
    return {"loss": bradley_terry_loss(rc, rr).item(), "accuracy": (rc > rr).float().mean().item()}


def train_reward_model(
    rm,
    tokenizer,
    pairs,
    *,
    epochs: int = 1,
    lr: float = 1e-4,
    batch_size: int = 32,
    seed: int = 0,
    by_prompt: bool = False,
    eval_pairs=None,
    eval_every: int = 0,
    desc: str = "reward model",
    show_progress: bool = True,
) -> list[dict]:
    """Fit ``rm`` to ``prompt/chosen/rejected`` pairs with the Bradley-Terry loss.

    Flat (default): a batch is ``batch_size`` comparisons, each answer scored once per comparison
    it is in - the shuffled dataset ``trl.RewardTrainer`` trains on. ``by_prompt``: InstructGPT's
    recipe - a batch element is one prompt with all its comparisons; each distinct answer is scored
    once and every comparison of the prompt enters the same step (``batch_size`` counts prompts).

    Returns one row per step (``step``, ``loss``, ``accuracy``, ``comparisons``) and, with
    ``eval_pairs`` and ``eval_every``, rows with ``eval_loss``/``eval_accuracy`` on those pairs at
    step 0, every ``eval_every`` steps and at the end.
    """
    require_columns(pairs, ["prompt", "chosen", "rejected"], "reward-model training")
    seed_everything(seed)
    rows = pairs.select_columns(["prompt", "chosen", "rejected"]).to_list()
    units = _by_prompt(rows) if by_prompt else rows
    opt = torch.optim.AdamW(rm.parameters(), lr=lr, weight_decay=0.0)
    autocast, scaler = training_precision(next(rm.parameters()).device)
    g = torch.Generator().manual_seed(course_seed(seed))
    total = epochs * ((len(units) + batch_size - 1) // batch_size)
    history, bar = [], progress(total=total, desc=desc, disable=not show_progress)

    def evaluate(step):
        if eval_pairs is not None and eval_every:
            ev = heldout_loss(rm, tokenizer, eval_pairs)
            history.append({"step": step, "eval_loss": ev["loss"], "eval_accuracy": ev["accuracy"]})

    rm.train()
    evaluate(0)
    step = 0
    for _ in range(epochs):
        order = torch.randperm(len(units), generator=g).tolist()
        for i in range(0, len(order), batch_size):
            chunk = [units[j] for j in order[i : i + batch_size]]
            with autocast():  # Chapter 1's mixed precision (GPU; off on a CPU)
                if by_prompt:
                    prompts = [p for p, answers, _ in chunk for _ in answers]
                    rewards = reward_scores(
                        rm,
                        tokenizer,
                        prompts,
                        [a for _, answers, _ in chunk for a in answers],
                        batch_size=len(prompts),
                        grad=True,
                    )
                    chosen, rejected, offset = [], [], 0
                    for _, answers, comparisons in chunk:
                        chosen += [offset + c for c, _ in comparisons]
                        rejected += [offset + r for _, r in comparisons]
                        offset += len(answers)
                    rc, rr = rewards[chosen], rewards[rejected]
                else:
                    prompts = [r["prompt"] for r in chunk]
                    rewards = reward_scores(
                        rm,
                        tokenizer,
                        prompts + prompts,
                        [r["chosen"] for r in chunk] + [r["rejected"] for r in chunk],
                        batch_size=2 * len(chunk),
                        grad=True,
                    )
                    rc, rr = rewards[: len(chunk)], rewards[len(chunk) :]
                loss = bradley_terry_loss(rc, rr)
            opt.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.unscale_(opt)
            torch.nn.utils.clip_grad_norm_(rm.parameters(), 1.0)
            scaler.step(opt)
            scaler.update()
            step += 1
            history.append(
                {
                    "step": step,
                    "loss": loss.item(),
                    "accuracy": (rc > rr).float().mean().item(),
                    "comparisons": len(rc),
                }
            )
            if eval_every and step % eval_every == 0 and step < total:
                evaluate(step)
            bar.set_postfix(loss=f"{loss.item():.3f}")
            bar.update(1)
    evaluate(step)
    bar.close()
    rm.eval()
    return history


def pairwise_accuracy(rm, tokenizer, pairs) -> dict[str, float]:
    """How often the reward model prefers the labelled-chosen answer; with gold scores present,
    also how often it prefers the gold-better one (pairs with equal gold skipped)."""
    rm.eval()
    rc, rr = _pair_rewards(rm, tokenizer, pairs)
    out = {"vs_labels": float((rc > rr).float().mean())}
    if "gold_chosen" in pairs.column_names:
        gc, gr = torch.tensor(pairs["gold_chosen"]), torch.tensor(pairs["gold_rejected"])
        decided = gc != gr
        prefers_chosen = rc > rr
        out["vs_gold"] = float((prefers_chosen == (gc > gr))[decided].float().mean())
    return out


def accuracy_difference(rm_a, rm_b, tokenizer, pairs, n_boot: int = 2000, seed: int = 0) -> dict[str, float]:
    """Held-out accuracy against the labels of ``rm_a`` minus that of ``rm_b`` on the same ``pairs``,
    with a 95% bootstrap interval that resamples whole prompts: the pairs of one prompt share its
    answers, so they are not independent draws, and resampling pairs would make the interval too
    narrow. ``{"difference", "low", "high", "prompts"}``; ``difference`` is exactly the difference
    of the two models' :func:`pairwise_accuracy` ``vs_labels``."""
    from .evaluate import per_token_mean

    correct = []
    for rm in (rm_a, rm_b):
        rm.eval()
        rc, rr = _pair_rewards(rm, tokenizer, pairs)
        correct.append((rc > rr).double())
    by_prompt: dict[str, list[torch.Tensor]] = {}  # a prompt's pairs, in order
    for p, a, b in zip(pairs["prompt"], *correct):
        by_prompt.setdefault(json.dumps(p, sort_keys=True), []).append(a - b)
    width = max(map(len, by_prompt.values()))
    diff, mask = torch.zeros(len(by_prompt), width, dtype=torch.float64), torch.zeros(len(by_prompt), width)
    for r, values in enumerate(by_prompt.values()):
        diff[r, : len(values)], mask[r, : len(values)] = torch.stack(values), 1.0
    interval = per_token_mean(diff, mask, n_boot=n_boot, seed=seed)
    return {
        "difference": interval["mean"],
        "low": interval["low"],
        "high": interval["high"],
        "prompts": len(by_prompt),
    }
