"""Project 2's checkpoints accept what is on track and reject what is not, saying why."""

import copy

import numpy as np
import pandas as pd
import pytest

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
    with pytest.raises(CheckError, match="not yet on track|rejected"):  # a random head ranks at chance
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
