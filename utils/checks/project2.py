"""Project 2 checkpoints: the learner's preference data (Step 0), their block of the PPO loop, their
training runs (a reward model, an aligned policy), the win-rate matrix of the final comparison, and
the reference run's numbers beside theirs."""

from __future__ import annotations

import contextlib
import functools
import json
from pathlib import Path

import torch

from .core import CheckError, call_learner, continues_with, expect_tensor, learner_facing, passed

PAIR_COLUMNS = ("prompt", "chosen", "rejected")


def _key(conversation) -> tuple:
    return tuple(m["content"] for m in conversation)


def _conversational(rows, where: str) -> None:
    for i, r in enumerate(rows):
        p, c, j = r["prompt"], r["chosen"], r["rejected"]
        if not (isinstance(p, list) and p and all(isinstance(m, dict) for m in p)):
            raise CheckError(
                f"{where}, row {i}: `prompt` should be the conversation, a list of "
                f'{{"role", "content"}} messages; got {type(p).__name__}'
            )
        if p[-1]["role"] != "user":
            raise CheckError(
                f"{where}, row {i}: the prompt should end with the user's turn, not {p[-1]['role']!r}"
            )
        for col, v in (("chosen", c), ("rejected", j)):
            if not (isinstance(v, list) and len(v) == 1 and v[0].get("role") == "assistant"):
                raise CheckError(
                    f"{where}, row {i}: `{col}` should be one assistant message, "
                    f'[{{"role": "assistant", "content": ...}}] (TRL\'s conversational format); got {v!r}'
                )
        if c[0]["content"].strip() == j[0]["content"].strip():
            raise CheckError(
                f"{where}, row {i}: chosen and rejected are the same answer, which teaches nothing: "
                "drop pairs of identical answers"
            )


@learner_facing
def check_preference_data(train_pairs, held_pairs, test_dialogues, min_pairs: int = 300, gold: bool = True):
    """Step 0's checkpoint: the learner's ``train_pairs`` and ``held_pairs`` (``prompt/chosen/rejected``,
    conversational) against the evaluation ``test_dialogues``.

    Checks the format; that no pair has two identical answers; that no dialogue of the evaluation
    set (by its opening question) is in either split; that the split is by prompt (no dialogue on
    both sides) and holds out 5-30%; and, with ``gold`` (TinyWorld), that no pair is a tie under
    the gold judge and that the labels agree with gold as noisy annotators do - better than
    chance, but not better than the noise allows (labels copied from the gold ranking are not
    human labels). Gold is recomputed from the texts, as for finished answers. Prints the counts, the
    labels' agreement with gold and the noise ceiling.
    """
    import numpy as np

    from ..judge import agreement_stats, score

    for where, ds in (("train_pairs", train_pairs), ("held_pairs", held_pairs)):
        cols = getattr(ds, "column_names", None)
        if cols is None or any(c not in cols for c in PAIR_COLUMNS):
            raise CheckError(
                f"`{where}` should be a datasets.Dataset with columns {list(PAIR_COLUMNS)}; "
                f"got {type(ds).__name__} with columns {cols}"
            )
    train = train_pairs.select_columns(list(PAIR_COLUMNS)).to_list()
    held = held_pairs.select_columns(list(PAIR_COLUMNS)).to_list()
    if len(train) < min_pairs:
        raise CheckError(
            f"only {len(train)} training pairs (aim for at least {min_pairs}): sample more answers per "
            "dialogue or more dialogues - and check that ties and identical answers are all you dropped"
        )
    if not held:
        raise CheckError("`held_pairs` is empty: hold out some dialogues' pairs to check the reward model on")
    _conversational(train, "train_pairs")
    _conversational(held, "held_pairs")
    test_openers = {c[0]["content"] for c in test_dialogues}
    for where, rows in (("train_pairs", train), ("held_pairs", held)):
        leaked = sorted({r["prompt"][0]["content"] for r in rows} & test_openers)
        if leaked:
            raise CheckError(
                f"{len(leaked)} dialogues of `{where}` open with a question of the evaluation set "
                f"(e.g. {leaked[0]!r}): build the pairs from the training dialogues only"
            )
    both = {_key(r["prompt"]) for r in train} & {_key(r["prompt"]) for r in held}
    if both:
        raise CheckError(
            f"{len(both)} dialogues have pairs on both sides of the split (e.g. {list(both)[0]}): split by "
            "prompt, so that all the pairs of one dialogue land on the same side; otherwise the held-out "
            "accuracy measures memorised prompts"
        )
    share = len(held) / (len(train) + len(held))
    if not 0.05 <= share <= 0.3:
        raise CheckError(f"{share:.0%} of the pairs are held out; hold out 5-30% (about 10% is usual)")
    n_dialogues = len({_key(r["prompt"]) for r in train})
    summary = f"{len(train)} training pairs from {n_dialogues} dialogues, {len(held)} held out"
    if gold:
        rows = train + held
        sc = np.array([score(r["prompt"], r["chosen"][0]["content"]) for r in rows])
        sr = np.array([score(r["prompt"], r["rejected"][0]["content"]) for r in rows])
        ties = int((sc == sr).sum())
        if ties > 0.02 * len(rows):
            raise CheckError(
                f"{ties} of {len(rows)} pairs are ties under the gold judge: annotators mark these "
                "'no preference', and they teach nothing but noise - drop them (`label_pairs` does)"
            )
        agree = float((sc > sr)[sc != sr].mean())
        ceiling = agreement_stats(list(zip(sc, sr)))["noise_ceiling"]
        if agree < 0.5:
            raise CheckError(
                f"the labels agree with the gold judge on only {agree:.2f} of the pairs (below chance): "
                "are chosen and rejected swapped?"
            )
        if agree > ceiling + 0.05 and len(rows) >= 200:
            raise CheckError(
                f"the labels agree with the gold judge on {agree:.2f} of the pairs, more than noisy "
                f"annotators can (about {ceiling:.2f}): the brief is human labels, with their noise - "
                "label with the annotators (`label_pairs`), not with the gold ranking"
            )
        summary += f"; the labels agree with gold on {agree:.2f} (the noise ceiling is {ceiling:.2f})"
    passed(f"preference data: {summary} - on track")


def _same_weights(a, b) -> bool:
    pa, pb = list(a.parameters()), list(b.parameters())
    return len(pa) == len(pb) and all(x.shape == y.shape and torch.equal(x, y) for x, y in zip(pa, pb))


@learner_facing
def check_reward_model_run(fn, sft_model, tokenizer, train_pairs, held_pairs, min_accuracy: float = 0.6):
    """Run ``fn(sft_model, tokenizer, train_pairs) -> reward model`` and check it on held-out pairs.

    Returns the trained reward model, so the next steps can use it.
    """
    from ..reward import pairwise_accuracy

    name = getattr(fn, "__name__", "train_reward")
    rm = call_learner(fn, name, sft_model, tokenizer, train_pairs)
    if not isinstance(rm, torch.nn.Module) or getattr(getattr(rm, "config", None), "num_labels", None) != 1:
        raise CheckError(
            f"`{name}` should return a reward model with a one-number head (as `reward_model_from` "
            f"builds), got {type(rm).__name__}"
        )
    acc = pairwise_accuracy(rm, tokenizer, held_pairs)
    ceiling = (
        float(torch.tensor(list(held_pairs["label_correct"])).float().mean())
        if "label_correct" in held_pairs.column_names
        else None
    )
    where = f" (chance 0.5{f', noise ceiling {ceiling:.2f}' if ceiling is not None else ''})"
    if _smoke():
        passed(f"`{name}`: held-out accuracy {acc['vs_labels']:.2f}{where} - a smoke test, so not judged")
        return rm
    if acc["vs_labels"] < 1 - min_accuracy:
        raise CheckError(
            f"`{name}`'s reward model agrees with {acc['vs_labels']:.2f} of held-out labels{where}: "
            "it prefers the *rejected* answers - are chosen and rejected swapped in the loss?"
        )
    if acc["vs_labels"] < min_accuracy:
        raise CheckError(
            f"`{name}`'s reward model agrees with only {acc['vs_labels']:.2f} of held-out labels{where}: "
            f"not yet on track (aim above {min_accuracy}). Did it train? Try more epochs or a larger "
            "learning rate, and check it starts from the SFT model"
        )
    extra = f", {acc['vs_gold']:.2f} with the gold ranking" if "vs_gold" in acc else ""
    passed(f"`{name}`: held-out accuracy {acc['vs_labels']:.2f} against the labels{where}{extra} - on track")
    return rm


def _smoke() -> bool:
    """A smoke test (``COURSE_SMOKE=1``) trains a handful of steps: outcomes are not judged."""
    from ..config import get_profile

    return get_profile().smoke


@learner_facing
def check_policy_run(
    fn,
    *args,
    start,
    tokenizer,
    conversations,
    max_kl: float | None = 3.0,
    seed: int = 3,
    judge=None,
    calls=None,
):
    """Run ``fn(*args) -> policy`` and compare the policy with ``start`` (the model it was trained
    from) on ``conversations``: sampled answers, gold win rate with a 95% interval, and the KL
    from ``start``. On track = not worse than ``start`` (the interval's top is above one half)
    and, if ``max_kl`` is given, within ``max_kl`` nats of it. ``judge`` goes to
    :func:`utils.evaluate.evaluate` (``None``: the gold judge). ``calls``: a function of the
    learner's that the run must use (Project 2's ``rlhf_advantages``: ``train_ppo`` runs the
    course's own block when it is not given one). Returns the policy.
    """
    from ..evaluate import evaluate, win_rate
    from ..rollout import sequence_kl

    name = getattr(fn, "__name__", "align")
    with _counting_calls(fn, calls) as counted:
        policy = call_learner(fn, name, *args)
    if counted is not None and not counted:
        called = getattr(calls, "__name__", "your function")
        raise CheckError(
            f"`{name}` never called your `{called}`: pass it to the training loop "
            f"(`train_ppo(..., advantages_fn={called})`); without it the loop runs the course's own "
            "block, and this run would not be yours"
        )
    if not (isinstance(policy, torch.nn.Module) and hasattr(policy, "generate")):
        raise CheckError(f"`{name}` should return the trained language model, got {type(policy).__name__}")
    if policy is start or _same_weights(policy, start):
        raise CheckError(
            f"`{name}` returned its starting model unchanged: did the training run, on a copy of the model?"
        )
    conversations = list(conversations)
    mine = evaluate(policy, tokenizer, conversations, do_sample=True, seed=seed, judge=judge)
    theirs = evaluate(start, tokenizer, conversations, do_sample=True, seed=seed, judge=judge)
    w = win_rate(mine["gold"], theirs["gold"])
    kl = sequence_kl(policy, start, tokenizer, conversations, list(mine["token_ids"]))
    summary = (
        f"{'judged' if judge is not None else 'gold'} win rate {w['win_rate']:.2f} "
        f"[{w['low']:.2f}, {w['high']:.2f}] against its starting model on "
        f"{len(conversations)} held-out conversations, KL {kl:.2f} nats"
    )
    if _smoke():
        passed(f"`{name}`: {summary} - a smoke test trains too little to judge, so not judged")
        return policy
    if w["high"] < 0.5:
        raise CheckError(
            f"`{name}`: {summary} - worse than where it started. Usual causes: a learning rate so "
            "high the policy collapsed; too little KL penalty (reward hacking); chosen and rejected "
            "swapped in the pairs or the loss; or a reward model that prefers the rejected answers "
            "(its checkpoint's held-out accuracy says)"
        )
    if max_kl is not None and kl > max_kl:
        raise CheckError(
            f"`{name}`: {summary} - it drifted more than {max_kl} nats from its starting model, where "
            "learned rewards stop being trustworthy: lower the learning rate or raise the KL penalty"
        )
    passed(f"`{name}`: {summary} - on track")
    return policy


class _Counter:
    def __init__(self):
        self.n = 0

    def __bool__(self) -> bool:
        return self.n > 0


@contextlib.contextmanager
def _counting_calls(fn, target):
    """While the block runs, count calls to ``target`` made through the names ``fn``'s module binds to
    it (a notebook's globals: ``advantages_fn=rlhf_advantages`` looks the name up when ``fn`` runs).
    Yields the count, or ``None`` when ``fn``'s globals do not bind ``target`` (nothing to count)."""
    counter = _Counter()
    namespace = getattr(fn, "__globals__", None)
    names = [k for k, v in (namespace or {}).items() if v is target] if target is not None else []
    if not names:  # nothing to observe (no target, or ``fn`` reaches it another way)
        yield None
        return

    @functools.wraps(target)
    def counted(*args, **kwargs):
        counter.n += 1
        return target(*args, **kwargs)

    for k in names:
        namespace[k] = counted
    try:
        yield counter
    finally:
        for k in names:
            if namespace.get(k) is counted:
                namespace[k] = target


@continues_with("from utils.ppo import rlhf_advantages")
def check_rlhf_advantages(fn) -> None:
    """``fn(scores[B], logprobs[B,T], ref_logprobs[B,T], values[B,T], mask[B,T], kl_coef, gamma, lam,
    whiten_advantages) -> (advantages[B,T], returns[B,T])``: the learner's block between a scored
    rollout and PPO's update, against :func:`utils.ppo.rlhf_advantages` on batches of ragged answers."""
    from ..ppo import gae, per_token_rewards, rlhf_advantages, whiten
    from .ch3_rlhf import _rollout_cases

    name = getattr(fn, "__name__", "rlhf_advantages")
    settings = [
        (0.1, 1.0, 1.0, True),
        (0.1, 1.0, 0.95, False),
        (0.05, 0.9, 0.5, True),
        (0.0, 1.0, 1.0, False),
    ]
    for i, (scores, lp, ref, values, mask) in enumerate(_rollout_cases()):
        for kl, gamma, lam, white in settings:
            args = (scores, lp, ref, values, mask, kl, gamma, lam, white)
            out = call_learner(fn, name, *[a.clone() if torch.is_tensor(a) else a for a in args])
            if not (isinstance(out, tuple) and len(out) == 2):
                raise CheckError(
                    f"`{name}` should return a pair (advantages, returns), got {type(out).__name__}"
                )
            adv = expect_tensor(out[0], name + " advantages", shape=tuple(lp.shape)).float()
            ret = expect_tensor(out[1], name + " returns", shape=tuple(lp.shape)).float()
            want_adv, want_ret = rlhf_advantages(*args)
            where = f"(case {i}: kl_coef={kl}, gamma={gamma}, lam={lam}, whiten_advantages={white})"
            if torch.allclose(adv, want_adv, atol=1e-5) and torch.allclose(ret, want_ret, atol=1e-5):
                continue

            def same(x, *a, w=white):
                return torch.allclose(x, rlhf_advantages(*a, whiten_advantages=w)[0], atol=1e-5)

            hint = (
                "rewards r_t = -kl_coef * (logprobs - ref_logprobs) plus the score on each answer's last "
                "token; GAE backwards (delta_t = r_t + gamma V_{t+1} - V_t, A_t = delta_t + gamma lam "
                "A_{t+1}); returns = A + V before whitening; whiten A over the answer tokens if asked"
            )
            raw = gae(per_token_rewards(scores, lp, ref, mask, kl), values, mask, gamma, lam)[0]
            flat = (raw - raw.mean()) / (raw.std() + 1e-8)
            if white and (
                torch.allclose(adv, flat, atol=1e-4) or torch.allclose(adv, flat * mask, atol=1e-4)
            ):
                hint = "whiten over the answer tokens only (mask 1), not over the padding too"
            elif ((adv.abs() + ret.abs()) * (1 - mask)).max() > 1e-6:
                hint = "padding positions (mask 0) must get advantage and return 0"
            elif (
                white
                and torch.allclose(ret, want_ret, atol=1e-5)
                and torch.allclose(adv, want_adv * (1 - 1 / mask.sum()).sqrt(), atol=1e-5)
            ):
                hint = (
                    "whiten with the population standard deviation of the answer tokens: divide the "
                    "squared deviations by their number, not by one less (torch.std's default; "
                    f"{int(mask.sum())} tokens here)"
                )
            elif torch.allclose(adv, want_adv, atol=1e-5):
                hint = "the advantages are right but the returns are not: returns = advantages + values"
                if torch.allclose(ret, whiten(want_ret - values, mask) + values * mask, atol=1e-5):
                    hint += (
                        ", with the advantages taken *before* whitening (the values' targets are unwhitened)"
                    )
                elif torch.allclose(ret, want_adv, atol=1e-5):
                    hint = "the returns are the advantages; add the values back (and use the unwhitened ones)"
            elif kl > 0 and same(adv, scores, ref, lp, values, mask, kl, gamma, lam):
                hint = "the KL term's sign is flipped: moving away from the reference must *cost* reward"
            elif kl > 0 and same(adv, scores, lp, ref, values, mask, 0.0, gamma, lam):
                hint = "the KL penalty is missing from the per-token rewards"
            elif torch.allclose(adv, rlhf_advantages(*args[:-1], whiten_advantages=not white)[0], atol=1e-5):
                hint = (
                    "whitening is the wrong way round: whiten the advantages when `whiten_advantages` "
                    "is true, leave them as they are when it is false"
                )
            elif lam != 1.0 and same(adv, scores, lp, ref, values, mask, kl, gamma, 1.0):
                hint = "`lam` is ignored: A_t = delta_t + gamma * lam * A_{t+1}"
            elif gamma != 1.0 and same(adv, scores, lp, ref, values, mask, kl, 1.0, lam):
                hint = "`gamma` is ignored: it discounts both V_{t+1} and A_{t+1}"
            else:
                bad = -kl * (lp - ref) * mask
                bad[:, -1] += scores  # the last column, which padding masks out for shorter answers
                a_bad, _ = gae(bad, values, mask, gamma, lam)
                if torch.allclose(adv, whiten(a_bad, mask) if white else a_bad, atol=1e-5):
                    hint = (
                        "the score went on the last *column*; a shorter answer ends earlier - use "
                        "mask.sum(1) - 1 for each row's last token"
                    )
            raise CheckError(f"`{name}` is wrong {where}: {hint}")
    passed(f"`{name}`: per-token rewards, GAE, returns and whitening match the course's on ragged batches")


@learner_facing
def check_preference_pairs_run(
    make_fn,
    split_fn,
    sft_model,
    tokenizer,
    dialogues,
    test_dialogues,
    *,
    k: int = 4,
    seed: int = 0,
    held_fraction: float = 0.1,
    split_seed: int = 0,
    min_pairs: int = 300,
    given=None,
):
    """Step 0's checkpoint: run ``make_fn(sft_model, tokenizer, dialogues, k, seed) -> pairs`` and
    ``split_fn(pairs, held_fraction, split_seed) -> (train, held)``, then :func:`check_preference_data`.
    Returns ``(train, held)``. With ``given = (train, held)`` (the ``hub`` profile's public pairs: no
    gold judge to label with), checks those instead, without the gold-label checks."""
    if _smoke():  # a smoke test cuts every set: any number of pairs will do
        min_pairs = 1
    if given is not None:
        print("hub profile: Step 0 is given (the profile's public preference pairs)")
        train, held = given
        check_preference_data(train, held, test_dialogues, min_pairs=min_pairs, gold=False)
        return train, held
    make_name = getattr(make_fn, "__name__", "make_preference_pairs")
    split_name = getattr(split_fn, "__name__", "split_by_prompt")
    pairs = call_learner(make_fn, make_name, sft_model, tokenizer, list(dialogues), k, seed)
    if not hasattr(pairs, "column_names"):
        raise CheckError(
            f"`{make_name}` should return a datasets.Dataset of pairs, got {type(pairs).__name__}"
        )
    out = call_learner(split_fn, split_name, pairs, held_fraction, split_seed)
    if not (isinstance(out, tuple) and len(out) == 2):
        raise CheckError(f"`{split_name}` should return a pair (train, held), got {type(out).__name__}")
    train, held = out
    if len(train) + len(held) != len(pairs):
        raise CheckError(
            f"`{split_name}` returned {len(train)} + {len(held)} pairs of {len(pairs)}: every pair "
            "belongs on exactly one side"
        )
    check_preference_data(train, held, test_dialogues, min_pairs=min_pairs)
    return train, held


@learner_facing
def check_win_rate_matrix(fn) -> None:
    """``fn({name: gold scores}) -> DataFrame`` whose entry ``[a, b]`` is how often ``a``'s answer scores
    higher than ``b``'s on the same prompt, ties counting one half (so ``[a, b] + [b, a] = 1``)."""
    import numpy as np
    import pandas as pd

    name = getattr(fn, "__name__", "win_rate_matrix")
    scores = {
        "A": np.array([1.0, 0.0, 0.5, 1.0, -1.0]),
        "B": np.array([0.0, 0.0, 1.0, 1.0, -1.0]),
        "C": np.array([-1.0, 1.0, 0.5, 0.0, 1.0]),
    }
    got = call_learner(fn, name, {k: v.copy() for k, v in scores.items()})
    if not isinstance(got, pd.DataFrame):
        raise CheckError(f"`{name}` should return a pandas DataFrame, got {type(got).__name__}")
    if list(got.index) != list(scores) or list(got.columns) != list(scores):
        raise CheckError(
            f"`{name}`'s rows and columns should both be the models, in order {list(scores)}; "
            f"got rows {list(got.index)} and columns {list(got.columns)}"
        )
    want = pd.DataFrame(
        {
            b: {a: float(np.mean((scores[a] > scores[b]) + 0.5 * (scores[a] == scores[b]))) for a in scores}
            for b in scores
        }
    ).loc[list(scores), list(scores)]
    if np.allclose(got.to_numpy(dtype=float), want.to_numpy(), atol=1e-6):
        passed(f"`{name}`: pairwise win rates with ties as one half, rows beating columns")
        return
    hint = "entry [a, b] = mean over prompts of 1 if a > b, 1/2 if a == b, 0 if a < b"
    if np.allclose(got.to_numpy(dtype=float), want.to_numpy().T, atol=1e-6):
        hint = "the matrix is transposed: rows should be the winners, columns the opponents"
    elif np.allclose(
        got.to_numpy(dtype=float),
        pd.DataFrame(
            {b: {a: float(np.mean(scores[a] > scores[b])) for a in scores} for b in scores}
        ).to_numpy(),
        atol=1e-6,
    ):
        hint = "ties should count one half (otherwise [a, b] + [b, a] < 1 when answers tie)"
    raise CheckError(f"`{name}` is wrong: {hint}\n got\n{got}\n want\n{want}")


REFERENCE_RUN = "seed0"


def reference_numbers(table, kinds=None) -> dict[str, float]:
    """The numbers the reference-run comparison shows: from a results ``table`` (one row per method),
    each method's gold, win rate against SFT and KL, and the right-creature share; from ``kinds``
    (greedy gold per follow-up kind, one column per method), the arithmetic follow-ups' greedy gold.
    Keys are ``"method | measure"``; the solution records them with its claims."""
    import pandas as pd

    out = {}
    for method, row in table.iterrows():
        for col in ("gold, sampled", "win vs SFT, sampled", "gold, greedy", "KL to SFT", "right creature"):
            if col in row and not pd.isna(row[col]):
                out[f"{method} | {col}"] = float(row[col])
    if kinds is not None and "arithmetic" in kinds.index:
        for method in kinds.columns:
            out[f"{method} | arithmetic follow-ups, greedy gold"] = float(kinds.loc["arithmetic", method])
    return out


def compare_with_reference(table, kinds=None, notebook: str = "06_project2", records: Path | None = None):
    """The reference run's numbers (the solution on the ``tiny`` profile, seed 0, as recorded in
    ``benchmarks/claims_runs/seed0.jsonl``) beside this run's: one row per method, one column per
    measure, each cell "yours (reference)". Nothing is asserted: a different result is yours to
    explain, not an error."""
    import pandas as pd

    root = Path(__file__).resolve().parents[2]
    records = records or root / "benchmarks" / "claims_runs" / f"{REFERENCE_RUN}.jsonl"
    reference = {}
    if records.is_file():
        for line in records.read_text().splitlines():
            row = json.loads(line)
            if row.get("notebook") == notebook:
                reference.update(row.get("values", {}))
    if not reference:
        print(f"No reference run recorded in {records}: your numbers only.")
    cells: dict[str, dict[str, str]] = {}
    for key, mine in reference_numbers(table, kinds).items():
        method, measure = key.split(" | ")
        ref = f" ({reference[key]:.3f})" if key in reference else ""
        cells.setdefault(measure, {})[method] = f"{mine:.3f}{ref}"
    print("Each cell: yours (the reference run's).")
    return pd.DataFrame(cells).fillna("")
