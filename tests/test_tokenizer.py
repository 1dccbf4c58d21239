"""The course tokenizer: lossless, names as single tokens, and a chat template TRL can mask."""

import copy

import pytest
from transformers import AutoTokenizer

from utils import tokenizer as T
from utils.world import NAMES, make_world

MESSAGES = [
    {"role": "system", "content": "Be kind."},
    {"role": "user", "content": "What colour is Alba?"},
    {"role": "assistant", "content": "Alba is blue."},
    {"role": "user", "content": "What does it eat?"},
    {"role": "assistant", "content": "Alba eats apples."},
]


def ids_of(tok, text):
    return tok(text, add_special_tokens=False)["input_ids"]


def test_round_trip_on_corpus_text(tiny_tokenizer, corpus_texts):
    for text in corpus_texts[:300]:
        assert tiny_tokenizer.decode(ids_of(tiny_tokenizer, text)).strip() == text


def test_round_trip_on_unseen_text(tiny_tokenizer):
    text = "Zebras can't type ümlauts or emoji 🙂 (42%)!"
    assert (
        tiny_tokenizer.decode(ids_of(tiny_tokenizer, text)).strip() == text
    )  # byte-level: nothing is unknown


def test_vocabulary_size(tiny_tokenizer):
    assert 500 < len(tiny_tokenizer) <= 1024
    assert tiny_tokenizer.unk_token is None


@pytest.mark.parametrize("name", NAMES)
def test_creature_names_are_single_tokens(tiny_tokenizer, name):
    assert len(ids_of(tiny_tokenizer, name)) == 1
    assert ids_of(tiny_tokenizer, name) == ids_of(
        tiny_tokenizer, f" {name}"
    )  # same token at a document start
    assert ids_of(tiny_tokenizer, name)[0] in ids_of(tiny_tokenizer, f"Zq zq {name}.")  # ... and mid-sentence


def test_small_numbers_are_single_tokens(tiny_tokenizer):
    assert all(len(ids_of(tiny_tokenizer, str(i))) == 1 for i in range(21))


@pytest.mark.parametrize("special", T.SPECIAL_TOKENS)
def test_special_tokens_are_single_ids(tiny_tokenizer, special):
    ids = ids_of(tiny_tokenizer, special)
    assert len(ids) == 1
    assert ids[0] == tiny_tokenizer.convert_tokens_to_ids(special)
    assert ids[0] < len(T.SPECIAL_TOKENS)  # reserved at the start of the vocabulary


def test_special_token_roles(tiny_tokenizer):
    assert tiny_tokenizer.eos_token == T.END
    assert tiny_tokenizer.pad_token == T.PAD
    assert tiny_tokenizer.bos_token == T.DOC_SEP
    assert len({tiny_tokenizer.eos_token_id, tiny_tokenizer.pad_token_id, tiny_tokenizer.bos_token_id}) == 3
    assert ids_of(tiny_tokenizer, "Alba is blue.")[0] != tiny_tokenizer.bos_token_id  # no BOS added to text


def test_chat_template_renders_every_role(tiny_tokenizer):
    text = tiny_tokenizer.apply_chat_template(MESSAGES, tokenize=False)
    assert text == (
        "<|system|>Be kind.<|end|><|user|>What colour is Alba?<|end|>"
        "<|assistant|>Alba is blue.<|end|><|user|>What does it eat?<|end|>"
        "<|assistant|>Alba eats apples.<|end|>"
    )


def test_generation_prompt_ends_with_the_assistant_marker(tiny_tokenizer):
    prompt = tiny_tokenizer.apply_chat_template(MESSAGES[:2], tokenize=False, add_generation_prompt=True)
    assert prompt.endswith(T.USER + "What colour is Alba?" + T.END + T.ASSISTANT)
    no_prompt = tiny_tokenizer.apply_chat_template(MESSAGES[:2], tokenize=False, add_generation_prompt=False)
    assert not no_prompt.endswith(T.ASSISTANT)


def test_chat_template_rejects_unknown_roles(tiny_tokenizer):
    with pytest.raises(Exception, match="unknown role: tool"):
        tiny_tokenizer.apply_chat_template([{"role": "tool", "content": "x"}], tokenize=False)


def test_assistant_mask_covers_exactly_the_assistant_content_and_end(tiny_tokenizer):
    enc = tiny_tokenizer.apply_chat_template(
        MESSAGES, tokenize=True, return_dict=True, return_assistant_tokens_mask=True
    )
    ids, mask = enc["input_ids"], enc["assistant_masks"]
    assert len(ids) == len(mask)
    end = tiny_tokenizer.convert_tokens_to_ids(T.END)
    expected = (
        ids_of(tiny_tokenizer, "Alba is blue.") + [end] + ids_of(tiny_tokenizer, "Alba eats apples.") + [end]
    )
    assert [t for t, m in zip(ids, mask) if m] == expected
    # the marked tokens are two contiguous runs, each right after an <|assistant|> marker
    assistant = tiny_tokenizer.convert_tokens_to_ids(T.ASSISTANT)
    starts = [i for i in range(1, len(mask)) if mask[i] and not mask[i - 1]]
    assert len(starts) == 2 and all(ids[i - 1] == assistant for i in starts)
    assert mask[-1] == 1 and ids[-1] == end


def test_check_chat_template_accepts_the_course_tokenizer(tiny_tokenizer):
    T.check_chat_template(tiny_tokenizer)  # no error


def test_check_chat_template_without_a_template(tiny_tokenizer):
    tok = copy.deepcopy(tiny_tokenizer)
    tok.chat_template = None
    with pytest.raises(ValueError, match="has no chat template.*CHAT_TEMPLATE"):
        T.check_chat_template(tok)


def test_check_chat_template_without_generation_markers(tiny_tokenizer):
    tok = copy.deepcopy(tiny_tokenizer)
    tok.chat_template = T.CHAT_TEMPLATE.replace("{% generation %}", "").replace("{% endgeneration %}", "")
    assert "Alba" in tok.apply_chat_template(MESSAGES, tokenize=False)  # it still renders ...
    with pytest.raises(ValueError, match=r"no \{% generation %\}.*assistant-only loss"):
        T.check_chat_template(tok)  # ... but cannot find the assistant's tokens


def test_check_chat_template_accepts_whitespace_control_markers(tiny_tokenizer):
    tok = copy.deepcopy(tiny_tokenizer)
    tok.chat_template = T.CHAT_TEMPLATE.replace("{% generation %}", "{%- generation %}")
    T.check_chat_template(tok)


def test_save_and_reload_keeps_the_chat_template(tiny_tokenizer, tmp_path):
    tiny_tokenizer.save_pretrained(tmp_path)
    loaded = AutoTokenizer.from_pretrained(tmp_path, trust_remote_code=False)
    assert loaded.chat_template == T.CHAT_TEMPLATE
    assert loaded.apply_chat_template(MESSAGES, tokenize=False) == tiny_tokenizer.apply_chat_template(
        MESSAGES, tokenize=False
    )
    assert (loaded.eos_token, loaded.pad_token, loaded.bos_token) == (T.END, T.PAD, T.DOC_SEP)
    text = "Alba is blue. 3 plus 4 is 7."
    assert ids_of(loaded, text) == ids_of(tiny_tokenizer, text)
    enc = loaded.apply_chat_template(
        MESSAGES, tokenize=True, return_dict=True, return_assistant_tokens_mask=True
    )
    assert (
        sum(enc["assistant_masks"])
        == len(ids_of(loaded, "Alba is blue.")) + len(ids_of(loaded, "Alba eats apples.")) + 2
    )
    T.check_chat_template(loaded)


def test_train_tokenizer_is_deterministic(corpus_texts, tiny_tokenizer):
    again = T.train_tokenizer(corpus_texts)
    assert again.get_vocab() == tiny_tokenizer.get_vocab()


def test_world_values_are_single_tokens(tiny_tokenizer):
    world = make_world()
    values = {v for c in world.creatures.values() for v in (c.colour, c.food, c.home)}
    multi = [v for v in values if len(ids_of(tiny_tokenizer, v)) != 1]
    assert not multi, multi
