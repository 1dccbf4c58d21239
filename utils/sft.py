"""Supervised fine-tuning, reference version: prompt-masked labels and a plain training loop.

Chapter 2 builds the same pieces from scratch and then uses ``trl.SFTTrainer``; later chapters
call :func:`get_sft_model` for the SFT model (from the cache, rebuilt when absent).
"""
from __future__ import annotations

import torch

from . import cache
from .config import Profile, course_seed, get_profile, seed_everything
from .data import require_columns, sft_dataset
from .pretrain import base_recipe, get_base_model, load_model, next_token_loss, progress, save_model, warmup_cosine
from .tokenizer import check_chat_template

IGNORE = -100


def build_labels(input_ids: list[int], assistant_mask: list[int]) -> list[int]:
    """Labels for SFT: the token id where the assistant wrote it, -100 elsewhere (not shifted:
    the model's loss shifts)."""
    return [t if m else IGNORE for t, m in zip(input_ids, assistant_mask)]


def sft_example(tokenizer, messages: list[dict], max_length: int = 256) -> dict:
    """Token ids of a conversation and labels that keep only the assistant's tokens (else -100)."""
    check_chat_template(tokenizer)
    enc = tokenizer.apply_chat_template(messages, tokenize=True, return_dict=True,
                                        return_assistant_tokens_mask=True)
    ids, mask = enc["input_ids"][:max_length], enc["assistant_masks"][:max_length]
    if not any(mask):
        raise ValueError("no assistant tokens found in the conversation: does it end with an assistant turn, "
                         "and does the chat template mark it with {% generation %}?")
    return {"input_ids": ids, "labels": build_labels(ids, mask)}


def completion_example(tokenizer, prompt: list[dict], completion: list[dict], max_length: int = 256) -> dict:
    """Like :func:`sft_example`, but only the ``completion`` turn is labelled (not earlier assistant turns)."""
    n_prompt = len(tokenizer.apply_chat_template(prompt, tokenize=True, add_generation_prompt=True,
                                                 return_dict=True)["input_ids"])
    ex = sft_example(tokenizer, prompt + completion, max_length)
    ex["labels"] = [IGNORE if i < n_prompt else t for i, t in enumerate(ex["labels"])]
    if all(t == IGNORE for t in ex["labels"]):
        raise ValueError(f"the completion was truncated away (prompt of {n_prompt} tokens, max_length {max_length})")
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


def train_sft(model, tokenizer, dataset, *, epochs: int = 2, batch_size: int = 32, lr: float = 1e-3,
              warmup: int = 10, seed: int = 0, show_progress: bool = True) -> list[dict]:
    """Fine-tune on a ``messages`` dataset with loss on the assistant tokens only."""
    require_columns(dataset, ["messages"], "SFT")
    seed_everything(seed)
    examples = [sft_example(tokenizer, m) for m in dataset["messages"]]
    steps_per_epoch = (len(examples) + batch_size - 1) // batch_size
    total = epochs * steps_per_epoch
    device = next(model.parameters()).device
    opt = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.95), weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, warmup_cosine(warmup, total))
    g = torch.Generator().manual_seed(course_seed(seed))  # the same order as Chapter 2's loop
    history, step = [], 0
    model.train()
    bar = progress(total=total, desc="SFT", disable=not show_progress)
    for epoch in range(epochs):
        order = torch.randperm(len(examples), generator=g).tolist()
        for i in range(0, len(order), batch_size):
            batch = collate([examples[j] for j in order[i:i + batch_size]], tokenizer.pad_token_id)
            batch = {k: v.to(device) for k, v in batch.items()}
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
            loss = next_token_loss(logits, batch["labels"])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            sched.step()
            step += 1
            history.append({"step": step, "epoch": epoch + (i + batch_size) / len(order), "loss": loss.item()})
            bar.set_postfix(loss=f"{loss.item():.3f}")
            bar.update(1)
    bar.close()
    model.eval()
    return history


def load_sft_demos(profile: Profile | None = None, recipe: dict | None = None):
    """The profile's demonstrations as ``train``/``validation`` with ``messages``: TinyWorld's
    annotators (with ``style`` and ``gold`` columns) or a Hub instruction dataset."""
    profile = profile or get_profile()
    recipe = recipe or sft_recipe(profile)
    if profile.sft_dataset is None:
        return sft_dataset(recipe["n_demos"], "messages", seed=recipe["data_seed"], dialogues=recipe["dialogues"])
    from .hub import load_hub_sft_dataset
    return load_hub_sft_dataset(profile.sft_dataset, n=recipe["n_demos"], seed=recipe["data_seed"])


# --- the SFT model artifact ----------------------------------------------------------------
def sft_recipe(profile: Profile | None = None) -> dict:
    profile = profile or get_profile()
    recipe = {"base": base_recipe(profile), "n_demos": 3000, "dialogues": 0.15, "data_seed": 0,
              "epochs": 2, "batch_size": 32, "lr": 1e-3, "warmup": 10, "seed": 0}
    if profile.sft_dataset is not None:  # (absent for TinyWorld, which keeps its cache keys)
        recipe["sft_dataset"] = profile.sft_dataset
    return recipe


def build_sft_model(recipe: dict, profile: Profile | None = None, show_progress: bool = True):
    model, tokenizer = get_base_model(profile, show_progress=show_progress)
    data = load_sft_demos(profile, recipe)
    train_sft(model, tokenizer, data["train"], epochs=recipe["epochs"], batch_size=recipe["batch_size"],
              lr=recipe["lr"], warmup=recipe["warmup"], seed=recipe["seed"], show_progress=show_progress)
    return model, tokenizer


def get_sft_model(profile: Profile | None = None, rebuild: bool = False, show_progress: bool = True):
    """The SFT model and tokenizer: the profile's instruction-tuned checkpoint, or from the cache
    (built from the base model with :func:`sft_recipe` if absent)."""
    profile = profile or get_profile()
    if profile.sft_model is not None:
        from .hub import load_hub_model
        return load_hub_model(profile.sft_model)
    recipe = sft_recipe(profile)
    return cache.load_or_build("sft", recipe, lambda: build_sft_model(recipe, profile, show_progress),
                               save_model, load_model, rebuild=rebuild)


def save_sft_model(model, tokenizer, profile: Profile | None = None):
    """Store an SFT model trained with :func:`sft_recipe` (Chapter 2 calls this)."""
    return cache.save_artifact("sft", sft_recipe(profile), lambda tmp: save_model((model, tokenizer), tmp))
