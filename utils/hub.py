"""Loaders for the ``hub`` profile: real checkpoints and datasets from the Hugging Face Hub.

Every loader also takes a local folder or file of the same shape, which is how the tests run
them offline. Loading is safe: safetensors only, ``trust_remote_code=False``.
"""

from __future__ import annotations

import os
import socket
from pathlib import Path

from .config import pick_device, weights_dtype
from .formats import alpaca_to_messages, require_columns, split_implicit_prompt

HUB_HOST = "huggingface.co"


class HubUnavailableError(RuntimeError):
    """The ``hub`` profile was asked for but the Hugging Face Hub cannot be reached."""


def _is_local(name: str) -> bool:
    return Path(name).exists()


def hub_reachable(host: str = HUB_HOST, timeout: float = 3.0) -> bool:
    """True if a TCP connection to the Hub can be opened (and offline mode is not forced)."""
    if os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false", "False"):
        return False
    try:
        with socket.create_connection((host, 443), timeout=timeout):
            return True
    except OSError:
        return False


def require_hub(what: str) -> None:
    if not hub_reachable():
        raise HubUnavailableError(
            f"cannot download {what!r}: the Hugging Face Hub ({HUB_HOST}) is not reachable "
            "(no network, or HF_HUB_OFFLINE is set). The 'hub' profile needs internet access; "
            "use the offline profile instead: COURSE_PROFILE=tiny, or get_profile('tiny')."
        )


def _from_pretrained(loader, name: str, **kwargs):
    if not _is_local(name):
        require_hub(name)
    return loader(name, trust_remote_code=False, **kwargs)


def load_hub_tokenizer(name: str):
    """A tokenizer from the Hub (or a local folder); gives it a pad token if it lacks one."""
    from transformers import AutoTokenizer

    tok = _from_pretrained(AutoTokenizer.from_pretrained, name)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    template = getattr(tok, "chat_template", None) or ""
    if "generation %}" not in template:
        # Base checkpoints often have no template, or one without the {% generation %} markers that
        # assistant-only loss needs; the course's template has them (its role markers become text).
        from .tokenizer import CHAT_TEMPLATE

        tok.chat_template = CHAT_TEMPLATE
    return tok


def load_hub_model(name: str, device=None, dtype=None):
    """``(model, tokenizer)`` for a causal LM on the Hub (or in a local folder), on the best device.

    The weights are fp32 unless ``dtype`` says otherwise: the course trains these models, and
    training needs fp32 weights (see :func:`utils.config.weights_dtype`).
    """
    from transformers import AutoModelForCausalLM

    device = device or pick_device()
    dtype = dtype or weights_dtype(device, trainable=True)
    model = _from_pretrained(AutoModelForCausalLM.from_pretrained, name, dtype=dtype, use_safetensors=True)
    model.to(device).eval()
    return model, load_hub_tokenizer(name)


def load_hub_judge(name: str, device=None):
    """``(reward model, its tokenizer)`` for a public reward model on the Hub (or in a local folder):
    the stand-in for TinyWorld's gold judge when the prompts are real ones. The tokenizer keeps
    the reward model's own chat template, which is what it was trained to read."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    device = device or pick_device()
    model = _from_pretrained(
        AutoModelForSequenceClassification.from_pretrained,
        name,
        dtype=weights_dtype(device, trainable=False),  # frozen: half precision is fine
        use_safetensors=True,
    )
    if model.config.num_labels != 1:
        raise ValueError(
            f"{name!r} has {model.config.num_labels} outputs; a reward model has one (a scalar score)"
        )
    tok = _from_pretrained(AutoTokenizer.from_pretrained, name)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    model.config.pad_token_id = tok.pad_token_id
    return model.to(device).eval(), tok


def _load_dataset(name: str, config: str | None = None):
    """``datasets.load_dataset`` for a Hub id (after checking the Hub is reachable), a local
    folder, or a local data file (json, jsonl, parquet, csv)."""
    from datasets import load_dataset

    path = Path(name)
    if path.is_file():
        return load_dataset(path.suffix.lstrip(".").replace("jsonl", "json"), data_files=str(path))
    if path.is_dir():
        return load_dataset(str(path))
    require_hub(name)
    return load_dataset(name, config)


def load_hub_text_dataset(name: str, config: str | None = None, min_chars: int = 20):
    """A wikitext-shaped dataset (``train``/``validation`` with a ``text`` column), empty lines dropped.

    ``name`` may be a Hub id or a local folder / data file (json, jsonl, parquet, csv).
    """
    from datasets import DatasetDict

    ds = _load_dataset(name, config)
    if not isinstance(ds, DatasetDict):
        ds = DatasetDict(train=ds)
    for split in ds.values():
        require_columns(split, ["text"], "a pretraining dataset")
    ds = ds.filter(lambda r: len(r["text"].strip()) >= min_chars)
    if "validation" not in ds:
        parts = ds["train"].train_test_split(test_size=0.05, seed=0)
        ds = DatasetDict(train=parts["train"], validation=parts["test"])
    return ds


def load_hub_sft_dataset(name: str, n: int = 3000, validation: int = 300, seed: int = 0):
    """An instruction dataset from the Hub (or a local file/folder) as ``train``/``validation``
    splits with a ``messages`` column: Alpaca records are converted, chat datasets kept as they are.
    """
    from datasets import DatasetDict

    ds = _load_dataset(name)
    train = ds["train"] if isinstance(ds, DatasetDict) else ds
    if "messages" not in train.column_names:
        require_columns(train, ["instruction", "input", "output"], "an Alpaca-style SFT dataset")
        train = train.map(lambda r: {"messages": alpaca_to_messages(r)}, remove_columns=train.column_names)
    train = train.select_columns(["messages"]).shuffle(seed=seed)
    n_total = min(len(train), n + validation)
    if n_total <= validation:
        raise ValueError(f"the SFT dataset has only {len(train)} rows; need more than {validation}")
    train = train.select(range(n_total))
    return DatasetDict(
        train=train.select(range(validation, n_total)), validation=train.select(range(validation))
    )


def load_hub_preference_dataset(name: str, n: int = 1500, seed: int = 0):
    """A preference dataset from the Hub (or a local file/folder) with conversational
    ``prompt``/``chosen``/``rejected`` columns; an implicit prompt (shared by both answers) is split off."""
    from datasets import DatasetDict

    ds = _load_dataset(name)
    train = ds["train"] if isinstance(ds, DatasetDict) else ds
    require_columns(train, ["chosen", "rejected"], "a preference dataset")
    train = train.shuffle(seed=seed).select(range(min(n, len(train))))
    if "prompt" not in train.column_names:
        train = train.map(split_implicit_prompt)
    return train.select_columns(["prompt", "chosen", "rejected"])
