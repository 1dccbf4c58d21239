"""The `hub` profile's loaders, run offline on local fixtures of the Hub's shape."""

import copy
import json
import math

import pandas as pd
import pytest
import torch
from datasets import DatasetDict

from utils import config, hub
from utils.tokenizer import CHAT_TEMPLATE

WIKITEXT_LINES = [
    "",
    " = Valkyria Chronicles III = ",
    "",
    " Senjō no Valkyria 3 : Unrecorded Chronicles is a tactical role @-@ playing video game .",
    "",
    " = = Gameplay = = ",
    "",
    " As with previous Valkyira Chronicles games , Valkyria Chronicles III is a tactical game .",
    "   ",
] + [
    f" The game was released in region {i} and sold {i * 1000} copies in its first week ." for i in range(40)
]
LONG_LINES = [t for t in WIKITEXT_LINES if len(t.strip()) >= 20]


@pytest.fixture
def hub_folder(tmp_path, tiny_model, tiny_tokenizer):
    """A causal LM and tokenizer saved the way the Hub stores them."""
    folder = tmp_path / "SmolLM-like"
    tiny_model.save_pretrained(folder, safe_serialization=True)
    tiny_tokenizer.save_pretrained(folder)
    return folder


def test_load_hub_model_from_a_local_folder(hub_folder, tiny_model, tiny_tokenizer):
    model, tok = hub.load_hub_model(str(hub_folder))
    param = next(model.parameters())
    assert param.device.type == config.pick_device().type
    assert param.dtype == torch.float32  # the course trains it: fp32 weights on every device (weights_dtype)
    assert not model.training
    assert tok.pad_token == tiny_tokenizer.pad_token and tok.pad_token_id is not None
    assert tok.chat_template == CHAT_TEMPLATE
    ids = torch.tensor([tok("Alba is blue.", add_special_tokens=False)["input_ids"]])
    with torch.no_grad():
        assert torch.equal(model.cpu().float()(input_ids=ids).logits, tiny_model(input_ids=ids).logits)


def test_load_hub_model_on_cpu_is_float32(hub_folder):
    model, _ = hub.load_hub_model(str(hub_folder), device="cpu")
    param = next(model.parameters())
    assert param.device == torch.device("cpu")
    assert param.dtype == torch.float32


def test_load_hub_model_honours_an_explicit_dtype(hub_folder):
    model, _ = hub.load_hub_model(str(hub_folder), device="cpu", dtype=torch.bfloat16)
    assert next(model.parameters()).dtype == torch.bfloat16


def test_load_hub_model_refuses_pickle_checkpoints(hub_folder, tiny_model):
    (hub_folder / "model.safetensors").unlink()
    torch.save(tiny_model.state_dict(), hub_folder / "pytorch_model.bin")
    with pytest.raises(Exception):  # noqa: B017 - safetensors only: a pickle checkpoint must not load
        hub.load_hub_model(str(hub_folder), device="cpu")


def test_hub_tokenizer_gets_a_pad_token_and_a_template(tmp_path, tiny_tokenizer):
    tok = copy.deepcopy(tiny_tokenizer)
    tok.pad_token = None
    tok.chat_template = None
    tok.save_pretrained(tmp_path / "tok")
    loaded = hub.load_hub_tokenizer(str(tmp_path / "tok"))
    assert loaded.pad_token == loaded.eos_token == tiny_tokenizer.eos_token
    assert loaded.chat_template == CHAT_TEMPLATE


def _check_wikitext(ds):
    assert isinstance(ds, DatasetDict)
    assert set(ds) == {"train", "validation"}
    assert len(ds["train"]) > 0 and len(ds["validation"]) > 0
    texts = list(ds["train"]["text"]) + list(ds["validation"]["text"])
    assert sorted(texts) == sorted(LONG_LINES)  # empty lines (and short headings) dropped, nothing else
    assert all(t.strip() for t in texts)


def test_load_hub_text_dataset_from_parquet(tmp_path, tmp_datasets_cache):
    path = tmp_path / "wikitext-train.parquet"
    pd.DataFrame({"text": WIKITEXT_LINES}).to_parquet(path)
    ds = hub.load_hub_text_dataset(str(path))
    _check_wikitext(ds)
    assert len(ds["validation"]) == pytest.approx(0.05 * len(LONG_LINES), abs=1)


def test_load_hub_text_dataset_from_jsonl(tmp_path, tmp_datasets_cache):
    path = tmp_path / "wiki.jsonl"
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in WIKITEXT_LINES))
    _check_wikitext(hub.load_hub_text_dataset(str(path)))


def test_load_hub_text_dataset_from_a_folder_with_splits(tmp_path, tmp_datasets_cache):
    folder = tmp_path / "wikitext"
    folder.mkdir()
    pd.DataFrame({"text": WIKITEXT_LINES[:20]}).to_parquet(folder / "train.parquet")
    pd.DataFrame({"text": WIKITEXT_LINES[20:]}).to_parquet(folder / "validation.parquet")
    ds = hub.load_hub_text_dataset(str(folder))
    _check_wikitext(ds)
    assert list(ds["validation"]["text"]) == [t for t in WIKITEXT_LINES[20:] if len(t.strip()) >= 20]


def test_load_hub_text_dataset_without_text_column(tmp_path, tmp_datasets_cache):
    path = tmp_path / "bad.parquet"
    pd.DataFrame({"content": WIKITEXT_LINES}).to_parquet(path)
    with pytest.raises(ValueError, match=r"needs the column\(s\) \['text'\].*\['content'\]"):
        hub.load_hub_text_dataset(str(path))


def test_hub_model_offline_is_a_clear_error(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(hub.HubUnavailableError, match="tiny") as info:
        hub.load_hub_model("HuggingFaceTB/SmolLM2-135M")
    assert "HuggingFaceTB/SmolLM2-135M" in str(info.value)
    assert "COURSE_PROFILE=tiny" in str(info.value)


def test_hub_dataset_offline_is_a_clear_error(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(hub.HubUnavailableError, match="not reachable"):
        hub.load_hub_text_dataset("Salesforce/wikitext", "wikitext-2-raw-v1")


@pytest.mark.parametrize("value", ["1", "true", "ON", "yes"])
def test_hub_is_unreachable_when_offline_is_forced(monkeypatch, value):
    monkeypatch.setenv("HF_HUB_OFFLINE", value)

    def no_network(*args, **kwargs):
        raise AssertionError("hub_reachable opened a connection in offline mode")

    monkeypatch.setattr(hub.socket, "create_connection", no_network)
    assert hub.hub_reachable() is False


def test_hub_reachable_reports_a_failed_connection(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")

    def refuse(*args, **kwargs):
        raise OSError("network is unreachable")

    monkeypatch.setattr(hub.socket, "create_connection", refuse)
    assert hub.hub_reachable() is False


def test_hub_error_is_a_runtime_error():
    assert issubclass(hub.HubUnavailableError, RuntimeError)


# --- instruction data for Chapter 2 ---------------------------------------------------------
def test_load_hub_sft_dataset_converts_alpaca_records(tmp_path, tmp_datasets_cache):
    rows = [
        {
            "instruction": f"Give me the number {i}.",
            "input": "" if i % 2 else f"context {i}",
            "output": f"{i}.",
        }
        for i in range(40)
    ]
    path = tmp_path / "alpaca.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows))
    ds = hub.load_hub_sft_dataset(str(path), n=30, validation=5)
    assert len(ds["train"]) == 30 and len(ds["validation"]) == 5
    assert ds["train"].column_names == ["messages"]
    msgs = ds["train"][0]["messages"]
    assert [m["role"] for m in msgs] == ["user", "assistant"]
    record = next(r for r in rows if r["output"] == msgs[1]["content"])
    assert msgs[0]["content"].startswith(record["instruction"])
    assert (
        (record["input"] in msgs[0]["content"])
        if record["input"]
        else msgs[0]["content"] == record["instruction"]
    )


def test_load_hub_sft_dataset_names_missing_columns(tmp_path, tmp_datasets_cache):
    path = tmp_path / "bad.jsonl"
    path.write_text("\n".join(json.dumps({"question": "q", "answer": "a"}) for _ in range(10)))
    with pytest.raises(ValueError, match="instruction"):
        hub.load_hub_sft_dataset(str(path), n=5, validation=2)


def test_load_hub_sft_dataset_offline_says_use_tiny():
    with pytest.raises(hub.HubUnavailableError, match="tiny"):
        hub.load_hub_sft_dataset("tatsu-lab/alpaca")


# --- preference data for Chapters 3-6 -------------------------------------------------------
def _msgs(*pairs):
    return [{"role": r, "content": c} for r, c in pairs]


def test_load_hub_preference_dataset_splits_an_implicit_prompt(tmp_path, tmp_datasets_cache):
    rows = [
        {
            "chosen": _msgs(("user", f"q{i}"), ("assistant", f"good {i}")),
            "rejected": _msgs(("user", f"q{i}"), ("assistant", f"bad {i}")),
            "score_chosen": 8.0,
        }
        for i in range(12)
    ]
    path = tmp_path / "prefs.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows))
    ds = hub.load_hub_preference_dataset(str(path), n=10)
    assert len(ds) == 10 and ds.column_names == ["prompt", "chosen", "rejected"]
    row = ds[0]
    i = row["prompt"][0]["content"][1:]
    assert row["prompt"] == _msgs(("user", f"q{i}"))
    assert row["chosen"] == _msgs(("assistant", f"good {i}")) and row["rejected"] == _msgs(
        ("assistant", f"bad {i}")
    )


def test_load_hub_preference_dataset_keeps_an_explicit_prompt_and_names_missing_columns(
    tmp_path, tmp_datasets_cache
):
    path = tmp_path / "explicit.jsonl"
    path.write_text(
        "\n".join(
            json.dumps(
                {
                    "prompt": _msgs(("user", "q")),
                    "chosen": _msgs(("assistant", "a")),
                    "rejected": _msgs(("assistant", "b")),
                }
            )
            for _ in range(4)
        )
    )
    ds = hub.load_hub_preference_dataset(str(path))
    assert ds[0]["prompt"] == _msgs(("user", "q")) and ds[0]["chosen"] == _msgs(("assistant", "a"))
    bad = tmp_path / "bad.jsonl"
    bad.write_text("\n".join(json.dumps({"prompt": "q", "answer": "a"}) for _ in range(4)))
    with pytest.raises(ValueError, match="chosen"):
        hub.load_hub_preference_dataset(str(bad))


def test_hub_profile_names_real_checkpoints_and_datasets():
    p = config.get_profile("hub")
    assert p.base_model and p.sft_model and p.sft_dataset and p.preference_dataset and p.pretrain_dataset
    with pytest.raises(hub.HubUnavailableError, match="tiny"):
        hub.load_hub_preference_dataset(p.preference_dataset)


def test_rlhf_runs_on_a_hub_shaped_model_and_real_prompts(hub_folder):
    """Chapter 3 on the hub profile: a reward model and PPO on a Hub-layout checkpoint, with
    prompts the gold judge cannot score (so PPO's gold score is NaN)."""
    from utils.hub import load_hub_model
    from utils.ppo import PPOSettings, train_ppo, value_model_from
    from utils.reward import reward_model_from
    from utils.rollout import rollout_scores, sample_rollout

    model, tok = load_hub_model(str(hub_folder))
    prompts = [[{"role": "user", "content": f"Write one sentence about the number {i}."}] for i in range(8)]
    rm = reward_model_from(model, tok)
    scores = rollout_scores(rm, tok, sample_rollout(model, tok, prompts, max_new_tokens=6))
    assert scores.shape == (8,)
    s = PPOSettings(iterations=2, batch_size=8, minibatch_size=4, ppo_epochs=1, max_new_tokens=6)
    history = train_ppo(
        copy.deepcopy(model),
        model,
        value_model_from(rm),
        rm,
        tok,
        prompts,
        s,
        reward_norm=(float(scores.mean()), float(scores.std()) + 1e-6),
        gold=False,
        show_progress=False,
    )
    assert len(history) == 2 and math.isnan(history[0]["gold"])
    assert all(math.isfinite(h["reward"]) for h in history)


def test_a_public_reward_model_can_stand_in_for_the_gold_judge(tmp_path, tiny_model, tiny_tokenizer):
    """Project 2 on the hub profile: real prompts, scored by a reward model loaded the Hub's way."""
    from utils.evaluate import evaluate
    from utils.hub import load_hub_judge
    from utils.reward import reward_model_from

    folder = tmp_path / "reward-model"
    reward_model_from(tiny_model, tiny_tokenizer).save_pretrained(folder, safe_serialization=True)
    tiny_tokenizer.save_pretrained(folder)
    judge = load_hub_judge(str(folder))
    prompts = [[{"role": "user", "content": f"Tell me a fact about the number {i}."}] for i in range(5)]
    df = evaluate(tiny_model, tiny_tokenizer, prompts, max_new_tokens=6, judge=judge)
    assert len(df) == 5 and df["gold"].map(math.isfinite).all() and df["correct"].isna().all()
    assert set(df.columns) >= {"response", "finished", "rude", "refused"}
    assert config.get_profile("hub").judge_model and config.get_profile("tiny").judge_model is None


def test_load_hub_judge_refuses_a_classifier_with_several_outputs(tmp_path, tiny_model, tiny_tokenizer):
    from transformers import AutoModelForSequenceClassification

    from utils.hub import load_hub_judge

    folder = tmp_path / "classifier"
    tiny_model.save_pretrained(folder, safe_serialization=True)
    AutoModelForSequenceClassification.from_pretrained(folder, num_labels=3).save_pretrained(folder)
    tiny_tokenizer.save_pretrained(folder)
    with pytest.raises(ValueError, match="3 outputs"):
        load_hub_judge(str(folder))
