"""Chapter 7's exercise on k3's gradient: the exact expectations over a small softmax of the gradients
of k3 and of rho * k3 are the gradients of KL(ref || pi) and KL(pi || ref) (the text's claim, tested
here exactly), and the checker names the usual slips."""

from __future__ import annotations

import pytest
import torch

from utils.checks import CheckError, check_expected_k3_gradients
from utils.grpo import expected_k3_gradients, kl_k3


def _kl_gradients(theta, ref):
    def grad(f):
        th = theta.clone().requires_grad_(True)
        return torch.autograd.grad(f(torch.log_softmax(th, -1)), th)[0]

    reverse = grad(lambda lp: (lp.exp() * (lp - ref)).sum())  # KL(pi || ref)
    forward = grad(lambda lp: (ref.exp() * (ref - lp)).sum())  # KL(ref || pi)
    return reverse, forward


@pytest.mark.parametrize("seed", range(5))
def test_k3_alone_follows_the_forward_kl_and_the_ratio_restores_the_reverse(seed):
    g = torch.Generator().manual_seed(seed)
    theta = torch.randn(6, generator=g, dtype=torch.float64) * 2
    ref = torch.log_softmax(torch.randn(6, generator=g, dtype=torch.float64), -1)
    g_k3, g_ratio_k3 = expected_k3_gradients(theta, ref)
    reverse, forward = _kl_gradients(theta, ref)
    assert torch.allclose(g_k3, forward, atol=1e-12)
    assert torch.allclose(g_ratio_k3, reverse, atol=1e-12)
    assert (forward - reverse).abs().max() > 1e-3  # two different gradients


def test_the_reference_and_a_vectorised_answer_pass(capsys):
    def closed_form(theta, ref_logprobs):
        p = torch.softmax(theta, -1)
        r = torch.exp(ref_logprobs - torch.log(p))
        eye = torch.eye(len(theta), dtype=theta.dtype)
        score = eye - p  # row y: the gradient of log pi(y)
        g_k3 = (p * (1 - r)) @ score
        g_ratio = (p * ((1 - r) + (r - torch.log(r) - 1))) @ score
        return g_k3, g_ratio

    check_expected_k3_gradients(expected_k3_gradients)
    check_expected_k3_gradients(closed_form)
    assert capsys.readouterr().out.count("[check passed]") == 2


def _loop(theta, ref, weight, ratio, weights_grad=False):
    out = []
    for with_ratio in (False, True):
        total = torch.zeros_like(theta)
        th = theta.clone().requires_grad_(True)
        logp_all = torch.log_softmax(th, -1)
        for y in range(len(theta)):
            logp = logp_all[y]
            loss = kl_k3(logp, ref[y])
            if with_ratio:
                loss = ratio(logp) * loss
            w = logp.exp() if weights_grad else weight(theta, y)
            (gy,) = torch.autograd.grad(w * loss, th, retain_graph=True)
            total = total + gy
        out.append(total)
    return tuple(out)


def _pi(theta, y):
    return torch.softmax(theta, -1)[y]


def uniform_weights(theta, ref):
    return _loop(theta, ref, lambda t, y: 1 / len(t), lambda lp: torch.exp(lp - lp.detach()))


def ratio_without_gradient(theta, ref):
    return _loop(theta, ref, _pi, lambda lp: torch.exp(lp - lp).detach())


def weights_with_gradient(theta, ref):
    return _loop(theta, ref, _pi, lambda lp: torch.exp(lp - lp.detach()), weights_grad=True)


def swapped(theta, ref):
    a, b = expected_k3_gradients(theta, ref)
    return b, a


def ratio_not_multiplied(theta, ref):
    a, _ = expected_k3_gradients(theta, ref)
    return a, a * 1.5


def in_place(theta, ref):
    out = expected_k3_gradients(theta, ref)
    theta.zero_()
    return out


@pytest.mark.parametrize(
    "fn, message",
    [
        (uniform_weights, "weight each token's gradient by pi(y), not 1/V"),
        (ratio_without_gradient, "rho passes no gradient"),
        (weights_with_gradient, "the weights pi(y) carried gradient"),
        (swapped, "the wrong way round"),
        (ratio_not_multiplied, "g_k3 is right, g_ratio_k3 is not"),
        (in_place, "changed its inputs in place"),
    ],
    ids=lambda x: x.__name__ if callable(x) else None,
)
def test_the_checker_names_planted_mistakes(fn, message):
    with pytest.raises(CheckError) as failure:
        check_expected_k3_gradients(fn)
    assert message in str(failure.value), str(failure.value)
