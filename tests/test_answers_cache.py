"""A model's answers are computed once per weights, tokenizer, prompts and settings, and never reused for
a model whose weights changed: the cache behind ``utils.evaluate.evaluate``."""

import copy

import torch

from utils import evaluate as ev


def _convs():
    return [[{"role": "user", "content": f"What colour is creature {i}?"}] for i in range(6)]


def test_the_same_model_is_answered_once(tiny_model, tiny_tokenizer, tmp_cache, monkeypatch):
    calls = []
    real = ev.generate_responses
    monkeypatch.setattr(ev, "generate_responses", lambda *a, **k: calls.append(k) or real(*a, **k))
    first = ev.cached_responses(tiny_model, tiny_tokenizer, _convs(), do_sample=True, seed=3)
    again = ev.cached_responses(tiny_model, tiny_tokenizer, _convs(), do_sample=True, seed=3)
    assert len(calls) == 1
    assert again == first
    assert any(p.name.startswith("answers-") for p in tmp_cache.iterdir())
    # other settings, other prompts: answered anew
    ev.cached_responses(tiny_model, tiny_tokenizer, _convs(), do_sample=True, seed=4)
    ev.cached_responses(tiny_model, tiny_tokenizer, _convs()[:5], do_sample=True, seed=3)
    ev.cached_responses(tiny_model, tiny_tokenizer, _convs(), do_sample=False, seed=3)
    assert len(calls) == 4


def test_changed_weights_are_answered_anew(tiny_model, tiny_tokenizer, tmp_cache, monkeypatch):
    calls = []
    real = ev.generate_responses
    monkeypatch.setattr(ev, "generate_responses", lambda *a, **k: calls.append(1) or real(*a, **k))
    model = copy.deepcopy(tiny_model)
    ev.cached_responses(model, tiny_tokenizer, _convs(), do_sample=True, seed=3)
    with torch.no_grad():
        model.lm_head.weight[0, 0] += 1e-3  # in place, as a training step does
    ev.cached_responses(model, tiny_tokenizer, _convs(), do_sample=True, seed=3)
    assert len(calls) == 2


def test_a_changed_chat_template_is_a_new_tokenizer(tiny_model, tiny_tokenizer):
    tok = copy.deepcopy(tiny_tokenizer)
    before = ev.tokenizer_fingerprint(tok)
    assert ev.tokenizer_fingerprint(tok) == before
    tok.chat_template = tok.chat_template + " "
    assert ev.tokenizer_fingerprint(tok) != before


def test_evaluate_reads_the_cache(tiny_model, tiny_tokenizer, tmp_cache):
    from utils.data import eval_conversations

    convs = eval_conversations(8, split="test", seed=0)["prompt"]
    a = ev.evaluate(tiny_model, tiny_tokenizer, convs, do_sample=True, seed=3)
    b = ev.evaluate(tiny_model, tiny_tokenizer, convs, do_sample=True, seed=3)
    assert a.equals(b)


def test_a_datasets_column_is_the_same_prompts_as_its_list(
    tiny_model, tiny_tokenizer, tmp_cache, monkeypatch
):
    """Chapter 3 passes ``dataset["prompt"]`` (a lazy column): it must hit the list's entry."""
    import datasets

    calls = []
    real = ev.generate_responses
    monkeypatch.setattr(ev, "generate_responses", lambda *a, **k: calls.append(1) or real(*a, **k))
    column = datasets.Dataset.from_dict({"prompt": _convs()})["prompt"]
    first = ev.cached_responses(tiny_model, tiny_tokenizer, column, do_sample=True, seed=3)
    again = ev.cached_responses(tiny_model, tiny_tokenizer, _convs(), do_sample=True, seed=3)
    assert len(calls) == 1 and again == first
