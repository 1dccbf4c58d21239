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


def _grad(loss: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """d loss / d x; zeros where ``x`` is not in ``loss``'s graph (a detached or rebuilt input)."""
    if not loss.requires_grad:
        return torch.zeros_like(x)
    (g,) = torch.autograd.grad(loss, [x], allow_unused=True, retain_graph=True)
    return torch.zeros_like(x) if g is None else g.detach().float()


def _leaf(x: torch.Tensor) -> torch.Tensor:
    return x.detach().clone().requires_grad_(True)


def _same_grad(a: torch.Tensor, b: torch.Tensor) -> bool:
    return torch.allclose(a, b, rtol=1e-4, atol=1e-6)


def _straight_through(x: torch.Tensor, lo, hi) -> torch.Tensor:
    """``x.clamp(lo, hi)`` in value but with ``x``'s gradient everywhere: a mistake's gradient."""
    return x + (x.clamp(lo, hi) - x).detach()


def _wrong_gradient(name, i, clip, g, g_ref, mask, token, mistakes, wrt: str, trains: str):
    """The end of a PPO loss checker whose value was right and gradient wrong: name each of
    ``mistakes`` - ``(gradient, hint)`` pairs - whose gradient ``g`` equals, else the first token
    whose gradient differs."""
    hint = "; or ".join(h for grad, h in mistakes if _same_grad(g, grad))  # each that fits
    if not hint:
        hint = (
            f"build the loss from torch operations on `{wrt}`, without .detach() or .item()"
            + _first_wrong_token(g, g_ref, mask, token)
        )
    raise CheckError(
        f"`{name}` gives the right loss on case {i} (clip={clip}) but the wrong gradient with respect to "
        f"`{wrt}`, which is what trains {trains}: {hint}"
    )


def _first_wrong_token(g, g_ref, mask, describe) -> str:
    """Where a loss's per-token gradient ``g`` first departs from ``g_ref``, as the end of a hint:
    a padding position, or a real token described by ``describe(b, t)``; empty when every real
    token differs (a mistake of the whole loss, not of some tokens) or none does."""
    bad = ~torch.isclose(g, g_ref, rtol=1e-4, atol=1e-6)
    real = mask.bool()
    if (bad & ~real).any():
        b, t = (bad & ~real).nonzero()[0].tolist()
        return (
            f"; your loss has a gradient at row {b}, position {t}, which is padding (mask 0): padding "
            "must not count at all (multiply by the mask before summing)"
        )
    if not bad.any() or bad[real].all():
        return ""
    b, t = (bad & real).nonzero()[0].tolist()
    return f"; its gradient first goes wrong at row {b}, token {t}, where {describe(b, t)}"


def _per_token(value, name: str, shape: tuple) -> torch.Tensor:
    """``value`` as a ``[B, T]`` tensor of ``shape``; a transposed or per-answer result is named as such."""
    if isinstance(value, torch.Tensor) and tuple(value.shape) != tuple(shape):
        b, t = shape
        why = {(t, b): " - it is transposed", (b,): " - one number per answer, where PPO needs one per token"}
        raise CheckError(
            f"`{name}` returned shape {tuple(value.shape)}; expected {tuple(shape)}, [B, T] like the "
            f"log-probabilities{why.get(tuple(value.shape), '')}"
        )
    return expect_tensor(value, name)


# --- the reward model ---------------------------------------------------------------------
@continues_with("from utils.reward import bradley_terry_loss")
def check_bradley_terry_loss(fn, reward_model=None, tokenizer=None, pairs=None) -> None:
    """``fn(rewards_chosen[batch], rewards_rejected[batch]) -> scalar``: the mean of
    ``-log sigmoid(r_chosen - r_rejected)``; given a reward model and pairs, also compared with
    ``trl.RewardTrainer``'s loss on the same batch. Both rewards come from the reward model, so the
    gradient with respect to each is compared with the reference's too."""
    name = getattr(fn, "__name__", "bradley_terry_loss")
    cases = [
        (torch.tensor([1.0, -0.5, 2.0]), torch.tensor([0.0, 0.5, 2.5])),
        (torch.tensor([0.3]), torch.tensor([0.3])),  # equal rewards: log 2
        (torch.tensor([60.0, -80.0]), torch.tensor([-60.0, 80.0])),  # huge gaps: must stay finite
        # margins of +50 and -50 among ordinary ones and a tie, a batch of 5
        (torch.tensor([25.0, -30.0, 0.4, -1.3, 2.0]), torch.tensor([-25.0, 20.0, 0.9, -2.1, 2.0])),
    ]
    for i, (rc, rr) in enumerate(cases):
        rc_in, rr_in = _leaf(rc), _leaf(rr)
        got = _scalar(call_learner(fn, name, rc_in, rr_in), name)
        if not torch.isfinite(got):
            raise CheckError(
                f"`{name}` returned {got.item()} for reward gaps of {(rc - rr).tolist()}: use F.logsigmoid "
                "(or F.softplus), not torch.log(torch.sigmoid(...)), which underflows to log 0, nor "
                "torch.log(1 + torch.exp(...)), which overflows to inf"
            )
        got = got.float()
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
        rc_ref, rr_ref = _leaf(rc), _leaf(rr)
        want = -F.logsigmoid(rc_ref - rr_ref).mean()
        for x_in, x_ref, arg in ((rc_in, rc_ref, "rewards_chosen"), (rr_in, rr_ref, "rewards_rejected")):
            g, g_ref = _grad(got, x_in), _grad(want, x_ref)
            if _same_grad(g, g_ref):
                continue
            if not g.any():
                raise CheckError(
                    f"`{name}` gives the right loss on case {i}, but no gradient reaches `{arg}`: it was "
                    "detached (or turned into plain numbers). Both rewards come from the reward model, "
                    "which learns from each pair by raising one and lowering the other: keep both in the "
                    "graph"
                )
            raise CheckError(
                f"`{name}` gives the right loss on case {i}, but its gradient with respect to `{arg}` is "
                f"{[round(v, 5) for v in g.tolist()]} where -log sigmoid(r_chosen - r_rejected), averaged, "
                f"gives {[round(v, 5) for v in g_ref.tolist()]}: compute the loss with differentiable torch "
                "operations on both rewards, with no .detach(), .item() or hand-written gradient tricks"
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


def _junk_rollout():
    """One more batch like :func:`_rollout_cases`' (distinct sizes, a length-1 answer), but with what a
    real batch may hold at padding: junk in logprobs, ref_logprobs and values (mask 0 there)."""
    g = torch.Generator().manual_seed(8)
    b, t, lengths = 4, 7, [7, 1, 4, 2]
    mask = (torch.arange(t)[None, :] < torch.tensor(lengths)[:, None]).float()
    pad = 1 - mask
    scores = torch.randn(b, generator=g)
    lp = -torch.rand(b, t, generator=g) * 3 * mask + torch.randn(b, t, generator=g) * 4 * pad
    ref = -torch.rand(b, t, generator=g) * 3 * mask + torch.randn(b, t, generator=g) * 4 * pad
    values = torch.randn(b, t, generator=g) * mask + torch.randn(b, t, generator=g) * 3 * pad
    return scores, lp, ref, values, mask


@continues_with("from utils.ppo import per_token_rewards")
def check_per_token_rewards(fn) -> None:
    """``fn(scores[B], logprobs[B,T], ref_logprobs[B,T], mask[B,T], kl_coef) -> [B,T]``, 0 on padding
    whatever the log-probabilities hold there."""
    from ..ppo import per_token_rewards as reference

    name = getattr(fn, "__name__", "per_token_rewards")
    # the last batch holds junk at padding, where the KL term must be masked too
    batches = [*_rollout_cases(), _junk_rollout()]
    cases = [(i, c, kl) for i, c in enumerate(batches) for kl in ((0.1, 0.0) if i < 3 else (0.2,))]
    for i, (scores, lp, ref, _, mask), kl_coef in cases:
        got = _per_token(
            call_learner(fn, name, scores.clone(), lp.clone(), ref.clone(), mask.clone(), kl_coef),
            name,
            tuple(lp.shape),
        ).float()
        want = reference(scores, lp, ref, mask, kl_coef)
        if torch.allclose(got, want, atol=1e-5):
            continue
        rows, last, pad = torch.arange(len(scores)), mask.sum(1).long() - 1, 1 - mask
        kl = -kl_coef * (lp - ref)
        last_column = kl * mask
        last_column[:, -1] += scores
        overwritten = want.clone()
        overwritten[rows, last] = scores
        hint = "r_t = -kl_coef * (logprobs - ref_logprobs) on response tokens, plus the score on the last one"
        if torch.allclose(got, last_column, atol=1e-5):
            hint = (
                "the score went on the last *column*; a shorter response ends earlier - "
                "use mask.sum(1) - 1 for each row's last token"
            )
        elif (got * pad).abs().max() > 1e-6:
            hint = "padding positions (mask 0) must get reward 0"
            if kl_coef > 0 and torch.allclose(got * pad, kl * pad, atol=1e-5):
                hint += (
                    ", whatever logprobs and ref_logprobs hold there: the KL term is not masked "
                    "(multiply it by the mask)"
                )
        elif torch.allclose(got, reference(scores, ref, lp, mask, kl_coef), atol=1e-5):
            hint = "the KL term's sign is flipped: moving away from the reference must *cost* reward"
        elif kl_coef > 0 and torch.allclose(got, reference(scores, lp, ref, mask, 0.0), atol=1e-5):
            hint = "the KL penalty is missing"
        elif torch.allclose(got[:, 0], want[:, 0] + scores * (last > 0), atol=1e-5):
            hint = "the score goes on the *last* response token (the end token), not the first"
        elif torch.allclose(got[rows, last], kl[rows, last], atol=1e-5):
            hint = "the score is missing from the last response token"
        elif kl_coef > 0 and torch.allclose(got, overwritten, atol=1e-5):
            hint = "the last token lost its KL penalty: add the score to it (+=) instead of overwriting it"
        raise CheckError(
            f"`{name}` is wrong on case {i} (kl_coef={kl_coef}, response lengths "
            f"{mask.sum(1).long().tolist()}): {hint}\n got  {got.tolist()}\n want {want.tolist()}"
        )
    passed(
        f"`{name}`: KL penalty on every token, score on each response's last token, zero padding (3 batches)"
    )


def _gae_variant(rewards, values, mask, delta_gamma, factor):
    """GAE with ``delta_t = r_t + delta_gamma * V_{t+1} - V_t`` and ``A_t = delta_t + factor * A_{t+1}``:
    the right one has (gamma, gamma * lam); the others are mistakes."""
    rewards, values = rewards * mask, values * mask
    advantages, running = torch.zeros_like(rewards), torch.zeros_like(rewards[:, 0])
    for t in reversed(range(rewards.shape[1])):
        following = values[:, t + 1] if t + 1 < rewards.shape[1] else torch.zeros_like(running)
        running = (rewards[:, t] + delta_gamma * following - values[:, t] + factor * running) * mask[:, t]
        advantages[:, t] = running
    return advantages


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
        adv = _per_token(out[0], name + " advantages", tuple(rewards.shape)).float()
        ret = _per_token(out[1], name + " returns", tuple(rewards.shape)).float()
        want_adv, want_ret = reference(rewards, values, mask, gamma, lam)
        adv_ok = torch.allclose(adv, want_adv, atol=1e-5)
        if adv_ok and torch.allclose(ret, want_ret, atol=1e-5):
            continue
        if torch.allclose(adv, want_ret, atol=1e-5) and torch.allclose(ret, want_adv, atol=1e-5):
            raise CheckError(
                f"`{name}` returned (returns, advantages) on case {i}: both are right, but return them in "
                "the order (advantages, returns)"
            )
        if i == 0 and not adv_ok:
            raise CheckError(
                f"`{name}` gave advantages {adv.tolist()} for rewards (0, 1), values (0.5, 0.8), "
                "gamma = lam = 1; by hand: A_1 = 1 - 0.8 = 0.2 (nothing after the last token), "
                "A_0 = (0 + 0.8 - 0.5) + 0.2 = 0.5"
                + (
                    ": your advantages do not look ahead (add gamma * V_{t+1} and the discounted future "
                    "advantages)"
                    if torch.allclose(adv, (rewards - values) * mask, atol=1e-5)
                    else ""
                )
            )
        if adv_ok:
            hint = "returns are advantages + values (the value model's regression target), 0 on padding"
            if torch.allclose(ret, want_adv, atol=1e-5):
                hint = "those are the advantages; the returns add the values back"
            elif torch.allclose(ret, want_adv + values, atol=1e-5):
                hint = (
                    "the returns must be 0 on padding, where the value model's output is arbitrary: "
                    "multiply advantages + values by the mask"
                )
            elif torch.allclose(
                ret, reference(rewards, torch.zeros_like(values), mask, gamma, 1.0)[0], atol=1e-5
            ):
                hint = (
                    "those are the discounted rewards-to-go (Monte-Carlo returns), which equal "
                    "advantages + values only when lam = 1: the value model's target is A_t + V_t"
                )
            raise CheckError(f"`{name}`'s advantages are right but its returns are not on case {i}: {hint}")
        hint = ""
        if (adv * (1 - mask)).abs().max() > 1e-6:
            hint = "padding positions (mask 0) must get advantage 0"
        else:
            mistakes = [
                (
                    (1.0, 1.0),
                    "gamma and lam are ignored"
                    + (" (gamma is 1 here, so at least lam is)" if gamma == 1 else ""),
                ),
                (
                    (1.0, lam),
                    "gamma is ignored: it discounts V_{t+1} in delta_t and is part of the recursion's "
                    "gamma * lam",
                ),
                ((gamma, lam), "the recursion's factor is gamma * lam, not lam alone"),
                (
                    (gamma * lam, gamma * lam),
                    "delta_t = r_t + gamma * V_{t+1} - V_t discounts by gamma alone: lam only enters the "
                    "recursion",
                ),
                (
                    (lam, gamma * lam),
                    "gamma and lam are swapped: the arguments are (rewards, values, mask, gamma, lam)",
                ),
            ]
            hint = "; or ".join(  # two mistakes can give the same numbers: name each
                h
                for (delta_gamma, factor), h in mistakes
                if (delta_gamma, factor) != (gamma, gamma * lam)
                and torch.allclose(adv, _gae_variant(rewards, values, mask, delta_gamma, factor), atol=1e-5)
            )
        if not hint:
            masked = call_learner(fn, name, rewards.clone(), values * mask, mask.clone(), gamma, lam)[0]
            if torch.allclose(masked.float(), want_adv, atol=1e-5):
                hint = (
                    "the value after a response's last token must count as 0, but the value model's output "
                    "at the padding position leaked into the last token's delta (multiply values by the mask)"
                )
        if not hint:  # which step goes wrong first: with lam = 0 the advantages are the deltas
            deltas = call_learner(fn, name, rewards.clone(), values.clone(), mask.clone(), gamma, 0.0)
            deltas = deltas[0] if isinstance(deltas, tuple) else deltas
            if (
                isinstance(deltas, torch.Tensor)
                and deltas.shape == want_adv.shape
                and torch.allclose(deltas.float(), reference(rewards, values, mask, gamma, 0.0)[0], atol=1e-5)
            ):
                hint = (
                    "delta_t is right (with lam = 0 your advantages are correct), the recursion is not: "
                    "A_t = delta_t + gamma * lam * A_{t+1}, carried from each response's last token back "
                    "to its first"
                )
            else:
                hint = (
                    "the one-step errors are already wrong (with lam = 0, where A_t = delta_t): "
                    "delta_t = r_t + gamma * V_{t+1} - V_t, with V = 0 after each response's last token; "
                    "then A_t = delta_t + gamma * lam * A_{t+1}, computed from the end"
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


def _extreme_ratio_case():
    """(logprobs, old_logprobs, advantages, mask), 3 x 5, answers of 5, 1 and 3 tokens: ratios from
    0.05 to 20 with advantages of both signs - every side of the clip - a rare token whose
    log-probabilities are near -110, and junk (advantages, ratios) at padding."""
    mask = torch.tensor([[1.0] * 5, [1.0] + [0.0] * 4, [1.0] * 3 + [0.0] * 2])
    old = torch.tensor(
        [[-1.2, -0.4, -2.0, -0.9, -1.5], [-110.0, -0.5, -2.0, -1.0, -3.0], [-0.7, -1.1, -0.3, -1.7, -0.2]]
    )
    shift = torch.tensor(
        [[3.0, -3.0, 2.5, -2.0, 0.1], [-0.3, 1.0, -1.5, 0.7, 2.0], [0.05, -0.25, 0.3, -0.8, 1.2]]
    )
    adv = torch.tensor(
        [[1.5, 0.8, -1.2, -0.7, 0.5], [2.0, 3.0, -4.0, 5.0, -6.0], [-0.3, 1.0, -0.9, 4.0, -2.5]]
    )
    return old + shift, old, adv, mask


@continues_with("from utils.ppo import ppo_policy_loss")
def check_ppo_policy_loss(fn) -> None:
    """``fn(logprobs[B,T], old_logprobs[B,T], advantages[B,T], mask[B,T], clip) -> scalar``; its value and
    its gradient with respect to ``logprobs`` are compared with the reference's."""
    from ..ppo import masked_mean
    from ..ppo import ppo_policy_loss as reference

    name = getattr(fn, "__name__", "ppo_policy_loss")
    old, new, adv, mask = _ratio_cases()
    x_lp, x_old, x_adv, x_mask = _extreme_ratio_case()
    cases = [
        (lp, old, adv, mask, clip) for lp, clip in [(old.clone(), 0.2), (new, 0.2), (new, 0.1), (new, 10.0)]
    ]
    cases += [(x_lp, x_old, x_adv, x_mask, clip) for clip in (0.2, 0.5)]
    for i, (lp, old, adv, mask, clip) in enumerate(cases):
        lp_in = _leaf(lp)
        got = _scalar(call_learner(fn, name, lp_in, old.clone(), adv.clone(), mask.clone(), clip), name)
        if not torch.isfinite(got):
            why = (
                ", where one token's log-probabilities are near -110 (a rare token): compute the ratio as "
                "torch.exp(logprobs - old_logprobs) - torch.exp(logprobs) / torch.exp(old_logprobs) "
                "underflows to 0 / 0 there"
                if (old < -50).any()
                else ": the loss must be a finite number - look for a division by zero or a log of 0"
            )
            raise CheckError(f"`{name}` returned {got.item()} on case {i} (clip={clip}){why}")
        got = got.float()
        ratio = torch.exp(lp - old)
        losses = torch.maximum(-adv * ratio, -adv * ratio.clamp(1 - clip, 1 + clip))
        want = reference(lp, old, adv, mask, clip)
        lp_ref = _leaf(lp)
        g_ref = _grad(reference(lp_ref, old, adv, mask, clip), lp_ref)

        def token(b, t, ratio=ratio, adv=adv, clip=clip):
            r, a = ratio[b, t].item(), adv[b, t].item()
            where = f"the advantage is {a:+.2f} and the ratio {r:.3f}"
            if 1 - clip <= r <= 1 + clip:
                return (
                    f"{where} is inside [1 - clip, 1 + clip]: both terms are -A * ratio there, so the "
                    "token's gradient is that of -A * ratio (over the number of real tokens)"
                )
            if (r > 1 + clip) == (a > 0):
                return (
                    f"{where} is past the clip in the direction its advantage favours: the clipped term "
                    "is the larger loss and it is constant, so the token gets no gradient"
                )
            return (
                f"{where} is past the clip against its advantage: the unclipped term -A * ratio is the "
                "larger loss and keeps its full gradient (PPO does not clip a step that makes things worse)"
            )

        default = (
            "loss = masked mean of max(-A * ratio, -A * clamp(ratio, 1 - clip, 1 + clip)), "
            "ratio = exp(logp - old_logp)"
        )
        if got.requires_grad and not torch.allclose(got.detach(), want, atol=1e-5):
            default += _first_wrong_token(_grad(got, lp_in), g_ref, mask, token)
        _loss_verdict(
            got,
            want,
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
                    (losses * mask).mean(),
                    "padding is counted in the mean: divide by the number of real tokens (mask.sum())",
                ),
                (
                    losses.sum() / mask.sum(),
                    (
                        "the padding tokens' losses are summed in: multiply the losses by the mask before "
                        "summing (padding holds junk advantages and log-probabilities)"
                    ),
                ),
                (
                    ((losses * mask).sum(1) / mask.sum(1)).mean(),
                    (
                        "that is a mean per answer, then over answers: take one mean over all the real "
                        "tokens of the batch (masked_mean)"
                    ),
                ),
            ],
            default,
            " from `logprobs`: the policy needs a gradient",
        )
        g = _grad(got, lp_in)
        if _same_grad(g, g_ref):
            continue

        def grad_of(loss_fn):
            x = _leaf(lp)
            return _grad(loss_fn(x, torch.exp(x - old)), x)

        mistakes = [
            (
                torch.zeros_like(g_ref),
                "no gradient reaches `logprobs`: it was detached or turned into plain numbers",
            ),
            (-g_ref, "logprobs and old_logprobs are swapped: the ratio is exp(logprobs - old_logprobs)"),
            (
                grad_of(
                    lambda x, r: masked_mean(
                        torch.maximum(-adv * r, -adv * _straight_through(r, 1 - clip, 1 + clip)), mask
                    )
                ),
                (
                    "a token whose ratio is past the clip in its advantage's direction must get no gradient: "
                    "clamp the ratio itself (torch.clamp), so the clipped term is constant there, rather "
                    "than adding a detached correction"
                ),
            ),
            (
                grad_of(
                    lambda x, r: masked_mean(
                        torch.maximum(-adv * r, (-adv * r.clamp(1 - clip, 1 + clip)).detach()), mask
                    )
                ),
                (
                    "the clipped term is detached: where both terms are equal (ratio inside the clip range) "
                    "torch.maximum splits the gradient between them, so both must carry `logprobs`' gradient"
                ),
            ),
            (
                grad_of(
                    lambda x, r: masked_mean(
                        torch.maximum((-adv * r).detach(), -adv * r.clamp(1 - clip, 1 + clip)), mask
                    )
                ),
                "the unclipped term -A * ratio is detached: both terms must carry `logprobs`' gradient",
            ),
        ]
        _wrong_gradient(name, i, clip, g, g_ref, mask, token, mistakes, "logprobs", "the policy")
    passed(f"`{name}`: ratio 1 at the rollout, clipped both ways, pessimistic max, masked mean (4 cases)")


def _value_case():
    """(values, old_values, returns, mask), 3 x 5, answers of 2, 5 and 1 tokens: values that moved up
    and down, within and beyond the clip, with the clipped or the unclipped error the larger; errors
    above 1 (where a Huber loss is no longer quadratic); junk at padding."""
    g = torch.Generator().manual_seed(9)
    mask = torch.tensor([[1.0] * 2 + [0.0] * 3, [1.0] * 5, [1.0] + [0.0] * 4])
    old = torch.randn(3, 5, generator=g) * 1.5
    moved = torch.tensor(
        [[0.4, 0.1, 2.0, -3.0, 1.0], [-0.6, -0.55, 0.9, -0.05, 2.5], [-3.0, 4.0, -2.0, 1.5, 0.7]]
    )
    target = torch.tensor(
        [[1.5, -2.0, -4.0, 3.0, 0.5], [-2.5, 0.8, -1.2, 0.3, 0.0], [-0.5, -3.0, 2.5, 6.0, -1.0]]
    )
    return old + moved, old, old + target, mask


@continues_with("from utils.ppo import ppo_value_loss")
def check_ppo_value_loss(fn) -> None:
    """``fn(values[B,T], old_values[B,T], returns[B,T], mask[B,T], clip) -> scalar``; its value and its
    gradient with respect to ``values`` are compared with the reference's."""
    from ..ppo import masked_mean
    from ..ppo import ppo_value_loss as reference

    name = getattr(fn, "__name__", "ppo_value_loss")
    g = torch.Generator().manual_seed(5)
    mask = torch.tensor([[1.0, 1.0, 1.0, 0.0], [1.0, 0.0, 0.0, 0.0]])
    old = torch.randn(2, 4, generator=g)
    returns = old + torch.tensor([[0.5, -0.4, 0.1, 3.0], [-1.0, 0.0, 0.0, 0.0]])
    new = old + torch.tensor([[0.4, 0.3, -0.05, 2.0], [-0.6, 0.0, 0.0, 5.0]])
    x_v, x_old, x_ret, x_mask = _value_case()
    cases = [(v, old, returns, mask, clip) for v, clip in [(old.clone(), 0.2), (new, 0.2), (new, 1.0)]]
    cases += [(x_v, x_old, x_ret, x_mask, clip) for clip in (0.2, 0.5)]
    for i, (v, old, returns, mask, clip) in enumerate(cases):
        v_in = _leaf(v)
        got = _scalar(call_learner(fn, name, v_in, old.clone(), returns.clone(), mask.clone(), clip), name)
        got = got.float()
        err, err_clipped = (v - returns) ** 2, (old + (v - old).clamp(-clip, clip) - returns) ** 2
        want = reference(v, old, returns, mask, clip)
        v_ref = _leaf(v)
        g_ref = _grad(reference(v_ref, old, returns, mask, clip), v_ref)

        def token(b, t, v=v, old=old, clip=clip, err=err, err_clipped=err_clipped):
            d = (v - old)[b, t].item()
            where = f"the value moved {d:+.2f} from its old one"
            if abs(d) <= clip:
                return (
                    f"{where}, within the clip: both errors are equal, so the token's gradient is that of "
                    "0.5 * (V - R)^2 (over the number of real tokens)"
                )
            if err_clipped[b, t] > err[b, t]:
                return (
                    f"{where}, beyond the clip, and the clipped error is the larger: the loss is constant in "
                    "V there (the clamp holds V_clipped still), so the token gets no gradient"
                )
            return (
                f"{where}, beyond the clip, but the unclipped error (V - R)^2 is the larger: it keeps its "
                "full gradient"
            )

        default = (
            "loss = 0.5 * masked mean of max((V - R)^2, (V_clipped - R)^2), "
            "V_clipped = old_V + clamp(V - old_V, -clip, clip)"
        )
        if got.requires_grad and not torch.allclose(got.detach(), want, atol=1e-5):
            default += _first_wrong_token(_grad(got, v_in), g_ref, mask, token)
        v_clipped = old + (v - old).clamp(-clip, clip)
        _loss_verdict(
            got,
            want,
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
                (
                    masked_mean(
                        torch.maximum(
                            F.smooth_l1_loss(v, returns, reduction="none"),
                            F.smooth_l1_loss(v_clipped, returns, reduction="none"),
                        ),
                        mask,
                    ),
                    (
                        "that is a Huber (smooth L1) loss, which grows only linearly for errors above 1: "
                        "use 0.5 * the squared error"
                    ),
                ),
                (
                    0.5 * ((torch.maximum(err, err_clipped) * mask).sum(1) / mask.sum(1)).mean(),
                    (
                        "that is a mean per answer, then over answers: take one mean over all the real "
                        "tokens of the batch (masked_mean)"
                    ),
                ),
            ],
            default,
            " from `values`: the value model needs a gradient",
        )
        g = _grad(got, v_in)
        if _same_grad(g, g_ref):
            continue

        def grad_of(clipped_fn, detach_clipped=False, detach_unclipped=False):
            x = _leaf(v)
            e, ec = (x - returns) ** 2, (clipped_fn(x) - returns) ** 2
            e, ec = (e.detach() if detach_unclipped else e), (ec.detach() if detach_clipped else ec)
            return _grad(0.5 * masked_mean(torch.maximum(e, ec), mask), x)

        def clamped(x):
            return old + (x - old).clamp(-clip, clip)

        mistakes = [
            (
                torch.zeros_like(g_ref),
                (
                    "no gradient reaches `values`: check that `values` and `old_values` are not swapped (the "
                    "old ones are the rollout's constants) and that nothing is detached"
                ),
            ),
            (
                grad_of(lambda x: old + _straight_through(x - old, -clip, clip)),
                (
                    "where the clipped error is the larger the loss must be constant in V: clamp V - old_V "
                    "with torch.clamp rather than adding a detached correction"
                ),
            ),
            (
                grad_of(clamped, detach_clipped=True),
                (
                    "the clipped term is detached: where V is within clip of its old value both errors are "
                    "equal and torch.maximum splits the gradient between them, so both must carry `values`' "
                    "gradient"
                ),
            ),
            (
                grad_of(clamped, detach_unclipped=True),
                "the unclipped error (V - R)^2 is detached: both errors must carry `values`' gradient",
            ),
        ]
        _wrong_gradient(name, i, clip, g, g_ref, mask, token, mistakes, "values", "the value model")
    passed(
        f"`{name}`: squared error to the returns, clipped around the old values, pessimistic, "
        "masked (3 cases)"
    )
