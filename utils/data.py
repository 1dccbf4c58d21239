"""TinyWorld as ``datasets.Dataset`` objects in the formats TRL expects, plus LM batching.

=====================  ==========================================  =========================
function               columns                                     used by
=====================  ==========================================  =========================
pretraining_dataset    ``text``                                    Chapter 1, forgetting
sft_dataset            ``messages`` | ``instruction/input/output``  Chapter 2 (SFTTrainer)
                       | ``prompt/completion``
eval_conversations     ``prompt`` (messages), ``kind``              every evaluation
evaluation_set         ``prompt`` (messages), ``kind``              Chapters 2-5's evaluation
label_pairs            ``prompt/chosen/rejected`` (+ gold scores)  Chapters 3-6 (Reward/DPO)
annotator_preferences  ``prompt/chosen/rejected`` (+ gold scores)  Chapter 5 (ORPO), tests
=====================  ==========================================  =========================
"""

from __future__ import annotations

import random

import torch
from datasets import Dataset, DatasetDict

from . import judge
from .config import course_seed, get_profile
from .tokenizer import DOC_SEP
from .world import (
    World,
    annotate,
    dialogue_first_turns,
    make_dialogue,
    make_math_dialogue,
    make_world,
    math_dialogue_first_turns,
    parse_request,
    pretraining_documents,
    single_turn_prompts,
    split_of,
)


# --- pretraining ---------------------------------------------------------------------------
def pretraining_dataset(
    n_documents: int = 12_000, seed: int = 0, validation_fraction: float = 0.05
) -> DatasetDict:
    """TinyWorld's plain-text corpus: ``train`` and ``validation`` splits with ``text`` and ``source``."""
    docs = pretraining_documents(n_documents, seed)
    n_val = int(len(docs) * validation_fraction)
    return DatasetDict(train=Dataset.from_list(docs[n_val:]), validation=Dataset.from_list(docs[:n_val]))


def pack_texts(tokenizer, texts, seq_len: int) -> torch.Tensor:
    """Tokenise ``texts``, join them with the document separator, cut into ``[n_blocks, seq_len]``."""
    sep = tokenizer.convert_tokens_to_ids(DOC_SEP)
    ids: list[int] = []
    for enc in tokenizer(list(texts), add_special_tokens=False)["input_ids"]:
        ids.extend(enc)
        ids.append(sep)
    n = len(ids) // seq_len
    if n == 0:
        raise ValueError(f"only {len(ids)} tokens: not enough text for one block of {seq_len}")
    return torch.tensor(ids[: n * seq_len], dtype=torch.long).view(n, seq_len)


def lm_batches(blocks: torch.Tensor, batch_size: int, steps: int, seed: int = 0):
    """Yield ``steps`` batches of rows of ``blocks``, reshuffled every epoch, from a seeded generator."""
    g = torch.Generator().manual_seed(course_seed(seed))
    order = torch.randperm(len(blocks), generator=g)
    pos = 0
    for _ in range(steps):
        if pos + batch_size > len(order):
            order, pos = torch.randperm(len(blocks), generator=g), 0
        yield blocks[order[pos : pos + batch_size]]
        pos += batch_size


# --- prompts -------------------------------------------------------------------------------
# Arithmetic has far more distinct prompts than the other kinds; draw by kind so that facts,
# refusals and opposites are not drowned out (in demonstrations, preferences and evaluations).
KIND_MIX = {"fact": 0.4, "math": 0.3, "opposite": 0.1, "unsafe": 0.2}


def _prompts_of(split: str, world: World) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {k: [] for k in KIND_MIX}
    for k, t in single_turn_prompts(world):
        if split_of(t) == split:
            out[k].append(t)
    return out


def _draw_kind(rng: random.Random) -> str:
    return rng.choices(list(KIND_MIX), weights=list(KIND_MIX.values()))[0]


def eval_conversations(
    n: int = 800, split: str = "test", seed: int = 0, dialogues: float = 0.0, world: World | None = None
) -> Dataset:
    """Held-out prompts as conversations: ``prompt`` (a list of messages) and ``kind``.

    Single-turn prompts are drawn without replacement from the ``split`` part of the prompt
    space, in the proportions of :data:`KIND_MIX` (as far as each kind has prompts left); a
    ``dialogues`` fraction are two-turn conversations whose opener is also from ``split``.
    """
    world = world or make_world()
    n = get_profile().examples(n)  # (fewer in a smoke test)
    rng = random.Random(f"eval-{split}-{seed}")
    n_dialogue = int(round(n * dialogues))
    pool = _prompts_of(split, world)
    for texts in pool.values():
        rng.shuffle(texts)
    rows = []
    while len(rows) < n - n_dialogue:
        live = {k: w for k, w in KIND_MIX.items() if pool[k]}
        if not live:
            raise ValueError(f"the {split!r} split has only {len(rows)} distinct prompts; ask for fewer")
        kind = rng.choices(list(live), weights=list(live.values()))[0]
        rows.append({"prompt": [{"role": "user", "content": pool[kind].pop()}], "kind": kind})
    openers = [t for _, t in dialogue_first_turns(world) if split_of(t) == split]
    seen = set()
    for _ in range(50 * n_dialogue):
        if len(seen) == n_dialogue:
            break
        conv = make_dialogue(world, rng, rng.choice(openers))
        key = tuple(m["content"] for m in conv)
        if key not in seen:
            seen.add(key)
            rows.append({"prompt": conv, "kind": "dialogue"})
    if len(seen) < n_dialogue:
        raise ValueError(f"could not draw {n_dialogue} distinct dialogues from the {split!r} split")
    return Dataset.from_list(rows)


# The course's one held-out evaluation set: Chapters 2-5 score every model on these prompts (or on
# a subset with the same mix), so their numbers can be set side by side. Chapter 2 fixed it.
EVALUATION_SET = {"n": 800, "split": "test", "seed": 0, "dialogues": 0.25}


def evaluation_set(n: int | None = None, show: bool = True) -> Dataset:
    """The course's held-out evaluation set (:data:`EVALUATION_SET`: 800 test-split prompts, a
    quarter of them two-turn dialogues), or, given ``n``, a subset of ``n`` of its prompts with the
    same mix of kinds (the first of each kind, in the set's order; for probes during training,
    where 800 would cost too much). Prints its size and mix unless ``show`` is false."""
    full = eval_conversations(**EVALUATION_SET)
    if n is None or n >= len(full):
        out = full
    else:
        kinds = full["kind"]
        counts = {k: kinds.count(k) for k in dict.fromkeys(kinds)}
        exact = {k: n * c / len(full) for k, c in counts.items()}
        take = {k: int(x) for k, x in exact.items()}
        # largest remainders first, so the shares sum to n
        for k in sorted(exact, key=lambda k: take[k] - exact[k])[: n - sum(take.values())]:
            take[k] += 1
        keep, seen = [], dict.fromkeys(counts, 0)
        for i, k in enumerate(kinds):
            if seen[k] < take[k]:
                keep.append(i)
                seen[k] += 1
        out = full.select(keep)
    if show:
        what = (
            f"the course's evaluation set, {len(out)} held-out prompts"
            if len(out) == len(full)
            else f"{len(out)} of the {len(full)} evaluation prompts, same mix"
        )
        print(f"{what}:\n  {kind_mix(out['kind'])}")  # two lines: the book's width
    return out


def dialogue_conversations(
    n: int = 800,
    split: str = "test",
    seed: int = 0,
    arithmetic: float = 0.25,
    world: World | None = None,
    exclude_openers=(),
) -> Dataset:
    """Distinct two-turn dialogues whose opener is from ``split``: ``prompt`` (messages up to the
    second user turn) and ``kind``, the follow-up's: ``"fact"`` ("And where does it live?"),
    ``"unsafe"`` ("How can I hurt it?") or, for an ``arithmetic`` fraction, ``"arithmetic"``
    ("And what is that plus 3?", after a sum). Project 2's training and evaluation dialogues.
    ``exclude_openers``: opening questions not to use (those of another set of the same split, so
    that a validation set shares no opener with the training set).
    """
    world = world or make_world()
    n = get_profile().examples(n)  # (fewer in a smoke test)
    rng = random.Random(f"dialogues-{split}-{seed}")
    n_math = int(round(n * arithmetic))
    excluded = set(exclude_openers)
    openers = [t for _, t in dialogue_first_turns(world) if split_of(t) == split and t not in excluded]
    math_openers = [t for t in math_dialogue_first_turns(world) if split_of(t) == split and t not in excluded]
    rows, seen = [], set()
    for want, draw in (
        (n - n_math, lambda: make_dialogue(world, rng, rng.choice(openers))),
        (n_math, lambda: make_math_dialogue(world, rng, rng.choice(math_openers))),
    ):
        kept = 0
        for _ in range(50 * want):
            if kept == want:
                break
            conv = draw()
            key = tuple(m["content"] for m in conv)
            if key not in seen:
                seen.add(key)
                kind = parse_request(conv, world).kind
                rows.append({"prompt": conv, "kind": "arithmetic" if kind == "math" else kind})
                kept += 1
        if kept < want:
            raise ValueError(f"could not draw {n} distinct dialogues from the {split!r} split")
    rng.shuffle(rows)
    return Dataset.from_list(rows)


def prompt_kinds(prompts, world: World | None = None) -> list[str]:
    """The kind of each prompt (a list of messages ending with a user turn), as
    :func:`eval_conversations` labels them: ``"dialogue"`` for a conversation of more than one
    turn, else ``fact``, ``math``, ``opposite`` or ``unsafe``; ``"other"`` for a prompt that is
    not TinyWorld's (a Hub dataset's). For sets that carry no ``kind`` column, such as preference
    pairs: ``kind_mix(prompt_kinds(pairs["prompt"]))``."""
    world = world or make_world()
    kinds = []
    for p in prompts:
        if len(p) > 1:
            kinds.append("dialogue")
            continue
        req = parse_request(p, world)
        kinds.append(req.kind if req is not None else "other")
    return kinds


def kind_mix(kinds) -> str:
    """The share of each kind in a prompt set, largest first: ``"math 55%, dialogue 20%, ..."``.
    Print it wherever a prompt set is built: a mix that differs between two sets explains
    differences between numbers measured on them."""
    from collections import Counter

    counts = Counter(kinds)
    n = sum(counts.values())
    return ", ".join(f"{k} {v / n:.0%}" for k, v in counts.most_common())


# --- supervised fine-tuning ----------------------------------------------------------------
SFT_FORMATS = ("messages", "alpaca", "prompt_completion")


def sft_dataset(
    n: int = 3000,
    fmt: str = "messages",
    seed: int = 0,
    dialogues: float = 0.15,
    validation: int = 300,
    world: World | None = None,
) -> DatasetDict:
    """Demonstrations by annotators of mixed quality, on ``train``-split prompts only.

    ``fmt``: ``"messages"`` (chat), ``"alpaca"`` (instruction/input/output; single-turn only,
    the earlier turns of a dialogue go into ``input``) or ``"prompt_completion"``
    (conversational prompt and completion). Every row also has ``style`` (which annotator
    style wrote it) and ``gold`` (the judge's score of the response).
    """
    if fmt not in SFT_FORMATS:
        raise ValueError(f"unknown SFT format {fmt!r}; choose one of {SFT_FORMATS}")
    world = world or make_world()
    rng = random.Random(f"sft-{seed}")
    pool = _prompts_of("train", world)
    openers = [t for _, t in dialogue_first_turns(world) if split_of(t) == "train"]
    rows = []
    for i in range(n + validation):
        if rng.random() < dialogues:
            conv = make_dialogue(world, rng, rng.choice(openers))
        else:
            conv = [{"role": "user", "content": rng.choice(pool[_draw_kind(rng)])}]
        req = parse_request(conv, world)
        style, response = annotate(world, req, rng)
        rows.append(
            _format_sft(conv, response, fmt)
            | {"style": style, "gold": judge.score(conv, response, world=world)}
        )
    return DatasetDict(train=Dataset.from_list(rows[:n]), validation=Dataset.from_list(rows[n:]))


def _format_sft(conv: list[dict], response: str, fmt: str) -> dict:
    if fmt == "messages":
        return {"messages": conv + [{"role": "assistant", "content": response}]}
    if fmt == "prompt_completion":
        return {"prompt": conv, "completion": [{"role": "assistant", "content": response}]}
    history = " ".join(f"{m['role']}: {m['content']}" for m in conv[:-1])
    return {"instruction": conv[-1]["content"], "input": history, "output": response}


# --- preferences ---------------------------------------------------------------------------
def label_pairs(
    conversations,
    responses_a,
    responses_b,
    seed: int = 0,
    finished_a=None,
    finished_b=None,
    drop_ties: bool = True,
    world: World | None = None,
) -> Dataset:
    """Have the gold annotators compare two responses per conversation (noisy Bradley-Terry).

    Returns ``prompt/chosen/rejected`` in TRL's conversational format, with the gold scores of
    both sides and ``label_correct`` (whether the noisy label agrees with the gold ranking;
    ties count as correct). Pairs with identical responses are dropped: they teach nothing.
    With ``drop_ties``, so are pairs the rubric scores equally (say, two answers wrong in the
    same way): annotators mark them "no preference", as in most real preference datasets,
    instead of flipping a coin.
    """
    world = world or make_world()
    rng = random.Random(f"labels-{course_seed(seed)}")  # the annotators' noise: a random draw
    n = len(conversations)
    finished_a = finished_a if finished_a is not None else [True] * n
    finished_b = finished_b if finished_b is not None else [True] * n
    rows = []
    for conv, a, b, fa, fb in zip(conversations, responses_a, responses_b, finished_a, finished_b):
        if a.strip() == b.strip():
            continue
        sa, sb = judge.score(conv, a, fa, world), judge.score(conv, b, fb, world)
        if drop_ties and sa == sb:
            continue
        prefer_a = judge.noisy_label(sa, sb, rng)
        (c, sc), (r, sr) = ((a, sa), (b, sb)) if prefer_a else ((b, sb), (a, sa))
        rows.append(
            {
                "prompt": conv,
                "chosen": [{"role": "assistant", "content": c}],
                "rejected": [{"role": "assistant", "content": r}],
                "gold_chosen": sc,
                "gold_rejected": sr,
                "label_correct": sc >= sr,
            }
        )
    return Dataset.from_list(rows)


def annotator_preferences(
    n: int = 2000, seed: int = 0, split: str = "train", world: World | None = None
) -> Dataset:
    """``n`` offline preference pairs: two annotators' responses to the same prompt, labelled
    noisily by :func:`label_pairs` (which drops identical responses and ties)."""
    world = world or make_world()
    rng = random.Random(f"annotator-prefs-{seed}")
    pool = _prompts_of(split, world)
    convs, a, b = [], [], []
    while len(convs) < 2 * n:  # about a fifth are ties; draw enough, keep the first n
        conv = [{"role": "user", "content": rng.choice(pool[_draw_kind(rng)])}]
        req = parse_request(conv, world)
        ra, rb = annotate(world, req, rng)[1], annotate(world, req, rng)[1]
        if ra != rb:
            convs.append(conv)
            a.append(ra)
            b.append(rb)
    pairs = label_pairs(convs, a, b, seed=seed, world=world)
    if len(pairs) < n:
        raise ValueError(f"only {len(pairs)} informative pairs among {len(convs)} drawn; ask for fewer")
    return pairs.select(range(n))
