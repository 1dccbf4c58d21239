"""TinyWorld carries the whole pipeline: base -> SFT -> a little DPO on judge-labelled pairs.

The end-to-end proof the course stands on, on 800 held-out prompts (a quarter of them two-turn
dialogues):

* SFT beats the base model by a wide margin (greedy decoding: the base model never ends its turn);
* a short DPO run on on-policy pairs labelled by the *noisy* gold annotators raises the gold
  score of the policy's samples (temperature 1, i.e. the distribution DPO optimises), with a
  paired-bootstrap interval above 50 %, and removes most rude answers.

Greedy decoding hardly moves under such a short DPO run (about nine in ten greedy answers stay
the same, and the few that change are not yet better on average): it is printed, not asserted.
Chapter 4 studies it, with a beta sweep.
"""

import copy
import math

import pytest

from utils import data, evaluate
from utils.artifacts import get_base_model, get_sft_model
from utils.dpo import train_dpo
from utils.models import generate_responses

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def eval_set():
    return data.eval_conversations(800, split="test", seed=0, dialogues=0.25)


def _eval(model, tok, eval_set, **kw):
    return evaluate.evaluate(model, tok, eval_set["prompt"], kinds=eval_set["kind"], **kw)


def test_sft_then_dpo_raise_the_gold_score(eval_set):
    base, tok = get_base_model(show_progress=False)
    base_greedy = _eval(base, tok, eval_set)

    sft, tok = get_sft_model(show_progress=False)
    sft_greedy = _eval(sft, tok, eval_set)
    print(f"\ngreedy gold: base {base_greedy.gold.mean():.3f}  SFT {sft_greedy.gold.mean():.3f}")
    assert base_greedy.finished.mean() < 0.1
    assert sft_greedy.gold.mean() > base_greedy.gold.mean() + 1.0
    assert evaluate.win_rate(sft_greedy.gold, base_greedy.gold)["low"] > 0.8
    sft_sampled = _eval(sft, tok, eval_set, do_sample=True, seed=3)

    # on-policy pairs: two samples per training prompt, labelled by the noisy gold annotators
    prompts = data.eval_conversations(1500, split="train", seed=1, dialogues=0.2)["prompt"]
    a = generate_responses(sft, tok, prompts, do_sample=True, seed=1)
    b = generate_responses(sft, tok, prompts, do_sample=True, seed=2)
    pairs = data.label_pairs(
        prompts,
        [g.text for g in a],
        [g.text for g in b],
        seed=0,
        finished_a=[g.finished for g in a],
        finished_b=[g.finished for g in b],
    )
    assert len(pairs) > 500
    assert 0.7 < sum(pairs["label_correct"]) / len(pairs) < 0.95  # noisy, but informative

    history = train_dpo(
        sft, copy.deepcopy(sft), tok, pairs, beta=0.1, lr=5e-5, epochs=2, batch_size=32, show_progress=False
    )
    # the DPO loss starts at exactly log 2 (policy = reference); over the whole second epoch it is lower.
    # (One minibatch's loss against another's is noise: it failed on an Intel CPU, 0.727 vs 0.693.)
    assert history.loss[0] == pytest.approx(math.log(2), abs=1e-6)
    assert history.loss[len(history) // 2 :].mean() < math.log(2)
    dpo_sampled = _eval(sft, tok, eval_set, do_sample=True, seed=3)
    dpo_greedy = _eval(sft, tok, eval_set)
    result = evaluate.win_rate(dpo_sampled.gold, sft_sampled.gold)
    print(
        f"sampled gold: SFT {sft_sampled.gold.mean():.3f}  DPO {dpo_sampled.gold.mean():.3f}  "
        f"win rate {result}"
    )
    print(
        f"greedy gold after DPO {dpo_greedy.gold.mean():.3f} (ties with SFT: "
        f"{(dpo_greedy.gold == sft_greedy.gold).mean():.0%})"
    )
    print(f"rude (sampled): SFT {sft_sampled.rude.mean():.1%}  DPO {dpo_sampled.rude.mean():.1%}")
    assert dpo_sampled.gold.mean() > sft_sampled.gold.mean() + 0.1
    assert result["low"] > 0.5, result
    assert dpo_sampled.rude.mean() < sft_sampled.rude.mean() / 2


def test_the_results_table_keeps_its_numbers_numeric_so_that_it_rounds():
    """A book table is `results_table(...).round(3)`: built by columns and transposed, every column
    held objects and round(3) left 0.032063 as it was (seen in Chapter 3's and Project 2's tables)."""
    import pandas as pd

    def answers(golds):
        return pd.DataFrame({"gold": golds})

    stats = {"KL to SFT": 0.123456, "words": 5.4321}
    results = {
        "SFT": (answers([0.1234, -0.5, 1.0]), answers([0.3, 0.3, 0.3]), {**stats, "KL to SFT": 0.0}),
        "best-of-4": (answers([0.9876, 0.5, 1.0]), None, stats),  # no greedy answers
    }
    table = evaluate.results_table(results)
    assert list(table.index) == ["SFT", "best-of-4"]
    assert list(table.columns[:3]) == ["gold, sampled", "win vs SFT, sampled", "95% CI"]
    assert table["gold, sampled"].dtype.kind == "f" and table["KL to SFT"].dtype.kind == "f"
    rounded = table.round(3)
    assert rounded.loc["best-of-4", "KL to SFT"] == 0.123
    assert rounded.loc["SFT", "gold, sampled"] == pytest.approx(0.208)
    assert math.isnan(rounded.loc["best-of-4", "gold, greedy"])
    assert rounded.loc["SFT", "95% CI"] == "[0.500, 0.500]"
