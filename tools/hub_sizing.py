"""Measure what each training phase of the ``hub`` profile costs at the real model size.

For every phase the course runs on the ``hub`` profile, this builds the real architectures
(SmolLM2-135M's config for the policy, reference, reward and value models; Skywork-Reward-V2-
Qwen3-0.6B's for Project 2's judge) with random weights (the cost of a step does not depend on the
weights), runs a few steps at the profile's batch shapes with the sequences at their longest, and
records the time per step and the peak GPU memory. Each phase is measured as the course runs it:

* the from-scratch loops (pretraining, SFT, reward model, DPO, ORPO, PPO): fp32 weights and fp32
  compute, as ``utils`` ran them when the figures in ``benchmarks/hub_sizing.json`` were measured
  (they now run under ``training_precision()``'s autocast on a GPU: fp16 with loss scaling on a
  T4, which the projection below counts at the fp16 rate);
* the TRL/``transformers`` trainers: fp32 master weights with fp16 autocast and loss scaling, which
  is what ``mixed_precision()`` gives them on a T4 (no bf16 there);
* PPO through ``utils.ppo.train_ppo`` itself (sampling, scoring, two epochs of two minibatches);
* evaluation: ``generate_texts`` (greedy, 128 prompts, 40 new tokens), and the judge scoring
  in fp16.

    python tools/hub_sizing.py --out benchmarks/hub_sizing.json             # real size (a GPU)
    python tools/hub_sizing.py --small --steps 1 --out /tmp/sizing.json     # the script itself, on a CPU

``book/setup.md`` turns these figures into what a student should expect on a free Colab T4.
"""

from __future__ import annotations

import argparse
import json
import platform
import tempfile
import time
from contextlib import nullcontext
from pathlib import Path

import torch

from tools.hub_standin import QWEN3_RM_SMALL, build, lm_config, model_from

QWEN3_06B_RM = dict(  # Skywork-Reward-V2-Qwen3-0.6B: Qwen3-0.6B's backbone with one output
    QWEN3_RM_SMALL,
    hidden_size=1024,
    intermediate_size=3072,
    num_hidden_layers=28,
    num_attention_heads=16,
    num_key_value_heads=8,
    head_dim=128,
    max_position_embeddings=40960,
    vocab_size=151936,
)


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def _reset(device):
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def _peak_gb(device):
    if device.type != "cuda":
        return None
    return round(torch.cuda.max_memory_allocated() / 2**30, 2)


def _lm(cfg, device):
    return model_from(cfg).to(device)


def _timed(step, steps, device):
    step()  # warm-up (allocator, kernels)
    _sync(device)
    t = time.perf_counter()
    for _ in range(steps):
        step()
    _sync(device)
    return (time.perf_counter() - t) / steps


def _train_phase(name, models, loss_of, steps, device, precision, shape):
    """Time ``steps`` optimizer steps of ``loss_of()`` over the trainable parameters of ``models``."""
    params = [p for m in models for p in m.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-5)
    fp16 = precision == "fp16" and device.type == "cuda"
    scaler = torch.amp.GradScaler("cuda") if fp16 else None

    def step():
        with torch.autocast("cuda", dtype=torch.float16) if fp16 else nullcontext():
            loss = loss_of()
        opt.zero_grad(set_to_none=True)
        if scaler is not None:
            scaler.scale(loss).backward()
            scaler.unscale_(opt)
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            scaler.step(opt)
            scaler.update()
        else:
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()

    s = _timed(step, steps, device)
    return {
        "phase": name,
        "precision": precision,
        "shape": shape,
        "s_per_step": round(s, 4),
        "peak_gb": _peak_gb(device),
    }


def measure(small: bool, steps: int, device: torch.device, batch: int | None = None) -> dict:
    from utils.config import get_profile
    from utils.dpo import dpo_loss
    from utils.hub import load_hub_tokenizer
    from utils.models import generate_texts
    from utils.orpo import orpo_loss
    from utils.ppo import PPOSettings, train_ppo, value_model_from
    from utils.pretrain import next_token_loss
    from utils.reward import bradley_terry_loss, reward_model_from

    profile = get_profile("hub")
    lm_cfg = lm_config("small" if small else "real")
    judge_cfg = dict(
        QWEN3_RM_SMALL if small else QWEN3_06B_RM, vocab_size=2048 if small else 151936, pad_token_id=0
    )
    V, T = lm_cfg["vocab_size"], profile.seq_len  # sequences at their longest: the profile's 256 tokens
    B = batch or profile.batch_size  # the SFT, reward-model, DPO and ORPO batch; PPO's minibatch
    g = torch.Generator().manual_seed(0)

    def ids(b, t=T):
        return torch.randint(3, min(V, 2048), (b, t), generator=g).to(device)

    rows = []

    def log(row):
        rows.append(row)
        print(json.dumps(row), flush=True)

    # Chapter 1: continued pretraining, batch profile.pretrain_batch_size x seq_len
    _reset(device)
    model = _lm(lm_cfg, device)
    x = ids(profile.pretrain_batch_size)
    for precision in ("fp32", "fp16"):
        loss = lambda: next_token_loss(model(input_ids=x).logits, x)  # noqa: E731
        log(
            _train_phase(
                "pretrain", [model], loss, steps, device, precision, [profile.pretrain_batch_size, T]
            )
        )

    # Chapter 2: SFT (full), B x 256, loss on every token (the worst case)
    _reset(device)
    x = ids(B)
    for precision in ("fp32", "fp16"):
        log(_train_phase("sft", [model], lambda: next_token_loss(model(input_ids=x).logits, x), steps, device,
                         precision, [B, T]))  # fmt: skip
    # Chapter 2: LoRA (rank 8, every linear layer)
    from peft import LoraConfig, get_peft_model

    _reset(device)
    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    lora = get_peft_model(_lm(lm_cfg, device), LoraConfig(r=8, lora_alpha=16, target_modules=targets))
    log(
        _train_phase(
            "lora",
            [lora],
            lambda: next_token_loss(lora(input_ids=x).logits, x),
            steps,
            device,
            "fp32",
            [B, T],
        )
    )
    lora = None  # (frees its memory)

    # Chapter 3: reward model, B pairs = 2B sequences
    _reset(device)
    with tempfile.TemporaryDirectory() as tmp:
        tok = load_hub_tokenizer(
            str(build(Path(tmp) / "standin", "small", n_rows=50) / "HuggingFaceTB/SmolLM2-135M-Instruct")
        )
    rm = reward_model_from(model, tok)
    xc, xr = ids(B), ids(B)

    def rm_loss():
        return bradley_terry_loss(rm(input_ids=xc).logits.squeeze(-1), rm(input_ids=xr).logits.squeeze(-1))

    for precision in ("fp32", "fp16"):
        log(_train_phase("reward_model", [rm], rm_loss, steps, device, precision, [2 * B, T]))

    # Chapter 3: PPO through the course's loop: policy, reference, value and reward models
    _reset(device)
    rm.requires_grad_(False)
    policy, reference, value = model, _lm(lm_cfg, device).requires_grad_(False), value_model_from(rm)
    reference.eval()
    from utils.data import eval_conversations

    convs = list(eval_conversations(256, split="train", seed=7)["prompt"])
    settings = PPOSettings(iterations=steps + 1, minibatch_size=B, seed=0)
    t = time.perf_counter()
    train_ppo(policy, reference, value, rm, tok, convs, settings, show_progress=False)
    _sync(device)
    log({"phase": "ppo", "precision": "fp32", "shape": [settings.batch_size, settings.max_new_tokens],
         "s_per_step": round((time.perf_counter() - t) / settings.iterations, 4), "peak_gb": _peak_gb(device),
         "note": "one iteration: sample, score, 2 epochs of minibatches; warm-up included"})  # fmt: skip
    value = rm = None

    # Chapter 4: DPO, B pairs against the frozen reference
    _reset(device)

    def seq_logps(m, x):
        logits = m(input_ids=x).logits[:, :-1].float()
        return torch.gather(logits.log_softmax(-1), 2, x[:, 1:, None]).squeeze(-1).sum(-1)

    def dpo():
        with torch.no_grad():
            rc, rr = seq_logps(reference, xc), seq_logps(reference, xr)
        return dpo_loss(seq_logps(policy, xc), seq_logps(policy, xr), rc, rr, 0.1)

    for precision in ("fp32", "fp16"):
        log(_train_phase("dpo", [policy], dpo, steps, device, precision, [2 * B, T]))
    reference = None

    # Chapter 5: ORPO, B pairs, no reference
    _reset(device)

    def orpo():
        lc = policy(input_ids=xc).logits[:, :-1].float().log_softmax(-1)
        lr = policy(input_ids=xr).logits[:, :-1].float().log_softmax(-1)
        tc = torch.gather(lc, 2, xc[:, 1:, None]).squeeze(-1)
        tr = torch.gather(lr, 2, xr[:, 1:, None]).squeeze(-1)
        return orpo_loss(-tc.mean(), tc.mean(-1), tr.mean(-1), 0.1)[0]

    log(_train_phase("orpo", [policy], orpo, steps, device, "fp32", [2 * B, T]))

    # evaluation: greedy generation as evaluate() runs it (batches of 128, 40 new tokens)
    _reset(device)
    prompts = [tok.apply_chat_template(c, tokenize=False, add_generation_prompt=True) for c in convs[:128]]
    t = time.perf_counter()
    generate_texts(policy, tok, prompts, max_new_tokens=40)
    _sync(device)
    log({"phase": "generate", "precision": "fp32", "shape": [128, 40],
         "s_per_step": round(time.perf_counter() - t, 4), "peak_gb": _peak_gb(device),
         "note": "one batch of 128 prompts, greedy"})  # fmt: skip
    policy = model = None

    # Project 2: the judge scores answers in half precision (frozen), batches of B x 512
    _reset(device)
    judge_dtype = torch.float16 if device.type == "cuda" else torch.float32
    judge = model_from(judge_cfg).to(device, judge_dtype).eval()
    xj = torch.randint(3, 2048, (B, 512), generator=g).to(device)
    with torch.no_grad():
        s = _timed(lambda: judge(input_ids=xj).logits, steps, device)
    log({"phase": "judge", "precision": str(judge_dtype).replace("torch.", ""), "shape": [B, 512],
         "s_per_step": round(s, 4), "peak_gb": _peak_gb(device)})  # fmt: skip
    return {
        "device": torch.cuda.get_device_name() if device.type == "cuda" else platform.processor() or "cpu",
        "size": "small" if small else "real",
        "torch": torch.__version__,
        "steps_timed": steps,
        "batch_size": B,
        "phases": rows,
    }


# --- from the measurements to a free Colab T4 (a projection, not a measurement) --------------------
N_LM, N_JUDGE = 134_515_008, 596_000_000  # parameters: SmolLM2-135M; Skywork-Reward-V2-Qwen3-0.6B
T4_FLOPS = {"fp32": 4e12, "fp16": 16e12}  # sustained: about half of the T4's fp32 peak (8.1 TFLOP/s),
# a quarter of its fp16 tensor-core peak (65); the H200's measured time per step is kept as the floor
# of launch and Python overhead, which a T4 pays too.
FLOPS_PER_TOKEN = {"pretrain": 6, "sft": 6, "lora": 4, "reward_model": 6, "dpo": 8, "orpo": 6}  # x N_LM
PPO_PROMPT, EVAL_PROMPT = 128, 64  # tokens: a public preference prompt; an evaluation prompt
# What each notebook runs on the hub profile (batch_size 8, n_demos 1,500, n_pairs 600 -> 540 for
# training, ppo_iterations 16), read from the notebooks: (phase, precision, count). "forward" counts
# tokens (perplexity on wikitext-2's validation text); "generate" batches of 128 answers of 40 tokens;
# "judge" batches of 8 scored answers; "rloo" RLOO steps (4 prompts x 4 answers). Chapter 2's QLoRA
# epoch counts as two full SFT steps a step (4-bit dequantisation), its 100 overfitting steps as SFT's.
# The course's own loops train under fp16 autocast on a T4 (training_precision), as TRL's trainers do;
# evaluation (perplexity, sampling) runs in fp32.
WORKLOAD = {
    "01_pretraining": [("pretrain", "fp16", 200 + 50), ("forward", "fp32", 2 * 250_000)],
    "02_sft": [("sft", "fp16", 375 + 188 * 2 + 100 + 125), ("lora", "fp16", 188),
               ("forward", "fp32", 3 * 250_000), ("generate", "fp32", 3 * 7)],
    "03_rlhf": [("reward_model", "fp16", 68), ("ppo", "fp16", 16 + 16), ("rloo", "fp16", 16),
                ("generate", "fp32", 8 * 7 + 12)],
    "04_dpo": [("dpo", "fp16", 6 * 68 + 68), ("generate", "fp32", 6 * 7)],
    "05_orpo": [("orpo", "fp16", 40 + 136), ("sft", "fp16", 375), ("dpo", "fp16", 68),
                ("generate", "fp32", 4 * 7)],
    "06_project2": [("reward_model", "fp16", 2 * 60), ("ppo", "fp16", 16), ("dpo", "fp16", 60),
                    ("generate", "fp32", 20), ("judge", "float16", 100)],
}  # fmt: skip
LOAD_S = 60  # per notebook: imports, loading the checkpoints (after the first download), building sets


def t4_seconds(phases: dict, phase: str, precision: str) -> float:
    """Projected seconds of one unit of ``phase`` on a T4."""

    def measured(name, prec=None):
        rows = [r for r in phases.values() if r["phase"] == name and (prec is None or r["precision"] == prec)]
        return rows[0] if rows else None

    if phase == "forward":
        return 2 * N_LM / T4_FLOPS["fp32"]  # per token
    if phase == "generate":
        return measured("generate")["s_per_step"] + 2 * N_LM * 128 * (EVAL_PROMPT + 40) / T4_FLOPS["fp32"]
    if phase == "judge":
        r = measured("judge")
        return r["s_per_step"] + 2 * N_JUDGE * r["shape"][0] * r["shape"][1] / T4_FLOPS["fp16"]
    if phase == "ppo":  # generation, 4 scoring forwards, 2 epochs of policy + value updates
        r = measured("ppo")
        return r["s_per_step"] + 34 * N_LM * 64 * (PPO_PROMPT + 40) / T4_FLOPS[precision]
    if phase == "rloo":  # 16 answers: sampling, reference and reward forwards, one update
        r = measured("ppo")
        return r["s_per_step"] / 4 + 10 * N_LM * 16 * (PPO_PROMPT + 40) / T4_FLOPS[precision]
    r = measured(phase, precision) or measured(phase)
    tokens = r["shape"][0] * r["shape"][1]
    return r["s_per_step"] + FLOPS_PER_TOKEN[phase] * N_LM * tokens / T4_FLOPS[precision]


def project(sizing: dict) -> dict:
    """Projected minutes per notebook on a T4, from the measured phases at the hub profile's batch."""
    phases = {i: r for i, r in enumerate(sizing["phases"])}
    out = {}
    for notebook, work in WORKLOAD.items():
        seconds = LOAD_S + sum(n * t4_seconds(phases, phase, prec) for phase, prec, n in work)
        used = {{"rloo": "ppo", "forward": "generate"}.get(phase, phase) for phase, _, _ in work}
        peak = max(r["peak_gb"] or 0 for r in sizing["phases"] if r["phase"] in used)
        out[notebook] = {"minutes": round(seconds / 60, 1), "peak_gb": peak}
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument(
        "--small", action="store_true", help="the few-layer stand-in (checks the script on a CPU)"
    )
    ap.add_argument("--steps", type=int, default=3, help="timed steps per phase (after one warm-up)")
    ap.add_argument("--batch", type=int, default=None, help="instead of the hub profile's batch_size")
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument(
        "--project", type=Path, default=None, help="a sizing JSON: print the T4 projection, run nothing"
    )
    args = ap.parse_args()
    if args.project:
        data = json.loads(args.project.read_text())
        print(json.dumps(project(data.get("batch_8", data)), indent=1))
        return
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    result = measure(args.small, args.steps, device, args.batch)
    if args.out:
        args.out.write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps({k: v for k, v in result.items() if k != "phases"}))


if __name__ == "__main__":
    main()
