"""Checkers must accept a correct answer and reject planted bugs with a message that names them;
plus the reference pieces they and later chapters rely on (SFT masking, DPO, win rates)."""

import copy
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from utils import data, dpo, evaluate, judge, logprobs, sft
from utils.checks import CheckError, check_next_token_loss, check_sample_next_token
from utils.tokenizer import ASSISTANT, END


# === check_next_token_loss =================================================================
def correct_loss(logits, input_ids):
    v = logits.size(-1)
    return F.cross_entropy(logits[:, :-1].reshape(-1, v), input_ids[:, 1:].reshape(-1), ignore_index=-100)


def no_shift(logits, input_ids):
    return F.cross_entropy(logits.reshape(-1, logits.size(-1)), input_ids.reshape(-1), ignore_index=-100)


def reversed_shift(logits, input_ids):
    v = logits.size(-1)
    return F.cross_entropy(logits[:, 1:].reshape(-1, v), input_ids[:, :-1].reshape(-1), ignore_index=-100)


def summed(logits, input_ids):
    v = logits.size(-1)
    return F.cross_entropy(
        logits[:, :-1].reshape(-1, v), input_ids[:, 1:].reshape(-1), ignore_index=-100, reduction="sum"
    )


def counts_ignored(logits, input_ids):
    v = logits.size(-1)
    targets = input_ids[:, 1:].reshape(-1).clamp(min=0)  # -100 turned into a real token id
    return F.cross_entropy(logits[:, :-1].reshape(-1, v), targets)


def divides_by_all_positions(logits, input_ids):
    v = logits.size(-1)
    targets = input_ids[:, 1:].reshape(-1)
    total = F.cross_entropy(logits[:, :-1].reshape(-1, v), targets, ignore_index=-100, reduction="sum")
    return total / targets.numel()


def per_token(logits, input_ids):
    v = logits.size(-1)
    return F.cross_entropy(
        logits[:, :-1].reshape(-1, v), input_ids[:, 1:].reshape(-1), ignore_index=-100, reduction="none"
    )


def detached(logits, input_ids):
    return correct_loss(logits, input_ids).detach()


def one_argument(logits):
    return logits.mean()


def loss_stub(logits, input_ids):
    # YOUR CODE HERE
    raise NotImplementedError()


def python_float(logits, input_ids):
    return correct_loss(logits, input_ids).item()


def nll_on_raw_logits(logits, input_ids):
    v = logits.size(-1)
    return F.nll_loss(logits[:, :-1].reshape(-1, v), input_ids[:, 1:].reshape(-1), ignore_index=-100)


def test_loss_checker_accepts_a_correct_loss(capsys):
    check_next_token_loss(correct_loss)
    assert "[check passed]" in capsys.readouterr().out


def test_loss_checker_accepts_the_reference():
    from utils.pretrain import next_token_loss

    check_next_token_loss(next_token_loss)


@pytest.mark.parametrize(
    "fn, message",
    [
        (no_shift, "did not shift"),
        (reversed_shift, "shifted the wrong way"),
        (summed, "summed the token losses"),
        (counts_ignored, r"ignored positions \(-100\) are counted"),
        (divides_by_all_positions, "divided by all positions"),
        (per_token, r"should return a scalar .* got shape \(\d+,\)"),
        (detached, r"not connected to the logits' graph .*\.detach\(\)"),
        (one_argument, "wrong signature"),
        (loss_stub, "not implemented yet"),
        (python_float, "should return a torch.Tensor, got float"),
        (nll_on_raw_logits, "raw logits to nll_loss"),
    ],
    ids=lambda x: x.__name__ if callable(x) else "",
)
def test_loss_checker_rejects_planted_bugs(fn, message):
    with pytest.raises(CheckError, match=message):
        check_next_token_loss(fn)


def test_loss_checker_rejects_a_non_function():
    with pytest.raises(CheckError, match="expected a function"):
        check_next_token_loss(3.0)


def test_loss_checker_gives_a_generic_hint_for_unknown_mistakes():
    def off_by_a_bit(logits, input_ids):
        return correct_loss(logits, input_ids) * 1.01

    with pytest.raises(CheckError, match=r"gave .* where transformers' loss gives .*compare your shift"):
        check_next_token_loss(off_by_a_bit)


# === check_sample_next_token ===============================================================
def _top_k(logits, k):
    kth = logits.topk(k, dim=-1).values[:, -1:]
    return logits.masked_fill(logits < kth, float("-inf"))


def _draw(logits, generator):
    return torch.multinomial(logits.softmax(-1), 1, generator=generator).squeeze(-1)


def correct_sampler(logits, temperature, top_k, generator):
    if temperature == 0:
        return logits.argmax(-1)
    scaled = logits / temperature
    if top_k is not None:
        scaled = _top_k(scaled, top_k)
    return _draw(scaled, generator)


def always_argmax(logits, temperature, top_k, generator):
    return logits.argmax(-1)


def multiplies_by_temperature(logits, temperature, top_k, generator):
    if temperature == 0:
        return logits.argmax(-1)
    scaled = logits * temperature
    return _draw(_top_k(scaled, top_k) if top_k else scaled, generator)


def ignores_temperature(logits, temperature, top_k, generator):
    if temperature == 0:
        return logits.argmax(-1)
    return _draw(_top_k(logits, top_k) if top_k else logits, generator)


def keeps_k_plus_1(logits, temperature, top_k, generator):
    if temperature == 0:
        return logits.argmax(-1)
    scaled = logits / temperature
    return _draw(_top_k(scaled, top_k + 1) if top_k else scaled, generator)


def keeps_k_plus_1_beyond_one(logits, temperature, top_k, generator):  # right at k=1, wrong beyond
    if temperature == 0:
        return logits.argmax(-1)
    scaled = logits / temperature
    return _draw(_top_k(scaled, top_k + 1 if top_k > 1 else 1) if top_k else scaled, generator)


def keeps_k_minus_1(logits, temperature, top_k, generator):
    if temperature == 0:
        return logits.argmax(-1)
    scaled = logits / temperature
    return _draw(_top_k(scaled, max(top_k - 1, 1)) if top_k else scaled, generator)


def ignores_top_k(logits, temperature, top_k, generator):
    if temperature == 0:
        return logits.argmax(-1)
    return _draw(logits / temperature, generator)


def inplace_when_greedy(logits, temperature, top_k, generator):
    if temperature == 0:
        logits -= logits.max(-1, keepdim=True).values  # "stabilise" in place
        return logits.argmax(-1)
    return correct_sampler(logits, temperature, top_k, generator)


def inplace_temperature(logits, temperature, top_k, generator):
    if temperature == 0:
        return logits.argmax(-1)
    logits /= temperature
    return _draw(_top_k(logits, top_k) if top_k else logits, generator)


def inplace_top_k(logits, temperature, top_k, generator):
    if temperature == 0:
        return logits.argmax(-1)
    if top_k is not None:
        kth = logits.topk(top_k, dim=-1).values[:, -1:]
        logits[logits < kth] = float("-inf")
    return _draw(logits / temperature, generator)


def wrong_shape(logits, temperature, top_k, generator):
    return correct_sampler(logits, temperature, top_k, generator).unsqueeze(-1)


def float_ids(logits, temperature, top_k, generator):
    return correct_sampler(logits, temperature, top_k, generator).float()


def sampler_stub(logits, temperature, top_k, generator):
    # YOUR CODE HERE
    raise NotImplementedError()


def temperature_zero_not_greedy(logits, temperature, top_k, generator):
    scaled = logits / max(temperature, 1e-2) if temperature else logits  # T=0 treated as T=1
    return _draw(_top_k(scaled, top_k) if top_k else scaled, generator)


def test_sampler_checker_accepts_a_correct_sampler(capsys):
    check_sample_next_token(correct_sampler)
    assert "[check passed]" in capsys.readouterr().out


@pytest.mark.parametrize(
    "fn, message",
    [
        (always_argmax, r"at temperature 1.0 .* sampled frequencies"),
        (multiplies_by_temperature, "multiplied by the temperature"),
        (ignores_temperature, "temperature seems to have no effect"),
        (keeps_k_plus_1, "with top_k=1 .* must always pick the most likely token"),
        (keeps_k_plus_1_beyond_one, r"with top_k=2 .* sampled tokens \[2\] outside the 2 most likely"),
        (keeps_k_minus_1, r"with top_k=2 .* never sampled .*off-by-one"),
        (ignores_top_k, "with top_k=1 .* must always pick the most likely token"),
        (inplace_when_greedy, r"changed the logits passed in \(an in-place operation"),
        (inplace_temperature, r"in-place"),
        (inplace_top_k, r"in-place"),
        (wrong_shape, r"returned shape \(2, 1\); expected \(2,\)"),
        (float_ids, "should return token ids .* got dtype torch.float32"),
        (sampler_stub, "not implemented yet"),
        (temperature_zero_not_greedy, r"with temperature 0 .* should be greedy \(argmax\)"),
    ],
    ids=lambda x: x.__name__ if callable(x) else "",
)
def test_sampler_checker_rejects_planted_bugs(fn, message):
    with pytest.raises(CheckError, match=message):
        check_sample_next_token(fn)


def test_sampler_checker_rejects_a_wrong_signature():
    def two_args(logits, temperature):
        return logits.argmax(-1)

    with pytest.raises(CheckError, match="wrong signature"):
        check_sample_next_token(two_args)


# === utils.sft: prompt-masked labels =======================================================
CONV = [
    {"role": "user", "content": "What colour is Alba?"},
    {"role": "assistant", "content": "Alba is blue."},
    {"role": "user", "content": "What does it eat?"},
    {"role": "assistant", "content": "Alba eats apples."},
]


def ids_of(tok, text):
    return tok(text, add_special_tokens=False)["input_ids"]


def test_sft_example_labels_only_assistant_tokens(tiny_tokenizer):
    ex = sft.sft_example(tiny_tokenizer, CONV)
    ids, labels = ex["input_ids"], ex["labels"]
    assert len(ids) == len(labels)
    assert ids == tiny_tokenizer.apply_chat_template(CONV, tokenize=True, return_dict=True)["input_ids"]
    end = tiny_tokenizer.convert_tokens_to_ids(END)
    kept = [t for t in labels if t != logprobs.IGNORE]
    assert kept == ids_of(tiny_tokenizer, "Alba is blue.") + [end] + ids_of(
        tiny_tokenizer, "Alba eats apples."
    ) + [end]
    assert all(lab in (logprobs.IGNORE, t) for t, lab in zip(ids, labels))
    assert labels[0] == logprobs.IGNORE  # the <|user|> marker is never a target
    assistant = tiny_tokenizer.convert_tokens_to_ids(ASSISTANT)
    assert all(lab == logprobs.IGNORE for t, lab in zip(ids, labels) if t == assistant)


def test_sft_example_truncates(tiny_tokenizer):
    ex = sft.sft_example(tiny_tokenizer, CONV, max_length=12)
    assert len(ex["input_ids"]) == len(ex["labels"]) == 12


def test_sft_example_without_an_assistant_turn(tiny_tokenizer):
    with pytest.raises(ValueError, match="no assistant tokens"):
        sft.sft_example(tiny_tokenizer, CONV[:1])


def test_sft_example_needs_generation_markers(tiny_tokenizer):
    tok = copy.deepcopy(tiny_tokenizer)
    tok.chat_template = tok.chat_template.replace("{% generation %}", "").replace("{% endgeneration %}", "")
    with pytest.raises(ValueError, match="generation"):
        sft.sft_example(tok, CONV)


def test_completion_example_labels_only_the_last_assistant_turn(tiny_tokenizer):
    ex = sft.completion_example(tiny_tokenizer, CONV[:3], CONV[3:])
    end = tiny_tokenizer.convert_tokens_to_ids(END)
    assert [t for t in ex["labels"] if t != logprobs.IGNORE] == ids_of(
        tiny_tokenizer, "Alba eats apples."
    ) + [end]
    assert ex["input_ids"] == sft.sft_example(tiny_tokenizer, CONV)["input_ids"]
    n_prompt = len(
        tiny_tokenizer.apply_chat_template(CONV[:3], add_generation_prompt=True, return_dict=True)[
            "input_ids"
        ]
    )
    assert all(t == logprobs.IGNORE for t in ex["labels"][:n_prompt])
    assert ex["labels"][n_prompt:] == ex["input_ids"][n_prompt:]


def test_completion_example_truncated_away(tiny_tokenizer):
    with pytest.raises(ValueError, match="truncated away"):
        sft.completion_example(tiny_tokenizer, CONV[:3], CONV[3:], max_length=10)


def test_collate_pads_ids_labels_and_mask():
    examples = [{"input_ids": [5, 6, 7], "labels": [-100, 6, 7]}, {"input_ids": [8], "labels": [8]}]
    batch = sft.collate(examples, pad_id=0)
    assert batch["input_ids"].tolist() == [[5, 6, 7], [8, 0, 0]]
    assert batch["labels"].tolist() == [[-100, 6, 7], [8, -100, -100]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert all(v.dtype == torch.long for v in batch.values())


# === utils.dpo =============================================================================
def test_sequence_logprobs_matches_a_manual_sum():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 5, 7, generator=g)
    labels = torch.tensor([[-100, -100, 3, 4, 1], [-100, 6, 0, -100, -100]])
    logp = logits.log_softmax(-1)
    want = torch.stack(
        [
            logp[0, 1, 3] + logp[0, 2, 4] + logp[0, 3, 1],  # position t predicts label t+1
            logp[1, 0, 6] + logp[1, 1, 0],
        ]
    )
    got = logprobs.sequence_logprobs(logits, labels)
    assert got.shape == (2,)
    assert torch.allclose(got, want, atol=1e-6)


def test_sequence_logprobs_of_an_all_ignored_row_is_zero():
    logits = torch.randn(1, 4, 5)
    assert logprobs.sequence_logprobs(logits, torch.full((1, 4), -100)).item() == 0.0


def test_dpo_loss_is_log_two_when_policy_equals_reference():
    logps = torch.tensor([-3.0, -7.5, -1.2])
    rejected = torch.tensor([-4.0, -2.0, -9.0])
    loss = dpo.dpo_loss(logps, rejected, logps.clone(), rejected.clone(), beta=0.1)
    assert loss.item() == pytest.approx(math.log(2))


def test_dpo_loss_value():
    loss = dpo.dpo_loss(
        torch.tensor([-1.0]), torch.tensor([-3.0]), torch.tensor([-2.0]), torch.tensor([-2.0]), beta=0.5
    )
    assert loss.item() == pytest.approx(math.log(1 + math.exp(-1.0)))  # -log sigmoid(0.5 - (-0.5))


def test_dpo_loss_gradient_signs():
    chosen = torch.tensor([-5.0, -6.0], requires_grad=True)
    rejected = torch.tensor([-5.0, -4.0], requires_grad=True)
    ref_c, ref_r = torch.tensor([-5.0, -5.0]), torch.tensor([-5.0, -5.0])
    loss = dpo.dpo_loss(chosen, rejected, ref_c, ref_r, beta=0.1)
    loss.backward()
    assert torch.all(chosen.grad < 0)  # raising the chosen log-prob lowers the loss
    assert torch.all(rejected.grad > 0)  # raising the rejected log-prob raises it
    higher = dpo.dpo_loss(chosen.detach() + 1.0, rejected.detach(), ref_c, ref_r, beta=0.1)
    assert higher.item() < loss.item()


def test_dpo_loss_beta_scales_the_margin():
    args = (torch.tensor([-1.0]), torch.tensor([-3.0]), torch.tensor([-2.0]), torch.tensor([-2.0]))
    assert dpo.dpo_loss(*args, beta=1.0).item() < dpo.dpo_loss(*args, beta=0.1).item()


def test_train_dpo_runs_three_steps(tiny_model, tiny_tokenizer):
    pairs = data.annotator_preferences(16)
    pairs = pairs.select(range(8))
    policy = copy.deepcopy(tiny_model)
    before = {k: v.clone() for k, v in policy.state_dict().items()}
    history = dpo.train_dpo(
        policy,
        tiny_model,
        tiny_tokenizer,
        pairs,
        beta=0.1,
        lr=1e-3,
        epochs=3,
        batch_size=8,
        show_progress=False,
    )
    assert len(history) == 3
    assert {"loss", "accuracy", "margin", "logp_chosen", "logp_rejected"} <= set(history.columns)
    assert history.loss.map(math.isfinite).all() and history.accuracy.between(0, 1).all()
    assert history.loss[0] == pytest.approx(math.log(2), abs=1e-4)  # step 1: policy == reference
    assert history.margin[0] == pytest.approx(0.0, abs=1e-4)
    assert any(not torch.equal(before[k], v) for k, v in policy.state_dict().items())
    assert not policy.training


def test_train_dpo_shares_the_references_log_probabilities_across_runs(tiny_model, tiny_tokenizer):
    pairs = data.annotator_preferences(16).select(range(8))
    calls = []

    class Counted(torch.nn.Module):  # the reference, counting its forward passes
        def __init__(self, model):
            super().__init__()
            self.model = model

        def forward(self, *args, **kwargs):
            calls.append(1)
            return self.model(*args, **kwargs)

    def train(reference, beta, **cache):
        return dpo.train_dpo(
            copy.deepcopy(tiny_model), reference, tiny_tokenizer, pairs, beta=beta, lr=1e-3, epochs=2,
            batch_size=4, show_progress=False, **cache,
        )  # fmt: skip

    reference, cache, histories, passes = Counted(tiny_model), {}, [], []
    for beta in (0.1, 0.3):
        histories.append(train(reference, beta, ref_cache=cache))
        passes.append(len(calls))
    assert passes[0] > 0 and passes[1] == passes[0], "the second run never runs the reference"
    assert len(cache) == 8
    alone = train(tiny_model, 0.3)
    assert np.allclose(histories[1].loss, alone.loss, atol=1e-5), "a shared cache changes nothing else"


def test_train_dpo_needs_the_preference_columns(tiny_model, tiny_tokenizer):
    pairs = data.annotator_preferences(4).remove_columns(["chosen"])
    with pytest.raises(ValueError, match=r"DPO needs the column\(s\) \['chosen'\]"):
        dpo.train_dpo(
            copy.deepcopy(tiny_model), tiny_model, tiny_tokenizer, pairs, epochs=1, show_progress=False
        )


# === utils.evaluate ========================================================================
def test_win_rate_all_wins():
    result = evaluate.win_rate([1.0, 2.0, 0.5], [0.0, 1.0, -1.0])
    assert result["win_rate"] == 1.0 and result["ties"] == 0.0
    assert result["low"] == result["high"] == 1.0


def test_win_rate_all_losses_and_ties():
    assert evaluate.win_rate([0.0, 0.0], [1.0, 1.0])["win_rate"] == 0.0
    ties = evaluate.win_rate([0.5] * 10, [0.5] * 10)
    assert ties["win_rate"] == 0.5 and ties["ties"] == 1.0


def test_win_rate_interval_contains_the_estimate():
    rng = np.random.default_rng(0)
    a, b = rng.normal(0.2, 1, 300), rng.normal(0.0, 1, 300)
    result = evaluate.win_rate(a, b)
    assert result["low"] < result["win_rate"] < result["high"]
    assert result["win_rate"] == pytest.approx(np.mean(a > b))
    assert result["high"] - result["low"] < 0.2
    assert evaluate.win_rate(a, b) == result  # seeded bootstrap


@pytest.mark.parametrize("a, b", [([1.0, 2.0], [1.0]), ([], []), ([[1.0]], [[1.0]])])
def test_win_rate_rejects_bad_input(a, b):
    with pytest.raises(ValueError, match="equally long, non-empty"):
        evaluate.win_rate(a, b)


def test_mean_difference_is_paired():
    # a shared per-prompt level cancels: b is a plus a constant, so every resample gives -0.1
    rng = np.random.default_rng(0)
    a = rng.normal(0.0, 5.0, 400)
    result = evaluate.mean_difference(a, a + 0.1)
    assert result["difference"] == pytest.approx(-0.1)
    assert result["low"] == pytest.approx(-0.1) and result["high"] == pytest.approx(-0.1)


def test_mean_difference_interval_on_flags():
    rng = np.random.default_rng(1)
    a, b = rng.random(800) < 0.15, rng.random(800) < 0.05
    result = evaluate.mean_difference(a, b)
    assert result["difference"] == pytest.approx(a.mean() - b.mean())
    assert 0 < result["low"] < result["difference"] < result["high"]
    assert evaluate.mean_difference(b, a)["high"] < 0  # and the other way round
    with pytest.raises(ValueError, match="equally long, non-empty"):
        evaluate.mean_difference([1.0, 2.0], [1.0])


def test_evaluate_scores_every_generation_with_the_judge(tiny_model, tiny_tokenizer):
    convs = data.eval_conversations(6, dialogues=0.5)
    df = evaluate.evaluate(tiny_model, tiny_tokenizer, convs["prompt"], kinds=convs["kind"], max_new_tokens=6)
    assert list(df.columns) == [
        "prompt",
        "kind",
        "response",
        "finished",
        "n_tokens",
        "gold",
        "correct",
        "rude",
        "refused",
        "token_ids",
    ]
    assert len(df) == 6 and list(df["kind"]) == list(convs["kind"])
    for conv, row in zip(convs["prompt"], df.itertuples()):
        assert row.gold == pytest.approx(judge.score(conv, row.response, row.finished))
        assert 1 <= row.n_tokens <= 6
    summary = evaluate.summarize(df)
    assert "all" in summary.index and summary.loc["all", "gold"] == pytest.approx(df["gold"].mean(), abs=1e-3)


def test_best_of_n_picks_each_prompts_best_candidate_and_its_kl_is_closed_form():
    import pandas as pd

    frames = [
        pd.DataFrame({"response": [f"c{k}-p{i}" for i in range(3)], "gold": [k, -k, 0]}) for k in range(3)
    ]
    scores = np.array([[0.0, 5.0, 1.0], [1.0, 0.0, 1.0], [2.0, 0.0, 0.0]])  # [n, prompts]
    best = evaluate.best_of_n(frames, scores)
    assert list(best["response"]) == ["c2-p0", "c0-p1", "c0-p2"]  # ties: the first of equals
    with pytest.raises(ValueError, match="scores should be"):
        evaluate.best_of_n(frames, scores.T[:2])
    assert evaluate.best_of_n_kl(1) == 0.0
    assert evaluate.best_of_n_kl(4) == pytest.approx(np.log(4) - 0.75)


def test_answer_stats_counts_coreference_only_when_asked():
    import pandas as pd

    convs = [
        [
            {"role": "user", "content": "What colour is Alba?"},
            {"role": "assistant", "content": "Alba is red."},
            {"role": "user", "content": "Where does it live?"},
        ]
    ] * 3
    answers = pd.DataFrame(
        {
            "response": ["Alba lives in the cave.", "Brix lives in the cave.", "cave."],
            "rude": [False] * 3,
            "finished": [True] * 3,
            "correct": [True, False, True],
            "refused": [False] * 3,
        }
    )
    stats = evaluate.answer_stats(answers, convs, None, kl=0.5)
    assert "right creature" not in stats and stats["KL to SFT"] == 0.5
    stats = evaluate.answer_stats(answers, convs, None, coreference=True)
    assert stats["right creature"] == 0.5  # the terse answer names no creature: not counted


# --- what a failing check shows --------------------------------------------------------------------
def _shown(cell: str) -> str:
    """What IPython (as in Jupyter, Colab and nbval's kernel) prints when ``cell`` runs."""
    from IPython.core.interactiveshell import InteractiveShell
    from IPython.utils.capture import capture_output

    with capture_output() as out:
        InteractiveShell.instance().run_cell(cell)
    return out.stdout + out.stderr


def test_a_failing_check_shows_its_message_not_the_checkers_source():
    """The checker's source holds the reference (`torch.gather(...)`) and its catalogue of mistakes."""
    shown = _shown(
        "import torch\n"
        "from utils.checks import check_sequence_logprobs\n"
        "def sequence_logprobs(logits, labels):\n"
        "    return torch.zeros(labels.shape[0])  # the right shape, the wrong values\n"
        "check_sequence_logprobs(sequence_logprobs)\n"
    )
    assert "CheckError" in shown and "sequence_logprobs" in shown, shown
    assert "gather" not in shown and "utils/checks" not in shown and "def check_" not in shown, shown


def test_an_error_in_the_learners_code_shows_the_learners_frames_only():
    shown = _shown(
        "from utils.checks import check_kl_k3\n"
        "def kl_k3(logp, ref_logp):\n"
        "    ratio = logp - ref_logp\n"
        "    return ratio[10_000]  # a typical slip: an index out of range\n"
        "check_kl_k3(kl_k3)\n"
    )
    assert "IndexError" in shown and "Traceback (your code)" in shown and "ratio[10_000]" in shown, shown
    assert "utils/checks" not in shown and "call_learner" not in shown, shown


def test_a_library_error_in_the_checkers_comparison_becomes_a_check_error(monkeypatch):
    """The checkers here check shapes first, so no learner's answer is known to break one: a checker
    written in this file (counted as course code for the test) stands in."""
    from pathlib import Path

    from utils.checks import core
    from utils.checks.core import learner_facing

    monkeypatch.setattr(core, "_NOT_LEARNERS", (*core._NOT_LEARNERS, str(Path(__file__).resolve())))

    @learner_facing
    def check_something(fn):
        return torch.zeros(2) + fn()  # what the learner returned breaks the comparison

    with pytest.raises(CheckError, match="could not finish checking: RuntimeError") as caught:
        check_something(lambda: torch.zeros(3))
    assert isinstance(caught.value.__cause__, RuntimeError)
    shown = caught.value._render_traceback_()  # the message alone, wrapped to the book's width
    assert " ".join(" ".join(shown).split()) == " ".join(
        f"\x1b[0;31mCheckError\x1b[0m: {caught.value}".split()
    )
    assert all(len(line) <= 88 for line in shown[1:])
