"""Direct Preference Optimization, reference version (Rafailov et al., 2023).

Chapter 4 derives and writes these pieces from scratch and checks them against
``trl.DPOTrainer``; Project 2 calls :func:`train_dpo`.
"""
from __future__ import annotations

import copy
import random

import torch
import torch.nn.functional as F

from . import cache
from .config import Profile, course_seed, get_profile, seed_everything
from .data import eval_conversations, label_pairs, require_columns
from .judge import JUDGE_VERSION
from .models import generate_responses
from .pretrain import progress
from .sft import IGNORE, collate, completion_example, get_sft_model, sft_recipe


def sequence_logprobs(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Sum of ``log p(label_t | tokens < t)`` over the labelled (non -100) tokens of each row.

    logits: ``[batch, seq, vocab]``; labels: ``[batch, seq]``. Returns ``[batch]``.
    """
    logits, labels = logits[:, :-1].float(), labels[:, 1:]
    mask = labels != IGNORE
    logp = torch.gather(logits.log_softmax(-1), 2, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    return (logp * mask).sum(-1)


def dpo_loss(policy_chosen: torch.Tensor, policy_rejected: torch.Tensor, ref_chosen: torch.Tensor,
             ref_rejected: torch.Tensor, beta: float = 0.1):
    """The DPO loss (eq. 7 of the paper): ``-log sigmoid(beta * (Δ_policy - Δ_reference))``.

    Inputs are sequence log-probabilities ``[batch]``. Higher ``beta`` = stay closer to the
    reference. Returns ``(mean loss, chosen rewards, rejected rewards)`` where the implicit
    reward is ``beta * (log pi - log pi_ref)``.
    """
    chosen_rewards = beta * (policy_chosen - ref_chosen)
    rejected_rewards = beta * (policy_rejected - ref_rejected)
    loss = -F.logsigmoid(chosen_rewards - rejected_rewards)
    return loss.mean(), chosen_rewards.detach(), rejected_rewards.detach()


def _pair_batch(tokenizer, rows):
    chosen = [completion_example(tokenizer, r["prompt"], r["chosen"]) for r in rows]
    rejected = [completion_example(tokenizer, r["prompt"], r["rejected"]) for r in rows]
    return collate(chosen + rejected, tokenizer.pad_token_id)


def _logps(model, batch):
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    return sequence_logprobs(logits, batch["labels"])


def train_dpo(policy, tokenizer, pairs, *, ref_model=None, beta: float = 0.1, lr: float = 5e-5, epochs: int = 2,
              batch_size: int = 32, seed: int = 0, show_progress: bool = True) -> list[dict]:
    """Train ``policy`` with DPO on conversational ``prompt/chosen/rejected`` pairs.

    ``ref_model`` defaults to a frozen copy of ``policy`` as it is at the start.
    """
    require_columns(pairs, ["prompt", "chosen", "rejected"], "DPO")
    seed_everything(seed)
    ref = ref_model if ref_model is not None else copy.deepcopy(policy).requires_grad_(False)
    ref.eval()  # only ever run under torch.no_grad(); a caller's model keeps its requires_grad flags
    rows = pairs.select_columns(["prompt", "chosen", "rejected"]).to_list()
    device = next(policy.parameters()).device
    opt = torch.optim.AdamW([p for p in policy.parameters() if p.requires_grad], lr=lr, weight_decay=0.0)
    rng = random.Random(course_seed(seed))
    total = epochs * ((len(rows) + batch_size - 1) // batch_size)
    history = []
    policy.train()
    bar = progress(total=total, desc="DPO", disable=not show_progress)
    for epoch in range(epochs):
        order = list(range(len(rows)))
        rng.shuffle(order)
        for i in range(0, len(order), batch_size):
            chunk = [rows[j] for j in order[i:i + batch_size]]
            batch = {k: v.to(device) for k, v in _pair_batch(tokenizer, chunk).items()}
            n = len(chunk)
            with torch.no_grad():
                ref_logps = _logps(ref, batch)
            logps = _logps(policy, batch)
            loss, rc, rr = dpo_loss(logps[:n], logps[n:], ref_logps[:n], ref_logps[n:], beta)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(policy.parameters(), 1.0)
            opt.step()
            history.append({"step": len(history) + 1, "loss": loss.item(), "accuracy": (rc > rr).float().mean().item(),
                            "margin": (rc - rr).mean().item(), "chosen_logp": logps[:n].mean().item(),
                            "rejected_logp": logps[n:].mean().item()})
            bar.set_postfix(loss=f"{loss.item():.3f}")
            bar.update(1)
    bar.close()
    policy.eval()
    return history


@torch.no_grad()
def response_logprobs(model, tokenizer, prompts, responses, batch_size: int = 64) -> torch.Tensor:
    """``log pi(response | prompt)`` summed over the response's tokens (its end token included), per pair."""
    model.eval()
    device = next(model.parameters()).device
    out = []
    for i in range(0, len(prompts), batch_size):
        examples = [completion_example(tokenizer, p, [{"role": "assistant", "content": r}])
                    for p, r in zip(prompts[i:i + batch_size], responses[i:i + batch_size])]
        batch = {k: v.to(device) for k, v in collate(examples, tokenizer.pad_token_id).items()}
        out.append(_logps(model, batch).cpu())
    return torch.cat(out)


def sequence_kl(policy, reference, tokenizer, prompts, responses) -> float:
    """Monte-Carlo estimate of KL(policy || reference) in nats per response, from responses
    *sampled from the policy*: the mean of ``log pi(y|x) - log pi_ref(y|x)``."""
    lp = response_logprobs(policy, tokenizer, prompts, responses)
    lr = response_logprobs(reference, tokenizer, prompts, responses)
    return float((lp - lr).mean())


# --- the preference data artifact ----------------------------------------------------------
def preference_recipe(profile: Profile | None = None) -> dict:
    """On-policy pairs: two samples from the SFT model per training prompt, labelled by the noisy annotators."""
    return {"sft": sft_recipe(profile), "judge_version": JUDGE_VERSION, "n_prompts": 1500, "dialogues": 0.2, "prompt_seed": 1,
            "sample_seeds": [1, 2], "temperature": 1.0, "max_new_tokens": 40, "label_seed": 0, "drop_ties": True}


def build_preference_data(recipe: dict, profile: Profile | None = None, show_progress: bool = True):
    sft, tok = get_sft_model(profile, show_progress=show_progress)
    prompts = eval_conversations(recipe["n_prompts"], split="train", seed=recipe["prompt_seed"],
                                 dialogues=recipe["dialogues"])["prompt"]
    a, b = (generate_responses(sft, tok, prompts, do_sample=True, seed=s, temperature=recipe["temperature"],
                               max_new_tokens=recipe["max_new_tokens"]) for s in recipe["sample_seeds"])
    return label_pairs(prompts, [g.text for g in a], [g.text for g in b], seed=recipe["label_seed"],
                       finished_a=[g.finished for g in a], finished_b=[g.finished for g in b],
                       drop_ties=recipe["drop_ties"])


def get_preference_data(profile: Profile | None = None, rebuild: bool = False, show_progress: bool = True):
    """The course's preference pairs (``prompt/chosen/rejected`` + gold scores): from the cache,
    or sampled from the SFT model and labelled by the gold annotators (deterministic); on the
    ``hub`` profile, the profile's public preference dataset."""
    from datasets import load_from_disk

    profile = profile or get_profile()
    if profile.preference_dataset is not None:
        from .hub import load_hub_preference_dataset
        return load_hub_preference_dataset(profile.preference_dataset)
    recipe = preference_recipe(profile)
    return cache.load_or_build("prefs", recipe, lambda: build_preference_data(recipe, profile, show_progress),
                               _save_dataset, lambda path: load_from_disk(str(path / "data")), rebuild=rebuild)


def _save_dataset(ds, path) -> None:
    import datasets

    datasets.disable_progress_bars()  # a one-shard "saving" bar is noise in a notebook
    try:
        ds.save_to_disk(str(path / "data"))
    finally:
        datasets.enable_progress_bars()
