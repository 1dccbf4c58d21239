"""Profiles, seeding and device choice.

A profile holds what differs between the offline course and real models: model and dataset
names, the pretraining corpus and model sizes, and step counts. Each stage's own settings
(epochs, learning rates, how many prompts) are in its recipe in ``utils/artifacts.py``, and a
chapter's experiments set theirs in the notebook, where a learner reads and changes them.

Two profiles share every notebook cell:

* ``tiny`` (the default): models the course builds itself, TinyWorld data, CPU-sized steps.
  Never touches the network.
* ``hub``: small real checkpoints and datasets from the Hugging Face Hub, for a learner with a
  GPU and internet access.

Switch with one line, ``profile = get_profile("hub")``, or for a whole session with the
environment variable ``COURSE_PROFILE=hub``.

``COURSE_SMOKE=1`` cuts either profile to a smoke test: every training run to a handful of steps
and every dataset and evaluation set to a few hundred rows (:data:`SMOKE`), so that a whole
notebook runs in about a minute to prove that its cells work (the tests run the ``hub`` profile
this way against a local stand-in of the Hub). Its numbers mean nothing; claims are said, not
checked, and Project 2's checkpoints check what was returned but do not judge how well it trained.
"""

from __future__ import annotations

import os
import random
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch

REPO_URL = "https://github.com/llm-alignment-course/training-llms-to-follow-instructions"
REPO_ROOT = Path(__file__).resolve().parent.parent
PROFILE_ENV = "COURSE_PROFILE"
SMOKE_ENV = "COURSE_SMOKE"
SEED_ENV = "COURSE_SEED"
SEED_STRIDE = 1_000_003  # a prime far above any stream number the course uses


@dataclass(frozen=True)
class Profile:
    """Everything a notebook needs to know about sizes and sources."""

    name: str
    # models: None means "built by the course from a config"
    base_model: str | None = None
    # data: None means "TinyWorld"
    pretrain_dataset: tuple[str, str | None] | None = None  # (hub name, config)
    sft_dataset: str | None = None  # an Alpaca-style (instruction/input/output) or `messages` dataset
    sft_model: str | None = None  # a ready instruction-tuned checkpoint for the preference chapters
    preference_dataset: str | None = None  # prompt/chosen/rejected (explicit or implicit prompt)
    judge_model: str | None = None  # a public reward model that stands in for the gold judge (Project 2)
    math_dataset: tuple[str, str | None] | None = None  # GSM8K-style (hub name, config), Chapter 7's verifier
    # Chapter 1: pretraining
    vocab_size: int = 1024
    seq_len: int = 128
    pretrain_steps: int = 400
    pretrain_batch_size: int = 16
    pretrain_lr: float = 3e-3
    trainer_steps: int = 60
    n_documents: int = 12_000
    # Chapters 2-6: the batch of SFT, reward-model, DPO and ORPO updates (pairs for the preference
    # losses) and of PPO's minibatches. On the hub profile 8 keeps a 135M model under a T4's 15 GB
    # (book/setup.md, measured by tools/hub_sizing.py).
    batch_size: int = 32
    # How much each stage trains on (the tiny profile's own data: its recipes in utils/artifacts.py).
    n_demos: int = 3000  # SFT demonstrations (Chapters 2 and 5)
    n_pairs: int = 1500  # public preference pairs loaded on the hub profile (Chapters 3-6)
    ppo_iterations: int = 40  # PPO's rollout -> update cycles (Chapter 3, Project 2); RLOO's steps
    # Mixed precision for the TRL/transformers trainers on a GPU (autocast over fp32 weights; fp16 adds
    # loss scaling). Off for the tiny models: fp32 is fast enough there and keeps the checks exact.
    mixed_precision: bool = False
    # A smoke test's cuts (None: none): training runs stop after ``max_steps`` steps (or iterations),
    # datasets and evaluation sets hold at most ``max_examples`` rows. See :data:`SMOKE`.
    max_steps: int | None = None
    max_examples: int | None = None

    def with_overrides(self, **changes) -> "Profile":
        return replace(self, **changes)

    def steps(self, n: int) -> int:
        """``n`` training steps, or fewer in a smoke test."""
        return n if self.max_steps is None else min(n, self.max_steps)

    def examples(self, n: int) -> int:
        """``n`` rows of a dataset or evaluation set, or fewer in a smoke test."""
        return n if self.max_examples is None else min(n, self.max_examples)

    @property
    def smoke(self) -> bool:
        """Whether this profile is cut to a smoke test (``COURSE_SMOKE=1``)."""
        return self.max_steps is not None or self.max_examples is not None

    @property
    def checks_claims(self) -> bool:
        """Whether the text's claims are asserted: on the full ``tiny`` profile, where they were measured."""
        return self.name == "tiny" and not self.smoke


PROFILES: dict[str, Profile] = {
    "tiny": Profile(name="tiny"),
    "hub": Profile(
        name="hub",
        base_model="HuggingFaceTB/SmolLM2-135M",
        pretrain_dataset=("Salesforce/wikitext", "wikitext-2-raw-v1"),
        sft_dataset="tatsu-lab/alpaca",
        sft_model="HuggingFaceTB/SmolLM2-135M-Instruct",
        preference_dataset="trl-lib/ultrafeedback_binarized",
        judge_model="Skywork/Skywork-Reward-V2-Qwen3-0.6B",
        math_dataset=("openai/gsm8k", "main"),
        seq_len=256,
        pretrain_steps=200,
        pretrain_batch_size=8,
        pretrain_lr=5e-5,
        trainer_steps=50,
        batch_size=8,
        n_demos=1500,  # with the two below: each chapter within ~15 min on a T4 (book/setup.md)
        n_pairs=600,
        ppo_iterations=16,
        mixed_precision=True,
    ),
}


# the smoke test's cuts (COURSE_SMOKE=1): a handful of steps, a few hundred rows
SMOKE = dict(max_steps=4, max_examples=128, pretrain_steps=4, trainer_steps=4)


def smoke_test() -> bool:
    """Whether ``COURSE_SMOKE`` asks for a smoke test."""
    return os.environ.get(SMOKE_ENV, "0").strip().lower() not in ("", "0", "false", "no", "off")


def get_profile(name: str | None = None) -> Profile:
    """The profile called ``name``, else ``$COURSE_PROFILE``, else ``tiny``; cut to a smoke test
    when ``COURSE_SMOKE=1``."""
    name = name or os.environ.get(PROFILE_ENV) or "tiny"
    if name not in PROFILES:
        raise ValueError(
            f"unknown profile {name!r}: choose one of {sorted(PROFILES)} "
            f"(set it with get_profile('tiny') or the environment variable {PROFILE_ENV})"
        )
    profile = PROFILES[name]
    return profile.with_overrides(**SMOKE) if smoke_test() else profile


def run_seed() -> int:
    """This run's seed: the environment variable ``COURSE_SEED`` (default 0, the committed run)."""
    value = os.environ.get(SEED_ENV, "0").strip() or "0"
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"{SEED_ENV} must be an integer, got {value!r} (e.g. {SEED_ENV}=1)") from None


def course_seed(stream: int = 0) -> int:
    """The seed of random stream ``stream`` in this run: the one knob every random draw goes through.

    Every seed that initialises a model, orders training data, samples answers or draws noisy
    labels is ``course_seed(n)`` for some stream number ``n``: ``n`` itself when ``COURSE_SEED`` is
    0 (the run whose outputs are committed), ``n + 1_000_003 * COURSE_SEED`` otherwise. Functions in
    ``utils`` take stream numbers (``seed=3``) and apply this where they make the generator, so a
    notebook passes the same small numbers in every run. TinyWorld itself (its facts, corpus,
    demonstrations and train/test prompts) does not depend on it, so runs stay comparable.
    """
    return int(stream) + SEED_STRIDE * run_seed()


def seed_everything(seed: int = 0) -> None:
    """Seed Python, NumPy and torch with ``course_seed(seed)``, and ask torch for deterministic kernels."""
    seed = course_seed(seed)
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    torch.use_deterministic_algorithms(True, warn_only=True)


def pick_device(prefer: str | None = None) -> torch.device:
    """``cuda`` when available, else ``cpu`` (or the device named by ``prefer``)."""
    if prefer:
        return torch.device(prefer)
    if torch.cuda.is_available():
        return torch.device("cuda")
    return torch.device("cpu")


def pick_dtype(
    device: torch.device | str | None = None, *, bf16_supported: bool | None = None
) -> torch.dtype:
    """The training dtype for ``device``: bf16 on recent GPUs, fp16 on older ones (T4), fp32 on CPU.

    ``bf16_supported`` overrides the hardware query (used in tests).
    """
    device = torch.device(device) if device is not None else pick_device()
    if device.type != "cuda":
        return torch.float32
    if bf16_supported is None:
        bf16_supported = torch.cuda.is_bf16_supported()
    return torch.bfloat16 if bf16_supported else torch.float16


def weights_dtype(device: torch.device | str | None = None, *, trainable: bool = True) -> torch.dtype:
    """The dtype to hold a model's weights in: fp32 for any model that will be trained, else
    :func:`pick_dtype`.

    Training in pure fp16 or bf16 loses small updates: an AdamW step of ``lr = 1e-5`` on a weight of
    0.02 is below bf16's resolution (about 0.4% of the value) and is rounded away, and fp16 also
    underflows small gradients. So trained weights stay fp32 ("master weights") and speed comes
    from autocast (:func:`mixed_precision`); frozen models (a judge) may be stored in half precision.
    """
    return torch.float32 if trainable else pick_dtype(device)


def mixed_precision(
    device: torch.device | str | None = None,
    profile: Profile | None = None,
    *,
    bf16_supported: bool | None = None,
) -> dict[str, bool]:
    """``{"bf16": ..., "fp16": ...}`` for a ``transformers``/TRL training config.

    On a GPU with a profile that asks for it (``hub``): bf16 autocast where the GPU has bf16, else fp16
    autocast with loss scaling (``Trainer`` adds the gradient scaler; a T4 takes this path). The
    weights stay fp32 (:func:`weights_dtype`). On a CPU, or for the tiny models: both off (fp32).
    """
    profile = profile or get_profile()
    device = torch.device(device) if device is not None else pick_device()
    if not profile.mixed_precision or device.type != "cuda":
        return {"bf16": False, "fp16": False}
    dtype = pick_dtype(device, bf16_supported=bf16_supported)
    return {"bf16": dtype == torch.bfloat16, "fp16": dtype == torch.float16}


def training_precision(
    device: torch.device | str | None = None,
    profile: Profile | None = None,
    *,
    bf16_supported: bool | None = None,
):
    """``(autocast, scaler)`` for the course's own training loops: the same choice as
    :func:`mixed_precision` makes for TRL's trainers, in plain PyTorch.

    ``autocast()`` opens ``torch.autocast`` in bf16 (a GPU with bf16) or fp16 (a T4) on a GPU with a
    profile that asks for it (``hub``); the weights stay fp32. ``scaler`` is a
    ``torch.amp.GradScaler``, on only for fp16, whose gradients would underflow without it. Off (on a
    CPU, and for the tiny models), ``autocast()`` changes nothing and the scaler passes the loss,
    the gradients and ``step`` through untouched, so a loop written with them computes exactly what
    the plain loop does::

        with autocast():
            loss = ...
        scaler.scale(loss).backward()
        scaler.unscale_(optimizer)
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        scaler.step(optimizer)
        scaler.update()
    """
    device = torch.device(device) if device is not None else pick_device()
    mp = mixed_precision(device, profile, bf16_supported=bf16_supported)
    dtype = torch.bfloat16 if mp["bf16"] else torch.float16 if mp["fp16"] else None
    return _precision(device.type, dtype)


def _precision(device_type: str, dtype: torch.dtype | None):
    """(autocast, scaler) for ``dtype`` (``None``: both off); tests call it to force a precision on a CPU."""

    def autocast():
        return torch.autocast(device_type, dtype=dtype or torch.bfloat16, enabled=dtype is not None)

    autocast.dtype = dtype  # what it computes in (None: fp32), for a reader and the tests
    return autocast, torch.amp.GradScaler(device_type, enabled=dtype == torch.float16)


# TRL's widest log-probability tile (``trl.trainer.utils._CHUNKED_LOGPROB_CHUNK_SIZE`` in trl 1.16)
TRL_LOGPROB_TILE = 32768


def fit_trl_logprob_tiles(model) -> int:
    """Size TRL's fused log-probability tiles to ``model``'s vocabulary; returns the width set.

    TRL's SFT, DPO, RLOO and GRPO trainers compute per-token log-probabilities with a fused LM head
    that, on every forward and backward, allocates a ``[4096, 32768]`` tile buffer, sized for the
    32k-256k vocabularies of real models. The tiny profile's vocabulary has 787 tokens: the buffer is
    40 times wider than what it holds, and in Chapter 3 the allocations alone took a quarter of
    ``RLOOTrainer``'s run (measured: 40 s -> 31 s for its 32 steps). A tile as wide as the vocabulary
    computes the same numbers, since either way the vocabulary fits one tile (checked bit for bit on
    an RLOO run); vocabularies wider than TRL's tile keep TRL's width. The width is a module constant of
    trl 1.16 that its fused head reads on every call, so this is set per trainer, before it trains
    (:func:`utils.progress.trainer_bar` does it). Raises if a TRL upgrade removed the constant.
    """
    import trl.trainer.utils as trl_utils

    if not hasattr(trl_utils, "_CHUNKED_LOGPROB_CHUNK_SIZE"):
        raise RuntimeError(
            "trl.trainer.utils._CHUNKED_LOGPROB_CHUNK_SIZE is gone (TRL changed its fused LM head): "
            "update utils.config.fit_trl_logprob_tiles for this TRL version"
        )
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    vocab = head.weight.shape[0] if head is not None else TRL_LOGPROB_TILE
    width = min(TRL_LOGPROB_TILE, int(vocab))
    trl_utils._CHUNKED_LOGPROB_CHUNK_SIZE = width
    return width


def describe_runtime() -> str:
    """One line for the top of a notebook: profile, device, dtype, versions."""
    import transformers

    profile = get_profile()
    device = pick_device()
    smoke = " (smoke test)" if profile.smoke else ""
    return (
        f"profile={profile.name}{smoke} seed={run_seed()} device={device.type} "
        f"dtype={str(pick_dtype(device)).replace('torch.', '')} "
        f"torch={torch.__version__} transformers={transformers.__version__}"
    )


def four_bit_support() -> tuple[bool, str]:
    """Whether bitsandbytes 4-bit layers work here (CUDA, or its CPU backend), with a message to print.

    Tries one tiny NF4 layer rather than guessing from versions, so the answer is right on
    unusual machines too; never raises.
    """
    import importlib.util

    if importlib.util.find_spec("bitsandbytes") is None:
        return False, "bitsandbytes is not installed (pip install bitsandbytes): QLoRA is skipped"
    try:
        import bitsandbytes as bnb

        device = pick_device()
        layer = bnb.nn.Linear4bit(64, 64, bias=False, compute_dtype=torch.float32, quant_type="nf4").to(
            device
        )
        with torch.no_grad():
            out = layer(torch.randn(2, 64, device=device))
        if not torch.isfinite(out).all():
            return (
                False,
                "bitsandbytes 4-bit layers give non-finite outputs on this machine: QLoRA is skipped",
            )
        return True, f"4-bit NF4 works on {device.type} (bitsandbytes {bnb.__version__})"
    except Exception as e:  # noqa: BLE001 - any failure means "not here", said plainly
        return False, f"4-bit quantisation is not available here ({type(e).__name__}: {e}): QLoRA is skipped"
