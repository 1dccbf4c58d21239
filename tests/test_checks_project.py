"""Project 2's checkpoints accept what is on track and reject what is not, saying why."""

import copy

import numpy as np
import pandas as pd
import pytest
import torch

from utils.checks import CheckError, check_policy_run, check_reward_model_run, check_win_rate_matrix
from utils.data import annotator_preferences, eval_conversations
from utils.reward import reward_model_from


def good_matrix(scores):
    names = list(scores)
    return pd.DataFrame(
        [[np.mean((scores[a] > scores[b]) + 0.5 * (scores[a] == scores[b])) for b in names] for a in names],
        index=names,
        columns=names,
    )


def test_win_rate_matrix():
    check_win_rate_matrix(good_matrix)


@pytest.mark.parametrize(
    "bug, message",
    [
        (lambda s: good_matrix(s).T, "transposed"),
        (
            lambda s: pd.DataFrame(
                [[np.mean(s[a] > s[b]) for b in s] for a in s], index=list(s), columns=list(s)
            ),
            "ties",
        ),
        (lambda s: good_matrix(s).to_numpy(), "DataFrame"),
        (lambda s: good_matrix(s).reset_index(drop=True), "rows and columns"),
    ],
)
def test_win_rate_matrix_rejects(bug, message):
    with pytest.raises(CheckError, match=message):
        check_win_rate_matrix(bug)


def test_reward_model_run_rejects_an_untrained_or_wrong_model(tiny_model, tiny_tokenizer):
    pairs = annotator_preferences(64)
    with pytest.raises(CheckError, match="one-number head"):
        check_reward_model_run(lambda m, t, p: m, tiny_model, tiny_tokenizer, pairs, pairs)
    # a random head ranks at chance - on 64 pairs, anywhere from 0.3 to 0.66 depending on its
    # initialisation (global RNG): seeded, so that the test does not depend on the tests before it
    torch.manual_seed(0)
    with pytest.raises(CheckError, match="not yet on track|rejected"):
        check_reward_model_run(
            lambda m, t, p: reward_model_from(m, t), tiny_model, tiny_tokenizer, pairs, pairs
        )


def test_policy_run_rejects_an_unchanged_or_wrong_return(tiny_model, tiny_tokenizer):
    prompts = eval_conversations(8, split="test", seed=0, dialogues=1.0)["prompt"]
    kw = dict(start=tiny_model, tokenizer=tiny_tokenizer, conversations=prompts)
    with pytest.raises(CheckError, match="unchanged"):
        check_policy_run(lambda m: m, tiny_model, **kw)
    with pytest.raises(CheckError, match="unchanged"):
        check_policy_run(lambda m: copy.deepcopy(m), tiny_model, **kw)
    with pytest.raises(CheckError, match="trained language model"):
        check_policy_run(lambda m: None, tiny_model, **kw)


def test_a_smoke_test_checks_structure_but_does_not_judge_outcomes(
    tiny_model, tiny_tokenizer, monkeypatch, capsys
):
    """COURSE_SMOKE=1 trains a handful of steps: wrong returns still fail, outcomes are not judged."""
    monkeypatch.setenv("COURSE_SMOKE", "1")
    pairs = annotator_preferences(64)
    with pytest.raises(CheckError, match="one-number head"):
        check_reward_model_run(lambda m, t, p: m, tiny_model, tiny_tokenizer, pairs, pairs)
    check_reward_model_run(lambda m, t, p: reward_model_from(m, t), tiny_model, tiny_tokenizer, pairs, pairs)
    assert "a smoke test, so not judged" in " ".join(
        capsys.readouterr().out.split()
    )  # a random head ranks at chance
    prompts = eval_conversations(8, split="test", seed=0, dialogues=1.0)["prompt"]
    kw = dict(start=tiny_model, tokenizer=tiny_tokenizer, conversations=prompts)
    with pytest.raises(CheckError, match="unchanged"):
        check_policy_run(lambda m: copy.deepcopy(m), tiny_model, **kw)
    other = copy.deepcopy(tiny_model)
    with torch.no_grad():
        for p in other.parameters():
            p.add_(torch.randn_like(p))  # a much worse model
    assert check_policy_run(lambda m: other, tiny_model, **kw) is other
    assert "not judged" in capsys.readouterr().out


@pytest.mark.slow
def test_policy_run_rejects_a_worse_model_and_accepts_a_better_one():
    """The base model (which never ends its turn) is worse than SFT; SFT is better than the base model."""
    from utils.artifacts import get_base_model, get_sft_model

    sft, tok = get_sft_model(show_progress=False)
    base, _ = get_base_model(show_progress=False)
    prompts = eval_conversations(64, split="test", seed=0, dialogues=1.0)["prompt"]
    with pytest.raises(CheckError, match="worse than where it started"):
        check_policy_run(lambda: base, start=sft, tokenizer=tok, conversations=prompts)
    assert check_policy_run(lambda: sft, start=base, tokenizer=tok, conversations=prompts, max_kl=None) is sft
    with pytest.raises(CheckError, match="drifted"):
        check_policy_run(lambda: sft, start=base, tokenizer=tok, conversations=prompts, max_kl=0.5)


# --- Step 0: the learner's preference data ---------------------------------------------------
def _pairs(n_dialogues=150, per_dialogue=3, seed=5):
    """Annotators' answers to training dialogues, every pair of a dialogue's answers labelled."""
    import itertools
    import random

    from utils.data import dialogue_conversations, label_pairs
    from utils.world import annotate, make_world, parse_request

    world, rng = make_world(), random.Random(seed)
    convs, a, b = [], [], []
    for conv in dialogue_conversations(n_dialogues, split="train", seed=seed)["prompt"]:
        answers = [annotate(world, parse_request(conv, world), rng)[1] for _ in range(per_dialogue)]
        for x, y in itertools.combinations(answers, 2):
            convs.append(conv)
            a.append(x)
            b.append(y)
    return label_pairs(convs, a, b, seed=seed)


def _split(pairs, held_fraction=0.1):
    keys = [tuple(m["content"] for m in p) for p in pairs["prompt"]]
    held = set(sorted(set(keys))[: round(held_fraction * len(set(keys)))])
    return (
        pairs.select([i for i, k in enumerate(keys) if k not in held]),
        pairs.select([i for i, k in enumerate(keys) if k in held]),
    )


@pytest.fixture(scope="module")
def step0():
    from utils.data import dialogue_conversations

    pairs = _pairs()
    train, held = _split(pairs)
    return pairs, train, held, list(dialogue_conversations(200, split="test", seed=0)["prompt"])


def test_preference_data_accepts_noisy_labels_split_by_prompt(step0, capsys):
    from utils.checks import check_preference_data

    _, train, held, test = step0
    check_preference_data(train, held, test, min_pairs=100)
    out = capsys.readouterr().out
    assert "annotators this noisy" in out and "on track" in out


def _swap(ds):
    return ds.map(lambda r: {"chosen": r["rejected"], "rejected": r["chosen"]})


def _by_gold(ds):
    from utils.judge import score

    def fix(r):
        c, j = r["chosen"][0]["content"], r["rejected"][0]["content"]
        if score(r["prompt"], c) < score(r["prompt"], j):
            return {"chosen": r["rejected"], "rejected": r["chosen"]}
        return {}

    return ds.map(fix)


def _leak(ds, test):
    rows = ds.to_list()
    rows[0]["prompt"] = test[0]
    return type(ds).from_list(rows)


def _random_split(pairs):
    s = pairs.train_test_split(test_size=0.1, seed=0)
    return s["train"], s["test"]


def _with_ties(seed=5):
    import itertools
    import random

    from utils.data import dialogue_conversations, label_pairs
    from utils.world import annotate, make_world, parse_request

    world, rng = make_world(), random.Random(seed)
    convs, a, b = [], [], []
    for conv in dialogue_conversations(150, split="train", seed=seed)["prompt"]:
        answers = [annotate(world, parse_request(conv, world), rng)[1] for _ in range(3)]
        for x, y in itertools.combinations(answers, 2):
            convs += [conv]
            a += [x]
            b += [y]
    return label_pairs(convs, a, b, seed=seed, drop_ties=False)


@pytest.mark.parametrize(
    "plant, message",
    [
        (lambda p, tr, he, te: (tr.remove_columns("chosen"), he), "columns"),
        (lambda p, tr, he, te: (_swap(tr), _swap(he)), "swapped"),
        (lambda p, tr, he, te: (_by_gold(tr), _by_gold(he)), "more than noisy"),
        (lambda p, tr, he, te: (_leak(tr, te), he), "evaluation set"),
        (lambda p, tr, he, te: _random_split(p), "both sides"),
        (lambda p, tr, he, te: _split(p, 0.5), "held out"),
        (lambda p, tr, he, te: _split(_with_ties(), 0.1), "ties"),
        (lambda p, tr, he, te: (tr.select(range(50)), he), "only 50"),
        (lambda p, tr, he, te: (tr, he.select([])), "empty"),
        (
            lambda p, tr, he, te: (
                tr.map(lambda r: {"rejected": r["chosen"]}),
                he,
            ),
            "same answer",
        ),
        (
            lambda p, tr, he, te: (
                tr.map(lambda r: {"prompt": r["prompt"][:-1]}),
                he,
            ),
            "end with the user",
        ),
    ],
)
def test_preference_data_rejects(step0, plant, message):
    from utils.checks import check_preference_data

    pairs, train, held, test = step0
    bad_train, bad_held = plant(pairs, train, held, test)
    with pytest.raises(CheckError, match=message):
        check_preference_data(bad_train, bad_held, test, min_pairs=100)


def test_preference_data_rejects_plain_strings(step0):
    from datasets import Dataset

    from utils.checks import check_preference_data

    _, train, held, test = step0
    flat = Dataset.from_list(
        [
            {
                "prompt": r["prompt"],
                "chosen": r["chosen"][0]["content"],
                "rejected": r["rejected"][0]["content"],
            }
            for r in train.to_list()
        ]
    )
    with pytest.raises(CheckError, match="one assistant message"):
        check_preference_data(flat, held, test, min_pairs=100)


# --- Step 2: the learner's block of PPO ------------------------------------------------------
def test_rlhf_advantages_accepts_the_reference():
    from utils.checks import check_rlhf_advantages
    from utils.ppo import rlhf_advantages

    check_rlhf_advantages(rlhf_advantages)


def _block(rewards_fn=None, whiten_mode="right", returns_mode="right", lam_used=True, gamma_used=True):
    """The course's block with one planted bug."""
    import torch

    from utils.ppo import gae, per_token_rewards, whiten

    def fn(scores, logprobs, ref_logprobs, values, mask, kl_coef, gamma, lam, whiten_advantages):
        rewards = (rewards_fn or per_token_rewards)(scores, logprobs, ref_logprobs, mask, kl_coef)
        adv, ret = gae(rewards, values, mask, gamma if gamma_used else 1.0, lam if lam_used else 1.0)
        do = whiten_advantages if whiten_mode != "inverted" else not whiten_advantages
        if whiten_mode == "never":
            do = False
        if do:
            if whiten_mode == "padding":
                adv = (adv - adv.mean()) / (adv.std() + 1e-8)
            elif whiten_mode == "bessel":  # torch.std's default: squared deviations over n - 1
                m = mask.to(adv.dtype)
                mean = (adv * m).sum() / m.sum()
                adv = (adv - mean) / (((adv - mean) * m).pow(2).sum() / (m.sum() - 1) + 1e-8).sqrt() * m
            else:
                adv = whiten(adv, mask)
        if returns_mode == "whitened":
            ret = adv + values * mask
        elif returns_mode == "advantages":
            ret = adv
        elif returns_mode == "unmasked":
            ret = ret + (1 - mask) * torch.ones_like(ret)
        return adv, ret

    return fn


def _flipped(scores, lp, ref, mask, kl):
    from utils.ppo import per_token_rewards

    return per_token_rewards(scores, ref, lp, mask, kl)


def _no_kl(scores, lp, ref, mask, kl):
    from utils.ppo import per_token_rewards

    return per_token_rewards(scores, lp, ref, mask, 0.0)


def _last_column(scores, lp, ref, mask, kl):
    r = -kl * (lp - ref) * mask
    r[:, -1] += scores
    return r


@pytest.mark.parametrize(
    "fn, message",
    [
        (_block(rewards_fn=_flipped), "sign is flipped"),
        (_block(rewards_fn=_no_kl), "KL penalty is missing"),
        (_block(rewards_fn=_last_column), "last \\*column\\*"),
        (_block(whiten_mode="never"), "whitening is the wrong way round"),
        (_block(whiten_mode="inverted"), "whitening is the wrong way round"),
        (_block(whiten_mode="padding"), "not over the padding"),
        (_block(whiten_mode="bessel"), "population standard deviation"),
        (_block(returns_mode="whitened"), "before\\* whitening"),
        (_block(returns_mode="advantages"), "returns are the advantages"),
        (_block(returns_mode="unmasked"), "padding positions"),
        (_block(lam_used=False), "`lam` is ignored"),
        (_block(gamma_used=False), "`gamma` is ignored"),
        (lambda *a: a[0], "pair"),
    ],
)
def test_rlhf_advantages_rejects(fn, message):
    from utils.checks import check_rlhf_advantages

    with pytest.raises(CheckError, match=message):
        check_rlhf_advantages(fn)


# --- the reference run beside the learner's ---------------------------------------------------
def test_compare_with_reference_reads_the_recorded_run(tmp_path, capsys):
    import json

    from utils.checks import compare_with_reference

    table = pd.DataFrame(
        {"gold, sampled": [0.1, 0.3], "KL to SFT": [0.0, 0.4], "95% CI": ["[0.5, 0.5]", "[0.6, 0.7]"]},
        index=["SFT", "DPO"],
    )
    kinds = pd.DataFrame({"SFT": [-1.0, 0.9], "DPO": [-0.5, 0.95]}, index=["arithmetic", "fact"])
    records = tmp_path / "seed0.jsonl"
    rows = [
        {"notebook": "06_project2", "claim": "x", "values": {"DPO | gold, sampled": 0.25}},
        {"notebook": "04_dpo", "claim": "y", "values": {"DPO | KL to SFT": 9.0}},
    ]
    records.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    frame = compare_with_reference(table, kinds, records=records)
    assert frame.loc["DPO", "gold, sampled"] == "0.300 (0.250)"
    assert frame.loc["DPO", "KL to SFT"] == "0.400"  # another notebook's value is not the reference
    assert frame.loc["SFT", "arithmetic follow-ups, greedy gold"] == "-1.000"
    frame = compare_with_reference(table, records=tmp_path / "missing.jsonl")
    assert "No reference run" in capsys.readouterr().out and frame.loc["SFT", "gold, sampled"] == "0.100"


def test_preference_pairs_run_calls_the_learners_functions_and_checks_what_they_make(step0, capsys):
    from utils.checks import check_preference_pairs_run

    pairs, train, held, test = step0
    seen = {}

    def make(sft_model, tokenizer, dialogues, k, seed):
        seen["make"] = (sft_model, len(dialogues), k, seed)
        return pairs

    def split(p, held_fraction, seed):
        seen["split"] = (held_fraction, seed)
        return _split(p, held_fraction)

    got = check_preference_pairs_run(
        make, split, "sft", "tok", [[]] * 7, test, k=3, seed=9, split_seed=2, min_pairs=100
    )
    assert seen == {"make": ("sft", 7, 3, 9), "split": (0.1, 2)}
    assert [len(x) for x in got] == [len(train), len(held)]
    args = (make, split, None, None, [], test)
    with pytest.raises(CheckError, match="not implemented yet"):
        check_preference_pairs_run(_stub, split, None, None, [], test)
    with pytest.raises(CheckError, match="datasets.Dataset of pairs"):
        check_preference_pairs_run(lambda *a: pairs.to_list(), split, None, None, [], test)
    with pytest.raises(CheckError, match="a pair \\(train, held\\)"):
        check_preference_pairs_run(make, lambda p, f, s: p, None, None, [], test)
    with pytest.raises(CheckError, match="exactly one side"):
        check_preference_pairs_run(make, lambda p, f, s: (_split(p)[0], _split(p)[0]), None, None, [], test)
    capsys.readouterr()
    assert check_preference_pairs_run(*args, given=(train, held), min_pairs=100) == (train, held)
    assert "Step 0 is given" in capsys.readouterr().out


def _stub(*args):
    raise NotImplementedError()
