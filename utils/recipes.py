"""The settings of each TRL-trainer stage, per profile, with where they come from.

``tiny``: the values the chapters use on TinyWorld's million-parameter models (tuned there; a model
that small wants learning rates far above a real one's). ``hub``: published recipes for models of
SmolLM2-135M's size, each cited in its ``source`` (and in ``book/setup.md``). ``recipes/train.py``
trains with them; the chapters' ``hub`` runs read them through :func:`stage_recipe`.
"""

from __future__ import annotations

from .config import Profile, get_profile

DEFAULTS = dict(
    epochs=1,
    gradient_accumulation_steps=1,
    lr_scheduler_type="linear",
    warmup=0,
    max_length=256,
    beta=None,
)

RECIPES: dict[str, dict[str, dict]] = {
    "tiny": {
        "sft": dict(
            learning_rate=1e-3,
            epochs=2,
            per_device_batch_size=32,
            lr_scheduler_type="cosine",
            warmup=10,
            source="Chapter 2 (utils.artifacts.sft_recipe), tuned on TinyWorld",
        ),
        "lora": dict(
            learning_rate=5e-3,
            epochs=2,
            per_device_batch_size=32,
            source="Chapter 2's LoRA (rank 8), tuned on TinyWorld: adapters want a larger rate",
        ),
        "reward": dict(
            learning_rate=3e-4,
            per_device_batch_size=32,
            source="Chapter 3's reward model, tuned on TinyWorld",
        ),
        "dpo": dict(
            learning_rate=1e-4,
            per_device_batch_size=32,
            beta=0.1,
            source="Chapter 4 (beta 0.1 as in Rafailov et al.; the learning rate tuned on TinyWorld)",
        ),
        "orpo": dict(
            learning_rate=1e-3,
            per_device_batch_size=32,
            beta=1.0,
            source="Chapter 5 (lambda 1.0; the learning rate of Chapter 2's SFT)",
        ),
        "grpo": dict(
            learning_rate=3e-5,
            per_device_batch_size=16,
            beta=0.04,
            num_generations=4,
            max_completion_length=40,
            source="Chapter 7 (beta 0.04 as in DeepSeekMath's GRPO; 4 answers per prompt)",
        ),
        "ppo": dict(
            learning_rate=1.5e-5,
            value_learning_rate=1e-4,
            per_device_batch_size=32,
            beta=0.1,
            ppo_epochs=2,
            clip=0.2,
            source="Chapter 3 (utils.ppo.PPOSettings; the learning rate tuned on TinyWorld)",
        ),
        "rloo": dict(
            learning_rate=5e-5,
            per_device_batch_size=16,
            lr_scheduler_type="constant",
            beta=0.1,
            num_generations=4,
            source="Chapter 3's RLOOTrainer run (beta: PPO's kl_coef; the rate tuned on TinyWorld)",
        ),
    },
    # Published recipes for SmolLM2-135M where they exist, else for the nearest size. Their batch is
    # per device x accumulation as published (their runs used 8 GPUs where noted: the update's batch
    # was 8 times larger). max_length is cut to 512 tokens to fit a T4 (book/setup.md).
    "hub": {
        "sft": dict(
            learning_rate=1e-3,
            epochs=2,
            per_device_batch_size=4,
            gradient_accumulation_steps=4,
            lr_scheduler_type="cosine",
            warmup=0.1,
            max_length=512,
            source="huggingface/alignment-handbook@ae3f44f recipes/smollm2/sft/config_smol.yaml "
            "(SmolLM2-135M/360M SFT, 8 GPUs)",
        ),
        "lora": dict(
            learning_rate=2e-4,
            per_device_batch_size=2,
            gradient_accumulation_steps=8,
            max_length=512,
            source="huggingface/trl@f2cd577 trl/scripts/sft.py, its LoRA command (Qwen2-0.5B, rank 32: "
            "2e-4, ten times its full fine-tuning rate)",
        ),
        "reward": dict(
            learning_rate=1e-5,
            per_device_batch_size=8,
            max_length=512,
            source="huggingface/trl@f2cd577 examples/scripts/reward_modeling.py (Qwen2-0.5B-Instruct, "
            "full fine-tuning)",
        ),
        "ppo": dict(
            learning_rate=3e-6,
            value_learning_rate=3e-6,
            per_device_batch_size=16,
            gradient_accumulation_steps=4,
            epochs=None,
            lr_scheduler_type="cosine",
            beta=0.05,
            ppo_epochs=4,
            clip=0.2,
            max_length=512,
            source="huggingface/trl v0.12.2 trl/trainer/ppo_config.py (kl_coef 0.05, 4 PPO epochs, "
            "clip 0.2) and docs/source/ppo_trainer.md's TL;DR benchmark for Pythia-1B (lr 3e-6, 16 x 4 "
            "per device, 8 GPUs); Huang et al. 2024, The N+ implementation details of RLHF with PPO",
        ),
        "dpo": dict(
            learning_rate=1e-6,
            epochs=2,
            per_device_batch_size=2,
            gradient_accumulation_steps=8,
            lr_scheduler_type="cosine",
            warmup=0.1,
            beta=0.5,
            max_length=512,
            source="huggingface/alignment-handbook@ae3f44f recipes/smollm2/dpo/config_smol.yaml "
            "(SmolLM2-135M/360M DPO on UltraFeedback, 8 GPUs)",
        ),
        "orpo": dict(
            learning_rate=8e-6,
            per_device_batch_size=2,
            gradient_accumulation_steps=4,
            warmup=10,
            beta=0.1,
            max_length=512,
            source="huggingface/smol-course@32dde01 v1/2_preference_alignment/notebooks/"
            "orpo_finetuning_example.ipynb (SmolLM2-135M from the base model; lambda is TRL's beta)",
        ),
        "grpo": dict(
            learning_rate=2e-5,
            per_device_batch_size=8,
            gradient_accumulation_steps=2,
            beta=0.04,
            num_generations=8,
            max_completion_length=96,
            max_length=512,
            source="huggingface/course@16af566 chapters/en/chapter12/5.mdx (GRPO on a 135M model with "
            "LoRA: lr 2e-5, 8 x 2, 8 generations, 96 new tokens); beta 0.04 as DeepSeekMath (TRL's "
            "default is 0: no KL)",
        ),
        "rloo": dict(
            learning_rate=1e-6,
            per_device_batch_size=8,
            beta=0.05,
            num_generations=2,
            max_length=512,
            source="huggingface/trl v1.16.0 trl/trainer/rloo_config.py, its defaults (lr 1e-6, beta 0.05, "
            "2 generations per prompt)",
        ),
    },
}


def stage_recipe(stage: str, profile: Profile | None = None) -> dict:
    """The settings of ``stage`` (``sft``, ``reward``, ``dpo``, ``orpo``, ``grpo``) on ``profile``."""
    profile = profile or get_profile()
    table = RECIPES.get(profile.name)
    if table is None or stage not in table:
        known = sorted(table) if table else []
        raise ValueError(f"no {stage!r} recipe for the {profile.name!r} profile (it has {known})")
    return DEFAULTS | table[stage]


def recipes_table(profile_name: str = "hub") -> str:
    """The profile's recipes as the markdown table ``book/setup.md`` shows (a test keeps them equal)."""
    rows = [
        "| stage | learning rate | β (λ for ORPO) | batch per device × accumulation | epochs | source |",
        "|---|---:|---:|---:|---:|---|",
    ]
    for stage, r in RECIPES[profile_name].items():
        r = DEFAULTS | r
        beta = "" if r["beta"] is None else f"{r['beta']:g}"
        batch = f"{r['per_device_batch_size']} × {r['gradient_accumulation_steps']}"
        epochs = "" if r["epochs"] is None else r["epochs"]
        rows.append(f"| {stage} | {r['learning_rate']:g} | {beta} | {batch} | {epochs} | {r['source']} |")
    return "\n".join(rows)
