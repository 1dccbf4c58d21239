"""PPO for RLHF (Chapter 3, Part 2; Schulman et al. 2017, as used by Ziegler et al. 2019 and InstructGPT).

TRL removed its ``PPOTrainer`` in 1.13, so this is the course's own, written to be read: a rollout,
per-token rewards with a KL penalty, GAE, the clipped policy and value losses, and a loop of
minibatch epochs. Chapter 3 writes the pieces as exercises and the loop as
``train_ppo_from_scratch``; :func:`train_ppo` is that loop (``tests/test_twins.py`` keeps the two
identical), and Project 2 calls it.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch

from .config import course_seed, seed_everything
from .padding import in_order, length_groups, pad_right
from .progress import progress
from .reward import reward_scores


def masked_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of ``x`` over the entries where ``mask`` is 1 (every token of the batch counts once)."""
    mask = mask.to(x.dtype)
    return (x * mask).sum() / mask.sum().clamp(min=1)


def whiten(x: torch.Tensor, mask: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """``x`` shifted and scaled to mean 0 and standard deviation 1 over the masked entries; 0 elsewhere."""
    mask = mask.to(x.dtype)
    mean = masked_mean(x, mask)
    var = masked_mean((x - mean) ** 2, mask)
    return (x - mean) * torch.rsqrt(var + eps) * mask


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
class Rollout:
    """A batch of sampled responses, as token ids.

    ``query`` ``[B, P]`` is the chat-formatted prompt, left-padded; ``response`` ``[B, T]`` the
    sampled tokens up to and including the first end token, right-padded; the masks are 1 on
    real tokens. ``finished`` is true where the response ended its turn (the end-of-turn token).
    """

    conversations: list
    query: torch.Tensor
    query_mask: torch.Tensor
    response: torch.Tensor
    response_mask: torch.Tensor
    finished: torch.Tensor
    texts: list[str]

    def __len__(self) -> int:
        return len(self.texts)

    def subset(self, index) -> "Rollout":
        """The rows ``index``, without the padding columns that only other rows needed."""
        index = torch.as_tensor(index)
        qm, rm = self.query_mask[index], self.response_mask[index]
        q0 = int((qm.sum(0) > 0).nonzero()[0])  # first column any of these prompts uses (left padding)
        r1 = int(rm.sum(1).max())  # longest of these responses (right padding)
        return Rollout(
            [self.conversations[i] for i in index.tolist()],
            self.query[index][:, q0:],
            qm[:, q0:],
            self.response[index][:, :r1],
            rm[:, :r1],
            self.finished[index],
            [self.texts[i] for i in index.tolist()],
        )

    def model_inputs(self) -> dict[str, torch.Tensor]:
        """``input_ids``, ``attention_mask`` and ``position_ids`` of prompt + response (positions skip
        the left padding)."""
        attention_mask = torch.cat([self.query_mask, self.response_mask], 1)
        return {
            "input_ids": torch.cat([self.query, self.response], 1),
            "attention_mask": attention_mask,
            "position_ids": (attention_mask.cumsum(1) - 1).clamp(min=0),
        }


@torch.no_grad()
def sample_rollout(
    policy, tokenizer, conversations, *, max_new_tokens: int = 40, temperature: float = 1.0, seed: int = 0
) -> Rollout:
    """Sample one response per conversation from ``policy`` (pure sampling at ``temperature``: no top-k/top-p,
    so the log-probabilities PPO computes are those of the distribution that was sampled)."""
    from .models import chat_prompts, left_padding
    from .sampling import sample_tokens

    device = next(policy.parameters()).device
    stop = policy.generation_config.eos_token_id
    stop = set(stop if isinstance(stop, list) else [stop])
    with left_padding(tokenizer):
        enc = tokenizer(
            chat_prompts(tokenizer, conversations),
            return_tensors="pt",
            padding=True,
            add_special_tokens=False,
        ).to(device)
    with torch.random.fork_rng(devices=[] if device.type == "cpu" else [device]):
        torch.manual_seed(course_seed(seed))
        new = sample_tokens(
            policy,
            enc["input_ids"],
            enc["attention_mask"],
            max_new_tokens=max_new_tokens,
            temperature=temperature,
            stop_ids=stop,
            pad_id=tokenizer.pad_token_id,
        ).tolist()
    kept, finished = [], []
    for ids in new:
        cut = next((i for i, t in enumerate(ids) if t in stop), None)
        kept.append(ids if cut is None else ids[: cut + 1])
        finished.append(cut is not None and ids[cut] == tokenizer.eos_token_id)
    width = max(len(k) for k in kept)
    response = torch.full((len(kept), width), tokenizer.pad_token_id, dtype=torch.long)
    response_mask = torch.zeros((len(kept), width), dtype=torch.long)
    for i, k in enumerate(kept):
        response[i, : len(k)] = torch.tensor(k)
        response_mask[i, : len(k)] = 1
    texts = [tokenizer.decode(k, skip_special_tokens=True).strip() for k in kept]
    return Rollout(
        list(conversations),
        enc["input_ids"],
        enc["attention_mask"],
        response.to(device),
        response_mask.to(device),
        torch.tensor(finished, device=device),
        texts,
    )


def token_logprobs(model, rollout: Rollout, temperature: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """``log pi(y_t | x, y_<t)`` of each response token and the policy's entropy there, both ``[B, T]``.

    The logits are divided by the sampling ``temperature``: PPO's ratio must compare the
    distribution the tokens were drawn from. Gradients flow into the log-probabilities if enabled
    by the caller; the entropy is a diagnostic, computed without them. The rows run in groups of
    similar length (:mod:`utils.padding`).
    """
    groups = length_groups(rollout.query_mask.sum(1) + rollout.response_mask.sum(1))
    if len(groups) == 1:
        return _token_logprobs(model, rollout, temperature)
    width = rollout.response.shape[1]
    parts = [_token_logprobs(model, rollout.subset(rows), temperature) for rows in groups]
    logp = in_order([pad_right(lp, width) for lp, _ in parts], groups)
    entropy = in_order([pad_right(e, width) for _, e in parts], groups)
    return logp, entropy


def _token_logprobs(model, rollout: Rollout, temperature: float) -> tuple[torch.Tensor, torch.Tensor]:
    inputs = rollout.model_inputs()
    width = rollout.response.shape[1]  # the logits at position i predict token i + 1: keep the last width + 1
    logits = model(**inputs, logits_to_keep=width + 1).logits[:, :-1].float() / temperature
    logp_all = logits.log_softmax(-1)
    logp = torch.gather(logp_all, 2, rollout.response.unsqueeze(-1)).squeeze(-1)
    with torch.no_grad():
        entropy = -(logp_all.exp() * logp_all).sum(-1)
    mask = rollout.response_mask
    return logp * mask, entropy * mask


def token_values(value_model, rollout: Rollout) -> torch.Tensor:
    """The value model's estimate ``V(x, y_<t)`` before each response token, ``[B, T]``.

    The value model is a sequence-classification model (like the reward model); its scalar head
    is applied to every position's hidden state instead of the last one only. The rows run in
    groups of similar length (:mod:`utils.padding`).
    """
    groups = length_groups(rollout.query_mask.sum(1) + rollout.response_mask.sum(1))
    if len(groups) == 1:
        return _token_values(value_model, rollout)
    width = rollout.response.shape[1]
    return in_order([pad_right(_token_values(value_model, rollout.subset(r)), width) for r in groups], groups)


def _token_values(value_model, rollout: Rollout) -> torch.Tensor:
    inputs = rollout.model_inputs()
    backbone = getattr(value_model, value_model.base_model_prefix)
    hidden = backbone(**inputs).last_hidden_state
    start = rollout.query.shape[1] - 1
    return value_model.score(hidden[:, start:-1]).squeeze(-1).float() * rollout.response_mask


def rollout_scores(reward_model, tokenizer, rollout: Rollout) -> torch.Tensor:
    """The reward model's score of each response, read at the end of the chat-formatted conversation."""
    return reward_scores(
        reward_model,
        tokenizer,
        rollout.conversations,
        [[{"role": "assistant", "content": t}] for t in rollout.texts],
    )


def gold_scores(rollout: Rollout) -> list[float]:
    """The gold judge's score of each response (an unfinished answer is penalised by the rubric)."""
    from . import judge

    return [
        judge.score(c, t, bool(f)) for c, t, f in zip(rollout.conversations, rollout.texts, rollout.finished)
    ]


@dataclass
class PPOSettings:
    """The knobs of :func:`train_ppo`; the defaults are the values Chapter 3 and Project 2 use on the
    tiny model (40 iterations of 64 answers, two passes of two minibatches, β = 0.1, λ = 1)."""

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

    def __post_init__(self):
        from .config import get_profile

        self.iterations = get_profile().steps(self.iterations)  # (fewer in a smoke test)


def train_ppo(
    policy,
    reference,
    value_model,
    reward_model,
    tokenizer,
    conversations,
    settings: PPOSettings,
    reward_norm: tuple[float, float] = (0.0, 1.0),
    gold: bool = True,
    desc: str = "PPO",
    show_progress: bool = True,
    callback=None,
    advantages_fn=rlhf_advantages,
) -> list[dict]:
    """Optimise ``policy`` against ``reward_model`` with PPO; ``reference`` is frozen.

    ``reward_model`` is a sequence-classification model (scored with :func:`rollout_scores`) or
    any function ``rollout -> scores[B]``; scores are normalised with ``reward_norm = (mean, std)``,
    best the reward model's mean and spread on the SFT model's own answers (Chapter 3, detail 3).

    This is Chapter 3's loop (``train_ppo_from_scratch``). Each iteration takes the next
    ``batch_size`` prompts of a seeded shuffle of ``conversations`` (cycled), rolls out one response
    each, scores it, turns the scores into per-token rewards and advantages, and takes
    ``ppo_epochs`` passes of minibatch updates over the rollout. All models
    stay in eval mode (no dropout: the log-probabilities of the update must match the rollout's).
    ``callback(iteration, history)`` runs after every iteration. ``advantages_fn`` is the block from
    scores to advantages, with :func:`rlhf_advantages`' signature (Project 2's learners write their
    own). Returns one dict per iteration; with ``gold`` (TinyWorld prompts only) each records the gold
    judge's mean score of the rollout too.
    """
    s = settings
    seed_everything(s.seed)
    for m in (policy, reference, value_model, reward_model):
        if isinstance(m, torch.nn.Module):
            m.eval()
    opt_policy = torch.optim.AdamW(policy.parameters(), lr=s.lr, weight_decay=0.0)
    opt_value = torch.optim.AdamW(value_model.parameters(), lr=s.value_lr, weight_decay=0.0)
    g = torch.Generator().manual_seed(course_seed(s.seed))
    order = torch.randperm(len(conversations), generator=g).tolist()
    history, bar = [], progress(total=s.iterations, desc=desc, disable=not show_progress)
    mean, std = reward_norm
    for it in range(s.iterations):
        batch = [
            conversations[order[(it * s.batch_size + j) % len(order)]] for j in range(s.batch_size)
        ]  # cycled
        # 1. rollout and score (no gradients)
        roll = sample_rollout(
            policy,
            tokenizer,
            batch,
            max_new_tokens=s.max_new_tokens,
            temperature=s.temperature,
            seed=s.seed * 100_003 + it,
        )
        mask = roll.response_mask
        with torch.no_grad():
            old_logp, entropy = token_logprobs(policy, roll, s.temperature)
            ref_logp, _ = token_logprobs(reference, roll, s.temperature)
            old_values = token_values(value_model, roll)
            raw = (
                rollout_scores(reward_model, tokenizer, roll)
                if isinstance(reward_model, torch.nn.Module)
                else torch.as_tensor(reward_model(roll), dtype=torch.float32, device=mask.device)
            )
            score = (raw - mean) / std - s.missing_eos_penalty * (~roll.finished).float()
            # 2. per-token rewards, advantages and returns
            advantages, returns = advantages_fn(
                score, old_logp, ref_logp, old_values, mask, s.kl_coef, s.gamma, s.lam, s.whiten_advantages
            )
        # 3. several epochs of minibatch updates on this rollout
        stats = {"policy_loss": [], "value_loss": [], "clipfrac": [], "approx_kl": []}
        for _ in range(s.ppo_epochs):
            perm = torch.randperm(len(roll), generator=g)
            for i in range(0, len(roll), s.minibatch_size):
                idx = perm[i : i + s.minibatch_size]
                sub = roll.subset(idx)  # trimmed to these rows' longest prompt and answer
                w, m = sub.response.shape[1], sub.response_mask
                logp, _ = token_logprobs(policy, sub, s.temperature)
                pl = ppo_policy_loss(logp, old_logp[idx, :w], advantages[idx, :w], m, s.clip)
                opt_policy.zero_grad(set_to_none=True)
                pl.backward()
                torch.nn.utils.clip_grad_norm_(policy.parameters(), 1.0)
                opt_policy.step()
                vl = ppo_value_loss(
                    token_values(value_model, sub), old_values[idx, :w], returns[idx, :w], m, s.value_clip
                )
                opt_value.zero_grad(set_to_none=True)
                vl.backward()
                torch.nn.utils.clip_grad_norm_(value_model.parameters(), 1.0)
                opt_value.step()
                with torch.no_grad():
                    ratio = torch.exp(logp - old_logp[idx, :w])
                    stats["policy_loss"].append(pl.item())
                    stats["value_loss"].append(vl.item())
                    stats["clipfrac"].append(masked_mean(((ratio - 1).abs() > s.clip).float(), m).item())
                    stats["approx_kl"].append(masked_mean(old_logp[idx, :w] - logp, m).item())
        kl = ((old_logp - ref_logp) * mask).sum(1)
        history.append(
            {
                "iteration": it + 1,
                "reward": float(raw.mean()),
                "score": float(score.mean()),
                **({"gold": sum(gold_scores(roll)) / len(roll)} if gold else {}),
                "kl": float(kl.mean()),
                "entropy": float(masked_mean(entropy, mask)),
                "finished": float(roll.finished.float().mean()),
                "length": float(mask.sum(1).float().mean()),
                **{k: sum(v) / len(v) for k, v in stats.items()},
            }
        )
        if callback is not None:
            callback(it + 1, history)
        bar.set_postfix(reward=f"{history[-1]['score']:.2f}", kl=f"{history[-1]['kl']:.2f}")
        bar.update(1)
    bar.close()
    return history


def value_model_from(reward_model):
    """The value model starts as a copy of the reward model (TRL's former PPO and InstructGPT did the same):
    its head already tells good answers from bad ones, so early advantages are not noise."""
    vm = copy.deepcopy(reward_model)
    vm.requires_grad_(True)
    return vm
