"""Supervised fine-tuning, reference version: prompt-masked labels, padding, and the training loop.

Chapter 2 builds the same pieces from scratch (its loop is ``train_sft_from_scratch``) and then
uses ``trl.SFTTrainer``; :func:`train_sft` is Chapter 2's loop (``tests/test_twins.py`` keeps the
two identical). ``utils.artifacts.get_sft_model`` hands the SFT model to later chapters.
"""

from __future__ import annotations

import torch

from .config import course_seed, seed_everything
from .formats import require_columns
from .logprobs import IGNORE
from .padding import token_mean
from .pretrain import next_token_loss, warmup_cosine
from .progress import progress
from .tokenizer import check_chat_template, memo_render


def build_labels(input_ids: list[int], assistant_mask: list[int]) -> list[int]:
    """Labels for SFT: the token id where the assistant wrote it, -100 elsewhere (not shifted:
    the model's loss shifts)."""
    return [t if m else IGNORE for t, m in zip(input_ids, assistant_mask)]


def sft_example(tokenizer, messages: list[dict], max_length: int = 256) -> dict:
    """Token ids of a conversation and labels that keep only the assistant's tokens (else -100)."""
    check_chat_template(tokenizer)
    ex = memo_render(
        tokenizer, f"sft {max_length}", messages, lambda: _sft_example(tokenizer, messages, max_length)
    )
    return {k: list(v) for k, v in ex.items()}


def _sft_example(tokenizer, messages, max_length):
    enc = tokenizer.apply_chat_template(
        messages, tokenize=True, return_dict=True, return_assistant_tokens_mask=True
    )
    ids, mask = enc["input_ids"][:max_length], enc["assistant_masks"][:max_length]
    if not any(mask):
        raise ValueError(
            "no assistant tokens found in the conversation: does it end with an assistant turn, "
            "and does the chat template mark it with {% generation %}?"
        )
    return {"input_ids": ids, "labels": build_labels(ids, mask)}


def completion_example(tokenizer, prompt: list[dict], completion: list[dict], max_length: int = 256) -> dict:
    """Like :func:`sft_example`, but only the ``completion`` turn is labelled (not earlier assistant
    turns)."""
    ex = memo_render(
        tokenizer,
        f"completion {max_length} {len(prompt)}",
        prompt + completion,
        lambda: _completion_example(tokenizer, prompt, completion, max_length),
    )
    return {k: list(v) for k, v in ex.items()}


def _completion_example(tokenizer, prompt, completion, max_length):
    n_prompt = len(
        tokenizer.apply_chat_template(prompt, tokenize=True, add_generation_prompt=True, return_dict=True)[
            "input_ids"
        ]
    )
    ex = sft_example(tokenizer, prompt + completion, max_length)
    ex["labels"] = [IGNORE if i < n_prompt else t for i, t in enumerate(ex["labels"])]
    if all(t == IGNORE for t in ex["labels"]):
        raise ValueError(
            f"the completion was truncated away (prompt of {n_prompt} tokens, max_length {max_length})"
        )
    return ex


def collate(examples: list[dict], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad ``input_ids`` with ``pad_id`` and ``labels`` with -100; build the attention mask."""
    n = max(len(e["input_ids"]) for e in examples)
    ids = torch.full((len(examples), n), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), n), IGNORE, dtype=torch.long)
    attn = torch.zeros((len(examples), n), dtype=torch.long)
    for i, e in enumerate(examples):
        k = len(e["input_ids"])
        ids[i, :k] = torch.tensor(e["input_ids"])
        labels[i, :k] = torch.tensor(e["labels"])
        attn[i, :k] = 1
    return {"input_ids": ids, "labels": labels, "attention_mask": attn}


def train_sft(
    model,
    tokenizer,
    dataset,
    *,
    epochs: int = 2,
    batch_size: int = 32,
    lr: float = 1e-3,
    warmup: int = 10,
    seed: int = 0,
    desc: str = "SFT",
    show_progress: bool = True,
) -> list[dict]:
    """Chapter 2's loop: fine-tune the trainable parameters on a ``messages`` dataset, with the loss
    on the assistant tokens only (AdamW, warmup + cosine, gradient clipping)."""
    require_columns(dataset, ["messages"], "SFT")
    seed_everything(seed)
    examples = [sft_example(tokenizer, m) for m in dataset["messages"]]
    steps_per_epoch = (len(examples) + batch_size - 1) // batch_size
    total = epochs * steps_per_epoch
    device = next(model.parameters()).device
    params = [p for p in model.parameters() if p.requires_grad]  # all of them, or LoRA's adapters
    opt = torch.optim.AdamW(params, lr=lr, betas=(0.9, 0.95), weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, warmup_cosine(warmup, total))
    g = torch.Generator().manual_seed(course_seed(seed))  # the same order as Chapter 2's loop
    history, step = [], 0
    model.train()
    bar = progress(total=total, desc=desc, disable=not show_progress)
    for epoch in range(epochs):
        order = torch.randperm(len(examples), generator=g).tolist()
        for i in range(0, len(order), batch_size):
            batch = collate([examples[j] for j in order[i : i + batch_size]], tokenizer.pad_token_id)
            batch = {k: v.to(device) for k, v in batch.items()}
            loss = token_mean(  # rows of similar length together (utils.padding), as Chapter 2's loop
                batch,
                lambda b: next_token_loss(
                    model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits, b["labels"]
                ),
            )
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            sched.step()
            step += 1
            history.append(
                {"step": step, "epoch": epoch + (i + batch_size) / len(order), "loss": loss.item()}
            )
            bar.set_postfix(loss=f"{loss.item():.3f}")
            bar.update(1)
    bar.close()
    model.eval()
    return history
