"""Checker cells: run a learner's function on several inputs and say what is wrong, in words.

Each ``check_*`` compares against the maintained library's computation where one exists, tries
edge cases, and - when the answer is wrong - recognises the common mistakes by recomputing them,
so the message names the bug ("you did not shift the labels") rather than just "mismatch".
A checker that passes prints one line; one that fails raises :class:`CheckError`.
"""
from __future__ import annotations

import inspect

import torch
import torch.nn.functional as F


class CheckError(AssertionError):
    """A learner's function gave a wrong answer; the message says what to fix."""


def call_learner(fn, name: str, *args, **kwargs):
    """Call the learner's ``fn``, turning the usual early failures into helpful messages."""
    if not callable(fn):
        raise CheckError(f"expected a function for `{name}`, got {type(fn).__name__}")
    try:
        inspect.signature(fn).bind(*args, **kwargs)
    except TypeError as e:
        raise CheckError(f"`{name}` has the wrong signature {inspect.signature(fn)}: it must accept "
                         f"{_describe_args(args, kwargs)} ({e})") from None
    try:
        return fn(*args, **kwargs)
    except NotImplementedError:
        raise CheckError(f"`{name}` is not implemented yet: replace `raise NotImplementedError()` "
                         "in its cell with your code, run that cell, then run this check again.") from None


def _describe_args(args, kwargs) -> str:
    parts = [f"{type(a).__name__}" for a in args] + [f"{k}=" for k in kwargs]
    return "(" + ", ".join(parts) + ")"


def expect_tensor(value, name: str, shape: tuple | None = None, dtype=None) -> torch.Tensor:
    if not isinstance(value, torch.Tensor):
        raise CheckError(f"`{name}` should return a torch.Tensor, got {type(value).__name__}")
    if shape is not None and tuple(value.shape) != tuple(shape):
        raise CheckError(f"`{name}` returned shape {tuple(value.shape)}; expected {tuple(shape)}")
    if dtype is not None and value.dtype != dtype:
        raise CheckError(f"`{name}` returned dtype {value.dtype}; expected {dtype}")
    return value


def _scalar(got, name: str) -> torch.Tensor:
    """A loss: one number, or a tuple whose first element is one."""
    got = expect_tensor(got[0] if isinstance(got, tuple) else got, name)
    if got.dim() != 0:
        raise CheckError(f"`{name}` should return one number (the mean over the batch), got shape {tuple(got.shape)}")
    return got


def _loss_verdict(got: torch.Tensor, want: torch.Tensor, name: str, where: str, mistakes, default_hint: str,
                  detached: str) -> None:
    """The common end of a loss checker. Returns if ``got`` equals ``want`` and carries a gradient;
    otherwise raises, naming the first of ``mistakes()`` - ``(wrong value, hint)`` pairs, computed
    only on failure - that ``got`` equals, or ``default_hint``.
    The message reads "`name` gave <got> <where> <want>: <hint>"."""
    if torch.allclose(got.detach(), want, atol=1e-5):
        if not got.requires_grad:
            raise CheckError(f"`{name}`'s result is detached{detached}")
        return
    hint = next((h for value, h in mistakes() if torch.allclose(got.detach(), value, atol=1e-5)), default_hint)
    raise CheckError(f"`{name}` gave {got.item():.5f} {where} {want.item():.5f}: {hint}")


def passed(message: str) -> None:
    print(f"[check passed] {message}")


# --- Chapter 1: the next-token loss -------------------------------------------------------
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
    yield (lambda: F.cross_entropy(flat, ids.reshape(-1), ignore_index=-100),
           "it looks like you did not shift: the logits at position t must predict token t+1 "
           "(use logits[:, :-1] against input_ids[:, 1:])")
    yield (lambda: F.cross_entropy(logits[:, 1:].reshape(-1, v), ids[:, :-1].reshape(-1), ignore_index=-100),
           "it looks like you shifted the wrong way: logits[:, :-1] predict input_ids[:, 1:], not the reverse")
    yield (lambda: F.cross_entropy(shifted_l, shifted_t, ignore_index=-100, reduction="sum"),
           "it looks like you summed the token losses: average over the predicted (non-ignored) tokens")
    yield (lambda: F.cross_entropy(shifted_l, shifted_t.clamp(min=0), reduction="none").sum() / max(len(shifted_t), 1),
           "it looks like ignored positions (-100) are counted: leave them out of both the sum and the count")
    yield (lambda: F.cross_entropy(shifted_l, shifted_t.clamp(min=0), reduction="none")[mask].sum() / len(shifted_t),
           "it looks like you divided by all positions: divide by the number of non-ignored targets only")
    yield (lambda: -(flat.softmax(-1).log()[0, 0]) * 0 + F.nll_loss(shifted_l[mask], shifted_t[mask]),
           "it looks like you passed raw logits to nll_loss: take log_softmax first (or use cross_entropy)")


def check_next_token_loss(fn) -> None:
    """``fn(logits[batch, seq, vocab], input_ids[batch, seq]) -> scalar`` vs transformers' causal-LM loss."""
    name = getattr(fn, "__name__", "next_token_loss")
    for i, (logits, ids) in enumerate(_loss_cases()):
        logits = logits.clone().requires_grad_(True)
        got = expect_tensor(call_learner(fn, name, logits, ids.clone()), name)
        if got.dim() != 0:
            raise CheckError(f"`{name}` should return a scalar (one number for the batch), got shape "
                             f"{tuple(got.shape)}: average the per-token losses")
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
            raise CheckError(f"`{name}` gave {got.item():.5f} on case {i} (shape {tuple(logits.shape)}, "
                             f"{int((ids == -100).sum())} ignored positions) where transformers' loss "
                             f"gives {want.item():.5f}: {hint}")
        if not got.requires_grad:
            raise CheckError(f"`{name}`'s result is not connected to the logits' graph (did you call "
                             ".item(), .detach() or use torch.no_grad()?): training needs its gradient")
    passed(f"`{name}` matches transformers' ForCausalLMLoss on 4 batches (with padding, and a 2-token edge case)")


# --- Chapter 1: sampling the next token ---------------------------------------------------
def check_sample_next_token(fn) -> None:
    """``fn(logits[batch, vocab], temperature, top_k, generator) -> LongTensor[batch]``.

    ``temperature == 0`` means greedy; ``top_k=None`` means no top-k filtering.
    """
    name = getattr(fn, "__name__", "sample_next_token")
    logits = torch.tensor([[2.0, 1.0, 0.5, 0.0, -1.0, 0.3],
                           [0.1, 0.2, 3.0, 0.2, 0.1, 0.0]])

    def draw(lg, temperature, top_k, seed=0):
        g = torch.Generator().manual_seed(seed)
        given = lg.clone()
        out = call_learner(fn, name, given, temperature, top_k, g)
        if not torch.equal(given, lg):
            raise CheckError(f"`{name}` changed the logits passed in (an in-place operation such as `/=` or "
                             f"masked assignment, at temperature={temperature}, top_k={top_k}): work on a copy, "
                             "e.g. `scaled = logits / temperature`")
        out = expect_tensor(out, name, shape=(lg.shape[0],))
        if out.dtype not in (torch.int64, torch.int32):
            raise CheckError(f"`{name}` should return token ids (integers), got dtype {out.dtype}")
        return out

    greedy = draw(logits, 0.0, None)
    if not torch.equal(greedy, logits.argmax(-1)):
        raise CheckError(f"with temperature 0 `{name}` should be greedy (argmax), got {greedy.tolist()} "
                         f"instead of {logits.argmax(-1).tolist()}")
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
            raise CheckError(f"at temperature {temperature} `{name}` sampled frequencies {freq.numpy().round(3)} "
                             f"but softmax(logits / T) is {want.numpy().round(3)}{hint}")
    for k in (2, 3):
        samples = draw(big, 1.0, k, seed=2)
        seen = set(torch.unique(samples).tolist())
        top = set(row.topk(k).indices.tolist())
        if not seen <= top:
            raise CheckError(f"with top_k={k} `{name}` sampled tokens {sorted(seen - top)} outside the {k} most "
                             f"likely {sorted(top)}: mask every other logit to -inf before sampling")
        if seen != top:
            raise CheckError(f"with top_k={k} `{name}` never sampled {sorted(top - seen)}, which are among the "
                             f"{k} most likely tokens: keep exactly k tokens (check for an off-by-one)")
        freq = torch.bincount(samples, minlength=row.numel()).float() / n
        want = torch.full_like(row, float("-inf"))
        want[list(top)] = row[list(top)]
        if (freq - F.softmax(want, -1)).abs().max() > 0.015:
            raise CheckError(f"with top_k={k} the kept tokens should keep their relative probabilities "
                             "(renormalised softmax over the top k)")
    passed(f"`{name}`: greedy at T=0, top-k keeps exactly k tokens, frequencies match softmax(logits/T) "
           "for T in (0.5, 1, 2)")


# --- Chapter 2: supervised fine-tuning ----------------------------------------------------
def _as_list(value, name: str) -> list[int]:
    if isinstance(value, torch.Tensor):
        value = value.tolist()
    if not isinstance(value, (list, tuple)):
        raise CheckError(f"`{name}` should return a list (or 1-D tensor) of ints, got {type(value).__name__}")
    return [int(v) for v in value]


def check_build_labels(fn) -> None:
    """``fn(input_ids: list[int], assistant_mask: list[int]) -> list[int]`` (not shifted, -100 elsewhere)."""
    name = getattr(fn, "__name__", "build_labels")
    cases = [
        ([3, 10, 11, 12, 5, 4, 20, 21, 5], [0, 0, 0, 0, 0, 0, 1, 1, 1]),  # one turn
        ([3, 10, 5, 4, 20, 5, 3, 11, 5, 4, 21, 22, 5], [0, 0, 0, 0, 1, 1, 0, 0, 0, 0, 1, 1, 1]),  # two turns
        ([4, 7, 5], [1, 1, 1]),  # everything is the assistant's
    ]
    for ids, mask in cases:
        got = _as_list(call_learner(fn, name, list(ids), list(mask)), name)
        want = [t if m else -100 for t, m in zip(ids, mask)]
        if got == want:
            continue
        if len(got) != len(ids):
            raise CheckError(f"`{name}` returned {len(got)} labels for {len(ids)} tokens: one label per token, "
                             "not shifted (the model shifts when it computes the loss)")
        if got == list(ids):
            raise CheckError(f"`{name}` returned the input ids unchanged: the prompt is not masked, so the model "
                             "would be trained to write the user's turns too. Put -100 where assistant_mask is 0")
        if got == [-100 if m else t for t, m in zip(ids, mask)]:
            raise CheckError(f"`{name}` masked the assistant's tokens and kept the prompt: it is the other way round")
        if got == ids[1:] + [-100] or got == [(ids[i + 1] if i + 1 < len(ids) and mask[i + 1] else -100) for i in range(len(ids))]:
            raise CheckError(f"`{name}` shifted the labels by one: keep labels aligned with input_ids; the loss "
                             "(or the model) does the shift")
        if got == [t if m else 0 for t, m in zip(ids, mask)] or got == [t if m else -1 for t, m in zip(ids, mask)]:
            raise CheckError(f"`{name}` used {got[0]} for masked positions: PyTorch's cross-entropy skips -100 "
                             "(ignore_index), not 0 or -1")
        raise CheckError(f"`{name}` gave {got} for input_ids={ids}, assistant_mask={mask}; expected {want}")
    passed(f"`{name}`: prompt masked with -100, assistant tokens (and their end token) kept, one- and two-turn cases")


def check_collate(fn, pad_id: int = 0) -> None:
    """``fn(examples: list[{"input_ids", "labels"}], pad_id) -> {"input_ids", "labels", "attention_mask"}``."""
    name = getattr(fn, "__name__", "collate")
    examples = [{"input_ids": [3, 10, 5, 4, 20, 5], "labels": [-100, -100, -100, -100, 20, 5]},
                {"input_ids": [3, 11, 12, 13, 5, 4, 21, 22, 5], "labels": [-100] * 6 + [21, 22, 5]},
                {"input_ids": [4, 7, 5], "labels": [4, 7, 5]}]
    out = call_learner(fn, name, [dict(e) for e in examples], pad_id)
    if not isinstance(out, dict) or not {"input_ids", "labels", "attention_mask"} <= set(out):
        raise CheckError(f"`{name}` should return a dict with input_ids, labels and attention_mask; got "
                         f"{type(out).__name__} {sorted(out) if isinstance(out, dict) else ''}")
    from .sft import collate as reference

    want = reference(examples, pad_id)
    for key in ("input_ids", "labels", "attention_mask"):
        got = expect_tensor(out[key], f"{name}(...)['{key}']", shape=tuple(want[key].shape))
        if got.dtype != torch.long:
            raise CheckError(f"`{name}(...)['{key}']` should be torch.long (integer ids), got {got.dtype}")
        if torch.equal(got, want[key]):
            continue
        if key == "input_ids" and torch.equal(got.flip(1), reference([{**e, "input_ids": e["input_ids"][::-1],
                                                                        "labels": e["labels"][::-1]} for e in examples], pad_id)["input_ids"]):
            raise CheckError(f"`{name}` padded on the left: pad on the right for training (positions stay 0..n-1)")
        if key == "labels" and torch.equal(got, torch.where(want["attention_mask"].bool(), want["labels"], pad_id)):
            raise CheckError(f"`{name}` padded the labels with pad_id ({pad_id}): padding must be -100 so the loss "
                             "skips it, otherwise the model learns to predict padding")
        if key == "attention_mask" and bool((got == 1).all()):
            raise CheckError(f"`{name}` set attention_mask to 1 everywhere: padding positions must be 0")
        raise CheckError(f"`{name}(...)['{key}']` is\n{got}\nexpected\n{want[key]}")
    passed(f"`{name}`: right padding with pad_id, labels padded with -100, attention mask 0 on padding")


def _sft_loss_cases():
    g = torch.Generator().manual_seed(1)
    cases = []
    for batch, seq, vocab in [(3, 12, 9), (2, 6, 7), (4, 10, 11)]:
        logits = torch.randn(batch, seq, vocab, generator=g) * 2
        labels = torch.full((batch, seq), -100)
        for i in range(batch):  # prompts of different lengths, responses of very different lengths
            start = 1 + (i * 3) % (seq - 2)
            stop = seq - (i % 2) * 2
            labels[i, start:stop] = torch.randint(0, vocab, (stop - start,), generator=g)
        cases.append((logits, labels))
    return cases


def check_sft_loss(fn) -> None:
    """``fn(logits[batch, seq, vocab], labels[batch, seq]) -> scalar``: the token-level mean over all
    labelled response tokens of the batch (what ``transformers``/TRL compute)."""
    name = getattr(fn, "__name__", "sft_loss")
    for i, (logits, labels) in enumerate(_sft_loss_cases()):
        logits = logits.clone().requires_grad_(True)
        got = expect_tensor(call_learner(fn, name, logits, labels.clone()), name)
        if got.dim() != 0:
            raise CheckError(f"`{name}` should return a scalar, got shape {tuple(got.shape)}")
        want = _library_next_token_loss(logits.detach(), labels)
        if torch.allclose(got.detach().float(), want, atol=1e-5, rtol=1e-5):
            if not got.requires_grad:
                raise CheckError(f"`{name}`'s result is detached from the logits: training needs its gradient")
            continue
        v = logits.size(-1)
        per_token = F.cross_entropy(logits.detach()[:, :-1].reshape(-1, v), labels[:, 1:].reshape(-1),
                                    ignore_index=-100, reduction="none").view(labels.size(0), -1)
        mask = labels[:, 1:] != -100
        per_seq = (per_token.sum(1) / mask.sum(1)).mean()
        hint = "compare with the next-token loss of Chapter 1: shift, skip -100, average over labelled tokens"
        if torch.allclose(got.detach().float(), per_seq, atol=1e-5):
            hint = ("you averaged within each sequence and then over the batch: that gives a short answer as much "
                    "weight as a long one. Average over all labelled tokens of the batch at once")
        else:
            for wrong, message in _loss_mistakes(logits.detach(), labels):
                try:
                    if torch.allclose(got.detach().float(), wrong().float(), atol=1e-5, rtol=1e-5):
                        hint = message
                        break
                except Exception:  # noqa: BLE001
                    continue
        raise CheckError(f"`{name}` gave {got.item():.5f} on case {i} where the library's loss is {want.item():.5f}: {hint}")
    passed(f"`{name}` matches transformers' causal-LM loss on 3 prompt-masked batches with uneven response lengths")


def check_count_trainable(fn) -> None:
    """``fn(model) -> int``: parameters with ``requires_grad``, each tensor counted once."""
    name = getattr(fn, "__name__", "count_trainable")
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=50, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                      num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=32,
                      tie_word_embeddings=True)
    with torch.random.fork_rng():
        torch.manual_seed(0)
        full = LlamaForCausalLM(cfg)
        lora = get_peft_model(LlamaForCausalLM(cfg), LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                                                               lora_dropout=0.0, task_type="CAUSAL_LM"))
    want_full = sum(p.numel() for p in full.parameters() if p.requires_grad)
    want_lora = lora.get_nb_trainable_parameters()[0]
    for model, want, what in [(full, want_full, "a fully trainable model with tied embeddings"),
                              (lora, want_lora, "a LoRA model (peft)")]:
        got = call_learner(fn, name, model)
        if isinstance(got, torch.Tensor):
            got = got.item()
        if not isinstance(got, int) or isinstance(got, bool):
            raise CheckError(f"`{name}` should return an int (a count), got {type(got).__name__} {got!r}")
        if got == want:
            continue
        total = sum(p.numel() for p in model.parameters())
        stated = sum(t.numel() for t in model.state_dict().values())
        if got == total:
            hint = "it counts frozen parameters too: keep only those with requires_grad"
        elif got == stated:
            hint = ("it counts the state_dict, where tied weights appear twice and frozen ones are included: "
                    "iterate over model.parameters()")
        else:
            hint = "count p.numel() for each p in model.parameters() with p.requires_grad"
        raise CheckError(f"`{name}` gave {got:,} for {what}; peft/PyTorch count {want:,}: {hint}")
    passed(f"`{name}` agrees with peft's get_nb_trainable_parameters ({want_lora:,} of "
           f"{lora.get_nb_trainable_parameters()[1]:,}) and with tied embeddings counted once")


# --- Chapter 4: DPO -----------------------------------------------------------------------
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


def check_sequence_logprobs(fn) -> None:
    """``fn(logits[batch, seq, vocab], labels[batch, seq]) -> [batch]``: the summed log-probability
    of each row's labelled (non -100) tokens, logits at t predicting labels at t+1."""
    from .dpo import sequence_logprobs as reference

    name = getattr(fn, "__name__", "sequence_logprobs")
    for i, (logits, labels, ids) in enumerate(_logprob_cases()):
        got = expect_tensor(call_learner(fn, name, logits.clone(), labels.clone()), name, shape=(labels.size(0),))
        want = reference(logits, labels)
        if torch.allclose(got.float(), want, atol=1e-4):
            continue
        lp = logits.log_softmax(-1)
        shifted_mask = labels[:, 1:] != -100
        tok = torch.gather(lp[:, :-1], 2, labels[:, 1:].clamp(min=0).unsqueeze(-1)).squeeze(-1)
        hint = "sum log_softmax(logits)[t, labels[t+1]] over the positions where labels[t+1] != -100"
        if torch.allclose(got.float(), (tok * shifted_mask).sum(-1) / shifted_mask.sum(-1), atol=1e-4):
            hint = ("you averaged over tokens: DPO uses the *sum*, the log-probability of the whole response "
                    "(ORPO, Chapter 5, is the one that averages)")
        elif torch.allclose(got.float(), (torch.gather(lp, 2, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1)
                                          * (labels != -100)).sum(-1), atol=1e-4):
            hint = "no shift: the logits at position t give the probability of the token at t+1"
        elif torch.allclose(got.float(), torch.gather(lp[:, :-1], 2, ids[:, 1:].unsqueeze(-1)).squeeze(-1).sum(-1), atol=1e-4):
            hint = "the prompt is not masked: only count positions whose label is not -100"
        raise CheckError(f"`{name}` gave {got.tolist()} on case {i} where the answer is {want.tolist()}: {hint}")
    passed(f"`{name}`: summed, shifted, prompt-masked log-probabilities on 3 batches")


def check_dpo_loss(fn, policy=None, reference=None, tokenizer=None, pairs=None, beta: float = 0.1) -> None:
    """``fn(policy_chosen, policy_rejected, ref_chosen, ref_rejected, beta) -> scalar`` (mean over the batch).

    Checked on hand-made log-probabilities (edge cases included) and, when models and pairs are
    given, against ``trl.DPOTrainer``'s loss on the same models and batch.
    """
    name = getattr(fn, "__name__", "dpo_loss")

    def want(pc, pr, rc, rr, b):
        return -F.logsigmoid(b * ((pc - rc) - (pr - rr))).mean()

    cases = [
        (torch.tensor([-5.0, -3.0, -8.0]), torch.tensor([-6.0, -2.5, -9.0]), torch.tensor([-5.5, -3.0, -7.0]),
         torch.tensor([-5.5, -3.0, -9.5]), 0.1),
        (torch.tensor([-1.0]), torch.tensor([-1.0]), torch.tensor([-1.0]), torch.tensor([-1.0]), 0.5),  # log 2
        (torch.tensor([-2.0, -40.0]), torch.tensor([-60.0, -1.0]), torch.tensor([-2.0, -40.0]),
         torch.tensor([-2.0, -200.0]), 1.0),  # huge margins, either way: must not overflow
    ]
    for i, (pc, pr, rc, rr, b) in enumerate(cases):
        pc_ = pc.clone().requires_grad_(True)
        got = _scalar(call_learner(fn, name, pc_, pr.clone(), rc.clone(), rr.clone(), b), name)
        if not torch.isfinite(got):
            raise CheckError(f"`{name}` returned {got.item()} on case {i} (large log-prob gaps): use F.logsigmoid, "
                             "not torch.log(torch.sigmoid(...)), which underflows")
        margin = (pc - rc) - (pr - rr)
        _loss_verdict(got, want(pc, pr, rc, rr, b), name, f"on case {i} where the DPO loss is", lambda: [
            (-F.logsigmoid(-b * margin).mean(),
             "the sign is flipped: the loss should fall as the chosen response gains probability"),
            (-F.logsigmoid(b * (pc - pr)).mean(),
             "the reference model is missing: subtract its log-probabilities (that is what anchors the policy)"),
            ((-b * F.logsigmoid(margin)).mean(), "beta belongs inside the sigmoid, scaling the log-ratio difference"),
            (-F.logsigmoid(b * margin).sum(), "average over the batch instead of summing"),
        ], "compare with eq. (7): -log sigmoid(beta * ((pi_c - ref_c) - (pi_r - ref_r)))",
            ": the policy log-probs need a gradient")
    message = f"`{name}` matches the DPO loss on hand-made cases (log 2 at equal log-probs, no overflow)"
    if policy is not None:
        message += _compare_with_dpo_trainer(fn, name, policy, reference, tokenizer, pairs, beta)
    passed(message)


def _compare_with_dpo_trainer(fn, name, policy, reference, tokenizer, pairs, beta) -> str:
    import copy

    import datasets
    from trl import DPOConfig, DPOTrainer

    from .dpo import sequence_logprobs

    datasets.disable_progress_bars()
    data = pairs.select_columns(["prompt", "chosen", "rejected"]).select(range(min(16, len(pairs))))
    args = DPOConfig(output_dir="/tmp/course-dpo-check", beta=beta, per_device_train_batch_size=len(data),
                     report_to=[], save_strategy="no", use_cpu=next(policy.parameters()).device.type == "cpu",
                     bf16=False, fp16=False, activation_checkpointing=False, max_length=256, disable_tqdm=True)
    trainer = DPOTrainer(model=copy.deepcopy(policy), ref_model=copy.deepcopy(reference), args=args,
                         train_dataset=data, processing_class=tokenizer)
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(len(data))])
    batch = {k: v.to(trainer.model.device) for k, v in batch.items()}
    trainer.model.eval()
    with torch.no_grad():
        trl_loss = trainer.compute_loss(trainer.model, dict(batch)).item()
        labels = batch["input_ids"].masked_fill(batch["completion_mask"] == 0, -100)
        kw = dict(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
        lp = sequence_logprobs(trainer.model(**kw).logits, labels)
        lr = sequence_logprobs(trainer.ref_model(**kw).logits, labels)
    n = len(data)
    got = call_learner(fn, name, lp[:n], lp[n:], lr[:n], lr[n:], beta)
    got = (got[0] if isinstance(got, tuple) else got).item()
    if abs(got - trl_loss) > 1e-4:
        raise CheckError(f"on a batch of {n} real pairs `{name}` gives {got:.5f} but trl.DPOTrainer gives "
                         f"{trl_loss:.5f} (beta={beta})")
    return f", and equals trl.DPOTrainer's loss on {n} real pairs ({trl_loss:.5f})"


# --- Chapter 5: ORPO ----------------------------------------------------------------------
def check_average_logprobs(fn) -> None:
    """``fn(logits[batch, seq, vocab], labels[batch, seq]) -> [batch]``: the *mean* log-probability
    of each row's labelled tokens (ORPO's length-normalised likelihood)."""
    from .orpo import average_logprobs as reference

    name = getattr(fn, "__name__", "average_logprobs")
    for i, (logits, labels, ids) in enumerate(_logprob_cases()):
        got = expect_tensor(call_learner(fn, name, logits.clone(), labels.clone()), name, shape=(labels.size(0),))
        want = reference(logits, labels)
        if torch.allclose(got.float(), want, atol=1e-4):
            continue
        from .dpo import sequence_logprobs

        hint = "average log_softmax(logits)[t, labels[t+1]] over the positions where labels[t+1] != -100"
        if torch.allclose(got.float(), sequence_logprobs(logits, labels), atol=1e-4):
            hint = "that is the sum (DPO's); ORPO averages over the response's tokens"
        raise CheckError(f"`{name}` gave {got.tolist()} on case {i} where the answer is {want.tolist()}: {hint}")
    passed(f"`{name}`: mean over labelled tokens, shifted, on 3 batches")


def check_log_odds(fn) -> None:
    """``fn(avg_logp[batch]) -> [batch]``: ``log(p / (1 - p))`` with ``log p = avg_logp``."""
    from .orpo import log_odds as reference

    name = getattr(fn, "__name__", "log_odds")
    x = torch.tensor([-0.1, -0.6931, -2.0, -7.5, -30.0, -1e-8])
    got = expect_tensor(call_learner(fn, name, x.clone()), name, shape=tuple(x.shape))
    want = reference(x)
    if not torch.isfinite(got).all():
        raise CheckError(f"`{name}` returned {got.tolist()}: not finite for log p close to 0 (p close to 1). "
                         "Compute log(1 - p) as torch.log(-torch.expm1(avg_logp)) (or log1p(-exp) far from 0)")
    if not torch.allclose(got.float(), want, rtol=1e-3, atol=1e-3):
        hint = "log odds = log p - log(1 - p)"
        if torch.allclose(got.float(), x - torch.log1p(x), atol=1e-3, equal_nan=True):
            hint = "1 - p is 1 - exp(avg_logp), not 1 + avg_logp"
        elif torch.allclose(got.float(), x, atol=1e-3):
            hint = "that is log p; subtract log(1 - p)"
        raise CheckError(f"`{name}` gave {got.tolist()} for log p = {x.tolist()}; expected {want.tolist()}: {hint}")
    passed(f"`{name}`: log(p / (1 - p)), finite from p = exp(-30) to p = 1 - 1e-8")


def check_orpo_loss(fn, model=None, tokenizer=None, pairs=None, lam: float = 0.1) -> None:
    """``fn(nll_chosen, chosen_avg_logp, rejected_avg_logp, lam) -> scalar`` (optionally a tuple whose
    first element is the loss), checked on hand-made values and, given a model and pairs, against
    ``trl.experimental.orpo.ORPOTrainer`` on the same batch."""
    from .orpo import log_odds, orpo_loss as reference

    name = getattr(fn, "__name__", "orpo_loss")
    nll = torch.tensor(2.3)
    c, r = torch.tensor([-0.5, -1.2, -3.0]), torch.tensor([-0.9, -1.0, -4.0])
    for case, (n_, c_, r_, l_) in enumerate([(nll, c, r, 0.1), (nll, c, r, 1.0), (torch.tensor(0.7), r, c, 0.5)]):
        c_in = c_.clone().requires_grad_(True)
        got = _scalar(call_learner(fn, name, n_.clone(), c_in, r_.clone(), l_), name)
        ratio = log_odds(c_) - log_odds(r_)
        _loss_verdict(got, reference(n_, c_, r_, l_)[0], name, f"on case {case} where ORPO gives", lambda: [
            (n_ + l_ * F.logsigmoid(ratio).mean(),
             "the sign of the odds-ratio term is flipped: it should *reward* a large ratio"),
            (n_ - l_ * F.logsigmoid(c_ - r_).mean(), "you used the log-probability ratio; ORPO uses the log *odds* ratio"),
            (-l_ * F.logsigmoid(ratio).mean(),
             "the NLL term on the chosen answer is missing: ORPO is SFT plus a preference penalty"),
        ], "L = nll - lam * mean(log sigmoid(log odds(chosen) - log odds(rejected)))", " from the log-probabilities")
    message = f"`{name}` matches the ORPO loss on hand-made cases"
    if model is not None:
        message += _compare_with_orpo_trainer(fn, name, model, tokenizer, pairs, lam)
    passed(message)


def _compare_with_orpo_trainer(fn, name, model, tokenizer, pairs, lam) -> str:
    import copy

    import datasets
    from trl.experimental.orpo import ORPOConfig, ORPOTrainer

    from .orpo import average_logprobs

    datasets.disable_progress_bars()
    data = pairs.select_columns(["prompt", "chosen", "rejected"]).select(range(min(16, len(pairs))))
    args = ORPOConfig(output_dir="/tmp/course-orpo-check", beta=lam, per_device_train_batch_size=len(data),
                      max_length=256, report_to=[], save_strategy="no",
                      use_cpu=next(model.parameters()).device.type == "cpu", bf16=False, fp16=False,
                      disable_tqdm=True, remove_unused_columns=False)
    trainer = ORPOTrainer(model=copy.deepcopy(model), args=args, train_dataset=data, processing_class=tokenizer)
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(len(data))])
    trainer.model.eval()
    with torch.no_grad():
        trl_loss, _ = trainer.get_batch_loss_metrics(trainer.model, batch)
        cat = trainer.concatenated_inputs(batch, is_encoder_decoder=False, padding_value=trainer.padding_value,
                                          device=trainer.model.device)
        n = batch["chosen_labels"].shape[0]
        logits = trainer.model(cat["concatenated_input_ids"], attention_mask=cat["concatenated_attention_mask"]).logits
        avg = average_logprobs(logits, cat["concatenated_labels"])
        # TRL's NLL term covers the whole chosen sequence, prompt included (see the chapter)
        full = torch.where(cat["concatenated_attention_mask"] == 1, cat["concatenated_input_ids"], -100)
        nll = F.cross_entropy(logits[:n, :-1].reshape(-1, logits.size(-1)), full[:n, 1:].reshape(-1), ignore_index=-100)
    got = call_learner(fn, name, nll, avg[:n], avg[n:], lam)
    got = (got[0] if isinstance(got, tuple) else got).item()
    if abs(got - float(trl_loss)) > 1e-4:
        raise CheckError(f"on a batch of {n} real pairs `{name}` gives {got:.5f} but ORPOTrainer gives "
                         f"{float(trl_loss):.5f} (lambda = TRL's beta = {lam})")
    return f", and equals trl's ORPOTrainer loss on {n} real pairs ({float(trl_loss):.5f})"


# --- Chapter 3: RLHF ----------------------------------------------------------------------
def check_bradley_terry_loss(fn, reward_model=None, tokenizer=None, pairs=None) -> None:
    """``fn(rewards_chosen[batch], rewards_rejected[batch]) -> scalar``: the mean of
    ``-log sigmoid(r_chosen - r_rejected)``; given a reward model and pairs, also compared with
    ``trl.RewardTrainer``'s loss on the same batch."""
    name = getattr(fn, "__name__", "bradley_terry_loss")
    cases = [(torch.tensor([1.0, -0.5, 2.0]), torch.tensor([0.0, 0.5, 2.5])),
             (torch.tensor([0.3]), torch.tensor([0.3])),  # equal rewards: log 2
             (torch.tensor([60.0, -80.0]), torch.tensor([-60.0, 80.0]))]  # huge gaps: must stay finite
    for i, (rc, rr) in enumerate(cases):
        rc_in = rc.clone().requires_grad_(True)
        got = _scalar(call_learner(fn, name, rc_in, rr.clone()), name)
        if not torch.isfinite(got):
            raise CheckError(f"`{name}` returned {got.item()} for reward gaps of 120: use F.logsigmoid, "
                             "not torch.log(torch.sigmoid(...)), which underflows to log 0")
        _loss_verdict(got, -F.logsigmoid(rc - rr).mean(), name, f"on case {i} where the Bradley-Terry loss is", lambda: [
            (-F.logsigmoid(rr - rc).mean(),
             "the sign is flipped: the loss should fall as the chosen answer's reward rises above the rejected one's"),
            (-F.logsigmoid(rc - rr).sum(), "average over the batch instead of summing"),
            ((rr - rc).mean(), "that is a linear margin; pass the difference through log-sigmoid (the Bradley-Terry likelihood)"),
        ], "the loss is -log sigmoid(r_chosen - r_rejected), averaged over the batch",
            " from the rewards: the reward model needs a gradient")
    message = f"`{name}` is the Bradley-Terry loss on hand-made cases (log 2 at a tie, finite at gaps of 120)"
    if reward_model is not None:
        message += _compare_with_reward_trainer(fn, name, reward_model, tokenizer, pairs)
    passed(message)


def _compare_with_reward_trainer(fn, name, reward_model, tokenizer, pairs) -> str:
    import copy

    import datasets
    from trl import RewardConfig, RewardTrainer

    datasets.disable_progress_bars()
    data = pairs.select_columns(["prompt", "chosen", "rejected"]).select(range(min(16, len(pairs))))
    args = RewardConfig(output_dir="/tmp/course-reward-check", per_device_train_batch_size=len(data), report_to=[],
                        save_strategy="no", use_cpu=next(reward_model.parameters()).device.type == "cpu",
                        bf16=False, fp16=False, activation_checkpointing=False, disable_tqdm=True)
    trainer = RewardTrainer(model=copy.deepcopy(reward_model), args=args, train_dataset=data, processing_class=tokenizer)
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(len(data))])
    batch = {k: v.to(trainer.model.device) for k, v in batch.items()}
    trainer.model.eval()
    with torch.no_grad():
        trl_loss = trainer.compute_loss(trainer.model, dict(batch)).item()
        rewards = trainer.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, 0]
    n = len(data)
    got = _scalar(call_learner(fn, name, rewards[:n], rewards[n:]), name).item()
    if abs(got - trl_loss) > 1e-5:
        raise CheckError(f"on a batch of {n} real pairs `{name}` gives {got:.5f} but trl.RewardTrainer gives {trl_loss:.5f}")
    return f", and equals trl.RewardTrainer's loss on {n} real pairs ({trl_loss:.5f})"


def _rollout_cases():
    """(scores, logprobs, ref_logprobs, values, mask) batches with responses of different lengths."""
    g = torch.Generator().manual_seed(3)
    out = []
    for b, t, lengths in [(3, 5, [5, 2, 3]), (2, 4, [1, 4]), (4, 6, [6, 6, 3, 1])]:
        mask = (torch.arange(t)[None, :] < torch.tensor(lengths)[:, None]).float()
        scores = torch.randn(b, generator=g)
        lp = -torch.rand(b, t, generator=g) * 3 * mask
        ref = -torch.rand(b, t, generator=g) * 3 * mask
        values = torch.randn(b, t, generator=g) * mask
        out.append((scores, lp, ref, values, mask))
    return out


def check_per_token_rewards(fn) -> None:
    """``fn(scores[B], logprobs[B,T], ref_logprobs[B,T], mask[B,T], kl_coef) -> [B,T]``."""
    from .rlhf import per_token_rewards as reference

    name = getattr(fn, "__name__", "per_token_rewards")
    for i, (scores, lp, ref, _, mask) in enumerate(_rollout_cases()):
        for kl_coef in (0.1, 0.0):
            got = expect_tensor(call_learner(fn, name, scores.clone(), lp.clone(), ref.clone(), mask.clone(), kl_coef),
                                name, shape=tuple(lp.shape))
            want = reference(scores, lp, ref, mask, kl_coef)
            if torch.allclose(got.float(), want, atol=1e-5):
                continue
            last = mask.sum(1).long() - 1
            hint = "r_t = -kl_coef * (logprobs - ref_logprobs) on response tokens, plus the score on the last one"
            if (got.float() * (1 - mask)).abs().max() > 1e-6:
                hint = "padding positions (mask 0) must get reward 0"
            elif torch.allclose(got.float(), reference(scores, ref, lp, mask, kl_coef), atol=1e-5):
                hint = "the KL term's sign is flipped: moving away from the reference must *cost* reward"
            elif kl_coef > 0 and torch.allclose(got.float(), reference(scores, lp, ref, mask, 0.0), atol=1e-5):
                hint = "the KL penalty is missing"
            elif torch.allclose(got.float()[:, 0], want[:, 0] + scores * (last > 0), atol=1e-5):
                hint = "the score goes on the *last* response token (the end token), not the first"
            elif torch.allclose(got.float()[:, -1], want[:, -1] + scores * (last < lp.shape[1] - 1), atol=1e-5):
                hint = ("the score went on the last *column*; a shorter response ends earlier - "
                        "use mask.sum(1) - 1 for each row's last token")
            elif torch.allclose(got.float()[torch.arange(len(scores)), last], -kl_coef * (lp - ref)[torch.arange(len(scores)), last], atol=1e-5):
                hint = "the score is missing from the last response token"
            raise CheckError(f"`{name}` is wrong on case {i} (kl_coef={kl_coef}, response lengths "
                             f"{mask.sum(1).long().tolist()}): {hint}\n got  {got.tolist()}\n want {want.tolist()}")
    passed(f"`{name}`: KL penalty on every token, score on each response's last token, zero padding (3 batches)")


def check_gae(fn) -> None:
    """``fn(rewards[B,T], values[B,T], mask[B,T], gamma, lam) -> (advantages[B,T], returns[B,T])``."""
    from .rlhf import gae as reference, per_token_rewards

    name = getattr(fn, "__name__", "gae")
    # a hand-computed case: one response of two tokens, rewards (0, 1), values (0.5, 0.8), gamma = lam = 1
    r, v, m = torch.tensor([[0.0, 1.0, 0.0]]), torch.tensor([[0.5, 0.8, 0.0]]), torch.tensor([[1.0, 1.0, 0.0]])
    cases = [(r, v, m, 1.0, 1.0)]
    g = torch.Generator().manual_seed(6)
    for scores, lp, ref, values, mask in _rollout_cases():
        rewards = per_token_rewards(scores, lp, ref, mask, 0.1)
        raw_values = values + torch.randn(values.shape, generator=g) * (1 - mask)  # a value model's output at padding is arbitrary
        cases += [(rewards, values, mask, 1.0, 0.95), (rewards, raw_values, mask, 0.9, 0.5)]
    for i, (rewards, values, mask, gamma, lam) in enumerate(cases):
        out = call_learner(fn, name, rewards.clone(), values.clone(), mask.clone(), gamma, lam)
        if not (isinstance(out, tuple) and len(out) == 2):
            raise CheckError(f"`{name}` should return a pair (advantages, returns), got {type(out).__name__}")
        adv = expect_tensor(out[0], name + " advantages", shape=tuple(rewards.shape))
        ret = expect_tensor(out[1], name + " returns", shape=tuple(rewards.shape))
        want_adv, want_ret = reference(rewards, values, mask, gamma, lam)
        if i == 0 and not torch.allclose(adv.float(), want_adv, atol=1e-5):
            raise CheckError(f"`{name}` gave advantages {adv.tolist()} for rewards (0, 1), values (0.5, 0.8), "
                             "gamma = lam = 1; by hand: A_1 = 1 - 0.8 = 0.2 (nothing after the last token), "
                             "A_0 = (0 + 0.8 - 0.5) + 0.2 = 0.5")
        if torch.allclose(adv.float(), want_adv, atol=1e-5):
            if not torch.allclose(ret.float(), want_ret, atol=1e-5):
                hint = "returns are advantages + values (the value model's regression target), 0 on padding"
                if torch.allclose(ret.float(), want_adv, atol=1e-5):
                    hint = "those are the advantages; the returns add the values back"
                raise CheckError(f"`{name}`'s advantages are right but its returns are not on case {i}: {hint}")
            continue
        hint = "delta_t = r_t + gamma * V_{t+1} - V_t, A_t = delta_t + gamma * lam * A_{t+1}, computed from the end"
        if (adv.float() * (1 - mask)).abs().max() > 1e-6:
            hint = "padding positions (mask 0) must get advantage 0"
        elif torch.allclose(adv.float(), reference(rewards, values, mask, 1.0, 1.0)[0], atol=1e-5):
            hint = "gamma and lam are ignored"
        elif torch.allclose(adv.float(), (rewards - values) * mask, atol=1e-5):
            hint = "the advantages do not look ahead: add gamma * V_{t+1} and the discounted future advantages"
        else:
            masked = call_learner(fn, name, rewards.clone(), values * mask, mask.clone(), gamma, lam)[0]
            if torch.allclose(masked.float(), want_adv, atol=1e-5):
                hint = ("the value after a response's last token must count as 0, but the value model's output "
                        "at the padding position leaked into the last token's delta (multiply values by the mask)")
        raise CheckError(f"`{name}` is wrong on case {i} (gamma={gamma}, lam={lam}, lengths "
                         f"{mask.sum(1).long().tolist()}): {hint}\n got  {adv.tolist()}\n want {want_adv.tolist()}")
    passed(f"`{name}`: a hand-computed case and {len(cases) - 1} batches of mixed lengths, gamma and lam")


def _ratio_cases():
    g = torch.Generator().manual_seed(4)
    mask = torch.tensor([[1.0, 1.0, 1.0, 0.0], [1.0, 1.0, 0.0, 0.0]])
    old = -torch.rand(2, 4, generator=g) * 2
    # log-ratios chosen to land inside and outside [1 - 0.2, 1 + 0.2], both signs of advantage
    shift = torch.tensor([[0.05, 0.5, -0.5, 0.0], [-0.05, 0.3, 0.0, 0.0]])
    adv = torch.tensor([[1.0, 1.0, -1.0, 0.0], [-0.5, -2.0, 0.0, 0.0]])
    return old, old + shift, adv, mask


def check_ppo_policy_loss(fn) -> None:
    """``fn(logprobs[B,T], old_logprobs[B,T], advantages[B,T], mask[B,T], clip) -> scalar``."""
    from .rlhf import masked_mean, ppo_policy_loss as reference

    name = getattr(fn, "__name__", "ppo_policy_loss")
    old, new, adv, mask = _ratio_cases()
    for i, (lp, clip) in enumerate([(old.clone(), 0.2), (new, 0.2), (new, 0.1), (new, 10.0)]):
        lp_in = lp.clone().requires_grad_(True)
        got = _scalar(call_learner(fn, name, lp_in, old.clone(), adv.clone(), mask.clone(), clip), name)
        ratio = torch.exp(lp - old)
        _loss_verdict(got, reference(lp, old, adv, mask, clip), name, f"on case {i} (clip={clip}) where PPO's loss is", lambda: [
            (masked_mean(-adv * ratio, mask),
             "the ratio is not clipped: without the clip one rollout can push the policy arbitrarily far"),
            (masked_mean(torch.minimum(-adv * ratio, -adv * ratio.clamp(1 - clip, 1 + clip)), mask),
             "take the max of the two *losses* (the min of the two objectives): PPO keeps the pessimistic one"),
            (-reference(lp, old, adv, mask, clip), "the sign is flipped: minimise the *negative* surrogate objective"),
            (masked_mean(torch.maximum(-adv * (lp - old), -adv * (lp - old).clamp(1 - clip, 1 + clip)), mask),
             "the ratio is exp(logprobs - old_logprobs), not the difference itself"),
            ((torch.maximum(-adv * ratio, -adv * ratio.clamp(1 - clip, 1 + clip)) * mask).mean(),
             "padding is counted in the mean: divide by the number of real tokens (mask.sum())"),
        ], "loss = masked mean of max(-A * ratio, -A * clamp(ratio, 1 - clip, 1 + clip)), ratio = exp(logp - old_logp)",
            " from `logprobs`: the policy needs a gradient")
    passed(f"`{name}`: ratio 1 at the rollout, clipped both ways, pessimistic max, masked mean (4 cases)")


def check_ppo_value_loss(fn) -> None:
    """``fn(values[B,T], old_values[B,T], returns[B,T], mask[B,T], clip) -> scalar``."""
    from .rlhf import masked_mean, ppo_value_loss as reference

    name = getattr(fn, "__name__", "ppo_value_loss")
    g = torch.Generator().manual_seed(5)
    mask = torch.tensor([[1.0, 1.0, 1.0, 0.0], [1.0, 0.0, 0.0, 0.0]])
    old = torch.randn(2, 4, generator=g)
    returns = old + torch.tensor([[0.5, -0.4, 0.1, 3.0], [-1.0, 0.0, 0.0, 0.0]])
    new = old + torch.tensor([[0.4, 0.3, -0.05, 2.0], [-0.6, 0.0, 0.0, 5.0]])
    for i, (v, clip) in enumerate([(old.clone(), 0.2), (new, 0.2), (new, 1.0)]):
        v_in = v.clone().requires_grad_(True)
        got = _scalar(call_learner(fn, name, v_in, old.clone(), returns.clone(), mask.clone(), clip), name)
        err, err_clipped = (v - returns) ** 2, (old + (v - old).clamp(-clip, clip) - returns) ** 2
        _loss_verdict(got, reference(v, old, returns, mask, clip), name,
                      f"on case {i} (clip={clip}) where the clipped value loss is", lambda: [
            (0.5 * masked_mean(err, mask), "the value is not clipped around the rollout's old values"),
            (masked_mean(torch.maximum(err, err_clipped), mask), "missing the factor 0.5"),
            (0.5 * masked_mean(torch.minimum(err, err_clipped), mask),
             "take the max of the clipped and unclipped squared errors (pessimistic), not the min"),
            (0.5 * (torch.maximum(err, err_clipped) * mask).mean(),
             "padding is counted in the mean: divide by the number of real tokens (mask.sum())"),
        ], "loss = 0.5 * masked mean of max((V - R)^2, (V_clipped - R)^2), V_clipped = old_V + clamp(V - old_V, -clip, clip)",
            " from `values`: the value model needs a gradient")
    passed(f"`{name}`: squared error to the returns, clipped around the old values, pessimistic, masked (3 cases)")


# --- Project 2: checkpoints that run the learner's training and say whether it is on track --
def _same_weights(a, b) -> bool:
    pa, pb = list(a.parameters()), list(b.parameters())
    return len(pa) == len(pb) and all(x.shape == y.shape and torch.equal(x, y) for x, y in zip(pa, pb))


def check_reward_model_run(fn, sft_model, tokenizer, train_pairs, held_pairs, min_accuracy: float = 0.6):
    """Run ``fn(sft_model, tokenizer, train_pairs) -> reward model`` and check it on held-out pairs.

    Returns the trained reward model, so the next steps can use it.
    """
    from .rlhf import pairwise_accuracy

    name = getattr(fn, "__name__", "train_reward")
    rm = call_learner(fn, name, sft_model, tokenizer, train_pairs)
    if not isinstance(rm, torch.nn.Module) or getattr(getattr(rm, "config", None), "num_labels", None) != 1:
        raise CheckError(f"`{name}` should return a reward model with a one-number head (as `reward_model_from` "
                         f"builds), got {type(rm).__name__}")
    acc = pairwise_accuracy(rm, tokenizer, held_pairs)
    ceiling = float(torch.tensor(list(held_pairs["label_correct"])).float().mean()) if "label_correct" in held_pairs.column_names else None
    where = f" (chance 0.5{f', noise ceiling {ceiling:.2f}' if ceiling is not None else ''})"
    if acc["vs_labels"] < 1 - min_accuracy:
        raise CheckError(f"`{name}`'s reward model agrees with {acc['vs_labels']:.2f} of held-out labels{where}: "
                         "it prefers the *rejected* answers - are chosen and rejected swapped in the loss?")
    if acc["vs_labels"] < min_accuracy:
        raise CheckError(f"`{name}`'s reward model agrees with only {acc['vs_labels']:.2f} of held-out labels{where}: "
                         f"not yet on track (aim above {min_accuracy}). Did it train? Try more epochs or a larger "
                         "learning rate, and check it starts from the SFT model")
    extra = f", {acc['vs_gold']:.2f} with the gold ranking" if "vs_gold" in acc else ""
    passed(f"`{name}`: held-out accuracy {acc['vs_labels']:.2f} against the labels{where}{extra} - on track")
    return rm


def check_policy_run(fn, *args, start, tokenizer, conversations, max_kl: float | None = 3.0, seed: int = 3,
                     judge=None):
    """Run ``fn(*args) -> policy`` and compare the policy with ``start`` (the model it was trained
    from) on ``conversations``: sampled answers, gold win rate with a 95% interval, and the KL
    from ``start``. On track = not worse than ``start`` (the interval's top is above one half)
    and, if ``max_kl`` is given, within ``max_kl`` nats of it. ``judge`` goes to
    :func:`utils.evaluate.evaluate` (``None``: the gold judge). Returns the policy.
    """
    from .dpo import sequence_kl
    from .evaluate import evaluate, win_rate

    name = getattr(fn, "__name__", "align")
    policy = call_learner(fn, name, *args)
    if not (isinstance(policy, torch.nn.Module) and hasattr(policy, "generate")):
        raise CheckError(f"`{name}` should return the trained language model, got {type(policy).__name__}")
    if policy is start or _same_weights(policy, start):
        raise CheckError(f"`{name}` returned its starting model unchanged: did the training run, on a copy of the model?")
    conversations = list(conversations)
    mine = evaluate(policy, tokenizer, conversations, do_sample=True, seed=seed, judge=judge)
    theirs = evaluate(start, tokenizer, conversations, do_sample=True, seed=seed, judge=judge)
    w = win_rate(mine["gold"], theirs["gold"])
    kl = sequence_kl(policy, start, tokenizer, conversations, list(mine["response"]))
    summary = (f"{'judged' if judge is not None else 'gold'} win rate {w['win_rate']:.2f} [{w['low']:.2f}, {w['high']:.2f}] against its starting model on "
               f"{len(conversations)} held-out conversations, KL {kl:.2f} nats")
    if w["high"] < 0.5:
        raise CheckError(f"`{name}`: {summary} - worse than where it started. Usual causes: a learning rate so "
                         "high the policy collapsed, too little KL penalty (reward hacking), or chosen and "
                         "rejected swapped")
    if max_kl is not None and kl > max_kl:
        raise CheckError(f"`{name}`: {summary} - it drifted more than {max_kl} nats from its starting model, where "
                         "learned rewards stop being trustworthy: lower the learning rate or raise the KL penalty")
    passed(f"`{name}`: {summary} - on track")
    return policy


def check_win_rate_matrix(fn) -> None:
    """``fn({name: gold scores}) -> DataFrame`` whose entry ``[a, b]`` is how often ``a``'s answer scores
    higher than ``b``'s on the same prompt, ties counting one half (so ``[a, b] + [b, a] = 1``)."""
    import numpy as np
    import pandas as pd

    name = getattr(fn, "__name__", "win_rate_matrix")
    scores = {"A": np.array([1.0, 0.0, 0.5, 1.0, -1.0]), "B": np.array([0.0, 0.0, 1.0, 1.0, -1.0]),
              "C": np.array([-1.0, 1.0, 0.5, 0.0, 1.0])}
    got = call_learner(fn, name, {k: v.copy() for k, v in scores.items()})
    if not isinstance(got, pd.DataFrame):
        raise CheckError(f"`{name}` should return a pandas DataFrame, got {type(got).__name__}")
    if list(got.index) != list(scores) or list(got.columns) != list(scores):
        raise CheckError(f"`{name}`'s rows and columns should both be the models, in order {list(scores)}; "
                         f"got rows {list(got.index)} and columns {list(got.columns)}")
    want = pd.DataFrame({b: {a: float(np.mean((scores[a] > scores[b]) + 0.5 * (scores[a] == scores[b])))
                             for a in scores} for b in scores}).loc[list(scores), list(scores)]
    if np.allclose(got.to_numpy(dtype=float), want.to_numpy(), atol=1e-6):
        passed(f"`{name}`: pairwise win rates with ties as one half, rows beating columns")
        return
    hint = "entry [a, b] = mean over prompts of 1 if a > b, 1/2 if a == b, 0 if a < b"
    if np.allclose(got.to_numpy(dtype=float), want.to_numpy().T, atol=1e-6):
        hint = "the matrix is transposed: rows should be the winners, columns the opponents"
    elif np.allclose(got.to_numpy(dtype=float),
                     pd.DataFrame({b: {a: float(np.mean(scores[a] > scores[b])) for a in scores} for b in scores}).to_numpy(), atol=1e-6):
        hint = "ties should count one half (otherwise [a, b] + [b, a] < 1 when answers tie)"
    raise CheckError(f"`{name}` is wrong: {hint}\n got\n{got}\n want\n{want}")
