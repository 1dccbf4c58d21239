"""Chapter 3's checkers accept correct code and reject planted bugs, naming them."""

import pytest
import torch
import torch.nn.functional as F

from utils.checks import (
    CheckError,
    check_bradley_terry_loss,
    check_gae,
    check_per_token_rewards,
    check_ppo_policy_loss,
    check_ppo_value_loss,
)
from utils.data import annotator_preferences
from utils.ppo import gae, masked_mean, per_token_rewards, ppo_policy_loss, ppo_value_loss
from utils.reward import bradley_terry_loss, reward_model_from


def test_bradley_terry_loss():
    check_bradley_terry_loss(bradley_terry_loss)


@pytest.mark.parametrize(
    "bug, message",
    [
        (lambda rc, rr: -F.logsigmoid(rr - rc).mean(), "sign is flipped"),
        (lambda rc, rr: -F.logsigmoid(rc - rr).sum(), "average over the batch"),
        (lambda rc, rr: (rr - rc).mean(), "linear margin"),
        (lambda rc, rr: -torch.log(torch.sigmoid(rc - rr)).mean(), "F.logsigmoid"),
        (lambda rc, rr: bradley_terry_loss(rc, rr).detach(), "detached"),
        (lambda rc, rr: -F.logsigmoid(rc - rr), "one number"),
    ],
)
def test_bradley_terry_loss_rejects(bug, message):
    with pytest.raises(CheckError, match=message):
        check_bradley_terry_loss(bug)


def test_bradley_terry_loss_against_reward_trainer(tiny_model, tiny_tokenizer):
    pairs = annotator_preferences(16)
    rm = reward_model_from(tiny_model, tiny_tokenizer)
    check_bradley_terry_loss(bradley_terry_loss, rm, tiny_tokenizer, pairs)
    with pytest.raises(
        CheckError, match="RewardTrainer gives"
    ):  # a margin of 0.1 passes no hand-made case... nor TRL
        check_bradley_terry_loss(
            lambda rc, rr: (
                bradley_terry_loss(rc, rr) if rc.requires_grad else bradley_terry_loss(rc - 0.1, rr)
            ),
            rm,
            tiny_tokenizer,
            pairs,
        )


# Independent implementations, written token by token from the papers' equations (not the functions the
# checkers compare against): a checker whose reference were wrong would reject them.
def loop_per_token_rewards(scores, logprobs, ref_logprobs, mask, kl_coef):
    rows = []
    for b in range(logprobs.shape[0]):
        n = int(mask[b].sum())
        row = [-kl_coef * (logprobs[b, t] - ref_logprobs[b, t]) for t in range(n)]
        row[-1] = row[-1] + scores[b]  # the sequence's score on its last real token
        row += [logprobs.new_zeros(())] * (logprobs.shape[1] - n)
        rows.append(torch.stack(row))
    return torch.stack(rows)


def loop_gae(rewards, values, mask, gamma, lam):
    B, T = rewards.shape
    adv, ret = torch.zeros(B, T), torch.zeros(B, T)
    for b in range(B):
        n = int(mask[b].sum())
        following = 0.0
        for t in reversed(range(n)):
            v_next = float(values[b, t + 1]) if t + 1 < n else 0.0  # V = 0 after the last token
            delta = float(rewards[b, t]) + gamma * v_next - float(values[b, t])
            following = delta + gamma * lam * following
            adv[b, t], ret[b, t] = following, following + float(values[b, t])
    return adv.to(rewards.dtype), ret.to(rewards.dtype)


def loop_policy_loss(logprobs, old_logprobs, advantages, mask, clip):
    terms = []
    for b, t in mask.nonzero().tolist():
        ratio = torch.exp(logprobs[b, t] - old_logprobs[b, t])
        a = advantages[b, t]
        terms.append(-torch.min(ratio * a, torch.clamp(ratio, 1 - clip, 1 + clip) * a))
    return torch.stack(terms).mean()


def loop_value_loss(values, old_values, returns, mask, clip):
    terms = []
    for b, t in mask.nonzero().tolist():
        v, old, r = values[b, t], old_values[b, t], returns[b, t]
        v_clipped = old + torch.clamp(v - old, -clip, clip)
        terms.append(0.5 * torch.max((v - r) ** 2, (v_clipped - r) ** 2))
    return torch.stack(terms).mean()


def test_per_token_rewards():
    check_per_token_rewards(loop_per_token_rewards)
    check_per_token_rewards(per_token_rewards)


def _last_column(scores, lp, ref, mask, kl_coef):
    r = -kl_coef * (lp - ref) * mask
    r[:, -1] += scores
    return r


def _first_token(scores, lp, ref, mask, kl_coef):
    r = -kl_coef * (lp - ref) * mask
    r[:, 0] += scores
    return r


@pytest.mark.parametrize(
    "bug, message",
    [
        (lambda s, lp, ref, m, k: per_token_rewards(s, ref, lp, m, k), "sign is flipped"),
        (lambda s, lp, ref, m, k: per_token_rewards(s, lp, ref, m, 0.0), "KL penalty is missing"),
        (lambda s, lp, ref, m, k: -k * (lp - ref) * m, "score is missing"),
        (_first_token, "not the first"),
        (_last_column, "last \\*column\\*|padding"),
        (lambda s, lp, ref, m, k: per_token_rewards(s, lp, ref, m, k) - k * (1 - m), "padding positions"),
    ],
)
def test_per_token_rewards_rejects(bug, message):
    with pytest.raises(CheckError, match=message):
        check_per_token_rewards(bug)


def test_gae():
    check_gae(loop_gae)
    check_gae(gae)


def _forward_gae(rewards, values, mask, gamma, lam):  # runs the recursion the wrong way
    adv = torch.zeros_like(rewards)
    running = torch.zeros_like(rewards[:, 0])
    for t in range(rewards.shape[1]):
        prev_v = values[:, t - 1] if t > 0 else torch.zeros_like(running)
        running = (rewards[:, t] + gamma * prev_v - values[:, t] + gamma * lam * running) * mask[:, t]
        adv[:, t] = running
    return adv, adv + values * mask


def _leaky_gae(rewards, values, mask, gamma, lam):  # the padding's value counts as V_{T}
    mask = mask.float()
    adv = torch.zeros_like(rewards)
    running = torch.zeros_like(rewards[:, 0])
    for t in reversed(range(rewards.shape[1])):
        nv = values[:, t + 1] if t + 1 < rewards.shape[1] else torch.zeros_like(running)
        running = (rewards[:, t] + gamma * nv - values[:, t] + gamma * lam * running) * mask[:, t]
        adv[:, t] = running
    return adv, (adv + values) * mask


@pytest.mark.parametrize(
    "bug, message",
    [
        (_forward_gae, "hand"),
        (lambda r, v, m, g, lam: gae(r, v, m, 1.0, 1.0), "gamma and lam are ignored"),
        (lambda r, v, m, g, lam: ((r - v) * m, r * m), "hand|do not look ahead"),
        (
            lambda r, v, m, g, lam: (gae(r, v, m, g, lam)[0], gae(r, v, m, g, lam)[0]),
            "those are the advantages",
        ),
        (_leaky_gae, "leaked"),
        (lambda r, v, m, g, lam: gae(r, v, m, g, lam)[0], "a pair"),
    ],
)
def test_gae_rejects(bug, message):
    with pytest.raises(CheckError, match=message):
        check_gae(bug)


def test_ppo_policy_loss():
    check_ppo_policy_loss(loop_policy_loss)
    check_ppo_policy_loss(ppo_policy_loss)


@pytest.mark.parametrize(
    "bug, message",
    [
        (lambda lp, old, a, m, c: masked_mean(-a * torch.exp(lp - old), m), "not clipped"),
        (
            lambda lp, old, a, m, c: masked_mean(
                torch.minimum(-a * torch.exp(lp - old), -a * torch.exp(lp - old).clamp(1 - c, 1 + c)), m
            ),
            "max of the two",
        ),
        (lambda lp, old, a, m, c: -ppo_policy_loss(lp, old, a, m, c), "sign is flipped"),
        (
            lambda lp, old, a, m, c: masked_mean(
                torch.maximum(-a * (lp - old), -a * (lp - old).clamp(1 - c, 1 + c)), m
            ),
            "exp",
        ),
        (
            lambda lp, old, a, m, c: (
                torch.maximum(-a * torch.exp(lp - old), -a * torch.exp(lp - old).clamp(1 - c, 1 + c)) * m
            ).mean(),
            "padding is counted",
        ),
        (lambda lp, old, a, m, c: ppo_policy_loss(lp, old, a, m, c).detach(), "detached"),
    ],
)
def test_ppo_policy_loss_rejects(bug, message):
    with pytest.raises(CheckError, match=message):
        check_ppo_policy_loss(bug)


def test_ppo_value_loss():
    check_ppo_value_loss(loop_value_loss)
    check_ppo_value_loss(ppo_value_loss)


def _vclip(v, old, c):
    return old + (v - old).clamp(-c, c)


@pytest.mark.parametrize(
    "bug, message",
    [
        (lambda v, old, r, m, c: 0.5 * masked_mean((v - r) ** 2, m), "not clipped"),
        (lambda v, old, r, m, c: 2 * ppo_value_loss(v, old, r, m, c), "0.5"),
        (
            lambda v, old, r, m, c: (
                0.5 * masked_mean(torch.minimum((v - r) ** 2, (_vclip(v, old, c) - r) ** 2), m)
            ),
            "not the min",
        ),
        (
            lambda v, old, r, m, c: (
                0.5 * (torch.maximum((v - r) ** 2, (_vclip(v, old, c) - r) ** 2) * m).mean()
            ),
            "padding is counted",
        ),
        (lambda v, old, r, m, c: ppo_value_loss(v, old, r, m, c).detach(), "detached"),
    ],
)
def test_ppo_value_loss_rejects(bug, message):
    with pytest.raises(CheckError, match=message):
        check_ppo_value_loss(bug)
