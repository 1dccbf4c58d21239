"""Chapter 3 checkers: RLHF - the reward model's Bradley-Terry loss (also against ``trl.RewardTrainer``),
per-token rewards, GAE, and PPO's clipped policy and value losses."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .core import (
    CheckError,
    _loss_verdict,
    _scalar,
    call_learner,
    compare_with_trl_trainer,
    continues_with,
    expect_tensor,
    passed,
)


# --- the reward model ---------------------------------------------------------------------
@continues_with("from utils.reward import bradley_terry_loss")
def check_bradley_terry_loss(fn, reward_model=None, tokenizer=None, pairs=None) -> None:
    """``fn(rewards_chosen[batch], rewards_rejected[batch]) -> scalar``: the mean of
    ``-log sigmoid(r_chosen - r_rejected)``; given a reward model and pairs, also compared with
    ``trl.RewardTrainer``'s loss on the same batch."""
    name = getattr(fn, "__name__", "bradley_terry_loss")
    cases = [
        (torch.tensor([1.0, -0.5, 2.0]), torch.tensor([0.0, 0.5, 2.5])),
        (torch.tensor([0.3]), torch.tensor([0.3])),  # equal rewards: log 2
        (torch.tensor([60.0, -80.0]), torch.tensor([-60.0, 80.0])),
    ]  # huge gaps: must stay finite
    for i, (rc, rr) in enumerate(cases):
        rc_in = rc.clone().requires_grad_(True)
        got = _scalar(call_learner(fn, name, rc_in, rr.clone()), name)
        if not torch.isfinite(got):
            raise CheckError(
                f"`{name}` returned {got.item()} for reward gaps of 120: use F.logsigmoid, "
                "not torch.log(torch.sigmoid(...)), which underflows to log 0"
            )
        _loss_verdict(
            got,
            -F.logsigmoid(rc - rr).mean(),
            name,
            f"on case {i} where the Bradley-Terry loss is",
            lambda: [
                (
                    -F.logsigmoid(rr - rc).mean(),
                    (
                        "the sign is flipped: the loss should fall as the chosen answer's reward rises "
                        "above the rejected one's"
                    ),
                ),
                (-F.logsigmoid(rc - rr).sum(), "average over the batch instead of summing"),
                (
                    (rr - rc).mean(),
                    (
                        "that is a linear margin; pass the difference through log-sigmoid "
                        "(the Bradley-Terry likelihood)"
                    ),
                ),
            ],
            "the loss is -log sigmoid(r_chosen - r_rejected), averaged over the batch",
            " from the rewards: the reward model needs a gradient",
        )
    message = f"`{name}` is the Bradley-Terry loss on hand-made cases (log 2 at a tie, finite at gaps of 120)"
    if reward_model is not None:
        message += _compare_with_reward_trainer(fn, name, reward_model, tokenizer, pairs)
    passed(message)


def _compare_with_reward_trainer(fn, name, reward_model, tokenizer, pairs) -> str:
    from trl import RewardConfig, RewardTrainer

    def rewards(trainer, batch, n):  # one reward per sequence: chosen rows first, then rejected
        r = trainer.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, 0]
        return r[:n], r[n:]

    return compare_with_trl_trainer(
        fn,
        name,
        trainer_cls=RewardTrainer,
        config_cls=RewardConfig,
        models={"model": reward_model},
        tokenizer=tokenizer,
        pairs=pairs,
        tag="reward",
        activation_checkpointing=False,
        trl_loss=lambda trainer, batch: trainer.compute_loss(trainer.model, dict(batch)),
        learner_inputs=rewards,
        tol=1e-5,
        who="trl.RewardTrainer",
        whose="trl.RewardTrainer's",
    )


# --- PPO ----------------------------------------------------------------------------------
def _rollout_cases():
    """(scores, logprobs, ref_logprobs, values, mask) batches with responses of different lengths."""
    g = torch.Generator().manual_seed(3)
    out = []
    for b, t, lengths in [(3, 5, [5, 2, 3]), (2, 4, [1, 4]), (4, 6, [6, 6, 3, 1])]:
        mask = (torch.arange(t)[None, :] < torch.tensor(lengths)[:, None]).float()
        scores = torch.randn(b, generator=g)
        lp = -torch.rand(b, t, generator=g) * 3 * mask
        ref = -torch.rand(b, t, generator=g) * 3 * mask
        values = torch.randn(b, t, generator=g) * mask
        out.append((scores, lp, ref, values, mask))
    return out


@continues_with("from utils.ppo import per_token_rewards")
def check_per_token_rewards(fn) -> None:
    """``fn(scores[B], logprobs[B,T], ref_logprobs[B,T], mask[B,T], kl_coef) -> [B,T]``."""
    from ..ppo import per_token_rewards as reference

    name = getattr(fn, "__name__", "per_token_rewards")
    for i, (scores, lp, ref, _, mask) in enumerate(_rollout_cases()):
        for kl_coef in (0.1, 0.0):
            got = expect_tensor(
                call_learner(fn, name, scores.clone(), lp.clone(), ref.clone(), mask.clone(), kl_coef),
                name,
                shape=tuple(lp.shape),
            )
            want = reference(scores, lp, ref, mask, kl_coef)
            if torch.allclose(got.float(), want, atol=1e-5):
                continue
            last = mask.sum(1).long() - 1
            hint = (
                "r_t = -kl_coef * (logprobs - ref_logprobs) on response tokens, "
                "plus the score on the last one"
            )
            if (got.float() * (1 - mask)).abs().max() > 1e-6:
                hint = "padding positions (mask 0) must get reward 0"
            elif torch.allclose(got.float(), reference(scores, ref, lp, mask, kl_coef), atol=1e-5):
                hint = "the KL term's sign is flipped: moving away from the reference must *cost* reward"
            elif kl_coef > 0 and torch.allclose(
                got.float(), reference(scores, lp, ref, mask, 0.0), atol=1e-5
            ):
                hint = "the KL penalty is missing"
            elif torch.allclose(got.float()[:, 0], want[:, 0] + scores * (last > 0), atol=1e-5):
                hint = "the score goes on the *last* response token (the end token), not the first"
            elif torch.allclose(
                got.float()[:, -1], want[:, -1] + scores * (last < lp.shape[1] - 1), atol=1e-5
            ):
                hint = (
                    "the score went on the last *column*; a shorter response ends earlier - "
                    "use mask.sum(1) - 1 for each row's last token"
                )
            elif torch.allclose(
                got.float()[torch.arange(len(scores)), last],
                -kl_coef * (lp - ref)[torch.arange(len(scores)), last],
                atol=1e-5,
            ):
                hint = "the score is missing from the last response token"
            raise CheckError(
                f"`{name}` is wrong on case {i} (kl_coef={kl_coef}, response lengths "
                f"{mask.sum(1).long().tolist()}): {hint}\n got  {got.tolist()}\n want {want.tolist()}"
            )
    passed(
        f"`{name}`: KL penalty on every token, score on each response's last token, zero padding (3 batches)"
    )


@continues_with("from utils.ppo import gae")
def check_gae(fn) -> None:
    """``fn(rewards[B,T], values[B,T], mask[B,T], gamma, lam) -> (advantages[B,T], returns[B,T])``."""
    from ..ppo import gae as reference
    from ..ppo import per_token_rewards

    name = getattr(fn, "__name__", "gae")
    # a hand-computed case: one response of two tokens, rewards (0, 1), values (0.5, 0.8), gamma = lam = 1
    r, v, m = (
        torch.tensor([[0.0, 1.0, 0.0]]),
        torch.tensor([[0.5, 0.8, 0.0]]),
        torch.tensor([[1.0, 1.0, 0.0]]),
    )
    cases = [(r, v, m, 1.0, 1.0)]
    g = torch.Generator().manual_seed(6)
    for scores, lp, ref, values, mask in _rollout_cases():
        rewards = per_token_rewards(scores, lp, ref, mask, 0.1)
        raw_values = values + torch.randn(values.shape, generator=g) * (
            1 - mask
        )  # a value model's output at padding is arbitrary
        cases += [(rewards, values, mask, 1.0, 0.95), (rewards, raw_values, mask, 0.9, 0.5)]
    for i, (rewards, values, mask, gamma, lam) in enumerate(cases):
        out = call_learner(fn, name, rewards.clone(), values.clone(), mask.clone(), gamma, lam)
        if not (isinstance(out, tuple) and len(out) == 2):
            raise CheckError(f"`{name}` should return a pair (advantages, returns), got {type(out).__name__}")
        adv = expect_tensor(out[0], name + " advantages", shape=tuple(rewards.shape))
        ret = expect_tensor(out[1], name + " returns", shape=tuple(rewards.shape))
        want_adv, want_ret = reference(rewards, values, mask, gamma, lam)
        if i == 0 and not torch.allclose(adv.float(), want_adv, atol=1e-5):
            raise CheckError(
                f"`{name}` gave advantages {adv.tolist()} for rewards (0, 1), values (0.5, 0.8), "
                "gamma = lam = 1; by hand: A_1 = 1 - 0.8 = 0.2 (nothing after the last token), "
                "A_0 = (0 + 0.8 - 0.5) + 0.2 = 0.5"
            )
        if torch.allclose(adv.float(), want_adv, atol=1e-5):
            if not torch.allclose(ret.float(), want_ret, atol=1e-5):
                hint = "returns are advantages + values (the value model's regression target), 0 on padding"
                if torch.allclose(ret.float(), want_adv, atol=1e-5):
                    hint = "those are the advantages; the returns add the values back"
                raise CheckError(
                    f"`{name}`'s advantages are right but its returns are not on case {i}: {hint}"
                )
            continue
        hint = (
            "delta_t = r_t + gamma * V_{t+1} - V_t, A_t = delta_t + gamma * lam * A_{t+1}, "
            "computed from the end"
        )
        if (adv.float() * (1 - mask)).abs().max() > 1e-6:
            hint = "padding positions (mask 0) must get advantage 0"
        elif torch.allclose(adv.float(), reference(rewards, values, mask, 1.0, 1.0)[0], atol=1e-5):
            hint = "gamma and lam are ignored"
        elif torch.allclose(adv.float(), (rewards - values) * mask, atol=1e-5):
            hint = (
                "the advantages do not look ahead: add gamma * V_{t+1} and the discounted future advantages"
            )
        else:
            masked = call_learner(fn, name, rewards.clone(), values * mask, mask.clone(), gamma, lam)[0]
            if torch.allclose(masked.float(), want_adv, atol=1e-5):
                hint = (
                    "the value after a response's last token must count as 0, but the value model's output "
                    "at the padding position leaked into the last token's delta (multiply values by the mask)"
                )
        raise CheckError(
            f"`{name}` is wrong on case {i} (gamma={gamma}, lam={lam}, lengths "
            f"{mask.sum(1).long().tolist()}): {hint}\n got  {adv.tolist()}\n want {want_adv.tolist()}"
        )
    passed(f"`{name}`: a hand-computed case and {len(cases) - 1} batches of mixed lengths, gamma and lam")


def _ratio_cases():
    g = torch.Generator().manual_seed(4)
    mask = torch.tensor([[1.0, 1.0, 1.0, 0.0], [1.0, 1.0, 0.0, 0.0]])
    old = -torch.rand(2, 4, generator=g) * 2
    # log-ratios chosen to land inside and outside [1 - 0.2, 1 + 0.2], both signs of advantage
    shift = torch.tensor([[0.05, 0.5, -0.5, 0.0], [-0.05, 0.3, 0.0, 0.0]])
    adv = torch.tensor([[1.0, 1.0, -1.0, 0.0], [-0.5, -2.0, 0.0, 0.0]])
    return old, old + shift, adv, mask


@continues_with("from utils.ppo import ppo_policy_loss")
def check_ppo_policy_loss(fn) -> None:
    """``fn(logprobs[B,T], old_logprobs[B,T], advantages[B,T], mask[B,T], clip) -> scalar``."""
    from ..ppo import masked_mean
    from ..ppo import ppo_policy_loss as reference

    name = getattr(fn, "__name__", "ppo_policy_loss")
    old, new, adv, mask = _ratio_cases()
    for i, (lp, clip) in enumerate([(old.clone(), 0.2), (new, 0.2), (new, 0.1), (new, 10.0)]):
        lp_in = lp.clone().requires_grad_(True)
        got = _scalar(call_learner(fn, name, lp_in, old.clone(), adv.clone(), mask.clone(), clip), name)
        ratio = torch.exp(lp - old)
        _loss_verdict(
            got,
            reference(lp, old, adv, mask, clip),
            name,
            f"on case {i} (clip={clip}) where PPO's loss is",
            lambda: [
                (
                    masked_mean(-adv * ratio, mask),
                    (
                        "the ratio is not clipped: without the clip one rollout can push the policy "
                        "arbitrarily far"
                    ),
                ),
                (
                    masked_mean(torch.minimum(-adv * ratio, -adv * ratio.clamp(1 - clip, 1 + clip)), mask),
                    (
                        "take the max of the two *losses* (the min of the two objectives): "
                        "PPO keeps the pessimistic one"
                    ),
                ),
                (
                    -reference(lp, old, adv, mask, clip),
                    "the sign is flipped: minimise the *negative* surrogate objective",
                ),
                (
                    masked_mean(
                        torch.maximum(-adv * (lp - old), -adv * (lp - old).clamp(1 - clip, 1 + clip)), mask
                    ),
                    "the ratio is exp(logprobs - old_logprobs), not the difference itself",
                ),
                (
                    (torch.maximum(-adv * ratio, -adv * ratio.clamp(1 - clip, 1 + clip)) * mask).mean(),
                    "padding is counted in the mean: divide by the number of real tokens (mask.sum())",
                ),
            ],
            (
                "loss = masked mean of max(-A * ratio, -A * clamp(ratio, 1 - clip, 1 + clip)), "
                "ratio = exp(logp - old_logp)"
            ),
            " from `logprobs`: the policy needs a gradient",
        )
    passed(f"`{name}`: ratio 1 at the rollout, clipped both ways, pessimistic max, masked mean (4 cases)")


@continues_with("from utils.ppo import ppo_value_loss")
def check_ppo_value_loss(fn) -> None:
    """``fn(values[B,T], old_values[B,T], returns[B,T], mask[B,T], clip) -> scalar``."""
    from ..ppo import masked_mean
    from ..ppo import ppo_value_loss as reference

    name = getattr(fn, "__name__", "ppo_value_loss")
    g = torch.Generator().manual_seed(5)
    mask = torch.tensor([[1.0, 1.0, 1.0, 0.0], [1.0, 0.0, 0.0, 0.0]])
    old = torch.randn(2, 4, generator=g)
    returns = old + torch.tensor([[0.5, -0.4, 0.1, 3.0], [-1.0, 0.0, 0.0, 0.0]])
    new = old + torch.tensor([[0.4, 0.3, -0.05, 2.0], [-0.6, 0.0, 0.0, 5.0]])
    for i, (v, clip) in enumerate([(old.clone(), 0.2), (new, 0.2), (new, 1.0)]):
        v_in = v.clone().requires_grad_(True)
        got = _scalar(call_learner(fn, name, v_in, old.clone(), returns.clone(), mask.clone(), clip), name)
        err, err_clipped = (v - returns) ** 2, (old + (v - old).clamp(-clip, clip) - returns) ** 2
        _loss_verdict(
            got,
            reference(v, old, returns, mask, clip),
            name,
            f"on case {i} (clip={clip}) where the clipped value loss is",
            lambda: [
                (0.5 * masked_mean(err, mask), "the value is not clipped around the rollout's old values"),
                (masked_mean(torch.maximum(err, err_clipped), mask), "missing the factor 0.5"),
                (
                    0.5 * masked_mean(torch.minimum(err, err_clipped), mask),
                    "take the max of the clipped and unclipped squared errors (pessimistic), not the min",
                ),
                (
                    0.5 * (torch.maximum(err, err_clipped) * mask).mean(),
                    "padding is counted in the mean: divide by the number of real tokens (mask.sum())",
                ),
            ],
            (
                "loss = 0.5 * masked mean of max((V - R)^2, (V_clipped - R)^2), "
                "V_clipped = old_V + clamp(V - old_V, -clip, clip)"
            ),
            " from `values`: the value model needs a gradient",
        )
    passed(
        f"`{name}`: squared error to the returns, clipped around the old values, pessimistic, "
        "masked (3 cases)"
    )
