"""PPO for RLHF (Chapter 3, Part 2; Schulman et al. 2017, as used by Ziegler et al. 2019 and InstructGPT).

TRL removed its ``PPOTrainer`` in 1.13, so this is the course's own, written to be read: a rollout,
per-token rewards with a KL penalty, GAE, the clipped policy and value losses, and a loop of
minibatch epochs. Chapter 3 writes the pieces as exercises (this module holds their references) and
the loop, :func:`train_ppo`, which is copied here from the notebook (``tools/export_loops.py``; edit
it there); Project 2 and Chapter 7 call it.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch

from .config import course_seed, seed_everything, training_precision
from .progress import progress
from .rollout import gold_scores, rollout_scores, sample_rollout, token_logprobs, token_values


def masked_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of ``x`` over the entries where ``mask`` is 1 (every token of the batch counts once)."""
    mask = mask.to(x.dtype)
    return (x * mask).sum() / mask.sum().clamp(min=1)


def masked_var(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Variance of ``x`` over the entries where ``mask`` is 1 (population variance, as :func:`whiten`'s)."""
    return masked_mean((x - masked_mean(x, mask)) ** 2, mask)


def whiten(x: torch.Tensor, mask: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """``x`` shifted and scaled to mean 0 and standard deviation 1 over the masked entries; 0 elsewhere."""
    mask = mask.to(x.dtype)
    return (x - masked_mean(x, mask)) * torch.rsqrt(masked_var(x, mask) + eps) * mask


def per_token_rewards(
    scores: torch.Tensor,
    logprobs: torch.Tensor,
    ref_logprobs: torch.Tensor,
    mask: torch.Tensor,
    kl_coef: float,
) -> torch.Tensor:
    """The reward PPO maximises, token by token (Ziegler et al. 2019, eq. 2; InstructGPT, eq. 2):

    ``r_t = -kl_coef * (log pi(y_t) - log pi_ref(y_t))`` on every response token, plus the
    sequence's ``score`` on its last token. Higher ``kl_coef`` = stay closer to the reference.

    scores: ``[B]``; logprobs, ref_logprobs, mask: ``[B, T]`` (mask is 1 on the response's tokens,
    which start at position 0 and are right-padded). Returns ``[B, T]``, 0 on padding.
    """
    mask = mask.to(logprobs.dtype)
    lengths = mask.sum(1).long()
    if (lengths == 0).any():
        raise ValueError("a response has no tokens: every response needs at least its end token")
    rewards = -kl_coef * (logprobs - ref_logprobs) * mask
    rewards[torch.arange(len(scores)), lengths - 1] += scores
    return rewards


def gae(
    rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float = 1.0, lam: float = 0.95
) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalised advantage estimation (Schulman et al. 2016, eqs. 11-16), computed backwards:

    ``delta_t = r_t + gamma * V_{t+1} - V_t`` and ``A_t = delta_t + gamma * lam * A_{t+1}``, with
    ``V = 0`` after the last response token. ``lam = 1`` gives Monte-Carlo returns (unbiased, noisy),
    ``lam = 0`` one-step TD (biased by the value model, quiet). Inputs ``[B, T]``; returns
    ``(advantages, returns = advantages + values)``, both ``[B, T]`` and 0 on padding.
    """
    mask = mask.to(values.dtype)
    rewards, values = rewards * mask, values * mask
    advantages = torch.zeros_like(rewards)
    running = torch.zeros_like(rewards[:, 0])
    for t in reversed(range(rewards.shape[1])):
        next_value = values[:, t + 1] if t + 1 < rewards.shape[1] else torch.zeros_like(running)
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        running = (delta + gamma * lam * running) * mask[:, t]
        advantages[:, t] = running
    return advantages, (advantages + values) * mask


def rlhf_advantages(
    scores: torch.Tensor,
    logprobs: torch.Tensor,
    ref_logprobs: torch.Tensor,
    values: torch.Tensor,
    mask: torch.Tensor,
    kl_coef: float,
    gamma: float = 1.0,
    lam: float = 1.0,
    whiten_advantages: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The block between a scored rollout and PPO's update: :func:`per_token_rewards`, then
    :func:`gae`, then (optionally) :func:`whiten` the advantages (the returns stay unwhitened: they
    are the value model's targets). scores ``[B]``; the rest ``[B, T]``. Returns ``(advantages, returns)``.
    """
    rewards = per_token_rewards(scores, logprobs, ref_logprobs, mask, kl_coef)
    advantages, returns = gae(rewards, values, mask, gamma, lam)
    if whiten_advantages:
        advantages = whiten(advantages, mask)
    return advantages, returns


def ppo_policy_loss(
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    clip: float = 0.2,
) -> torch.Tensor:
    """The clipped surrogate objective, negated (Schulman et al. 2017, eq. 7), averaged over tokens:

    ``max(-A * ratio, -A * clip(ratio, 1 - clip, 1 + clip))`` with ``ratio = exp(logp - old_logp)``.
    The clip removes the incentive to move a token's probability more than ``clip`` away from
    where the rollout had it. Inputs ``[B, T]``; returns a scalar.
    """
    ratio = torch.exp(logprobs - old_logprobs)
    unclipped = -advantages * ratio
    clipped = -advantages * ratio.clamp(1 - clip, 1 + clip)
    return masked_mean(torch.maximum(unclipped, clipped), mask)


def ppo_value_loss(
    values: torch.Tensor,
    old_values: torch.Tensor,
    returns: torch.Tensor,
    mask: torch.Tensor,
    clip: float = 0.2,
) -> torch.Tensor:
    """The clipped value loss (as in OpenAI's baselines and TRL's former PPO):

    ``0.5 * max((V - R)^2, (V_clipped - R)^2)`` with ``V_clipped = old_V + clip(V - old_V, -clip, clip)``,
    averaged over tokens. Inputs ``[B, T]``; returns a scalar.
    """
    clipped = old_values + (values - old_values).clamp(-clip, clip)
    return 0.5 * masked_mean(torch.maximum((values - returns) ** 2, (clipped - returns) ** 2), mask)


@dataclass
class PPOSettings:
    """The knobs of :func:`train_ppo`, plain data: what the caller passes is what runs (a notebook applies
    its profile itself, e.g. ``iterations=profile.steps(...)`` for a smoke test). The defaults are a
    starting point on the tiny model (40 iterations of 64 answers, two passes of two minibatches,
    β = 0.1, λ = 1); Chapter 3, Chapter 7 and Project 2 each pass their own values."""

    iterations: int = 40  # rollout -> update cycles
    batch_size: int = 64  # responses per rollout
    minibatch_size: int = 32
    ppo_epochs: int = 2  # passes over each rollout
    lr: float = 1e-5  # policy
    value_lr: float = 1e-4
    kl_coef: float = 0.1  # fixed KL penalty; higher = stay closer to the reference
    gamma: float = 1.0
    lam: float = 1.0  # Monte-Carlo returns: the value model is poor mid-answer (Chapter 3, detail 6)
    clip: float = 0.2
    value_clip: float = 0.2
    temperature: float = 1.0
    max_new_tokens: int = 40
    missing_eos_penalty: float = 1.0  # subtracted from the (normalised) score of an unfinished response
    whiten_advantages: bool = True
    seed: int = 0


# Chapter 3's loop, written in the notebook (the cell marked "# saved in utils/ppo.py"):
# fmt: off
# --- from solutions/03_rlhf.ipynb: generated by tools/export_loops.py, edit the notebook ---
def train_ppo(
    policy,
    reference,
    value_model,
    reward_model,
    tokenizer,
    prompts,
    s,
    reward_norm=(0.0, 1.0),
    gold=True,
    desc="PPO",
    show_progress=True,
    callback=None,
    advantages_fn=None,
):
    """PPO against `reward_model` (a reward model, or any function rollout -> scores),
    its scores normalised with `reward_norm` = (mean, std); `reference` is frozen, and
    `s` holds the settings (`PPOSettings`). Each iteration takes the next `s.batch_size`
    prompts of a seeded shuffle (cycled). `advantages_fn` (Project 2) replaces step 2
    with one function of `rlhf_advantages`' arguments; `callback(iteration, log)` runs
    after every iteration. Returns one dict per iteration; with `gold` (TinyWorld
    prompts only) the gold judge's mean score of the rollout too."""
    seed_everything(s.seed)
    for m in (policy, reference, value_model, reward_model):
        if isinstance(m, torch.nn.Module):
            m.eval()  # detail 5: no dropout anywhere
    opt_policy = torch.optim.AdamW(policy.parameters(), lr=s.lr, weight_decay=0.0)
    opt_value = torch.optim.AdamW(
        value_model.parameters(), lr=s.value_lr, weight_decay=0.0
    )
    # Chapter 1's mixed precision (GPU): the old, reference and new log-probabilities
    # all under the same autocast, so that the ratios compare like with like
    autocast, scaler = training_precision(next(policy.parameters()).device)
    g = torch.Generator().manual_seed(course_seed(s.seed))
    order = torch.randperm(len(prompts), generator=g).tolist()
    mean, std = reward_norm
    log, bar = [], progress(total=s.iterations, desc=desc, disable=not show_progress)
    for it in range(s.iterations):
        batch = [
            prompts[order[(it * s.batch_size + j) % len(order)]]
            for j in range(s.batch_size)
        ]  # cycled
        # 1. rollout: sample, then score with the reward model and log-probs under
        # policy and reference
        roll = sample_rollout(
            policy,
            tokenizer,
            batch,
            max_new_tokens=s.max_new_tokens,
            temperature=s.temperature,
            seed=s.seed * 100_003 + it,
        )
        mask = roll.response_mask
        with torch.no_grad(), autocast():
            old_logp, entropy = token_logprobs(policy, roll, s.temperature)  # detail 2
            ref_logp, _ = token_logprobs(reference, roll, s.temperature)
            old_values = token_values(value_model, roll)
            if isinstance(reward_model, torch.nn.Module):
                raw = rollout_scores(reward_model, tokenizer, roll)
            else:
                raw = torch.as_tensor(reward_model(roll), dtype=torch.float32)
                raw = raw.to(mask.device)
            score = (raw - mean) / std  # detail 3
            score = score - s.missing_eos_penalty * (~roll.finished).float()  # detail 1
            # 2. per-token rewards, advantages, returns (your functions)
            if advantages_fn is None:
                rewards = per_token_rewards(score, old_logp, ref_logp, mask, s.kl_coef)
                advantages, returns = gae(rewards, old_values, mask, s.gamma, s.lam)
                if s.whiten_advantages:
                    advantages = whiten(advantages, mask)  # detail 4
            else:
                advantages, returns = advantages_fn(
                    score,
                    old_logp,
                    ref_logp,
                    old_values,
                    mask,
                    s.kl_coef,
                    s.gamma,
                    s.lam,
                    s.whiten_advantages,
                )
        # 3. several epochs of minibatch updates on this rollout
        stats = {"policy_loss": [], "value_loss": [], "clipfrac": [], "approx_kl": []}
        for _ in range(s.ppo_epochs):
            perm = torch.randperm(len(roll), generator=g)
            for i in range(0, len(roll), s.minibatch_size):
                idx = perm[i : i + s.minibatch_size]
                sub = roll.subset(idx)  # cut to these rows' longest prompt and answer
                w, m = sub.response.shape[1], sub.response_mask
                with autocast():
                    logp, _ = token_logprobs(policy, sub, s.temperature)
                    pl = ppo_policy_loss(
                        logp, old_logp[idx, :w], advantages[idx, :w], m, s.clip
                    )
                opt_policy.zero_grad(set_to_none=True)
                scaler.scale(pl).backward()
                scaler.unscale_(opt_policy)
                torch.nn.utils.clip_grad_norm_(policy.parameters(), 1.0)
                scaler.step(opt_policy)
                with autocast():
                    vl = ppo_value_loss(
                        token_values(value_model, sub),
                        old_values[idx, :w],
                        returns[idx, :w],
                        m,
                        s.value_clip,
                    )
                opt_value.zero_grad(set_to_none=True)
                scaler.scale(vl).backward()
                scaler.unscale_(opt_value)
                torch.nn.utils.clip_grad_norm_(value_model.parameters(), 1.0)
                scaler.step(opt_value)
                scaler.update()  # once per step of both optimisers
                with torch.no_grad():
                    ratio = torch.exp(logp - old_logp[idx, :w])
                    clipped = ((ratio - 1).abs() > s.clip).float()
                    stats["policy_loss"].append(pl.item())
                    stats["value_loss"].append(vl.item())
                    stats["clipfrac"].append(masked_mean(clipped, m).item())
                    stats["approx_kl"].append(
                        masked_mean(old_logp[idx, :w] - logp, m).item()
                    )
        log.append(
            {
                "iteration": it + 1,
                "reward": float(raw.mean()),  # the reward model's score, raw
                "score": float(score.mean()),  # normalised, with detail 1's penalty
                "gold": sum(gold_scores(roll)) / len(roll) if gold else float("nan"),
                "kl": float(((old_logp - ref_logp) * mask).sum(1).mean()),  # k1
                "entropy": float(masked_mean(entropy, mask)),
                # the share of the returns' variance the value model predicted
                "explained_variance": float(
                    1
                    - masked_var(returns - old_values, mask)
                    / masked_var(returns, mask).clamp(min=1e-8)
                ),
                "finished": float(roll.finished.float().mean()),
                "length": float(mask.sum(1).float().mean()),
                **{k: sum(v) / len(v) for k, v in stats.items()},
            }
        )
        if callback is not None:
            callback(it + 1, log)
        bar.set_postfix(score=f"{log[-1]['score']:.2f}", kl=f"{log[-1]['kl']:.2f}")
        bar.update(1)
    bar.close()
    return log
# --- end of solutions/03_rlhf.ipynb ---
# fmt: on


def value_model_from(reward_model):
    """The value model starts as a copy of the reward model (TRL's former PPO and InstructGPT did the same):
    its head already tells good answers from bad ones, so early advantages are not noise."""
    vm = copy.deepcopy(reward_model)
    vm.requires_grad_(True)
    return vm
