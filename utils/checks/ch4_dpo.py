"""Chapter 4 checkers: DPO - summed sequence log-probabilities and the DPO loss (also against
``trl.DPOTrainer``)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

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


def _logprob_cases():
    g = torch.Generator().manual_seed(2)
    cases = []
    for batch, seq, vocab in [(3, 9, 8), (2, 5, 6), (4, 12, 10)]:
        logits = torch.randn(batch, seq, vocab, generator=g) * 2
        labels = torch.full((batch, seq), -100)
        for i in range(batch):
            start = 1 + (2 * i) % (seq - 2)
            stop = seq - (i % 2)
            labels[i, start:stop] = torch.randint(0, vocab, (stop - start,), generator=g)
        ids = torch.where(labels == -100, torch.randint(0, vocab, (batch, seq), generator=g), labels)
        cases.append((logits, labels, ids))
    return cases


@continues_with("from utils.logprobs import sequence_logprobs")
def check_sequence_logprobs(fn) -> None:
    """``fn(logits[batch, seq, vocab], labels[batch, seq]) -> [batch]``: the summed log-probability
    of each row's labelled (non -100) tokens, logits at t predicting labels at t+1."""
    from ..logprobs import sequence_logprobs as reference

    name = getattr(fn, "__name__", "sequence_logprobs")
    for i, (logits, labels, ids) in enumerate(_logprob_cases()):
        got = expect_tensor(
            call_learner(fn, name, logits.clone(), labels.clone()), name, shape=(labels.size(0),)
        )
        want = reference(logits, labels)
        if torch.allclose(got.float(), want, atol=1e-4):
            continue
        lp = logits.log_softmax(-1)
        shifted_mask = labels[:, 1:] != -100
        tok = torch.gather(lp[:, :-1], 2, labels[:, 1:].clamp(min=0).unsqueeze(-1)).squeeze(-1)
        hint = "sum log_softmax(logits)[t, labels[t+1]] over the positions where labels[t+1] != -100"
        if torch.allclose(got.float(), (tok * shifted_mask).sum(-1) / shifted_mask.sum(-1), atol=1e-4):
            hint = (
                "you averaged over tokens: DPO uses the *sum*, the log-probability of the whole response "
                "(ORPO, Chapter 5, is the one that averages)"
            )
        elif torch.allclose(
            got.float(),
            (torch.gather(lp, 2, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1) * (labels != -100)).sum(-1),
            atol=1e-4,
        ):
            hint = "no shift: the logits at position t give the probability of the token at t+1"
        elif torch.allclose(
            got.float(), torch.gather(lp[:, :-1], 2, ids[:, 1:].unsqueeze(-1)).squeeze(-1).sum(-1), atol=1e-4
        ):
            hint = "the prompt is not masked: only count positions whose label is not -100"
        raise CheckError(
            f"`{name}` gave {got.tolist()} on case {i} where the answer is {want.tolist()}: {hint}"
        )
    passed(f"`{name}`: summed, shifted, prompt-masked log-probabilities on 3 batches")


@continues_with("from utils.dpo import dpo_loss")
def check_dpo_loss(fn, policy=None, reference=None, tokenizer=None, pairs=None, beta: float = 0.1) -> None:
    """``fn(policy_chosen, policy_rejected, ref_chosen, ref_rejected, beta) -> scalar`` (mean over the batch).

    Checked on hand-made log-probabilities (edge cases included) and, when models and pairs are
    given, against ``trl.DPOTrainer``'s loss on the same models and batch.
    """
    name = getattr(fn, "__name__", "dpo_loss")

    def want(pc, pr, rc, rr, b):
        return -F.logsigmoid(b * ((pc - rc) - (pr - rr))).mean()

    cases = [
        (
            torch.tensor([-5.0, -3.0, -8.0]),
            torch.tensor([-6.0, -2.5, -9.0]),
            torch.tensor([-5.5, -3.0, -7.0]),
            torch.tensor([-5.5, -3.0, -9.5]),
            0.1,
        ),
        (
            torch.tensor([-1.0]),
            torch.tensor([-1.0]),
            torch.tensor([-1.0]),
            torch.tensor([-1.0]),
            0.5,
        ),  # log 2
        (
            torch.tensor([-2.0, -40.0]),
            torch.tensor([-60.0, -1.0]),
            torch.tensor([-2.0, -40.0]),
            torch.tensor([-2.0, -200.0]),
            1.0,
        ),  # huge margins, either way: must not overflow
    ]
    for i, (pc, pr, rc, rr, b) in enumerate(cases):
        pc_ = pc.clone().requires_grad_(True)
        got = _scalar(call_learner(fn, name, pc_, pr.clone(), rc.clone(), rr.clone(), b), name)
        if not torch.isfinite(got):
            raise CheckError(
                f"`{name}` returned {got.item()} on case {i} (large log-prob gaps): use F.logsigmoid, "
                "not torch.log(torch.sigmoid(...)), which underflows"
            )
        margin = (pc - rc) - (pr - rr)
        _loss_verdict(
            got,
            want(pc, pr, rc, rr, b),
            name,
            f"on case {i} where the DPO loss is",
            lambda: [
                (
                    -F.logsigmoid(-b * margin).mean(),
                    "the sign is flipped: the loss should fall as the chosen response gains probability",
                ),
                (
                    -F.logsigmoid(b * (pc - pr)).mean(),
                    (
                        "the reference model is missing: subtract its log-probabilities "
                        "(that is what anchors the policy)"
                    ),
                ),
                (
                    (-b * F.logsigmoid(margin)).mean(),
                    "beta belongs inside the sigmoid, scaling the log-ratio difference",
                ),
                (-F.logsigmoid(b * margin).sum(), "average over the batch instead of summing"),
            ],
            "compare with eq. (7): -log sigmoid(beta * ((pi_c - ref_c) - (pi_r - ref_r)))",
            ": the policy log-probs need a gradient",
        )
    message = f"`{name}` matches the DPO loss on hand-made cases (log 2 at equal log-probs, no overflow)"
    if policy is not None:
        message += _compare_with_dpo_trainer(fn, name, policy, reference, tokenizer, pairs, beta)
    passed(message)


def _compare_with_dpo_trainer(fn, name, policy, reference, tokenizer, pairs, beta) -> str:
    from trl import DPOConfig, DPOTrainer

    from ..logprobs import sequence_logprobs

    def logprobs(trainer, batch, n):  # the batch holds the n chosen rows, then the n rejected ones
        labels = batch["input_ids"].masked_fill(batch["completion_mask"] == 0, -100)
        kw = dict(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
        lp = sequence_logprobs(trainer.model(**kw).logits, labels)
        lr = sequence_logprobs(trainer.ref_model(**kw).logits, labels)
        return lp[:n], lp[n:], lr[:n], lr[n:], beta

    return compare_with_trl_trainer(
        fn,
        name,
        trainer_cls=DPOTrainer,
        config_cls=DPOConfig,
        models={"model": policy, "ref_model": reference},
        tokenizer=tokenizer,
        pairs=pairs,
        tag="dpo",
        beta=beta,
        activation_checkpointing=False,
        max_length=256,
        trl_loss=lambda trainer, batch: trainer.compute_loss(trainer.model, dict(batch)),
        learner_inputs=logprobs,
        who="trl.DPOTrainer",
        whose="trl.DPOTrainer's",
        note=f" (beta={beta})",
    )
