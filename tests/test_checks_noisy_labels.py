"""Chapter 4's exercises for noisy labels: the conservative DPO and IPO losses, checked in value and
gradient against the course's at several settings at once, and planted mistakes named."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from utils.checks import CheckError, check_conservative_dpo_loss, check_ipo_loss
from utils.dpo import conservative_dpo_loss, ipo_loss


def _h(pc, pr, rc, rr):
    return (pc - rc) - (pr - rr)


def test_the_references_pass(capsys):
    check_conservative_dpo_loss(conservative_dpo_loss)
    check_ipo_loss(ipo_loss)
    assert capsys.readouterr().out.count("[check passed]") == 2


def test_a_learners_correct_losses_pass(capsys):
    def cdpo(pc, pr, rc, rr, beta=0.1, epsilon=0.1):
        x = beta * _h(pc, pr, rc, rr)
        return ((epsilon - 1) * F.logsigmoid(x) - epsilon * F.logsigmoid(-x)).mean()

    def ipo(pc, pr, rc, rr, beta=0.1):
        return (_h(pc, pr, rc, rr) - 0.5 / beta).pow(2).mean()

    check_conservative_dpo_loss(cdpo)
    check_ipo_loss(ipo)
    assert capsys.readouterr().out.count("[check passed]") == 2


def cdpo_epsilon_ignored(pc, pr, rc, rr, beta=0.1, epsilon=0.1):
    return -F.logsigmoid(beta * _h(pc, pr, rc, rr)).mean()


def cdpo_same_sign(pc, pr, rc, rr, beta=0.1, epsilon=0.1):
    x = beta * _h(pc, pr, rc, rr)
    return (-(1 - epsilon) * F.logsigmoid(x) - epsilon * F.logsigmoid(x)).mean()


def cdpo_swapped(pc, pr, rc, rr, beta=0.1, epsilon=0.1):
    x = beta * _h(pc, pr, rc, rr)
    return (-epsilon * F.logsigmoid(x) - (1 - epsilon) * F.logsigmoid(-x)).mean()


def cdpo_no_beta(pc, pr, rc, rr, beta=0.1, epsilon=0.1):
    x = _h(pc, pr, rc, rr)
    return (-(1 - epsilon) * F.logsigmoid(x) - epsilon * F.logsigmoid(-x)).mean()


def cdpo_naive(pc, pr, rc, rr, beta=0.1, epsilon=0.1):
    x = beta * _h(pc, pr, rc, rr)
    return (-(1 - epsilon) * torch.log(torch.sigmoid(x)) - epsilon * torch.log(torch.sigmoid(-x))).mean()


def cdpo_sum(pc, pr, rc, rr, beta=0.1, epsilon=0.1):
    return conservative_dpo_loss(pc, pr, rc, rr, beta, epsilon) * pc.shape[0]


def cdpo_refs_swapped(pc, pr, rc, rr, beta=0.1, epsilon=0.1):
    return conservative_dpo_loss(pc, pr, rr, rc, beta, epsilon)


def cdpo_rejected_detached(pc, pr, rc, rr, beta=0.1, epsilon=0.1):
    return conservative_dpo_loss(pc, pr.detach(), rc, rr, beta, epsilon)


def cdpo_detached(pc, pr, rc, rr, beta=0.1, epsilon=0.1):
    return torch.tensor(conservative_dpo_loss(pc, pr, rc, rr, beta, epsilon).item())


def cdpo_first_setting_only(pc, pr, rc, rr, beta=0.1, epsilon=0.1):
    return conservative_dpo_loss(pc, pr, rc, rr, 0.1, epsilon)  # β fixed at its default


@pytest.mark.parametrize(
    "fn, message",
    [
        (cdpo_epsilon_ignored, "`epsilon` is ignored"),
        (cdpo_same_sign, "log σ(-βh), not log σ(βh)"),
        (cdpo_swapped, "ε and 1 - ε are swapped"),
        (cdpo_no_beta, "β is missing"),
        (cdpo_naive, "F.logsigmoid"),
        (cdpo_sum, "return the mean"),
        (cdpo_refs_swapped, "reference's log-probabilities are swapped"),
        (cdpo_rejected_detached, "gradient with respect to the policy's rejected"),
        (cdpo_detached, "detached"),
        (cdpo_first_setting_only, "beta=0.5"),
    ],
    ids=lambda x: x.__name__ if callable(x) else None,
)
def test_the_cdpo_checker_names_planted_mistakes(fn, message):
    with pytest.raises(CheckError) as failure:
        check_conservative_dpo_loss(fn)
    assert message in str(failure.value), str(failure.value)


def ipo_target_one_over_beta(pc, pr, rc, rr, beta=0.1):
    return ((_h(pc, pr, rc, rr) - 1 / beta) ** 2).mean()


def ipo_beta_times_h(pc, pr, rc, rr, beta=0.1):
    return ((beta * _h(pc, pr, rc, rr) - 0.5) ** 2).mean()


def ipo_no_target(pc, pr, rc, rr, beta=0.1):
    return (_h(pc, pr, rc, rr) ** 2).mean()


def ipo_wrong_sign(pc, pr, rc, rr, beta=0.1):
    return ((-_h(pc, pr, rc, rr) - 1 / (2 * beta)) ** 2).mean()


def ipo_no_reference(pc, pr, rc, rr, beta=0.1):
    return (((pc - pr) - 1 / (2 * beta)) ** 2).mean()


def ipo_sum(pc, pr, rc, rr, beta=0.1):
    return ((_h(pc, pr, rc, rr) - 1 / (2 * beta)) ** 2).sum()


def ipo_absolute(pc, pr, rc, rr, beta=0.1):
    return (_h(pc, pr, rc, rr) - 1 / (2 * beta)).abs().mean()


def ipo_chosen_detached(pc, pr, rc, rr, beta=0.1):
    return ipo_loss(pc.detach(), pr, rc, rr, beta)


@pytest.mark.parametrize(
    "fn, message",
    [
        (ipo_target_one_over_beta, "the target is 1/(2β), not 1/β"),
        (ipo_beta_times_h, "β multiplies h"),
        (ipo_no_target, "the target is missing"),
        (ipo_wrong_sign, "h has the wrong sign"),
        (ipo_no_reference, "the reference is missing"),
        (ipo_sum, "return the mean"),
        (ipo_absolute, "*square*"),
        (ipo_chosen_detached, "gradient with respect to the policy's chosen"),
    ],
    ids=lambda x: x.__name__ if callable(x) else None,
)
def test_the_ipo_checker_names_planted_mistakes(fn, message):
    with pytest.raises(CheckError) as failure:
        check_ipo_loss(fn)
    assert message in str(failure.value), str(failure.value)
