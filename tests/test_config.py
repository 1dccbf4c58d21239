"""Profiles, device/dtype choice and seeding."""

import random

import numpy as np
import pytest
import torch

from utils import config


def test_default_profile_is_tiny(monkeypatch):
    monkeypatch.delenv(config.PROFILE_ENV, raising=False)
    profile = config.get_profile()
    assert profile.name == "tiny"
    assert profile.base_model is None and profile.pretrain_dataset is None  # built by the course, offline


def test_environment_variable_selects_the_profile(monkeypatch):
    monkeypatch.setenv(config.PROFILE_ENV, "hub")
    profile = config.get_profile()
    assert profile.name == "hub"
    assert profile.base_model == "HuggingFaceTB/SmolLM2-135M"
    assert profile.pretrain_dataset[0].endswith("wikitext")


def test_explicit_name_beats_the_environment(monkeypatch):
    monkeypatch.setenv(config.PROFILE_ENV, "hub")
    assert config.get_profile("tiny").name == "tiny"


def test_empty_environment_variable_means_tiny(monkeypatch):
    monkeypatch.setenv(config.PROFILE_ENV, "")
    assert config.get_profile().name == "tiny"


@pytest.mark.parametrize("how", ["argument", "environment"])
def test_unknown_profile_names_the_choices(monkeypatch, how):
    if how == "environment":
        monkeypatch.setenv(config.PROFILE_ENV, "huge")
        call = config.get_profile
    else:

        def call():
            return config.get_profile("huge")

    with pytest.raises(ValueError, match=r"unknown profile 'huge'.*\['hub', 'tiny'\].*COURSE_PROFILE"):
        call()


def test_profiles_differ_where_they_should():
    tiny, hub = config.PROFILES["tiny"], config.PROFILES["hub"]
    assert hub.pretrain_lr < tiny.pretrain_lr  # fine-tuning a real checkpoint needs a much smaller lr
    assert tiny.with_overrides(pretrain_steps=5).pretrain_steps == 5
    assert tiny.pretrain_steps != 5  # with_overrides returns a copy


def test_pick_dtype_cpu_is_float32():
    assert config.pick_dtype("cpu") == torch.float32
    assert config.pick_dtype(torch.device("cpu"), bf16_supported=True) == torch.float32


def test_pick_dtype_cuda_uses_bf16_where_supported():
    assert config.pick_dtype(torch.device("cuda"), bf16_supported=True) == torch.bfloat16


def test_pick_dtype_cuda_falls_back_to_fp16():
    assert config.pick_dtype(torch.device("cuda"), bf16_supported=False) == torch.float16
    assert config.pick_dtype("cuda:0", bf16_supported=False) == torch.float16


def test_pick_device():
    assert config.pick_device("cpu") == torch.device("cpu")
    expected = "cuda" if torch.cuda.is_available() else "cpu"
    assert config.pick_device().type == expected


def test_seed_everything_makes_randomness_reproducible():
    config.seed_everything(123)
    a = (torch.randn(5), np.random.rand(3), random.random())
    config.seed_everything(123)
    b = (torch.randn(5), np.random.rand(3), random.random())
    config.seed_everything(124)
    c = torch.randn(5)
    assert torch.equal(a[0], b[0]) and np.array_equal(a[1], b[1]) and a[2] == b[2]
    assert not torch.equal(a[0], c)


def test_describe_runtime(monkeypatch):
    monkeypatch.delenv(config.PROFILE_ENV, raising=False)
    line = config.describe_runtime()
    assert line.startswith("profile=tiny seed=0 device=")
    assert f"torch={torch.__version__}" in line


def test_repo_url_is_a_github_repository():
    assert config.REPO_URL.startswith("https://github.com/")
    assert len(config.REPO_URL.removeprefix("https://github.com/").split("/")) == 2


# --- one seed knob ---------------------------------------------------------------------------
def test_course_seed_is_the_stream_itself_in_the_committed_run(monkeypatch):
    monkeypatch.delenv(config.SEED_ENV, raising=False)
    assert config.run_seed() == 0 and config.course_seed(3) == 3 and config.course_seed() == 0


def test_course_seed_shifts_every_stream_apart(monkeypatch):
    monkeypatch.setenv(config.SEED_ENV, "2")
    assert config.run_seed() == 2
    shifted = [config.course_seed(s) for s in (0, 1, 3, 12345)]
    assert len(set(shifted)) == 4 and all(s not in (0, 1, 3, 12345) for s in shifted)
    monkeypatch.setenv(config.SEED_ENV, "1")
    assert not set(shifted) & {
        config.course_seed(s) for s in (0, 1, 3, 12345)
    }  # seeds 1 and 2 share no stream


def test_course_seed_rejects_a_non_integer(monkeypatch):
    monkeypatch.setenv(config.SEED_ENV, "one")
    with pytest.raises(ValueError, match="COURSE_SEED must be an integer"):
        config.run_seed()


def test_the_seed_knob_reaches_models_sampling_and_labels(monkeypatch, tiny_tokenizer):
    """COURSE_SEED changes model initialisation, data order, sampling and label noise, not TinyWorld."""
    from utils.data import eval_conversations, label_pairs, lm_batches
    from utils.models import make_model

    def draws():
        model = make_model(
            tiny_tokenizer,
            hidden_size=16,
            num_hidden_layers=1,
            num_attention_heads=2,
            num_key_value_heads=2,
            intermediate_size=32,
        )
        order = next(lm_batches(torch.arange(40).view(20, 2), batch_size=4, steps=1))
        prompts = eval_conversations(40, split="train", seed=0)["prompt"]
        labels = label_pairs(prompts, ["Yes."] * 40, ["No."] * 40, drop_ties=False)  # ties: the coin decides
        return (
            next(model.parameters()).detach().clone(),
            order,
            [c[0]["content"] for c in labels["chosen"]],
            prompts,
        )

    monkeypatch.setenv(config.SEED_ENV, "0")
    w0, order0, labels0, prompts0 = draws()
    w0b, order0b, labels0b, _ = draws()
    monkeypatch.setenv(config.SEED_ENV, "1")
    w1, order1, labels1, prompts1 = draws()
    assert (
        torch.equal(w0, w0b) and torch.equal(order0, order0b) and labels0 == labels0b
    )  # same seed: same run
    assert not torch.equal(w0, w1) and not torch.equal(order0, order1)
    assert labels0 != labels1  # the annotators' noise is redrawn
    assert list(prompts0) == list(prompts1)  # TinyWorld's prompts are not


# --- precision ------------------------------------------------------------------------------
def test_trained_weights_are_always_float32():
    for device in ("cpu", "cuda"):
        assert config.weights_dtype(device) == torch.float32
    assert config.weights_dtype("cpu", trainable=False) == torch.float32


def test_frozen_models_may_use_half_precision_on_a_gpu(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: False)  # a T4
    assert config.weights_dtype("cuda", trainable=False) == torch.float16


@pytest.mark.parametrize(
    "bf16, want", [(True, {"bf16": True, "fp16": False}), (False, {"bf16": False, "fp16": True})]
)
def test_mixed_precision_on_a_gpu_for_the_hub_profile(bf16, want):
    """bf16 autocast on an A100/H100; fp16 autocast with loss scaling (Trainer's fp16=True) on a T4."""
    hub = config.PROFILES["hub"]
    assert config.mixed_precision("cuda", hub, bf16_supported=bf16) == want


def test_no_mixed_precision_on_cpu_or_for_the_tiny_models():
    off = {"bf16": False, "fp16": False}
    assert config.mixed_precision("cpu", config.PROFILES["hub"]) == off
    assert config.mixed_precision("cuda", config.PROFILES["tiny"], bf16_supported=False) == off
    assert config.mixed_precision("cuda", config.PROFILES["tiny"], bf16_supported=True) == off


def test_mixed_precision_flags_build_a_trainer_config():
    from transformers import TrainingArguments

    args = TrainingArguments(output_dir="/tmp/x", use_cpu=True, report_to=[], **config.mixed_precision("cpu"))
    assert not args.bf16 and not args.fp16
