"""Chapter 7's KL demo: the whole next-token distribution at each sampled position
(``utils.rollout.token_distributions``), so that the KL there is exact, and a per-token mean with a
bootstrap interval over whole answers (``utils.evaluate.per_token_mean``)."""

import math

import pytest
import torch

from utils.evaluate import per_token_mean
from utils.grpo import kl_estimates
from utils.rollout import sample_rollout, token_distributions, token_logprobs


@pytest.fixture(scope="module")
def rollout(tiny_model, tiny_tokenizer):
    from utils.data import eval_conversations

    prompts = eval_conversations(24, split="train", seed=0)["prompt"]
    return sample_rollout(tiny_model, tiny_tokenizer, prompts, max_new_tokens=12, seed=3)


def test_distributions_are_distributions_and_agree_with_token_logprobs(tiny_model, rollout):
    with torch.no_grad():
        lp_all = token_distributions(tiny_model, rollout, temperature=1.3)
        lp, _ = token_logprobs(tiny_model, rollout, temperature=1.3)
    assert lp_all.shape[:2] == rollout.response.shape
    assert torch.allclose(lp_all.exp().sum(-1), torch.ones(lp_all.shape[:2]), atol=1e-5)
    mask = rollout.response_mask.bool()
    picked = lp_all.gather(2, rollout.response.unsqueeze(-1)).squeeze(-1)
    assert torch.allclose(picked[mask], lp[mask], atol=1e-5)


def test_the_estimators_average_to_the_exact_kl():
    """On many samples of one position of two known categoricals, k1 and k3 average to the exact KL
    (the sum over the vocabulary) and the exact value is what the demo's formula gives."""
    g = torch.Generator().manual_seed(0)
    p = torch.log_softmax(torch.randn(50, generator=g), 0)
    q = torch.log_softmax(p + 0.3 * torch.randn(50, generator=g), 0)
    exact = (p.exp() * (p - q)).sum()
    x = torch.multinomial(p.exp(), 200_000, replacement=True, generator=g)
    est = kl_estimates(p[x], q[x])
    assert abs(est["k1"].mean() - exact) < 0.01 and abs(est["k3"].mean() - exact) < 0.01
    assert est["k3"].std() < est["k1"].std()  # near: k3's spread is the smaller


def test_per_token_mean_weighs_tokens_resamples_answers_and_ignores_padding():
    values = torch.tensor([[1.0, 1.0, 1.0, float("inf")], [4.0, float("nan"), 0.0, 0.0]])
    mask = torch.tensor([[1, 1, 1, 0], [1, 0, 0, 0]])
    got = per_token_mean(values, mask, n_boot=500)
    assert got["mean"] == pytest.approx(7 / 4)  # four tokens, not the mean of the two answers (2.5)
    assert 1.0 <= got["low"] <= got["mean"] <= got["high"] <= 4.0
    same = per_token_mean(torch.full((5, 3), 2.0), torch.ones(5, 3))
    assert same == {"mean": 2.0, "low": 2.0, "high": 2.0}
    wide = per_token_mean(torch.arange(40.0).reshape(20, 2), torch.ones(20, 2))
    assert wide["low"] < wide["mean"] < wide["high"] and math.isfinite(wide["high"])
    with pytest.raises(ValueError):
        per_token_mean(torch.ones(3, 2), torch.zeros(3, 2))
