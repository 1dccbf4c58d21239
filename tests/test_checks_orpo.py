"""Chapter 5's checkers accept correct code and reject planted bugs, naming them."""

import pytest
import torch
import torch.nn.functional as F

from utils.checks import (
    CheckError,
    check_average_logprobs,
    check_log_odds,
    check_orpo_loss,
    check_probability_ratio_loss,
)
from utils.data import annotator_preferences
from utils.logprobs import sequence_logprobs
from utils.orpo import average_logprobs, log_odds, orpo_loss


def test_average_logprobs():
    check_average_logprobs(average_logprobs)
    with pytest.raises(CheckError, match="that is the sum"):
        check_average_logprobs(sequence_logprobs)
    with pytest.raises(CheckError, match=r"returned shape"):
        check_average_logprobs(lambda logits, labels: average_logprobs(logits, labels).mean())


def test_log_odds():
    check_log_odds(log_odds)
    with pytest.raises(CheckError, match="not finite"):
        check_log_odds(lambda x: x - torch.log(1 - torch.exp(x)))  # 1 - exp(-1e-8) rounds to 0 in float32
    with pytest.raises(CheckError, match="that is log p"):
        check_log_odds(lambda x: x.clone())
    with pytest.raises(CheckError, match="not 1 \\+ avg_logp|not finite"):
        check_log_odds(lambda x: x - torch.log1p(x))


def good(nll, c, r, lam):
    return nll - lam * F.logsigmoid(log_odds(c) - log_odds(r)).mean()


def test_orpo_loss_hand_made():
    check_orpo_loss(good)
    check_orpo_loss(orpo_loss)  # returns (loss, ratio)


@pytest.mark.parametrize(
    "bug, message",
    [
        (
            lambda nll, c, r, lam: nll + lam * F.logsigmoid(log_odds(c) - log_odds(r)).mean(),
            "sign of the odds-ratio",
        ),
        (lambda nll, c, r, lam: nll - lam * F.logsigmoid(c - r).mean(), "log \\*odds\\* ratio"),
        (lambda nll, c, r, lam: -lam * F.logsigmoid(log_odds(c) - log_odds(r)).mean(), "NLL term"),
        (lambda nll, c, r, lam: good(nll, c, r, lam).detach(), "detached"),
        (lambda nll, c, r, lam: nll - lam * F.logsigmoid(log_odds(c) - log_odds(r)), "one number"),
    ],
)
def test_orpo_loss_rejects(bug, message):
    with pytest.raises(CheckError, match=message):
        check_orpo_loss(bug)


def test_orpo_loss_against_orpo_trainer(tiny_model, tiny_tokenizer):
    pairs = annotator_preferences(16)
    check_orpo_loss(good, tiny_model, tiny_tokenizer, pairs, lam=0.2)
    with pytest.raises(CheckError, match="ORPO gives"):  # lambda ignored: right only when it is 0.1
        check_orpo_loss(
            lambda nll, c, r, lam: good(nll, c, r, 0.1), tiny_model, tiny_tokenizer, pairs, lam=0.2
        )


def test_log1mexp_has_finite_gradients_next_to_zero():
    """The unused form of a torch.where used to send NaN back when exp(x) rounds to 1."""
    from utils.orpo import log1mexp

    x = torch.tensor([-1e-9, -2e-8, -1e-3, -0.5, -0.7, -5.0, -100.0], requires_grad=True)
    y = log1mexp(x)
    (g,) = torch.autograd.grad(y.sum(), x)
    assert torch.isfinite(g).all(), g
    exact = torch.log(-torch.expm1(x.detach().double())).float()
    assert torch.allclose(y.detach(), exact, rtol=1e-6)
    assert torch.allclose(g[2:], (-1 / torch.expm1(-x.detach()[2:])).float(), rtol=1e-4)


def ratio_good(nll, c, r, lam):
    return nll - lam * F.logsigmoid(c - r).mean()


def test_probability_ratio_loss_accepts_the_variant():
    from utils.orpo import probability_ratio_loss

    check_probability_ratio_loss(ratio_good)
    check_probability_ratio_loss(probability_ratio_loss)  # returns (loss, mean ratio)


@pytest.mark.parametrize(
    "bug, message",
    [
        (good, "that is ORPO's loss"),
        (lambda nll, c, r, lam: nll + lam * F.logsigmoid(c - r).mean(), "sign of the ratio term"),
        (lambda nll, c, r, lam: nll - lam * F.logsigmoid(r - c).mean(), "swapped"),
        (lambda nll, c, r, lam: -lam * F.logsigmoid(c - r).mean(), "NLL term"),
        (lambda nll, c, r, lam: nll - lam * F.logsigmoid(c - r).sum(), "instead of summing"),
        (lambda nll, c, r, lam: nll - lam * torch.log(torch.sigmoid(c - r)).mean(), "F.logsigmoid"),
        (lambda nll, c, r, lam: ratio_good(nll, c, r, lam).detach(), "detached"),
        (lambda nll, c, r, lam: nll.detach() - lam * F.logsigmoid(c - r).mean(), "nll_chosen"),
        (lambda nll, c, r, lam: (ratio_good(nll, c, r, lam), (c - r).sum()), "second value"),
    ],
)
def test_probability_ratio_loss_rejects(bug, message):
    with pytest.raises(CheckError, match=message):
        check_probability_ratio_loss(bug)
