"""The stage hand-off (utils.artifacts): a model is stored under a stage's recipe only if it was
trained with the recipe's settings, and ``get`` hands each stage to the next."""

import pytest

from utils import artifacts, cache


def test_save_refuses_a_model_trained_with_other_settings(tiny_model, tiny_tokenizer, tmp_cache, capsys):
    recipe = artifacts.base_recipe()
    settings = {k: recipe[k] for k in ("steps", "batch_size", "lr", "warmup", "seed")}
    changed = settings | {"steps": recipe["steps"] + 100}
    assert artifacts.save_base_model(tiny_model, tiny_tokenizer, trained_with=changed) is None
    said = capsys.readouterr().out
    assert (
        "Not saved" in said
        and f"steps={recipe['steps'] + 100}" in said
        and f"recipe: {recipe['steps']}" in said
    )
    assert not cache.is_cached("base", recipe)

    path = artifacts.save_base_model(tiny_model, tiny_tokenizer, trained_with=settings)
    assert path is not None and cache.is_cached("base", recipe)


def test_save_needs_every_training_setting_and_only_known_ones(tiny_model, tiny_tokenizer, tmp_cache):
    recipe = artifacts.sft_recipe()
    settings = {k: recipe[k] for k in ("epochs", "batch_size", "lr", "warmup", "seed")}
    with pytest.raises(TypeError, match="missing"):
        artifacts.save_sft_model(tiny_model, tiny_tokenizer, trained_with={})  # nothing said: not trusted
    with pytest.raises(TypeError, match="not part of the sft recipe"):
        artifacts.save_sft_model(tiny_model, tiny_tokenizer, trained_with=settings | {"momentum": 0.9})
    assert artifacts.save_sft_model(tiny_model, tiny_tokenizer, trained_with=settings | {"lr": 5e-3}) is None
    assert not cache.is_cached("sft", recipe)


def test_get_names_the_stages():
    with pytest.raises(ValueError, match="unknown stage 'rm'"):
        artifacts.get("rm")
