"""Chapter 1 checkers: the next-token loss and sampling the next token."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .core import CheckError, call_learner, continues_with, expect_tensor, passed


# --- the next-token loss ------------------------------------------------------------------
def _loss_cases():
    g = torch.Generator().manual_seed(0)
    cases = []
    for batch, seq, vocab, pad in [(2, 7, 11, 0), (3, 5, 13, 2), (1, 2, 5, 0), (4, 9, 17, 3)]:
        logits = torch.randn(batch, seq, vocab, generator=g) * 2
        ids = torch.randint(0, vocab, (batch, seq), generator=g)
        if pad:
            ids[0, -pad:] = -100  # right padding on the first row
        cases.append((logits, ids))
    # The last batch is the untamed one. Its -100s are not only trailing padding: a masked prompt
    # starts one row (Chapter 2's labels) and another has a hole, so a mask built from each row's
    # length is wrong. Its logits reach ~100 in magnitude, as a trained model's can: log(softmax)
    # underflows to log(0) there and a hand-written exp() overflows, where log_softmax does not.
    logits, ids = cases[-1]
    ids[1, :2] = -100
    ids[2, 4] = -100
    cases[-1] = (logits * 50, ids)
    return cases


def _library_next_token_loss(logits, ids):
    from transformers.loss.loss_utils import ForCausalLMLoss

    return ForCausalLMLoss(logits, ids, vocab_size=logits.size(-1))


def _loss_mistakes(logits, ids):
    """Known wrong versions of the loss, each with the message a learner needs."""
    v = logits.size(-1)
    flat = logits.reshape(-1, v)
    shifted_l, shifted_t = logits[:, :-1].reshape(-1, v), ids[:, 1:].reshape(-1)
    mask = shifted_t != -100
    yield (
        lambda: F.cross_entropy(flat, ids.reshape(-1), ignore_index=-100),
        "it looks like you did not shift: the logits at position t must predict token t+1 "
        "(use logits[:, :-1] against input_ids[:, 1:])",
    )
    yield (
        lambda: F.cross_entropy(logits[:, 1:].reshape(-1, v), ids[:, :-1].reshape(-1), ignore_index=-100),
        "it looks like you shifted the wrong way: logits[:, :-1] predict input_ids[:, 1:], not the reverse",
    )
    yield (
        lambda: F.cross_entropy(shifted_l, shifted_t, ignore_index=-100, reduction="sum"),
        "it looks like you summed the token losses: average over the predicted (non-ignored) tokens",
    )
    yield (
        lambda: (
            F.cross_entropy(shifted_l, shifted_t.clamp(min=0), reduction="none").sum()
            / max(len(shifted_t), 1)
        ),
        "it looks like ignored positions (-100) are counted: leave them out of both the sum and the count",
    )
    yield (
        lambda: (
            F.cross_entropy(shifted_l, shifted_t.clamp(min=0), reduction="none")[mask].sum() / len(shifted_t)
        ),
        "it looks like you divided by all positions: divide by the number of non-ignored targets only",
    )
    yield (
        lambda: F.nll_loss(shifted_l[mask], shifted_t[mask]),
        "it looks like you passed raw logits to nll_loss: take log_softmax first (or use cross_entropy)",
    )
    per_token = F.cross_entropy(shifted_l, shifted_t, ignore_index=-100, reduction="none")
    per_token = per_token.view(ids.size(0), -1)  # 0 where the target is -100
    row_mask = ids[:, 1:] != -100
    yield (
        lambda: (per_token.sum(1) / row_mask.sum(1)).mean(),
        "it looks like you averaged within each sequence and then over the batch: that gives a short "
        "sequence as much weight as a long one. Average over all predicted tokens of the batch at once",
    )
    # A learner who reads -100 as trailing padding only keeps the first `length` positions of a row,
    # the length counted among the targets or among the tokens (one more: the last predicts nothing).
    position = torch.arange(row_mask.size(1)).expand_as(row_mask)
    for length in (row_mask.sum(1, keepdim=True), (ids != -100).sum(1, keepdim=True) - 1):
        yield (
            lambda length=length: per_token[position < length].mean(),
            "it looks like you built the mask from each row's length, as if -100 were only trailing "
            "padding: -100 can be anywhere (Chapter 2 puts it on the prompt, at the start of a row). "
            "Leave out exactly the positions whose target is -100",
        )


def _named_mistake(got: torch.Tensor, mistakes, default: str) -> str:
    """The message of the first of ``mistakes`` (``(wrong value thunk, message)`` pairs) that ``got``
    equals, else ``default``."""
    for wrong, message in mistakes:
        try:
            if torch.allclose(got.detach().float(), wrong().float(), atol=1e-5, rtol=1e-5):
                return message
        except Exception:  # noqa: BLE001 - a mistake that cannot even be computed is not this one
            continue
    return default


def _same_gradient(got: torch.Tensor, logits: torch.Tensor, reference) -> bool | None:
    """Whether ``got``'s gradient with respect to ``logits`` is ``reference``'s (``None`` when ``got``
    does not depend on ``logits`` at all, e.g. a new tensor made from a number)."""
    (mine,) = torch.autograd.grad(got.float(), logits, allow_unused=True)
    if mine is None:
        return None
    theirs = logits.detach().clone().requires_grad_(True)
    (want,) = torch.autograd.grad(reference(theirs), theirs)
    return bool(torch.allclose(mine.float(), want, rtol=1e-3, atol=1e-3 * float(want.abs().max())))


_NOT_CONNECTED = (
    " is not connected to the logits' graph (did you call .item(), .detach() or use torch.no_grad(), "
    "or make a new tensor from the number?): training needs its gradient"
)
_WRONG_GRADIENT = (
    " has the right value but not the right gradient with respect to the logits: part of it is cut "
    "off from the graph (.detach(), .item() or torch.no_grad() on one term). The log-sum-exp "
    "normaliser is not a constant - its gradient is what pushes the other tokens down - so compute "
    "every term from the logits with autograd on (F.cross_entropy does it all)"
)


def _overflow_hint(got: torch.Tensor, logits: torch.Tensor) -> str | None:
    """The hint for a loss that is inf or nan on large logits, else ``None``."""
    largest = float(logits.detach().abs().max())
    if bool(torch.isfinite(got.detach()).all()) or largest < 50:
        return None
    return (
        f"{got.item()} on logits of magnitude up to {largest:.0f} (as a trained model's can be) means "
        "that log(softmax(...)) underflowed to log(0) = -inf, or that exp(logits) overflowed to inf. "
        "Use F.log_softmax or F.cross_entropy, which subtract the maximum first"
    )


@continues_with("from utils.pretrain import next_token_loss")
def check_next_token_loss(fn) -> None:
    """``fn(logits[batch, seq, vocab], input_ids[batch, seq]) -> scalar`` vs transformers' causal-LM loss:
    its value (on -100s at the end, the start and the middle of rows, and on logits of magnitude ~100)
    and its gradient with respect to the logits."""
    name = getattr(fn, "__name__", "next_token_loss")
    for i, (logits, ids) in enumerate(_loss_cases()):
        logits = logits.clone().requires_grad_(True)
        got = expect_tensor(call_learner(fn, name, logits, ids.clone()), name)
        if got.dim() != 0:
            raise CheckError(
                f"`{name}` should return a scalar (one number for the batch), got shape "
                f"{tuple(got.shape)}: average the per-token losses"
            )
        want = _library_next_token_loss(logits.detach(), ids)
        if not torch.allclose(got.detach().float(), want, atol=1e-5, rtol=1e-5):
            hint = _overflow_hint(got, logits) or _named_mistake(
                got,
                _loss_mistakes(logits.detach(), ids),
                "compare your shift, masking and averaging with the equation above",
            )
            raise CheckError(
                f"`{name}` gave {got.item():.5f} on case {i} (shape {tuple(logits.shape)}, "
                f"{int((ids == -100).sum())} ignored positions) where transformers' loss "
                f"gives {want.item():.5f}: {hint}"
            )
        if not got.requires_grad:
            raise CheckError(f"`{name}`'s result{_NOT_CONNECTED}")
        same = _same_gradient(got, logits, lambda lg: _library_next_token_loss(lg, ids))
        if same is None:
            raise CheckError(f"`{name}`'s result{_NOT_CONNECTED}")
        if not same:
            raise CheckError(f"on case {i} (shape {tuple(logits.shape)}) `{name}`'s result{_WRONG_GRADIENT}")
    passed(
        f"`{name}` matches transformers' ForCausalLMLoss on 4 batches (with padding, and a 2-token edge case)"
    )


# --- sampling the next token --------------------------------------------------------------
def _keep_top(logits: torch.Tensor, k: int) -> torch.Tensor:
    return logits.masked_fill(logits < logits.topk(k, dim=-1).values[..., -1:], float("-inf"))


@continues_with("from utils.sampling import sample_next_token")
def check_sample_next_token(fn) -> None:
    """``fn(logits[batch, vocab], temperature, top_k, generator) -> LongTensor[batch]``.

    ``temperature == 0`` means greedy; ``top_k=None`` means no top-k filtering. Both options are
    honoured together (greedy whatever top_k; temperature and top-k at once), each row is sampled
    from its own logits (also logits of magnitude 100), and the draw comes from ``generator``: the
    same seed gives the same tokens whatever the global random state, another seed other tokens.
    """
    name = getattr(fn, "__name__", "sample_next_token")
    logits = torch.tensor([[2.0, 1.0, 0.5, 0.0, -1.0, 0.3], [0.1, 0.2, 3.0, 0.2, 0.1, 0.0]])

    def draw(lg, temperature, top_k, seed=0):
        g = torch.Generator().manual_seed(seed)
        given = lg.clone()
        out = call_learner(fn, name, given, temperature, top_k, g)
        if not torch.equal(given, lg):
            raise CheckError(
                f"`{name}` changed the logits passed in (an in-place operation such as `/=` or "
                f"masked assignment, at temperature={temperature}, top_k={top_k}): work on a copy, "
                "e.g. `scaled = logits / temperature`"
            )
        out = expect_tensor(out, name, shape=(lg.shape[0],))
        if out.dtype not in (torch.int64, torch.int32):
            raise CheckError(f"`{name}` should return token ids (integers), got dtype {out.dtype}")
        return out

    greedy = draw(logits, 0.0, None)
    if not torch.equal(greedy, logits.argmax(-1)):
        raise CheckError(
            f"with temperature 0 `{name}` should be greedy (argmax), got {greedy.tolist()} "
            f"instead of {logits.argmax(-1).tolist()}"
        )

    n = 20_000
    row = logits[0]
    other = torch.tensor([-0.5, 0.4, 2.5, -1.2, 1.1, 0.9])  # another top-k set than row's, no ties
    mixed = torch.stack([row, other]).repeat(n, 1)  # rows alternate: row, other, row, ...
    greedy = draw(mixed, 0.0, 3)
    if not torch.equal(greedy, mixed.argmax(-1)):
        raise CheckError(
            f"with temperature 0 and top_k=3 `{name}` should still be greedy (argmax), but it sampled "
            f"{int((greedy != mixed.argmax(-1)).sum())} of {len(mixed)} rows: temperature 0 means greedy "
            "whatever top_k is (test it first, not in an elif after top_k)"
        )

    # One token per row is certain (a margin of 100 over the rest), a different one in each row.
    sharp = -100 * torch.rand(5, 8, generator=torch.Generator().manual_seed(3))
    certain = torch.tensor([3, 0, 7, 5, 1])
    sharp[torch.arange(5), certain] = 100.0
    try:
        got = draw(sharp, 1.0, None)
    except (RuntimeError, ValueError) as error:
        if "nan" not in str(error) and "inf" not in str(error):
            raise
        raise CheckError(
            f"on logits of magnitude 100 `{name}` failed ({type(error).__name__}: {error}): "
            "exp(100) overflows float32 to inf, so a softmax written as exp(x) / exp(x).sum() gives nan. "
            "Use torch.softmax (or F.softmax), which subtracts each row's maximum first"
        ) from None
    if not torch.equal(got, certain):
        raise CheckError(
            f"at temperature 1 `{name}` drew {got.tolist()} from 5 rows whose most likely tokens "
            f"{certain.tolist()} are certain (a margin of 100): each row must be sampled from its own "
            "probabilities - torch.multinomial(probs, 1) draws one token per row (not num_samples=batch "
            "from one row) - and a large logit must not overflow (use torch.softmax, not exp by hand)"
        )

    if not torch.equal(draw(logits, 1.0, 1), logits.argmax(-1)):
        raise CheckError(f"with top_k=1 `{name}` must always pick the most likely token")

    big = row.expand(n, -1).contiguous()
    for temperature in (1.0, 0.5, 2.0):
        samples = draw(big, temperature, None, seed=1)
        freq = torch.bincount(samples, minlength=row.numel()).float() / n
        want = F.softmax(row / temperature, -1)
        if (freq - want).abs().max() > 0.015:
            hint = ""
            if bool((samples == row.argmax()).all()):
                hint = (
                    ": it always picked the most likely token; at a temperature above 0, draw from the "
                    "probabilities with torch.multinomial"
                )
            elif (freq - F.softmax(row * temperature, -1)).abs().max() < 0.015:
                hint = ": it looks like you multiplied by the temperature; divide the logits by it"
            elif (freq - F.softmax(row, -1)).abs().max() < 0.015:
                hint = ": the temperature seems to have no effect; divide the logits by it before softmax"
            raise CheckError(
                f"at temperature {temperature} `{name}` sampled frequencies {freq.numpy().round(3)} "
                f"but softmax(logits / T) is {want.numpy().round(3)}{hint}"
            )
    for k in (2, 3):
        samples = draw(big, 1.0, k, seed=2)
        seen = set(torch.unique(samples).tolist())
        top = set(row.topk(k).indices.tolist())
        if not seen <= top:
            raise CheckError(
                f"with top_k={k} `{name}` sampled tokens {sorted(seen - top)} outside the {k} most "
                f"likely {sorted(top)}: mask every other logit to -inf before sampling"
            )
        if seen != top:
            raise CheckError(
                f"with top_k={k} `{name}` never sampled {sorted(top - seen)}, which are among the "
                f"{k} most likely tokens: keep exactly k tokens (check for an off-by-one)"
            )
        freq = torch.bincount(samples, minlength=row.numel()).float() / n
        want = torch.full_like(row, float("-inf"))
        want[list(top)] = row[list(top)]
        if (freq - F.softmax(want, -1)).abs().max() > 0.015:
            raise CheckError(
                f"with top_k={k} the kept tokens should keep their relative probabilities "
                "(renormalised softmax over the top k)"
            )

    # Both options at once, on rows with different top-k sets.
    for temperature, k in ((0.5, 3), (2.0, 2)):
        samples = draw(mixed, temperature, k, seed=4)
        for r, lg in enumerate((row, other)):
            mine = samples[r::2]
            top = set(lg.topk(k).indices.tolist())
            outside = sorted(set(torch.unique(mine).tolist()) - top)
            both = f"with temperature {temperature} and top_k={k} together `{name}`"
            if outside:
                raise CheckError(
                    f"{both} sampled tokens {outside} outside a row's {k} most likely {sorted(top)}: "
                    "top-k is ignored when the temperature is not 1. Apply both options - divide by "
                    "the temperature, then keep the k largest - not one or the other (if/elif)"
                )
            freq = torch.bincount(mine, minlength=lg.numel()).float() / n
            want = F.softmax(_keep_top(lg / temperature, k), -1)
            if (freq - want).abs().max() > 0.015:
                hint = "divide by the temperature and keep the k largest, both"
                if (freq - F.softmax(_keep_top(lg, k), -1)).abs().max() < 0.015:
                    hint = (
                        "the temperature is ignored when top_k is set. Apply both options - divide by "
                        "the temperature, then keep the k largest - not one or the other (if/elif)"
                    )
                raise CheckError(
                    f"{both} sampled frequencies {freq.numpy().round(3)} but softmax of the top {k} of "
                    f"logits / T is {want.numpy().round(3)}: {hint}"
                )

    # The generator decides the draw: same seed, same tokens (whatever the global random state).
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(11)
        first = draw(big[:1000], 1.0, None, seed=5)
        torch.manual_seed(12)
        again = draw(big[:1000], 1.0, None, seed=5)
        reseeded = draw(big[:1000], 1.0, None, seed=6)
    if not torch.equal(first, again):
        raise CheckError(
            f"`{name}` drew different tokens from two generators seeded alike: the draw must come from "
            "the `generator` argument (pass generator=generator to torch.multinomial), not from the "
            "global random state, so that a seed reproduces a generation"
        )
    if torch.equal(first, reseeded):
        raise CheckError(
            f"`{name}` drew the same 1000 tokens from generators seeded differently: the draw must come "
            "from the `generator` argument (did you seed torch, or make a Generator, inside the "
            "function, or draw without it?)"
        )
    passed(
        f"`{name}`: greedy at T=0, top-k keeps exactly k tokens, frequencies match softmax(logits/T) "
        "for T in (0.5, 1, 2)"
    )
