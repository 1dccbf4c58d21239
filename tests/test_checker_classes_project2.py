"""Project 2's checkpoints against the classes of learner mistakes that used to get through (#31):
options honoured one at a time, contracts stated but not checked (junk in the padding, a reproducible
draw and split, the held-out fraction), inputs too tame (scores in the hundreds, ties, five models),
shapes, and messages that pointed away from the bug. Each planted bug below passed the committed
checker, or failed it with a message that did not name the mistake; the references still pass."""

import itertools
import random

import numpy as np
import pandas as pd
import pytest
import torch

from utils.checks import (
    CheckError,
    check_preference_data,
    check_preference_pairs_run,
    check_rlhf_advantages,
    check_win_rate_matrix,
)
from utils.ppo import gae, per_token_rewards, rlhf_advantages, whiten


# --- Step 2: rlhf_advantages ------------------------------------------------------------------
def notebook_rlhf_advantages(
    scores, logprobs, ref_logprobs, values, mask, kl_coef, gamma, lam, whiten_advantages
):
    """The solution notebook's block (06_project2, Step 2), written out as a learner would."""
    mask = mask.to(values.dtype)
    rewards = -kl_coef * (logprobs - ref_logprobs) * mask
    last = mask.sum(1).long() - 1
    rewards[torch.arange(len(scores)), last] += scores
    values = values * mask
    advantages = torch.zeros_like(rewards)
    running = torch.zeros_like(scores, dtype=rewards.dtype)
    for t in reversed(range(rewards.shape[1])):
        next_value = values[:, t + 1] if t + 1 < rewards.shape[1] else 0.0
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        running = (delta + gamma * lam * running) * mask[:, t]
        advantages[:, t] = running
    returns = (advantages + values) * mask
    if whiten_advantages:
        mean = (advantages * mask).sum() / mask.sum()
        var = (((advantages - mean) * mask) ** 2).sum() / mask.sum()
        advantages = (advantages - mean) * torch.rsqrt(var + 1e-8) * mask
    return advantages, returns


def test_rlhf_advantages_accepts_the_reference_and_the_notebooks_solution(capsys):
    check_rlhf_advantages(rlhf_advantages)
    check_rlhf_advantages(notebook_rlhf_advantages)
    assert capsys.readouterr().out.count("[check passed]") == 2


def _gae_loop(rewards, values, mask, gamma, lam, mask_values=True, mask_running=True):
    values = values * mask if mask_values else values
    adv = torch.zeros_like(rewards)
    running = torch.zeros_like(rewards[:, 0])
    for t in reversed(range(rewards.shape[1])):
        following = values[:, t + 1] if t + 1 < rewards.shape[1] else 0.0
        running = rewards[:, t] + gamma * following - values[:, t] + gamma * lam * running
        running = running * mask[:, t] if mask_running else running
        adv[:, t] = running
    return adv * mask


def _whitened(adv, mask, white):
    return whiten(adv, mask) if white else adv


def mc_when_lam_is_one(scores, logprobs, ref_logprobs, values, mask, kl_coef, gamma, lam, whiten_advantages):
    """Class 1: lam = 1 taken as Monte-Carlo returns, rewards to go without gamma (gamma was only
    ever != 1 together with lam != 1)."""
    rewards = per_token_rewards(scores, logprobs, ref_logprobs, mask, kl_coef)
    if lam == 1:
        ret = rewards.flip(1).cumsum(1).flip(1) * mask
        adv = (ret - values) * mask
    else:
        adv, ret = gae(rewards, values, mask, gamma, lam)
    return _whitened(adv, mask, whiten_advantages), ret


def values_unmasked(scores, logprobs, ref_logprobs, values, mask, kl_coef, gamma, lam, whiten_advantages):
    """Class 2: a row's last token bootstraps from the value at the padding after it."""
    adv = _gae_loop(
        per_token_rewards(scores, logprobs, ref_logprobs, mask, kl_coef), values, mask, gamma, lam, False
    )
    return _whitened(adv, mask, whiten_advantages), (adv + values) * mask


def kl_unmasked(scores, logprobs, ref_logprobs, values, mask, kl_coef, gamma, lam, whiten_advantages):
    """Class 2: the KL term on padding tokens, carried back into the answer by an unmasked recursion."""
    rewards = -kl_coef * (logprobs - ref_logprobs)
    rewards[torch.arange(len(scores)), mask.sum(1).long() - 1] += scores
    adv = _gae_loop(rewards, values, mask, gamma, lam, mask_running=False)
    return _whitened(adv, mask, whiten_advantages), (adv + values) * mask


def returns_unmasked(scores, logprobs, ref_logprobs, values, mask, kl_coef, gamma, lam, whiten_advantages):
    """Class 2: returns = A + V with V's padding left in."""
    adv, _ = gae(per_token_rewards(scores, logprobs, ref_logprobs, mask, kl_coef), values, mask, gamma, lam)
    return _whitened(adv, mask, whiten_advantages), adv + values


def scores_clipped(scores, logprobs, ref_logprobs, values, mask, kl_coef, gamma, lam, whiten_advantages):
    """Class 3: DeepSpeed-Chat's reward clipping at +-5, invisible on scores near 1."""
    return notebook_rlhf_advantages(
        scores.clamp(-5, 5), logprobs, ref_logprobs, values, mask, kl_coef, gamma, lam, whiten_advantages
    )


def transposed(*args):
    adv, ret = notebook_rlhf_advantages(*args)
    return adv.T, ret.T


def swapped(*args):
    adv, ret = notebook_rlhf_advantages(*args)
    return ret, adv


def whitened_by_row(scores, logprobs, ref_logprobs, values, mask, kl_coef, gamma, lam, whiten_advantages):
    adv, ret = gae(per_token_rewards(scores, logprobs, ref_logprobs, mask, kl_coef), values, mask, gamma, lam)
    if whiten_advantages:
        n = mask.sum(1, keepdim=True)
        mean = (adv * mask).sum(1, keepdim=True) / n
        var = ((adv - mean) * mask).pow(2).sum(1, keepdim=True) / n
        adv = (adv - mean) / torch.sqrt(var + 1e-8) * mask
    return adv, ret


def nan_padding(scores, logprobs, ref_logprobs, values, mask, kl_coef, gamma, lam, whiten_advantages):
    """NaN as the padding fill, for nanmean, never set back to 0."""
    adv, ret = gae(per_token_rewards(scores, logprobs, ref_logprobs, mask, kl_coef), values, mask, gamma, lam)
    if whiten_advantages:
        x = adv.masked_fill(mask == 0, float("nan"))
        adv = (x - x.nanmean()) / (((x - x.nanmean()) ** 2).nanmean().sqrt() + 1e-8)
    return adv, ret


def discounted_returns(scores, logprobs, ref_logprobs, values, mask, kl_coef, gamma, lam, whiten_advantages):
    rewards = per_token_rewards(scores, logprobs, ref_logprobs, mask, kl_coef)
    adv, _ = gae(rewards, values, mask, gamma, lam)
    ret, later = torch.zeros_like(rewards), torch.zeros_like(scores)
    for t in reversed(range(rewards.shape[1])):
        later = (rewards[:, t] + gamma * later) * mask[:, t]
        ret[:, t] = later
    return _whitened(adv, mask, whiten_advantages), ret


def _score_placed(where):
    def block(scores, logprobs, ref_logprobs, values, mask, kl_coef, gamma, lam, whiten_advantages):
        rewards = -kl_coef * (logprobs - ref_logprobs) * mask
        rows, last = torch.arange(len(scores)), mask.sum(1).long() - 1
        if where == "first":
            rewards[:, 0] += scores
        elif where == "one early":
            rewards[rows, (last - 1).clamp(min=0)] += scores
        elif where == "overwrites":
            rewards[rows, last] = scores
        adv, ret = gae(rewards, values, mask, gamma, lam)
        return _whitened(adv, mask, whiten_advantages), ret

    return block


def gamma_left_out_of_delta(
    scores, logprobs, ref_logprobs, values, mask, kl_coef, gamma, lam, whiten_advantages
):
    rewards = per_token_rewards(scores, logprobs, ref_logprobs, mask, kl_coef)
    adv = _gae_loop(rewards, values, mask, 1.0, gamma * lam)  # delta_t = r_t + V_{t+1} - V_t
    return _whitened(adv, mask, whiten_advantages), (adv + values) * mask


def zeros(scores, logprobs, ref_logprobs, values, mask, kl_coef, gamma, lam, whiten_advantages):
    return torch.zeros_like(logprobs), torch.zeros_like(logprobs)


@pytest.mark.parametrize(
    "fn, message",
    [
        # passed the committed checker
        (mc_when_lam_is_one, r"gamma=0\.9, lam=1\.0.*`gamma` is ignored"),
        (values_unmasked, "padding of `values` is 0, wrong when it holds"),
        (kl_unmasked, "padding of `logprobs` and `ref_logprobs`"),
        (returns_unmasked, r"padding positions \(mask 0\) must get advantage and return 0 \(your returns"),
        (scores_clipped, "clips or rescales the scores"),
        # failed it, with a message that did not name the mistake
        (transposed, r"expected \(3, 5\).*it is transposed"),
        (swapped, r"the pair is the wrong way round: return \(advantages, returns\)"),
        (whitened_by_row, "not row by row"),
        (nan_padding, "NaN or inf at padding positions"),
        (discounted_returns, "not the discounted sum of rewards"),
        (_score_placed("first"), r"\*last\* token \(the end token"),
        (_score_placed("one early"), "one token early"),
        (_score_placed("overwrites"), r"\*plus\* the score - add the score, do not overwrite"),
        (gamma_left_out_of_delta, "each answer's last token gets the right return"),
        (zeros, "the advantages and the returns are both wrong"),
    ],
)
def test_rlhf_advantages_rejects(fn, message):
    with pytest.raises(CheckError, match=message):
        check_rlhf_advantages(fn)


# --- Step 5: the win-rate matrix --------------------------------------------------------------
def notebook_win_rate_matrix(scores: dict) -> pd.DataFrame:
    names = list(scores)
    s = {n: np.asarray(v, float) for n, v in scores.items()}
    rows = [[float(np.mean((s[a] > s[b]) + 0.5 * (s[a] == s[b]))) for b in names] for a in names]
    return pd.DataFrame(rows, index=names, columns=names)


def test_win_rate_matrix_accepts_the_notebooks_solution(capsys):
    check_win_rate_matrix(notebook_win_rate_matrix)
    assert "[check passed]" in capsys.readouterr().out


def ties_left_out(scores):
    names = list(scores)
    rows = []
    for a in names:
        row = []
        for b in names:
            decided = scores[a] != scores[b]
            row.append(np.mean(scores[a][decided] > scores[b][decided]) if decided.any() else 0.5)
        rows.append(row)
    return pd.DataFrame(rows, index=names, columns=names)


def sorted_names(scores):
    return notebook_win_rate_matrix({n: scores[n] for n in sorted(scores)})


def nan_diagonal(scores):
    m = notebook_win_rate_matrix(scores).to_numpy(copy=True)
    np.fill_diagonal(m, np.nan)
    return pd.DataFrame(m, index=list(scores), columns=list(scores))


def at_least(scores):
    names = list(scores)
    return pd.DataFrame(
        [[np.mean(scores[a] >= scores[b]) for b in names] for a in names], index=names, columns=names
    )


def across_prompts(scores):
    names = list(scores)

    def rate(x, y):
        return np.mean((x[:, None] > y[None, :]) + 0.5 * (x[:, None] == y[None, :]))

    return pd.DataFrame(
        [[rate(scores[a], scores[b]) for b in names] for a in names], index=names, columns=names
    )


def per_prompt(scores):
    first = scores[next(iter(scores))]
    return pd.DataFrame([(s > first) + 0.5 * (s == first) for s in scores.values()], index=list(scores))


@pytest.mark.parametrize(
    "bug, message",
    [
        # passed the committed checker (three models, named in alphabetical order, few ties)
        (ties_left_out, "on 5 models on 8 prompts, with ties: ties are left out of the mean"),
        (sorted_names, r"in order \['SFT', 'DPO'"),
        # failed it, with a message that did not name the mistake
        (nan_diagonal, r"\[a, a\] = 0\.5 \(NaN there is 0 / 0"),
        (at_least, r"a tie counts as a whole win for both models \(>=\)"),
        (across_prompts, "compares every answer of a with every answer of b"),
        (per_prompt, "expected 3 x 3, one row and one column per model - it has one entry per prompt"),
    ],
)
def test_win_rate_matrix_rejects(bug, message):
    with pytest.raises(CheckError, match=message):
        check_win_rate_matrix(bug)


# --- Step 0: the preference pairs -------------------------------------------------------------
@pytest.fixture(scope="module")
def world():
    from utils.world import make_world

    return make_world()


@pytest.fixture(scope="module")
def dialogues():
    from utils.data import dialogue_conversations

    train = list(dialogue_conversations(150, split="train", seed=5)["prompt"])
    return train, list(dialogue_conversations(200, split="test", seed=0)["prompt"])


def _maker(world, rng=random.Random, pairs_of=itertools.combinations, same=False, label_seed=None):
    """A `make_preference_pairs` whose "SFT model" is TinyWorld's annotators: k answers per dialogue
    from ``rng(seed)``, every pair of them (``pairs_of``), labelled by ``label_pairs``."""
    from utils.data import label_pairs
    from utils.world import annotate, parse_request

    def make_preference_pairs(sft_model, tokenizer, dialogues, k, seed):
        draw = rng(seed)
        convs, a, b = [], [], []
        for conv in dialogues:
            answers = [annotate(world, parse_request(conv, world), draw)[1] for _ in range(k)]
            answers = [answers[0]] * k if same else answers  # one seed for all k draws
            for x, y in pairs_of(answers, 2):
                convs.append(conv)
                a.append(x)
                b.append(y)
        return label_pairs(convs, a, b, seed=seed if label_seed is None else label_seed(), world=world)

    return make_preference_pairs


def _fresh_rng():
    """A new random stream on every call, whatever the seed (a draw from the global random state)."""
    streams = itertools.count(1000)
    return lambda seed: random.Random(next(streams))


def split_by_prompt(pairs, held_fraction, seed):
    key = [tuple(m["content"] for m in p) for p in pairs["prompt"]]
    order = sorted(set(key))
    random.Random(seed).shuffle(order)
    held = set(order[: round(held_fraction * len(order))])
    return (
        pairs.select([i for i, d in enumerate(key) if d not in held]),
        pairs.select([i for i, d in enumerate(key) if d in held]),
    )


_SPLIT_SEEDS = itertools.count(1)  # a split that ignores its seed for the global random state's


def _run(make, split, dialogues):
    train, test = dialogues
    return check_preference_pairs_run(make, split, None, None, train, test, k=3, seed=9, min_pairs=100)


def test_preference_pairs_run_accepts_a_right_pipeline(world, dialogues, capsys):
    train, held = _run(_maker(world), split_by_prompt, dialogues)
    assert len(train) >= 100 and len(held) > 0
    assert "on track" in capsys.readouterr().out


@pytest.mark.parametrize(
    "make, split, message",
    [
        # passed the committed checker
        (
            dict(rng=_fresh_rng()),
            None,
            r"drew different answers in two calls with the same seed \(9\)",
        ),
        (dict(label_seed=itertools.count().__next__), None, "labelled the same answers differently"),
        (dict(pairs_of=itertools.permutations), None, "more than the 3 that k = 3 answers give"),
        ({}, lambda p, f, s: split_by_prompt(p, 0.2, s), r"\(20%\), but held_fraction = 0\.1 asks for about"),
        (
            {},
            lambda p, f, s: split_by_prompt(p, f, next(_SPLIT_SEEDS)),
            "held out different dialogues in two calls",
        ),
        # failed it, with a message that did not name the mistake
        (dict(same=True), None, r"returned no pairs.*sampled greedily, or with one seed for all k draws"),
        (
            {},
            lambda p, f, s: split_by_prompt(p, f, s)[::-1],
            r"\(90%\).*are \(train, held\) the wrong way round",
        ),
    ],
)
def test_preference_pairs_run_rejects(world, dialogues, make, split, message):
    with pytest.raises(CheckError, match=message):
        _run(_maker(world, **make), split or split_by_prompt, dialogues)


@pytest.fixture(scope="module")
def step0(world, dialogues):
    pairs = _maker(world)(None, None, dialogues[0], 3, 9)
    return (*split_by_prompt(pairs, 0.1, 0), dialogues[1])


def _swap(ds):
    return ds.map(lambda r: {"chosen": r["rejected"], "rejected": r["chosen"]})


@pytest.mark.parametrize(
    "plant, message",
    [  # all failed the committed checker with "only N training pairs ... sample more"
        (
            lambda tr, he: (_swap(tr).select(range(60)), _swap(he).select(range(8))),
            "chosen and rejected swapped",
        ),
        (lambda tr, he: (tr.select([]), he), r"`train_pairs` is empty and `held_pairs` holds all"),
        (
            lambda tr, he: (he, tr),
            r"only \d+ training pairs.*held out.*are \(train, held\) the wrong way round",
        ),
    ],
)
def test_preference_data_names_what_is_wrong_before_asking_for_more(step0, plant, message):
    train, held, test = step0
    bad_train, bad_held = plant(train, held)
    with pytest.raises(CheckError, match=message):
        check_preference_data(bad_train, bad_held, test, min_pairs=100)


def test_the_notebooks_pair_maker_is_reproducible_on_a_real_model(tiny_model, tiny_tokenizer, dialogues):
    """The seeded draw the notebook's solution makes passes the reproducibility check (on this
    machine's device); the same maker with one seed for all k draws makes no pairs at all."""
    from utils.checks.project2 import _reproducible_pairs
    from utils.data import label_pairs
    from utils.models import generate_responses

    def make_preference_pairs(sft_model, tokenizer, dialogues, k=4, seed=0, one_seed=False):
        samples = [
            generate_responses(
                sft_model, tokenizer, dialogues, do_sample=True, seed=seed + (0 if one_seed else j)
            )
            for j in range(k)
        ]
        convs, a, b = [], [], []
        for i, conversation in enumerate(dialogues):
            for x, y in itertools.combinations(range(k), 2):
                convs.append(conversation)
                a.append(samples[x][i].text)
                b.append(samples[y][i].text)
        return label_pairs(convs, a, b, seed=seed)

    _reproducible_pairs(
        make_preference_pairs, "make_preference_pairs", tiny_model, tiny_tokenizer, dialogues[0][:16], 3, 9
    )
    assert len(make_preference_pairs(tiny_model, tiny_tokenizer, dialogues[0][:4], 3, 9, one_seed=True)) == 0


# --- the learner's decisions: the reward model kept, DPO's beta, and the sweep behind it ---------
def test_reward_model_choice_accepts_what_the_evidence_allows(capsys):
    from utils.checks import check_reward_model_choice

    tied = {"difference": 0.01, "low": -0.06, "high": 0.07}
    assert check_reward_model_choice(lambda gain: True, tied) is True
    assert check_reward_model_choice(lambda gain: False, tied) is False
    assert "the evidence allows this choice" in capsys.readouterr().out


@pytest.mark.parametrize(
    "choice, gain, message",
    [
        (None, {"difference": 0.0, "low": -0.1, "high": 0.1}, "not implemented yet"),
        ("yes", {"difference": 0.0, "low": -0.1, "high": 0.1}, "True or False"),
        (False, {"difference": 0.1, "low": 0.02, "high": 0.18}, "by-prompt one is the more accurate"),
        (True, {"difference": -0.1, "low": -0.18, "high": -0.02}, "flat one is the more accurate"),
    ],
)
def test_reward_model_choice_rejects(choice, gain, message):
    from utils.checks import check_reward_model_choice

    with pytest.raises(CheckError, match=message):
        check_reward_model_choice(_deciding(choice), gain)


def _deciding(choice):
    """A learner's decision function returning ``choice`` (None: the student notebook's stub)."""

    def decide(evidence):
        if choice is None:
            raise NotImplementedError()
        return choice

    return decide


def _sweep(gold):
    """A validation sweep's table: {beta: [gold of each seed]}, KL falling with beta."""
    return pd.DataFrame(
        [
            {"β": b, "seed": s, "gold": g, "win vs SFT": 0.6, "KL to SFT": 1.0 / b + s}
            for b, golds in gold.items()
            for s, g in enumerate(golds)
        ]
    )


def test_beta_choice_accepts_any_beta_within_the_seeds_spread(capsys):
    from utils.checks import check_beta_choice

    sweep = _sweep({0.1: [0.08, 0.09, 0.10], 0.3: [0.08, 0.10, 0.12]})
    assert check_beta_choice(_deciding(0.1), sweep) == 0.1
    assert check_beta_choice(_deciding(0.3), sweep) == 0.3
    assert "defend it in the discussion" in capsys.readouterr().out


def test_beta_choice_with_one_seed_has_no_spread_to_judge_by(capsys):
    from utils.checks import check_beta_choice

    sweep = _sweep({0.1: [0.01], 0.3: [0.10]})  # the hub profile sweeps one seed
    assert check_beta_choice(_deciding(0.1), sweep) == 0.1
    assert "no spread to judge by" in capsys.readouterr().out


@pytest.mark.parametrize(
    "beta, message",
    [
        (None, "not implemented yet"),
        (0.2, r"was not swept: choose one of \[0.1, 0.3\]"),
        (0.1, "below beta = 0.3 .* by more than"),
    ],
)
def test_beta_choice_rejects(beta, message):
    from utils.checks import check_beta_choice

    sweep = _sweep({0.1: [0.01, 0.02, 0.03], 0.3: [0.10, 0.11, 0.12]})
    with pytest.raises(CheckError, match=message):
        check_beta_choice(_deciding(beta), sweep)


def _align(ignore=None):
    """A learner's align_dpo, right or with one planted bug."""
    import copy

    from utils.dpo import train_dpo

    def align_dpo(sft_model, tokenizer, pairs, beta, seed=0, ref_cache=None):
        if ignore == "training":
            return sft_model
        policy = copy.deepcopy(sft_model)
        train_dpo(
            policy,
            sft_model,
            tokenizer,
            pairs,
            beta=0.1 if ignore == "beta" else beta,
            lr=1e-3,
            batch_size=4,
            seed=0 if ignore == "seed" else seed,
            show_progress=False,
            ref_cache=None if ignore == "cache" else ref_cache,
        )
        return policy.eval()

    return align_dpo


@pytest.fixture(scope="module")
def sweep_inputs(tiny_model, tiny_tokenizer):
    from utils.data import annotator_preferences, dialogue_conversations

    pairs = annotator_preferences(16).select(range(8))
    conversations = list(dialogue_conversations(8, split="train", seed=3)["prompt"])
    return tiny_model, tiny_tokenizer, pairs, conversations


def test_dpo_sweep_runs_every_beta_and_seed(sweep_inputs, capsys):
    from utils.checks import check_dpo_sweep

    sweep, first = check_dpo_sweep(_align(), *sweep_inputs, betas=(0.1, 0.3), seeds=(0, 1))
    assert len(sweep) == 4 and set(first) == {0.1, 0.3}
    assert {"β", "seed", "gold", "win vs SFT", "KL to SFT", "seconds"} <= set(sweep.columns)
    assert "4 runs (2 beta x 2 seeds)" in capsys.readouterr().out


@pytest.mark.parametrize(
    "ignore, message",
    [
        ("training", "returned its starting model unchanged"),
        ("cache", "left `ref_cache` empty"),
        ("beta", "the same model at every beta"),
        ("seed", "the same model in every seed"),
    ],
)
def test_dpo_sweep_rejects(sweep_inputs, ignore, message):
    from utils.checks import check_dpo_sweep

    with pytest.raises(CheckError, match=message):
        check_dpo_sweep(_align(ignore), *sweep_inputs, betas=(0.1, 0.3), seeds=(0, 1))
