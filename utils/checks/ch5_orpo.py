"""Chapter 5 checkers: ORPO - averaged log-probabilities, log odds, and the ORPO loss (also against
``trl.experimental.orpo.ORPOTrainer``)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .ch4_dpo import _logprob_cases
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
    from ..logprobs import average_logprobs as reference

    name = getattr(fn, "__name__", "average_logprobs")
    for i, (logits, labels, ids) in enumerate(_logprob_cases()):
        got = expect_tensor(
            call_learner(fn, name, logits.clone(), labels.clone()), name, shape=(labels.size(0),)
        )
        want = reference(logits, labels)
        if torch.allclose(got.float(), want, atol=1e-4):
            continue
        from ..logprobs import sequence_logprobs

        hint = "average log_softmax(logits)[t, labels[t+1]] over the positions where labels[t+1] != -100"
        if torch.allclose(got.float(), sequence_logprobs(logits, labels), atol=1e-4):
            hint = "that is the sum (DPO's); ORPO averages over the response's tokens"
        raise CheckError(
            f"`{name}` gave {got.tolist()} on case {i} where the answer is {want.tolist()}: {hint}"
        )
    passed(f"`{name}`: mean over labelled tokens, shifted, on 3 batches")


@continues_with("from utils.orpo import log_odds")
def check_log_odds(fn) -> None:
    """``fn(avg_logp[batch]) -> [batch]``: ``log(p / (1 - p))`` with ``log p = avg_logp``."""
    from ..orpo import log_odds as reference

    name = getattr(fn, "__name__", "log_odds")
    x = torch.tensor([-0.1, -0.6931, -2.0, -7.5, -30.0, -1e-8])
    got = expect_tensor(call_learner(fn, name, x.clone()), name, shape=tuple(x.shape))
    want = reference(x)
    if not torch.isfinite(got).all():
        raise CheckError(
            f"`{name}` returned {got.tolist()}: not finite for log p close to 0 (p close to 1). "
            "Compute log(1 - p) as torch.log(-torch.expm1(avg_logp)) (or log1p(-exp) far from 0)"
        )
    if not torch.allclose(got.float(), want, rtol=1e-3, atol=1e-3):
        hint = "log odds = log p - log(1 - p)"
        if torch.allclose(got.float(), x - torch.log1p(x), atol=1e-3, equal_nan=True):
            hint = "1 - p is 1 - exp(avg_logp), not 1 + avg_logp"
        elif torch.allclose(got.float(), x, atol=1e-3):
            hint = "that is log p; subtract log(1 - p)"
        raise CheckError(
            f"`{name}` gave {got.tolist()} for log p = {x.tolist()}; expected {want.tolist()}: {hint}"
        )
    passed(f"`{name}`: log(p / (1 - p)), finite from p = exp(-30) to p = 1 - 1e-8")


@continues_with("from utils.orpo import orpo_loss")
def check_orpo_loss(fn, model=None, tokenizer=None, pairs=None, lam: float = 0.1) -> None:
    """``fn(nll_chosen, chosen_avg_logp, rejected_avg_logp, lam) -> scalar`` (optionally a tuple whose
    first element is the loss), checked on hand-made values and, given a model and pairs, against
    ``trl.experimental.orpo.ORPOTrainer`` on the same batch."""
    from ..orpo import log_odds
    from ..orpo import orpo_loss as reference

    name = getattr(fn, "__name__", "orpo_loss")
    nll = torch.tensor(2.3)
    c, r = torch.tensor([-0.5, -1.2, -3.0]), torch.tensor([-0.9, -1.0, -4.0])
    for case, (n_, c_, r_, l_) in enumerate(
        [(nll, c, r, 0.1), (nll, c, r, 1.0), (torch.tensor(0.7), r, c, 0.5)]
    ):
        c_in = c_.clone().requires_grad_(True)
        got = _scalar(call_learner(fn, name, n_.clone(), c_in, r_.clone(), l_), name)
        ratio = log_odds(c_) - log_odds(r_)
        _loss_verdict(
            got,
            reference(n_, c_, r_, l_)[0],
            name,
            f"on case {case} where ORPO gives",
            lambda: [
                (
                    n_ + l_ * F.logsigmoid(ratio).mean(),
                    "the sign of the odds-ratio term is flipped: it should *reward* a large ratio",
                ),
                (
                    n_ - l_ * F.logsigmoid(c_ - r_).mean(),
                    "you used the log-probability ratio; ORPO uses the log *odds* ratio",
                ),
                (
                    -l_ * F.logsigmoid(ratio).mean(),
                    "the NLL term on the chosen answer is missing: ORPO is SFT plus a preference penalty",
                ),
            ],
            "L = nll - lam * mean(log sigmoid(log odds(chosen) - log odds(rejected)))",
            " from the log-probabilities",
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
