"""The reference reward model (utils.reward) and PPO (utils.ppo): Bradley-Terry loss, scalar head,
and that it learns the annotators' preferences from the course's preference pairs."""

import copy
import math

import pytest
import torch

from utils.reward import (
    bradley_terry_loss,
    pairwise_accuracy,
    reward_model_from,
    reward_scores,
    train_reward_model,
)


def test_bradley_terry_loss_values_and_gradient():
    r = torch.tensor([0.3, -1.0, 2.0])
    assert math.isclose(bradley_terry_loss(r, r).item(), math.log(2), rel_tol=1e-6)
    rc = torch.tensor([1.0, 0.0], requires_grad=True)
    loss = bradley_terry_loss(rc, torch.tensor([0.0, 0.0]))
    loss.backward()
    assert (rc.grad < 0).all(), "raising the chosen reward must lower the loss"
    assert bradley_terry_loss(torch.tensor([50.0]), torch.tensor([-50.0])).item() < 1e-6
    assert torch.isfinite(bradley_terry_loss(torch.tensor([-500.0]), torch.tensor([500.0])))


def test_reward_model_has_a_scalar_head_on_the_same_backbone(tiny_model, tiny_tokenizer):
    rm = reward_model_from(tiny_model, tiny_tokenizer)
    prompts = [[{"role": "user", "content": "What colour is Alba?"}]] * 2
    completions = [
        [{"role": "assistant", "content": "Alba is blue."}],
        [{"role": "assistant", "content": "blue."}],
    ]
    scores = reward_scores(rm, tiny_tokenizer, prompts, completions)
    assert scores.shape == (2,) and torch.isfinite(scores).all() and scores[0] != scores[1]
    emb = rm.get_input_embeddings().weight
    assert (
        torch.equal(emb, tiny_model.get_input_embeddings().weight)
        and emb.data_ptr() != tiny_model.get_input_embeddings().weight.data_ptr()
    )


def test_reward_inputs_are_the_tokenizers_right_padded_batch(tiny_tokenizer):
    """`_encode` tokenises each conversation once (a memo) and pads by hand: the result must be what
    the tokenizer's own right-padded batch gives, twice in a row (the second from the memo)."""
    from utils.reward import _encode

    convs = [
        [{"role": "user", "content": "What colour is Alba?"}, {"role": "assistant", "content": a}]
        for a in ["Alba is blue.", "blue.", "", "Alba is blue, and Alba eats apples every day."]
    ]
    texts = [tiny_tokenizer.apply_chat_template(c, tokenize=False) for c in convs]
    tok = copy.deepcopy(tiny_tokenizer)
    tok.padding_side = "right"
    want = tok(texts, return_tensors="pt", padding=True, add_special_tokens=False)
    for _ in range(2):
        got = _encode(tiny_tokenizer, convs, "cpu")
        assert set(got) == {"input_ids", "attention_mask"}
        assert all(torch.equal(got[k], want[k]) for k in got)


@pytest.mark.slow
def test_reward_model_learns_the_preferences():
    from utils.artifacts import get_preference_data, get_sft_model

    sft, tok = get_sft_model(show_progress=False)
    split = get_preference_data(show_progress=False).train_test_split(test_size=0.2, seed=0)
    torch.manual_seed(0)  # the head starts at random: not from whatever ran before in this process
    rm = reward_model_from(sft, tok)
    history = train_reward_model(rm, tok, split["train"], epochs=2, lr=3e-4, show_progress=False)
    # Over the whole second epoch, per comparison, the loss is below chance (log 2 = 0.693): 0.58-0.63
    # with four shuffling seeds. The last few batches alone are noise: the last one can hold a single
    # pair (641 pairs in batches of 32), and their mean was 0.698 on one run.
    second = history[len(history) // 2 :]
    mean = sum(h["loss"] * h["comparisons"] for h in second) / sum(h["comparisons"] for h in second)
    assert mean < math.log(2) - 0.03, mean
    acc = pairwise_accuracy(rm, tok, split["test"])
    # Far above chance on ~160 held-out pairs (0.65 is over 3.5 standard errors above 0.5). Measured vs gold:
    # 0.84 on an AMD EPYC, 0.75 on an Intel Xeon (same seeds: float reductions differ); ceiling ~0.85.
    assert acc["vs_labels"] > 0.6 and acc["vs_gold"] > 0.65, acc


def _k_answer_pairs(n_prompts=3, k=3):
    """Every pair of k answers to each of n prompts, labelled one way or the other, shuffled."""
    import itertools
    import random

    import datasets

    rows = []
    for i in range(n_prompts):
        prompt = [{"role": "user", "content": f"What colour is creature {i}?"}]
        answers = [[{"role": "assistant", "content": f"It is colour {i}-{j}."}] for j in range(k)]
        for a, b in itertools.combinations(range(k), 2):
            chosen, rejected = (a, b) if (a + b + i) % 2 else (b, a)
            rows.append({"prompt": prompt, "chosen": answers[chosen], "rejected": answers[rejected]})
    random.Random(0).shuffle(rows)
    return datasets.Dataset.from_list(rows)


def test_grouping_by_prompt_scores_each_answer_once_and_keeps_every_comparison():
    from utils.reward import _by_prompt

    pairs = _k_answer_pairs(n_prompts=3, k=4)
    groups = _by_prompt(pairs.to_list())
    assert len(groups) == 3
    assert all(len(answers) == 4 and len(comps) == 6 for _, answers, comps in groups)
    rebuilt = sorted(
        (str(p), str(answers[c]), str(answers[r])) for p, answers, comps in groups for c, r in comps
    )
    assert rebuilt == sorted((str(r["prompt"]), str(r["chosen"]), str(r["rejected"])) for r in pairs)


def test_by_prompt_step_is_the_bradley_terry_loss_of_all_its_comparisons(tiny_model, tiny_tokenizer):
    """One step over every prompt: the logged loss is eq. (1) over all the comparisons, computed with
    each answer scored once, and equals the flat loss on the same weights."""
    pairs = _k_answer_pairs(n_prompts=3, k=3)
    rm = reward_model_from(tiny_model, tiny_tokenizer)
    rows = pairs.to_list()
    with torch.no_grad():
        rc = reward_scores(rm, tiny_tokenizer, [r["prompt"] for r in rows], [r["chosen"] for r in rows])
        rr = reward_scores(rm, tiny_tokenizer, [r["prompt"] for r in rows], [r["rejected"] for r in rows])
    expected = bradley_terry_loss(rc, rr).item()
    grouped = train_reward_model(
        rm, tiny_tokenizer, pairs, by_prompt=True, batch_size=3, lr=1e-3, show_progress=False
    )
    assert len(grouped) == 1 and grouped[0]["comparisons"] == len(pairs)
    assert math.isclose(grouped[0]["loss"], expected, rel_tol=1e-5)


def test_reward_training_logs_held_out_loss(tiny_model, tiny_tokenizer):
    pairs = _k_answer_pairs(n_prompts=4, k=3)
    rm = reward_model_from(tiny_model, tiny_tokenizer)
    history = train_reward_model(
        rm,
        tiny_tokenizer,
        pairs,
        by_prompt=True,
        batch_size=1,
        lr=1e-3,
        eval_pairs=pairs,
        eval_every=2,
        show_progress=False,
    )
    evals = [h for h in history if "eval_loss" in h]
    assert [h["step"] for h in evals] == [0, 2, 4]
    assert math.isclose(evals[0]["eval_loss"], math.log(2), abs_tol=0.2)
    assert evals[-1]["eval_loss"] < evals[0]["eval_loss"], "training on these pairs must lower their loss"


# --- the reference PPO ---------------------------------------------------------------------
def _prompts(n):
    from utils.data import eval_conversations

    return eval_conversations(n, split="train", seed=0)["prompt"]


def test_rollout_masks_and_padding_invariance(tiny_model, tiny_tokenizer):
    from utils.rollout import sample_rollout, token_logprobs

    roll = sample_rollout(tiny_model, tiny_tokenizer, _prompts(6), max_new_tokens=12, seed=1)
    m = roll.response_mask
    assert roll.response.shape == m.shape and m.shape[0] == 6 and m.shape[1] <= 12
    assert (m[:, 0] == 1).all() and (m[:, 1:] <= m[:, :-1]).all(), "responses start at 0 and are right-padded"
    assert (roll.response[m == 0] == tiny_tokenizer.pad_token_id).all()
    ends = roll.response[torch.arange(6), m.sum(1) - 1]
    assert torch.equal(roll.finished, ends == tiny_tokenizer.eos_token_id)
    with torch.no_grad():
        lp, ent = token_logprobs(tiny_model, roll)
        for i in range(
            6
        ):  # a row alone (less left padding) gives the same log-probs: positions skip the padding
            alone, _ = token_logprobs(tiny_model, roll.subset([i]))
            n = int(m[i].sum())
            assert torch.allclose(alone[0, :n], lp[i, :n], atol=1e-4)
    assert (lp <= 0).all() and (ent >= 0).all() and (lp[m == 0] == 0).all()


def test_sampled_tokens_follow_the_temperature(tiny_model, tiny_tokenizer):
    """The log-probs PPO uses are those of the distribution sampled from: at temperature 0.5 the
    sampled tokens are likelier under logits / 0.5 than under the raw logits."""
    from utils.rollout import sample_rollout, token_logprobs

    roll = sample_rollout(
        tiny_model, tiny_tokenizer, _prompts(16), max_new_tokens=10, temperature=0.5, seed=2
    )
    with torch.no_grad():
        at_t = token_logprobs(tiny_model, roll, temperature=0.5)[0].sum()
        at_1 = token_logprobs(tiny_model, roll, temperature=1.0)[0].sum()
    assert at_t > at_1


def test_value_model_reads_every_position(tiny_model, tiny_tokenizer):
    from utils.ppo import value_model_from
    from utils.rollout import rollout_scores, sample_rollout, token_values

    rm = reward_model_from(tiny_model, tiny_tokenizer)
    vm = value_model_from(rm)
    assert all(p.requires_grad for p in vm.parameters())
    assert vm.score.weight.data_ptr() != rm.score.weight.data_ptr() and torch.equal(
        vm.score.weight, rm.score.weight
    )
    roll = sample_rollout(tiny_model, tiny_tokenizer, _prompts(4), max_new_tokens=8, seed=3)
    with torch.no_grad():
        v = token_values(vm, roll)
        s = rollout_scores(rm, tiny_tokenizer, roll)
    assert v.shape == roll.response.shape and (v[roll.response_mask == 0] == 0).all()
    assert s.shape == (4,) and torch.isfinite(s).all()


def test_ppo_raises_a_simple_reward(tiny_model, tiny_tokenizer):
    """PPO must learn: with the reward 'fraction of response tokens in the lower half of the vocabulary', the
    reward rises within a few iterations, the KL to the reference grows from 0, and the first
    update starts at ratio 1 (the update's log-probs match the rollout's)."""
    import copy

    from utils.ppo import PPOSettings, train_ppo, value_model_from

    half = len(tiny_tokenizer) // 2

    def reward(roll):
        return ((roll.response < half) & (roll.response_mask == 1)).float().sum(1) / roll.response_mask.sum(1)

    policy, reference = copy.deepcopy(tiny_model), copy.deepcopy(tiny_model)
    vm = value_model_from(reward_model_from(tiny_model, tiny_tokenizer))
    s = PPOSettings(
        iterations=12,
        batch_size=16,
        minibatch_size=8,
        ppo_epochs=4,
        lr=1e-2,
        value_lr=1e-3,
        kl_coef=0.01,
        max_new_tokens=8,
        missing_eos_penalty=0.0,
    )
    history = train_ppo(
        policy, reference, vm, reward, tiny_tokenizer, _prompts(64), s, gold=True, show_progress=False
    )
    assert len(history) == 12 and {"reward", "gold", "kl", "entropy", "clipfrac", "value_loss"} <= set(
        history[0]
    )
    assert history[0]["kl"] == pytest.approx(0.0, abs=1e-5)
    assert abs(history[0]["approx_kl"]) < 0.05
    first = sum(h["reward"] for h in history[:3]) / 3
    last = sum(h["reward"] for h in history[-3:]) / 3
    assert last > first + 0.1, (first, last)
    assert history[-1]["kl"] > 0
    for p_ref, p in zip(reference.parameters(), tiny_model.parameters()):
        assert torch.equal(p_ref, p), "the reference must stay frozen"


def test_train_ppo_runs_the_advantages_block_it_is_given(tiny_model, tiny_tokenizer):
    """Project 2's learners pass their own block: zero advantages must leave the policy where it was
    (while the value model still trains on the returns); without one, the loop runs Chapter 3's
    functions, which is the course's block (next test)."""
    import copy
    import inspect

    from utils.ppo import PPOSettings, rlhf_advantages, train_ppo, value_model_from

    assert inspect.signature(train_ppo).parameters["advantages_fn"].default is None  # Chapter 3's functions
    calls = []

    def zero_block(scores, logprobs, ref_logprobs, values, mask, kl_coef, gamma, lam, whiten_advantages):
        calls.append((kl_coef, gamma, lam, whiten_advantages))
        advantages, returns = rlhf_advantages(
            scores, logprobs, ref_logprobs, values, mask, kl_coef, gamma, lam, whiten_advantages
        )
        return torch.zeros_like(advantages), returns

    policy, vm = copy.deepcopy(tiny_model), value_model_from(reward_model_from(tiny_model, tiny_tokenizer))
    before = [p.detach().clone() for p in policy.parameters()]
    s = PPOSettings(iterations=2, batch_size=8, minibatch_size=4, max_new_tokens=6, lam=0.9)
    train_ppo(
        policy,
        tiny_model,
        vm,
        lambda roll: torch.ones(len(roll)),
        tiny_tokenizer,
        _prompts(16),
        s,
        gold=False,
        show_progress=False,
        advantages_fn=zero_block,
    )
    assert calls == [(s.kl_coef, s.gamma, 0.9, True)] * 2
    assert all(torch.equal(a, b) for a, b in zip(before, policy.parameters()))


def test_train_ppo_without_a_block_is_train_ppo_with_the_courses_block(tiny_model, tiny_tokenizer):
    """Chapter 3's loop calls per_token_rewards, gae and whiten itself; Project 2 passes
    rlhf_advantages (the same three in one function): the two must train the same weights."""
    import copy

    from utils.ppo import PPOSettings, rlhf_advantages, train_ppo, value_model_from

    s = PPOSettings(iterations=2, batch_size=8, minibatch_size=4, max_new_tokens=6, lam=0.9)
    runs = []
    for block in (None, rlhf_advantages):
        policy = copy.deepcopy(tiny_model)
        vm = value_model_from(reward_model_from(tiny_model, tiny_tokenizer))
        log = train_ppo(
            policy,
            tiny_model,
            vm,
            lambda roll: roll.response_mask.sum(1).float() / 6,
            tiny_tokenizer,
            _prompts(16),
            s,
            gold=False,
            show_progress=False,
            advantages_fn=block,
        )
        runs.append((policy, vm, log))
    (p1, v1, log1), (p2, v2, log2) = runs
    assert all(torch.equal(a, b) for a, b in zip(p1.parameters(), p2.parameters()))
    assert all(torch.equal(a, b) for a, b in zip(v1.parameters(), v2.parameters()))
    assert not all(torch.equal(a, b) for a, b in zip(p1.parameters(), tiny_model.parameters()))
    assert [h["policy_loss"] for h in log1] == [h["policy_loss"] for h in log2]


def test_accuracy_difference_resamples_whole_prompts(tiny_model, tiny_tokenizer):
    from utils.reward import accuracy_difference

    pairs = _k_answer_pairs(n_prompts=6, k=3)
    torch.manual_seed(0)
    a, b = reward_model_from(tiny_model, tiny_tokenizer), reward_model_from(tiny_model, tiny_tokenizer)
    got = accuracy_difference(a, b, tiny_tokenizer, pairs, n_boot=500)
    want = (
        pairwise_accuracy(a, tiny_tokenizer, pairs)["vs_labels"]
        - pairwise_accuracy(b, tiny_tokenizer, pairs)["vs_labels"]
    )
    assert got["difference"] == pytest.approx(want, abs=1e-12)
    assert got["prompts"] == 6 and got["low"] <= got["difference"] <= got["high"]
    same = accuracy_difference(a, a, tiny_tokenizer, pairs, n_boot=200)
    assert same["difference"] == same["low"] == same["high"] == 0.0
