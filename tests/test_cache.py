"""The artifact cache: keyed by recipe, written atomically, safetensors only."""

import copy
import json

import pytest
import torch

from utils import cache
from utils.artifacts import load_pair as load_model
from utils.artifacts import save_pair as save_model

RECIPE = {"steps": 10, "lr": 3e-3, "model": {"hidden": 32}}


def test_cache_root_follows_the_environment(tmp_cache):
    assert cache.cache_root() == tmp_cache
    assert tmp_cache.is_dir()
    assert cache.artifact_path("base", RECIPE).parent == tmp_cache


def test_recipe_key_is_stable():
    assert cache.recipe_key("base", RECIPE) == cache.recipe_key("base", copy.deepcopy(RECIPE))
    reordered = {"model": {"hidden": 32}, "lr": 3e-3, "steps": 10}
    assert cache.recipe_key("base", reordered) == cache.recipe_key(
        "base", RECIPE
    )  # key order does not matter
    assert len(cache.recipe_key("base", RECIPE)) == 16


@pytest.mark.parametrize(
    "change",
    [
        {"steps": 11},
        {"lr": 3e-4},
        {"model": {"hidden": 64}},
        {"extra": None},
    ],
)
def test_recipe_key_changes_with_the_recipe(change):
    assert cache.recipe_key("base", RECIPE | change) != cache.recipe_key("base", RECIPE)


def test_recipe_key_depends_on_the_name():
    assert cache.recipe_key("base", RECIPE) != cache.recipe_key("sft", RECIPE)


def test_save_artifact_writes_the_folder_and_the_recipe(tmp_cache):
    path = cache.save_artifact("thing", RECIPE, lambda tmp: (tmp / "data.txt").write_text("hello"))
    assert path == cache.artifact_path("thing", RECIPE)
    assert (path / "data.txt").read_text() == "hello"
    assert json.loads((path / cache.RECIPE_FILE).read_text()) == {
        "name": "thing",
        "recipe": RECIPE,
        "course_seed": 0,
    }
    assert cache.is_cached("thing", RECIPE)
    assert not cache.is_cached("thing", RECIPE | {"steps": 99})
    assert [p.name for p in tmp_cache.iterdir()] == [path.name]  # no temporary folder left


def test_failed_write_leaves_nothing_loadable(tmp_cache):
    seen = {}

    def write(tmp):
        seen["tmp"] = tmp
        assert tmp.name.startswith(".tmp-")
        (tmp / "model.safetensors").write_bytes(b"half a model")
        raise RuntimeError("killed mid-write")

    with pytest.raises(RuntimeError, match="killed mid-write"):
        cache.save_artifact("thing", RECIPE, write)
    assert not cache.artifact_path("thing", RECIPE).exists()
    assert not cache.is_cached("thing", RECIPE)
    assert not seen["tmp"].exists()  # save_artifact removes its temporary folder itself
    assert list(tmp_cache.iterdir()) == []


def test_keyboard_interrupt_also_cleans_up(tmp_cache):
    def write(tmp):
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        cache.save_artifact("thing", RECIPE, write)
    assert list(tmp_cache.iterdir()) == []


def test_clean_partial_removes_leftovers_of_a_killed_process(tmp_cache):
    # a process killed with SIGKILL cannot clean up: it leaves .tmp-* (and maybe .old-*) folders
    (tmp_cache / ".tmp-thing-abc-1234").mkdir(parents=True)
    (tmp_cache / ".tmp-thing-abc-1234" / "model.safetensors").write_bytes(b"partial")
    (tmp_cache / ".old-thing-abc-5678").mkdir()
    kept = cache.save_artifact("thing", RECIPE, lambda tmp: None)
    removed = cache.clean_partial()
    assert sorted(p.name for p in removed) == [".old-thing-abc-5678", ".tmp-thing-abc-1234"]
    assert [p.name for p in tmp_cache.iterdir()] == [kept.name]
    assert cache.clean_partial() == []


def test_save_artifact_replaces_an_existing_artifact(tmp_cache):
    cache.save_artifact("thing", RECIPE, lambda tmp: (tmp / "v.txt").write_text("1"))
    path = cache.save_artifact("thing", RECIPE, lambda tmp: (tmp / "v.txt").write_text("2"))
    assert (path / "v.txt").read_text() == "2"
    assert [p.name for p in tmp_cache.iterdir()] == [path.name]


class Counter:
    def __init__(self):
        self.builds, self.loads = 0, 0

    def build(self, value="built"):
        self.builds += 1
        return f"{value}-{self.builds}"

    def save(self, obj, path):
        (path / "obj.txt").write_text(obj)

    def load(self, path):
        self.loads += 1
        return (path / "obj.txt").read_text()


def test_load_or_build_builds_once_then_loads(tmp_cache):
    c = Counter()
    first = cache.load_or_build("thing", RECIPE, c.build, c.save, c.load)
    second = cache.load_or_build("thing", RECIPE, c.build, c.save, c.load)
    third = cache.load_or_build("thing", RECIPE, c.build, c.save, c.load)
    assert first == second == third == "built-1"
    assert (c.builds, c.loads) == (1, 3)  # a fresh build is loaded back too: what a later run will load


def test_a_changed_recipe_triggers_a_rebuild(tmp_cache):
    c = Counter()
    cache.load_or_build("thing", RECIPE, c.build, c.save, c.load)
    changed = cache.load_or_build("thing", RECIPE | {"lr": 1e-3}, c.build, c.save, c.load)
    assert changed == "built-2" and c.builds == 2
    assert (
        cache.load_or_build("thing", RECIPE, c.build, c.save, c.load) == "built-1"
    )  # the old one is still there
    assert c.builds == 2


def test_rebuild_forces_a_build(tmp_cache):
    c = Counter()
    cache.load_or_build("thing", RECIPE, c.build, c.save, c.load)
    rebuilt = cache.load_or_build("thing", RECIPE, c.build, c.save, c.load, rebuild=True)
    assert rebuilt == "built-2" and c.builds == 2
    assert (
        cache.load_or_build("thing", RECIPE, c.build, c.save, c.load) == "built-2"
    )  # the rebuilt one replaced it


def test_a_failed_build_caches_nothing(tmp_cache):
    c = Counter()

    def broken():
        raise ValueError("bad data")

    with pytest.raises(ValueError, match="bad data"):
        cache.load_or_build("thing", RECIPE, broken, c.save, c.load)
    assert not cache.is_cached("thing", RECIPE)
    assert cache.load_or_build("thing", RECIPE, c.build, c.save, c.load) == "built-1"


def test_model_round_trip_is_exact_and_safe(tmp_cache, tiny_model, tiny_tokenizer):
    path = cache.save_artifact("base", RECIPE, lambda tmp: save_model((tiny_model, tiny_tokenizer), tmp))
    files = {p.name for p in path.iterdir()}
    assert "model.safetensors" in files
    assert not [f for f in files if f.endswith((".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt"))], files
    model, tok = load_model(path)
    assert not model.training
    ids = torch.tensor(
        [tiny_tokenizer("Alba is blue. 3 plus 4 is 7.", add_special_tokens=False)["input_ids"]]
    )
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids).logits, tiny_model(input_ids=ids).logits)
    assert tok.get_vocab() == tiny_tokenizer.get_vocab()
    assert tok.chat_template == tiny_tokenizer.chat_template
    assert model.config.tie_word_embeddings
    assert model.generation_config.eos_token_id == tiny_model.generation_config.eos_token_id


def test_load_or_build_with_a_model(tmp_cache, tiny_model, tiny_tokenizer):
    c = {"builds": 0}

    def build():
        c["builds"] += 1
        return tiny_model, tiny_tokenizer

    cache.load_or_build("base", RECIPE, build, save_model, load_model)
    model, _ = cache.load_or_build("base", RECIPE, build, save_model, load_model)
    assert c["builds"] == 1
    assert model is not tiny_model
    for (n1, p1), (n2, p2) in zip(model.state_dict().items(), tiny_model.state_dict().items()):
        assert n1 == n2 and torch.equal(p1, p2)


def test_each_course_seed_has_its_own_artifacts(tmp_cache, monkeypatch):
    """Every seed in a recipe is shifted by COURSE_SEED, so a run with another seed must not reuse a model."""
    monkeypatch.setenv("COURSE_SEED", "0")
    key0 = cache.recipe_key("thing", RECIPE)
    c = Counter()
    cache.load_or_build("thing", RECIPE, c.build, c.save, c.load)
    monkeypatch.setenv("COURSE_SEED", "1")
    assert cache.recipe_key("thing", RECIPE) != key0
    assert cache.load_or_build("thing", RECIPE, c.build, c.save, c.load) == "built-2"
    monkeypatch.setenv("COURSE_SEED", "0")
    assert cache.load_or_build("thing", RECIPE, c.build, c.save, c.load) == "built-1"
    assert (
        json.loads((cache.artifact_path("thing", RECIPE) / cache.RECIPE_FILE).read_text())["course_seed"] == 0
    )
