"""The ``hub`` profile against a local stand-in of the Hub (tools/hub_standin.py): the stand-in has
the real shapes, the loaders read it by the real names, the ChatML patch keeps what the template
renders, and a smoke test cuts a profile without changing anything else."""

from pathlib import Path

import pytest
import torch

from tools import hub_standin
from utils import config, hub

ROOT = Path(__file__).resolve().parent.parent

BASE, INSTRUCT = hub_standin.LM_NAMES


@pytest.fixture(scope="session")
def standin(tmp_path_factory):
    """The small stand-in, built once (a few seconds)."""
    return hub_standin.build(tmp_path_factory.mktemp("hub-standin"), "small", n_rows=300)


@pytest.fixture
def mirror(standin, monkeypatch, tmp_datasets_cache):
    monkeypatch.setenv(hub.MIRROR_ENV, str(standin))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return standin


def test_the_real_size_config_is_smollm2_135m():
    with torch.device("meta"):
        model = hub_standin.model_from(hub_standin.lm_config("real"))
    assert type(model).__name__ == "LlamaForCausalLM"
    n = sum(p.numel() for p in model.parameters())  # tied embeddings counted once
    assert n == 134_515_008  # SmolLM2-135M's parameter count
    assert model.config.num_key_value_heads == 3 and model.config.tie_word_embeddings


def test_the_real_size_judge_config_is_qwen3_0_6b():
    from tools.hub_sizing import QWEN3_06B_RM

    with torch.device("meta"):
        model = hub_standin.model_from(QWEN3_06B_RM)
    assert type(model).__name__ == "Qwen3ForSequenceClassification" and model.config.num_labels == 1
    n = sum(p.numel() for p in model.parameters())
    assert 590e6 < n < 600e6  # Qwen3-0.6B's backbone (0.44B without embeddings) and a scalar head


def test_every_name_of_the_hub_profile_is_in_the_standin(mirror):
    p = config.get_profile("hub")
    for name in (p.base_model, p.sft_model, p.judge_model, p.sft_dataset, p.preference_dataset):
        assert Path(hub.resolve(name)).is_dir(), name
    assert Path(hub.resolve(*p.pretrain_dataset)).name == p.pretrain_dataset[1]
    assert Path(hub.resolve(*p.math_dataset)).name == p.math_dataset[1]


def test_a_name_missing_from_the_mirror_is_a_clear_error(mirror):
    with pytest.raises(hub.HubUnavailableError, match="not in the mirror"):
        hub.load_hub_model("someone/absent-model")


def test_models_load_by_their_hub_names_with_the_real_classes(mirror):
    model, tok = hub.load_hub_model(INSTRUCT, device="cpu")
    assert type(model).__name__ == "LlamaForCausalLM"
    assert model.config.num_attention_heads == 9 and model.config.num_key_value_heads == 3
    assert tok.convert_tokens_to_ids(["<|endoftext|>", "<|im_start|>", "<|im_end|>"]) == [0, 1, 2]
    # generation stops at the end of a turn first, and still at the checkpoint's own end token
    assert model.generation_config.eos_token_id[0] == tok.eos_token_id == 2
    base, base_tok = hub.load_hub_model(BASE, device="cpu")
    assert base.generation_config.eos_token_id == [2, 0]  # <|im_end|>, then the base's <|endoftext|>
    judge, judge_tok = hub.load_hub_judge(config.get_profile("hub").judge_model, device="cpu")
    assert type(judge).__name__ == "Qwen3ForSequenceClassification" and judge.config.num_labels == 1
    assert "{% generation %}" not in judge_tok.chat_template  # the judge keeps its own template


def test_datasets_load_by_their_hub_names_with_the_real_columns(mirror):
    p = config.get_profile("hub")
    text = hub.load_hub_text_dataset(*p.pretrain_dataset)
    assert set(text) >= {"train", "validation"} and text["train"].column_names == ["text"]
    assert all(len(t.strip()) >= 20 for t in text["train"]["text"])  # blank lines and headings dropped
    sft = hub.load_hub_sft_dataset(p.sft_dataset, n=100, validation=20)
    assert len(sft["train"]) == 100 and sft["train"][0]["messages"][0]["role"] == "user"
    prefs = hub.load_hub_preference_dataset(p.preference_dataset, n=50)
    row = prefs[0]
    assert prefs.column_names == ["prompt", "chosen", "rejected"]
    assert row["prompt"][-1]["role"] == "user" and row["chosen"][0]["role"] == "assistant"


def test_standin_datasets_have_the_real_schema(standin):
    import pandas as pd

    alpaca = pd.read_parquet(next((standin / hub_standin.ALPACA).rglob("train-*.parquet")))
    assert list(alpaca.columns) == ["instruction", "input", "output", "text"]
    assert (alpaca["input"] != "").any() and (alpaca["input"] == "").any()
    uf = pd.read_parquet(next((standin / hub_standin.ULTRAFEEDBACK).rglob("train-*.parquet")))
    assert list(uf.columns) == ["chosen", "rejected", "score_chosen", "score_rejected"]
    assert [m["role"] for m in uf["chosen"][0]] == ["user", "assistant"]
    wiki = pd.read_parquet(next((standin / "/".join(hub_standin.WIKITEXT)).glob("validation-*.parquet")))
    assert (wiki["text"] == "").any()  # wikitext's blank lines are there, for the loader to drop


# --- the ChatML patch ---------------------------------------------------------------------------
CONVERSATIONS = [
    [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello there."}],
    [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "A?"},
        {"role": "assistant", "content": "B."},
        {"role": "user", "content": "C?"},
        {"role": "assistant", "content": "D."},
    ],
]


@pytest.mark.parametrize("name", [BASE, INSTRUCT])
def test_chatml_gets_generation_markers_and_renders_as_before(mirror, name):
    from transformers import AutoTokenizer

    from utils.tokenizer import check_chat_template

    raw = AutoTokenizer.from_pretrained(hub.resolve(name))
    tok = hub.load_hub_tokenizer(name)
    check_chat_template(tok)  # assistant-only loss works
    assert tok.eos_token == "<|im_end|>" and tok.pad_token is not None
    for conv in CONVERSATIONS:
        for gen in (False, True):
            assert tok.apply_chat_template(
                conv, tokenize=False, add_generation_prompt=gen
            ) == raw.apply_chat_template(conv, tokenize=False, add_generation_prompt=gen)
    enc = tok.apply_chat_template(CONVERSATIONS[1], return_dict=True, return_assistant_tokens_mask=True)
    kept = tok.decode([t for t, m in zip(enc["input_ids"], enc["assistant_masks"]) if m])
    assert kept == "B.<|im_end|>D.<|im_end|>"  # each answer and the token that ends it, nothing else


def test_a_template_that_is_not_plain_chatml_is_left_to_the_fallback(mirror):
    from transformers import AutoTokenizer

    from utils.tokenizer import CHAT_TEMPLATE

    tok = AutoTokenizer.from_pretrained(hub.resolve(INSTRUCT))
    odd = tok.chat_template.replace("'\n' + message['content']", "': ' + message['content']")
    assert odd != tok.chat_template
    tok.chat_template = odd
    assert not hub.patch_chatml(tok)  # renders differently from ChatML: not patched
    tok.save_pretrained(mirror / "someone" / "odd-chat")
    assert hub.load_hub_tokenizer("someone/odd-chat").chat_template == CHAT_TEMPLATE


def test_chatml_without_a_default_system_prompt(mirror):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(hub.resolve(config.get_profile("hub").judge_model))
    original = tok.chat_template
    assert hub.patch_chatml(tok)
    assert tok.apply_chat_template(CONVERSATIONS[0], tokenize=False) == tok.apply_chat_template(
        CONVERSATIONS[0], tokenize=False, chat_template=original
    )
    assert "system" not in tok.apply_chat_template(CONVERSATIONS[0], tokenize=False)


# --- the smoke test -------------------------------------------------------------------------------
def test_smoke_cuts_steps_and_rows_and_nothing_else(monkeypatch):
    from utils.data import dialogue_conversations, eval_conversations
    from utils.ppo import PPOSettings

    full = config.get_profile("hub")
    monkeypatch.setenv(config.SMOKE_ENV, "1")
    smoke = config.get_profile("hub")
    assert (
        smoke.steps(40) == config.SMOKE["max_steps"] and smoke.examples(800) == config.SMOKE["max_examples"]
    )
    assert smoke.steps(2) == 2 and smoke.pretrain_steps == config.SMOKE["pretrain_steps"]
    assert (smoke.base_model, smoke.seq_len) == (full.base_model, full.seq_len)
    assert smoke.smoke and not full.smoke
    assert not smoke.checks_claims and not config.get_profile("tiny").checks_claims
    n = config.SMOKE["max_examples"]
    assert len(eval_conversations(800)) == len(dialogue_conversations(500, split="train")) == n
    assert PPOSettings(iterations=40).iterations == 40  # plain data: the caller applies the profile
    monkeypatch.setenv(config.SMOKE_ENV, "0")
    assert config.get_profile("tiny").checks_claims and config.get_profile("tiny").steps(40) == 40


def test_claims_are_said_not_raised_off_the_full_tiny_profile(monkeypatch, capsys):
    from utils.claims import ClaimFailed, claim

    monkeypatch.delenv("COURSE_CLAIMS_RECORD", raising=False)
    with pytest.raises(ClaimFailed):
        claim("one is more than two", (1, ">", 2))
    monkeypatch.setenv(config.PROFILE_ENV, "hub")
    assert bool(claim("one is more than two", (1, ">", 2))) is False
    assert "does not hold here; claimed for the full tiny profile" in capsys.readouterr().out


def test_loaders_keep_only_examples_that_fit_the_profiles_length(
    tmp_path, tmp_datasets_cache, capsys, monkeypatch
):
    import pandas as pd

    monkeypatch.setenv(config.PROFILE_ENV, "hub")  # seq_len 256: about 1,024 characters

    user = {"role": "user", "content": "Q?"}
    rows = {
        "chosen": [
            [user, {"role": "assistant", "content": "short."}],
            [user, {"role": "assistant", "content": "x" * 2000}],
        ],
        "rejected": [
            [user, {"role": "assistant", "content": "no."}],
            [user, {"role": "assistant", "content": "no."}],
        ],
    }
    path = tmp_path / "prefs.parquet"
    pd.DataFrame(rows).to_parquet(path)
    prefs = hub.load_hub_preference_dataset(str(path), n=10)
    assert (
        len(prefs) == 1 and prefs[0]["chosen"][0]["content"] == "short."
    )  # the 2,000-character answer is left out
    assert "kept 1 of 2 pairs that fit in ~256 tokens" in capsys.readouterr().out
    pd.DataFrame({"chosen": rows["chosen"][1:], "rejected": rows["rejected"][1:]}).to_parquet(path)
    with pytest.raises(ValueError, match="raise the profile's seq_len"):
        hub.load_hub_preference_dataset(str(path))


def test_the_math_loader_reads_gsm8k_by_its_name_and_the_verifier_checks_its_answers(mirror):
    """GSM8K's shape: ``question``, and a worked ``answer`` ending in ``#### <number>``; the loader
    turns it into a chat prompt and the final number, which ``verify_number`` matches exactly."""
    from utils.grpo import last_number, verify_number

    p = config.get_profile("hub")
    train = hub.load_hub_math_dataset(*p.math_dataset, split="train", n=20)
    test = hub.load_hub_math_dataset(*p.math_dataset, split="test", n=10)
    assert sorted(train.column_names) == ["answer", "prompt"] and len(train) == 20 and len(test) == 10
    row = train[0]
    assert row["prompt"][0]["role"] == "user" and row["prompt"][0]["content"].endswith("the final number.")
    assert row["answer"].lstrip("-").isdigit()
    assert not {r["prompt"][0]["content"] for r in train} & {r["prompt"][0]["content"] for r in test}
    assert verify_number(f"So the answer is {row['answer']}.", row["answer"]) == 1.0
    assert verify_number(f"{row['answer']} or maybe 3.", row["answer"]) == 0.0  # the last number counts
    assert verify_number(f"It is {row['answer']}", row["answer"], finished=False) == 0.0
    assert last_number("1,200.0 apples") == "1200" and last_number("none") is None
    with pytest.raises(ValueError, match="no 'validation' split"):
        hub.load_hub_math_dataset(*p.math_dataset, split="validation")


# --- what the chapters evaluate on (#32): held-out public prompts, judged by the public reward model
def test_the_tiny_profile_evaluates_on_the_course_evaluation_set_with_the_gold_judge(capsys):
    from utils.artifacts import evaluation_prompts
    from utils.data import evaluation_set

    for source in ("sft", "preference"):
        prompts, kinds, judge = evaluation_prompts(source, 40, profile=config.PROFILES["tiny"])
        expected = evaluation_set(40, show=False)
        assert list(prompts) == list(expected["prompt"]) and list(kinds) == list(expected["kind"])
        assert judge is None
    assert "40 of the 800 evaluation prompts" in capsys.readouterr().out


def test_the_hub_profile_evaluates_on_held_out_public_prompts_with_the_public_judge(mirror, monkeypatch):
    from utils import artifacts

    monkeypatch.setenv("COURSE_PROFILE", "hub")
    monkeypatch.setenv("COURSE_SMOKE", "1")  # the stand-in's 300 demonstrations
    monkeypatch.setattr(artifacts, "_judges", {})
    hub_profile = config.get_profile("hub")
    prompts, kinds, judge = artifacts.evaluation_prompts("preference", 30, show=False)
    assert kinds is None and len(prompts) == 30
    assert type(judge[0]).__name__ == "Qwen3ForSequenceClassification"
    assert artifacts.evaluation_prompts("preference", 5, show=False)[2] is judge  # loaded once
    trained = {tuple(m["content"] for m in p) for p in artifacts.get_preference_data(hub_profile)["prompt"]}
    assert not trained & {tuple(m["content"] for m in p) for p in prompts}, "evaluated on training prompts"
    sft_prompts, _, _ = artifacts.evaluation_prompts("sft", 10, show=False)
    demos = artifacts.load_sft_demos(hub_profile)
    assert [p for p in sft_prompts] == [m[:-1] for m in demos["validation"]["messages"][:10]]
    assert all(p[-1]["role"] == "user" for p in sft_prompts)  # the answers are left out
    with pytest.raises(ValueError, match="source"):
        artifacts.evaluation_prompts("pretraining", show=False)


def test_gold_scores_with_a_judge_are_the_judges_scores(mirror, monkeypatch):
    from types import SimpleNamespace

    from utils import artifacts
    from utils.reward import reward_scores
    from utils.rollout import gold_scores

    monkeypatch.setattr(artifacts, "_judges", {})
    judge = artifacts.evaluation_judge(config.get_profile("hub"))
    conversations = [[{"role": "user", "content": "Compute 2 plus 3."}]] * 2
    roll = SimpleNamespace(conversations=conversations, texts=["5", "six"], finished=[True, True])
    answers = [[{"role": "assistant", "content": t}] for t in roll.texts]
    want = reward_scores(judge[0], judge[1], conversations, answers)
    assert gold_scores(roll, judge) == pytest.approx(want.tolist())
    assert gold_scores(roll) != gold_scores(roll, judge)  # TinyWorld's rubric, without one


def test_the_hub_profile_refuses_tinyworlds_judge_on_real_answers(monkeypatch, tiny_model, tiny_tokenizer):
    """No hub chapter scores a real model with TinyWorld's rubric: evaluate and gold_scores refuse
    without a judge there (the hub smoke run of every chapter goes through them), and say what to
    pass; on tiny the rubric is the judge."""
    from types import SimpleNamespace

    from utils.evaluate import evaluate
    from utils.rollout import gold_scores

    roll = SimpleNamespace(
        conversations=[[{"role": "user", "content": "Compute 2 plus 3."}]], texts=["5"], finished=[True]
    )
    prompts = roll.conversations
    monkeypatch.setenv(config.PROFILE_ENV, "hub")
    with pytest.raises(ValueError, match=r"gold_scores: TinyWorld's gold judge .* pass judge="):
        gold_scores(roll)
    with pytest.raises(ValueError, match=r"evaluate: TinyWorld's gold judge .* pass judge="):
        evaluate(tiny_model, tiny_tokenizer, prompts, max_new_tokens=2)
    monkeypatch.setenv(config.PROFILE_ENV, "tiny")
    assert len(gold_scores(roll)) == 1
    assert len(evaluate(tiny_model, tiny_tokenizer, prompts, max_new_tokens=2)) == 1


def test_held_out_pairs_of_a_dataset_without_a_test_split_are_not_the_training_ones(
    tmp_path, tmp_datasets_cache, monkeypatch
):
    import pandas as pd

    monkeypatch.setenv(config.PROFILE_ENV, "hub")
    rows = {
        "prompt": [[{"role": "user", "content": f"Q{i}?"}] for i in range(20)],
        "chosen": [[{"role": "assistant", "content": f"yes {i}."}] for i in range(20)],
        "rejected": [[{"role": "assistant", "content": "no."}] for _ in range(20)],
    }
    path = tmp_path / "prefs.parquet"
    pd.DataFrame(rows).to_parquet(path)
    train = hub.load_hub_preference_dataset(str(path), n=12)
    test = hub.load_hub_preference_dataset(str(path), n=8, split="test")
    asked = lambda ds: {p[0]["content"] for p in ds["prompt"]}  # noqa: E731
    assert len(train) == 12 and len(test) == 8 and not asked(train) & asked(test)
