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

IGNORE = -100


def _logprob_cases():
    """``(what, logits, labels)`` batches, every one with distinct sizes in its three dimensions
    (a transposed batch and length, or batch and vocabulary, cannot line up): three plain ones; rows
    with no prompt (``labels[:, 0]`` labelled, which nothing predicts), with token id 0 labelled, with
    the last position labelled or not; a batch of one row (the course's loops run groups of rows of
    similar length, which can hold one); and a confident model's logits (tokens at about -150 nats,
    junk of +-1000 at the positions whose label is ignored)."""
    g = torch.Generator().manual_seed(2)
    cases = []
    for batch, seq, vocab in [(3, 9, 8), (2, 5, 6), (4, 12, 10)]:
        logits = torch.randn(batch, seq, vocab, generator=g) * 2
        labels = torch.full((batch, seq), IGNORE)
        for i in range(batch):
            start = 1 + (2 * i) % (seq - 2)
            stop = seq - (i % 2)
            labels[i, start:stop] = torch.randint(0, vocab, (stop - start,), generator=g)
        cases.append(("a batch", logits, labels))

    batch, seq, vocab = 5, 7, 11
    logits = torch.randn(batch, seq, vocab, generator=g) * 2
    labels = torch.randint(1, vocab, (batch, seq), generator=g)
    labels[1, :2] = labels[1, -1] = IGNORE  # a prompt, and padding at the end
    labels[2, -2:] = IGNORE  # no prompt, padding
    labels[3, :4] = IGNORE
    labels[4, 0] = IGNORE
    labels[0, 2] = labels[2, 0] = labels[3, 5] = labels[4, 3] = labels[4, 6] = 0  # token id 0 is a token
    cases.append(("rows with no prompt (labels[:, 0] labelled) and token id 0 labelled", logits, labels))

    batch, seq, vocab = 1, 10, 7
    logits = torch.randn(batch, seq, vocab, generator=g) * 2
    labels = torch.full((batch, seq), IGNORE)
    labels[0, 4:9] = torch.tensor([2, 0, 6, 3, 5])
    cases.append(("a batch of one row", logits, labels))

    batch, seq, vocab = 2, 6, 9
    labels = torch.full((batch, seq), IGNORE)
    labels[0, 2:5] = torch.tensor([4, 0, 7])
    labels[1, 1:] = torch.tensor([1, 8, 3, 0, 2])
    used = torch.zeros(batch, seq, dtype=torch.bool)
    used[:, :-1] = labels[:, 1:] != IGNORE
    logits = torch.where(
        used.unsqueeze(-1),
        torch.randn(batch, seq, vocab, generator=g) * 4,
        torch.randn(batch, seq, vocab, generator=g) * 1000,  # junk where nothing is predicted
    )
    for b, t in used.nonzero().tolist():  # the labelled token about 150 nats below the likeliest
        logits[b, t, labels[b, t + 1]] = logits[b, t].max() - 150 - t
    cases.append(
        (
            "a confident model's logits (log-probabilities near -150, junk on ignored positions)",
            logits,
            labels,
        )
    )

    return cases


def _pick(logp: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """``logp[b, t, labels[b, t]]``, token 0 where the label is -100."""
    return torch.gather(logp, 2, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1)


def _logprob_mistakes(logits, labels, average: bool) -> list:
    """``(wrong value, hint)``: what the usual mistakes give on this batch, for the summed
    (``average=False``, Chapter 4) or the averaged (Chapter 5) log-probabilities."""
    lp = logits.float().log_softmax(-1)
    tok, mask = _pick(lp[:, :-1], labels[:, 1:]), labels[:, 1:] != IGNORE
    count, width = mask.sum(-1), labels.size(1) - 1

    def reduce(values, keep, count=None):
        total = (values * keep).sum(-1)
        return total / (keep.sum(-1) if count is None else count) if average else total

    first = labels[:, 0] != IGNORE
    wrapped = (tok * mask).sum(-1) + _pick(lp[:, -1:], labels[:, :1]).squeeze(-1) * first
    unmasked = "the prompt is not masked: the -100 positions count (as token 0 after a clamp); keep only "
    unmasked += "the positions where labels[t+1] != -100"
    mistakes = [
        (
            (tok * mask).sum(-1) / count,
            "you averaged over tokens: DPO uses the *sum*, the log-probability of the whole response "
            "(ORPO, Chapter 5, is the one that averages)",
        )
        if not average
        else ((tok * mask).sum(-1), "that is the sum (DPO's); ORPO averages over the response's tokens"),
        (
            reduce(_pick(lp, labels), labels != IGNORE),
            "no shift: the logits at position t give the probability of the token at t+1",
        ),
        (
            wrapped / (count + first) if average else wrapped,
            "labels[:, 0] is never predicted (no position comes before it), yet it was counted: compare "
            "logits[:, :-1] with labels[:, 1:] (a shift with torch.roll wraps labels[:, 0] round to the "
            "last position)",
        ),
        (
            reduce(tok, labels[:, 1:] > 0),
            "token id 0 is a real token: only -100 marks a position to ignore (mask with labels != -100, "
            "not labels > 0)",
        ),
        (
            reduce(tok, labels[:, :-1] != IGNORE),
            "the mask is not shifted with the labels: position t counts when labels[t+1] != -100, so "
            "take the mask from labels[:, 1:], as you gather",
        ),
        (tok.sum(-1) / (width if average else 1), unmasked),
    ]
    if average:
        mistakes += [
            (tok.sum(-1) / count, unmasked),
            (
                (tok * mask).sum(-1) / (labels != IGNORE).sum(-1),
                "you counted the labelled tokens before the shift: labels[:, 0] is never predicted, so "
                "divide by the number of positions where labels[t+1] != -100",
            ),
            (
                (tok * mask).sum(-1) / width,
                "you divided by the row's length: divide by its number of labelled tokens",
            ),
            (
                (tok * mask).sum(-1) / (width + 1),
                "you divided by the row's length: divide by its number of labelled tokens",
            ),
            (
                (tok * mask).sum(-1) / count.sum(),
                "you divided by the whole batch's number of labelled tokens: divide each row by its own",
            ),
        ]
    return mistakes


def _runs_without_ignored(fn, name, logits, labels) -> bool:
    """Whether ``fn`` runs once the -100 labels are replaced by a real token id."""
    try:
        call_learner(fn, name, logits.detach().clone(), labels.clamp(min=0))
    except Exception:
        return False
    return True


def _check_labelled_logprobs(fn, name: str, average: bool) -> None:
    """The checks shared by Chapter 4's ``sequence_logprobs`` (``average=False``) and Chapter 5's
    ``average_logprobs``: on every batch of :func:`_logprob_cases`, first what it returns (the -100
    labels handled, one value per row), then the values, then their gradient with respect to the
    logits."""
    from ..logprobs import sequence_logprobs

    how = "average" if average else "sum"
    cases = _logprob_cases()
    results = []
    for what, logits, labels in cases:
        leaf = logits.clone().requires_grad_(True)
        try:
            got = call_learner(fn, name, leaf.clone(), labels.clone())
        except (RuntimeError, IndexError) as error:
            if not (labels == IGNORE).any() or not _runs_without_ignored(fn, name, logits, labels):
                raise
            raise CheckError(
                f"`{name}` failed on labels that hold -100 ({type(error).__name__}: {error}) and runs "
                "once they are replaced by a real token id: -100 marks a position to ignore, not a token, "
                "so torch.gather (or indexing) cannot look it up: mask the -100 labels before gathering - "
                "gather at a valid id in their place (labels.clamp(min=0), say), then leave those "
                "positions out with the mask labels != -100"
            ) from error
        batch = labels.size(0)
        if isinstance(got, torch.Tensor) and got.dim() == 0 and batch == 1:
            raise CheckError(
                f"`{name}` returned shape () on {what}; expected (1,): a .squeeze() without a dimension "
                "drops the batch dimension too, so squeeze the last one only (.squeeze(-1)). The course's "
                "loops run groups of rows of similar length, which can hold a single row"
            )
        results.append((leaf, expect_tensor(got, name, shape=(batch,))))

    references = []  # the course's values, kept with their graph for the gradients
    for i, ((what, logits, labels), (_, got)) in enumerate(zip(cases, results)):
        ref = logits.clone().requires_grad_(True)
        references.append((ref, sequence_logprobs(ref, labels, average=average)))
        want = references[-1][1].detach()
        value = got.detach().float()
        if torch.allclose(value, want, atol=1e-4):
            continue
        if not torch.isfinite(value).all():
            raise CheckError(
                f"`{name}` gave {value.tolist()} on case {i} ({what}) where the answer is {want.tolist()}: "
                "not finite. Take log-probabilities with log_softmax: log(softmax(...)) is log 0 = -inf "
                "for a token far below the likeliest, and exp() of large logits overflows"
            )
        hint = f"{how} log_softmax(logits)[t, labels[t+1]] over the positions where labels[t+1] != -100"
        hint = next(
            (h for v, h in _logprob_mistakes(logits, labels, average) if torch.allclose(value, v, atol=1e-4)),
            hint,
        )
        raise CheckError(
            f"`{name}` gave {value.tolist()} on case {i} ({what}) where the answer is {want.tolist()}: {hint}"
        )

    for i, ((what, _, labels), (leaf, got), (ref, ref_value)) in enumerate(zip(cases, results, references)):
        weights = torch.linspace(1.0, 2.0, labels.size(0))  # a different weight on every row
        (grad,) = (
            torch.autograd.grad((got.float() * weights).sum(), leaf, allow_unused=True)
            if got.requires_grad
            else (None,)
        )
        if grad is None:
            raise CheckError(
                f"`{name}` returned values with no gradient with respect to the logits (torch.no_grad(), "
                ".item() or .tolist(), torch.tensor(...) of computed values, or .detach() cut the graph): "
                "build the result from torch operations on the logits - the loss trains the model through it"
            )
        (want,) = torch.autograd.grad((ref_value * weights).sum(), ref)
        if not torch.allclose(grad, want, atol=1e-5, rtol=1e-4):
            raise CheckError(
                f"`{name}` gives the right values on case {i} ({what}) but the wrong gradient with respect "
                "to the logits: part of the computation is cut from the graph (a .detach(), on the "
                "log-softmax's normaliser say) or replaced by a constant. Compute it all with "
                "differentiable torch operations"
            )


@continues_with("from utils.logprobs import sequence_logprobs")
def check_sequence_logprobs(fn) -> None:
    """``fn(logits[batch, seq, vocab], labels[batch, seq]) -> [batch]``: the summed log-probability
    of each row's labelled (non -100) tokens, logits at t predicting labels at t+1."""
    name = getattr(fn, "__name__", "sequence_logprobs")
    _check_labelled_logprobs(fn, name, average=False)
    passed(f"`{name}`: summed, shifted, prompt-masked log-probabilities on 3 batches")


_DPO_ARGS = ("policy_chosen", "policy_rejected", "ref_chosen", "ref_rejected")


def _check_dpo_gradient(name, i, got, leaves, want) -> None:
    """``got``'s gradient with respect to the policy's log-probabilities must be eq. (7)'s; with
    respect to the reference's, eq. (7)'s or none (the frozen reference's log-probabilities may be
    detached: they are constants either way)."""
    grads = torch.autograd.grad(got, leaves, allow_unused=True)
    for arg, grad, expected in zip(_DPO_ARGS, grads, want):
        grad = torch.zeros_like(expected) if grad is None else grad
        if torch.allclose(grad, expected, atol=1e-6, rtol=1e-4):
            continue
        if not grad.any():
            if arg.startswith("ref_"):
                continue
            raise CheckError(
                f"`{name}` gives the right loss on case {i} but no gradient reaches `{arg}`: the policy's "
                "log-probabilities of *both* answers must stay in the graph (no .detach(), .item() or "
                "torch.no_grad() on them) - DPO learns by raising the chosen answer and lowering the "
                "rejected one. Only the reference's log-probabilities are constants"
            )
        raise CheckError(
            f"`{name}` gives the right loss on case {i} but the wrong gradient with respect to `{arg}` "
            f"({grad.tolist()} where eq. (7) gives {expected.tolist()}): part of it is cut from the graph "
            "(a .detach() inside the log-sigmoid) or computed apart from the loss. Write the loss with "
            "plain differentiable torch operations"
        )


@continues_with("from utils.dpo import dpo_loss")
def check_dpo_loss(fn, policy=None, reference=None, tokenizer=None, pairs=None, beta: float = 0.1) -> None:
    """``fn(policy_chosen, policy_rejected, ref_chosen, ref_rejected, beta) -> scalar`` (mean over the batch).

    Checked on hand-made log-probabilities (edge cases included; the value and the gradient with
    respect to every input) and, when models and pairs are given, against ``trl.DPOTrainer``'s loss
    on the same models and batch.
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
        (
            torch.tensor([-12.5, -0.2, -33.0, -7.1, -50.0]),
            torch.tensor([-14.0, -0.9, -20.0, -7.1, -2.0]),
            torch.tensor([-13.0, -0.1, -30.0, -6.0, -49.0]),
            torch.tensor([-13.2, -1.5, -25.0, -8.4, -1.0]),
            2.0,
        ),  # beta above 1 with both reference terms, irregular
    ]
    results = []  # every case's value first, then every case's gradient
    for i, (pc, pr, rc, rr, b) in enumerate(cases):
        leaves = [t.clone().requires_grad_(True) for t in (pc, pr, rc, rr)]
        got = _scalar(call_learner(fn, name, *(t.clone() for t in leaves), b), name)
        results.append((got, leaves))
        margin = (pc - rc) - (pr - rr)
        if not torch.isfinite(got):
            raise CheckError(
                f"`{name}` returned {got.item()} on case {i}, where beta times the log-ratio difference "
                f"reaches {(b * margin).min().item():g}: -log sigmoid(x) must stay finite there. Use "
                "F.logsigmoid: torch.log(torch.sigmoid(x)) underflows to log 0, and log(1 + exp(-x)) "
                "overflows"
            )
        _loss_verdict(
            got,
            want(pc, pr, rc, rr, b),
            name,
            f"on case {i} where the DPO loss is",
            lambda: [
                (
                    -F.logsigmoid(-b * margin).mean(),
                    "the sign is flipped: the loss should fall as the chosen response gains probability "
                    "(the same value comes from swapping chosen and rejected, or from taking each "
                    "log-ratio as reference minus policy)",
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
                (
                    -F.logsigmoid(b * margin.mean()),
                    "average -log sigmoid(...) over the batch, not the log-ratio difference before it",
                ),
                (
                    -F.logsigmoid(b * ((pc + rc) - (pr + rr))).mean(),
                    "the reference's log-probabilities are added: subtract them (log pi - log pi_ref)",
                ),
                (
                    -F.logsigmoid(b * (pc - pr) - (rc - rr)).mean(),
                    "beta scales the whole log-ratio difference, the reference's terms too",
                ),
                *[
                    (
                        want(pc, pr, rc, rr, other),
                        f"the beta it is given ({b}) is not used: that is the loss at beta = {other}",
                    )
                    for other in (0.1, 1.0)
                    if other != b
                ],
            ],
            "compare with eq. (7): -log sigmoid(beta * ((pi_c - ref_c) - (pi_r - ref_r)))",
            ": the policy log-probs need a gradient",
        )
    for i, ((pc, pr, rc, rr, b), (got, leaves)) in enumerate(zip(cases, results)):
        exact = [t.clone().requires_grad_(True) for t in (pc, pr, rc, rr)]
        _check_dpo_gradient(name, i, got, leaves, torch.autograd.grad(want(*exact, b), exact))
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


# --- section 8: two losses for noisy labels ----------------------------------------------------
def _margin_cases():
    """Batches of four summed log-probabilities in float32 (distinct sizes; margins from a fraction
    of a nat to hundreds, where a naive log(sigmoid) underflows), with leaves to take gradients on."""
    g = torch.Generator().manual_seed(8)
    cases = []
    for batch, scale in [(5, 3.0), (3, 40.0), (7, 0.5)]:
        pc, pr, rc, rr = (-(torch.rand(batch, generator=g) * scale * 4) for _ in range(4))
        cases.append(tuple(x.requires_grad_(True) for x in (pc, pr, rc, rr)))
    return cases


def _noisy_label_verdict(name, fn, want_fn, settings, mistakes, default_hint):
    """Compare ``fn`` with ``want_fn`` in value and in gradient on every case and setting; on a
    mismatch, name the first of ``mistakes(args, setting)`` - ``(loss function, hint)`` - that
    ``fn`` equals in value, else ``default_hint``."""
    for i, case in enumerate(_margin_cases()):
        for setting in settings:
            where = (
                f"(batch of {case[0].shape[0]}, " + ", ".join(f"{k}={v}" for k, v in setting.items()) + ")"
            )
            got = _scalar(call_learner(fn, name, *case, **setting), name)
            want = want_fn(*case, **setting)
            if not torch.isfinite(got).all():
                raise CheckError(
                    f"`{name}` gave {got.item()} {where}, where the margins reach {_span(case):.0f} nats: "
                    "compute log(sigmoid(x)) as F.logsigmoid(x), which stays finite"
                )
            if not torch.allclose(got.detach().float(), want.detach(), rtol=1e-4, atol=1e-6):
                hint = next(
                    (
                        h
                        for wrong, h in mistakes(setting)
                        if torch.allclose(
                            got.detach().float(), wrong(*case, **setting).detach(), rtol=1e-4, atol=1e-6
                        )
                    ),
                    default_hint,
                )
                raise CheckError(
                    f"`{name}` gave {got.item():.5f} {where}; expected {want.item():.5f}: {hint}"
                )
            if not got.requires_grad:
                raise CheckError(
                    f"`{name}`'s result is detached: the loss must carry a gradient to the policy"
                )
            mine = torch.autograd.grad(got, case[:2], allow_unused=True)
            theirs = torch.autograd.grad(want, case[:2])
            for which, a, b in zip(("chosen", "rejected"), mine, theirs):
                if a is None or not torch.allclose(a.float(), b, rtol=1e-4, atol=1e-6):
                    raise CheckError(
                        f"`{name}` has the right value {where} but not the right gradient with respect to "
                        f"the policy's {which} log-probabilities: is a term detached (`.detach()`, "
                        "`.item()`, a Python float) or computed outside the graph?"
                    )
    cases = _margin_cases()
    return len(cases), max(_span(c) for c in cases)


def _span(case) -> float:
    pc, pr, rc, rr = case
    return float(((pc - rc) - (pr - rr)).detach().abs().max())


@continues_with("from utils.dpo import conservative_dpo_loss")
def check_conservative_dpo_loss(fn) -> None:
    """``fn(policy_chosen, policy_rejected, ref_chosen, ref_rejected, beta, epsilon) -> loss``: the
    conservative DPO loss (batch mean) against the course's, in value and gradient, at several
    β and ε together and at margins large enough to break a naive form."""
    from ..dpo import conservative_dpo_loss, dpo_loss

    name = getattr(fn, "__name__", "conservative_dpo_loss")

    def mistakes(setting):
        return [
            (
                lambda *a, beta, epsilon: dpo_loss(*a, beta),
                "this is plain DPO's loss: either `epsilon` is ignored, or the flipped label's term "
                "keeps the margin's sign (it is log σ(-βh), not log σ(βh))",
            ),
            (
                lambda *a, beta, epsilon: conservative_dpo_loss(*a, beta=beta, epsilon=1 - epsilon),
                "ε and 1 - ε are swapped: ε, the chance the label is flipped, weighs the term of the "
                "flipped label, log σ(-βh)",
            ),
            (
                lambda *a, beta, epsilon: conservative_dpo_loss(*a, beta=1.0, epsilon=epsilon),
                "β is missing: the sigmoid's argument is β·h",
            ),
            (
                lambda *a, beta, epsilon: (
                    conservative_dpo_loss(*a, beta=beta, epsilon=epsilon) * a[0].shape[0]
                ),
                "that is the sum over the batch; return the mean",
            ),
            (
                lambda pc, pr, rc, rr, beta, epsilon: conservative_dpo_loss(pc, pr, rr, rc, beta, epsilon),
                "the reference's log-probabilities are swapped: h subtracts each answer's own reference "
                "log-probability (chosen from chosen, rejected from rejected)",
            ),
        ]

    settings = [{"beta": 0.1, "epsilon": 0.1}, {"beta": 0.5, "epsilon": 0.3}, {"beta": 2.0, "epsilon": 0.05}]
    n, span = _noisy_label_verdict(
        name,
        fn,
        conservative_dpo_loss,
        settings,
        mistakes,
        "the loss is -(1 - ε) log σ(βh) - ε log σ(-βh), with h the chosen answer's log-ratio to the "
        "reference minus the rejected one's, averaged over the batch",
    )
    passed(
        f"`{name}` matches conservative DPO's loss and its gradients on {n} batches, at three (β, ε) "
        f"settings and margins up to {span:.0f} nats"
    )


@continues_with("from utils.dpo import ipo_loss")
def check_ipo_loss(fn) -> None:
    """``fn(policy_chosen, policy_rejected, ref_chosen, ref_rejected, beta) -> loss``: IPO's loss
    (Azar et al. 2024, eq. 17; batch mean) against the course's, in value and gradient, at several β."""
    from ..dpo import ipo_loss

    name = getattr(fn, "__name__", "ipo_loss")

    def h(pc, pr, rc, rr):
        return (pc - rc) - (pr - rr)

    def mistakes(setting):
        return [
            (
                lambda *a, beta: ((h(*a) - 1 / beta) ** 2).mean(),
                "the target is 1/(2β), not 1/β",
            ),
            (
                lambda *a, beta: ((beta * h(*a) - 0.5) ** 2).mean(),
                "β multiplies h: IPO squares the distance of h itself from its target 1/(2β) (β sets "
                "only the target)",
            ),
            (lambda *a, beta: (h(*a) ** 2).mean(), "the target is missing: h is pulled to 1/(2β), not to 0"),
            (
                lambda *a, beta: ((-h(*a) - 1 / (2 * beta)) ** 2).mean(),
                "h has the wrong sign: the chosen answer's log-ratio minus the rejected one's",
            ),
            (
                lambda pc, pr, rc, rr, beta: (((pc - pr) - 1 / (2 * beta)) ** 2).mean(),
                "the reference is missing: h is a difference of log-ratios to the reference",
            ),
            (
                lambda *a, beta: ((h(*a) - 1 / (2 * beta)) ** 2).sum(),
                "that is the sum over the batch; return the mean",
            ),
            (
                lambda *a, beta: (h(*a) - 1 / (2 * beta)).abs().mean(),
                "IPO's loss is the *square* of the distance to the target",
            ),
        ]

    settings = [{"beta": 0.1}, {"beta": 0.5}, {"beta": 2.0}]
    n, span = _noisy_label_verdict(
        name,
        fn,
        ipo_loss,
        settings,
        mistakes,
        "the loss is (h - 1/(2β))², with h the chosen answer's log-ratio to the reference minus the "
        "rejected one's, averaged over the batch",
    )
    passed(
        f"`{name}` matches IPO's loss (Azar et al. 2024, eq. 17) and its gradients on {n} batches, "
        f"at three β and margins up to {span:.0f} nats"
    )
