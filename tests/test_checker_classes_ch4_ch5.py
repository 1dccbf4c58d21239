"""Chapters 4 and 5's checkers against the classes of wrong answers of issue #31: options that must
hold together (beta with the reference terms, lambda with both ORPO terms), stated contracts (-100
ignored, token id 0 a token, sum vs mean, the prompt and labels[:, 0] never counted), gradients as
well as values, extreme inputs (probabilities near 1, log-probabilities near -150, margins past
log(sigmoid)'s underflow), distinct sizes in every dimension, and messages that name the mistake.

Every planted bug below passed the checkers before these checks (or, where marked, was rejected
with a message that did not name it); each is rejected now, with the message fragment given."""

import pytest
import torch
import torch.nn.functional as F

from utils.checks import (
    CheckError,
    check_average_logprobs,
    check_dpo_loss,
    check_log_odds,
    check_orpo_loss,
    check_sequence_logprobs,
)
from utils.checks.ch4_dpo import _logprob_cases
from utils.dpo import dpo_loss
from utils.logprobs import average_logprobs, sequence_logprobs
from utils.orpo import log_odds, orpo_loss


# --- correct answers, the notebooks' solutions among them ----------------------------------------
def notebook_sequence_logprobs(logits, labels):  # solutions/04_dpo.ipynb, Exercise 1
    logits, labels = logits[:, :-1].float(), labels[:, 1:]
    mask = labels != -100
    token_logps = torch.gather(logits.log_softmax(-1), 2, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    return (token_logps * mask).sum(-1)


def notebook_average_logprobs(logits, labels):  # solutions/05_orpo.ipynb, Exercise 1
    logits, labels = logits[:, :-1].float(), labels[:, 1:]
    mask = labels != -100
    token_logps = torch.gather(logits.log_softmax(-1), 2, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    return (token_logps * mask).sum(-1) / mask.sum(-1)


def cross_entropy_logprobs(logits, labels):  # another correct way: cross-entropy skips -100 itself
    return -F.cross_entropy(logits[:, :-1].transpose(1, 2), labels[:, 1:], reduction="none").sum(-1)


def where_logsumexp_average(logits, labels):  # and another: gather from the raw logits, torch.where
    shifted = labels[:, 1:]
    mask = shifted != -100
    picked = logits[:, :-1].gather(2, shifted.masked_fill(~mask, 0).unsqueeze(-1)).squeeze(-1)
    token_logps = torch.where(mask, picked - logits[:, :-1].logsumexp(-1), 0.0)
    return token_logps.sum(-1) / mask.sum(-1).clamp(min=1)


def notebook_log_odds(avg_logp):  # solutions/05_orpo.ipynb, Exercise 2
    return avg_logp - torch.log(-torch.expm1(avg_logp))


def notebook_dpo_loss(policy_chosen, policy_rejected, ref_chosen, ref_rejected, beta):
    chosen_logratio = policy_chosen - ref_chosen
    rejected_logratio = policy_rejected - ref_rejected
    return -F.logsigmoid(beta * (chosen_logratio - rejected_logratio)).mean()


def detached_reference_dpo_loss(pc, pr, rc, rr, beta):  # the frozen reference as constants: fine
    return F.softplus(-beta * ((pc - rc.detach()) - (pr - rr.detach()))).mean()


def notebook_orpo_loss(nll_chosen, chosen_avg_logp, rejected_avg_logp, lam):
    ratio = notebook_log_odds(chosen_avg_logp) - notebook_log_odds(rejected_avg_logp)
    return nll_chosen - lam * F.logsigmoid(ratio).mean(), ratio.detach().mean()


@pytest.mark.parametrize(
    "check, fn",
    [
        (check_sequence_logprobs, sequence_logprobs),
        (check_sequence_logprobs, notebook_sequence_logprobs),
        (check_sequence_logprobs, cross_entropy_logprobs),
        (check_average_logprobs, average_logprobs),
        (check_average_logprobs, notebook_average_logprobs),
        (check_average_logprobs, where_logsumexp_average),
        (check_log_odds, log_odds),
        (check_log_odds, notebook_log_odds),
        (check_dpo_loss, dpo_loss),
        (check_dpo_loss, notebook_dpo_loss),
        (check_dpo_loss, detached_reference_dpo_loss),
        (check_orpo_loss, orpo_loss),
        (check_orpo_loss, notebook_orpo_loss),
        (
            check_orpo_loss,
            lambda nll, c, r, lam: (orpo_loss(nll, c, r, lam)[0], (log_odds(c) - log_odds(r)).mean()),
        ),
    ],
)
def test_the_reference_and_other_correct_answers_pass(check, fn, capsys):
    check(fn)
    assert "[check passed]" in capsys.readouterr().out


def test_the_logprob_batches_have_distinct_sizes_and_the_contracts_in_them():
    cases = _logprob_cases()
    assert all(len(set(logits.shape)) == 3 for _, logits, _ in cases)  # no transpose can line up
    labels = [lab for _, _, lab in cases]
    assert any((lab[:, 0] != -100).any() for lab in labels)  # labels[:, 0] labelled somewhere
    assert any((lab[:, 1:] == 0).any() for lab in labels)  # token id 0 labelled
    assert any(lab.size(0) == 1 for lab in labels)  # a group of one row
    assert any((lab[:, -1] == -100).any() and (lab[:, -1] != -100).any() for lab in labels)


# --- sequence_logprobs (Chapter 4) and average_logprobs (Chapter 5) ----------------------------
def _finish(token_logps, mask, average):
    total = (token_logps * mask).sum(-1)
    return total / mask.sum(-1) if average else total


def gathers_at_minus_100(average):
    def no_clamp(logits, labels):
        lp = torch.gather(logits[:, :-1].log_softmax(-1), 2, labels[:, 1:].unsqueeze(-1)).squeeze(-1)
        return _finish(lp, labels[:, 1:] != -100, average)

    return no_clamp


def log_of_softmax(average):
    def log_softmax_by_hand(logits, labels):
        probs = logits[:, :-1].softmax(-1)
        lp = torch.gather(torch.log(probs), 2, labels[:, 1:].clamp(min=0).unsqueeze(-1)).squeeze(-1)
        return _finish(lp, labels[:, 1:] != -100, average)

    return log_softmax_by_hand


def exp_over_sum(average):
    def softmax_by_hand(logits, labels):
        e = logits[:, :-1].exp()
        lp = torch.gather((e / e.sum(-1, keepdim=True)).log(), 2, labels[:, 1:].clamp(min=0).unsqueeze(-1))
        return _finish(lp.squeeze(-1), labels[:, 1:] != -100, average)

    return softmax_by_hand


def shifts_with_roll(average):
    def roll(logits, labels):
        shifted = labels.roll(-1, dims=1)  # labels[:, 0] wraps round to the last position
        lp = torch.gather(logits.log_softmax(-1), 2, shifted.clamp(min=0).unsqueeze(-1)).squeeze(-1)
        return _finish(lp, shifted != -100, average)

    return roll


def squeezes_everything(average):
    def squeeze_all(logits, labels):
        lp = torch.gather(logits[:, :-1].log_softmax(-1), 2, labels[:, 1:].clamp(min=0).unsqueeze(-1))
        return _finish(lp.squeeze(), (labels[:, 1:] != -100).squeeze(), average)

    return squeeze_all


def under_no_grad(average):
    def no_grad(logits, labels):
        with torch.no_grad():
            return _finish(_tokens(logits, labels), labels[:, 1:] != -100, average)

    return no_grad


def rebuilt_from_floats(average):
    def from_floats(logits, labels):
        values = _finish(_tokens(logits, labels), labels[:, 1:] != -100, average)
        return torch.tensor([v.item() for v in values])

    return from_floats


def detached_normaliser(average):
    def by_hand(logits, labels):
        lp = logits[:, :-1] - logits[:, :-1].logsumexp(-1, keepdim=True).detach()
        lp = torch.gather(lp, 2, labels[:, 1:].clamp(min=0).unsqueeze(-1)).squeeze(-1)
        return _finish(lp, labels[:, 1:] != -100, average)

    return by_hand


def token_zero_as_padding(average):  # rejected before, but not named
    def positive_mask(logits, labels):
        return _finish(_tokens(logits, labels), labels[:, 1:] > 0, average)

    return positive_mask


def mask_not_shifted(average):  # rejected before, but not named
    def unshifted_mask(logits, labels):
        return _finish(_tokens(logits, labels), labels[:, :-1] != -100, average)

    return unshifted_mask


def _tokens(logits, labels):
    return torch.gather(logits[:, :-1].log_softmax(-1), 2, labels[:, 1:].clamp(min=0).unsqueeze(-1)).squeeze(
        -1
    )


def count_before_the_shift(logits, labels):
    mask = labels[:, 1:] != -100
    return (_tokens(logits, labels) * mask).sum(-1) / (labels != -100).sum(-1)


def divides_by_the_length(logits, labels):  # rejected before, but not named
    return (_tokens(logits, labels) * (labels[:, 1:] != -100)).mean(-1)


def divides_by_the_batch_count(logits, labels):  # rejected before, but not named
    mask = labels[:, 1:] != -100
    return (_tokens(logits, labels) * mask).sum(-1) / mask.sum()


LOGPROB_BUGS = [
    (gathers_at_minus_100, "mask the -100 labels before gathering"),
    (log_of_softmax, "not finite. Take log-probabilities with log_softmax"),
    (exp_over_sum, "not finite. Take log-probabilities with log_softmax"),
    (shifts_with_roll, r"labels\[:, 0\] is never predicted"),
    (squeezes_everything, r"returned shape \(\) on a batch of one row.*squeeze\(-1\)"),
    (under_no_grad, "no gradient with respect to the logits"),
    (rebuilt_from_floats, "no gradient with respect to the logits"),
    (detached_normaliser, "wrong gradient with respect to the logits"),
    (token_zero_as_padding, "token id 0 is a real token"),
    (mask_not_shifted, "mask is not shifted with the labels"),
]
AVERAGE_BUGS = [
    (count_before_the_shift, "counted the labelled tokens before the shift"),
    (divides_by_the_length, "divided by the row's length"),
    (divides_by_the_batch_count, "whole batch's number of labelled tokens"),
]


@pytest.mark.parametrize("make, message", LOGPROB_BUGS)
def test_sequence_logprobs_rejects(make, message):
    with pytest.raises(CheckError, match=message):
        check_sequence_logprobs(make(False))


@pytest.mark.parametrize("make, message", LOGPROB_BUGS)
def test_average_logprobs_rejects(make, message):
    with pytest.raises(CheckError, match=message):
        check_average_logprobs(make(True))


@pytest.mark.parametrize("bug, message", AVERAGE_BUGS)
def test_average_logprobs_names_the_count(bug, message):
    with pytest.raises(CheckError, match=message):
        check_average_logprobs(bug)


def test_the_gather_error_is_kept_as_the_cause():
    with pytest.raises(CheckError, match="mask the -100 labels before gathering") as failure:
        check_sequence_logprobs(gathers_at_minus_100(False))
    assert isinstance(failure.value.__cause__, RuntimeError)


# --- log_odds (Chapter 5) -----------------------------------------------------------------------
LOG_ODDS_BUGS = [
    (lambda x: x - torch.log(1 - torch.exp(x) + 1e-8), "except where p is close to 1"),  # exact at -1e-8
    (lambda x: x - torch.log((1 - torch.exp(x)).clamp(min=1e-8)), "except where p is close to 1"),
    (lambda x: torch.tensor([float(v - torch.log(-torch.expm1(v))) for v in x.detach()]), "no gradient"),
    (lambda x: (x - torch.log(-torch.expm1(x))).detach(), "no gradient"),
    (lambda x: x - torch.log(-torch.expm1(x)).detach(), "wrong gradient"),  # log(1 - p) as a constant
    (lambda x: x - torch.log1p(x), r"not 1 \+ avg_logp"),  # rejected before as "not finite"
]


@pytest.mark.parametrize("bug, message", LOG_ODDS_BUGS)
def test_log_odds_rejects(bug, message):
    with pytest.raises(CheckError, match=message):
        check_log_odds(bug)


# --- dpo_loss (Chapter 4) -----------------------------------------------------------------------
def _margin(pc, pr, rc, rr):
    return (pc - rc) - (pr - rr)


DPO_BUGS = [
    (
        lambda pc, pr, rc, rr, b: -F.logsigmoid(b * ((pc - rc) - (pr.detach() - rr))).mean(),
        "no gradient reaches `policy_rejected`",
    ),
    (  # rejected before as "detached", when only policy_chosen had a gradient
        lambda pc, pr, rc, rr, b: -F.logsigmoid(b * ((pc.detach() - rc) - (pr - rr))).mean(),
        "no gradient reaches `policy_chosen`",
    ),
    (  # rejected before, but not named
        lambda pc, pr, rc, rr, b: -F.logsigmoid(0.1 * _margin(pc, pr, rc, rr)).mean(),
        r"the beta it is given \(1.0\) is not used",
    ),
    (  # rejected before, but not named
        lambda pc, pr, rc, rr, b: -F.logsigmoid(b * (pc - pr) - (rc - rr)).mean(),
        "beta scales the whole log-ratio difference",
    ),
    (  # rejected before, but not named
        lambda pc, pr, rc, rr, b: -F.logsigmoid(b * ((pc + rc) - (pr + rr))).mean(),
        "log-probabilities are added",
    ),
    (  # rejected before, but not named
        lambda pc, pr, rc, rr, b: -F.logsigmoid(b * _margin(pc, pr, rc, rr).mean()),
        "not the log-ratio difference before it",
    ),
    (  # rejected before with a hint that named log(sigmoid) only
        lambda pc, pr, rc, rr, b: torch.log1p(torch.exp(-b * _margin(pc, pr, rc, rr))).mean(),
        r"F.logsigmoid.*log\(1 \+ exp\(-x\)\) overflows",
    ),
    (  # the same value as swapping chosen and rejected: the message names both
        lambda pc, pr, rc, rr, b: -F.logsigmoid(b * ((rc - pc) - (rr - pr))).mean(),
        "sign is flipped.*reference minus policy",
    ),
]


@pytest.mark.parametrize("bug, message", DPO_BUGS)
def test_dpo_loss_rejects(bug, message):
    with pytest.raises(CheckError, match=message):
        check_dpo_loss(bug)


# --- orpo_loss (Chapter 5) ----------------------------------------------------------------------
def _penalty(c, r):
    return F.logsigmoid(log_odds(c) - log_odds(r)).mean()


def _naive_log_odds(x):
    return x - torch.log(1 - torch.exp(x))


ORPO_BUGS = [
    (lambda nll, c, r, lam: nll.item() - lam * _penalty(c, r), "no gradient flows back through nll_chosen"),
    (lambda nll, c, r, lam: nll.detach() - lam * _penalty(c, r), "no gradient flows back through nll_chosen"),
    (
        lambda nll, c, r, lam: nll - lam * F.logsigmoid(log_odds(c) - log_odds(r.detach())).mean(),
        "no gradient reaches `rejected_avg_logp`",
    ),
    (
        lambda nll, c, r, lam: nll - lam * F.logsigmoid(_naive_log_odds(c) - _naive_log_odds(r)).mean(),
        "loses its digits when p is close to 1",
    ),
    (
        lambda nll, c, r, lam: nll - lam * torch.log(torch.sigmoid(log_odds(c) - log_odds(r))).mean(),
        "use F.logsigmoid",
    ),
    (
        lambda nll, c, r, lam: (nll - lam * _penalty(c, r), _penalty(c, r)),
        "the penalty's own term",
    ),
    (
        lambda nll, c, r, lam: (nll - lam * _penalty(c, r), (log_odds(c) - log_odds(r)).mean().item()),
        "one number in a tensor",
    ),
    (  # rejected before, but not named
        lambda nll, c, r, lam: nll - lam * F.logsigmoid(log_odds(r) - log_odds(c)).mean(),
        "chosen and rejected are swapped",
    ),
    (  # rejected before, but not named
        lambda nll, c, r, lam: nll - lam * F.logsigmoid(log_odds(c) - log_odds(r)).sum(),
        "instead of summing",
    ),
    (  # rejected before, but not named
        lambda nll, c, r, lam: nll - lam * F.logsigmoid((log_odds(c) - log_odds(r)).mean()),
        "not the ratio before the log sigmoid",
    ),
    (lambda nll, c, r, lam: lam * nll - _penalty(c, r), "lam weighs the odds-ratio term"),  # named now
    (lambda nll, c, r, lam: (1 - lam) * nll - lam * _penalty(c, r), "the NLL term has weight 1"),  # named now
    (  # rejected before, but not named
        lambda nll, c, r, lam: ((log_odds(c) - log_odds(r)).mean(), nll - lam * _penalty(c, r)),
        "return the loss first",
    ),
]


@pytest.mark.parametrize("bug, message", ORPO_BUGS)
def test_orpo_loss_rejects(bug, message):
    with pytest.raises(CheckError, match=message):
        check_orpo_loss(bug)
