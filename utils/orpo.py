"""ORPO, reference version (Hong et al., 2024): one stage, no reference model.

    L_ORPO = L_NLL(chosen) - lambda * log sigmoid(log odds(chosen) - log odds(rejected))

where ``odds(y) = p / (1 - p)`` and ``p = exp(mean log-probability of y's tokens)``. TRL calls
``lambda`` ``beta`` (``trl.experimental.orpo.ORPOConfig``). Chapter 5 writes these from scratch.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .logprobs import average_logprobs  # noqa: F401  (Chapter 5's exercise 1; re-exported)


def log1mexp(x: torch.Tensor) -> torch.Tensor:
    """``log(1 - exp(x))`` for ``x < 0``, accurate both near 0 and for very negative ``x``."""
    return torch.where(x < -0.6931, torch.log1p(-torch.exp(x)), torch.log(-torch.expm1(x)))


def log_odds(avg_logp: torch.Tensor) -> torch.Tensor:
    """``log(p / (1 - p))`` with ``log p = avg_logp``."""
    return avg_logp - log1mexp(avg_logp)


def orpo_loss(
    nll_chosen: torch.Tensor, chosen_avg_logp: torch.Tensor, rejected_avg_logp: torch.Tensor, lam: float = 0.1
):
    """``nll_chosen - lam * mean(log sigmoid(log odds ratio))``; returns (loss, mean log odds ratio).

    Higher ``lam`` = more weight on separating chosen from rejected, less on plain imitation.
    """
    ratio = log_odds(chosen_avg_logp) - log_odds(rejected_avg_logp)
    return nll_chosen - lam * F.logsigmoid(ratio).mean(), ratio.detach().mean()
