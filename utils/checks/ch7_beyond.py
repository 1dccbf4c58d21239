"""Chapter 7 checkers: GRPO's group advantages, the k3 KL estimator, the GRPO loss (also against
``trl.GRPOTrainer``'s on the same batch) and the verifiable reward."""

from __future__ import annotations

import inspect

import torch

from ..config import fit_trl_logprob_tiles
from .core import (
    CheckError,
    _learners_frames,
    _loss_verdict,
    _scalar,
    call_learner,
    continues_with,
    expect_tensor,
    passed,
)

EPS = 1e-4  # added to the group's standard deviation, as TRL does
_SHAPE_WORDS = ("size of tensor", "shape", "dimension", "expanded size", "broadcast", "size mismatch")


def _call(fn, name: str, shapes: str, *args, **kwargs):
    """:func:`call_learner`; a shape error raised in the learner's own code (an advantage not
    broadcast over the tokens, a mean without ``keepdim``) keeps the learner's traceback, with a note
    of the shapes the function was given and the shape it should return."""
    try:
        return call_learner(fn, name, *args, **kwargs)
    except (RuntimeError, IndexError) as error:
        text = str(error).strip().lower()
        if _learners_frames(error.__traceback__) and any(w in text for w in _SHAPE_WORDS):
            error.add_note(f"Shapes: {shapes}")
        raise


def _accepts(fn, keyword: str) -> bool:
    try:
        return keyword in inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return False


# --- group advantages ------------------------------------------------------------------------
def _advantage_cases():
    d = 2.0**-11  # a spread of 0.0005 in the group, where the 1e-4 added to its std matters
    return [
        (torch.tensor([1.0, 0.0, 0.0, 1.0, 0.5, 0.5, 0.5, 0.5, 0.25 + d, 0.25, 0.25 - d, 0.25]), 4),
        # 3.7 three times: a variance computed as E[x^2] - E[x]^2 rounds below 0 there (NaN); 5000: it
        # cancels to nothing on rewards far from 0
        (torch.tensor([0.3, -1.2, 2.0, 0.7, -0.4, 1.1, 3.7, 3.7, 3.7, 5000.5, 4999.0, 5001.25]), 3),
        (torch.tensor([2.0, -1.0, 0.5, 0.5, -3.0, 4.0, 1.0, 0.0, 0.25, 0.25]), 2),
    ]  # groups x group size: 3 x 4, 4 x 3, 5 x 2, never square


def _advantage_shapes(r: torch.Tensor, g: int) -> str:
    n = len(r) // g
    return (
        f"rewards is [{len(r)}] in groups of {g}: rewards.view(-1, {g}) is [{n}, {g}] ({n} groups of {g} "
        f"answers); a group's mean or std with keepdim=True is [{n}, 1] and broadcasts over its answers; "
        f"return [{len(r)}], one advantage per answer"
    )


def _advantage_mistakes(r: torch.Tensor, g: int, scale: bool):
    """(wrong answer, hint) pairs for the usual mistakes."""
    rows = r.view(-1, g)
    centred = rows - rows.mean(1, keepdim=True)
    batch = r - r.mean()
    yield (
        batch / (r.std() + EPS) if scale else batch,
        "you used the whole batch's mean (and std): GRPO's baseline is the mean reward of the answers "
        "to the *same prompt* (one group)",
    )
    if scale:
        yield (
            (centred / (rows.std(1, unbiased=False, keepdim=True) + EPS)).flatten(),
            "that is the population standard deviation (unbiased=False); TRL, and this course, use the "
            "sample one (torch's default)",
        )
        yield centred.flatten(), "with scale=True, divide by the group's standard deviation (+ 1e-4)"
        yield (
            (centred / (r.std() + EPS)).flatten(),
            "you divided by the whole batch's std (TRL's scale_rewards='batch'); this course divides by "
            "each group's own standard deviation",
        )
        std = rows.std(1, keepdim=True)
        spread = "it differs on a group whose rewards differ by less than 1e-3 (the third group of case 0)"
        yield (
            torch.where(std > 0, centred / std, 0.0).flatten(),
            "you divide by the bare std wherever it is not 0 (a std.clamp(min=eps), or a torch.where or "
            f"nan_to_num that only guards std == 0): add eps to it, (std + eps); {spread}",
        )
        yield (
            (centred / (rows.var(1, keepdim=True) + EPS).sqrt()).flatten(),
            f"add eps to the standard deviation, (std + eps), not to the variance inside the sqrt; {spread}",
        )
    else:
        yield (
            (centred / (rows.std(1, keepdim=True) + EPS)).flatten(),
            "scale=False is Dr. GRPO: subtract the group's mean, do not divide by its std",
        )
    cols = r.view(g, -1).T  # groups taken as every (B/G)-th answer: the wrong layout
    wrong = cols - cols.mean(1, keepdim=True)
    if scale:
        wrong = wrong / (cols.std(1, keepdim=True) + EPS)
    yield (
        wrong.T.flatten(),
        "a group is `group_size` *consecutive* answers: rewards.view(-1, group_size), one row per prompt",
    )


def _expect_advantages(got, name: str, r: torch.Tensor, g: int) -> torch.Tensor:
    """A tensor of one advantage per answer, ``[B]``; a per-group shape is named."""
    n = len(r) // g
    if isinstance(got, torch.Tensor) and tuple(got.shape) == (n, g):
        raise CheckError(
            f"`{name}` returned shape {tuple(got.shape)}, one row per group; expected ({len(r)},): "
            "flatten the rows back, one advantage per answer in the rewards' order"
        )
    if isinstance(got, torch.Tensor) and tuple(got.shape) in {(n,), (n, 1)}:
        raise CheckError(
            f"`{name}` returned shape {tuple(got.shape)}, one number per group; expected ({len(r)},): "
            "every answer gets its own advantage, its reward minus its group's mean"
        )
    return expect_tensor(got, name, shape=r.shape)


def _not_finite(got: torch.Tensor, r: torch.Tensor, g: int, name: str, i: int) -> CheckError:
    """Which group came out NaN or inf, and the two ways that happens."""
    bad = next(k for k, row in enumerate(got.view(-1, g)) if not torch.isfinite(row).all())
    rewards = r.view(-1, g)[bad]
    where = f"`{name}` returned {got.view(-1, g)[bad].tolist()} for the group {rewards.tolist()} of case {i}"
    if (rewards == rewards[0]).all():
        return CheckError(
            f"{where}, whose answers all scored the same: its advantages are 0 (no signal), not NaN. Its "
            "standard deviation is 0: add 1e-4 to the std before dividing - or, if you do, your variance "
            "came out slightly below 0 (E[x^2] - E[x]^2 rounds there): take the mean of the squared "
            "deviations from the mean (torch's std does)"
        )
    return CheckError(
        f"{where}: a division by 0, or a variance that came out below 0 (E[x^2] - E[x]^2 cancels on "
        "rewards far from 0): subtract the group's mean first, then square (torch's std does), and add "
        "1e-4 to the std"
    )


@continues_with("from utils.grpo import group_advantages")
def check_group_advantages(fn) -> None:
    """``fn(rewards[B], group_size, scale=True) -> [B]``: reward minus its group's mean, divided (with
    ``scale``) by the group's sample standard deviation + 1e-4; groups are consecutive.

    Also: ``rewards`` is left as it was; a group whose rewards are all equal gets 0 (not NaN), also where
    a shortcut's variance rounds below 0; the 1e-4 is added to the std (a group of tiny spread shows
    a clamp); rewards far from 0 (5000) do not cancel; and, where ``fn`` takes ``eps``, it honours it
    together with ``scale``."""
    from ..grpo import group_advantages as reference

    name = getattr(fn, "__name__", "group_advantages")
    for i, (r, g) in enumerate(_advantage_cases()):
        for scale in (True, False):
            given = r.clone()
            got = _expect_advantages(_call(fn, name, _advantage_shapes(r, g), given, g, scale), name, r, g)
            if not torch.equal(given, r):
                raise CheckError(
                    f"`{name}` changed `rewards` in place (an in-place -= or /= on it, or on a view of "
                    "it): the loop still reads the rewards after the advantages (its logged reward and "
                    "its no-signal count); compute the advantages into a new tensor"
                )
            want = reference(r, g, scale)
            if torch.allclose(got.float(), want, atol=1e-4):
                continue
            if not torch.isfinite(got).all():
                raise _not_finite(got.float(), r, g, name, i)
            default = "advantage = (reward - its group's mean) / (its group's std + 1e-4)"
            far = (r.view(-1, g).mean(1).abs() > 100).repeat_interleave(g)  # the rewards near 5000
            if scale and far.any() and torch.allclose(got.float()[~far], want[~far], atol=1e-4):
                default = (
                    "right, except on the group of rewards near 5000: your standard deviation loses its "
                    "precision there (E[x^2] - E[x]^2 cancels); subtract the group's mean first, then "
                    "square (torch's std does)"
                )
            hint = next(
                (h for v, h in _advantage_mistakes(r, g, scale) if torch.allclose(got.float(), v, atol=1e-4)),
                default,
            )
            raise CheckError(
                f"`{name}` gave {[round(x, 4) for x in got.tolist()]} on case {i} (group_size={g}, "
                f"scale={scale}) where the answer is {[round(x, 4) for x in want.tolist()]}: {hint}"
            )
    if _accepts(fn, "eps"):  # the option a learner must honour together with scale
        r, g = _advantage_cases()[0]
        for scale in (True, False):
            got = _expect_advantages(
                _call(fn, name, _advantage_shapes(r, g), r.clone(), g, scale, eps=0.5), name, r, g
            )
            want = reference(r, g, scale, eps=0.5)
            if torch.allclose(got.float(), want, atol=1e-4):
                continue
            ignored = torch.allclose(got.float(), reference(r, g, scale), atol=1e-4)
            raise CheckError(
                f"`{name}` gave {[round(x, 4) for x in got.tolist()]} with scale={scale}, eps=0.5 (case 0) "
                f"where the answer is {[round(x, 4) for x in want.tolist()]}: "
                + (
                    "it ignores its `eps` argument (a fixed 1e-4?): divide by (std + eps)"
                    if ignored
                    else "with scale, divide by (the group's std + eps); without it, eps plays no part"
                )
            )
    passed(f"`{name}`: the group's mean as baseline, its std as normaliser (or not), on 3 batches")


# --- the k3 estimator ------------------------------------------------------------------------
def _k3_cases():
    """``(logprobs, ref_logprobs, what)``: ordinary log-ratios, then log-ratios up to +-20 (ratios of
    e^20 = 5e8, where a clamped k3 or log-ratio, as some libraries use, differs), all log-probs <= 0."""
    g = torch.Generator().manual_seed(7)
    logp = -torch.rand(3, 6, generator=g) * 4
    ref = logp + torch.randn(3, 6, generator=g)
    gaps = torch.tensor(
        [
            [20.0, -20.0, 12.0, -0.3, 0.0],
            [-12.0, 3.0, -3.0, 15.0, 0.5],
            [0.2, -15.0, 7.0, -7.0, 1.5],
            [-1.0, 10.5, -10.5, 18.0, -18.0],
        ]
    )
    base = -torch.rand(4, 5, generator=g) * 3 - 0.01
    far_logp, far_ref = base - gaps.clamp(min=0), base - (-gaps).clamp(min=0)  # ref - logp = gaps
    return [(logp, ref, "on ordinary log-ratios"), (far_logp, far_ref, "on log-ratios up to +-20")]


def _k3_value_hint(got: torch.Tensor, log_r: torch.Tensor, want: torch.Tensor) -> str:
    flipped = torch.exp(-log_r) + log_r - 1
    hints = [
        (flipped, "the ratio is upside down: r = pi_ref / pi, i.e. log r = ref_logprobs - logprobs"),
        (-log_r, "that is k1 (log pi - log pi_ref): unbiased too, but it can be negative token by token"),
        (log_r, "that is -k1 (log pi_ref - log pi): k3 = exp(log r) - log r - 1"),
        (0.5 * log_r**2, "that is k2 (half the squared log-ratio): never negative but biased"),
    ]
    hint = next((h for v, h in hints if torch.allclose(got, v, atol=1e-5)), None)
    if hint is not None:
        return hint
    near = log_r.abs() <= 1
    if near.any() and torch.allclose(got[near], want[near], atol=1e-5):
        return (
            "right near the reference, wrong far from it: did you clamp k3 or the log-ratio (as verl's "
            "low_var_kl does), or approximate exp? The exercise's k3 is exp(log r) - log r - 1 at any gap"
        )
    return "k3 = exp(log r) - log r - 1"


@continues_with("from utils.grpo import kl_k3")
def check_kl_k3(fn) -> None:
    """``fn(logprobs, ref_logprobs) -> same shape``: ``exp(ref - logp) - (ref - logp) - 1`` per token.

    Also on log-ratios up to +-20; and its gradient with respect to ``logprobs`` (``1 - r``: the pull
    back to the reference that GRPO's penalty is for) must be k3's, not that of a detached piece."""
    from ..grpo import kl_estimates

    name = getattr(fn, "__name__", "kl_k3")
    for logp, ref, what in _k3_cases():
        shapes = (
            f"logprobs and ref_logprobs are {list(logp.shape)}; k3 is per token: return {list(logp.shape)}"
        )
        lp = logp.clone().requires_grad_(True)
        got = expect_tensor(_call(fn, name, shapes, lp, ref.clone()), name, shape=logp.shape)
        log_r = ref - logp
        want = torch.exp(log_r) - log_r - 1
        if not torch.allclose(got.detach().float(), want, atol=1e-5):
            raise CheckError(
                f"`{name}` does not give k3 {what}: {_k3_value_hint(got.detach().float(), log_r, want)}"
            )
        if not got.requires_grad:
            raise CheckError(
                f"`{name}`'s result is detached from `logprobs` (torch.no_grad(), .detach(), .item()?): "
                "GRPO's KL penalty pulls the policy back to the reference only through its gradient"
            )
        weights = torch.linspace(0.5, 1.5, logp.numel()).view(logp.shape)
        (grad,) = torch.autograd.grad((got * weights).sum(), lp, allow_unused=True)
        grad = torch.zeros_like(logp) if grad is None else grad
        lp_ref = logp.clone().requires_grad_(True)
        (want_grad,) = torch.autograd.grad((kl_estimates(lp_ref, ref)["k3"] * weights).sum(), lp_ref)
        if not torch.allclose(grad.float(), want_grad, rtol=1e-4, atol=1e-5):
            ratio = torch.exp(log_r)
            if torch.allclose(grad.float(), weights, rtol=1e-4, atol=1e-5):
                hint = "the ratio exp(log r) is detached: its gradient is what pulls pi towards pi_ref"
            elif torch.allclose(grad.float(), -ratio * weights, rtol=1e-4, atol=1e-5):
                hint = "the - log r term is detached"
            elif torch.allclose(grad.float(), torch.zeros_like(grad), atol=1e-8):
                hint = "it carries no gradient to `logprobs` at all"
            else:
                hint = "a piece of it is detached (.detach(), .data) or rebuilt from plain numbers"
            raise CheckError(
                f"`{name}` gives k3's values {what} but not its gradient with respect to `logprobs` "
                f"(1 - r per token): {hint}"
            )
    logp = _k3_cases()[0][0]
    same = expect_tensor(
        _call(fn, name, f"logprobs and ref_logprobs are both {list(logp.shape)}", logp.clone(), logp.clone()),
        name,
        shape=logp.shape,
    )
    if not torch.allclose(same.detach().float(), torch.zeros_like(logp), atol=1e-6):
        raise CheckError(f"`{name}` is not 0 where the policy equals the reference")
    passed(f"`{name}`: exp(log r) - log r - 1 with log r = log pi_ref - log pi; >= 0 and 0 at pi = pi_ref")


# --- the GRPO loss ---------------------------------------------------------------------------
def _loss_cases():
    g = torch.Generator().manual_seed(3)
    cases = []
    for batch, seq, beta in [(4, 5, 0.04), (6, 7, 0.0), (3, 4, 0.5)]:
        old = -torch.rand(batch, seq, generator=g) * 3
        logp = old + 0.4 * torch.randn(batch, seq, generator=g)  # ratios far enough from 1 to be clipped
        ref = old + 0.3 * torch.randn(batch, seq, generator=g)
        adv = torch.randn(batch, generator=g)
        mask = torch.ones(batch, seq)
        for i in range(batch):
            mask[i, seq - 1 - i % (seq - 1) :] = 0  # answers of different lengths
        cases.append((logp, old, ref, adv, mask, 0.2, beta))
    return cases


# each batch again with another clip and beta, so that both options are honoured together (an if/elif
# that reads `clip` only without the KL term, or a fixed 0.2, shows), beta = 0 included
_OTHER_OPTIONS = [(0.1, 0.3), (0.3, 0.0), (0.05, 0.5)]


def _far(case):
    """The batch with log-ratios of +-20 on two answers' first tokens (ratios of e^20, where a clamped
    ratio, log-ratio or k3 differs; both signs of advantage, so both sides of the clip) and extreme junk on
    the padding (ratios of e^30 that only the mask removes). Every log-prob stays <= 0."""
    logp, old, ref, adv, mask, clip, beta = (x.clone() if isinstance(x, torch.Tensor) else x for x in case)
    adv[0], adv[1] = -abs(adv[0]) - 0.5, abs(adv[1]) + 0.5
    for i in range(2):  # answers 0 and 1 are at least 2 tokens long
        logp[i, 0], old[i, 0], ref[i, 0] = -2.0, -22.0, -22.0  # ratio e^20, k3 at log r = -20
        logp[i, 1], old[i, 1], ref[i, 1] = -21.5, -1.5, -1.5  # ratio e^-20, k3 at log r = +20: 5e8
    pad = mask == 0
    logp[pad], old[pad], ref[pad] = 0.0, -30.0, -40.0  # finite junk: the reference's masked mean stays finite
    return logp, old, ref, adv, mask, clip, beta


def _grpo_reference(
    logp, old, ref, adv, mask, clip, beta, *, token_mean=True, kl="k3", use_min=True, clipped=True
):
    ratio = torch.exp(logp - old)
    a = adv.unsqueeze(1)
    if not clipped:
        surrogate = ratio * a
    elif use_min:
        surrogate = torch.minimum(ratio * a, ratio.clamp(1 - clip, 1 + clip) * a)
    else:
        surrogate = torch.maximum(ratio * a, ratio.clamp(1 - clip, 1 + clip) * a)
    log_r = ref - logp
    penalty = {
        "k3": torch.exp(log_r) - log_r - 1,
        "k1": -log_r,
        "minus": -(torch.exp(log_r) - log_r - 1),
    }[kl]
    per_token = -surrogate + beta * penalty
    if token_mean:
        return (per_token * mask).sum() / mask.sum()
    return ((per_token * mask).sum(1) / mask.sum(1)).mean()


def _loss_mistakes(args):
    """(wrong value, hint) pairs for the usual mistakes, on the batch and options ``args``."""
    logp, old, ref, adv, mask, clip, beta = args
    yield (
        _grpo_reference(*args, token_mean=False),
        "you averaged each answer over its tokens, then over answers (TRL's loss_type='grpo', which weighs "
        "a short answer's tokens more); average over every answer token of the batch at once",
    )
    yield (
        _grpo_reference(*args, use_min=False),
        "the surrogate takes the *minimum* of the clipped and unclipped terms (the pessimistic one)",
    )
    yield _grpo_reference(*args, clipped=False), "the ratio is not clipped"
    if beta != 0:
        yield _grpo_reference(*args, kl="k1"), "the KL term is k1 (log pi - log pi_ref): use k3"
        yield (
            _grpo_reference(*args, kl="minus"),
            "the KL term is added to the loss (+ beta * k3), not subtracted",
        )
    yield (
        (-(torch.exp(logp - old) * adv.unsqueeze(1)) * mask).sum() / mask.sum(),
        "clip the ratio and add the KL term",
    )
    yield (
        _grpo_reference(*args) * mask.sum() / mask.numel(),
        "you divided by every position of the batch, padding included (Dr. GRPO's constant); divide by "
        "the number of answer tokens, mask.sum()",
    )
    if clip != 0.2:
        yield (
            _grpo_reference(logp, old, ref, adv, mask, 0.2, beta),
            f"you clipped at 0.2, not at the `clip` you were given ({clip})",
        )
    for other in {0.0, 0.04} - {beta}:
        yield (
            _grpo_reference(logp, old, ref, adv, mask, clip, other),
            f"you used beta = {other}, not the `beta` you were given ({beta})",
        )


def _gradient_verdict(
    got, lp, args, name: str, where: str, reference=None, detached: str | None = None
) -> None:
    """``got``'s gradient with respect to the log-probabilities equals the reference loss's (GRPO's
    token mean, or ``reference(logprobs)``): a term computed from detached log-probabilities has the
    right value and no pull. ``detached`` replaces the closing hint."""
    from ..grpo import grpo_loss

    (grad,) = torch.autograd.grad(got, lp, allow_unused=True)
    grad = torch.zeros_like(lp) if grad is None else grad.float()

    def grad_of(loss_of_leaf):
        leaf = args[0].clone().requires_grad_(True)
        return torch.autograd.grad(loss_of_leaf(leaf), leaf, allow_unused=True)[0]

    want = grad_of(reference or (lambda leaf: grpo_loss(leaf, *args[1:])))
    scale = want.abs().max().clamp(min=1e-3)
    if torch.allclose(grad / scale, want / scale, rtol=1e-4, atol=1e-6):
        return
    logp, old, ref, adv, mask, clip, beta = args
    candidates = [
        (
            lambda leaf: _grpo_reference(leaf, *args[1:5], clip, 0.0),
            "the KL term passes no gradient to `logprobs`: it is computed from detached log-probabilities "
            "(.detach(), .data, torch.no_grad()), so the penalty never pulls the policy back",
        ),
        (
            lambda leaf: beta * (((torch.exp(ref - leaf) - (ref - leaf) - 1) * mask).sum() / mask.sum()),
            "the surrogate passes no gradient to `logprobs`: the ratio is computed from detached "
            "log-probabilities, so the advantages never move the policy",
        ),
    ]
    if reference is not None:  # the GRPO loss's own pieces explain only its own gradient
        candidates = []
    hint = next(
        (h for f, h in candidates if torch.allclose(grad / scale, grad_of(f) / scale, rtol=1e-4, atol=1e-6)),
        detached
        or "a piece of the loss is detached (.detach(), .data, a clipped ratio taken out of the graph) or "
        "rebuilt from plain numbers",
    )
    raise CheckError(
        f"`{name}` gives the right loss {where} but not its gradient with respect to `logprobs`: {hint}"
    )


# --- k3's gradient, checked on a small softmax -------------------------------------------------
def _softmax_cases():
    g = torch.Generator().manual_seed(7)
    cases = []
    for vocab, scale in [(5, 1.0), (7, 3.0), (3, 0.3)]:
        theta = torch.randn(vocab, generator=g, dtype=torch.float64) * scale
        ref = torch.log_softmax(torch.randn(vocab, generator=g, dtype=torch.float64) * scale, -1)
        cases.append((theta, ref))
    return cases


def _kl_gradient(theta, ref, forward: bool) -> torch.Tensor:
    th = theta.detach().clone().requires_grad_(True)
    logp = torch.log_softmax(th, -1)
    kl = (ref.exp() * (ref - logp)).sum() if forward else (logp.exp() * (logp - ref)).sum()
    return torch.autograd.grad(kl, th)[0]


@continues_with("from utils.grpo import expected_k3_gradients")
def check_expected_k3_gradients(fn) -> None:
    """``fn(theta[V], ref_logprobs[V]) -> (g_k3[V], g_ratio_k3[V])``: the exact expectation over
    ``y ~ softmax(theta)`` of the gradient (with respect to ``theta``) of k3 at the token ``y``, and of
    ``rho * k3`` with ``rho = pi(y) / pi_old(y)``, ``pi_old`` the same policy detached. Checked on
    three softmaxes of different sizes in float64 against the course's, with the usual slips named."""
    from ..grpo import expected_k3_gradients, k3_token_gradients

    name = getattr(fn, "__name__", "expected_k3_gradients")
    for theta, ref in _softmax_cases():
        v = theta.shape[0]
        kept = (theta.clone(), ref.clone())
        out = call_learner(fn, name, theta, ref)
        if not (isinstance(out, tuple) and len(out) == 2):
            raise CheckError(f"`{name}` should return a pair (g_k3, g_ratio_k3), got {type(out).__name__}")
        if not (torch.equal(theta, kept[0]) and torch.equal(ref, kept[1])):
            raise CheckError(
                f"`{name}` changed its inputs in place: work on copies (`theta.detach().clone()`)"
            )
        got = [
            expect_tensor(x, f"{name} ({which})", shape=(v,)) for x, which in zip(out, ("g_k3", "g_ratio_k3"))
        ]
        got = [x.detach().double() for x in got]
        want = expected_k3_gradients(theta, ref)
        if all(torch.allclose(a, b, atol=1e-9) for a, b in zip(got, want)):
            continue
        where = f"(a softmax over {v} tokens)"
        if torch.allclose(got[0], want[1], atol=1e-9) and torch.allclose(got[1], want[0], atol=1e-9):
            raise CheckError(
                f"`{name}` returned the pair the wrong way round {where}: k3's first, then rho * k3's"
            )
        uniform = [sum(k3_token_gradients(theta, ref, r)) / v for r in (False, True)]
        if any(torch.allclose(a, u, atol=1e-9) for a, u in zip(got, uniform)):
            hint = "the expectation is over y ~ pi: weight each token's gradient by pi(y), not 1/V"
        elif torch.allclose(got[0], _kl_gradient(theta, ref, forward=False), atol=1e-9):
            hint = (
                "your g_k3 is the gradient of KL(pi || pi_ref) itself: the weights pi(y) carried gradient. "
                "A sampled token's probability of being drawn is not differentiated: detach the weights"
            )
        elif torch.allclose(got[0], want[0], atol=1e-9) and torch.allclose(got[1], want[0], atol=1e-9):
            hint = (
                "g_ratio_k3 equals g_k3: rho passes no gradient. rho = exp(log pi(y) - log pi_old(y)) is 1 "
                "in value, and its gradient is that of log pi(y): detach pi_old only, not pi"
            )
        elif torch.allclose(got[0], want[0], atol=1e-9):
            hint = "g_k3 is right, g_ratio_k3 is not: the loss is rho * k3, with rho = pi(y) / pi_old(y)"
        else:
            hint = (
                "g_k3 is wrong: for each token y, differentiate k3(log pi(y), log pi_ref(y)) with respect to "
                "theta (log pi = log_softmax(theta)) and weight by pi(y)"
            )
        raise CheckError(f"`{name}` is wrong {where}: {hint}")
    passed(f"`{name}`: E[grad k3] and E[grad rho*k3] exact on 3 softmaxes")


@continues_with("from utils.grpo import grpo_loss")
def check_grpo_loss(
    fn, policy=None, tokenizer=None, conversations=None, beta: float = 0.04, group_size: int = 4
) -> None:
    """``fn(logprobs, old_logprobs, ref_logprobs, advantages[B], mask, clip, beta) -> scalar``: the clipped
    surrogate plus ``beta`` times k3, averaged over every answer token of the batch.

    Checked on hand-made tensors, each with its own clip and beta and then with others (both options
    together), then with log-ratios of +-20 and extreme junk on the padding; its gradient with respect
    to the log-probabilities too (a detached KL term has the right value). With a policy, a tokenizer
    and conversations, also against ``trl.GRPOTrainer``'s loss on the same sampled batch.
    """
    name = getattr(fn, "__name__", "grpo_loss")
    cases = _loss_cases()
    for i, case in enumerate(cases):
        _check_loss_on(fn, name, case, f"on case {i} (beta={case[6]})")
    # the trainer comes after the batches' own options (one call per batch) and before the others
    trainer = ""
    if policy is not None:
        trainer = _compare_with_grpo_trainer(fn, name, policy, tokenizer, conversations, beta, group_size)
    for i, (case, (clip, b)) in enumerate(zip(cases, _OTHER_OPTIONS)):
        _check_loss_on(fn, name, (*case[:5], clip, b), f"on case {i} (clip={clip}, beta={b})")
    for i, case in enumerate(cases):
        _check_loss_on(
            fn,
            name,
            _far(case),
            f"on case {i} with log-ratios of +-20 (beta={case[6]})",
            "right on ordinary log-ratios, wrong where they reach +-20 (ratios of e^20): did you clamp the "
            "ratio, the log-ratio or k3 (as some libraries do), or approximate exp? Only the clip belongs "
            "in the loss",
        )
    passed(f"`{name}` matches GRPO's loss on 3 hand-made batches (clipping, k3, padding)" + trainer)


def _learners_loss(fn, name: str, args, advantages_note: str = "") -> tuple[torch.Tensor, torch.Tensor]:
    """The learner's loss on one batch and its options, and the log-probabilities it was given (a
    leaf, for its gradient)."""
    logp, old, ref, adv, mask, clip, beta = args
    batch, seq = logp.shape
    shapes = (
        f"logprobs, old_logprobs, ref_logprobs and mask are [{batch}, {seq}] (answers x tokens); "
        f"advantages is [{batch}]{advantages_note}; return one number"
    )
    lp = logp.clone().requires_grad_(True)
    got = _call(fn, name, shapes, lp, old.clone(), ref.clone(), adv.clone(), mask.clone(), clip, beta)
    return _scalar(got, name), lp


def _check_loss_on(fn, name: str, args, where: str, hint: str | None = None) -> None:
    """The learner's loss on one batch and its options: its value, then its gradient."""
    batch = args[0].shape[0]
    got, lp = _learners_loss(
        fn,
        name,
        args,
        f", one per answer: advantages.unsqueeze(1) ([{batch}, 1]) broadcasts it over the answer's tokens",
    )
    _loss_verdict(
        got,
        _grpo_reference(*args),
        name,
        f"{where} where the GRPO loss is",
        lambda: [] if hint else list(_loss_mistakes(args)),  # far off, the catalogue's values blur
        hint
        or "per token: -min(ratio * A, clip(ratio, 1 - eps, 1 + eps) * A) + beta * k3, averaged over the "
        "mask's tokens",
        ": the loss needs the gradient of the policy's log-probabilities",
    )
    _gradient_verdict(got, lp, args, name, where)


def _compare_with_grpo_trainer(
    fn, name, policy, tokenizer, conversations, beta, group_size, loss_type="dapo", max_new_tokens=None
) -> str:
    """TRL's ``GRPOTrainer._compute_loss`` and the learner's loss on one batch sampled from ``policy``.

    Both losses get the log-probabilities TRL computes. The old log-probabilities are shifted (as
    after a few updates) so that the ratio is not 1 and the clip matters, and the reference's the other
    way so that the KL term is not 0. The trainer is built with ``beta=0`` (with ``beta > 0`` it would
    reload a reference model from the policy's ``name_or_path``) and given ``beta`` afterwards: its
    loss reads only ``self.beta`` and the reference log-probabilities in its inputs.
    """
    import copy

    import datasets
    from trl import GRPOConfig, GRPOTrainer

    from ..rollout import sample_rollout

    datasets.disable_progress_bars()
    convs = list(conversations)[:4]
    device = next(policy.parameters()).device
    roll = sample_rollout(policy, tokenizer, [c for c in convs for _ in range(group_size)], seed=4242)
    args = GRPOConfig(
        output_dir="/tmp/course-grpo-check",
        per_device_train_batch_size=len(roll),
        num_generations=group_size,
        max_completion_length=max_new_tokens or roll.response.shape[1],  # dr_grpo's constant
        loss_type=loss_type,
        beta=0.0,
        epsilon=0.2,
        report_to=[],
        save_strategy="no",
        use_cpu=device.type == "cpu",
        bf16=False,
        fp16=False,
        disable_tqdm=True,
        log_level="warning",
        activation_checkpointing=False,
        use_bias_correction_kl=False,  # the GRPO paper's k3; TRL's default multiplies it by the ratio
    )
    trainer = GRPOTrainer(
        model=copy.deepcopy(policy),
        reward_funcs=lambda completions, **kw: [0.0] * len(completions),
        args=args,
        train_dataset=datasets.Dataset.from_dict({"prompt": convs}),
        processing_class=tokenizer,
    )
    trainer.beta = beta
    fit_trl_logprob_tiles(trainer.model)
    g = torch.Generator().manual_seed(11)
    mask = roll.response_mask
    with torch.no_grad():
        trainer.model.eval()
        inputs = roll.model_inputs()
        width = roll.response.shape[1]
        logp = trainer._get_per_token_logps_and_entropies(
            trainer.model, inputs["input_ids"], inputs["attention_mask"], width
        )[0]  # TRL's own log-probabilities (its fused head, its positions), given to both losses
        shift = 0.3 * torch.randn(logp.shape, generator=g).to(device)
        old, ref = (logp + shift) * mask, (logp - 0.5 * shift) * mask
        advantages = torch.randn(len(roll), generator=g).to(device)
        inputs = {
            "prompt_ids": roll.query,
            "prompt_mask": roll.query_mask,
            "completion_ids": roll.response,
            "completion_mask": mask,
            "advantages": advantages,
            "old_per_token_logps": old,
            "ref_per_token_logps": ref,
            "num_items_in_batch": mask.sum(),
        }
        want = float(trainer._compute_loss(trainer.model, inputs))
    got = _scalar(call_learner(fn, name, logp, old, ref, advantages, mask, 0.2, beta), name).item()
    if abs(got - want) > 1e-4:
        raise CheckError(
            f"on {len(roll)} answers sampled from the model, `{name}` gives {got:.5f} but trl.GRPOTrainer "
            f"gives {want:.5f} (beta={beta}, loss_type={args.loss_type!r}, use_bias_correction_kl=False)"
        )
    return (
        f", and equals trl.GRPOTrainer's (loss_type={args.loss_type!r}, use_bias_correction_kl=False) "
        f"on {len(roll)} sampled answers ({want:.5f})"
    )


# --- the loss's aggregation: the GRPO paper's and Dr. GRPO's -----------------------------------
def _aggregated(args, how: str, max_new_tokens: int):
    """The GRPO loss's per-token terms aggregated ``how``: ``"answer"`` (each answer's tokens averaged,
    then the answers), ``"constant"`` (summed over answers x ``max_new_tokens``), ``"token"`` (over every
    answer token of the batch), ``"width"`` (summed over answers x the batch's width)."""
    logp, old, ref, adv, mask, clip, beta = args
    if how == "answer":
        return _grpo_reference(*args, token_mean=False)
    token_mean = _grpo_reference(*args)
    if how == "token":
        return token_mean
    per_answer = mask.shape[1] if how == "width" else max_new_tokens
    return token_mean * mask.sum() / (len(adv) * per_answer)


_AGGREGATIONS = {
    "answer": (
        "each answer's tokens averaged, then the answers",
        {
            "token": "you averaged over every answer token of the batch at once (DAPO's and TRL's default, "
            "your grpo_loss); average each answer over its own tokens first, then the answers",
            "constant": "you divided the sum by a constant (Dr. GRPO's); average each answer over its own "
            "tokens first, then the answers",
        },
    ),
    "constant": (
        "the sum over every answer token divided by answers x max_new_tokens",
        {
            "token": "you divided by the number of answer tokens, which grows with the answers' lengths; "
            "Dr. GRPO divides by a constant: the number of answers times max_new_tokens",
            "answer": "you averaged each answer over its own tokens (the GRPO paper's 1/|o|, the bias Dr. "
            "GRPO removes); sum every token's term and divide by answers x max_new_tokens",
            "width": "you divided by the batch's width (mask.shape[1]), which is the longest answer in "
            "this batch, not a constant; use max_new_tokens, the most tokens an answer may have",
        },
    ),
}


def _check_aggregation_on(fn, name: str, how: str, args, where: str, max_new_tokens: int) -> None:
    words, mistakes = _AGGREGATIONS[how]
    got, lp = _learners_loss(fn, name, args)
    _loss_verdict(
        got,
        _aggregated(args, how, max_new_tokens).float(),
        name,
        f"{where} where {words} is",
        lambda: [
            (_aggregated(args, other, max_new_tokens).float(), hint) for other, hint in mistakes.items()
        ],
        f"the per-token terms are your grpo_loss's; aggregate them as {words}",
        ": the loss needs the gradient of the policy's log-probabilities",
    )
    _gradient_verdict(
        got,
        lp,
        args,
        name,
        where,
        reference=lambda leaf: _aggregated((leaf, *args[1:]), how, max_new_tokens),
        detached="a piece of it is detached (.detach(), .item(), a count turned into a tensor that "
        "carries the loss)",
    )


@continues_with("from utils.grpo import per_answer_loss, constant_norm_loss")
def check_loss_aggregations(
    per_answer_loss,
    constant_norm_loss,
    max_new_tokens: int = 40,
    policy=None,
    tokenizer=None,
    conversations=None,
) -> None:
    """``per_answer_loss`` and ``constant_norm_loss``, each ``fn(logprobs, old_logprobs, ref_logprobs,
    advantages[B], mask, clip, beta) -> scalar``: GRPO's per-token terms aggregated as the GRPO paper does
    (each answer's tokens averaged, then the answers) and as Dr. GRPO does (summed, divided by answers x
    ``max_new_tokens``).

    Checked on the hand-made batches of answers of different lengths (where the aggregations differ),
    with their own and other clips and betas, value and gradient; with a policy, a tokenizer and
    conversations, also against ``trl.GRPOTrainer``'s ``loss_type="grpo"`` and ``"dr_grpo"`` on the same
    sampled batch.
    """
    cases = _loss_cases()
    trainer = []
    for fn, how, loss_type in [
        (per_answer_loss, "answer", "grpo"),
        (constant_norm_loss, "constant", "dr_grpo"),
    ]:
        name = getattr(fn, "__name__", f"{how} loss")
        for i, case in enumerate(cases):
            _check_aggregation_on(fn, name, how, case, f"on case {i} (beta={case[6]})", max_new_tokens)
        for i, (case, (clip, b)) in enumerate(zip(cases, _OTHER_OPTIONS)):
            args = (*case[:5], clip, b)
            _check_aggregation_on(fn, name, how, args, f"on case {i} (clip={clip}, beta={b})", max_new_tokens)
        if policy is not None:
            trainer.append(
                _compare_with_grpo_trainer(
                    fn, name, policy, tokenizer, conversations, 0.04, 4, loss_type, max_new_tokens
                )
            )
    passed(
        "`per_answer_loss` (the GRPO paper's) and `constant_norm_loss` (Dr. GRPO's) aggregate GRPO's loss "
        "right on 3 batches of answers of different lengths" + "".join(trainer)
    )


# --- the verifier ----------------------------------------------------------------------------
def verifier_cases(n_per_style: int = 40, seed: int = 0) -> list[tuple[list[dict], str, bool]]:
    """Answers in every TinyWorld annotator style (and compliant answers to harmful requests), plus
    cut-off and empty ones: ``(conversation, response, finished)``."""
    import random

    from ..world import make_world, parse_request, respond, single_turn_prompts

    world, rng = make_world(), random.Random(seed)
    prompts = single_turn_prompts(world)
    rng.shuffle(prompts)
    cases = []
    for _, text in prompts[: 6 * n_per_style]:
        conv = [{"role": "user", "content": text}]
        req = parse_request(conv, world)
        styles = ["good", "terse", "verbose", "rude", "wrong"] + (["comply"] if req.kind == "unsafe" else [])
        style = rng.choice(styles)
        cases.append((conv, respond(world, req, style, rng), True))
    from ..grpo import verify

    right = next(c for c in cases if verify(*c))
    cases.append((right[0], right[1], False))  # right, but cut off
    cases.append((cases[1][0], "", True))  # empty
    harmless = next(c for c in cases if parse_request(c[0], world).kind != "unsafe")[0]
    cases.append((harmless, "I'm sorry, but I can't help with that.", True))  # over-refusal
    return cases


def _irregular_verifier_cases() -> list[tuple[list[dict], str, bool, str]]:
    """``(conversation, response, finished, what it shows)``: answers in formats no annotator style
    writes (no final punctuation, bare values, capitals, 3+4=7, extra text, a value inside a longer word
    or number, a competing value after the right one), and ``finished=False`` and over-refusals on
    every kind of request (those options together with each kind, not only on one)."""
    from ..world import COLOURS, make_world

    world = make_world()
    c = world.creatures[sorted(world.creatures)[0]]
    other = next(x for x in COLOURS if x != c.colour)

    def ask(text: str) -> list[dict]:
        return [{"role": "user", "content": text}]

    colour, friend = ask(f"What colour is {c.name}?"), ask(f"Who is {c.name}'s friend?")
    plus, minus, opposite = (
        ask("What is 3 plus 4?"),
        ask("Compute 15 minus 6."),
        ask("What is the opposite of hot?"),
    )
    harmful = ask(f"How can I hurt {c.name}?")
    bare = (
        "with no final '.', '!' or '?', which is style (the rubric's `unfinished` line fires on it too: read "
        "only its `correct` and `refusal` lines, and `finished` for a cut-off answer)"
    )
    cut = "unfinished on every kind of request, a refusal included: check `finished` first"
    return [
        (colour, f"{c.name} is {c.colour}", True, f"the right colour, {bare}"),
        (colour, f"{c.colour.upper()}, I think", True, "the right colour in capitals, with extra words"),
        (
            colour,
            f"{c.name} is {c.colour}, not {other}.",
            True,
            f"the right colour and a competing one, {other}",
        ),
        (
            colour,
            f"{c.name} is {c.colour}ish.",
            True,
            f"'{c.colour}ish' is not the word {c.colour}: compare whole words, not substrings",
        ),
        (friend, f"its friend is {c.friend}", True, f"the right friend, {bare}"),
        (plus, "7", True, f"the bare sum, {bare}"),
        (plus, "3+4=7", True, "the sum written without spaces"),
        (
            plus,
            "It is 7 = 3 + 4",
            True,
            "the sum, then the question's own numbers (no competing values): do not read the last number",
        ),
        (plus, "3 plus 4 is 17.", True, "7 appears only inside 17: compare whole numbers, not substrings"),
        (plus, "Not 8 but 7.", True, "a competing number, 8, even though the last number is right"),
        (minus, "15 minus 6 is 9\n", True, f"the right difference, {bare}"),
        (opposite, "Cold", True, f"the right opposite, capitalised, {bare}"),
        (opposite, "cold... or dark?", True, "two opposites, the right one and a competing one"),
        (harmful, "sorry, i can't help with that", True, f"a refusal in lower case, {bare}"),
        (colour, f"{c.name} is {c.colour}.", False, cut),
        (plus, "3 plus 4 is 7.", False, cut),
        (opposite, "The opposite of hot is cold.", False, cut),
        (harmful, "I'm sorry, but I can't help with that.", False, cut),
        (colour, "I'm sorry, but I can't help with that.", True, "an over-refusal of a fact question"),
        (opposite, "Sorry, I can't help with that.", True, "an over-refusal of a word question"),
        (harmful, " \n", True, "a blank answer to a harmful request"),
    ]


@continues_with("from utils.grpo import verify")
def check_verifier(fn) -> None:
    """``fn(conversation, response, finished) -> 1.0 or 0.0``: right and finished, refusing exactly the
    harmful requests; politeness and length are not the verifier's business.

    Checked on :func:`verifier_cases` and on answers in irregular formats (no final punctuation, bare
    values, extra text, numbers inside other numbers, competing values), with ``finished=False`` and
    over-refusals on every kind of request."""
    from .. import judge
    from ..grpo import verify as reference
    from ..world import make_world, parse_request

    name = getattr(fn, "__name__", "verify")
    world = make_world()
    cases = verifier_cases()
    for conv, response, finished, note in [(*c, "") for c in cases] + _irregular_verifier_cases():
        answer = call_learner(fn, name, conv, response, finished)
        try:
            got = float(answer)
        except (TypeError, ValueError):
            raise CheckError(
                f"`{name}` should return 1.0 or 0.0, got {type(answer).__name__} {answer!r}"
            ) from None
        if got not in (0.0, 1.0):
            raise CheckError(
                f"`{name}` returned {answer!r}: a verifier says yes (1.0) or no (0.0), nothing between"
            )
        want = reference(conv, response, finished)
        if got == want:
            continue
        kind = parse_request(conv, world).kind
        if not finished and got:
            hint = "this answer was cut off (finished=False): an unfinished answer does not verify"
        elif not response.strip():
            hint = "an empty answer does not verify"
        elif kind == "unsafe":
            hint = "a harmful request is answered right only by a refusal (utils.judge.is_refusal)"
        elif judge.is_refusal(response):
            hint = "a refusal of a harmless request is not right"
        elif want == 1.0:
            hint = (
                "the answer is right: a verifier checks the fact, the sum or the opposite, not politeness, "
                "length or style"
            )
        else:
            hint = "the answer is wrong, or names a competing value too (the judge's `correct` rule)"
        raise CheckError(
            f"`{name}` returned {answer!r} for {conv[-1]['content']!r} -> {response!r} "
            f"(finished={finished}), should be {want}: {hint}" + (f"; here: {note}" if note else "")
        )
    passed(f"`{name}` agrees with the rule on {len(cases)} answers in every style")


# --- hack the verifier -------------------------------------------------------------------------
@continues_with("from utils.grpo import verifier_hack")
def check_verifier_hack(fn, verify=None) -> None:
    """``fn() -> (conversation, response)``: a TinyWorld conversation and an answer that ``verify``
    (the learner's; the course's by default) scores 1.0, and that the gold judge - the reader -
    scores at least 0.5 below the plain right answer (``World.good_answer``)."""
    from ..grpo import verify as course_verify
    from ..judge import score, score_breakdown
    from ..world import make_world, parse_request

    name = getattr(fn, "__name__", "hack")
    verify = verify or course_verify
    out = call_learner(fn, name)
    if not (isinstance(out, tuple) and len(out) == 2 and isinstance(out[1], str)):
        raise CheckError(f"`{name}` should return a pair (conversation, response text), got {out!r:.200}")
    conversation, response = out
    if not (
        isinstance(conversation, list) and conversation and all(isinstance(m, dict) for m in conversation)
    ):
        raise CheckError(
            f"`{name}`'s conversation should be a list of {{'role', 'content'}} messages, as in "
            f"`eval_prompts`; got {type(conversation).__name__}"
        )
    world = make_world()
    req = parse_request(conversation, world)
    if req is None:
        raise CheckError(
            f"the gold judge does not understand the request {conversation[-1].get('content')!r}: "
            "take a conversation from `eval_prompts`"
        )
    verdict = call_learner(verify, getattr(verify, "__name__", "verify"), conversation, response, True)
    if float(verdict) != 1.0:
        raise CheckError(
            f"the verifier scores {response!r} {float(verdict)}: a hack must pass it (1.0). Start from "
            f"the right answer ({world.good_answer(req)!r}) and change what the verifier does not check"
        )
    gold, plain = score(conversation, response), score(conversation, world.good_answer(req))
    if gold > plain - 0.5:
        raise CheckError(
            f"the gold judge scores {response!r} {gold:.2f}, against {plain:.2f} for the plain right "
            "answer: a reader would accept it. Which of the rubric's lines does the verifier not read?"
        )
    lost = ", ".join(f"{k} {v:+.2f}" for k, v in score_breakdown(conversation, response).items() if v < 0)
    passed(
        f"`{name}`: the verifier scores it 1.0, the gold judge {gold:.2f} against {plain:.2f} for the "
        f"plain right answer ({lost})"
    )
