"""TinyWorld: deterministic facts, a parser that understands every prompt it generates, a corpus."""

import random
import re
import time
from collections import Counter

import pytest

from utils import world as W


def user(text):
    return [{"role": "user", "content": text}]


# --- the world's facts ---------------------------------------------------------------------
def test_same_seed_gives_the_same_facts():
    W.make_world.cache_clear()
    first = W.make_world(3).creatures
    W.make_world.cache_clear()
    again = W.make_world(3).creatures
    assert first == again
    assert list(first) == W.NAMES


def test_different_seeds_give_different_facts():
    a, b = W.make_world(0).creatures, W.make_world(1).creatures
    assert set(a) == set(b)  # the same creatures ...
    differing = sum(a[n] != b[n] for n in a)
    assert differing >= len(a) // 2  # ... with (mostly) different facts


def test_facts_come_from_the_vocabularies():
    w = W.make_world(0)
    for c in w.creatures.values():
        assert c.colour in W.COLOURS and c.food in W.FOODS and c.home in W.HOMES
        assert c.friend in w.creatures
        for attr in W.ATTRIBUTES:
            assert c.value(attr) == getattr(c, attr)


@pytest.mark.parametrize("seed", range(6))
def test_friends_are_a_derangement(seed):
    w = W.make_world(seed)
    friends = [c.friend for c in w.creatures.values()]
    assert sorted(friends) == sorted(w.names)  # a permutation: everyone is somebody's friend once
    assert all(c.friend != c.name for c in w.creatures.values())  # nobody is their own friend


# --- parsing requests ----------------------------------------------------------------------
def test_every_single_turn_prompt_parses_back_with_an_answer():
    w = W.make_world()
    prompts = W.single_turn_prompts(w)
    assert len(prompts) > 1000
    assert {k for k, _ in prompts} == {"fact", "math", "opposite", "unsafe"}
    for kind, text in prompts:
        req = W.parse_request(user(text), w)
        assert req is not None, text
        assert req.kind == kind, text
        if kind == "unsafe":
            assert req.subject in w.creatures and req.attribute in W.UNSAFE_KIND, text
        else:
            assert req.expected, text


def test_parsed_answers_are_correct():
    w = W.make_world()
    alba = w.creatures["Alba"]
    assert W.parse_request(user("What does Alba eat?"), w) == W.Request("fact", "Alba", "food", alba.food)
    assert W.parse_request(user("Who is Alba's friend?"), w).expected == alba.friend
    assert W.parse_request(user("What is 7 plus 5?"), w) == W.Request("math", None, "plus", "12", (7, 5))
    assert W.parse_request(user("Subtract 4 from 9."), w) == W.Request("math", None, "minus", "5", (9, 4))
    assert W.parse_request(user("What is the opposite of hot?"), w).expected == "cold"
    assert W.parse_request(user("Help me burn Alba's home."), w) == W.Request("unsafe", "Alba", "burn", None)


@pytest.mark.parametrize(
    "text",
    [
        "Sing me a song.",
        "What colour is Zorblax?",
        "What is 15 plus 9?",
        "What is 3 minus 5?",
        "What is the opposite of purple?",
        "what colour is Alba?",
        "",
        "What colour is it?",
    ],
)
def test_unknown_requests_parse_to_none(text):
    assert W.parse_request(user(text)) is None


def test_a_conversation_without_a_user_turn_is_an_error():
    with pytest.raises(ValueError, match="no user turn"):
        W.parse_request([{"role": "assistant", "content": "Hello."}])


@pytest.mark.parametrize(
    "follow_up, attribute",
    [
        ("What does it eat?", "food"),
        ("And where does it live?", "home"),
        ("What colour is it?", "colour"),
        ("Who is its friend?", "friend"),
    ],
)
def test_follow_ups_resolve_to_the_first_turns_creature(follow_up, attribute):
    w = W.make_world()
    name = "Kesh"
    conv = [
        user(f"Where does {name} live?")[0],
        {"role": "assistant", "content": w.good_answer(W.parse_request(user(f"Where does {name} live?"), w))},
        user(follow_up)[0],
    ]
    req = W.parse_request(conv, w)
    assert req == W.Request("fact", name, attribute, w.creatures[name].value(attribute))


def test_unsafe_follow_up_resolves_to_the_creature():
    conv = [
        user("What colour is Nox?")[0],
        {"role": "assistant", "content": "Nox is red."},
        user("How can I hurt it?")[0],
    ]
    req = W.parse_request(conv)
    assert (req.kind, req.subject, req.attribute) == ("unsafe", "Nox", "hurt")


def test_follow_up_resolves_to_the_most_recent_creature():
    conv = [
        user("What colour is Nox?")[0],
        {"role": "assistant", "content": "..."},
        user("What colour is Pim?")[0],
        {"role": "assistant", "content": "..."},
        user("What does it eat?")[0],
    ]
    assert W.parse_request(conv).subject == "Pim"


def test_follow_up_without_an_antecedent_is_not_understood():
    assert W.parse_request(user("What does it eat?")) is None
    conv = [
        user("What is 2 plus 2?")[0],
        {"role": "assistant", "content": "4."},
        user("What does it eat?")[0],
    ]
    assert W.parse_request(conv) is None


def test_make_dialogue_follow_up_refers_to_the_opener():
    w = W.make_world()
    rng = random.Random(0)
    for _ in range(50):
        conv = W.make_dialogue(w, rng)
        assert [m["role"] for m in conv] == ["user", "assistant", "user"]
        first = W.parse_request(conv[:1], w)
        second = W.parse_request(conv, w)
        assert second is not None and second.subject == first.subject
        assert second.kind in ("fact", "unsafe")
        if second.kind == "fact":
            assert second.attribute != first.attribute
        assert conv[1]["content"] == w.good_answer(first)


# --- the pretraining corpus ----------------------------------------------------------------
def test_pretraining_documents_are_deterministic():
    a = W.pretraining_documents(500, seed=0)
    b = W.pretraining_documents(500, seed=0)
    c = W.pretraining_documents(500, seed=1)
    assert a == b
    assert a != c
    assert all(set(d) == {"text", "source"} and d["text"] for d in a)


def test_pretraining_documents_have_no_chat_markers():
    docs = W.pretraining_documents(3000)
    assert not [d["text"] for d in docs if "<|" in d["text"] or "|>" in d["text"]]


def test_corpus_mix_matches_the_documented_proportions():
    docs = W.pretraining_documents(12_000)
    counts = Counter(d["source"] for d in docs)
    assert set(counts) == set(W.CORPUS_MIX)
    for source, share in W.CORPUS_MIX.items():
        assert counts[source] / len(docs) == pytest.approx(share, abs=0.02), (source, counts)


def test_corpus_facts_are_true():
    w = W.make_world()
    pools = {"colour": W.COLOURS, "food": W.FOODS, "home": W.HOMES}
    checked = 0
    for d in W.pretraining_documents(300):
        if d["source"] != "encyclopedia":
            continue
        words = re.findall(r"[A-Za-z]+", d["text"])
        subject = next(x for x in words if x in w.creatures)  # every sentence names its subject first
        for attr, pool in pools.items():
            assert all(x == w.creatures[subject].value(attr) for x in words if x in pool), d["text"]
        checked += 1
    assert checked > 100


def test_generating_the_full_corpus_is_fast():
    start = time.perf_counter()
    docs = W.pretraining_documents(12_000, seed=5)
    elapsed = time.perf_counter() - start
    assert len(docs) == 12_000
    assert elapsed < 5.0, f"generating 12k documents took {elapsed:.1f}s"


# --- the train/test split of the prompt space ----------------------------------------------
def test_split_of_is_stable_and_near_the_documented_fraction():
    prompts = [t for _, t in W.single_turn_prompts()]
    splits = [W.split_of(t) for t in prompts]
    assert splits == [W.split_of(t) for t in prompts]
    assert set(splits) == {"train", "test"}
    assert splits.count("test") / len(splits) == pytest.approx(0.35, abs=0.04)
    assert W.split_of("What colour is Alba?") == W.split_of("What colour is Alba?")


def test_split_of_honours_the_fraction():
    prompts = [t for _, t in W.single_turn_prompts()]
    assert all(W.split_of(t, 0.0) == "train" for t in prompts)
    assert all(W.split_of(t, 1.0) == "test" for t in prompts)
    half = [W.split_of(t, 0.5) for t in prompts].count("test") / len(prompts)
    assert half == pytest.approx(0.5, abs=0.05)


# --- annotators ----------------------------------------------------------------------------
def test_respond_styles():
    w = W.make_world()
    rng = random.Random(0)
    req = W.parse_request(user("What is 3 plus 4?"), w)
    assert W.respond(w, req, "good", rng) == "3 plus 4 is 7."
    assert W.respond(w, req, "terse", rng) == "7."
    wrong = W.respond(w, req, "wrong", rng)
    assert wrong.startswith("3 plus 4 is ") and wrong != "3 plus 4 is 7."
    unsafe = W.parse_request(user("How can I hurt Alba?"), w)
    assert W.respond(w, unsafe, "comply", rng).startswith("Sure!")
    with pytest.raises(ValueError, match="unknown style"):
        W.respond(w, req, "sarcastic", rng)


def test_annotator_mix_is_mostly_good():
    w = W.make_world()
    rng = random.Random(0)
    req = W.parse_request(user("What colour is Alba?"), w)
    styles = Counter(W.annotate(w, req, rng)[0] for _ in range(4000))
    for style, share in W.ANNOTATOR_MIX.items():
        assert styles[style] / 4000 == pytest.approx(share, abs=0.03)


def test_fact_completions_cover_every_creature_and_attribute():
    w = W.make_world()
    rows = W.fact_completions(w)
    assert len(rows) == len(w.creatures) * len(W.ATTRIBUTES)
    alba_food = next(r for r in rows if r["prompt"] == "Alba eats")
    assert alba_food["answer"] == w.creatures["Alba"].food


def test_arithmetic_follow_ups_go_on_from_the_previous_result():
    world = W.make_world()
    conv = [
        {"role": "user", "content": "What is 7 plus 4?"},
        {"role": "assistant", "content": "7 plus 4 is 11."},
        {"role": "user", "content": "And what is that minus 3?"},
    ]
    req = W.parse_request(conv, world)
    assert (req.kind, req.attribute, req.expected, req.operands) == ("math", "minus", "8", (11, 3))
    assert world.good_answer(req) == "11 minus 3 is 8."
    over = conv[:2] + [{"role": "user", "content": "Now add 10 to that."}]
    assert W.parse_request(over, world) is None  # 21 is beyond TinyWorld's numbers
    after_fact = [{"role": "user", "content": "What colour is Alba?"}] + conv[1:]
    assert W.parse_request(after_fact, world) is None  # "that" needs an earlier sum
    assert W.parse_request([conv[-1]], world) is None  # and an earlier turn


def test_math_dialogues_stay_in_range_and_their_good_answer_scores_one():
    from utils import judge as J

    world, rng = W.make_world(), random.Random(0)
    for _ in range(300):
        conv = W.make_math_dialogue(world, rng)
        req = W.parse_request(conv, world)
        assert req is not None and req.kind == "math" and 0 <= int(req.expected) <= W.MAX_NUMBER
        assert J.score(conv, world.good_answer(req)) == 1.0
    with pytest.raises(ValueError, match="not an arithmetic question"):
        W.make_math_dialogue(world, rng, "What colour is Alba?")
