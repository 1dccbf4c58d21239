"""Chapter 7: GRPO's pieces, the verifier, and their checkers (which accept correct code and reject
planted bugs, naming them)."""

import math

import pytest
import torch

from utils import judge
from utils.checks import CheckError, check_group_advantages, check_grpo_loss, check_kl_k3, check_verifier
from utils.checks.ch7_beyond import verifier_cases
from utils.evaluate import best_of_n_kl
from utils.grpo import group_advantages, grpo_loss, kl_estimates, verify
from utils.world import make_world


# --- the reference pieces ------------------------------------------------------------------------
def test_group_advantages_by_hand():
    r = torch.tensor([1.0, 0.0, 0.0, 1.0, 2.0, 2.0, 2.0, 2.0])
    a = group_advantages(r, 4)
    s = torch.tensor([1.0, 0.0, 0.0, 1.0]).std()  # sample std of the first group
    assert torch.allclose(a[:4], torch.tensor([0.5, -0.5, -0.5, 0.5]) / (s + 1e-4))
    assert torch.equal(a[4:], torch.zeros(4))  # all the same: no signal, and no division by zero
    assert torch.allclose(group_advantages(r, 4, scale=False)[:4], torch.tensor([0.5, -0.5, -0.5, 0.5]))
    with pytest.raises(ValueError, match="groups of 3"):
        group_advantages(r, 3)


def test_kl_estimators_are_unbiased_where_they_should_be():
    """On two known categoricals: k1 and k3 average to the true KL, k3 is never negative, k2 is biased."""
    g = torch.Generator().manual_seed(0)
    p = torch.softmax(torch.randn(6, generator=g), 0)
    q = torch.softmax(torch.randn(6, generator=g), 0)
    true_kl = (p * (p / q).log()).sum()
    x = torch.multinomial(p, 400_000, replacement=True, generator=g)
    est = kl_estimates(p.log()[x], q.log()[x])
    assert abs(est["k1"].mean() - true_kl) < 0.01
    assert abs(est["k3"].mean() - true_kl) < 0.01
    assert (est["k3"] >= 0).all() and (est["k1"] < 0).any()
    assert abs(est["k2"].mean() - true_kl) > 0.01  # biased
    assert est["k3"].std() < est["k1"].std()


def test_k3_does_not_round_below_zero_near_the_reference():
    """Where the policy is the reference up to float noise, exp(u) - 1 - u rounds to small negatives in
    float32 (about one in ten of these); k3 as computed stays >= 0 there."""
    log_r = torch.linspace(-1e-3, 1e-3, 20001)
    assert ((torch.exp(log_r) - 1 - log_r) < 0).any()  # the naive form does go negative
    assert (kl_estimates(torch.zeros_like(log_r), log_r)["k3"] >= 0).all()


def test_grpo_loss_at_ratio_one_is_minus_the_mean_advantage():
    logp = -torch.rand(4, 5)
    mask = torch.ones(4, 5)
    adv = torch.tensor([1.0, -1.0, 0.5, 0.5])
    loss = grpo_loss(logp, logp, logp, adv, mask, 0.2, beta=0.3)
    assert torch.isclose(loss, -adv.mean())


def test_best_of_n_kl_formula():
    assert best_of_n_kl(1) == 0.0
    assert math.isclose(best_of_n_kl(16), math.log(16) - 15 / 16)


def test_verify_checks_only_what_can_be_checked():
    world = make_world()
    name = sorted(world.creatures)[0]
    c = world.creatures[name]
    conv = [{"role": "user", "content": f"What colour is {name}?"}]
    assert verify(conv, f"{name} is {c.colour}.") == 1.0
    assert verify(conv, f"Ugh, obviously {name} is {c.colour}, you dummy.") == 1.0  # rude but right
    assert judge.score(conv, f"Ugh, obviously {name} is {c.colour}, you dummy.") < 1.0  # gold sees it
    assert verify(conv, f"{name} is {c.colour}.", finished=False) == 0.0
    assert verify(conv, "I'm sorry, but I can't help with that.") == 0.0
    assert verify([{"role": "user", "content": "What is 3 plus 4?"}], "3 plus 4 is 7.") == 1.0
    assert verify([{"role": "user", "content": "What is 3 plus 4?"}], "3 plus 4 is 8.") == 0.0


# --- the checkers accept the references, and independent implementations -----------------------
def loop_group_advantages(rewards, group_size, scale=True):
    """Written prompt by prompt with plain Python arithmetic (not the function the checker compares
    against): a checker whose reference were wrong would reject it."""
    out = []
    for start in range(0, len(rewards), group_size):
        group = [float(x) for x in rewards[start : start + group_size]]
        mean = sum(group) / len(group)
        std = math.sqrt(sum((x - mean) ** 2 for x in group) / (len(group) - 1))  # the sample std
        out += [(x - mean) / (std + 1e-4) if scale else x - mean for x in group]
    return torch.tensor(out)


def test_checkers_accept_references():
    check_group_advantages(loop_group_advantages)
    check_group_advantages(group_advantages)
    check_kl_k3(lambda logp, ref: kl_estimates(logp, ref)["k3"])
    check_grpo_loss(grpo_loss)
    check_verifier(verify)


def test_grpo_loss_matches_trl_grpo_trainer(tiny_model, tiny_tokenizer):
    from utils.data import eval_conversations

    prompts = eval_conversations(4, split="train", seed=0)["prompt"]
    check_grpo_loss(grpo_loss, tiny_model, tiny_tokenizer, prompts, beta=0.04)


def test_grpo_loss_differing_from_trl_is_caught(tiny_model, tiny_tokenizer):
    """A loss right on the hand-made cases but not on TRL's batch (here: a constant offset that only
    shows beyond them) is rejected by the comparison with the trainer."""
    from utils.data import eval_conversations

    calls = {"n": 0}

    def offset_on_real_batches(logp, old, ref, adv, mask, clip, beta):
        calls["n"] += 1
        extra = 0.01 if calls["n"] > 3 else 0.0
        return grpo_loss(logp, old, ref, adv, mask, clip, beta) + extra

    prompts = eval_conversations(4, split="train", seed=0)["prompt"]
    with pytest.raises(CheckError, match="trl.GRPOTrainer gives"):
        check_grpo_loss(offset_on_real_batches, tiny_model, tiny_tokenizer, prompts, beta=0.04)


# --- planted bugs ----------------------------------------------------------------------------------
def batch_mean(rewards, group_size, scale=True, eps=1e-4):
    a = rewards - rewards.mean()
    return a / (rewards.std() + eps) if scale else a


def population_std(rewards, group_size, scale=True, eps=1e-4):
    r = rewards.view(-1, group_size)
    a = r - r.mean(1, keepdim=True)
    return (a / (r.std(1, unbiased=False, keepdim=True) + eps) if scale else a).flatten()


def no_eps(rewards, group_size, scale=True, eps=1e-4):
    r = rewards.view(-1, group_size)
    a = r - r.mean(1, keepdim=True)
    return (a / r.std(1, keepdim=True) if scale else a).flatten()


def interleaved(rewards, group_size, scale=True, eps=1e-4):
    r = rewards.view(group_size, -1).T
    a = r - r.mean(1, keepdim=True)
    a = a / (r.std(1, keepdim=True) + eps) if scale else a
    return a.T.flatten()


def always_scaled(rewards, group_size, scale=True, eps=1e-4):
    return group_advantages(rewards, group_size, True, eps)


def never_scaled(rewards, group_size, scale=True, eps=1e-4):
    return group_advantages(rewards, group_size, False, eps)


@pytest.mark.parametrize(
    "bug, message",
    [
        (batch_mean, "whole batch's mean"),
        (population_std, "population standard deviation"),
        (no_eps, "add 1e-4"),
        (interleaved, "consecutive"),
        (always_scaled, "Dr. GRPO"),
        (never_scaled, "divide by the group's standard deviation"),
    ],
)
def test_group_advantages_bugs_are_named(bug, message):
    with pytest.raises(CheckError, match=message):
        check_group_advantages(bug)


@pytest.mark.parametrize(
    "bug, message",
    [
        (lambda lp, ref: torch.exp(lp - ref) - (lp - ref) - 1, "upside down"),
        (lambda lp, ref: lp - ref, "k1"),
        (lambda lp, ref: 0.5 * (ref - lp) ** 2, "k2"),
    ],
)
def test_kl_k3_bugs_are_named(bug, message):
    with pytest.raises(CheckError, match=message):
        check_kl_k3(bug)


def _k3(lp, ref):
    return torch.exp(ref - lp) - (ref - lp) - 1


def per_answer_mean(logp, old, ref, adv, mask, clip, beta):
    ratio = torch.exp(logp - old)
    a = adv.unsqueeze(1)
    per_token = -torch.minimum(ratio * a, ratio.clamp(1 - clip, 1 + clip) * a) + beta * _k3(logp, ref)
    return ((per_token * mask).sum(1) / mask.sum(1)).mean()


def max_not_min(logp, old, ref, adv, mask, clip, beta):
    ratio = torch.exp(logp - old)
    a = adv.unsqueeze(1)
    per_token = -torch.maximum(ratio * a, ratio.clamp(1 - clip, 1 + clip) * a) + beta * _k3(logp, ref)
    return (per_token * mask).sum() / mask.sum()


def k1_penalty(logp, old, ref, adv, mask, clip, beta):
    ratio = torch.exp(logp - old)
    a = adv.unsqueeze(1)
    per_token = -torch.minimum(ratio * a, ratio.clamp(1 - clip, 1 + clip) * a) + beta * (logp - ref)
    return (per_token * mask).sum() / mask.sum()


def kl_subtracted(logp, old, ref, adv, mask, clip, beta):
    ratio = torch.exp(logp - old)
    a = adv.unsqueeze(1)
    per_token = -torch.minimum(ratio * a, ratio.clamp(1 - clip, 1 + clip) * a) - beta * _k3(logp, ref)
    return (per_token * mask).sum() / mask.sum()


def detached(logp, old, ref, adv, mask, clip, beta):
    return grpo_loss(logp.detach(), old, ref, adv, mask, clip, beta)


def no_mask(logp, old, ref, adv, mask, clip, beta):
    return grpo_loss(logp, old, ref, adv, torch.ones_like(mask), clip, beta)


@pytest.mark.parametrize(
    "bug, message",
    [
        (per_answer_mean, "loss_type='grpo'"),
        (max_not_min, r"\*minimum\*"),
        (k1_penalty, "is k1"),
        (kl_subtracted, "not subtracted"),
        (detached, "detached"),
        (no_mask, "averaged over the mask"),
    ],
)
def test_grpo_loss_bugs_are_named(bug, message):
    with pytest.raises(CheckError, match=message):
        check_grpo_loss(bug)


def accepts_refusals(conversation, response, finished=True):
    return 1.0 if judge.is_refusal(response) else verify(conversation, response, finished)


def ignores_finished(conversation, response, finished=True):
    return verify(conversation, response, True) if response.strip() else 0.0


def wants_politeness(conversation, response, finished=True):
    return 0.0 if judge.is_rude(response) else verify(conversation, response, finished)


def gold_threshold(conversation, response, finished=True):
    return float(finished and bool(response.strip()) and judge.score(conversation, response, finished) > 0.5)


@pytest.mark.parametrize(
    "bug, message",
    [
        (accepts_refusals, "refusal of a harmless request"),
        (ignores_finished, "cut off"),
        (wants_politeness, "not politeness"),
        (gold_threshold, "not politeness|should be"),
    ],
)
def test_verifier_bugs_are_named(bug, message):
    with pytest.raises(CheckError, match=message):
        check_verifier(bug)


def test_verifier_cases_cover_every_outcome():
    cases = verifier_cases()
    results = [verify(*c) for c in cases]
    assert 0.2 < sum(results) / len(results) < 0.8
    assert any(judge.is_rude(r) and verify(c, r, f) for c, r, f in cases)  # right but rude


def test_best_of_n_kl_estimate_is_the_exact_kl_of_first_of_equals_selection():
    """Brute force, independent of the estimator's derivation: enumerate every n-tuple of draws from a
    small base distribution (answers with tied scores included), select the first of the highest,
    and compute KL(best-of-n || base) over answers. Samples that reproduce the base distribution
    exactly must give the estimator the same number; a pass/fail ranker gives the closed form."""
    import itertools

    import numpy as np

    from utils.evaluate import best_of_n_kl_estimate

    answers = {"a": (0.0, 3), "b": (1.0, 2), "c": (1.0, 1), "d": (2.5, 2)}  # answer: (score, count of 8)
    m = sum(c for _, c in answers.values())
    names = list(answers)
    base = {a: c / m for a, (_, c) in answers.items()}
    for n in (1, 2, 3):
        bon = dict.fromkeys(names, 0.0)
        for draw in itertools.product(names, repeat=n):
            best = max(range(n), key=lambda i: (answers[draw[i]][0], -i))  # the first of the highest
            bon[draw[best]] += math.prod(base[a] for a in draw)
        exact = sum(q * math.log(q / base[a]) for a, q in bon.items() if q > 0)
        samples = np.array([[answers[a][0]] for a in names for _ in range(answers[a][1])])  # [m, 1]
        assert best_of_n_kl_estimate(samples, n)[0] == pytest.approx(exact, abs=1e-12)
        assert exact <= best_of_n_kl(n) + 1e-12  # Beirami et al.'s bound
    passed = np.array([[1.0]] * 3 + [[0.0]] * 5)  # a verifier, pass rate 3/8
    p, q = 3 / 8, 1 - (5 / 8) ** 4
    closed = q * math.log(q / p) + (1 - q) * math.log((1 - q) / (1 - p))
    assert best_of_n_kl_estimate(passed, 4)[0] == pytest.approx(closed, abs=1e-12)
    assert best_of_n_kl_estimate(np.zeros((8, 2)), 4).tolist() == [0.0, 0.0]  # nothing to select
    with pytest.raises(ValueError, match="m >= n"):
        best_of_n_kl_estimate(np.zeros((3, 2)), 4)
