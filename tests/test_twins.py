"""One source for each training loop: the loop a chapter teaches is the loop ``utils`` runs.

Each chapter writes its loop in the notebook (Chapter 1 ``pretrain``, Chapter 2
``train_sft_from_scratch``, Chapter 3 ``train_ppo_from_scratch``, Chapter 4
``train_dpo_from_scratch``); ``utils`` keeps the twin that rebuilds a missing artifact or that later
chapters call (``train_lm``, ``train_sft``, ``train_ppo``, ``train_dpo``). Here the notebook's
function is taken from the solution notebook's source, both twins train copies of the same model
for a few steps on the same data, and they must end with bit-identical weights. So a change to one
loop alone (another schedule, another shuffle, a missing step) fails here.

The exercise functions inside the loops (the losses, GAE, ...) are bound to ``utils``' reference
versions in both twins: their agreement with the learner's code is what the checkers test.
"""

import ast
import copy
import functools
import json
import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from utils import data, judge
from utils.config import course_seed, get_profile, seed_everything
from utils.progress import progress

SOLUTIONS = Path(__file__).resolve().parent.parent / "solutions"


def notebook_functions(notebook: str, names, namespace: dict, replace: tuple[str, str] | None = None) -> dict:
    """Define the top-level functions ``names`` of a solution notebook in ``namespace`` (their globals).

    ``replace = (old, new)`` edits the extracted source first: how the tests below plant a drift.
    """
    cells = json.loads((SOLUTIONS / notebook).read_text())["cells"]
    sources = {}
    for cell in cells:
        if cell["cell_type"] != "code":
            continue
        src = "".join(cell["source"])
        tree = ast.parse(src)
        for node in tree.body:
            if isinstance(node, ast.FunctionDef) and node.name in names:
                first = min([node.lineno] + [d.lineno for d in node.decorator_list])  # with its decorators
                sources[node.name] = "\n".join(src.splitlines()[first - 1 : node.end_lineno])
    missing = set(names) - set(sources)
    assert not missing, f"{notebook} no longer defines {sorted(missing)}: update this test with the notebook"
    code = "\n\n".join(sources[n] for n in names)
    if replace is not None:
        assert replace[0] in code, f"cannot plant the drift: {replace[0]!r} is not in the loop any more"
        code = code.replace(*replace)
    exec(compile(code, f"<{notebook}>", "exec"), namespace)
    return namespace


def same_weights(a, b) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def changed(before, after) -> bool:
    return not same_weights(before, after)


# --- Chapter 1: pretraining -------------------------------------------------------------------
def _pretrain_twins(tiny_model, tiny_tokenizer, replace=None):
    from utils.data import pack_texts
    from utils.pretrain import next_token_loss, train_lm
    from utils.world import pretraining_documents

    blocks = pack_texts(tiny_tokenizer, [d["text"] for d in pretraining_documents(60)], 32)
    ns = notebook_functions(
        "01_pretraining.ipynb",
        ["lr_at", "validation_loss", "pretrain"],
        {
            "torch": torch,
            "math": math,
            "progress": progress,
            "seed_everything": seed_everything,
            "lm_batches": data.lm_batches,
            "next_token_loss": next_token_loss,
            "device": torch.device("cpu"),
            "val_blocks": blocks[:4],
        },
        replace,
    )
    ours, theirs = copy.deepcopy(tiny_model), copy.deepcopy(tiny_model)
    ns["pretrain"](ours, blocks, steps=8, batch_size=4, lr=3e-3, warmup=3, seed=0, val_every=4)
    train_lm(theirs, blocks, steps=8, batch_size=4, lr=3e-3, warmup=3, seed=0, show_progress=False)
    assert changed(tiny_model, ours)
    return ours, theirs


def test_chapter1_pretrain_is_utils_train_lm(tiny_model, tiny_tokenizer):
    assert same_weights(*_pretrain_twins(tiny_model, tiny_tokenizer))


# --- Chapter 2: SFT ---------------------------------------------------------------------------
def _sft_twins(tiny_model, tiny_tokenizer, replace=None):
    from datasets import Dataset

    from utils.padding import token_mean
    from utils.pretrain import next_token_loss
    from utils.sft import build_labels, collate, train_sft

    messages = data.sft_dataset(40, "messages", seed=0, validation=8)
    ns = {
        "torch": torch,
        "math": math,
        "functools": functools,
        "progress": progress,
        "seed_everything": seed_everything,
        "course_seed": course_seed,
        "collate": collate,
        "build_labels": build_labels,
        "sft_loss": next_token_loss,
        "token_mean": token_mean,
        "tokenizer": tiny_tokenizer,
        "device": torch.device("cpu"),
    }
    notebook_functions("02_sft.ipynb", ["encode"], ns)
    ns["val_batch"] = collate(
        [ns["encode"](m) for m in messages["validation"]["messages"]], tiny_tokenizer.pad_token_id
    )
    notebook_functions("02_sft.ipynb", ["batch_loss", "val_loss", "train_sft_from_scratch"], ns, replace)
    examples = [ns["encode"](m) for m in messages["train"]["messages"]]
    ours, theirs = copy.deepcopy(tiny_model), copy.deepcopy(tiny_model)
    ns["train_sft_from_scratch"](
        ours, examples, epochs=2, lr=3e-3, batch_size=8, warmup=2, seed=0, eval_every=2
    )
    train_sft(
        theirs,
        tiny_tokenizer,
        Dataset.from_dict({"messages": messages["train"]["messages"]}),
        epochs=2,
        batch_size=8,
        lr=3e-3,
        warmup=2,
        seed=0,
        show_progress=False,
    )
    assert changed(tiny_model, ours)
    return ours, theirs


def test_chapter2_loop_is_utils_train_sft(tiny_model, tiny_tokenizer):
    assert same_weights(*_sft_twins(tiny_model, tiny_tokenizer))


# --- Chapter 4: DPO ---------------------------------------------------------------------------
def _dpo_loop(tiny_tokenizer, replace=None, dpo_loss=None):
    """Chapter 4's ``train_dpo_from_scratch``, its exercise functions bound to ``utils``' versions."""
    from utils.dpo import dpo_loss as reference_loss
    from utils.dpo import pair_batch
    from utils.logprobs import sequence_logprobs
    from utils.padding import by_length

    ns = notebook_functions(
        "04_dpo.ipynb",
        ["logps_of", "train_dpo_from_scratch"],
        {
            "torch": torch,
            "pd": pd,
            "progress": progress,
            "seed_everything": seed_everything,
            "course_seed": course_seed,
            "pair_batch": pair_batch,
            "by_length": by_length,
            "sequence_logprobs": sequence_logprobs,
            "dpo_loss": reference_loss if dpo_loss is None else dpo_loss,
            "tokenizer": tiny_tokenizer,
            "device": torch.device("cpu"),
            "profile": get_profile(),  # the loop's default batch is the profile's
        },
        replace,
    )
    return ns["train_dpo_from_scratch"]


def _dpo_twins(tiny_model, tiny_tokenizer, replace=None):
    from utils.dpo import train_dpo

    pairs = data.annotator_preferences(40, seed=0)
    train_dpo_from_scratch = _dpo_loop(tiny_tokenizer, replace)
    reference = copy.deepcopy(tiny_model)
    ours, theirs = copy.deepcopy(tiny_model), copy.deepcopy(tiny_model)
    log_ours = train_dpo_from_scratch(ours, reference, pairs, 0.1, lr=3e-3, epochs=2, batch_size=8, seed=0)
    log_theirs = train_dpo(
        theirs,
        reference,
        tiny_tokenizer,
        pairs,
        0.1,
        lr=3e-3,
        epochs=2,
        batch_size=8,
        seed=0,
        show_progress=False,
    )
    assert changed(tiny_model, ours) and same_weights(reference, tiny_model)
    return ours, theirs, log_ours, log_theirs


def test_chapter4_loop_with_another_loss_is_utils_train_dpo(tiny_model, tiny_tokenizer):
    """Chapter 4's noise-robust variants go through both loops as ``loss_fn``."""
    from utils.dpo import ipo_loss, train_dpo

    def never(*args):
        raise AssertionError("dpo_loss must not be called: the loss is ipo_loss")

    pairs = data.annotator_preferences(24, seed=0)
    train_dpo_from_scratch = _dpo_loop(tiny_tokenizer, dpo_loss=never)
    ours, theirs = copy.deepcopy(tiny_model), copy.deepcopy(tiny_model)
    kw = dict(lr=3e-3, epochs=1, batch_size=8, seed=0)
    train_dpo_from_scratch(ours, tiny_model, pairs, 0.1, loss_fn=ipo_loss, **kw)
    train_dpo(theirs, tiny_model, tiny_tokenizer, pairs, 0.1, loss_fn=ipo_loss, show_progress=False, **kw)
    assert changed(tiny_model, ours) and same_weights(ours, theirs)


def test_chapter4_loop_is_utils_train_dpo(tiny_model, tiny_tokenizer):
    ours, theirs, log_ours, log_theirs = _dpo_twins(tiny_model, tiny_tokenizer)
    assert same_weights(ours, theirs)
    pd.testing.assert_frame_equal(log_ours, log_theirs)


# --- Chapter 3: PPO ---------------------------------------------------------------------------
def _ppo_twins(tiny_model, tiny_tokenizer, replace=None):
    from utils import ppo, rollout
    from utils.reward import reward_model_from

    tok = copy.deepcopy(tiny_tokenizer)  # sampling switches its padding side
    prompts = data.eval_conversations(5, split="train", seed=0, dialogues=0.4)["prompt"]  # < 1 batch: cycles
    reward_model = reward_model_from(tiny_model, tok).eval()
    mean, std = 0.1, 0.5
    ns = notebook_functions(
        "03_rlhf.ipynb",
        ["train_ppo_from_scratch"],
        {
            "torch": torch,
            "np": np,
            "pd": pd,
            "judge": judge,
            "progress": progress,
            "seed_everything": seed_everything,
            "course_seed": course_seed,
            "tokenizer": tok,
            "sft_model": tiny_model,
            "reward_model": reward_model,
            "reward_mean": mean,
            "reward_std": std,
            "gold_known": True,
            "sft_probe": {},
            "PPOSettings": ppo.PPOSettings,
            "sample_rollout": rollout.sample_rollout,
            "token_logprobs": rollout.token_logprobs,
            "token_values": rollout.token_values,
            "rollout_scores": rollout.rollout_scores,
            "whiten": ppo.whiten,
            "masked_mean": ppo.masked_mean,
            "per_token_rewards": ppo.per_token_rewards,
            "gae": ppo.gae,
            "ppo_policy_loss": ppo.ppo_policy_loss,
            "ppo_value_loss": ppo.ppo_value_loss,
        },
        replace,
    )
    settings = ppo.PPOSettings(
        iterations=3,
        batch_size=4,
        minibatch_size=2,
        ppo_epochs=2,
        lr=1e-3,
        value_lr=1e-3,
        max_new_tokens=6,
        seed=0,
    )
    ours, theirs = copy.deepcopy(tiny_model), copy.deepcopy(tiny_model)
    value_ours, value_theirs = ppo.value_model_from(reward_model), ppo.value_model_from(reward_model)
    ns["train_ppo_from_scratch"](ours, value_ours, prompts, settings)
    ppo.train_ppo(
        theirs,
        tiny_model,
        value_theirs,
        reward_model,
        tok,
        prompts,
        settings,
        reward_norm=(mean, std),
        show_progress=False,
    )
    assert changed(tiny_model, ours)
    return ours, theirs, value_ours, value_theirs


def test_chapter3_loop_is_utils_train_ppo(tiny_model, tiny_tokenizer):
    ours, theirs, value_ours, value_theirs = _ppo_twins(tiny_model, tiny_tokenizer)
    assert same_weights(ours, theirs)
    assert same_weights(value_ours, value_theirs)


# --- the tests can fail: one loop changed alone ------------------------------------------------
@pytest.mark.parametrize(
    "twins, drift",
    [
        ("pretrain", ('group["lr"] = lr_at(step, lr, warmup, steps)', 'group["lr"] = lr')),  # no schedule
        ("sft", ("torch.randperm(len(examples), generator=g)", "torch.arange(len(examples))")),  # no shuffle
        ("dpo", ("lambda s: 1 - s / n_steps", "lambda s: 1.0")),  # Chapter 4's schedule, before utils had it
        (
            "ppo",
            ("order[(it * s.batch_size + j) % len(order)]", "order[j % len(order)]"),
        ),  # one batch, every time
    ],
)
def test_a_loop_changed_alone_fails_its_twin_test(twins, drift, tiny_model, tiny_tokenizer):
    run = {"pretrain": _pretrain_twins, "sft": _sft_twins, "dpo": _dpo_twins, "ppo": _ppo_twins}[twins]
    ours, theirs, *_ = run(tiny_model, tiny_tokenizer, replace=drift)
    assert not same_weights(ours, theirs)


def test_train_dpo_callback_observes_without_changing_the_run(tiny_model, tiny_tokenizer):
    """Chapter 4 tracks held-out log-probabilities with a callback: the run must stay the same."""
    import copy

    from utils.data import annotator_preferences
    from utils.dpo import train_dpo

    pairs = annotator_preferences(48)
    a, b = copy.deepcopy(tiny_model), copy.deepcopy(tiny_model)
    seen = []
    log_a = train_dpo(a, tiny_model, tiny_tokenizer, pairs, batch_size=16, show_progress=False)
    log_b = train_dpo(
        b,
        tiny_model,
        tiny_tokenizer,
        pairs,
        batch_size=16,
        show_progress=False,
        callback=lambda step, m: seen.append((step, m.training, torch.is_grad_enabled())),
    )
    assert log_a.equals(log_b)
    assert all(torch.equal(x, y) for x, y in zip(a.parameters(), b.parameters()))
    assert seen == [(s, False, False) for s in range(4)]  # before the first step, then after each


# --- Chapter 7: GRPO ---------------------------------------------------------------------------
def _grpo_twins(tiny_model, tiny_tokenizer, replace=None, reward="model"):
    from utils import grpo, ppo, rollout
    from utils.reward import reward_model_from

    tok = copy.deepcopy(tiny_tokenizer)  # sampling switches its padding side
    prompts = data.eval_conversations(5, split="train", seed=0, dialogues=0.4)["prompt"]  # < 1 batch: cycles
    if reward == "model":
        reward_model = reward_model_from(tiny_model, tok).eval()
    else:  # a function of the rollout, as the verifier (which an untrained model never satisfies)
        reward_model = lambda roll: [float(len(t) % 3) for t in roll.texts]  # noqa: E731
    ns = notebook_functions(
        "07_beyond.ipynb",
        ["train_grpo_from_scratch"],
        {
            "torch": torch,
            "progress": progress,
            "seed_everything": seed_everything,
            "course_seed": course_seed,
            "sample_rollout": rollout.sample_rollout,
            "token_logprobs": rollout.token_logprobs,
            "rollout_scores": rollout.rollout_scores,
            "gold_scores": rollout.gold_scores,
            "masked_mean": ppo.masked_mean,
            "group_advantages": grpo.group_advantages,
            "grpo_loss": grpo.grpo_loss,
        },
        replace,
    )
    settings = grpo.GRPOSettings(
        iterations=3,
        prompts_per_iteration=2,
        group_size=3,
        ppo_epochs=2,
        minibatch_size=4,
        lr=1e-3,
        beta=0.1,
        max_new_tokens=6,
        seed=0,
    )
    ours, theirs = copy.deepcopy(tiny_model), copy.deepcopy(tiny_model)
    args = (reward_model, tok, prompts, settings)
    kwargs = dict(reward_norm=(0.1, 0.5), show_progress=False)
    log_ours = ns["train_grpo_from_scratch"](ours, tiny_model, *args, **kwargs)
    log_theirs = grpo.train_grpo(theirs, tiny_model, *args, **kwargs)
    assert changed(tiny_model, ours)
    return ours, theirs, log_ours, log_theirs


@pytest.mark.parametrize("reward", ["model", "function"])
def test_chapter7_loop_is_utils_train_grpo(tiny_model, tiny_tokenizer, reward):
    ours, theirs, log_ours, log_theirs = _grpo_twins(tiny_model, tiny_tokenizer, reward=reward)
    assert same_weights(ours, theirs)
    assert log_ours == log_theirs


def test_chapter7_loop_changed_alone_fails_its_twin_test(tiny_model, tiny_tokenizer):
    drift = ("batch = [p for p in prompts for _ in range(s.group_size)]", "batch = prompts * s.group_size")
    ours, theirs, *_ = _grpo_twins(tiny_model, tiny_tokenizer, replace=drift)  # groups no longer consecutive
    assert not same_weights(ours, theirs)
