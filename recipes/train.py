"""One stage of the course trained by a TRL trainer, on one process or many.

    python recipes/train.py dpo                                  # the tiny profile, one process
    COURSE_PROFILE=hub python recipes/train.py dpo               # SmolLM2, one GPU
    accelerate launch --config_file recipes/accelerate/ddp.yaml recipes/train.py dpo --profile hub

Stages and what they start from (``--model`` overrides it; a saved model folder with its tokenizer):

* ``sft``: the base model, on the profile's demonstrations (``SFTTrainer``, loss on the answers);
* ``reward``: a scalar head on the SFT model's backbone, on the preference pairs (``RewardTrainer``);
* ``dpo``: the SFT model, with a frozen copy as the reference, on the pairs (``DPOTrainer``);
* ``orpo``: the base model, on the pairs (``trl.experimental.orpo.ORPOTrainer``);
* ``grpo``: the SFT model, rewarded by the verifier (``GRPOTrainer``, with a KL term: its default
  ``beta`` is 0): TinyWorld's on the tiny profile, GSM8K's final number on ``hub``.

The settings are the profile's (``utils.recipes``: the chapters' values on ``tiny``, published ones on
``hub``, each with its source); the flags below override them. ``--per-device-batch-size`` times
``--gradient-accumulation-steps`` times the number of processes is the batch of one update, so the
same run on two processes takes half the per-device batch. The training log (every step's loss)
goes to ``--log-json``; the model to ``--output-dir``. A run launched by ``accelerate launch`` on a
machine without a GPU trains on the CPU, its processes talking over gloo (``tests/test_launch.py``).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # run from a checkout without installing the course
    sys.path.insert(0, str(ROOT))

STAGES = ("sft", "reward", "dpo", "orpo", "grpo")


def parse(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("stage", choices=STAGES)
    p.add_argument("--profile", default=None, help="tiny or hub (default: COURSE_PROFILE, else tiny)")
    p.add_argument("--model", default=None, help="a saved model folder to start from")
    p.add_argument("--pairs", default=None, help="'annotator:N': N of TinyWorld's annotated pairs")
    p.add_argument("--max-steps", type=int, default=None, help="stop after this many updates")
    p.add_argument("--per-device-batch-size", type=int, default=None)
    p.add_argument("--gradient-accumulation-steps", type=int, default=None)
    p.add_argument("--learning-rate", type=float, default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--output-dir", default=None, help="where the model is saved (default: none)")
    p.add_argument("--log-json", default=None, help="write the trainer's log history here")
    return p.parse_args(argv)


def _model(stage: str, args, profile):
    """The model and tokenizer the stage starts from."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from utils.artifacts import get_base_model, get_sft_model

    if args.model:
        return AutoModelForCausalLM.from_pretrained(args.model), AutoTokenizer.from_pretrained(args.model)
    from_base = stage in ("sft", "orpo")
    return (get_base_model if from_base else get_sft_model)(profile, show_progress=False)


def _pairs(args, profile):
    """Preference pairs as ``prompt``/``chosen``/``rejected`` conversations."""
    from utils.artifacts import get_preference_data

    if args.pairs:
        kind, _, n = args.pairs.partition(":")
        if kind != "annotator" or not n.isdigit():
            raise SystemExit(f"--pairs takes 'annotator:N'; got {args.pairs!r}")
        from utils.data import annotator_preferences

        pairs = annotator_preferences(int(n), seed=args.seed)
    else:
        pairs = get_preference_data(profile, show_progress=False)  # (hub: its n_pairs rows)
    return pairs.select_columns(["prompt", "chosen", "rejected"])


def _grpo_data_and_reward(profile, stop_ids):
    """Prompts and the verifier that rewards their completions (1 right, 0 not). A completion ended its
    turn if it holds one of ``stop_ids`` (TRL stops it there; one cut short has none)."""
    from utils.grpo import verify, verify_number

    def ended(ids) -> bool:
        return not stop_ids.isdisjoint(ids)

    if profile.math_dataset is None:
        from utils.data import eval_conversations

        prompts = eval_conversations(512, split="train", seed=7, dialogues=0.2)

        def reward(prompts, completions, completion_ids, **kwargs):
            return [
                verify(p, c[0]["content"], finished=ended(ids))
                for p, c, ids in zip(prompts, completions, completion_ids)
            ]

        return prompts.select_columns(["prompt"]), reward
    from utils.hub import load_hub_math_dataset

    data = load_hub_math_dataset(*profile.math_dataset, split="train", n=512)

    def reward(prompts, completions, completion_ids, answer, **kwargs):
        return [
            verify_number(c[0]["content"], a, finished=ended(ids))
            for c, a, ids in zip(completions, answer, completion_ids)
        ]

    return data, reward


def build_trainer(args, profile=None):
    """The stage's TRL trainer, configured from the profile's recipe and the flags."""
    import copy

    import torch

    from utils.config import course_seed, fit_trl_logprob_tiles, get_profile, mixed_precision, seed_everything
    from utils.models import model_stop_ids
    from utils.recipes import stage_recipe

    profile = profile or get_profile(args.profile)
    recipe = stage_recipe(args.stage, profile)
    seed_everything(args.seed)
    cpu = not torch.cuda.is_available()
    model, tokenizer = _model(args.stage, args, profile)
    common = dict(
        output_dir=args.output_dir or f"/tmp/course-recipe-{args.stage}",
        learning_rate=args.learning_rate or recipe["learning_rate"],
        per_device_train_batch_size=args.per_device_batch_size or recipe["per_device_batch_size"],
        gradient_accumulation_steps=args.gradient_accumulation_steps or recipe["gradient_accumulation_steps"],
        num_train_epochs=recipe["epochs"],
        max_steps=args.max_steps or -1,
        lr_scheduler_type=recipe["lr_scheduler_type"],
        warmup_steps=recipe["warmup"],
        weight_decay=0.0,
        max_grad_norm=1.0,
        logging_steps=1,
        save_strategy="no",
        report_to=[],
        seed=course_seed(args.seed),
        use_cpu=cpu,
        **mixed_precision(None, profile),
        activation_checkpointing=profile.name != "tiny",  # TRL's default; a tiny model needs no saving
        disable_tqdm=True,
        log_level="warning",
    )
    stage = args.stage
    if stage == "sft":
        from trl import SFTConfig, SFTTrainer

        from utils.artifacts import load_sft_demos

        data = load_sft_demos(profile)["train"].select_columns(["messages"])
        config = SFTConfig(**common, assistant_only_loss=True, max_length=recipe["max_length"])
        trainer = SFTTrainer(model=model, args=config, train_dataset=data, processing_class=tokenizer)
    elif stage == "reward":
        from trl import RewardConfig, RewardTrainer

        from utils.reward import reward_model_from

        config = RewardConfig(**common, max_length=recipe["max_length"])
        trainer = RewardTrainer(
            model=reward_model_from(model, tokenizer),
            args=config,
            train_dataset=_pairs(args, profile),
            processing_class=tokenizer,
        )
    elif stage == "dpo":
        from trl import DPOConfig, DPOTrainer

        config = DPOConfig(**common, beta=recipe["beta"], max_length=recipe["max_length"])
        trainer = DPOTrainer(
            model=model,
            ref_model=copy.deepcopy(model),  # explicit: with None, TRL reloads it by name
            args=config,
            train_dataset=_pairs(args, profile),
            processing_class=tokenizer,
        )
    elif stage == "orpo":
        from trl.experimental.orpo import ORPOConfig, ORPOTrainer

        config = ORPOConfig(**common, beta=recipe["beta"], max_length=recipe["max_length"])
        trainer = ORPOTrainer(
            model=model, args=config, train_dataset=_pairs(args, profile), processing_class=tokenizer
        )
    else:
        from trl import GRPOConfig, GRPOTrainer

        data, reward = _grpo_data_and_reward(profile, model_stop_ids(model) | {tokenizer.eos_token_id})
        config = GRPOConfig(
            **common,
            beta=recipe["beta"],
            num_generations=recipe["num_generations"],
            max_completion_length=recipe["max_completion_length"],
        )
        trainer = GRPOTrainer(
            model=model, reward_funcs=reward, args=config, train_dataset=data, processing_class=tokenizer
        )
    fit_trl_logprob_tiles(trainer.model)
    return trainer


def main(argv=None) -> int:
    args = parse(argv)
    if args.profile:
        os.environ["COURSE_PROFILE"] = args.profile
    trainer = build_trainer(args)
    trainer.train()
    if trainer.is_world_process_zero() and args.log_json:
        Path(args.log_json).write_text(
            json.dumps({"world_size": trainer.args.world_size, "log": trainer.state.log_history}, indent=1)
        )
    if args.output_dir:
        trainer.save_model(args.output_dir)  # gathers sharded weights (FSDP, ZeRO-3) onto process 0
    return 0


if __name__ == "__main__":
    sys.exit(main())
