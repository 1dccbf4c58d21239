"""Hand-computed cases for reference functions that were tested only through their own checkers."""

import math

import pytest
import torch

from utils.logprobs import average_logprobs, sequence_logprobs
from utils.orpo import log_odds
from utils.ppo import per_token_rewards, ppo_policy_loss, ppo_value_loss


def test_per_token_rewards_by_hand():
    rewards = per_token_rewards(
        torch.tensor([2.0]),
        torch.tensor([[-1.0, -2.0, 0.0]]),
        torch.tensor([[-1.5, -1.0, 0.0]]),
        torch.tensor([[1, 1, 0]]),
        kl_coef=0.1,
    )
    # -0.1 * (logp - ref) on each answer token, the score added on the last one, 0 on padding
    assert torch.allclose(rewards, torch.tensor([[-0.05, 0.1 + 2.0, 0.0]]))


def test_ppo_policy_loss_by_hand():
    logp, old = torch.tensor([[math.log(1.5), math.log(1.5)]]), torch.zeros(1, 2)
    loss = ppo_policy_loss(logp, old, torch.tensor([[1.0, -1.0]]), torch.ones(1, 2), clip=0.2)
    # ratio 1.5: with A = +1 the clip caps the gain at 1.2 (-> -1.2); with A = -1 the loss keeps 1.5
    assert loss.item() == pytest.approx((-1.2 + 1.5) / 2)


def test_ppo_value_loss_by_hand():
    old, returns = torch.tensor([[0.5, 0.5]]), torch.tensor([[0.0, 1.0]])
    loss = ppo_value_loss(torch.tensor([[0.9, 0.9]]), old, returns, torch.ones(1, 2), clip=0.2)
    # token 1: (0.9 - 0)^2 = 0.81 beats the clipped (0.7 - 0)^2;
    # token 2: the clipped (0.7 - 1)^2 = 0.09 beats 0.01
    assert loss.item() == pytest.approx(0.5 * (0.81 + 0.09) / 2)


def test_log_odds_by_hand():
    assert log_odds(torch.tensor([math.log(0.25)])).item() == pytest.approx(math.log(0.25 / 0.75))
    assert log_odds(torch.tensor([math.log(0.5)])).item() == pytest.approx(0.0, abs=1e-6)


def test_sum_and_average_logprobs_by_hand():
    logits = torch.zeros(1, 3, 4)  # uniform over 4 tokens: every log-probability is log 1/4
    labels = torch.tensor([[-100, 1, 2]])  # positions 0 and 1 predict tokens 1 and 2
    assert sequence_logprobs(logits, labels).item() == pytest.approx(2 * math.log(0.25))
    assert average_logprobs(logits, labels).item() == pytest.approx(math.log(0.25))


def test_noise_robust_dpo_losses_by_hand():
    from utils.dpo import conservative_dpo_loss, dpo_loss, ipo_loss

    pc, pr, rc, rr = (
        torch.tensor([-3.0, -5.0]),
        torch.tensor([-4.0, -2.0]),
        torch.tensor([-3.5]),
        torch.tensor([-3.5]),
    )
    assert torch.isclose(
        conservative_dpo_loss(pc, pr, rc, rr, 0.1, epsilon=0.0), dpo_loss(pc, pr, rc, rr, 0.1)
    )
    # cDPO's minimum is at a finite margin: beta * h = log((1 - eps) / eps)
    eps, beta = 0.2, 0.5
    h = torch.linspace(0, 10, 2001).requires_grad_(True)
    loss = -(1 - eps) * torch.nn.functional.logsigmoid(beta * h) - eps * torch.nn.functional.logsigmoid(
        -beta * h
    )
    best = h[loss.argmin()].item()
    assert best == pytest.approx(math.log((1 - eps) / eps) / beta, abs=0.01)
    assert conservative_dpo_loss(
        torch.tensor([best]), torch.tensor([0.0]), torch.tensor([0.0]), torch.tensor([0.0]), beta, eps
    ) == pytest.approx(loss.min().item(), abs=1e-6)
    # IPO is zero exactly at the target margin 1 / (2 beta)
    assert (
        ipo_loss(
            torch.tensor([5.0]), torch.tensor([0.0]), torch.tensor([0.0]), torch.tensor([0.0]), 0.1
        ).item()
        == 0.0
    )
    assert ipo_loss(
        torch.tensor([7.0]), torch.tensor([0.0]), torch.tensor([0.0]), torch.tensor([0.0]), 0.1
    ).item() == pytest.approx(4.0)
