"""Loaders for the ``hub`` profile: real checkpoints and datasets from the Hugging Face Hub.

Every loader also takes a local folder or file of the same shape, which is how the tests run
them offline. Loading is safe: safetensors only, ``trust_remote_code=False``.

A whole mirror of the profile's names can stand in for the Hub: set ``COURSE_HUB_MIRROR`` to a
folder laid out as ``<owner>/<name>`` (a dataset's config in a subfolder, e.g.
``Salesforce/wikitext/wikitext-2-raw-v1``) and every Hub name is read from there, with no network.
The course's tests run the ``hub`` profile this way against the stand-in that
``tools/hub_standin.py`` builds; a learner can use it for checkpoints saved to a Drive.
"""

from __future__ import annotations

import os
import socket
from pathlib import Path

from .config import get_profile, pick_device, weights_dtype
from .formats import alpaca_to_messages, require_columns, split_implicit_prompt

HUB_HOST = "huggingface.co"
MIRROR_ENV = "COURSE_HUB_MIRROR"


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


def resolve(name: str, config: str | None = None) -> str:
    """Where ``name`` (a Hub id or a local path) is read from: the local path itself, the entry of
    the ``COURSE_HUB_MIRROR`` folder when that is set, else the Hub id (after checking it is
    reachable)."""
    if _is_local(name):
        return name
    mirror = os.environ.get(MIRROR_ENV)
    if mirror:
        path = Path(mirror) / name
        if config and (path / config).is_dir():
            path = path / config
        if not path.exists():
            raise HubUnavailableError(
                f"{name!r} is not in the mirror {mirror!r} ({MIRROR_ENV}): expected a folder {path}"
            )
        return str(path)
    require_hub(name)
    return name


def _from_pretrained(loader, name: str, **kwargs):
    return loader(resolve(name), trust_remote_code=False, **kwargs)


IM_START, IM_END = "<|im_start|>", "<|im_end|>"
_CHATML_PROBE = [{"role": "user", "content": "U1"}, {"role": "assistant", "content": "A1"}]
_CHATML_CHECKS = [
    _CHATML_PROBE,
    [{"role": "user", "content": "U1"}],
    [
        {"role": "system", "content": "S"},
        {"role": "user", "content": "U1"},
        {"role": "assistant", "content": "A1"},
        {"role": "user", "content": "U2"},
        {"role": "assistant", "content": "A2"},
    ],
]


def chatml_template(default_system: str | None = None) -> str:
    """ChatML (``<|im_start|>role\ncontent<|im_end|>\n``) with ``{% generation %}`` markers around
    each assistant answer and its ``<|im_end|>``, and an optional default system prompt."""
    head = ""
    if default_system is not None:
        quoted = default_system.replace("\\", "\\\\").replace("'", "\\'").replace("\n", "\\n")
        head = (
            "{%- if messages and messages[0]['role'] != 'system' -%}"
            "{{ '" + IM_START + "system\\n" + quoted + IM_END + "\\n' }}{%- endif -%}"
        )
    return (
        head + "{%- for message in messages -%}"
        "{%- if message['role'] == 'assistant' -%}"
        "{{ '" + IM_START + "assistant\\n' }}{% generation %}{{ message['content'] + '" + IM_END + "' }}"
        "{% endgeneration %}{{ '\\n' }}"
        "{%- else -%}{{ '"
        + IM_START
        + "' + message['role'] + '\\n' + message['content'] + '"
        + IM_END
        + "\\n' }}{%- endif -%}{%- endfor -%}"
        "{%- if add_generation_prompt -%}{{ '" + IM_START + "assistant\\n' }}{%- endif -%}"
    )


def patch_chatml(tok) -> bool:
    """Give a ChatML tokenizer (SmolLM2's, Qwen's) ``{% generation %}`` markers, keeping what it renders.

    The checkpoint's template is rendered on a probe conversation to read its default system
    prompt; the marked template is kept only if it renders exactly as the original on several
    conversations (with and without the generation prompt). Then ``<|im_end|>``, which ends each
    turn, becomes the tokenizer's eos token, so generation stops where an answer ends. Returns
    whether it patched.
    """
    import re

    original = getattr(tok, "chat_template", None) or ""
    if IM_START not in original or IM_END not in tok.get_vocab():
        return False

    def render(template, conv, gen):
        return tok.apply_chat_template(
            conv, chat_template=template, tokenize=False, add_generation_prompt=gen
        )

    try:
        text = render(original, _CHATML_PROBE, False)
    except Exception:  # noqa: BLE001 - a template that cannot render the probe is not plain ChatML
        return False
    match = re.fullmatch(
        r"(?:<\|im_start\|>system\n(.*?)<\|im_end\|>\n)?"
        r"<\|im_start\|>user\nU1<\|im_end\|>\n<\|im_start\|>assistant\nA1<\|im_end\|>\n",
        text,
        flags=re.S,
    )
    if match is None:
        return False
    candidate = chatml_template(match.group(1))
    for conv in _CHATML_CHECKS:
        for gen in (False, True):
            if render(candidate, conv, gen) != render(original, conv, gen):
                return False
    tok.chat_template = candidate
    tok.eos_token = IM_END
    return True


def load_hub_tokenizer(name: str):
    """A tokenizer from the Hub (or a local folder), ready for assistant-only loss.

    A ChatML template (SmolLM2's) gets ``{% generation %}`` markers (:func:`patch_chatml`); a
    tokenizer with no template, or another one without the markers, gets the course's template
    (its role markers become plain text). A missing pad token becomes the eos token.
    """
    from transformers import AutoTokenizer

    tok = _from_pretrained(AutoTokenizer.from_pretrained, name)
    template = getattr(tok, "chat_template", None) or ""
    if "generation %}" not in template and not patch_chatml(tok):
        from .tokenizer import CHAT_TEMPLATE

        tok.chat_template = CHAT_TEMPLATE
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
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
    tok = load_hub_tokenizer(name)
    # Stop generating at the end of a turn (the tokenizer's eos, ``<|im_end|>`` for ChatML) as well as
    # at the checkpoint's own end tokens (a base model's end of document).
    own = model.generation_config.eos_token_id
    own = [] if own is None else (own if isinstance(own, list) else [own])
    model.generation_config.eos_token_id = [tok.eos_token_id] + [t for t in own if t != tok.eos_token_id]
    model.generation_config.pad_token_id = tok.pad_token_id
    model.config.pad_token_id = tok.pad_token_id
    return model, tok


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

    where = resolve(name, config)
    path = Path(where)
    if path.is_file():
        return load_dataset(path.suffix.lstrip(".").replace("jsonl", "json"), data_files=str(path))
    if path.is_dir():
        return load_dataset(str(path))
    return load_dataset(name, config)


def _short_enough(ds, columns: list[str], what: str, max_chars: int | None = None):
    """The rows of ``ds`` whose prompt and longest answer fit in about ``profile.seq_len`` tokens
    (``max_chars``: 4 characters a token, English's rough average), so that no batch is longer than
    the memory was sized for (book/setup.md). Says how many it kept."""
    max_chars = max_chars or 4 * get_profile().seq_len

    def chars(messages) -> int:
        return sum(len(m["content"]) for m in messages) if isinstance(messages, list) else len(messages)

    def fits(row) -> bool:
        prompt = chars(row["prompt"]) if "prompt" in row else 0
        return prompt + max(chars(row[c]) for c in columns) <= max_chars

    kept = ds.filter(fits)
    if len(kept) < len(ds):
        print(
            f"kept {len(kept):,} of {len(ds):,} {what} that fit in ~{max_chars // 4} tokens "
            f"({max_chars} characters)"
        )
    if len(kept) == 0:
        raise ValueError(f"no {what} fit in {max_chars} characters: raise the profile's seq_len")
    return kept


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

    profile = get_profile()
    n, validation = profile.examples(n), profile.examples(validation)  # (fewer in a smoke test)
    ds = _load_dataset(name)
    train = ds["train"] if isinstance(ds, DatasetDict) else ds
    if "messages" not in train.column_names:
        require_columns(train, ["instruction", "input", "output"], "an Alpaca-style SFT dataset")
        train = train.map(lambda r: {"messages": alpaca_to_messages(r)}, remove_columns=train.column_names)
    train = _short_enough(train.select_columns(["messages"]), ["messages"], "SFT conversations")
    train = train.shuffle(seed=seed)
    n_total = min(len(train), n + validation)
    if n_total <= validation:
        raise ValueError(f"the SFT dataset has only {len(train)} rows; need more than {validation}")
    train = train.select(range(n_total))
    return DatasetDict(
        train=train.select(range(validation, n_total)), validation=train.select(range(validation))
    )


def load_hub_preference_dataset(name: str, n: int | None = None, seed: int = 0, split: str = "train"):
    """A preference dataset from the Hub (or a local file/folder) with conversational
    ``prompt``/``chosen``/``rejected`` columns, ``n`` rows (default: the profile's ``n_pairs``) of those that
    fit the profile's ``seq_len``; an implicit prompt (shared by both answers) is split off.

    ``split="test"`` reads held-out rows: the dataset's test split or, without one, the *last* ``n``
    rows of the training rows' shuffled order, whose first rows are what training reads."""
    from datasets import DatasetDict

    profile = get_profile()
    n = profile.examples(n or profile.n_pairs)  # (fewer in a smoke test)
    ds = _load_dataset(name)
    held_back = False  # the test rows are the training order's last ones
    if isinstance(ds, DatasetDict):
        if split not in ds and split != "test":
            raise ValueError(f"{name} has no {split!r} split (it has {sorted(ds)})")
        held_back = split not in ds
        train = ds[split if split in ds else "train"]
    else:
        train, held_back = ds, split == "test"
    require_columns(train, ["chosen", "rejected"], "a preference dataset")
    if "prompt" not in train.column_names:
        train = train.map(split_implicit_prompt)
    train = _short_enough(
        train.select_columns(["prompt", "chosen", "rejected"]), ["chosen", "rejected"], "pairs"
    )
    train = train.shuffle(seed=seed)
    if held_back:
        return train.select(range(max(0, len(train) - n), len(train)))
    return train.select(range(min(n, len(train))))


def load_hub_math_dataset(
    name: str, config: str | None = "main", split: str = "train", n: int = 256, seed: int = 0
):
    """A GSM8K-shaped dataset (``question``, and an ``answer`` whose last line is ``#### <number>``) as
    ``prompt`` (one user turn: the question and a request to end with the number) and ``answer`` (the
    final number as a string, commas dropped): what an exact-match verifier checks (Chapter 7).

    ``name`` may be a Hub id or a local folder / data file of the same shape; ``n`` rows of ``split``.
    """
    from datasets import DatasetDict

    n = get_profile().examples(n)  # (fewer in a smoke test)
    ds = _load_dataset(name, config)
    if isinstance(ds, DatasetDict):
        if split not in ds:
            raise ValueError(f"{name} has no {split!r} split (it has {sorted(ds)})")
        ds = ds[split]
    require_columns(ds, ["question", "answer"], "a GSM8K-style math dataset")

    def convert(row):
        if "####" not in row["answer"]:
            raise ValueError(f"a GSM8K answer ends with '#### <number>'; got {row['answer'][-60:]!r}")
        final = row["answer"].rsplit("####", 1)[1].strip().replace(",", "")
        question = f"{row['question'].strip()}\nEnd your answer with the final number."
        return {"prompt": [{"role": "user", "content": question}], "answer": final}

    ds = ds.shuffle(seed=seed).select(range(min(n, len(ds))))
    return ds.map(convert, remove_columns=ds.column_names)
