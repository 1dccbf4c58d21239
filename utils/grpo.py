"""GRPO and a verifiable reward (Chapter 7; Shao et al. 2024, DeepSeek-R1 2025).

Group Relative Policy Optimization drops PPO's value model: it samples ``G`` answers to each
prompt and uses the group's mean reward as the baseline (and, by default, the group's standard
deviation as a normaliser); the KL to the reference sits in the loss (the k3 estimator), not in
the reward. Chapter 7 writes the pieces as exercises (this module holds their references) and the
loop, :func:`train_grpo`, which is copied here from the notebook (``tools/export_loops.py``; edit it
there).

The verifier (:func:`verify`) is a rule, not a model: it checks what TinyWorld can check exactly
(the fact, the sum, the opposite, a refusal where one is due) and nothing else.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch

from .config import course_seed, seed_everything, training_precision
from .ppo import masked_mean
from .progress import progress
from .rollout import gold_scores, rollout_scores, sample_rollout, token_logprobs


# --- the three pieces ------------------------------------------------------------------------
def group_advantages(
    rewards: torch.Tensor, group_size: int, scale: bool = True, eps: float = 1e-4
) -> torch.Tensor:
    """GRPO's advantage of each answer: its reward minus its group's mean (the **baseline**), divided,
    with ``scale``, by the group's standard deviation plus ``eps`` (the **normaliser**; Dr. GRPO drops it).

    ``rewards`` ``[B]`` hold ``B / group_size`` consecutive groups of ``group_size`` answers to one
    prompt. The standard deviation is the sample one (Bessel-corrected), as TRL's. Returns ``[B]``.
    """
    if rewards.dim() != 1 or len(rewards) % group_size:
        raise ValueError(f"need [B] rewards in groups of {group_size}; got shape {tuple(rewards.shape)}")
    r = rewards.view(-1, group_size)
    advantages = r - r.mean(1, keepdim=True)
    if scale:
        advantages = advantages / (r.std(1, keepdim=True) + eps)
    return advantages.flatten()


def kl_estimates(logp: torch.Tensor, ref_logp: torch.Tensor) -> dict[str, torch.Tensor]:
    """Schulman's three per-token estimators of KL(pi || pi_ref) from tokens sampled from pi, with
    ``log_r = log pi_ref - log pi``: ``k1 = -log_r`` (unbiased, can be negative), ``k2 = log_r^2 / 2``
    (biased, low variance), ``k3 = exp(log_r) - 1 - log_r`` (unbiased and never negative: computed as
    ``expm1(log_r) - log_r``, which stays >= 0 in floating point where ``exp(log_r) - 1 - log_r`` can round
    to a small negative number)."""
    log_r = ref_logp - logp
    return {"k1": -log_r, "k2": 0.5 * log_r**2, "k3": torch.expm1(log_r) - log_r}


def kl_k3(logprobs: torch.Tensor, ref_logprobs: torch.Tensor) -> torch.Tensor:
    """Chapter 7's exercise: the per-token k3 estimate of KL(pi || pi_ref) (:func:`kl_estimates`)."""
    return kl_estimates(logprobs, ref_logprobs)["k3"]


def k3_token_gradients(
    theta: torch.Tensor, ref_logprobs: torch.Tensor, with_ratio: bool
) -> list[torch.Tensor]:
    """For each token ``y`` of a small softmax ``pi = softmax(theta)``, the gradient with respect to
    ``theta`` of k3 at ``y`` (the token held fixed, as a sampled one is), or with ``with_ratio`` of
    ``rho(y) * k3(y)``, ``rho = pi(y) / pi_old(y)`` with ``pi_old = pi`` detached. Unweighted."""
    grads = []
    for y in range(theta.shape[-1]):
        th = theta.detach().clone().requires_grad_(True)
        logp = torch.log_softmax(th, -1)[y]
        loss = kl_k3(logp, ref_logprobs[y])
        if with_ratio:
            loss = torch.exp(logp - logp.detach()) * loss  # rho = 1 in value, not in gradient
        grads.append(torch.autograd.grad(loss, th)[0])
    return grads


def expected_k3_gradients(
    theta: torch.Tensor, ref_logprobs: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Chapter 7's check of k3's gradient on a small softmax ``pi = softmax(theta)`` over ``V`` tokens:
    the exact expectation over ``y ~ pi`` of :func:`k3_token_gradients`, without and with the ratio.
    Returns ``(g_k3, g_ratio_k3)``, each ``[V]``."""
    weights = torch.softmax(theta.detach(), -1)  # the sampling distribution: not differentiated
    g_k3, g_ratio_k3 = (
        sum(w * g for w, g in zip(weights, k3_token_gradients(theta, ref_logprobs, with_ratio)))
        for with_ratio in (False, True)
    )
    return g_k3, g_ratio_k3


def grpo_loss(
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    ref_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    clip: float = 0.2,
    beta: float = 0.04,
) -> torch.Tensor:
    """GRPO's loss, averaged over every answer token of the batch (TRL's default ``loss_type="dapo"``):

    ``-min(ratio * A, clip(ratio, 1 - clip, 1 + clip) * A) + beta * k3`` per token, with
    ``ratio = exp(logp - old_logp)``, ``A`` the answer's advantage (``[B]``, the same on each of its
    tokens) and ``k3`` the KL estimate to the reference (:func:`kl_estimates`). Log-probs and mask ``[B, T]``.
    This is the GRPO paper's KL term: TRL 1.16 by default also multiplies k3 by the ratio
    (``use_bias_correction_kl=True``), which makes its gradient the reverse KL's (Chapter 7).
    """
    ratio = torch.exp(logprobs - old_logprobs)
    a = advantages.unsqueeze(1)
    surrogate = torch.minimum(ratio * a, ratio.clamp(1 - clip, 1 + clip) * a)
    per_token = -surrogate
    if beta != 0.0:
        per_token = per_token + beta * kl_estimates(logprobs, ref_logprobs)["k3"]
    return masked_mean(per_token, mask)


def per_answer_loss(
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    ref_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    clip: float = 0.2,
    beta: float = 0.04,
) -> torch.Tensor:
    """The GRPO paper's aggregation of :func:`grpo_loss`'s per-token terms: each answer's tokens
    averaged, then the answers (TRL's ``loss_type="grpo"``). A token of a long answer weighs less
    than one of a short answer: Dr. GRPO's length bias."""
    rows = [
        grpo_loss(logprobs[[i]], old_logprobs[[i]], ref_logprobs[[i]], advantages[[i]], mask[[i]], clip, beta)
        for i in range(len(advantages))
    ]
    return torch.stack(rows).mean()


def constant_norm_loss(
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    ref_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    clip: float = 0.2,
    beta: float = 0.04,
    max_new_tokens: int = 40,  # GRPOSettings.max_new_tokens (a test keeps them equal)
) -> torch.Tensor:
    """Dr. GRPO's aggregation: every answer token's term summed, divided by a constant that does not
    depend on the answers' lengths, the number of answers times ``max_new_tokens`` (TRL's
    ``loss_type="dr_grpo"``, whose constant is ``max_completion_length``)."""
    total = grpo_loss(logprobs, old_logprobs, ref_logprobs, advantages, mask, clip, beta) * mask.sum()
    return total / (len(advantages) * max_new_tokens)


# --- the verifier ----------------------------------------------------------------------------
def verify(conversation: list[dict], response: str, finished: bool = True) -> float:
    """1.0 if the answer is verifiably right, else 0.0: it ended its turn and, for a harmful request,
    refuses; for any other, does not refuse and gives the exact fact, sum or opposite, and no competing
    one (the gold rubric's ``correct`` line). Politeness, length and style are not checked: a verifier
    checks only what it can check exactly."""
    from .judge import score_breakdown

    if not finished or not response.strip():
        return 0.0
    parts = score_breakdown(conversation, response, finished)
    return float("correct" in parts or "refusal" in parts)


def verifier_hack() -> tuple[list[dict], str]:
    """Chapter 7's "hack the verifier": a conversation of the evaluation set and an answer that
    :func:`verify` scores 1.0 and a reader would not accept - the right fact, said rudely."""
    from .data import eval_conversations
    from .judge import parse_request
    from .world import make_world

    world = make_world()
    for conversation in eval_conversations(200, seed=0)["prompt"]:
        req = parse_request(conversation, world)
        if req is not None and req.kind == "fact":
            return conversation, f"Ugh, obviously. {world.good_answer(req)}"
    raise RuntimeError("no fact question among the evaluation conversations")


def verifier_scores(rollout) -> list[float]:
    """:func:`verify` on each answer of a rollout."""
    return [verify(c, t, bool(f)) for c, t, f in zip(rollout.conversations, rollout.texts, rollout.finished)]


_NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?")


def last_number(text: str) -> str | None:
    """The last number in ``text``, commas dropped and a trailing ``.0`` removed (``"1,200.0"`` ->
    ``"1200"``); ``None`` if there is none."""
    found = _NUMBER.findall(text)
    if not found:
        return None
    number = found[-1].replace(",", "")
    return number[:-2] if number.endswith(".0") else number


def verify_number(response: str, answer: str, finished: bool = True) -> float:
    """An exact-match verifier for math word problems (GSM8K): 1.0 if the answer ended its turn and its
    last number is ``answer``, else 0.0."""
    return float(finished and last_number(response) == answer.replace(",", "").strip())


# --- the loop --------------------------------------------------------------------------------
@dataclass
class GRPOSettings:
    """The knobs of :func:`train_grpo`, plain data: what the caller passes is what runs (a notebook applies
    its profile itself). The defaults are a starting point on the tiny model; Chapter 7 passes its own."""

    iterations: int = 20  # rollout -> update cycles
    prompts_per_iteration: int = 16
    group_size: int = 4  # G answers per prompt: 64 answers per rollout, as PPO's batch
    ppo_epochs: int = 1  # passes over each rollout (mu); 1 = on-policy, the ratio is 1 at the start
    minibatch_size: int = 64  # answers per gradient step
    lr: float = 1e-5
    beta: float = 0.04  # KL coefficient in the loss; TRL's GRPOConfig defaults to 0.0 (no reference)
    clip: float = 0.2
    scale_rewards: bool = True  # divide by the group's std (False: Dr. GRPO)
    temperature: float = 1.0
    max_new_tokens: int = 40
    missing_eos_penalty: float = 1.0  # subtracted from the (normalised) score of an unfinished answer
    seed: int = 0


# Chapter 7's loop, written in the notebook (the cell marked "# saved in utils/grpo.py"):
# fmt: off
# --- from solutions/07_beyond.ipynb: generated by tools/export_loops.py, edit the notebook ---
def train_grpo(
    policy,
    reference,
    reward,
    tokenizer,
    conversations,
    settings,
    reward_norm=(0.0, 1.0),
    gold=True,
    desc="GRPO",
    show_progress=True,
    callback=None,
    loss_fn=None,
):
    """GRPO with your pieces: `reward` is a reward model (its scores normalised with
    `reward_norm`, minus the penalty for an unfinished answer) or any function
    rollout -> scores, used as it is (the verifier). Each iteration takes the next
    `prompts_per_iteration` prompts of a seeded shuffle (cycled) and samples
    `group_size` answers to each. `loss_fn` (Section 7's ablation) replaces `grpo_loss`
    with a function of the same arguments. Returns one dict per iteration."""
    s = settings
    seed_everything(s.seed)
    for m in (policy, reference, reward):
        if isinstance(m, torch.nn.Module):
            m.eval()
    opt = torch.optim.AdamW(policy.parameters(), lr=s.lr, weight_decay=0.0)
    # Chapter 1's mixed precision (GPU), old, reference and new log-probs alike
    autocast, scaler = training_precision(next(policy.parameters()).device)
    g = torch.Generator().manual_seed(course_seed(s.seed))
    order = torch.randperm(len(conversations), generator=g).tolist()
    history, bar = (
        [],
        progress(total=s.iterations, desc=desc, disable=not show_progress),
    )
    mean, std = reward_norm
    for it in range(s.iterations):
        prompts = [
            conversations[order[(it * s.prompts_per_iteration + j) % len(order)]]
            for j in range(s.prompts_per_iteration)
        ]
        batch = [p for p in prompts for _ in range(s.group_size)]  # G copies in a row
        # 1. sample G answers per prompt and score them (no gradients)
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
            old_logp, entropy = token_logprobs(policy, roll, s.temperature)
            ref_logp, _ = token_logprobs(reference, roll, s.temperature)
            if isinstance(reward, torch.nn.Module):
                raw = rollout_scores(reward, tokenizer, roll)
                unfinished = (~roll.finished).float()
                score = (raw - mean) / std - s.missing_eos_penalty * unfinished
            else:
                raw = torch.as_tensor(
                    reward(roll), dtype=torch.float32, device=mask.device
                )
                score = raw
            # 2. group advantages: one number per answer
            advantages = group_advantages(score, s.group_size, s.scale_rewards)
        # 3. minibatch updates on this rollout
        losses = []
        for _ in range(s.ppo_epochs):
            perm = torch.randperm(len(roll), generator=g)
            for i in range(0, len(roll), s.minibatch_size):
                idx = perm[i : i + s.minibatch_size]
                sub = roll.subset(idx)
                w, m = sub.response.shape[1], sub.response_mask
                with autocast():
                    logp, _ = token_logprobs(policy, sub, s.temperature)
                    loss = (loss_fn or grpo_loss)(
                        logp,
                        old_logp[idx, :w],
                        ref_logp[idx, :w],
                        advantages[idx],
                        m,
                        s.clip,
                        s.beta,
                    )
                opt.zero_grad(set_to_none=True)
                scaler.scale(loss).backward()
                scaler.unscale_(opt)
                torch.nn.utils.clip_grad_norm_(policy.parameters(), 1.0)
                scaler.step(opt)
                scaler.update()
                losses.append(loss.item())
        kl = ((old_logp - ref_logp) * mask).sum(1).mean()  # k1, summed per answer
        solved = (score.view(-1, s.group_size).std(1) == 0).float().mean()
        history.append(
            {
                "iteration": it + 1,
                "reward": float(raw.mean()),
                "score": float(score.mean()),
                **({"gold": sum(gold_scores(roll)) / len(roll)} if gold else {}),
                "kl": float(kl),
                "entropy": float(masked_mean(entropy, mask)),
                "finished": float(roll.finished.float().mean()),
                "length": float(mask.sum(1).float().mean()),
                "no_signal": float(solved),  # groups that all scored the same
                "loss": sum(losses) / len(losses),
            }
        )
        if callback is not None:
            callback(it + 1, history)
        bar.set_postfix(
            reward=f"{history[-1]['score']:.2f}", kl=f"{history[-1]['kl']:.2f}"
        )
        bar.update(1)
    bar.close()
    return history
# --- end of solutions/07_beyond.ipynb ---
# fmt: on
