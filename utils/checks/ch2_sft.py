"""Chapter 2 checkers: supervised fine-tuning (labels, collation, the SFT loss, trainable parameters)."""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F

from .ch1_pretraining import (
    _WRONG_GRADIENT,
    _library_next_token_loss,
    _loss_mistakes,
    _named_mistake,
    _overflow_hint,
    _same_gradient,
)
from .core import CheckError, call_learner, continues_with, expect_tensor, passed


def _as_list(value, name: str) -> list[int]:
    if isinstance(value, torch.Tensor):
        value = value.tolist()
    if not isinstance(value, (list, tuple)):
        raise CheckError(f"`{name}` should return a list (or 1-D tensor) of ints, got {type(value).__name__}")
    return [int(v) for v in value]


@continues_with("from utils.sft import build_labels")
def check_build_labels(fn) -> None:
    """``fn(input_ids: list[int], assistant_mask: list[int]) -> list[int]`` (not shifted, -100 elsewhere)."""
    name = getattr(fn, "__name__", "build_labels")
    cases = [
        ([3, 10, 11, 12, 5, 4, 20, 21, 5], [0, 0, 0, 0, 0, 0, 1, 1, 1]),  # one turn
        ([3, 10, 5, 4, 20, 5, 3, 11, 5, 4, 21, 22, 5], [0, 0, 0, 0, 1, 1, 0, 0, 0, 0, 1, 1, 1]),  # two turns
        ([4, 7, 5], [1, 1, 1]),  # everything is the assistant's
        ([3, 0, 10, 5, 4, 0, 21, 0, 5], [0, 0, 0, 0, 1, 1, 1, 1, 1]),  # token id 0 is a token too
    ]
    for ids, mask in cases:
        given_ids, given_mask = list(ids), list(mask)
        got = _as_list(call_learner(fn, name, given_ids, given_mask), name)
        if given_ids != ids or given_mask != mask:
            changed = [
                f"{k} {a} became {b}"
                for k, a, b in [("input_ids", ids, given_ids), ("assistant_mask", mask, given_mask)]
                if a != b
            ]
            raise CheckError(
                f"`{name}` changed the lists passed in ({'; '.join(changed)}): `labels = input_ids` "
                "does not copy, so setting labels[i] = -100 writes -100 into the input ids too. "
                "Build a new list (e.g. a list comprehension)"
            )
        want = [t if m else -100 for t, m in zip(ids, mask)]
        if got == want:
            continue
        if len(got) != len(ids):
            raise CheckError(
                f"`{name}` returned {len(got)} labels for {len(ids)} tokens: one label per token, "
                "not shifted (the model shifts when it computes the loss)"
            )
        if got == list(ids):
            raise CheckError(
                f"`{name}` returned the input ids unchanged: the prompt is not masked, so the model "
                "would be trained to write the user's turns too. Put -100 where assistant_mask is 0"
            )
        if got == [-100 if m else t for t, m in zip(ids, mask)]:
            raise CheckError(
                f"`{name}` masked the assistant's tokens and kept the prompt: it is the other way round"
            )
        if got == ids[1:] + [-100] or got == [
            (ids[i + 1] if i + 1 < len(ids) and mask[i + 1] else -100) for i in range(len(ids))
        ]:
            raise CheckError(
                f"`{name}` shifted the labels by one: keep labels aligned with input_ids; the loss "
                "(or the model) does the shift"
            )
        if got == [t if m else 0 for t, m in zip(ids, mask)] or got == [
            t if m else -1 for t, m in zip(ids, mask)
        ]:
            raise CheckError(
                f"`{name}` used {got[0]} for masked positions: PyTorch's cross-entropy skips -100 "
                "(ignore_index), not 0 or -1"
            )
        if all(g == w or (t == 0 and m) for g, w, t, m in zip(got, want, ids, mask)):
            raise CheckError(
                f"`{name}` gave {got} for input_ids={ids}, assistant_mask={mask}: the assistant's token "
                "id 0 lost its label. Token 0 is a token like any other: decide by the mask alone "
                "(`t * m or -100`, or any test of the token's own truth value, drops it)"
            )
        raise CheckError(f"`{name}` gave {got} for input_ids={ids}, assistant_mask={mask}; expected {want}")
    passed(
        f"`{name}`: prompt masked with -100, assistant tokens (and their end token) kept, "
        "one- and two-turn cases"
    )


def _collate_case(fn, name: str, examples: list[dict], pad_id: int) -> None:
    """One batch through the learner's ``fn``, compared key by key with the course's ``collate``."""
    given = copy.deepcopy(examples)
    out = call_learner(fn, name, given, pad_id)
    if repr(given) != repr(examples):
        raise CheckError(
            f"`{name}` changed the examples passed in (e.g. `e['input_ids'] += [pad_id] * k` extends "
            "the dataset's own list, and `e['input_ids'] = ...` replaces it): the next epoch would "
            "see padding in its examples. Leave them as they are and build new tensors"
        )
    if not isinstance(out, dict) or not {"input_ids", "labels", "attention_mask"} <= set(out):
        raise CheckError(
            f"`{name}` should return a dict with input_ids, labels and attention_mask; got "
            f"{type(out).__name__} {sorted(out) if isinstance(out, dict) else ''}"
        )
    from ..sft import collate as reference

    want = reference(examples, pad_id)
    real = want["attention_mask"].bool()
    for key in ("input_ids", "labels", "attention_mask"):
        got = expect_tensor(out[key], f"{name}(...)['{key}']", shape=tuple(want[key].shape))
        if got.dtype != torch.long:
            raise CheckError(f"`{name}(...)['{key}']` should be torch.long (integer ids), got {got.dtype}")
        if torch.equal(got, want[key]):
            continue
        if key == "input_ids" and torch.equal(
            got.flip(1),
            reference(
                [{**e, "input_ids": e["input_ids"][::-1], "labels": e["labels"][::-1]} for e in examples],
                pad_id,
            )["input_ids"],
        ):
            raise CheckError(
                f"`{name}` padded on the left: pad on the right for training (positions stay 0..n-1)"
            )
        if key == "input_ids" and torch.equal(got, torch.where(real, want["input_ids"], 0)):
            raise CheckError(
                f"`{name}` padded input_ids with 0 where pad_id is {pad_id}: pad with the pad_id "
                "argument (the tokenizer's padding token is not always 0)"
            )
        if key == "labels" and torch.equal(got, torch.where(real, want["labels"], pad_id)):
            raise CheckError(
                f"`{name}` padded the labels with pad_id ({pad_id}): padding must be -100 so the loss "
                "skips it, otherwise the model learns to predict padding"
            )
        if key == "attention_mask" and bool((got == 1).all()):
            raise CheckError(f"`{name}` set attention_mask to 1 everywhere: padding positions must be 0")
        wrong = got != want[key]
        if key != "input_ids" and bool((real & (want["input_ids"] == pad_id))[wrong].all()):
            raise CheckError(
                f"`{name}(...)['{key}']` is wrong only at real tokens that equal pad_id ({pad_id}), as "
                "when a tokenizer pads with the token that also ends every text: you found the padding "
                "by comparing input_ids with pad_id. Use each example's length instead"
            )
        raise CheckError(f"`{name}(...)['{key}']` with pad_id={pad_id} is\n{got}\nexpected\n{want[key]}")


@continues_with("from utils.sft import collate")
def check_collate(fn, pad_id: int = 0) -> None:
    """``fn(examples: list[{"input_ids", "labels"}], pad_id)
    -> {"input_ids", "labels", "attention_mask"}``; with ``pad_id`` and with another one, on a batch
    where real tokens equal the padding token, and the examples passed in left unchanged."""
    name = getattr(fn, "__name__", "collate")
    examples = [
        {"input_ids": [3, 10, 5, 4, 20, 5], "labels": [-100, -100, -100, -100, 20, 5]},
        {"input_ids": [3, 11, 12, 13, 5, 4, 21, 22, 5], "labels": [-100] * 6 + [21, 22, 5]},
        {"input_ids": [4, 7, 5], "labels": [4, 7, 5]},
    ]
    _collate_case(fn, name, examples, pad_id)
    p = 2 if pad_id != 2 else 1  # another padding id, which some real tokens below equal
    examples = [
        {"input_ids": [3, 14, p], "labels": [-100, 14, p]},
        {"input_ids": [3, 9, 8, 4, 17, p], "labels": [-100, -100, -100, -100, 17, p]},
        {"input_ids": [6], "labels": [6]},
        {"input_ids": [3, p, 4, 11], "labels": [-100, -100, -100, 11]},
    ]
    _collate_case(fn, name, examples, p)
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
    logits, labels = cases[-1]
    cases[-1] = (logits * 50, labels)  # logits of magnitude ~100, as a trained model's can be
    return cases


@continues_with("from utils.sft import sft_loss")
def check_sft_loss(fn) -> None:
    """``fn(logits[batch, seq, vocab], labels[batch, seq]) -> scalar``: the token-level mean over all
    labelled response tokens of the batch (what ``transformers``/TRL compute): its value (also on
    logits of magnitude ~100) and its gradient with respect to the logits."""
    name = getattr(fn, "__name__", "sft_loss")
    for i, (logits, labels) in enumerate(_sft_loss_cases()):
        logits = logits.clone().requires_grad_(True)
        got = expect_tensor(call_learner(fn, name, logits, labels.clone()), name)
        if got.dim() != 0:
            raise CheckError(f"`{name}` should return a scalar, got shape {tuple(got.shape)}")
        want = _library_next_token_loss(logits.detach(), labels)
        if torch.allclose(got.detach().float(), want, atol=1e-5, rtol=1e-5):
            same = got.requires_grad and _same_gradient(
                got, logits, lambda lg: _library_next_token_loss(lg, labels)
            )
            if same is None or not got.requires_grad:
                raise CheckError(
                    f"`{name}`'s result is detached from the logits (did you call .item(), .detach() or "
                    "use torch.no_grad(), or make a new tensor from the number?): training needs its "
                    "gradient"
                )
            if not same:
                raise CheckError(f"on case {i} `{name}`'s result{_WRONG_GRADIENT}")
            continue
        v = logits.size(-1)
        per_token = F.cross_entropy(
            logits.detach()[:, :-1].reshape(-1, v),
            labels[:, 1:].reshape(-1),
            ignore_index=-100,
            reduction="none",
        ).view(labels.size(0), -1)
        mask = labels[:, 1:] != -100
        per_seq = (per_token.sum(1) / mask.sum(1)).mean()
        hint = _overflow_hint(got, logits)
        if hint is None and torch.allclose(got.detach().float(), per_seq, atol=1e-5):
            hint = (
                "you averaged within each sequence and then over the batch: that gives a short answer "
                "as much weight as a long one. Average over all labelled tokens of the batch at once"
            )
        hint = hint or _named_mistake(
            got,
            _loss_mistakes(logits.detach(), labels),
            "compare with the next-token loss of Chapter 1: shift, skip -100, average over labelled tokens",
        )
        raise CheckError(
            f"`{name}` gave {got.item():.5f} on case {i} "
            f"where the library's loss is {want.item():.5f}: {hint}"
        )
    passed(
        f"`{name}` matches transformers' causal-LM loss on 3 prompt-masked batches "
        "with uneven response lengths"
    )


@continues_with("from utils.models import count_trainable")
def check_count_trainable(fn) -> None:
    """``fn(model) -> int``: parameters with ``requires_grad``, each tensor counted once."""
    name = getattr(fn, "__name__", "count_trainable")
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(
        vocab_size=50,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=2,
        max_position_embeddings=32,
        tie_word_embeddings=True,
    )
    with torch.random.fork_rng():
        torch.manual_seed(0)
        full = LlamaForCausalLM(cfg)
        lora = get_peft_model(
            LlamaForCausalLM(cfg),
            LoraConfig(
                r=4,
                lora_alpha=8,
                target_modules=["q_proj", "v_proj"],
                lora_dropout=0.0,
                task_type="CAUSAL_LM",
            ),
        )
    want_full = sum(p.numel() for p in full.parameters() if p.requires_grad)
    want_lora = lora.get_nb_trainable_parameters()[0]
    for model, want, what in [
        (full, want_full, "a fully trainable model with tied embeddings"),
        (lora, want_lora, "a LoRA model (peft)"),
    ]:
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
        elif got in (
            stated,
            sum(p.numel() for _, p in model.named_parameters(remove_duplicate=False) if p.requires_grad),
        ):
            hint = (
                "it counts the tied embedding twice (the input embedding and the output layer share one "
                "tensor), as the state_dict does - which also lists frozen tensors - and as "
                "named_parameters(remove_duplicate=False) does: iterate over model.parameters(), which "
                "yields each tensor once, and keep those with requires_grad"
            )
        else:
            hint = "count p.numel() for each p in model.parameters() with p.requires_grad"
        raise CheckError(f"`{name}` gave {got:,} for {what}; peft/PyTorch count {want:,}: {hint}")
    passed(
        f"`{name}` agrees with peft's get_nb_trainable_parameters ({want_lora:,} of "
        f"{lora.get_nb_trainable_parameters()[1]:,}) and with tied embeddings counted once"
    )
