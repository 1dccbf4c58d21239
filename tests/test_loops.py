"""The loops the chapters write and utils runs (exported from the notebooks, tools/export_loops.py):
called the way the notebooks call them and the way utils calls them, they train the same weights
(so a chapter run on its own rebuilds exactly the notebook's model), and they do what they say."""

import copy

import pytest
import torch

from utils import data
from utils.data import pack_texts
from utils.pretrain import next_token_loss, train_lm
from utils.sft import collate, sft_example, train_sft
from utils.world import pretraining_documents


def same_weights(a, b) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_train_lm_evaluating_as_chapter1_does_trains_what_the_builder_trains(tiny_model, tiny_tokenizer):
    blocks = pack_texts(tiny_tokenizer, [d["text"] for d in pretraining_documents(60)], 32)
    calls = []

    def validation_loss(m):
        m.eval()
        calls.append(m.training)
        with torch.no_grad():
            return next_token_loss(m(input_ids=blocks[:4]).logits, blocks[:4]).item()

    kw = dict(steps=8, batch_size=4, lr=3e-3, warmup=3, seed=0, show_progress=False)
    notebook, builder = copy.deepcopy(tiny_model), copy.deepcopy(tiny_model)
    log = train_lm(notebook, blocks, log_every=1, eval_fn=validation_loss, eval_every=3, **kw)
    history = train_lm(builder, blocks, **kw)
    assert same_weights(notebook, builder) and not same_weights(notebook, tiny_model)
    assert [h["step"] for h in log] == list(range(1, 9))
    assert [h["step"] for h in log if "val_loss" in h] == [3, 6, 8] and len(calls) == 3
    assert [h["step"] for h in history] == [8]  # log_every=10: the last step only
    assert history[0]["loss"] == sum(h["loss"] for h in log) / 8


def test_train_sft_on_encoded_examples_and_on_a_dataset_trains_the_same_weights(tiny_model, tiny_tokenizer):
    demos = data.sft_dataset(40, "messages", seed=0, validation=8)
    examples = [sft_example(tiny_tokenizer, m) for m in demos["train"]["messages"]]
    val = collate(examples[:4], tiny_tokenizer.pad_token_id)
    evals = []

    def val_loss(m):
        evals.append(1)
        m.eval()
        with torch.no_grad():
            return next_token_loss(m(input_ids=val["input_ids"]).logits, val["labels"]).item()

    kw = dict(epochs=2, lr=3e-3, batch_size=8, warmup=2, seed=0, show_progress=False)
    notebook, builder = copy.deepcopy(tiny_model), copy.deepcopy(tiny_model)
    losses, vals = train_sft(notebook, tiny_tokenizer, examples, eval_fn=val_loss, eval_every=3, **kw)
    train_sft(builder, tiny_tokenizer, demos["train"], **kw)  # how utils.artifacts calls it
    assert same_weights(notebook, builder) and not same_weights(notebook, tiny_model)
    steps = len(losses)
    assert steps == 2 * -(-len(examples) // 8)
    assert [s for s, _ in vals] == [0, *range(3, steps + 1, 3), *([steps] if steps % 3 else [])]
    assert len(evals) == len(vals)


# --- Chapter 4: DPO --------------------------------------------------------------------------
def test_train_dpo_with_another_loss_never_calls_dpo_loss(tiny_model, tiny_tokenizer, monkeypatch):
    """Chapter 4's noise-robust variants go through the loop as ``loss_fn``."""
    from utils import dpo

    def never(*args):
        raise AssertionError("dpo_loss must not be called: the loss is ipo_loss")

    monkeypatch.setattr(dpo, "dpo_loss", never)
    pairs = data.annotator_preferences(24, seed=0)
    policy = copy.deepcopy(tiny_model)
    dpo.train_dpo(
        policy,
        tiny_model,
        tiny_tokenizer,
        pairs,
        0.1,
        loss_fn=dpo.ipo_loss,
        lr=3e-3,
        batch_size=8,
        show_progress=False,
    )
    assert not same_weights(tiny_model, policy)


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


def test_train_dpo_runs_the_reference_once_per_pair(tiny_model, tiny_tokenizer):
    """Over several epochs the frozen reference's log-probabilities are computed in the first
    and reused: its forward passes see each answer once, the policy's once per epoch."""
    from utils.costs import count_sequences
    from utils.dpo import train_dpo

    pairs = data.annotator_preferences(20, seed=0)
    policy, reference = copy.deepcopy(tiny_model), copy.deepcopy(tiny_model)
    policy_counts, h1 = count_sequences(policy)
    reference_counts, h2 = count_sequences(reference)
    log = train_dpo(policy, reference, tiny_tokenizer, pairs, epochs=3, batch_size=8, show_progress=False)
    [h.remove() for h in h1 + h2]
    assert len(log) == 9 and reference_counts == {"with_grad": 0, "without_grad": 40}
    assert policy_counts == {"with_grad": 120, "without_grad": 0}
    assert log.accuracy.iloc[0] == 0.5  # step 1: the policy is the reference, every pair ties


# --- Chapter 5: ORPO -------------------------------------------------------------------------
def test_train_orpo_runs_epochs_over_every_pair_and_uses_its_loss_fn(tiny_model, tiny_tokenizer, monkeypatch):
    """Chapter 5's matched comparison counts ORPO's steps in epochs: every pair once per epoch
    (a short last batch included), reshuffled between epochs; the ablation goes in as
    ``loss_fn`` and replaces the odds-ratio loss."""
    from utils import orpo

    pairs = data.annotator_preferences(20, seed=0)
    seen = []
    real = orpo.pair_batch
    monkeypatch.setattr(orpo, "pair_batch", lambda tok, rows, dev: seen.append(rows) or real(tok, rows, dev))
    model = copy.deepcopy(tiny_model)
    kw = dict(batch_size=8, lr=3e-3, show_progress=False)
    log = orpo.train_orpo(model, tiny_tokenizer, pairs, 1.0, steps=6, **kw)
    assert len(log) == 6 and [len(r) for r in seen] == [8, 8, 4] * 2
    prompts = [[r["prompt"][-1]["content"] + r["chosen"][0]["content"] for r in rows] for rows in seen]
    first, second = sum(prompts[:3], []), sum(prompts[3:], [])
    want = sorted(p[-1]["content"] + c[0]["content"] for p, c in zip(pairs["prompt"], pairs["chosen"]))
    assert sorted(first) == sorted(second) == want and first != second
    assert not same_weights(model, tiny_model)

    def probability_ratio(nll, chosen, rejected, lam):
        d = chosen - rejected
        return nll - lam * torch.nn.functional.logsigmoid(d).mean(), d.detach().mean()

    monkeypatch.setattr(orpo, "pair_batch", real)
    a, b = copy.deepcopy(tiny_model), copy.deepcopy(tiny_model)
    kw = dict(kw, steps=3)
    orpo.train_orpo(a, tiny_tokenizer, pairs, 1.0, **kw)
    orpo.train_orpo(b, tiny_tokenizer, pairs, 1.0, loss_fn=probability_ratio, **kw)
    c = copy.deepcopy(tiny_model)
    orpo.train_orpo(c, tiny_tokenizer, pairs, 1.0, loss_fn=orpo.orpo_loss, **kw)
    assert same_weights(a, c) and not same_weights(a, b)


# --- Chapter 7: GRPO -------------------------------------------------------------------------
def _grpo_settings(**kw):
    from utils.grpo import GRPOSettings

    base = dict(iterations=3, prompts_per_iteration=2, group_size=3, ppo_epochs=2, minibatch_size=4)
    return GRPOSettings(**(base | dict(lr=1e-3, beta=0.1, max_new_tokens=6, seed=0) | kw))


def test_train_grpo_learns_a_rule_reward_and_logs_its_groups(tiny_model, tiny_tokenizer):
    """With the reward 'fraction of answer tokens in the lower half of the vocabulary' the reward rises,
    the KL to the reference starts at 0 and grows, and groups that all scored alike are counted."""
    from utils.grpo import train_grpo

    half = len(tiny_tokenizer) // 2

    def reward(roll):
        return ((roll.response < half) & (roll.response_mask == 1)).float().sum(1) / roll.response_mask.sum(1)

    prompts = data.eval_conversations(32, split="train", seed=0)["prompt"]
    policy, reference = copy.deepcopy(tiny_model), copy.deepcopy(tiny_model)
    s = _grpo_settings(
        iterations=12,
        prompts_per_iteration=4,
        group_size=4,
        ppo_epochs=4,
        minibatch_size=8,
        lr=1e-2,
        beta=0.01,
    )
    history = train_grpo(
        policy, reference, reward, copy.deepcopy(tiny_tokenizer), prompts, s, show_progress=False
    )
    assert len(history) == 12 and {"reward", "score", "gold", "kl", "no_signal", "loss"} <= set(history[0])
    assert history[0]["kl"] == pytest.approx(0.0, abs=1e-5) and history[-1]["kl"] > 0
    assert all(0.0 <= h["no_signal"] <= 1.0 for h in history)
    first = sum(h["reward"] for h in history[:3]) / 3
    last = sum(h["reward"] for h in history[-3:]) / 3
    assert last > first + 0.1, (first, last)
    assert same_weights(reference, tiny_model), "the reference must stay frozen"


def test_train_grpo_normalises_a_reward_models_scores_and_penalises_unfinished_answers(
    tiny_model, tiny_tokenizer
):
    from utils.grpo import train_grpo
    from utils.reward import reward_model_from

    tok = copy.deepcopy(tiny_tokenizer)
    rm = reward_model_from(tiny_model, tok).eval()
    prompts = data.eval_conversations(5, split="train", seed=0, dialogues=0.4)["prompt"]
    s = _grpo_settings(iterations=1, missing_eos_penalty=2.0)
    seen = []
    history = train_grpo(
        copy.deepcopy(tiny_model),
        tiny_model,
        rm,
        tok,
        prompts,
        s,
        reward_norm=(0.1, 0.5),
        gold=False,
        show_progress=False,
        callback=lambda it, h: seen.append(it),
    )
    h = history[0]
    unfinished = 1 - h["finished"]
    assert h["score"] == pytest.approx((h["reward"] - 0.1) / 0.5 - 2.0 * unfinished, abs=1e-5)
    assert "gold" not in h and seen == [1]


def test_train_grpo_runs_the_loss_it_is_given(tiny_model, tiny_tokenizer):
    """Chapter 7's ablation passes its own aggregation: a loss that is zero must leave the policy where
    it was, it must be called with grpo_loss's arguments, and without one the loop runs grpo_loss."""
    import inspect

    from utils.grpo import grpo_loss, train_grpo

    assert inspect.signature(train_grpo).parameters["loss_fn"].default is None
    calls = []

    def zero_loss(logp, old, ref, advantages, mask, clip, beta):
        calls.append((tuple(logp.shape) == tuple(mask.shape), clip, beta))
        return 0.0 * grpo_loss(logp, old, ref, advantages, mask, clip, beta)

    prompts = data.eval_conversations(8, split="train", seed=0)["prompt"]
    policy = copy.deepcopy(tiny_model)
    s = _grpo_settings(iterations=2)
    train_grpo(
        policy,
        tiny_model,
        lambda roll: torch.arange(len(roll), dtype=torch.float32),  # every group has signal
        copy.deepcopy(tiny_tokenizer),
        prompts,
        s,
        gold=False,
        show_progress=False,
        loss_fn=zero_loss,
    )
    assert calls and all(c == (True, s.clip, s.beta) for c in calls)
    assert same_weights(policy, tiny_model), "a zero loss must not move the policy"
