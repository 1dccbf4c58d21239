"""Chapter 5 checkers: ORPO - averaged log-probabilities, log odds, the ORPO loss (also against
``trl.experimental.orpo.ORPOTrainer``) and its probability-ratio variant."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .ch4_dpo import _check_labelled_logprobs
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


@continues_with("from utils.logprobs import average_logprobs")
def check_average_logprobs(fn) -> None:
    """``fn(logits[batch, seq, vocab], labels[batch, seq]) -> [batch]``: the *mean* log-probability
    of each row's labelled tokens (ORPO's length-normalised likelihood)."""
    name = getattr(fn, "__name__", "average_logprobs")
    _check_labelled_logprobs(fn, name, average=True)
    passed(f"`{name}`: mean over labelled tokens, shifted, on 3 batches")


def _fmt(t: torch.Tensor) -> str:
    return "[" + ", ".join(f"{v:.6g}" for v in t.detach().reshape(-1).tolist()) + "]"


def _log_odds_grad(x: torch.Tensor) -> torch.Tensor:
    """d/dx log(p / (1 - p)) with log p = x: 1 / (1 - p), in float64."""
    return -1 / torch.expm1(x.double())


@continues_with("from utils.orpo import log_odds")
def check_log_odds(fn) -> None:
    """``fn(avg_logp[batch]) -> [batch]``: ``log(p / (1 - p))`` with ``log p = avg_logp``, and its
    gradient (ORPO trains through it), accurate from p = exp(-30) to p = 1 - 1e-8."""
    from ..orpo import log_odds as reference

    name = getattr(fn, "__name__", "log_odds")
    x = torch.tensor([-0.1, -0.6931, -2.0, -7.5, -30.0, -1e-8, -3e-8, -2e-7, -1e-6, -1e-5, -1e-3])
    leaf = x.clone().requires_grad_(True)
    got = expect_tensor(call_learner(fn, name, leaf.clone()), name, shape=tuple(x.shape))
    want = reference(x)
    value = got.detach().float()
    if torch.allclose(value, x - torch.log1p(x), atol=1e-3, equal_nan=True):
        raise CheckError(
            f"`{name}` gave {_fmt(value)} for log p = {_fmt(x)}; expected {_fmt(want)}: "
            "1 - p is 1 - exp(avg_logp), not 1 + avg_logp"
        )
    bad = ~torch.isclose(value, want, rtol=1e-3, atol=1e-3)
    if bad.any():
        where = _fmt(x[bad])
        if not torch.isfinite(value).all():
            if (x[~torch.isfinite(value)] > -1e-3).all():
                raise CheckError(
                    f"`{name}` returned {_fmt(value)}: not finite for log p close to 0 (p close to 1). "
                    "Compute log(1 - p) as torch.log(-torch.expm1(avg_logp)) (or log1p(-exp) far from 0)"
                )
            raise CheckError(
                f"`{name}` returned {_fmt(value)} for log p = {_fmt(x)}: not finite at log p = "
                f"{_fmt(x[~torch.isfinite(value)])}, where the log odds are {_fmt(want)}"
            )
        hint = "log odds = log p - log(1 - p)"
        if torch.allclose(value, x, atol=1e-3):
            hint = "that is log p; subtract log(1 - p)"
        elif (x[bad] > -1e-3).all():
            hint = (
                f"right except where p is close to 1 (log p = {where}): there 1 - exp(avg_logp) loses its "
                "digits, and an epsilon or a clamp that keeps it from 0 gives the wrong value. Compute "
                "log(1 - p) as torch.log(-torch.expm1(avg_logp))"
            )
        raise CheckError(f"`{name}` gave {_fmt(value)} for log p = {_fmt(x)}; expected {_fmt(want)}: {hint}")
    if not got.requires_grad:
        raise CheckError(
            f"`{name}`'s result has no gradient with respect to avg_logp (a loop over math.log, "
            "torch.tensor(...) of computed values, .item() or .detach() cut the graph): ORPO's loss "
            "trains the model through the log odds, so build them from torch operations on avg_logp"
        )
    (grad,) = torch.autograd.grad(got.float().sum(), leaf, allow_unused=True)
    grad = torch.zeros_like(x) if grad is None else grad
    steady = x < -1e-7  # below p = 1 - 1e-7 (closer, float32's exp(avg_logp) rounds to 1)
    expected = _log_odds_grad(x)
    if not torch.allclose(grad[steady].double(), expected[steady], rtol=1e-3, atol=1e-4):
        raise CheckError(
            f"`{name}` has the right values but the wrong gradient: {_fmt(grad[steady])} at log p = "
            f"{_fmt(x[steady])}, where d/dlog p of the log odds is 1 / (1 - p) = "
            f"{_fmt(expected[steady])}. Part of it is cut from the graph or replaced by a constant "
            "(a .detach(), a clamp that is active): compute it with differentiable torch operations"
        )
    passed(f"`{name}`: log(p / (1 - p)), finite from p = exp(-30) to p = 1 - 1e-8")


_ORPO_ARGS = ("nll_chosen", "chosen_avg_logp", "rejected_avg_logp")


def _naive_log_odds(x: torch.Tensor) -> torch.Tensor:
    return x - torch.log(1 - torch.exp(x))


def _check_orpo_gradient(name, case, got, leaves, expected) -> None:
    """``got``'s gradient with respect to the NLL and both answers' log-probabilities must be
    eq. (2)'s: each term, and ``lam`` on the odds-ratio one, reaches the model."""
    grads = torch.autograd.grad(got, leaves, allow_unused=True)
    for arg, grad, want in zip(_ORPO_ARGS, grads, expected):
        grad = torch.zeros_like(want) if grad is None else grad.double()
        if torch.allclose(grad, want, rtol=1e-3, atol=1e-6):
            continue
        if not grad.any() and arg == "nll_chosen":
            raise CheckError(
                f"`{name}` gives the right loss on case {case} but no gradient flows back through "
                "nll_chosen: keep the NLL term in the graph (no .item(), float() or .detach()) - it is "
                "ORPO's SFT term, what teaches the model the chosen answers"
            )
        if not grad.any():
            raise CheckError(
                f"`{name}` gives the right loss on case {case} but no gradient reaches `{arg}`: both "
                "answers' log-probabilities must stay in the graph (no .detach(), .item() or "
                "torch.no_grad() on them) - the odds-ratio term raises the chosen answer *and* lowers "
                "the rejected one"
            )
        raise CheckError(
            f"`{name}` gives the right loss on case {case} but the wrong gradient with respect to "
            f"`{arg}` ({_fmt(grad)} where eq. (2) gives {_fmt(want)}): part of it is cut from the "
            "graph or computed apart from the loss. Write L = nll - lam * mean(log sigmoid(ratio)) with "
            "plain differentiable torch operations"
        )


def _check_logged_ratio(name, case, second, want, what: str = "log odds") -> None:
    """The tuple's second value, when there is one: the mean log ``what`` ratio (the loop logs it)."""
    if not isinstance(second, torch.Tensor) or second.numel() != 1:
        shape = tuple(second.shape) if isinstance(second, torch.Tensor) else type(second).__name__
        raise CheckError(
            f"`{name}` returned a tuple whose second value is {shape}: it should be the mean {what} "
            "ratio, one number in a tensor (the training loop logs it with .item())"
        )
    value, ratio = second.detach().double().reshape(()), want
    if torch.allclose(value, ratio.mean(), rtol=1e-4, atol=1e-4):
        return
    hint = f"the mean over the batch of {what}(chosen) - {what}(rejected)"
    if torch.allclose(value, F.logsigmoid(ratio).mean(), rtol=1e-4, atol=1e-4):
        trl = " (what TRL logs as log_odds_ratio)" if what == "log odds" else ""
        hint = (
            f"that is the mean of log sigmoid(ratio), the penalty's own term{trl}; return the mean "
            f"{what} ratio itself"
        )
    raise CheckError(
        f"`{name}` returned {value.item():.5f} as its second value on case {case}, where the mean {what} "
        f"ratio is {ratio.mean().item():.5f}: {hint}"
    )


def _eq2_cases():
    """Hand-made (nll, chosen avg log p, rejected avg log p, lam, kind) for eq. (2) and its variant."""
    nll = torch.tensor(2.3)
    c, r = torch.tensor([-0.5, -1.2, -3.0]), torch.tensor([-0.9, -1.0, -4.0])
    return [
        (nll, c, r, 0.1, ""),
        (nll, c, r, 1.0, ""),
        (torch.tensor(0.7), r, c, 0.5, ""),
        (  # answers the model is nearly sure of (p close to 1)
            torch.tensor(0.9),
            torch.tensor([-2e-6, -0.05, -1.5, -6.0, -4e-5]),
            torch.tensor([-4e-7, -3e-7, -2.5, -1e-3, -0.7]),
            0.7,
            "near one",
        ),
        (torch.tensor(3.0), torch.tensor([-95.0, -0.3]), torch.tensor([-0.01, -60.0]), 0.25, "extreme"),
    ]


def _check_eq2_cases(fn, name, reference, ratio_of, not_finite, bugs, where, formula, what) -> None:
    """Run ``fn`` on every hand-made case: the value (naming a planted bug from ``bugs(nll, c, r, lam)``
    where one matches), the logged ratio when ``fn`` returns one, then every case's gradient against
    ``reference``. ``ratio_of(c, r)`` is the loss's ratio; ``not_finite(kind, ratio)`` the hint for a
    value that is not finite."""
    results = []  # every case's value first, then every case's gradient
    for case, (n_, c_, r_, l_, kind) in enumerate(_eq2_cases()):
        leaves = [t.clone().requires_grad_(True) for t in (n_, c_, r_)]
        raw = call_learner(fn, name, *(t.clone() for t in leaves), l_)
        got = _scalar(raw, name)
        exact = [t.double().requires_grad_(True) for t in (n_, c_, r_)]
        want, _ = reference(*exact, l_)
        results.append((got, leaves, exact, want))
        ratio = ratio_of(exact[1], exact[2]).detach()
        if not torch.isfinite(got):
            raise CheckError(f"`{name}` returned {got.item()} on case {case}, {not_finite(kind, ratio)}")
        _loss_verdict(
            got,
            want.detach().float(),
            name,
            f"on case {case} where {where} gives",
            lambda n_=n_, c_=c_, r_=r_, l_=l_: bugs(n_, c_, r_, l_),
            formula,
            " from the log-probabilities",
        )
        if isinstance(raw, tuple) and len(raw) > 1:
            _check_logged_ratio(name, case, raw[1], ratio, what=what)
    for case, (got, leaves, exact, want) in enumerate(results):
        _check_orpo_gradient(name, case, got, leaves, torch.autograd.grad(want, exact))


@continues_with("from utils.orpo import orpo_loss")
def check_orpo_loss(fn, model=None, tokenizer=None, pairs=None, lam: float = 0.1) -> None:
    """``fn(nll_chosen, chosen_avg_logp, rejected_avg_logp, lam) -> scalar`` (optionally a tuple whose
    first element is the loss, and second the mean log odds ratio), checked on hand-made values -
    the value and the gradient with respect to every input - and, given a model and pairs, against
    ``trl.experimental.orpo.ORPOTrainer`` on the same batch."""
    from ..orpo import log_odds
    from ..orpo import orpo_loss as reference

    def not_finite(kind, ratio):
        return {
            "near one": (
                "where an answer's mean log-probability is close to 0 (p close to 1): compute "
                "log(1 - p) as torch.log(-torch.expm1(avg_logp)), as your log_odds does"
            ),
            "extreme": (
                f"where the log odds ratio reaches {ratio.min().item():.1f}: use F.logsigmoid, "
                "which stays finite where torch.log(torch.sigmoid(x)) underflows to log 0"
            ),
        }.get(kind, "use your log_odds and F.logsigmoid, which stay finite")

    def bugs(n_, c_, r_, l_):
        ratio32 = log_odds(c_) - log_odds(r_)
        return [
            (
                n_ + l_ * F.logsigmoid(ratio32).mean(),
                "the sign of the odds-ratio term is flipped: it should *reward* a large ratio",
            ),
            (
                n_ - l_ * F.logsigmoid(-ratio32).mean(),
                "chosen and rejected are swapped: the ratio is log odds(chosen) - log odds(rejected)",
            ),
            (
                n_ - l_ * F.logsigmoid(c_ - r_).mean(),
                "you used the log-probability ratio; ORPO uses the log *odds* ratio",
            ),
            (
                -l_ * F.logsigmoid(ratio32).mean(),
                "the NLL term on the chosen answer is missing: ORPO is SFT plus a preference penalty",
            ),
            (
                n_ - l_ * F.logsigmoid(ratio32).sum(),
                "average the odds-ratio term over the batch instead of summing",
            ),
            (
                n_ - l_ * F.logsigmoid(ratio32.mean()),
                "average log sigmoid(ratio) over the batch, not the ratio before the log sigmoid",
            ),
            (l_ * n_ - F.logsigmoid(ratio32).mean(), "lam weighs the odds-ratio term, not the NLL"),
            (
                (1 - l_) * n_ - l_ * F.logsigmoid(ratio32).mean(),
                "the NLL term has weight 1: only the odds-ratio term is scaled by lam",
            ),
            (
                n_ - l_ * F.logsigmoid(_naive_log_odds(c_) - _naive_log_odds(r_)).mean(),
                "log(1 - p) computed as log(1 - exp(avg_logp)) loses its digits when p is close to 1: "
                "use torch.log(-torch.expm1(avg_logp)) (your log_odds)",
            ),
            (
                ratio32.mean(),
                "that is the mean log odds ratio: return the loss first, then the ratio",
            ),
        ]

    name = getattr(fn, "__name__", "orpo_loss")
    _check_eq2_cases(
        fn,
        name,
        reference,
        lambda c, r: log_odds(c) - log_odds(r),
        not_finite,
        bugs,
        "ORPO",
        "L = nll - lam * mean(log sigmoid(log odds(chosen) - log odds(rejected)))",
        "log odds",
    )
    message = f"`{name}` matches the ORPO loss on hand-made cases"
    if model is not None:
        message += _compare_with_orpo_trainer(fn, name, model, tokenizer, pairs, lam)
    passed(message)


def _compare_with_orpo_trainer(fn, name, model, tokenizer, pairs, lam) -> str:
    from trl.experimental.orpo import ORPOConfig, ORPOTrainer

    from ..logprobs import average_logprobs

    def trl_loss(trainer, batch):
        return trainer.get_batch_loss_metrics(trainer.model, batch)[0]

    def orpo_inputs(trainer, batch, n):  # the concatenated batch holds the n chosen rows, then the n rejected
        cat = trainer.concatenated_inputs(
            batch, is_encoder_decoder=False, padding_value=trainer.padding_value, device=trainer.model.device
        )
        ids, attention = cat["concatenated_input_ids"], cat["concatenated_attention_mask"]
        logits = trainer.model(ids, attention_mask=attention).logits
        avg = average_logprobs(logits, cat["concatenated_labels"])
        # TRL's NLL term covers the whole chosen sequence, prompt included (see the chapter)
        full = torch.where(attention == 1, ids, -100)
        nll = F.cross_entropy(
            logits[:n, :-1].reshape(-1, logits.size(-1)), full[:n, 1:].reshape(-1), ignore_index=-100
        )
        return nll, avg[:n], avg[n:], lam

    return compare_with_trl_trainer(
        fn,
        name,
        trainer_cls=ORPOTrainer,
        config_cls=ORPOConfig,
        models={"model": model},
        tokenizer=tokenizer,
        pairs=pairs,
        tag="orpo",
        beta=lam,
        max_length=256,
        remove_unused_columns=False,
        trl_loss=trl_loss,
        learner_inputs=orpo_inputs,
        who="ORPOTrainer",
        whose="trl's ORPOTrainer",
        note=f" (lambda = TRL's beta = {lam})",
    )


@continues_with("from utils.orpo import probability_ratio_loss")
def check_probability_ratio_loss(fn) -> None:
    """``fn(nll_chosen, chosen_avg_logp, rejected_avg_logp, lam) -> scalar`` (optionally a tuple whose
    second element is the mean log-probability ratio): eq. (2) with ``log P`` in place of the log odds,
    checked on hand-made values - the value and the gradient with respect to every input."""
    from ..orpo import log_odds
    from ..orpo import probability_ratio_loss as reference

    def not_finite(kind, ratio):
        return (
            f"where the log-probability ratio reaches {ratio.min().item():.1f}: use F.logsigmoid, which "
            "stays finite where torch.log(torch.sigmoid(x)) underflows to log 0"
        )

    def bugs(n_, c_, r_, l_):
        diff, odds = c_ - r_, log_odds(c_) - log_odds(r_)
        return [
            (
                n_ - l_ * F.logsigmoid(odds).mean(),
                "that is ORPO's loss, with the log *odds* ratio: this variant puts log P(chosen) - "
                "log P(rejected) where ORPO has the log odds",
            ),
            (
                n_ + l_ * F.logsigmoid(diff).mean(),
                "the sign of the ratio term is flipped: it should *reward* a large ratio",
            ),
            (
                n_ - l_ * F.logsigmoid(-diff).mean(),
                "chosen and rejected are swapped: the ratio is log P(chosen) - log P(rejected)",
            ),
            (
                -l_ * F.logsigmoid(diff).mean(),
                "the NLL term on the chosen answer is missing: keep ORPO's SFT term",
            ),
            (n_ - l_ * F.logsigmoid(diff).sum(), "average the ratio term over the batch instead of summing"),
            (
                n_ - l_ * F.logsigmoid(diff.mean()),
                "average log sigmoid(ratio) over the batch, not the ratio before the log sigmoid",
            ),
            (l_ * n_ - F.logsigmoid(diff).mean(), "lam weighs the ratio term, not the NLL"),
            (diff.mean(), "that is the mean ratio: return the loss first, then the ratio"),
        ]

    name = getattr(fn, "__name__", "probability_ratio_loss")
    _check_eq2_cases(
        fn,
        name,
        reference,
        lambda c, r: c - r,
        not_finite,
        bugs,
        "the probability-ratio variant",
        "L = nll - lam * mean(log sigmoid(log P(chosen) - log P(rejected)))",
        "log-probability",
    )
    passed(f"`{name}` matches eq. (2) with log P for the log odds (value and gradient) on hand-made cases")
