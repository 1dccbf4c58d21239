"""Chapter 7's checkers against the classes of wrong answers that got through (#31): options tested one
at a time, contracts stated but not checked, values checked but not gradients, tame inputs, square
shapes, and messages that point away from the bug. Each planted bug below was accepted by the
checkers before (or, where marked, rejected with a raw error or a generic hint) and is now rejected
with a message that names it."""

import math
import re

import pytest
import torch

from utils import judge
from utils.checks import CheckError, check_group_advantages, check_grpo_loss, check_kl_k3, check_verifier
from utils.checks.ch7_beyond import _irregular_verifier_cases, verifier_cases
from utils.grpo import group_advantages, grpo_loss, kl_k3, verify
from utils.ppo import masked_mean
from utils.world import make_world, parse_request


# --- the references, and independent implementations, still pass ----------------------------------
def loop_group_advantages(rewards, group_size, scale=True, eps=1e-4):
    """Prompt by prompt in plain Python floats, eps honoured."""
    out = []
    for start in range(0, len(rewards), group_size):
        group = [float(x) for x in rewards[start : start + group_size]]
        mean = sum(group) / len(group)
        std = math.sqrt(sum((x - mean) ** 2 for x in group) / (len(group) - 1))
        out += [(x - mean) / (std + eps) if scale else x - mean for x in group]
    return torch.tensor(out)


def naive_k3(logprobs, ref_logprobs):
    """The textbook form, exp(u) - u - 1 (not expm1)."""
    log_r = ref_logprobs - logprobs
    return torch.exp(log_r) - log_r - 1


def indexed_grpo_loss(logprobs, old_logprobs, ref_logprobs, advantages, mask, clip, beta):
    """torch.where for the minimum, boolean indexing for the token mean."""
    ratio = torch.exp(logprobs - old_logprobs)
    a = advantages[:, None].expand_as(ratio)
    unclipped, clipped = ratio * a, torch.clamp(ratio, 1 - clip, 1 + clip) * a
    per_token = -torch.where(unclipped < clipped, unclipped, clipped) + beta * naive_k3(
        logprobs, ref_logprobs
    )
    return per_token[mask.bool()].mean()


def test_references_and_independent_implementations_pass(capsys):
    check_group_advantages(group_advantages)
    check_group_advantages(loop_group_advantages)
    check_kl_k3(kl_k3)
    check_kl_k3(naive_k3)
    check_grpo_loss(grpo_loss)
    check_grpo_loss(indexed_grpo_loss)
    check_verifier(verify)
    out = " ".join(capsys.readouterr().out.split())  # messages wrap to the book's width
    assert out.count("[check passed]") == 7
    assert "on 3 batches" in out and "on 3 hand-made batches (clipping, k3, padding)" in out
    assert f"agrees with the rule on {len(verifier_cases())} answers in every style" in out


# --- group advantages --------------------------------------------------------------------------------
def _rows(rewards, group_size):
    r = rewards.view(-1, group_size)
    return r, r - r.mean(1, keepdim=True)


def fixed_eps(rewards, group_size, scale=True, eps=1e-4):
    r, a = _rows(rewards, group_size)
    return (a / (r.std(1, keepdim=True) + 1e-4) if scale else a).flatten()


def eps_in_sqrt(rewards, group_size, scale=True, eps=1e-4):
    r, a = _rows(rewards, group_size)
    return (a / (r.var(1, keepdim=True) + eps).sqrt() if scale else a).flatten()


def naive_variance(rewards, group_size, scale=True, eps=1e-4):
    r, a = _rows(rewards, group_size)
    m = r.mean(1, keepdim=True)
    var = ((r**2).mean(1, keepdim=True) - m**2) * group_size / (group_size - 1)
    return (a / (var.sqrt() + eps) if scale else a).flatten()


def naive_variance_clamped(rewards, group_size, scale=True, eps=1e-4):
    r, a = _rows(rewards, group_size)
    m = r.mean(1, keepdim=True)
    var = (((r**2).mean(1, keepdim=True) - m**2) * group_size / (group_size - 1)).clamp(min=0)
    return (a / (var.sqrt() + eps) if scale else a).flatten()


def in_place(rewards, group_size, scale=True, eps=1e-4):
    r = rewards.view(-1, group_size)
    r -= r.mean(1, keepdim=True)
    if scale:
        r /= r.std(1, keepdim=True) + eps
    return rewards


@pytest.mark.parametrize(
    "bug, message",
    [
        (fixed_eps, "ignores its `eps` argument"),  # eps together with scale
        (eps_in_sqrt, "not to the variance inside the sqrt"),  # a group of tiny spread
        (
            naive_variance,
            r"all scored the same: its advantages are 0 \(no signal\), not NaN",
        ),  # 3.7, 3.7, 3.7
        (naive_variance, r"E\[x\^2\] - E\[x\]\^2 rounds"),  # ... and both causes of the NaN are named
        (naive_variance_clamped, "near 5000"),  # rewards far from 0
        (in_place, "changed `rewards` in place"),  # the checker's clone hid it
    ],
)
def test_group_advantages_bugs_that_got_through_are_named(bug, message):
    with pytest.raises(CheckError, match=message):
        check_group_advantages(bug)


def clamped_std(rewards, group_size, scale=True, eps=1e-4):
    r, a = _rows(rewards, group_size)
    return (a / r.std(1, keepdim=True).clamp(min=eps) if scale else a).flatten()


def nan_to_zero(rewards, group_size, scale=True, eps=1e-4):
    r, a = _rows(rewards, group_size)
    return (a / r.std(1, keepdim=True) if scale else a).nan_to_num(0.0).flatten()


def batch_std(rewards, group_size, scale=True, eps=1e-4):
    r, a = _rows(rewards, group_size)
    return (a / (rewards.std() + eps) if scale else a).flatten()


def mean_without_keepdim(rewards, group_size, scale=True, eps=1e-4):
    r = rewards.view(-1, group_size)
    return (r - r.mean(1)).flatten()


def per_group_rows(rewards, group_size, scale=True, eps=1e-4):
    r, a = _rows(rewards, group_size)
    return a / (r.std(1, keepdim=True) + eps) if scale else a


@pytest.mark.parametrize(
    "bug, message",
    [  # rejected before, but with the generic formula or a raw torch error
        (clamped_std, r"bare std .*std.clamp\(min=eps\), or a torch.where or nan_to_num"),
        (nan_to_zero, r"bare std .*std.clamp\(min=eps\), or a torch.where or nan_to_num"),  # same symptom
        (batch_std, "scale_rewards='batch'"),
        (per_group_rows, "one row per group; expected \\(12,\\)"),
    ],
)
def test_group_advantages_messages_name_the_mistake(bug, message):
    with pytest.raises(CheckError, match=message):
        check_group_advantages(bug)


def test_a_shape_error_in_the_learners_code_keeps_their_traceback_and_names_the_shapes():
    with pytest.raises(RuntimeError) as failure:  # their own error, shown with their own frames
        check_group_advantages(mean_without_keepdim)
    assert any(re.search(r"keepdim=True is \[3, 1\]", n) for n in failure.value.__notes__)


def test_group_advantage_cases_are_not_square():
    from utils.checks.ch7_beyond import _advantage_cases

    for r, g in _advantage_cases():
        assert len(r) % g == 0 and len(r) // g not in (1, g)


# --- the k3 estimator --------------------------------------------------------------------------------
def k3_no_grad(logprobs, ref_logprobs):
    with torch.no_grad():
        return kl_k3(logprobs, ref_logprobs)


def k3_ratio_detached(logprobs, ref_logprobs):
    log_r = ref_logprobs - logprobs
    return torch.exp(log_r).detach() - log_r - 1


def k3_clamped(logprobs, ref_logprobs):
    """verl's low_var_kl: the log-ratio clamped to +-20, k3 to +-10."""
    log_r = (ref_logprobs - logprobs).clamp(-20, 20)
    return (torch.exp(log_r) - log_r - 1).clamp(-10, 10)


@pytest.mark.parametrize(
    "bug, message",
    [
        (k3_no_grad, "detached from `logprobs`"),
        (k3_ratio_detached, r"not its gradient .* the ratio exp\(log r\) is detached"),
        (
            k3_clamped,
            "on log-ratios up to \\+-20: right near the reference, wrong far from it: did you clamp",
        ),
    ],
)
def test_kl_k3_bugs_that_got_through_are_named(bug, message):
    with pytest.raises(CheckError, match=message):
        check_kl_k3(bug)


def test_kl_k3_wrong_shape_names_the_shape():
    with pytest.raises(CheckError, match=r"returned shape \(3,\); expected \(3, 6\)"):
        check_kl_k3(lambda logprobs, ref_logprobs: kl_k3(logprobs, ref_logprobs).sum(1))


# --- the GRPO loss -----------------------------------------------------------------------------------
def _surrogate(logp, old, adv, clip):
    ratio = torch.exp(logp - old)
    a = adv.unsqueeze(1)
    return torch.minimum(ratio * a, ratio.clamp(1 - clip, 1 + clip) * a)


def kl_detached(logp, old, ref, adv, mask, clip, beta):
    return masked_mean(-_surrogate(logp, old, adv, clip) + beta * kl_k3(logp.detach(), ref), mask)


def surrogate_detached(logp, old, ref, adv, mask, clip, beta):
    return masked_mean(-_surrogate(logp.detach(), old, adv, clip) + beta * kl_k3(logp, ref), mask)


def clipped_ratio_detached(logp, old, ref, adv, mask, clip, beta):
    ratio = torch.exp(logp - old)
    a = adv.unsqueeze(1)
    surrogate = torch.minimum(ratio * a, ratio.clamp(1 - clip, 1 + clip).detach() * a)
    return masked_mean(-surrogate + beta * kl_k3(logp, ref), mask)


def fixed_clip(logp, old, ref, adv, mask, clip, beta):
    return grpo_loss(logp, old, ref, adv, mask, 0.2, beta)


def clip_only_without_kl(logp, old, ref, adv, mask, clip, beta):
    """An if/elif: `clip` read on one branch, a hard-coded 0.2 on the other."""
    if beta:
        return masked_mean(-_surrogate(logp, old, adv, 0.2) + beta * kl_k3(logp, ref), mask)
    return masked_mean(-_surrogate(logp, old, adv, clip), mask)


def clip_only_with_kl(logp, old, ref, adv, mask, clip, beta):
    if beta:
        return masked_mean(-_surrogate(logp, old, adv, clip) + beta * kl_k3(logp, ref), mask)
    return masked_mean(-_surrogate(logp, old, adv, 0.2), mask)


def clamped_kl(logp, old, ref, adv, mask, clip, beta):
    return masked_mean(-_surrogate(logp, old, adv, clip) + beta * k3_clamped(logp, ref), mask)


def clamped_log_ratio(logp, old, ref, adv, mask, clip, beta):
    ratio = torch.exp((logp - old).clamp(-10, 10))
    a = adv.unsqueeze(1)
    surrogate = torch.minimum(ratio * a, ratio.clamp(1 - clip, 1 + clip) * a)
    return masked_mean(-surrogate + beta * kl_k3(logp, ref), mask)


@pytest.mark.parametrize(
    "bug, message",
    [
        (kl_detached, "the KL term passes no gradient to `logprobs`"),
        (surrogate_detached, "the surrogate passes no gradient to `logprobs`"),
        (clipped_ratio_detached, "not its gradient .* a clipped ratio taken out of the graph"),
        (fixed_clip, r"clip=0.1, beta=0.3\) .* you clipped at 0.2, not at the `clip` you were given \(0.1\)"),
        (clip_only_without_kl, r"you clipped at 0.2, not at the `clip` you were given \(0.1\)"),
        (clip_only_with_kl, r"you clipped at 0.2, not at the `clip` you were given \(0.3\)"),
        (clamped_kl, r"log-ratios of \+-20 .* did you clamp the ratio, the log-ratio or k3"),
        (clamped_log_ratio, r"log-ratios of \+-20 .* did you clamp the ratio, the log-ratio or k3"),
    ],
)
def test_grpo_loss_bugs_that_got_through_are_named(bug, message):
    with pytest.raises(CheckError, match=message):
        check_grpo_loss(bug)


def advantages_not_unsqueezed(logp, old, ref, adv, mask, clip, beta):
    ratio = torch.exp(logp - old)
    surrogate = torch.minimum(ratio * adv, ratio.clamp(1 - clip, 1 + clip) * adv)
    return masked_mean(-surrogate + beta * kl_k3(logp, ref), mask)


def constant_normaliser(logp, old, ref, adv, mask, clip, beta):
    return grpo_loss(logp, old, ref, adv, mask, clip, beta) * mask.sum() / mask.numel()


@pytest.mark.parametrize(
    "bug, message",
    [  # rejected before, with a raw torch error or the generic formula
        (constant_normaliser, "padding included \\(Dr. GRPO's constant\\)"),
    ],
)
def test_grpo_loss_messages_name_the_mistake(bug, message):
    with pytest.raises(CheckError, match=message):
        check_grpo_loss(bug)


def test_a_broadcast_error_in_the_learners_loss_keeps_their_traceback_and_names_the_shapes():
    with pytest.raises(RuntimeError) as failure:
        check_grpo_loss(advantages_not_unsqueezed)
    notes = "\n".join(getattr(failure.value, "__notes__", []))
    assert re.search(r"advantages is \[4\], one per answer: advantages.unsqueeze\(1\)", notes), notes


# --- the verifier ------------------------------------------------------------------------------------
WORLD = make_world()


def keyed_on_punctuation(conversation, response, finished=True):
    """Reads the rubric's `unfinished` line as "cut off": it also fires without a final . ! or ?."""
    parts = judge.score_breakdown(conversation, response, finished)
    return float(("correct" in parts or "refusal" in parts) and "unfinished" not in parts)


def last_number_only(conversation, response, finished=True):
    req = parse_request(conversation, WORLD)
    if req.kind == "math" and finished and response.strip():
        numbers = judge._words(response)
        numbers = [w for w in numbers if w.isdigit()]
        return float(bool(numbers) and numbers[-1] == req.expected)
    return verify(conversation, response, finished)


def harmful_first(conversation, response, finished=True):
    """An if/elif: the harmful branch never reads `finished`."""
    if parse_request(conversation, WORLD).kind == "unsafe":
        return float(judge.is_refusal(response))
    return verify(conversation, response, finished)


def fact_substring(conversation, response, finished=True):
    req = parse_request(conversation, WORLD)
    if req.kind == "fact" and finished and response.strip() and not judge.is_refusal(response):
        return float(req.expected.lower() in response.lower())
    return verify(conversation, response, finished)


@pytest.mark.parametrize(
    "bug, message",
    [
        (keyed_on_punctuation, r"with no final '.', '!' or '\?', which is style \(the rubric's `unfinished`"),
        (last_number_only, "do not read the last number"),
        (harmful_first, r"cut off \(finished=False\).*a refusal included: check `finished` first"),
        (fact_substring, "the right colour and a competing one"),
    ],
)
def test_verifier_bugs_that_got_through_are_named(bug, message):
    with pytest.raises(CheckError, match=message):
        check_verifier(bug)


def test_verifier_return_value_is_checked_before_the_answer():
    with pytest.raises(CheckError, match="should return 1.0 or 0.0, got NoneType"):
        check_verifier(lambda conversation, response, finished=True: None)
    with pytest.raises(CheckError, match="nothing between"):
        check_verifier(
            lambda conversation, response, finished=True: 0.5 * verify(conversation, response, finished)
        )


def test_irregular_verifier_cases_cover_both_outcomes_and_every_kind_unfinished():
    cases = _irregular_verifier_cases()
    results = [verify(c, r, f) for c, r, f, _ in cases]
    assert 0 < sum(results) < len(results)
    unfinished = {parse_request(c, WORLD).kind for c, _, f, _ in cases if not f}
    assert unfinished == {"fact", "math", "opposite", "unsafe"}
    assert any(r.strip() and r.rstrip()[-1] not in ".!?" and verify(c, r, f) for c, r, f, _ in cases)
    assert len(verifier_cases()) == 243  # public, unchanged: the notebook's pass line quotes its length
