"""Device discipline without a GPU: every `utils` path a notebook runs on a model, with the model on
a strict second device (tests/fake_accelerator.py), must neither mix devices nor call ``.numpy()``
on the model's tensors — and must hand back metrics as Python numbers or CPU tensors.

Each bug the course met on a real CUDA GPU fails here when its fix is reverted:
``pairwise_accuracy`` building gold scores on the CPU beside rewards on the GPU; ``.numpy()`` on
rewards (and a collator's CPU batch fed to a GPU model) in a notebook cell; ``RLOOTrainer`` rebuilding
its reference from a freshly built model that had no path.
"""

import copy
import re
from pathlib import Path

import nbformat
import pytest
import torch
from datasets import Dataset
from fake_accelerator import FAKE, OnFake, fake_accelerator

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def convs():
    from utils.data import eval_conversations

    return eval_conversations(12, split="test", seed=0, dialogues=0.25)["prompt"]


@pytest.fixture(scope="module")
def pairs(convs):
    from utils.data import label_pairs

    a = ["Alba eats apples." for _ in convs]
    b = ["No." for _ in convs]
    return label_pairs(convs, a, b, seed=0, drop_ties=False)


def _is_host(x) -> bool:
    """A metric a notebook can print, plot or put in pandas: a number, or a CPU tensor."""
    return not isinstance(x, OnFake)


def test_the_stand_in_is_strict_like_cuda():
    with fake_accelerator():
        x = torch.ones(3, device=FAKE)
        assert x.device == FAKE and isinstance(x * 2, OnFake)
        with pytest.raises(RuntimeError, match="same device"):
            _ = x + torch.ones(3)
        with pytest.raises(TypeError, match="numpy"):
            x.numpy()
        assert _is_host(x.cpu()) and (x.cpu() + torch.ones(3)).sum().item() == 6
        assert (x + torch.tensor(1.0)).sum().item() == 6  # a 0-dim CPU tensor is allowed, as on CUDA
        assert x[torch.tensor([0, 2])].shape == (2,)  # so are CPU indices
        y = torch.zeros(3).to(x.device)
        assert isinstance(y + x, OnFake)


def test_generation_and_evaluation(tiny_model, tiny_tokenizer, convs):
    from utils.evaluate import evaluate
    from utils.models import generate_responses

    with fake_accelerator():
        model = copy.deepcopy(tiny_model).to(FAKE)
        gens = generate_responses(model, tiny_tokenizer, convs, do_sample=True, max_new_tokens=6)
        df = evaluate(model, tiny_tokenizer, convs, do_sample=True, max_new_tokens=6)
        greedy = evaluate(model, tiny_tokenizer, convs, max_new_tokens=6)
    assert len(gens) == len(convs) and df["gold"].dtype.kind == "f" and len(greedy) == len(convs)


def test_reward_model_paths(tiny_model, tiny_tokenizer, convs, pairs):
    from utils.evaluate import evaluate
    from utils.reward import pairwise_accuracy, reward_model_from, reward_scores, train_reward_model

    with fake_accelerator():
        policy = copy.deepcopy(tiny_model).to(FAKE)
        rm = reward_model_from(policy, tiny_tokenizer)
        assert next(rm.parameters()).device == FAKE
        history = train_reward_model(rm, tiny_tokenizer, pairs, epochs=1, batch_size=4, show_progress=False)
        acc = pairwise_accuracy(rm, tiny_tokenizer, pairs)  # gold scores beside rewards: the first CUDA bug
        scores = reward_scores(
            rm, tiny_tokenizer, convs, [[{"role": "assistant", "content": "Hi."}]] * len(convs)
        )
        scores.cpu().numpy()  # what the notebooks do with rewards (Chapter 3's analysis)
        judged = evaluate(policy, tiny_tokenizer, convs, max_new_tokens=6, judge=(rm, tiny_tokenizer))
    assert all(isinstance(h["loss"], float) for h in history)
    assert set(acc) == {"vs_labels", "vs_gold"} and all(isinstance(v, float) for v in acc.values())
    assert judged["gold"].dtype.kind == "f"


def test_dpo_and_kl(tiny_model, tiny_tokenizer, convs, pairs):
    from utils.dpo import train_dpo
    from utils.rollout import answer_logprobs, rollout_from_ids, sequence_kl

    with fake_accelerator():
        policy = copy.deepcopy(tiny_model).to(FAKE)
        ref = copy.deepcopy(tiny_model).to(FAKE)
        history = train_dpo(policy, ref, tiny_tokenizer, pairs, epochs=1, batch_size=4, show_progress=False)
        ids = tiny_tokenizer("Alba eats apples.", add_special_tokens=False)["input_ids"]
        kl = sequence_kl(policy, ref, tiny_tokenizer, convs, [ids] * len(convs))
        lp = answer_logprobs(policy, rollout_from_ids(tiny_tokenizer, convs, [ids] * len(convs), device=FAKE))
    assert isinstance(kl, float) and _is_host(lp) and all(isinstance(x, float) for x in history.loss)


def test_ppo_loop(tiny_model, tiny_tokenizer, convs):
    from utils.ppo import PPOSettings, train_ppo, value_model_from
    from utils.reward import reward_model_from

    with fake_accelerator():
        policy = copy.deepcopy(tiny_model).to(FAKE)
        ref = copy.deepcopy(tiny_model).to(FAKE)
        rm = reward_model_from(policy, tiny_tokenizer)
        history = train_ppo(
            policy,
            ref,
            value_model_from(rm),
            rm,
            tiny_tokenizer,
            convs,
            PPOSettings(iterations=2, batch_size=4, minibatch_size=2, ppo_epochs=1, max_new_tokens=6),
            show_progress=False,
        )
    assert len(history) == 2 and all(isinstance(v, (int, float)) for h in history for v in h.values())


def test_project_checkpoints(tiny_model, tiny_tokenizer, convs, pairs):
    from utils.checks import check_policy_run, check_reward_model_run
    from utils.dpo import train_dpo
    from utils.reward import reward_model_from, train_reward_model

    def train_reward(sft, tok, train):
        rm = reward_model_from(sft, tok)
        train_reward_model(rm, tok, train, epochs=3, lr=1e-3, batch_size=4, show_progress=False)
        return rm

    def align(sft, tok, train):
        policy = copy.deepcopy(sft)
        train_dpo(policy, sft, tok, train, epochs=1, batch_size=4, show_progress=False)
        return policy

    from utils.checks import CheckError

    with fake_accelerator():
        sft = copy.deepcopy(tiny_model).to(FAKE)
        for step in (
            lambda: check_reward_model_run(train_reward, sft, tiny_tokenizer, pairs, pairs, min_accuracy=0.0),
            lambda: check_policy_run(
                align,
                sft,
                tiny_tokenizer,
                pairs,
                start=sft,
                tokenizer=tiny_tokenizer,
                conversations=convs,
                max_kl=None,
            ),
        ):
            try:
                step()
            except CheckError:  # a verdict on a random tiny model is fine; a device error is not
                pass


def test_rloo_builds_its_reference_from_a_freshly_built_model(tmp_cache, tiny_model, tiny_tokenizer):
    """TRL's RLOOTrainer takes no reference model: it reloads one from the policy's ``name_or_path``.
    A model the cache has just built must therefore come back with its folder as that path."""
    from trl import RLOOConfig, RLOOTrainer

    from utils import cache
    from utils.artifacts import load_pair as load_model
    from utils.artifacts import save_pair as save_model

    model, _ = cache.load_or_build(
        "sft", {"test": 1}, lambda: (copy.deepcopy(tiny_model), tiny_tokenizer), save_model, load_model
    )
    assert Path(model.config._name_or_path) == cache.artifact_path("sft", {"test": 1})
    args = RLOOConfig(
        output_dir=str(tmp_cache / "rloo"),
        per_device_train_batch_size=4,
        num_generations=2,
        max_steps=1,
        beta=0.1,
        max_completion_length=4,
        report_to=[],
        use_cpu=True,
        bf16=False,
        save_strategy="no",
        disable_tqdm=True,
        activation_checkpointing=False,
    )
    trainer = RLOOTrainer(
        model=copy.deepcopy(model),
        reward_funcs=lambda completions, **kw: [0.0] * len(completions),
        args=args,
        train_dataset=Dataset.from_dict({"prompt": [[{"role": "user", "content": "Hi?"}]] * 4}),
        processing_class=tiny_tokenizer,
    )
    assert trainer.ref_model is not None


# --- notebook cells: what the stand-in cannot run, a scan of the solutions' code catches ----
def _code_cells():
    for path in sorted((ROOT / "solutions").glob("*.ipynb")):
        for i, cell in enumerate(nbformat.read(path, as_version=4).cells):
            if cell.cell_type == "code":
                yield path.name, i, cell.source


def test_notebooks_copy_tensors_to_the_cpu_before_numpy():
    """``tensor.numpy()`` fails on a GPU tensor: a notebook writes ``.cpu().numpy()``, or uses pandas."""
    bad = [
        (name, i, line.strip())
        for name, i, src in _code_cells()
        for line in src.splitlines()
        if re.search(r"(?<!\.cpu\(\))(?<!\.to_numpy)\.numpy\(\)", line)
    ]
    assert not bad, f"`.numpy()` without `.cpu()` first (fails on a GPU): {bad}"


def test_notebooks_move_collated_batches_to_the_model():
    """A data collator builds CPU tensors; a cell that runs a model on one must move it first."""
    bad = [
        (name, i)
        for name, i, src in _code_cells()
        if re.search(r"data_collator\(", src) and not re.search(r"\.to\((trainer\.model\.)?device\)", src)
    ]
    assert not bad, f"a collated batch is used without moving it to the model's device: {bad}"
