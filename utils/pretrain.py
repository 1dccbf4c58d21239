"""Chapter 1's reference code: the next-token loss, a plain training loop, and the base model.

The chapter notebook writes the same loss and loop from scratch; this module is what later
chapters (and the tests) call when they need the base model and Chapter 1 has not been run:
``get_base_model()`` loads it from the artifact cache or rebuilds it with the same recipe.
"""
from __future__ import annotations

import contextlib
import math
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM, AutoTokenizer

from . import cache
from .config import Profile, get_profile, seed_everything
from .data import lm_batches, pack_texts, pretraining_dataset
from .models import TINY_MODEL, make_model
from .tokenizer import train_tokenizer
from .world import WORLD_VERSION


def next_token_loss(logits: torch.Tensor, input_ids: torch.Tensor, ignore_index: int = -100) -> torch.Tensor:
    """Mean cross-entropy of predicting token ``t+1`` from positions ``<= t``.

    logits: ``[batch, seq, vocab]``; input_ids: ``[batch, seq]`` (positions equal to
    ``ignore_index`` are not predicted). Returns a scalar.
    """
    shift_logits = logits[:, :-1, :].reshape(-1, logits.size(-1)).float()
    targets = input_ids[:, 1:].reshape(-1)
    return F.cross_entropy(shift_logits, targets, ignore_index=ignore_index)


def progress(iterable=None, **kwargs):
    """A compact text progress bar that renders the same in a terminal, Jupyter and the book."""
    kwargs.setdefault("file", sys.stdout)
    kwargs.setdefault("mininterval", 5.0)
    kwargs.setdefault("ncols", 90)
    kwargs.setdefault("ascii", True)
    from tqdm import tqdm as text_tqdm
    return text_tqdm(iterable, **kwargs)


def warmup_cosine(warmup: int, total: int):
    """Learning-rate multiplier for step ``s`` (0-based): linear warmup to 1, then cosine to 0.

    The same schedule the chapters write by hand, so the reference loops rebuild their models exactly.
    """
    def factor(s: int) -> float:
        if s < warmup:
            return (s + 1) / warmup
        return 0.5 * (1 + math.cos(math.pi * (s - warmup) / max(1, total - warmup)))
    return factor


def train_lm(model, blocks: torch.Tensor, *, steps: int, batch_size: int, lr: float, warmup: int = 20,
             seed: int = 0, loss_fn=next_token_loss, log_every: int = 10, show_progress: bool = True,
             desc: str = "pretraining") -> list[dict]:
    """AdamW + warmup/cosine schedule + gradient clipping on random batches of ``blocks``.

    Returns the history: one ``{"step", "loss", "lr"}`` per ``log_every`` steps (loss averaged).
    """
    seed_everything(seed)
    model.train()
    device = next(model.parameters()).device
    opt = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.95), weight_decay=0.1)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, warmup_cosine(warmup, steps))
    history, running = [], []
    bar = progress(total=steps, desc=desc, disable=not show_progress)
    for step, batch in enumerate(lm_batches(blocks, batch_size, steps, seed), start=1):
        batch = batch.to(device)
        loss = loss_fn(model(input_ids=batch).logits, batch)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        running.append(loss.item())
        if step % log_every == 0 or step == steps:
            history.append({"step": step, "loss": sum(running) / len(running), "lr": sched.get_last_lr()[0]})
            bar.set_postfix(loss=f"{history[-1]['loss']:.3f}")
            running = []
        bar.update(1)
    bar.close()
    model.eval()
    return history


@torch.no_grad()
def perplexity(model, blocks: torch.Tensor, batch_size: int = 64, loss_fn=next_token_loss) -> float:
    """``exp`` of the mean next-token loss over ``blocks`` (each block weighted equally)."""
    model.eval()
    device = next(model.parameters()).device
    losses = []
    for i in range(0, len(blocks), batch_size):
        b = blocks[i:i + batch_size].to(device)
        losses.append(loss_fn(model(input_ids=b).logits, b).item() * len(b))
    return math.exp(sum(losses) / len(blocks))


def load_pretraining_corpus(profile: Profile | None = None):
    """The profile's pretraining text: TinyWorld's corpus, or a wikitext-shaped Hub dataset."""
    profile = profile or get_profile()
    if profile.pretrain_dataset is None:
        return pretraining_dataset(profile.n_documents, seed=0)
    from .hub import load_hub_text_dataset
    return load_hub_text_dataset(*profile.pretrain_dataset)


# --- the base model artifact ---------------------------------------------------------------
def base_recipe(profile: Profile | None = None) -> dict:
    """Everything that determines the base model: change any of it and it is rebuilt."""
    p = profile or get_profile()
    return {
        "world_version": WORLD_VERSION, "world_seed": 0, "n_documents": p.n_documents, "vocab_size": p.vocab_size, "model": TINY_MODEL,
        "seq_len": p.seq_len, "steps": p.pretrain_steps, "batch_size": p.pretrain_batch_size,
        "lr": p.pretrain_lr, "warmup": 20, "seed": 0,
    }


def base_tokenizer(recipe: dict):
    corpus = pretraining_dataset(recipe["n_documents"], recipe["world_seed"])
    return train_tokenizer(corpus["train"]["text"], vocab_size=recipe["vocab_size"])


def build_base_model(recipe: dict, show_progress: bool = True):
    """Train the tokenizer and the base model from scratch with ``recipe`` (deterministic)."""
    corpus = pretraining_dataset(recipe["n_documents"], recipe["world_seed"])
    tokenizer = train_tokenizer(corpus["train"]["text"], vocab_size=recipe["vocab_size"])
    model = make_model(tokenizer, seed=recipe["seed"], **recipe["model"])
    blocks = pack_texts(tokenizer, corpus["train"]["text"], recipe["seq_len"])
    train_lm(model, blocks, steps=recipe["steps"], batch_size=recipe["batch_size"], lr=recipe["lr"],
             warmup=recipe["warmup"], seed=recipe["seed"], show_progress=show_progress,
             desc="building the base model")
    return model, tokenizer


@contextlib.contextmanager
def _quiet_progress():
    """Hide transformers' one-file "writing shards" / "loading weights" bars: noise in a notebook."""
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        hf_logging.enable_progress_bar()


def save_model(obj, path: Path) -> None:
    """Save a (model, tokenizer) pair as safetensors + tokenizer files."""
    model, tokenizer = obj
    with _quiet_progress():
        model.save_pretrained(path, safe_serialization=True)
    tokenizer.save_pretrained(path)


def load_model(path: Path):
    """Load a (model, tokenizer) saved by :func:`save_model`: safetensors only, no remote code."""
    with _quiet_progress():
        model = AutoModelForCausalLM.from_pretrained(path, use_safetensors=True, trust_remote_code=False)
    tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=False)
    model.eval()
    return model, tokenizer


def save_base_model(model, tokenizer, profile: Profile | None = None) -> Path:
    """Store a base model trained with :func:`base_recipe` (Chapter 1 calls this)."""
    return cache.save_artifact("base", base_recipe(profile), lambda tmp: save_model((model, tokenizer), tmp))


def get_base_model(profile: Profile | None = None, rebuild: bool = False, show_progress: bool = True):
    """The base model and tokenizer: the hub checkpoint, or TinyWorld's from the cache (built if absent)."""
    profile = profile or get_profile()
    if profile.base_model is not None:
        from .hub import load_hub_model
        return load_hub_model(profile.base_model)
    recipe = base_recipe(profile)
    return cache.load_or_build("base", recipe, lambda: build_base_model(recipe, show_progress),
                               save_model, load_model, rebuild=rebuild)
