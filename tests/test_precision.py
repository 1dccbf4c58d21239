"""Mixed precision in the course's own training loops (#32): ``utils.config.training_precision``
picks bf16 or fp16 autocast (with a gradient scaler for fp16) on a GPU with the hub profile, and
nothing on a CPU or for the tiny models. Off, a loop computes exactly what the plain loop does;
forced on a CPU, every loop trains under autocast with fp32 weights, and fp16 goes through the
scaler."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch

from utils import config, data
from utils.config import PROFILES, _precision, training_precision

LOOP_MODULES = ["pretrain", "sft", "reward", "dpo", "orpo", "ppo", "grpo"]


def test_off_on_a_cpu_and_for_the_tiny_profile():
    for device, profile in [("cpu", PROFILES["hub"]), ("cpu", PROFILES["tiny"]), ("cuda", PROFILES["tiny"])]:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # a GradScaler for cuda on a machine without it
            autocast, scaler = training_precision(device, profile)
        assert autocast.dtype is None and not scaler.is_enabled()
        with autocast():
            assert not torch.is_autocast_enabled("cpu")


@pytest.mark.parametrize("bf16, dtype", [(True, torch.bfloat16), (False, torch.float16)])
def test_on_a_gpu_with_the_hub_profile_bf16_where_supported_else_fp16(bf16, dtype):
    """The same choice TRL's trainers get from ``mixed_precision`` (a T4 has no bf16)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        autocast, _ = training_precision("cuda", PROFILES["hub"], bf16_supported=bf16)
    assert autocast.dtype == dtype
    assert config.mixed_precision("cuda", PROFILES["hub"], bf16_supported=bf16) == {
        "bf16": bf16,
        "fp16": not bf16,
    }


def test_off_the_loop_is_the_plain_loop_bit_for_bit(tiny_model, tiny_tokenizer):
    """What keeps the tiny profile's numbers: the scaler's calls, off, are the plain calls."""
    model_a, model_b = copy.deepcopy(tiny_model), copy.deepcopy(tiny_model)
    batch = torch.randint(3, len(tiny_tokenizer), (4, 16))
    opt_a = torch.optim.AdamW(model_a.parameters(), lr=1e-2)
    opt_b = torch.optim.AdamW(model_b.parameters(), lr=1e-2)
    autocast, scaler = training_precision("cpu")
    for _ in range(3):
        loss = model_a(input_ids=batch, labels=batch).loss
        opt_a.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model_a.parameters(), 1.0)
        opt_a.step()
        with autocast():
            loss = model_b(input_ids=batch, labels=batch).loss
        opt_b.zero_grad()
        scaler.scale(loss).backward()
        scaler.unscale_(opt_b)
        torch.nn.utils.clip_grad_norm_(model_b.parameters(), 1.0)
        scaler.step(opt_b)
        scaler.update()
    for a, b in zip(model_a.parameters(), model_b.parameters()):
        assert torch.equal(a, b)


@pytest.fixture
def forced(monkeypatch, request):
    """Every loop's ``training_precision`` returns a CPU autocast of ``request.param``. Returns the
    scalers made, and how often each loop's autocast was entered (by module)."""
    import importlib

    made, entered = [], {}

    def patched(name):
        def fake(device=None, profile=None, **_):
            autocast, scaler = _precision("cpu", request.param)
            made.append(scaler)

            def counting():
                entered[name] = entered.get(name, 0) + 1
                return autocast()

            return counting, scaler

        return fake

    for name in LOOP_MODULES:
        monkeypatch.setattr(importlib.import_module(f"utils.{name}"), "training_precision", patched(name))
    return made, entered


def _all_fp32(model):
    return all(p.dtype == torch.float32 for p in model.parameters())


@pytest.mark.parametrize("forced", [torch.bfloat16, torch.float16], indirect=True, ids=["bf16", "fp16"])
def test_every_loop_trains_under_autocast_with_fp32_weights(forced, tiny_model, tiny_tokenizer):
    from utils.data import pack_texts
    from utils.dpo import train_dpo
    from utils.grpo import GRPOSettings, train_grpo
    from utils.orpo import train_orpo
    from utils.ppo import PPOSettings, train_ppo, value_model_from
    from utils.pretrain import train_lm
    from utils.reward import reward_model_from, train_reward_model
    from utils.sft import train_sft
    from utils.world import pretraining_documents

    tok = copy.deepcopy(tiny_tokenizer)
    pairs = data.annotator_preferences(16, seed=0)
    convs = data.eval_conversations(8, split="train", seed=0)["prompt"]
    quiet = dict(show_progress=False)
    losses = {}

    m = copy.deepcopy(tiny_model)
    blocks = pack_texts(tok, [d["text"] for d in pretraining_documents(40)], 32)
    losses["pretrain"] = [
        h["loss"] for h in train_lm(m, blocks, steps=3, batch_size=4, lr=1e-3, log_every=1, **quiet)
    ]
    assert _all_fp32(m)
    m = copy.deepcopy(tiny_model)
    losses["sft"], _ = train_sft(
        m, tok, data.sft_dataset(16, "messages", seed=0)["train"], epochs=1, batch_size=8, **quiet
    )
    assert _all_fp32(m)
    rm = reward_model_from(tiny_model, tok)
    log = train_reward_model(rm, tok, pairs, batch_size=8, **quiet)
    losses["reward"] = [h["loss"] for h in log if "loss" in h]
    assert _all_fp32(rm)
    m = copy.deepcopy(tiny_model)
    losses["dpo"] = list(train_dpo(m, copy.deepcopy(tiny_model), tok, pairs, batch_size=8, **quiet)["loss"])
    assert _all_fp32(m)
    m = copy.deepcopy(tiny_model)
    losses["orpo"] = list(train_orpo(m, tok, pairs, 1.0, steps=2, batch_size=8, **quiet)["loss"])
    m = copy.deepcopy(tiny_model)
    settings = PPOSettings(iterations=2, batch_size=4, minibatch_size=2, ppo_epochs=1, max_new_tokens=6)
    log = train_ppo(m, copy.deepcopy(tiny_model), value_model_from(rm), rm, tok, convs, settings, **quiet)
    losses["ppo"] = [h["policy_loss"] for h in log]
    m = copy.deepcopy(tiny_model)
    s = GRPOSettings(
        iterations=2, prompts_per_iteration=2, group_size=2, ppo_epochs=1, minibatch_size=4, max_new_tokens=6
    )
    log = train_grpo(m, copy.deepcopy(tiny_model), lambda roll: torch.rand(len(roll)), tok, convs, s, **quiet)
    losses["grpo"] = [h["loss"] for h in log]
    assert _all_fp32(m)
    for name, values in losses.items():
        assert values and all(v == v and abs(v) < 1e4 for v in values), (name, values)
    scalers, entered = forced
    assert sorted(entered) == sorted(LOOP_MODULES), entered  # every loop ran under autocast
    assert len(scalers) == len(LOOP_MODULES)
    if scalers[0].is_enabled():  # fp16: every loop's scaler scaled a loss (its scale was set)
        assert all(s._scale is not None for s in scalers)
    else:
        assert not any(s.is_enabled() for s in scalers)
