"""Chapter 3's checkers against the classes of wrong answers issue #31 found getting through: options
tested one at a time, stated contracts left unchecked (junk at padding), values checked but not
gradients, inputs too tame, square shapes, and messages that point away from the bug. Each planted
bug below names its mistake; those marked "passed before" were accepted by the checkers before #31."""

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
from utils.ppo import gae, masked_mean, per_token_rewards, ppo_policy_loss, ppo_value_loss
from utils.reward import bradley_terry_loss


def _clip(ratio, c):
    return ratio.clamp(1 - c, 1 + c)


def _vclip(v, old, c):
    return old + (v - old).clamp(-c, c)


# --- correct answers, written differently from the references, still pass ---------------------------
def _rewards_by_where(s, lp, ref, m, k):
    real = m.bool()
    last = real & (m.cumsum(1) == m.sum(1, keepdim=True))
    return torch.where(real, -k * (lp - ref), torch.zeros_like(lp)) + s[:, None] * last


def _gae_by_rows(rewards, values, mask, gamma, lam):
    adv = torch.zeros_like(rewards)
    for b in range(rewards.shape[0]):
        n, following = int(mask[b].sum()), 0.0
        for t in reversed(range(n)):
            v_next = values[b, t + 1] if t + 1 < n else 0.0
            following = rewards[b, t] + gamma * v_next - values[b, t] + gamma * lam * following
            adv[b, t] = following
    return adv, (adv + values) * mask


def _policy_by_sign(lp, old, a, m, c):  # the clip on the advantage's side only: the same function
    ratio = torch.exp(lp - old)
    objective = a * torch.where(a > 0, ratio.clamp(max=1 + c), ratio.clamp(min=1 - c))
    return -objective[m.bool()].mean()


def _value_by_bounds(v, old, r, m, c):
    clipped = v.clamp(old - c, old + c)
    errors = torch.where((v - r) ** 2 > (clipped - r) ** 2, (v - r) ** 2, (clipped - r) ** 2)
    return 0.5 * errors[m.bool()].mean()


@pytest.mark.parametrize(
    "check, fn",
    [
        (check_bradley_terry_loss, bradley_terry_loss),
        (check_bradley_terry_loss, lambda rc, rr: F.softplus(rr - rc).mean()),
        (
            check_bradley_terry_loss,
            lambda rc, rr: F.binary_cross_entropy_with_logits(rc - rr, torch.ones_like(rc)),
        ),
        (check_per_token_rewards, per_token_rewards),
        (check_per_token_rewards, _rewards_by_where),
        (check_gae, gae),
        (check_gae, _gae_by_rows),
        (check_ppo_policy_loss, ppo_policy_loss),
        (
            check_ppo_policy_loss,
            lambda lp, old, a, m, c: (
                -torch.min(a * torch.exp(lp - old), a * _clip(torch.exp(lp - old), c))[m.bool()].mean()
            ),
        ),
        (check_ppo_policy_loss, _policy_by_sign),
        (check_ppo_value_loss, ppo_value_loss),
        (check_ppo_value_loss, _value_by_bounds),
    ],
)
def test_correct_answers_pass(check, fn):
    check(fn)


# --- the Bradley-Terry loss: the gradient reaches both rewards --------------------------------------
@pytest.mark.parametrize(
    "bug, message",
    [
        # passed before: the rejected answer's reward treated as a constant
        (lambda rc, rr: -F.logsigmoid(rc - rr.detach()).mean(), "no gradient reaches `rewards_rejected`"),
        # passed before: "detached" answered with requires_grad_() on the number
        (
            lambda rc, rr: bradley_terry_loss(rc, rr).detach().requires_grad_(),
            "no gradient reaches `rewards_chosen`",
        ),
        # the non-finite message names both shortcuts (it named only log(sigmoid))
        (lambda rc, rr: torch.log1p(torch.exp(rr - rc)).mean(), "F.logsigmoid .*log\\(1 \\+ torch.exp"),
    ],
)
def test_bradley_terry_loss_rejects(bug, message):
    with pytest.raises(CheckError, match=message):
        check_bradley_terry_loss(bug)


# --- per-token rewards: 0 on padding whatever the log-probabilities hold there ----------------------
def _unmasked_kl(s, lp, ref, m, k):  # passed before: padding log-probabilities were 0
    r = -k * (lp - ref)
    r[torch.arange(len(s)), m.sum(1).long() - 1] += s
    return r


def _overwritten(s, lp, ref, m, k):
    r = -k * (lp - ref) * m
    r[torch.arange(len(s)), m.sum(1).long() - 1] = s
    return r


def _last_column(s, lp, ref, m, k):
    r = -k * (lp - ref) * m
    r[:, -1] += s
    return r


@pytest.mark.parametrize(
    "bug, message",
    [
        (_unmasked_kl, "the KL term is not masked"),
        (_overwritten, "instead of overwriting"),
        (_last_column, "last \\*column\\*"),  # the padding hint used to come first, so this never fired
        (lambda s, lp, ref, m, k: per_token_rewards(s, lp, ref, m, k).T, "transposed"),
    ],
)
def test_per_token_rewards_rejects(bug, message):
    with pytest.raises(CheckError, match=message):
        check_per_token_rewards(bug)


# --- GAE: the first wrong step named, gamma and lam told apart ---------------------------------------
def _recursion(rewards, values, mask, delta_gamma, factor):
    adv, running = torch.zeros_like(rewards), torch.zeros_like(rewards[:, 0])
    rewards, values = rewards * mask, values * mask
    for t in reversed(range(rewards.shape[1])):
        following = values[:, t + 1] if t + 1 < rewards.shape[1] else torch.zeros_like(running)
        running = (rewards[:, t] + delta_gamma * following - values[:, t] + factor * running) * mask[:, t]
        adv[:, t] = running
    return adv, (adv + values) * mask


def _one_step_ahead(rewards, values, mask, gamma, lam):  # A_t = delta_t + gamma lam delta_{t+1} only
    deltas = _recursion(rewards, values, mask, gamma, 0.0)[0]
    following = torch.cat([deltas[:, 1:], torch.zeros_like(deltas[:, :1])], 1)
    adv = (deltas + gamma * lam * following) * mask
    return adv, (adv + values) * mask


@pytest.mark.parametrize(
    "bug, message",
    [
        (lambda r, v, m, g, lam: gae(r, v, m, g, lam)[::-1], "in the order \\(advantages, returns\\)"),
        (lambda r, v, m, g, lam: ((r - v) * m, r * m), "hand.*do not look ahead"),
        (lambda r, v, m, g, lam: _recursion(r, v, m, 1.0, lam), "gamma is ignored"),
        (lambda r, v, m, g, lam: _recursion(r, v, m, g, lam), "not lam alone"),
        # at gamma = 1 the swap looks like lam in delta_t: both are named
        (
            lambda r, v, m, g, lam: gae(r, v, m, lam, g),
            "lam only enters the recursion; or gamma and lam are swapped",
        ),
        (_one_step_ahead, "delta_t is right .* the recursion is not"),
        (lambda r, v, m, g, lam: _recursion(r, v, m, 1.0, g * lam), "one-step errors are already wrong"),
        (
            lambda r, v, m, g, lam: (gae(r, v, m, g, lam)[0], gae(r, torch.zeros_like(v), m, g, 1.0)[0]),
            "rewards-to-go",
        ),
        (
            lambda r, v, m, g, lam: (gae(r, v, m, g, lam)[0], gae(r, v, m, g, lam)[0] + v),
            "returns must be 0 on padding",
        ),
        (lambda r, v, m, g, lam: tuple(x.T for x in gae(r, v, m, g, lam)), "transposed"),
    ],
)
def test_gae_rejects(bug, message):
    with pytest.raises(CheckError, match=message):
        check_gae(bug)


# --- PPO's policy loss: gradients, every side of the clip, junk at padding, extreme ratios -----------
def _policy(lp, old, a, m, c, ratio=None, unclipped=lambda x: x, clipped=lambda x: x):
    ratio = torch.exp(lp - old) if ratio is None else ratio
    return masked_mean(torch.maximum(unclipped(-a * ratio), clipped(-a * _clip(ratio, c))), m)


@pytest.mark.parametrize(
    "bug, message",
    [
        # all passed before
        (
            lambda lp, old, a, m, c: _policy(lp, old, a, m, c, ratio=torch.exp(lp) / torch.exp(old)),
            "torch.exp\\(logprobs - old_logprobs\\)",
        ),
        (
            lambda lp, old, a, m, c: (
                torch.maximum(-a * torch.exp(lp - old), -a * _clip(torch.exp(lp - old), c)).sum() / m.sum()
            ),
            "padding tokens' losses are summed in",
        ),
        (
            lambda lp, old, a, m, c: _policy(
                lp,
                old,
                a,
                m,
                c,
                ratio=torch.exp(lp - old),
                clipped=lambda x: -a * torch.exp(lp - old) + (x + a * torch.exp(lp - old)).detach(),
            ),
            "must get no gradient: clamp the ratio itself",
        ),
        (
            lambda lp, old, a, m, c: _policy(lp, old, a, m, c, clipped=torch.detach),
            "the clipped term is detached",
        ),
        (
            lambda lp, old, a, m, c: _policy(lp, old, a, m, c, unclipped=torch.detach),
            "unclipped term .* is detached",
        ),
        (
            lambda lp, old, a, m, c: ppo_policy_loss(lp.detach(), old, a, m, c).requires_grad_(),
            "no gradient reaches `logprobs`",
        ),
        (  # both sides clipped for a positive advantage: wrong only where A > 0 and ratio < 1 - clip
            lambda lp, old, a, m, c: masked_mean(
                -a * torch.where(a > 0, _clip(torch.exp(lp - old), c), torch.exp(lp - old).clamp(min=1 - c)),
                m,
            ),
            "ratio 0.050 is past the clip against its advantage",
        ),
        # rejected before, with a message that did not name the mistake
        (lambda lp, old, a, m, c: ppo_policy_loss(old, lp, a, m, c), "logprobs and old_logprobs are swapped"),
        (
            lambda lp, old, a, m, c: (
                (torch.maximum(-a * torch.exp(lp - old), -a * _clip(torch.exp(lp - old), c)) * m).sum(1)
                / m.sum(1)
            ).mean(),
            "mean per answer",
        ),
    ],
)
def test_ppo_policy_loss_rejects(bug, message):
    with pytest.raises(CheckError, match=message):
        check_ppo_policy_loss(bug)


# --- PPO's value loss: gradients, errors above 1, every side of the clip ----------------------------
def _value(v, old, r, m, c, clipped_values=None, unclipped=lambda x: x, clipped=lambda x: x):
    vc = _vclip(v, old, c) if clipped_values is None else clipped_values
    return 0.5 * masked_mean(torch.maximum(unclipped((v - r) ** 2), clipped((vc - r) ** 2)), m)


@pytest.mark.parametrize(
    "bug, message",
    [
        # all passed before
        (
            lambda v, old, r, m, c: masked_mean(
                torch.maximum(
                    F.smooth_l1_loss(v, r, reduction="none"),
                    F.smooth_l1_loss(_vclip(v, old, c), r, reduction="none"),
                ),
                m,
            ),
            "Huber",
        ),
        (
            lambda v, old, r, m, c: _value(
                v, old, r, m, c, clipped_values=v + (_vclip(v, old, c) - v).detach()
            ),
            "constant in V",
        ),
        (
            lambda v, old, r, m, c: _value(v, old, r, m, c, clipped=torch.detach),
            "the clipped term is detached",
        ),
        (
            lambda v, old, r, m, c: _value(v, old, r, m, c, unclipped=torch.detach),
            "unclipped error .* is detached",
        ),
        (
            lambda v, old, r, m, c: ppo_value_loss(v.detach(), old, r, m, c).requires_grad_(),
            "no gradient reaches `values`",
        ),
        # rejected before, with a message that did not name the mistake
        (lambda v, old, r, m, c: ppo_value_loss(old, v, r, m, c), "not swapped"),
        (
            lambda v, old, r, m, c: (
                0.5
                * ((torch.maximum((v - r) ** 2, (_vclip(v, old, c) - r) ** 2) * m).sum(1) / m.sum(1)).mean()
            ),
            "mean per answer",
        ),
    ],
)
def test_ppo_value_loss_rejects(bug, message):
    with pytest.raises(CheckError, match=message):
        check_ppo_value_loss(bug)
