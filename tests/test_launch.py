"""The command-line recipes (``recipes/train.py``) and their ``accelerate`` configs.

The slow tests run them: every stage trains a few steps in one process on a tiny stand-in model and
on the ``hub`` profile's stand-in, and DPO launched by ``accelerate launch`` on two CPU processes
(gloo), data parallel and fully sharded, logs the same loss curve as one process with the same
global batch - and one process with another global batch logs another, so the comparison can fail.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
RECIPE = ROOT / "recipes" / "train.py"
CONFIGS = sorted((ROOT / "recipes" / "accelerate").glob("*.yaml"))


def test_every_accelerate_config_loads_with_accelerate():
    from accelerate.commands.config.config_args import load_config_from_file

    kinds = {}
    for path in CONFIGS:
        config = load_config_from_file(str(path))
        kinds[path.stem] = str(config.distributed_type).split(".")[-1]
    assert kinds == {
        "ddp": "MULTI_GPU",
        "fsdp": "FSDP",
        "two_processes": "MULTI_GPU",
        "zero2": "DEEPSPEED",
        "zero3": "DEEPSPEED",
    }


def test_every_stage_has_a_recipe_on_every_profile_with_its_source():
    from utils.config import PROFILES
    from utils.recipes import stage_recipe

    sys.path.insert(0, str(RECIPE.parent))
    try:
        from train import STAGES
    finally:
        sys.path.remove(str(RECIPE.parent))
    for profile in PROFILES.values():
        for stage in STAGES:
            recipe = stage_recipe(stage, profile)
            assert recipe["learning_rate"] > 0 and recipe["source"], (profile.name, stage)
            if stage in ("dpo", "orpo", "grpo"):
                assert recipe["beta"] is not None, (profile.name, stage)
            if stage == "grpo":
                assert recipe["beta"] > 0, "GRPOConfig defaults to beta=0 (no KL): say it"


@pytest.fixture(scope="module")
def saved_model(tiny_model, tiny_tokenizer, tmp_path_factory):
    folder = tmp_path_factory.mktemp("recipe-model")
    tiny_model.save_pretrained(folder)
    tiny_tokenizer.save_pretrained(folder)
    return folder


def _run(args, tmp_path, name, launcher=(), **env_extra):
    log = tmp_path / f"{name}.json"
    env = {**os.environ, "COURSE_PROFILE": "tiny", "PYTHONPATH": str(ROOT), **env_extra}
    cmd = [*launcher, *([] if launcher else [sys.executable]), str(RECIPE), *args, "--log-json", str(log)]
    done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    record = json.loads(log.read_text())
    return record["world_size"], [h for h in record["log"] if "loss" in h]


def _train_here(args, tmp_path, name):
    """Run the recipe in this process (the launch test below runs it in others)."""
    sys.path.insert(0, str(RECIPE.parent))
    try:
        import train
    finally:
        sys.path.remove(str(RECIPE.parent))
    log = tmp_path / f"{name}.json"
    assert train.main([*args, "--log-json", str(log)]) == 0
    record = json.loads(log.read_text())
    return record["world_size"], [h for h in record["log"] if "loss" in h]


@pytest.mark.slow
@pytest.mark.parametrize("stage", ["sft", "reward", "dpo", "orpo", "grpo"])
def test_each_stage_trains_in_one_process(stage, saved_model, tmp_path):
    args = [stage, "--model", str(saved_model), "--pairs", "annotator:64", "--max-steps", "2"]
    world, steps = _train_here([*args, "--per-device-batch-size", "8"], tmp_path, stage)
    assert world == 1 and len(steps) == 2
    assert all(h["loss"] == h["loss"] for h in steps)  # finite, not NaN


@pytest.fixture(scope="module")
def standin(tmp_path_factory):
    sys.path.insert(0, str(ROOT))
    from tools import hub_standin

    return hub_standin.build(tmp_path_factory.mktemp("hub-standin"), "small", n_rows=300)


@pytest.mark.slow
@pytest.mark.parametrize("stage", ["sft", "reward", "dpo", "orpo", "grpo"])
def test_each_stage_runs_on_the_hub_profile_against_the_standin(
    stage, standin, tmp_path, monkeypatch, tmp_datasets_cache
):
    """The hub path: SmolLM2-shaped models by their Hub names, the public datasets' columns, the
    published settings (one step of a smoke run)."""
    from utils import hub

    monkeypatch.setenv("COURSE_PROFILE", "hub")
    monkeypatch.setenv(hub.MIRROR_ENV, str(standin))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("COURSE_SMOKE", "1")
    world, steps = _train_here([stage, "--profile", "hub", "--max-steps", "1"], tmp_path, stage)
    assert world == 1 and len(steps) == 1 and steps[0]["loss"] == steps[0]["loss"]


DPO_RUN = ["dpo", "--pairs", "annotator:96", "--max-steps", "6"]


@pytest.fixture(scope="module")
def one_process(saved_model, tmp_path_factory):
    """DPO on one process at a global batch of 8 pairs, and at 4 (another curve)."""
    tmp = tmp_path_factory.mktemp("one-process")
    args = [*DPO_RUN, "--model", str(saved_model)]
    world, full = _run([*args, "--per-device-batch-size", "8"], tmp, "one")
    _, half = _run([*args, "--per-device-batch-size", "4"], tmp, "half")
    assert world == 1 and len(full) == 6
    return full, half


@pytest.mark.slow
@pytest.mark.parametrize("config, port", [("two_processes", 29531), ("fsdp", 29541)])
def test_two_processes_follow_one_process_at_the_same_global_batch(
    config, port, saved_model, one_process, tmp_path
):
    """DDP (``two_processes.yaml``) and FSDP 2 (``fsdp.yaml``, weights, gradients and optimiser state
    sharded) on two CPU processes: the same curve as one process, to float rounding."""
    one, half = one_process
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--main_process_port", str(port)]
    launch += ["--config_file", str(ROOT / "recipes" / "accelerate" / f"{config}.yaml")]
    args = [*DPO_RUN, "--model", str(saved_model), "--per-device-batch-size", "4"]
    world, two = _run(args, tmp_path, config, launcher=launch)
    assert world == 2 and len(two) == len(one) == 6
    for a, b in zip(one, two):
        for key in ("loss", "grad_norm", "rewards/margins"):
            assert b[key] == pytest.approx(a[key], rel=1e-5, abs=1e-6), (
                config,
                a["step"],
                key,
                a[key],
                b[key],
            )
    # the check can fail: half the global batch gives another curve after the first update
    assert any(abs(h["loss"] - a["loss"]) > 1e-4 for h, a in zip(half[1:], one[1:]))


def test_setup_page_shows_the_hub_recipes_as_utils_recipes_holds_them():
    from utils.recipes import recipes_table

    page = (ROOT / "book" / "setup.md").read_text()
    shown = page.split("<!-- recipes:start -->\n", 1)[1].split("\n<!-- recipes:end -->", 1)[0]
    assert shown == recipes_table("hub"), (
        "book/setup.md's table is stale: paste utils.recipes.recipes_table()"
    )
