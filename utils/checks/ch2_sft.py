"""Chapter 2 checkers: supervised fine-tuning (labels, collation, the SFT loss, trainable parameters),
and a LoRA layer from scratch against ``peft``'s."""

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


# --- LoRA from scratch ---------------------------------------------------------------------
def _peft_lora(base, r: int, alpha: float, lora_a, lora_b):
    """``peft``'s LoRA layer on a copy of ``base``, with the given adapter weights."""
    from peft import LoraConfig, inject_adapter_in_model

    holder = torch.nn.Module()
    holder.proj = copy.deepcopy(base)
    config = LoraConfig(r=r, lora_alpha=alpha, target_modules=["proj"], lora_dropout=0.0)
    layer = inject_adapter_in_model(config, holder).proj
    with torch.no_grad():
        layer.lora_A["default"].weight.copy_(lora_a)
        layer.lora_B["default"].weight.copy_(lora_b)
    return layer


@continues_with("from utils.lora import LoRALinear")
def check_lora_linear(cls) -> None:
    """``cls(base: nn.Linear, r, alpha)``: a module with parameters ``lora_A [r, in]`` and
    ``lora_B [out, r]`` whose forward is ``base(x) + (alpha / r) x A^T B^T``, with ``base`` frozen and
    ``B`` starting at zero, and whose ``merge()`` returns one ``nn.Linear`` that computes the same.
    Checked against ``peft``'s LoRA layer on the same weights, on layers of distinct sizes."""
    # the learner's layer draws its A from the global generator: leave the notebook's random state
    # as it was, so that the cells after the check draw what they would have drawn without it
    with torch.random.fork_rng(devices=[]):
        _check_lora_linear(cls)


def _check_lora_linear(cls) -> None:
    name = getattr(cls, "__name__", "LoRALinear")
    g = torch.Generator().manual_seed(4)
    for d_in, d_out, r, alpha, bias in [(6, 5, 3, 6.0, True), (7, 9, 2, 16.0, False)]:
        base = torch.nn.Linear(d_in, d_out, bias=bias)
        with torch.no_grad():
            base.weight.copy_(torch.randn(d_out, d_in, generator=g))
            if bias:
                base.bias.copy_(torch.randn(d_out, generator=g))
        kept = copy.deepcopy(base)
        where = f"(in {d_in}, out {d_out}, r = {r}, alpha = {alpha}{', with bias' if bias else ''})"
        layer = call_learner(cls, name, base, r, alpha)
        if not isinstance(layer, torch.nn.Module):
            raise CheckError(
                f"`{name}(base, r, alpha)` should build an nn.Module, got {type(layer).__name__}"
            )
        for attr, shape in (("lora_A", (r, d_in)), ("lora_B", (d_out, r))):
            p = getattr(layer, attr, None)
            if not isinstance(p, torch.nn.Parameter):
                raise CheckError(f"`{name}` should hold `{attr}` as an nn.Parameter {where}")
            if tuple(p.shape) != shape:
                hint = " (transposed?)" if tuple(p.shape) == shape[::-1] else ""
                raise CheckError(
                    f"`{name}.{attr}` has shape {tuple(p.shape)}; expected {shape}{hint} {where}"
                )
        trainable = {n for n, p in layer.named_parameters() if p.requires_grad}
        frozen_base = [n for n in trainable if n not in ("lora_A", "lora_B")]
        if frozen_base:
            raise CheckError(
                f"`{name}` leaves {sorted(frozen_base)} trainable: the base layer must be frozen "
                "(requires_grad False), or the optimiser updates every weight and LoRA saves nothing"
            )
        if trainable != {"lora_A", "lora_B"}:
            raise CheckError(
                f"`{name}`: lora_A and lora_B must be trainable; trainable now: {sorted(trainable)}"
            )
        if not torch.equal(layer.lora_B.detach(), torch.zeros(d_out, r)):
            raise CheckError(
                f"`{name}.lora_B` should start at zero {where}, so that the layer starts exactly at the "
                "base model (A starts random, as nn.Linear's weights do)"
            )
        if torch.equal(layer.lora_A.detach(), torch.zeros(r, d_in)):
            raise CheckError(
                f"`{name}.lora_A` starts at zero too {where}: then no gradient reaches either matrix "
                "(dL/dB needs A, dL/dA needs B). Initialise A at random (nn.init.kaiming_uniform_)"
            )
        x = torch.randn(3, 4, d_in, generator=g)
        out = expect_tensor(call_learner(layer, name, x), f"{name}(x)", shape=(3, 4, d_out))
        if not torch.allclose(out, kept(x), atol=1e-5):
            raise CheckError(
                f"`{name}` does not start at the base layer {where}: with B = 0 its output must be base(x)"
            )
        lora_a, lora_b = torch.randn(r, d_in, generator=g), torch.randn(d_out, r, generator=g)
        with torch.no_grad():
            layer.lora_A.copy_(lora_a)
            layer.lora_B.copy_(lora_b)
        reference = _peft_lora(kept, r, alpha, lora_a, lora_b)
        out = expect_tensor(call_learner(layer, name, x), f"{name}(x)", shape=(3, 4, d_out))
        want = reference(x).detach()
        if not torch.allclose(out, want, atol=1e-4):
            delta = (out - kept(x)).detach()
            update = x @ lora_a.T @ lora_b.T
            if torch.allclose(delta, update, atol=1e-4):
                hint = f"the update is not scaled: multiply it by alpha / r (= {alpha / r:g} here)"
            elif torch.allclose(delta, alpha * update, atol=1e-4):
                hint = f"the update is scaled by alpha; LoRA scales it by alpha / r (= {alpha / r:g} here)"
            elif torch.allclose(delta, (r / alpha) * update, atol=1e-4):
                hint = "the scale is upside down: alpha / r, not r / alpha"
            else:
                hint = "the output is base(x) + (alpha / r) * x A^T B^T: x goes through A first, then B"
            raise CheckError(f"`{name}` differs from peft's LoRA layer on the same weights {where}: {hint}")
        out.sum().backward()
        if any(p.grad is not None for p in base.parameters()):
            raise CheckError(f"`{name}` sends a gradient to the base layer {where}: freeze it")
        if layer.lora_A.grad is None or layer.lora_B.grad is None:
            raise CheckError(f"`{name}`: no gradient reached lora_A or lora_B {where}")
        merged = call_learner(getattr(layer, "merge", None), f"{name}.merge")
        if not isinstance(merged, torch.nn.Linear):
            raise CheckError(f"`{name}.merge()` should return one nn.Linear, got {type(merged).__name__}")
        reference.merge()
        got = merged(x).detach()
        if not torch.allclose(got, want, atol=1e-4):
            w = merged.weight.detach()
            if torch.allclose(w, kept.weight + lora_b @ lora_a, atol=1e-4):
                hint = "the merged weight is missing the scale alpha / r"
            elif bias and not torch.allclose(merged.bias.detach(), kept.bias, atol=1e-6):
                hint = "the merged layer lost the base layer's bias"
            else:
                hint = "the merged weight is W + (alpha / r) B A (shape [out, in])"
            raise CheckError(f"`{name}.merge()` computes something else than the adapter {where}: {hint}")
        if not torch.allclose(merged.weight.detach(), reference.base_layer.weight.detach(), atol=1e-4):
            raise CheckError(f"`{name}.merge()`'s weight differs from peft's merged weight {where}")
        if not torch.allclose(call_learner(layer, name, x).detach(), want, atol=1e-4):
            raise CheckError(
                f"after `merge()`, `{name}` itself changed {where}: merge into a new nn.Linear and leave "
                "the adapter layer as it was"
            )
    passed(
        f"`{name}` equals peft's LoRA layer on the same weights (output, gradients only to A and B, "
        "and the merged nn.Linear), on two layers of different sizes"
    )
