"""The hand-off between stages: every artifact one chapter makes and a later one starts from.

One place for each stage's **recipe** (everything that determines it), how to **build** it from
the recipe (with the chapter's own loop, saved in ``utils``), **get** it (from the cache, built when
absent; the ``hub`` profile's checkpoint or dataset instead) and **save** it (what a chapter
trained, stored only if it was trained with the recipe's settings):

=========  ===============================  =========================  ================================
stage      recipe                           get                        saved by
=========  ===============================  =========================  ================================
base       :func:`base_recipe`              :func:`get_base_model`     Chapter 1 (:func:`save_base_model`)
sft        :func:`sft_recipe`               :func:`get_sft_model`      Chapter 2 (:func:`save_sft_model`)
prefs      :func:`preference_recipe`        :func:`get_preference_data`  built here (sampled from SFT)
=========  ===============================  =========================  ================================

``get("sft")`` is the one call a later chapter needs, like nanochat's ``load_model("sft")``.
"""

from __future__ import annotations

import weakref
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from . import cache
from .config import Profile, get_profile
from .data import (
    eval_conversations,
    evaluation_set,
    label_pairs,
    pack_texts,
    pretraining_dataset,
    sft_dataset,
)
from .judge import JUDGE_VERSION
from .models import TINY_MODEL, generate_responses, make_model
from .pretrain import train_lm
from .progress import quiet_transformers
from .recipes import stage_recipe
from .sampling import SAMPLER_VERSION
from .sft import train_sft
from .tokenizer import train_tokenizer
from .world import WORLD_VERSION


class RecipeMismatch(ValueError):
    """A model was trained with settings other than its stage's recipe, so it is not stored under it."""


def _check_settings(stage: str, recipe: dict, trained_with: dict, required: tuple[str, ...]) -> None:
    missing = [k for k in required if k not in trained_with]
    if missing:
        raise TypeError(f"saving the {stage} model needs the settings it was trained with; missing {missing}")
    differ = {k: (v, recipe[k]) for k, v in trained_with.items() if k in recipe and v != recipe[k]}
    unknown = [k for k in trained_with if k not in recipe]
    if unknown:
        raise TypeError(f"{unknown} are not part of the {stage} recipe ({sorted(recipe)})")
    if differ:
        said = ", ".join(f"{k}={mine!r} (recipe: {theirs!r})" for k, (mine, theirs) in differ.items())
        raise RecipeMismatch(said)


def _save_stage(stage: str, recipe: dict, model, tokenizer, trained_with: dict, required: tuple[str, ...]):
    """Store ``(model, tokenizer)`` under ``recipe`` if it was trained with the recipe's settings.

    Otherwise store nothing and say so: later chapters would load this model believing it is the
    recipe's. Returns the artifact's folder, or ``None`` when it was not stored.
    """
    try:
        _check_settings(stage, recipe, trained_with, required)
    except RecipeMismatch as e:
        print(
            f"Not saved: this {stage} model was trained with {e}. Later chapters load the recipe's "
            f"{stage} model (rebuilt from the recipe when it is not cached); yours stays in this notebook. "
            f"To make yours the course's, change the recipe in utils/artifacts.py."
        )
        return None
    return cache.save_artifact(stage, recipe, lambda tmp: save_pair((model, tokenizer), tmp))


def save_pair(obj, path: Path) -> None:
    """Save a (model, tokenizer) pair as safetensors + tokenizer files."""
    model, tokenizer = obj
    with quiet_transformers():
        model.save_pretrained(path, safe_serialization=True)
    tokenizer.save_pretrained(path)


def load_pair(path: Path):
    """Load a (model, tokenizer) saved by :func:`save_pair`: safetensors only, no remote code."""
    with quiet_transformers():
        model = AutoModelForCausalLM.from_pretrained(path, use_safetensors=True, trust_remote_code=False)
    tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=False)
    model.eval()
    return model, tokenizer


# --- what the getters handed out: the checkpoints' guard against a model trained in place ----
# A notebook loads the base or SFT model once, in its setup cell, and builds on it: a run that
# trains it in place (given it as the policy instead of a copy, or policy and reference swapped)
# corrupts every later cell silently. Each model a getter returns is remembered with a fingerprint
# of its weights, so that a checkpoint can tell a learner their model is no longer the one loaded.
_LOADED: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
_ROLES = {"base": "the base model (`get_base_model`)", "sft": "the SFT model (`get_sft_model`)"}


def weights_fingerprint(model) -> torch.Tensor:
    """Each parameter tensor's float64 sum and sum of squares, on the CPU: cheap (one pass over the
    weights), unchanged by moving the model between devices (up to rounding), and moved by any
    training step."""
    with torch.no_grad():
        rows = [torch.stack([p.double().sum(), p.double().square().sum()]) for p in model.parameters()]
    return torch.stack(rows).cpu() if rows else torch.zeros(0, 2, dtype=torch.float64)


def _remember(stage: str, pair):
    _LOADED[pair[0]] = (stage, weights_fingerprint(pair[0]))
    return pair


def loaded_as(model) -> str | None:
    """How a getter described ``model`` when it returned it (``"the SFT model (`get_sft_model`)"``),
    or ``None`` for a model no getter returned (a copy, a model built in the notebook)."""
    try:
        entry = _LOADED.get(model)
    except TypeError:  # not weak-referenceable: not a model
        return None
    return _ROLES[entry[0]] if entry else None


def changed_since_loaded(model) -> bool:
    """Whether the weights of a model a getter returned differ from what it returned (a training run
    updated it in place; a cast to another dtype counts). ``False`` for a model no getter returned."""
    try:
        entry = _LOADED.get(model)
    except TypeError:
        return False
    if entry is None:
        return False
    now, then = weights_fingerprint(model), entry[1]
    if now.shape != then.shape:
        return True
    return bool(((now - then).abs() > 1e-9 * (then[:, 1:].abs() + 1.0)).any())


# --- stage 1: the base model (Chapter 1) ---------------------------------------------------
def load_pretraining_corpus(profile: Profile | None = None):
    """The profile's pretraining text: TinyWorld's corpus, or a wikitext-shaped Hub dataset."""
    profile = profile or get_profile()
    if profile.pretrain_dataset is None:
        return pretraining_dataset(profile.n_documents, seed=0)
    from .hub import load_hub_text_dataset

    return load_hub_text_dataset(*profile.pretrain_dataset)


def base_recipe(profile: Profile | None = None) -> dict:
    """Everything that determines the base model: change any of it and it is rebuilt."""
    p = profile or get_profile()
    return {
        "world_version": WORLD_VERSION,
        "world_seed": 0,
        "n_documents": p.n_documents,
        "vocab_size": p.vocab_size,
        "model": TINY_MODEL,
        "seq_len": p.seq_len,
        "steps": p.pretrain_steps,
        "batch_size": p.pretrain_batch_size,
        "lr": p.pretrain_lr,
        "warmup": 20,
        "seed": 0,
    }


def build_base_model(recipe: dict, show_progress: bool = True):
    """Train the tokenizer and the base model from scratch with ``recipe`` (deterministic)."""
    corpus = pretraining_dataset(recipe["n_documents"], recipe["world_seed"])
    tokenizer = train_tokenizer(corpus["train"]["text"], vocab_size=recipe["vocab_size"])
    model = make_model(tokenizer, seed=recipe["seed"], **recipe["model"])
    blocks = pack_texts(tokenizer, corpus["train"]["text"], recipe["seq_len"])
    train_lm(
        model,
        blocks,
        steps=recipe["steps"],
        batch_size=recipe["batch_size"],
        lr=recipe["lr"],
        warmup=recipe["warmup"],
        seed=recipe["seed"],
        show_progress=show_progress,
        desc="building the base model",
    )
    return model, tokenizer


def save_base_model(model, tokenizer, profile: Profile | None = None, *, trained_with: dict) -> Path | None:
    """Store a base model as the course's (Chapter 1 calls this), if ``trained_with`` (the settings
    that trained it: ``steps``, ``batch_size``, ``lr``, ``warmup``, ``seed``) are :func:`base_recipe`'s."""
    return _save_stage(
        "base",
        base_recipe(profile),
        model,
        tokenizer,
        trained_with,
        ("steps", "batch_size", "lr", "warmup", "seed"),
    )


def get_base_model(profile: Profile | None = None, rebuild: bool = False, show_progress: bool = True):
    """The base model and tokenizer: the hub checkpoint, or TinyWorld's from the cache (built if absent)."""
    profile = profile or get_profile()
    if profile.base_model is not None:
        from .hub import load_hub_model

        return _remember("base", load_hub_model(profile.base_model))
    recipe = base_recipe(profile)
    return _remember(
        "base",
        cache.load_or_build(
            "base",
            recipe,
            lambda: build_base_model(recipe, show_progress),
            save_pair,
            load_pair,
            rebuild=rebuild,
        ),
    )


# --- stage 2: the SFT model (Chapter 2) ----------------------------------------------------
def load_sft_demos(profile: Profile | None = None, recipe: dict | None = None):
    """The profile's demonstrations as ``train``/``validation`` with ``messages``: TinyWorld's
    annotators (with ``style`` and ``gold`` columns) or a Hub instruction dataset."""
    profile = profile or get_profile()
    recipe = recipe or sft_recipe(profile)
    if profile.sft_dataset is None:
        return sft_dataset(
            recipe["n_demos"], "messages", seed=recipe["data_seed"], dialogues=recipe["dialogues"]
        )
    from .hub import load_hub_sft_dataset

    return load_hub_sft_dataset(profile.sft_dataset, n=recipe["n_demos"], seed=recipe["data_seed"])


def sft_recipe(profile: Profile | None = None) -> dict:
    profile = profile or get_profile()
    recipe = {
        "base": base_recipe(profile),
        "n_demos": profile.n_demos,
        "dialogues": 0.15,
        "data_seed": 0,
        "epochs": 2,
        "batch_size": profile.batch_size,
        "lr": stage_recipe("sft", profile)["learning_rate"],  # 1e-3 on tiny (a cache key)
        "warmup": 10,
        "seed": 0,
    }
    if profile.sft_dataset is not None:  # (absent for TinyWorld, which keeps its cache keys)
        recipe["sft_dataset"] = profile.sft_dataset
    return recipe


def build_sft_model(recipe: dict, profile: Profile | None = None, show_progress: bool = True):
    model, tokenizer = get_base_model(profile, show_progress=show_progress)
    data = load_sft_demos(profile, recipe)
    train_sft(
        model,
        tokenizer,
        data["train"],
        epochs=recipe["epochs"],
        batch_size=recipe["batch_size"],
        lr=recipe["lr"],
        warmup=recipe["warmup"],
        seed=recipe["seed"],
        show_progress=show_progress,
    )
    return model, tokenizer


def get_sft_model(profile: Profile | None = None, rebuild: bool = False, show_progress: bool = True):
    """The SFT model and tokenizer: the profile's instruction-tuned checkpoint, or from the cache
    (built from the base model with :func:`sft_recipe` if absent)."""
    profile = profile or get_profile()
    if profile.sft_model is not None:
        from .hub import load_hub_model

        return _remember("sft", load_hub_model(profile.sft_model))
    recipe = sft_recipe(profile)
    return _remember(
        "sft",
        cache.load_or_build(
            "sft",
            recipe,
            lambda: build_sft_model(recipe, profile, show_progress),
            save_pair,
            load_pair,
            rebuild=rebuild,
        ),
    )


def save_sft_model(model, tokenizer, profile: Profile | None = None, *, trained_with: dict) -> Path | None:
    """Store an SFT model as the course's (Chapter 2 calls this), if ``trained_with`` (``epochs``,
    ``batch_size``, ``lr``, ``warmup``, ``seed``) are :func:`sft_recipe`'s."""
    return _save_stage(
        "sft",
        sft_recipe(profile),
        model,
        tokenizer,
        trained_with,
        ("epochs", "batch_size", "lr", "warmup", "seed"),
    )


# --- stage 3: the preference pairs (Chapters 3-6) ------------------------------------------
def preference_recipe(profile: Profile | None = None) -> dict:
    """On-policy pairs: two samples from the SFT model per training prompt, labelled by the noisy
    annotators."""
    return {
        "sft": sft_recipe(profile),
        "judge_version": JUDGE_VERSION,
        "n_prompts": 1500,
        "dialogues": 0.2,
        "prompt_seed": 1,
        "sample_seeds": [1, 2],
        "temperature": 1.0,
        "max_new_tokens": 40,
        "sampler": SAMPLER_VERSION,
        "label_seed": 0,
        "drop_ties": True,
    }


def build_preference_data(recipe: dict, profile: Profile | None = None, show_progress: bool = True):
    sft, tok = get_sft_model(profile, show_progress=show_progress)
    prompts = eval_conversations(
        recipe["n_prompts"], split="train", seed=recipe["prompt_seed"], dialogues=recipe["dialogues"]
    )["prompt"]
    a, b = (
        generate_responses(
            sft,
            tok,
            prompts,
            do_sample=True,
            seed=s,
            temperature=recipe["temperature"],
            max_new_tokens=recipe["max_new_tokens"],
        )
        for s in recipe["sample_seeds"]
    )
    return label_pairs(
        prompts,
        [g.text for g in a],
        [g.text for g in b],
        seed=recipe["label_seed"],
        finished_a=[g.finished for g in a],
        finished_b=[g.finished for g in b],
        drop_ties=recipe["drop_ties"],
    )


def get_preference_data(profile: Profile | None = None, rebuild: bool = False, show_progress: bool = True):
    """The course's preference pairs (``prompt/chosen/rejected`` + gold scores): from the cache,
    or sampled from the SFT model and labelled by the gold annotators (deterministic); on the
    ``hub`` profile, the profile's public preference dataset."""
    from datasets import load_from_disk

    profile = profile or get_profile()
    if profile.preference_dataset is not None:
        from .hub import load_hub_preference_dataset

        return load_hub_preference_dataset(profile.preference_dataset)
    recipe = preference_recipe(profile)
    return cache.load_or_build(
        "prefs",
        recipe,
        lambda: build_preference_data(recipe, profile, show_progress),
        _save_dataset,
        lambda path: load_from_disk(str(path / "data")),
        rebuild=rebuild,
    )


def _save_dataset(ds, path) -> None:
    import datasets

    datasets.disable_progress_bars()  # a one-shard "saving" bar is noise in a notebook
    try:
        ds.save_to_disk(str(path / "data"))
    finally:
        datasets.enable_progress_bars()


# --- what the chapters evaluate on -----------------------------------------------------------
HUB_EVAL_PROMPTS = 200  # held-out prompts per evaluation on the hub profile (a T4's time)
_judges: dict = {}


def evaluation_judge(profile: Profile | None = None):
    """``None`` for TinyWorld's gold judge, or ``(reward model, tokenizer)``: the profile's public
    reward model, loaded once per session (the ``hub`` profile)."""
    profile = profile or get_profile()
    if profile.judge_model is None:
        return None
    if profile.judge_model not in _judges:
        from .hub import load_hub_judge

        _judges[profile.judge_model] = load_hub_judge(profile.judge_model)
    return _judges[profile.judge_model]


def evaluation_prompts(
    source: str, n: int | None = None, *, show: bool = True, profile: Profile | None = None
):
    """``(prompts, kinds, judge)``: what a chapter evaluates its models on, and what scores them.

    ``tiny``: the course's evaluation set (:func:`utils.data.evaluation_set`, ``n`` of its prompts
    with the same mix, or all 800), their kinds, and ``None`` - TinyWorld's gold judge. ``hub``: ``n``
    (default :data:`HUB_EVAL_PROMPTS`) held-out prompts of the public dataset the chapter trained on
    - ``source="sft"``: the demonstrations' validation split, without their answers;
    ``"preference"``: the preference dataset's test split - no kinds (``None``), and the profile's
    public reward model as the judge (:func:`evaluation_judge`), whose score stands where gold does.
    """
    profile = profile or get_profile()
    if profile.judge_model is None or (source == "sft" and profile.sft_dataset is None):
        questions = evaluation_set(n, show=show)
        return questions["prompt"], questions["kind"], None
    n = profile.examples(n or HUB_EVAL_PROMPTS)
    if source == "sft":
        conversations = load_sft_demos(profile)["validation"]["messages"]
        prompts = [c[:-1] for c in conversations if c[-1]["role"] == "assistant"][:n]
        where = f"the validation split of {profile.sft_dataset}"
    elif source == "preference":
        from .hub import load_hub_preference_dataset

        prompts = list(load_hub_preference_dataset(profile.preference_dataset, n=n, split="test")["prompt"])
        where = f"the held-out rows (test split) of {profile.preference_dataset}"
    else:
        raise ValueError(f"source is 'sft' or 'preference', not {source!r}")
    if show:
        print(f"{len(prompts)} held-out prompts of {where},\n  scored by {profile.judge_model}")
    return prompts, None, evaluation_judge(profile)


def get(stage: str, profile: Profile | None = None, **kwargs):
    """The artifact of ``stage`` (``"base"``, ``"sft"`` or ``"prefs"``), from the cache or built."""
    getters = {"base": get_base_model, "sft": get_sft_model, "prefs": get_preference_data}
    if stage not in getters:
        raise ValueError(f"unknown stage {stage!r}; choose one of {sorted(getters)}")
    return getters[stage](profile, **kwargs)
