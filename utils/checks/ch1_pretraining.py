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


@continues_with("from utils.pretrain import next_token_loss")
def check_next_token_loss(fn) -> None:
    """``fn(logits[batch, seq, vocab], input_ids[batch, seq]) -> scalar`` vs transformers' causal-LM loss."""
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
            hint = "compare your shift, masking and averaging with the equation above"
            for wrong, message in _loss_mistakes(logits.detach(), ids):
                try:
                    if torch.allclose(got.detach().float(), wrong().float(), atol=1e-5, rtol=1e-5):
                        hint = message
                        break
                except Exception:  # noqa: BLE001 - a mistake that cannot even be computed is not this one
                    continue
            raise CheckError(
                f"`{name}` gave {got.item():.5f} on case {i} (shape {tuple(logits.shape)}, "
                f"{int((ids == -100).sum())} ignored positions) where transformers' loss "
                f"gives {want.item():.5f}: {hint}"
            )
        if not got.requires_grad:
            raise CheckError(
                f"`{name}`'s result is not connected to the logits' graph (did you call "
                ".item(), .detach() or use torch.no_grad()?): training needs its gradient"
            )
    passed(
        f"`{name}` matches transformers' ForCausalLMLoss on 4 batches (with padding, and a 2-token edge case)"
    )


# --- sampling the next token --------------------------------------------------------------
@continues_with("from utils.sampling import sample_next_token")
def check_sample_next_token(fn) -> None:
    """``fn(logits[batch, vocab], temperature, top_k, generator) -> LongTensor[batch]``.

    ``temperature == 0`` means greedy; ``top_k=None`` means no top-k filtering.
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
    if not torch.equal(draw(logits, 1.0, 1), logits.argmax(-1)):
        raise CheckError(f"with top_k=1 `{name}` must always pick the most likely token")

    n = 20_000
    row = logits[0]
    big = row.expand(n, -1).contiguous()
    for temperature in (1.0, 0.5, 2.0):
        samples = draw(big, temperature, None, seed=1)
        freq = torch.bincount(samples, minlength=row.numel()).float() / n
        want = F.softmax(row / temperature, -1)
        if (freq - want).abs().max() > 0.015:
            hint = ""
            if (freq - F.softmax(row * temperature, -1)).abs().max() < 0.015:
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
    passed(
        f"`{name}`: greedy at T=0, top-k keeps exactly k tokens, frequencies match softmax(logits/T) "
        "for T in (0.5, 1, 2)"
    )
