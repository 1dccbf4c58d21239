"""Direct Preference Optimization, reference version (Rafailov et al., 2023).

Chapter 4 derives and writes these pieces from scratch, checks them against ``trl.DPOTrainer``,
and trains with its loop ``train_dpo_from_scratch``. :func:`train_dpo` is that loop
(``tests/test_twins.py`` keeps the two identical); Chapter 5 and Project 2 call it.
"""

from __future__ import annotations

import pandas as pd
import torch
import torch.nn.functional as F

from .config import course_seed, seed_everything
from .formats import require_columns
from .logprobs import sequence_logprobs
from .padding import by_length
from .progress import progress
from .sft import collate, completion_example


def dpo_loss(
    policy_chosen: torch.Tensor,
    policy_rejected: torch.Tensor,
    ref_chosen: torch.Tensor,
    ref_rejected: torch.Tensor,
    beta: float = 0.1,
) -> torch.Tensor:
    """The DPO loss (eq. 7 of the paper), averaged over the batch:
    ``-log sigmoid(beta * ((log pi_c - log ref_c) - (log pi_r - log ref_r)))``.

    Inputs are sequence log-probabilities ``[batch]``. Higher ``beta`` = stay closer to the
    reference. (The implicit rewards are ``beta * (log pi - log pi_ref)`` of each answer.)
    """
    chosen_logratio = policy_chosen - ref_chosen
    rejected_logratio = policy_rejected - ref_rejected
    return -F.logsigmoid(beta * (chosen_logratio - rejected_logratio)).mean()


def conservative_dpo_loss(
    policy_chosen: torch.Tensor,
    policy_rejected: torch.Tensor,
    ref_chosen: torch.Tensor,
    ref_rejected: torch.Tensor,
    beta: float = 0.1,
    epsilon: float = 0.1,
) -> torch.Tensor:
    """Conservative DPO (cDPO; Mitchell 2023): the DPO loss against labels smoothed by the chance
    ``epsilon`` that a label is flipped, ``-(1 - eps) log sigmoid(beta h) - eps log sigmoid(-beta h)``
    with ``h`` the log-ratio difference. Its optimum keeps the implicit reward margin finite."""
    h = (policy_chosen - ref_chosen) - (policy_rejected - ref_rejected)
    return (-(1 - epsilon) * F.logsigmoid(beta * h) - epsilon * F.logsigmoid(-beta * h)).mean()


def ipo_loss(
    policy_chosen: torch.Tensor,
    policy_rejected: torch.Tensor,
    ref_chosen: torch.Tensor,
    ref_rejected: torch.Tensor,
    beta: float = 0.1,
) -> torch.Tensor:
    """IPO (Azar et al. 2024, eq. 17): ``(h - 1 / (2 beta))^2``, a squared loss that pulls the
    log-ratio difference ``h`` to a finite target instead of pushing it to infinity (here on the
    answers' summed log-probabilities; TRL's ``loss_type="ipo"`` divides each by its length first)."""
    h = (policy_chosen - ref_chosen) - (policy_rejected - ref_rejected)
    return ((h - 1 / (2 * beta)) ** 2).mean()


def pair_batch(tokenizer, rows, device=None) -> dict[str, torch.Tensor]:
    """One batch of preference pairs: ``[chosen; rejected]`` as prompt-masked, right-padded
    sequences (Chapter 2's ``completion_example`` and ``collate``), on ``device``."""
    chosen = [completion_example(tokenizer, r["prompt"], r["chosen"]) for r in rows]
    rejected = [completion_example(tokenizer, r["prompt"], r["rejected"]) for r in rows]
    batch = collate(chosen + rejected, tokenizer.pad_token_id)
    return {k: v.to(device) for k, v in batch.items()} if device is not None else batch


def logps_of(model, batch) -> torch.Tensor:
    """``log pi(answer | prompt)`` of every row of a :func:`pair_batch` (or any labelled batch), the rows
    run in groups of similar length (:func:`utils.padding.by_length`)."""
    return by_length(
        batch,
        lambda b: sequence_logprobs(
            model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits, b["labels"]
        ),
    )


def train_dpo(
    policy,
    reference,
    tokenizer,
    pairs,
    beta: float = 0.1,
    lr: float = 1e-4,
    epochs: int = 1,
    batch_size: int = 32,
    seed: int = 0,
    desc: str = "DPO",
    show_progress: bool = True,
    callback=None,
    loss_fn=None,
) -> pd.DataFrame:
    """Chapter 4's loop: DPO on conversational ``prompt/chosen/rejected`` pairs against a frozen
    ``reference`` (AdamW, the learning rate decayed linearly to 0 as TRL's default, clipping).
    ``loss_fn`` replaces :func:`dpo_loss` (same arguments): Chapter 4's noise-robust variants.

    Returns one row per step: loss, implicit-reward accuracy and margin, and the policy's mean
    log-probabilities of the chosen and rejected answers. ``callback(step, policy)`` runs after every
    step (and once before the first, with step 0), for measurements; it must not train the policy.
    """
    require_columns(pairs, ["prompt", "chosen", "rejected"], "DPO")
    seed_everything(seed)
    reference.eval()  # frozen: only ever run under torch.no_grad() below
    device = next(policy.parameters()).device
    opt = torch.optim.AdamW(policy.parameters(), lr=lr, weight_decay=0.0)
    rows = pairs.select_columns(["prompt", "chosen", "rejected"]).to_list()
    n_steps = epochs * ((len(rows) + batch_size - 1) // batch_size)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: 1 - s / n_steps
    )  # linear decay, as TRL's default
    g = torch.Generator().manual_seed(course_seed(seed))
    log, bar = [], progress(total=n_steps, desc=desc, disable=not show_progress)
    if callback is not None:
        _observe(callback, 0, policy)
    policy.train()
    for _ in range(epochs):
        order = torch.randperm(len(rows), generator=g).tolist()
        for i in range(0, len(order), batch_size):
            chunk = [rows[j] for j in order[i : i + batch_size]]
            batch, n = pair_batch(tokenizer, chunk, device), len(chunk)
            with torch.no_grad():
                ref = logps_of(reference, batch)
            pol = logps_of(policy, batch)
            loss = (loss_fn or dpo_loss)(pol[:n], pol[n:], ref[:n], ref[n:], beta)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(policy.parameters(), 1.0)
            opt.step()
            sched.step()
            reward_c, reward_r = beta * (pol[:n] - ref[:n]).detach(), beta * (pol[n:] - ref[n:]).detach()
            log.append(
                {
                    "loss": loss.item(),
                    "accuracy": (reward_c > reward_r).float().mean().item(),
                    "margin": (reward_c - reward_r).mean().item(),
                    "logp_chosen": pol[:n].mean().item(),
                    "logp_rejected": pol[n:].mean().item(),
                }
            )
            if callback is not None:
                _observe(callback, len(log), policy)
            bar.set_postfix(loss=f"{loss.item():.3f}")
            bar.update(1)
    bar.close()
    policy.eval()
    return pd.DataFrame(log)


def _observe(callback, step: int, policy) -> None:
    """Run a measurement callback in eval mode, without gradients, and restore the training mode."""
    was_training = policy.training
    policy.eval()
    with torch.no_grad():
        callback(step, policy)
    policy.train(was_training)
