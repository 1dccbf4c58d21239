"""TinyWorld as `datasets` objects in TRL's formats, and LM batching."""

import numpy as np
import pytest
import torch
from datasets import Dataset, DatasetDict

from utils import data as D
from utils import judge as J
from utils.tokenizer import DOC_SEP
from utils.world import make_world, parse_request, split_of

WORLD = make_world()


def first_user_turn(messages):
    return next(m["content"] for m in messages if m["role"] == "user")


# --- pretraining ---------------------------------------------------------------------------
def test_pretraining_dataset_schema():
    ds = D.pretraining_dataset(400, validation_fraction=0.1)
    assert isinstance(ds, DatasetDict)
    assert set(ds) == {"train", "validation"}
    assert len(ds["train"]) == 360 and len(ds["validation"]) == 40
    for split in ds.values():
        assert {"text", "source"} <= set(split.column_names)
        assert all(isinstance(t, str) and t for t in split["text"])
    assert not set(ds["train"]["text"]) & set(ds["validation"]["text"]) or len(ds["validation"]) < 400


def test_pretraining_dataset_is_deterministic():
    assert D.pretraining_dataset(200)["train"]["text"] == D.pretraining_dataset(200)["train"]["text"]
    assert D.pretraining_dataset(200, seed=1)["train"]["text"] != D.pretraining_dataset(200)["train"]["text"]


# --- SFT -----------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def sft_sets():
    return {fmt: D.sft_dataset(400, fmt, validation=50) for fmt in D.SFT_FORMATS}


def test_sft_messages_format(sft_sets):
    ds = sft_sets["messages"]
    assert set(ds) == {"train", "validation"} and len(ds["train"]) == 400 and len(ds["validation"]) == 50
    assert set(ds["train"].column_names) == {"messages", "style", "gold"}
    n_dialogues = 0
    for msgs in ds["train"]["messages"]:
        roles = [m["role"] for m in msgs]
        assert roles in (["user", "assistant"], ["user", "assistant", "user", "assistant"]), roles
        n_dialogues += len(msgs) == 4
    assert 0.05 < n_dialogues / 400 < 0.3  # the documented 15% dialogues


def test_sft_alpaca_format(sft_sets):
    ds = sft_sets["alpaca"]["train"]
    assert set(ds.column_names) == {"instruction", "input", "output", "style", "gold"}
    assert all(r["instruction"] and r["output"] for r in ds)
    with_history = [r for r in ds if r["input"]]
    assert with_history, "dialogues put their earlier turns into `input`"
    assert all(r["input"].startswith("user: ") and " assistant: " in r["input"] for r in with_history)


def test_sft_prompt_completion_format(sft_sets):
    ds = sft_sets["prompt_completion"]["train"]
    assert set(ds.column_names) == {"prompt", "completion", "style", "gold"}
    for r in ds:
        assert r["prompt"][-1]["role"] == "user"
        assert [m["role"] for m in r["completion"]] == ["assistant"]


def test_sft_formats_hold_the_same_demonstrations(sft_sets):
    msgs = sft_sets["messages"]["train"]
    pc = sft_sets["prompt_completion"]["train"]
    alpaca = sft_sets["alpaca"]["train"]
    for i in range(0, 400, 37):
        assert msgs[i]["messages"] == pc[i]["prompt"] + pc[i]["completion"]
        assert alpaca[i]["output"] == msgs[i]["messages"][-1]["content"]
        assert alpaca[i]["instruction"] == msgs[i]["messages"][-2]["content"]


def test_sft_prompts_are_all_from_the_train_split(sft_sets):
    for fmt in ("messages", "prompt_completion"):
        for split in ("train", "validation"):
            col = "messages" if fmt == "messages" else "prompt"
            firsts = [first_user_turn(m) for m in sft_sets[fmt][split][col]]
            assert {split_of(t) for t in firsts} == {"train"}, (fmt, split)
    for r in sft_sets["alpaca"]["train"]:
        first = r["input"].split("user: ", 1)[1].split(" assistant: ")[0] if r["input"] else r["instruction"]
        assert split_of(first) == "train", first


def test_sft_gold_column_is_the_judges_score(sft_sets):
    ds = sft_sets["messages"]["train"]
    for r in ds.select(range(60)):
        assert r["gold"] == pytest.approx(J.score(r["messages"][:-1], r["messages"][-1]["content"]))
    styles = set(ds["style"])
    assert {"good", "terse", "verbose", "rude", "wrong"} <= styles


def test_sft_dataset_is_deterministic():
    a = D.sft_dataset(50, validation=5)["train"]["messages"]
    b = D.sft_dataset(50, validation=5)["train"]["messages"]
    c = D.sft_dataset(50, validation=5, seed=1)["train"]["messages"]
    assert a == b and a != c


def test_sft_dataset_rejects_an_unknown_format():
    with pytest.raises(ValueError, match="unknown SFT format 'chatml'.*messages"):
        D.sft_dataset(10, fmt="chatml")


# --- evaluation prompts --------------------------------------------------------------------
def _check_eval_set(ds, n, split):
    assert len(ds) == n
    assert set(ds.column_names) == {"prompt", "kind"}
    keys = [tuple(m["content"] for m in p) for p in ds["prompt"]]
    assert len(set(keys)) == n, "evaluation prompts must be distinct"
    assert {split_of(first_user_turn(p)) for p in ds["prompt"]} == {split}
    for p, kind in zip(ds["prompt"], ds["kind"]):
        req = parse_request(p, WORLD)
        assert req is not None
        assert kind == ("dialogue" if len(p) > 1 else req.kind)


def test_eval_conversations_default_gives_800_distinct_test_prompts():
    ds = D.eval_conversations(800)
    _check_eval_set(ds, 800, "test")
    assert set(ds["kind"]) == {"fact", "math", "opposite", "unsafe"}


def test_eval_conversations_with_dialogues():
    ds = D.eval_conversations(800, split="test", dialogues=0.1)
    _check_eval_set(ds, 800, "test")
    assert set(ds["kind"]) == {"fact", "math", "opposite", "unsafe", "dialogue"}
    assert ds["kind"].count("dialogue") == 80


def test_eval_conversations_train_split_is_disjoint_from_test():
    test = D.eval_conversations(300, split="test", dialogues=0.1)
    train = D.eval_conversations(300, split="train", dialogues=0.1)
    _check_eval_set(train, 300, "train")
    assert not {first_user_turn(p) for p in test["prompt"]} & {first_user_turn(p) for p in train["prompt"]}


def test_eval_conversations_is_deterministic():
    a = D.eval_conversations(100, dialogues=0.2, seed=3)["prompt"]
    assert a == D.eval_conversations(100, dialogues=0.2, seed=3)["prompt"]
    assert a != D.eval_conversations(100, dialogues=0.2, seed=4)["prompt"]


def test_eval_conversations_asks_for_too_many():
    with pytest.raises(ValueError, match="distinct prompts; ask for fewer"):
        D.eval_conversations(5000, dialogues=0.01)


def test_evaluation_set_is_chapter_2s_800_prompts_and_prints_its_mix(capsys):
    ds = D.evaluation_set()
    assert ds["prompt"] == D.eval_conversations(800, split="test", seed=0, dialogues=0.25)["prompt"]
    assert ds["kind"].count("dialogue") == 200
    out = capsys.readouterr().out
    assert "800 held-out prompts" in out and D.kind_mix(ds["kind"]) in out


@pytest.mark.parametrize("n", [160, 200, 400, 7])
def test_evaluation_subsets_keep_the_mix_and_the_order(n, capsys):
    full = D.evaluation_set(show=False)
    sub = D.evaluation_set(n)
    assert len(sub) == n
    assert f"{n} of the 800" in capsys.readouterr().out
    # a subsequence of the full set, in its order
    it = iter(full["prompt"])
    assert all(any(p == q for q in it) for p in sub["prompt"])
    for kind in set(full["kind"]):
        share, sub_count = full["kind"].count(kind) / len(full), sub["kind"].count(kind)
        assert abs(sub_count - n * share) < 1, (kind, sub_count, n * share)


def test_the_book_states_the_evaluation_sets_mix():
    from pathlib import Path

    ds = D.evaluation_set(show=False)
    page = " ".join((Path(__file__).parent.parent / "book" / "tinyworld.md").read_text().split())
    assert D.kind_mix(ds["kind"]) in page
    counts = {k: ds["kind"].count(k) for k in ("fact", "unsafe", "opposite", "math", "dialogue")}
    stated = "({fact} fact questions, {unsafe} unsafe requests and {opposite} opposites), {math} sums"
    assert stated.format(**counts) + f", and {counts['dialogue']}" in page


def test_evaluation_set_is_the_same_for_every_course_seed(monkeypatch):
    a = D.evaluation_set(160, show=False)["prompt"]
    monkeypatch.setenv("COURSE_SEED", "2")
    assert D.evaluation_set(160, show=False)["prompt"] == a


def test_prompt_kinds_label_prompts_as_eval_conversations_does():
    ds = D.eval_conversations(300, dialogues=0.2, seed=1)
    assert D.prompt_kinds(ds["prompt"]) == ds["kind"]
    assert D.prompt_kinds([[{"role": "user", "content": "Write me a haiku about tea."}]]) == ["other"]


# --- preferences ---------------------------------------------------------------------------
def _convs(*texts):
    return [[{"role": "user", "content": t}] for t in texts]


def test_label_pairs_format_and_dropping_identical_pairs():
    food = WORLD.creatures["Alba"].food
    convs = _convs("What is 3 plus 4?", "What does Alba eat?", "What is the opposite of hot?")
    a = ["3 plus 4 is 7.", f"Alba eats {food}.", "The opposite of hot is cold."]
    b = ["3 plus 4 is 9.", f" Alba eats {food}. ", "Duh, the opposite of hot is cold."]
    ds = D.label_pairs(convs, a, b, seed=0)
    assert len(ds) == 2  # the second pair differs only by whitespace: dropped
    assert set(ds.column_names) == {
        "prompt",
        "chosen",
        "rejected",
        "gold_chosen",
        "gold_rejected",
        "label_correct",
    }
    for row, i in zip(ds, (0, 2)):
        assert row["prompt"] == convs[i]
        assert [m["role"] for m in row["chosen"]] == ["assistant"] == [m["role"] for m in row["rejected"]]
        assert {row["chosen"][0]["content"], row["rejected"][0]["content"]} == {a[i], b[i]}
        assert row["gold_chosen"] == J.score(convs[i], row["chosen"][0]["content"])
        assert row["gold_rejected"] == J.score(convs[i], row["rejected"][0]["content"])
        assert row["label_correct"] == (row["gold_chosen"] >= row["gold_rejected"])


def test_label_pairs_uses_finished_flags():
    convs = _convs("What is 3 plus 4?") * 200
    ds = D.label_pairs(
        convs,
        ["3 plus 4 is 7."] * 200,
        ["3 plus 4 is 7!"] * 200,
        finished_a=[True] * 200,
        finished_b=[False] * 200,
    )
    assert set(ds["gold_chosen"]) | set(ds["gold_rejected"]) == {1.0, 0.5}
    accuracy = np.mean(ds["label_correct"])
    assert accuracy == pytest.approx(J.preference_probability(1.0, 0.5), abs=0.1)


def test_label_pairs_is_seeded():
    convs = _convs("What is 3 plus 4?") * 50
    args = (convs, ["3 plus 4 is 7."] * 50, ["3 plus 4 is 7"] * 50)
    assert D.label_pairs(*args, seed=0)["chosen"] == D.label_pairs(*args, seed=0)["chosen"]
    assert D.label_pairs(*args, seed=0)["chosen"] != D.label_pairs(*args, seed=1)["chosen"]


def test_label_pairs_drop_ties():
    convs = _convs("What is 3 plus 4?", "What is 3 plus 4?")
    a, b = (
        ["3 plus 4 is 8.", "3 plus 4 is 7."],
        ["3 plus 4 is 9.", "3 plus 4 is 6."],
    )  # first pair: both wrong
    kept = D.label_pairs(convs, a, b, drop_ties=True)
    assert len(kept) == 1 and kept[0]["gold_chosen"] != kept[0]["gold_rejected"]
    both = D.label_pairs(convs, a, b, drop_ties=False)
    assert len(both) == 2
    tie = both[0]
    assert (
        tie["gold_chosen"] == tie["gold_rejected"] == -1.0 and tie["label_correct"]
    )  # ties count as correct


def test_annotator_preferences_are_noisy_but_informative():
    ds = D.annotator_preferences(600)
    assert len(ds) == 600  # exactly n, after identical responses and ties are dropped
    assert all(c != r for c, r in zip(ds["gold_chosen"], ds["gold_rejected"]))
    assert {"prompt", "chosen", "rejected"} <= set(ds.column_names)
    accuracy = float(np.mean(ds["label_correct"]))
    assert 0.6 < accuracy < 0.99, accuracy
    assert all(c != r for c, r in zip(ds["chosen"], ds["rejected"]))
    assert {split_of(first_user_turn(p)) for p in ds["prompt"]} == {"train"}
    assert ds["prompt"] == D.annotator_preferences(600)["prompt"]  # deterministic


# --- helpers -------------------------------------------------------------------------------
def test_require_columns_names_the_missing_column():
    from utils.formats import require_columns

    ds = Dataset.from_dict({"prompt": ["a"], "rejected": ["b"]})
    with pytest.raises(ValueError, match=r"DPO needs the column\(s\) \['chosen'\].*\['prompt', 'rejected'\]"):
        require_columns(ds, ["prompt", "chosen", "rejected"], "DPO")
    require_columns(ds, ["prompt"], "DPO")  # present: no error


def test_pack_texts(tiny_tokenizer, corpus_texts):
    texts = corpus_texts[:200]
    blocks = D.pack_texts(tiny_tokenizer, texts, 64)
    sep = tiny_tokenizer.convert_tokens_to_ids(DOC_SEP)
    stream = []
    for ids in tiny_tokenizer(texts, add_special_tokens=False)["input_ids"]:
        stream += ids + [sep]
    assert blocks.dtype == torch.long
    assert blocks.shape == (len(stream) // 64, 64)
    assert (
        blocks.flatten().tolist() == stream[: blocks.numel()]
    )  # documents joined by the separator, in order
    assert (blocks == sep).sum() > 150
    first_len = len(tiny_tokenizer(texts[0], add_special_tokens=False)["input_ids"])
    assert blocks[0, first_len] == sep
    assert tiny_tokenizer.decode(blocks[0, :first_len]).strip() == texts[0]


def test_pack_texts_too_little_text(tiny_tokenizer):
    with pytest.raises(ValueError, match="not enough text for one block of 512"):
        D.pack_texts(tiny_tokenizer, ["Alba is red."], 512)


def test_lm_batches_is_deterministic_and_covers_every_block():
    blocks = torch.arange(40).view(10, 4)
    a = [b.clone() for b in D.lm_batches(blocks, 5, 6, seed=0)]
    b = [b.clone() for b in D.lm_batches(blocks, 5, 6, seed=0)]
    c = [b.clone() for b in D.lm_batches(blocks, 5, 6, seed=1)]
    assert len(a) == 6 and all(x.shape == (5, 4) for x in a)
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    assert not all(torch.equal(x, y) for x, y in zip(a, c))
    for epoch in range(3):  # each epoch (two batches) sees every block exactly once
        rows = torch.cat(a[2 * epoch : 2 * epoch + 2])[:, 0].div(4, rounding_mode="floor")
        assert sorted(rows.tolist()) == list(range(10))


def test_dialogue_conversations_mix_kinds_and_never_share_an_opener_across_splits():
    test = D.dialogue_conversations(400, split="test", seed=0, arithmetic=0.25)
    train = D.dialogue_conversations(400, split="train", seed=1, arithmetic=0.25)
    for ds, split in ((test, "test"), (train, "train")):
        kinds = list(ds["kind"])
        assert kinds.count("arithmetic") == 100 and set(kinds) == {"fact", "unsafe", "arithmetic"}
        assert len({tuple(m["content"] for m in p) for p in ds["prompt"]}) == 400  # distinct
        assert all(split_of(p[0]["content"]) == split for p in ds["prompt"])
        for p, k in zip(ds["prompt"], kinds):
            req = parse_request(p, make_world())
            assert len(p) == 3 and req.kind == {"arithmetic": "math"}.get(k, k)
    assert not {p[0]["content"] for p in test["prompt"]} & {p[0]["content"] for p in train["prompt"]}
    assert D.dialogue_conversations(400, split="test", seed=0)["prompt"] == test["prompt"]  # deterministic


def test_kind_mix_lists_each_kind_by_share():
    assert D.kind_mix(["math", "fact", "math", "unsafe"]) == "math 50%, fact 25%, unsafe 25%"


def test_dialogue_conversations_can_leave_out_another_sets_openers():
    train = D.dialogue_conversations(200, split="train", seed=1)
    used = {p[0]["content"] for p in train["prompt"]}
    validation = D.dialogue_conversations(80, split="train", seed=2, exclude_openers=used)
    openers = [p[0]["content"] for p in validation["prompt"]]
    assert len(validation) == 80 and not used & set(openers)
    assert all(split_of(o) == "train" for o in openers)
    # the same mix as any other set: a quarter arithmetic follow-ups
    assert list(validation["kind"]).count("arithmetic") == 20
    # without the exclusion, the same draw shares openers with the training set
    plain = D.dialogue_conversations(80, split="train", seed=2)
    assert used & {p[0]["content"] for p in plain["prompt"]}
