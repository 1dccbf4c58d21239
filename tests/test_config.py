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
    assert line.startswith("profile=tiny device=")
    assert f"torch={torch.__version__}" in line


def test_repo_url_is_a_github_repository():
    assert config.REPO_URL.startswith("https://github.com/")
    assert len(config.REPO_URL.removeprefix("https://github.com/").split("/")) == 2
