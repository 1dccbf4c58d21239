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
    human labels). Gold is recomputed from the texts, as for finished answers. Last (what is wrong
    with the pairs comes before how many there are), that there are ``min_pairs`` training pairs.
    Prints the counts, the labels' agreement with gold and the noise ceiling.
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
    if not train:  # what is wrong before how many: the count's advice (sample more) comes last
        raise CheckError(
            "`train_pairs` is empty"
            + (
                f" and `held_pairs` holds all {len(held)} pairs: are (train, held) the wrong way round, or "
                "is every dialogue held out?"
                if held
                else " and so is `held_pairs`: no pairs were made (see how they were made and dropped)"
            )
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
        few = (
            f"only {len(train)} training pairs (aim for at least {min_pairs}), and "
            if len(train) < min_pairs
            else ""
        )
        raise CheckError(
            f"{few}{share:.0%} of the pairs are held out; hold out 5-30% (about 10% is usual)"
            + (": are (train, held) the wrong way round?" if share > 0.5 else "")
            + (" - fix the split first, then count the training pairs again" if few else "")
        )
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
        summary += f"; the labels agree with gold on {agree:.2f} (annotators this noisy: {ceiling:.2f})"
    if len(train) < min_pairs:
        raise CheckError(
            f"only {len(train)} training pairs (aim for at least {min_pairs}): sample more answers per "
            "dialogue or more dialogues - and check that ties and identical answers are all you dropped"
        )
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


def _require_trained(policy, start, name: str, run: str = "") -> None:
    """``policy`` is a language model, and not ``start`` or a copy of it left untrained."""
    if not (isinstance(policy, torch.nn.Module) and hasattr(policy, "generate")):
        raise CheckError(f"`{name}` should return the trained language model, got {type(policy).__name__}")
    if policy is start or _same_weights(policy, start):
        raise CheckError(
            f"`{name}`{run} returned its starting model unchanged: did the training run, on a copy of "
            "the model?"
        )


def _measured(policy, start, tokenizer, conversations, seed: int, judge, theirs=None):
    """``(mine, theirs, win, kl)``: ``policy``'s sampled answers to ``conversations``, ``start``'s
    (``theirs`` when given), the gold win rate of the first against the second with its interval,
    and ``policy``'s KL from ``start`` on the token ids of its own answers."""
    from ..evaluate import evaluate, win_rate
    from ..rollout import sequence_kl

    mine = evaluate(policy, tokenizer, conversations, do_sample=True, seed=seed, judge=judge)
    if theirs is None:
        theirs = evaluate(start, tokenizer, conversations, do_sample=True, seed=seed, judge=judge)
    kl = sequence_kl(policy, start, tokenizer, conversations, list(mine["token_ids"]))
    return mine, theirs, win_rate(mine["gold"], theirs["gold"]), kl


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
    _require_trained(policy, start, name)
    conversations = list(conversations)
    _, _, w, kl = _measured(policy, start, tokenizer, conversations, seed, judge)
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


@learner_facing
def check_reward_model_choice(fn, gain) -> bool:
    """Your decision between the two reward models: ``fn(gain) -> bool`` (``True`` keeps the
    by-prompt one), given ``gain``, the held-out accuracy of by-prompt minus flat with its interval
    (:func:`utils.reward.accuracy_difference`). A choice the held-out labels contradict - the model
    kept is the less accurate beyond the interval - fails, saying why. Returns the choice."""
    by_prompt = call_learner(fn, getattr(fn, "__name__", "choose_reward_model"), gain)
    if not isinstance(by_prompt, bool):
        raise CheckError(f"your choice should be True or False, got {by_prompt!r}")
    interval = f"{gain['difference']:+.3f} [{gain['low']:+.3f}, {gain['high']:+.3f}]"
    kept, other = ("by-prompt", "flat") if by_prompt else ("flat", "by-prompt")
    if (gain["high"] < 0) if by_prompt else (gain["low"] > 0):
        raise CheckError(
            f"you kept the {kept} reward model, but on the held-out labels the {other} one is the more "
            f"accurate, beyond the interval (by prompt minus flat: {interval}): keep the {other} one, "
            "or say in the discussion what outweighs held-out accuracy"
        )
    passed(
        f"kept the {kept} reward model; by prompt minus flat on the held-out labels {interval}: "
        "the evidence allows this choice - defend it in the discussion"
    )
    return by_prompt


@learner_facing
def check_dpo_sweep(fn, sft_model, tokenizer, pairs, conversations, betas, seeds, judge=None):
    """Run ``fn(sft_model, tokenizer, pairs, beta, seed, ref_cache) -> policy`` (the learner's
    ``align_dpo``) at every ``beta`` in every ``seed`` and measure each run on ``conversations`` (the
    validation dialogues): the gold score of its sampled answers (``judge``'s where given), its win
    rate against the SFT model's, and its KL from the SFT model. The runs share one ``ref_cache``.
    Fails at the first run that did not train a copy, and if ``beta`` or the cache went unused.
    Returns ``(sweep, first_seed_runs)``: one row per run (with its training ``seconds``) and the
    policy of the first seed at each ``beta``."""
    import time

    import pandas as pd

    name = getattr(fn, "__name__", "align_dpo")
    conversations = list(conversations)
    ref_cache, rows, first_seed_runs, baseline = {}, [], {}, None
    for beta in betas:
        for seed in seeds:
            start = time.perf_counter()
            policy = call_learner(fn, name, sft_model, tokenizer, pairs, beta, seed, ref_cache)
            took = time.perf_counter() - start
            _require_trained(policy, sft_model, name, f" (beta={beta}, seed={seed})")
            if not ref_cache:
                raise CheckError(
                    f"`{name}` left `ref_cache` empty: pass it to `train_dpo(..., ref_cache=ref_cache)`, "
                    "so that the sweep's runs share the reference's log-probabilities instead of each "
                    "computing them again"
                )
            # the SFT model's answers are sampled once, after the first run worked
            answers, baseline, w, kl = _measured(
                policy, sft_model, tokenizer, conversations, 3, judge, baseline
            )
            rows.append(
                {
                    "β": beta,
                    "seed": seed,
                    "gold": answers["gold"].mean(),
                    "win vs SFT": w["win_rate"],
                    "KL to SFT": kl,
                    "seconds": took,
                }
            )
            if seed == seeds[0]:
                first_seed_runs[beta] = policy
    sweep = pd.DataFrame(rows)
    if len(betas) > 1 and sweep.groupby("seed")["KL to SFT"].nunique().min() == 1:
        raise CheckError(
            f"`{name}` trained the same model at every beta: pass `beta` to `train_dpo(..., beta=beta)`"
        )
    if len(seeds) > 1 and sweep.groupby("β")["KL to SFT"].nunique().min() == 1:
        raise CheckError(
            f"`{name}` trained the same model in every seed: pass `seed` to `train_dpo(..., seed=seed)`"
        )
    passed(
        f"`{name}`: {len(sweep)} runs ({len(betas)} beta x {len(seeds)} seeds), each measured on "
        f"{len(conversations)} validation dialogues in {sweep['seconds'].sum():.0f} s of training"
    )
    return sweep, first_seed_runs


@learner_facing
def check_beta_choice(fn, sweep) -> float:
    """Your DPO beta: ``fn(sweep) -> beta``, given the validation sweep (:func:`check_dpo_sweep`'s
    table). One of the swept values, and not one whose mean gold is below the best's by more than
    the seeds' spread (the larger of the two standard deviations) - a choice the validation runs
    contradict. Returns it."""
    beta = call_learner(fn, getattr(fn, "__name__", "choose_beta"), sweep)
    swept = sorted(float(b) for b in sweep["β"].unique())
    if beta not in swept:
        raise CheckError(f"beta = {beta!r} was not swept: choose one of {swept}")
    by_beta = sweep.groupby("β")
    gold, spread = by_beta["gold"].mean(), by_beta["gold"].std().fillna(0.0)
    best = gold.idxmax()
    reading = ", ".join(
        f"beta {b}: gold {gold[b]:.3f} +/- {spread[b]:.3f}, KL {by_beta['KL to SFT'].mean()[b]:.2f}"
        for b in swept
    )
    if sweep.groupby("β")["seed"].nunique().min() < 2:
        passed(f"DPO's beta = {beta} ({reading}; one seed: no spread to judge by) - defend it")
        return float(beta)
    if gold[best] - gold[beta] > spread.max():
        raise CheckError(
            f"beta = {beta} scored below beta = {best} on the validation gold by more than the seeds' spread "
            f"({reading}): choose {best}, or say in the discussion what outweighs it"
        )
    passed(f"DPO's beta = {beta} ({reading}) - defend it in the discussion")
    return float(beta)


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


def _junk_padded(case, seed: int):
    """``case`` with arbitrary numbers where ``mask`` is 0 in logprobs, ref_logprobs and values, as a real
    rollout may hold them there (pad tokens' log-probs, a value model's outputs past an answer's end)."""
    scores, lp, ref, values, mask = case
    g = torch.Generator().manual_seed(seed)
    pad = 1 - mask
    return (
        scores,
        lp - (torch.rand(lp.shape, generator=g) * 4 + 1) * pad,
        ref - (torch.rand(lp.shape, generator=g) * 4 + 1) * pad,
        values + torch.randn(lp.shape, generator=g) * 3 * pad,
        mask,
    )


def _advantage_cases():
    """``(what, scores, logprobs, ref_logprobs, values, mask, score scale)``: Chapter 3's ragged batches
    (answers of one token among them; batch size != length), the same with junk in the padding, and five
    answers (lengths 6, 1, 4, 2, 5: none fills the 7 columns) with junk in the padding, with scores near 1
    and then the same scores times 300."""
    from .ch3_rlhf import _rollout_cases

    clean = _rollout_cases()
    cases = [("ragged answers", *c, 1.0) for c in clean]
    cases += [("junk in the padding", *_junk_padded(c, 10 + i), 1.0) for i, c in enumerate(clean)]
    g = torch.Generator().manual_seed(7)
    mask = (torch.arange(7)[None, :] < torch.tensor([6, 1, 4, 2, 5])[:, None]).float()
    lp, ref = (-torch.rand(5, 7, generator=g) * 3 * mask for _ in range(2))
    scores = torch.randn(5, generator=g)
    _, lp, ref, values, mask = _junk_padded(
        (scores, lp, ref, torch.randn(5, 7, generator=g) * mask, mask), 20
    )
    cases.append(("5 answers, none filling the width", scores, lp, ref, values, mask, 1.0))
    cases.append(("the same answers with scores in the hundreds", scores * 300, lp, ref, values, mask, 300.0))
    return cases


def _block_outputs(fn, name: str, args) -> tuple[torch.Tensor, torch.Tensor]:
    """The learner's ``(advantages, returns)`` on copies of ``args``, each checked to be ``[B, T]``."""
    out = call_learner(fn, name, *[a.clone() if torch.is_tensor(a) else a for a in args])
    if not (isinstance(out, tuple) and len(out) == 2):
        raise CheckError(f"`{name}` should return a pair (advantages, returns), got {type(out).__name__}")
    b, t = args[1].shape
    for what, x in zip(("advantages", "returns"), out):
        shape = tuple(expect_tensor(x, f"{name} {what}").shape)
        if shape != (b, t):
            why = {
                (t, b): " - it is transposed",
                (b,): " - one number per answer, where PPO needs one per token",
            }
            raise CheckError(
                f"`{name}` returned {what} of shape {shape}; expected ({b}, {t}): [B, T] like `logprobs`, "
                f"one number per position of each of the {b} answers{why.get(shape, '')}"
            )
    return out[0].detach().float(), out[1].detach().float()


def _row_whitened(x, mask):
    n = mask.sum(1, keepdim=True)
    mean = (x * mask).sum(1, keepdim=True) / n
    var = ((x - mean) * mask).pow(2).sum(1, keepdim=True) / n
    return (x - mean) * torch.rsqrt(var + 1e-8) * mask


def _advantages_hint(fn, name: str, args, adv, ret, scale: float) -> str:
    """Why the learner's ``(adv, ret)`` differ from the course's on ``args``: the order of the pair
    first, then the first wrong step of rewards -> GAE -> returns -> whitening that the outputs show
    (the returns are right => rewards and GAE are; the advantages are right => so is all before the
    returns), naming a known mistake where one explains it."""
    from ..ppo import gae, per_token_rewards, rlhf_advantages, whiten

    scores, lp, ref, values, mask, kl, gamma, lam, white = args
    want_adv, want_ret = rlhf_advantages(*args)

    def close(x, y, atol=1e-5):
        return torch.allclose(x, y, atol=atol)

    def same(x, *a, w=white):
        return close(x, rlhf_advantages(*a, whiten_advantages=w)[0])

    def right_on(*a):  # the learner's block gives the course's answer on other inputs
        return all(close(x, y) for x, y in zip(_block_outputs(fn, name, a), rlhf_advantages(*a)))

    if close(adv, want_ret) and close(ret, want_adv):
        return "the pair is the wrong way round: return (advantages, returns), in that order"
    bad = ~(torch.isfinite(adv) & torch.isfinite(ret))
    if bad.any():
        if not (bad & mask.bool()).any():
            return (
                "it returned NaN or inf at padding positions (mask 0), which must get advantage and return 0"
            )
        return (
            "it returned NaN or inf on answer tokens: a division by zero? An answer can be one token long "
            f"(lengths {mask.sum(1).long().tolist()} here): a standard deviation over one token is 0 (and "
            "torch.std's NaN) - whiten over all the answer tokens of the batch, with the eps"
        )
    raw = gae(per_token_rewards(scores, lp, ref, mask, kl), values, mask, gamma, lam)[0]
    flat = (raw - raw.mean()) / (raw.std() + 1e-8)
    if white and (close(adv, flat, 1e-4) or close(adv, flat * mask, 1e-4)):
        return "whiten over the answer tokens only (mask 1), not over the padding too"
    pad = 1 - mask
    if ((adv.abs() + ret.abs()) * pad).max() > 1e-6:
        which = " and ".join(
            w for w, x in (("advantages", adv), ("returns", ret)) if (x * pad).abs().max() > 1e-6
        )
        return f"padding positions (mask 0) must get advantage and return 0 (your {which} are not 0 there)"
    if ((lp.abs() + ref.abs() + values.abs()) * pad).sum() > 0 and right_on(
        scores, lp * mask, ref * mask, values * mask, mask, kl, gamma, lam, white
    ):
        values_leak = not right_on(scores, lp * mask, ref * mask, values, mask, kl, gamma, lam, white)
        logp_leak = not right_on(scores, lp, ref, values * mask, mask, kl, gamma, lam, white)
        if values_leak and not logp_leak:
            return (
                "right when the padding of `values` is 0, wrong when it holds what a value model outputs "
                "there (arbitrary numbers): V = 0 after each answer's last token, so a row's last token "
                "bootstraps from 0, not from values[t + 1] - mask the values first"
            )
        if logp_leak and not values_leak:
            return (
                "right when the padding of `logprobs` and `ref_logprobs` is 0, wrong when it holds pad "
                "tokens' log-probs (arbitrary numbers): the KL term is for answer tokens only - mask it"
            )
        return (
            "right when the padding of `logprobs`, `ref_logprobs` and `values` is 0, wrong when it holds "
            "arbitrary numbers (as a rollout's does): mask them - r_t = 0 and V = 0 after each answer's "
            "last token"
        )
    if scale != 1 and right_on(scores / scale, *args[1:]):
        return (
            f"right with scores near 1, wrong with scores of up to {scores.abs().max():.0f}: something "
            "clips or rescales the scores (or the rewards, or the advantages before whitening) - add each "
            "score as it is"
        )
    if close(ret, want_ret):  # rewards, GAE and returns are right: the advantages are not
        if white and close(adv, want_adv * (1 - 1 / mask.sum()).sqrt()):
            return (
                "whiten with the population standard deviation of the answer tokens: divide the squared "
                "deviations by their number, not by one less (torch.std's default; "
                f"{int(mask.sum())} tokens here)"
            )
        if close(adv, rlhf_advantages(*args[:-1], whiten_advantages=not white)[0]):
            return (
                "whitening is the wrong way round: whiten the advantages when `whiten_advantages` "
                "is true, leave them as they are when it is false"
            )
        if white and close(adv, _row_whitened(raw, mask)):
            return "whiten over all the answer tokens of the batch together, not row by row"
        return "the returns are right (so are the rewards and GAE) but the advantages are not: " + (
            "whiten them over the answer tokens, to mean 0 and standard deviation 1, 0 on padding"
            if white
            else "with `whiten_advantages` false they are GAE's advantages as they are"
        )
    if close(adv, want_adv):  # all but the returns is right
        hint = "the advantages are right but the returns are not: returns = advantages + values"
        rewards = per_token_rewards(scores, lp, ref, mask, kl)
        to_go = torch.zeros_like(rewards)
        for t in reversed(range(rewards.shape[1])):
            later = to_go[:, t + 1] if t + 1 < rewards.shape[1] else 0.0
            to_go[:, t] = (rewards[:, t] + gamma * later) * mask[:, t]
        if close(ret, whiten(want_ret - values, mask) + values * mask):
            hint += ", with the advantages taken *before* whitening (the values' targets are unwhitened)"
        elif close(ret, want_adv):
            hint = "the returns are the advantages; add the values back (and use the unwhitened ones)"
        elif close(ret, to_go):
            hint += (
                " (the lambda-return), not the discounted sum of rewards, which equals it only when lam = 1"
            )
        return hint
    # both are wrong: the mistake is in the rewards or in GAE
    if kl > 0 and same(adv, scores, ref, lp, values, mask, kl, gamma, lam):
        return "the KL term's sign is flipped: moving away from the reference must *cost* reward"
    if kl > 0 and same(adv, scores, lp, ref, values, mask, 0.0, gamma, lam):
        return "the KL penalty is missing from the per-token rewards"
    if close(adv, rlhf_advantages(*args[:-1], whiten_advantages=not white)[0]):
        return (
            "whitening is the wrong way round: whiten the advantages when `whiten_advantages` "
            "is true, leave them as they are when it is false (and the returns are the unwhitened A + V)"
        )
    if lam != 1.0 and same(adv, scores, lp, ref, values, mask, kl, gamma, 1.0):
        return "`lam` is ignored: A_t = delta_t + gamma * lam * A_{t+1}"
    if gamma != 1.0 and same(adv, scores, lp, ref, values, mask, kl, 1.0, lam):
        return "`gamma` is ignored: it discounts both V_{t+1} and A_{t+1}"
    b, t = mask.shape
    kl_part = -kl * (lp - ref) * mask

    def score_at(position):
        r = kl_part.clone()
        r[torch.arange(b), position] += scores
        return r

    for rewards, hint in (
        (
            score_at(torch.full((b,), t - 1)),  # padding masks it out for the shorter answers
            "the score went on the last *column*; a shorter answer ends earlier - use "
            "mask.sum(1) - 1 for each row's last token",
        ),
        (
            score_at(torch.zeros(b, dtype=torch.long)),
            "the score goes on each answer's *last* token (the end token, at mask.sum(1) - 1), not its first",
        ),
        (
            score_at((mask.sum(1).long() - 2).clamp(min=0)),
            "the score is one token early: row i's last token is at mask[i].sum() - 1",
        ),
        (kl_part, "the score is missing from the per-token rewards: add it on each answer's last token"),
        (
            kl_part + scores[:, None] * mask,
            "the score goes on each answer's last token only, not on every token",
        ),
    ):
        a = gae(rewards, values, mask, gamma, lam)[0]
        if close(adv, whiten(a, mask) if white else a):
            return hint
    # the per-token rewards that GAE, done right, would turn into the learner's returns
    v = values * mask
    a_l = (ret - v) * mask

    def following(x):
        return torch.cat([x[:, 1:], torch.zeros_like(x[:, :1])], 1)

    implied = (a_l - gamma * lam * following(a_l) + v - gamma * following(v)) * mask
    last = torch.nn.functional.one_hot(mask.sum(1).long() - 1, t).to(mask.dtype)
    rewards = per_token_rewards(scores, lp, ref, mask, kl)
    if close(implied * (mask - last), rewards * (mask - last)):
        return (
            "the per-token rewards are right except on each answer's last token (at mask.sum(1) - 1): "
            "there r_t is the KL term *plus* the score - add the score, do not overwrite the KL term"
        )
    if close(implied * last, rewards * last):
        return (
            "each answer's last token gets the right return, the tokens before it do not: the mistake is in "
            "GAE's backward step (delta_t = r_t + gamma V_{t+1} - V_t, A_t = delta_t + gamma lam A_{t+1}) "
            "or in the KL term, r_t = -kl_coef * (logprobs - ref_logprobs), of the earlier tokens"
        )
    return (
        "the advantages and the returns are both wrong, so the mistake is in the per-token rewards or in "
        "GAE: rewards r_t = -kl_coef * (logprobs - ref_logprobs) plus the score on each answer's last "
        "token; GAE backwards (delta_t = r_t + gamma V_{t+1} - V_t, A_t = delta_t + gamma lam A_{t+1}, "
        "V = 0 after the last token); returns = A + V before whitening"
    )


@continues_with("from utils.ppo import rlhf_advantages")
def check_rlhf_advantages(fn) -> None:
    """``fn(scores[B], logprobs[B,T], ref_logprobs[B,T], values[B,T], mask[B,T], kl_coef, gamma, lam,
    whiten_advantages) -> (advantages[B,T], returns[B,T])``: the learner's block between a scored
    rollout and PPO's update, against :func:`utils.ppo.rlhf_advantages` on batches of ragged answers
    (with junk in the padding, and scores in the hundreds), under every combination of the options."""
    import itertools

    from ..ppo import rlhf_advantages

    name = getattr(fn, "__name__", "rlhf_advantages")
    settings = [
        (0.1, 1.0, 1.0, True),
        (0.1, 1.0, 0.95, False),
        (0.05, 0.9, 0.5, True),
        (0.0, 1.0, 1.0, False),
    ]  # then every combination: a block that honours one option only while the others are off fails
    grid = itertools.product((0.1, 0.0), (1.0, 0.9), (1.0, 0.8), (True, False))
    settings += [s for s in grid if s not in settings]
    for i, (what, *case, scale) in enumerate(_advantage_cases()):
        for kl, gamma, lam, white in settings:
            args = (*case, kl, gamma, lam, white)
            adv, ret = _block_outputs(fn, name, args)
            want_adv, want_ret = rlhf_advantages(*args)
            if torch.allclose(adv, want_adv, atol=1e-5) and torch.allclose(ret, want_ret, atol=1e-5):
                continue
            where = f"(case {i}, {what}: kl_coef={kl}, gamma={gamma}, lam={lam}, whiten_advantages={white})"
            raise CheckError(
                f"`{name}` is wrong {where}: {_advantages_hint(fn, name, args, adv, ret, scale)}"
            )
    passed(f"`{name}`: per-token rewards, GAE, returns and whitening match the course's on ragged batches")


def _as_key(x) -> str:
    return json.dumps(x, sort_keys=True, default=str)


def _reproducible_pairs(make_fn, name: str, sft_model, tokenizer, dialogues, k: int, seed: int) -> None:
    """``make_fn`` twice on a few ``dialogues`` with the same seed: the same pairs, or a CheckError."""
    runs = [call_learner(make_fn, name, sft_model, tokenizer, list(dialogues), k, seed) for _ in range(2)]
    if not all(hasattr(r, "column_names") for r in runs):
        raise CheckError(f"`{name}` should return a datasets.Dataset of pairs, got {type(runs[0]).__name__}")
    if any(c not in r.column_names for r in runs for c in PAIR_COLUMNS):
        return  # check_preference_data names the missing columns
    rows = [r.select_columns(list(PAIR_COLUMNS)).to_list() for r in runs]
    if sorted(map(_as_key, rows[0])) == sorted(map(_as_key, rows[1])):
        return
    answers = [
        sorted(_as_key([r["prompt"], sorted([_as_key(r["chosen"]), _as_key(r["rejected"])])]) for r in x)
        for x in rows
    ]
    if answers[0] == answers[1]:
        raise CheckError(
            f"`{name}` labelled the same answers differently in two calls with the same seed ({seed}): pass "
            "`seed` on to `label_pairs(..., seed=seed)`, so that the annotators' draw is reproducible"
        )
    raise CheckError(
        f"`{name}` drew different answers in two calls with the same seed ({seed}) on the same "
        f"{len(dialogues)} dialogues: the draw must be reproducible - sample with "
        "`generate_responses(..., do_sample=True, seed=...)`, one seed per answer made from `seed` "
        "(seed + j), not from the global random state"
    )


def _one_pair_per_comparison(pairs, name: str, dialogues, k: int) -> None:
    """At most k(k - 1)/2 pairs per dialogue (per time it is among ``dialogues``)."""
    from collections import Counter
    from math import comb

    if "prompt" not in pairs.column_names:
        return
    given = Counter(map(_as_key, dialogues))
    counts = Counter(map(_as_key, pairs["prompt"]))
    over = [c for key, c in counts.items() if c > comb(k, 2) * max(1, given[key])]
    if over:
        raise CheckError(
            f"`{name}` made {max(over)} pairs for one dialogue, more than the {comb(k, 2)} that k = {k} "
            "answers give: form each pair of a dialogue's answers once (itertools.combinations, not "
            "permutations or product: (a, b) and (b, a) are one comparison)"
        )


def _split_as_asked(split_fn, name: str, pairs, train, held, held_fraction: float, split_seed: int) -> None:
    """The held-out dialogues are about ``held_fraction`` of them, the same ones again with the same seed."""
    if any("prompt" not in (getattr(d, "column_names", None) or ()) for d in (train, held)):
        return  # check_preference_data names the missing columns
    held_keys = set(map(_as_key, held["prompt"]))
    train_keys = set(map(_as_key, train["prompt"]))
    if not held_keys or held_keys & train_keys:
        return  # check_preference_data says so
    n, got = len(held_keys | train_keys), len(held_keys)
    slack = max(1.5, 3 * (n * held_fraction * (1 - held_fraction)) ** 0.5)  # a coin per dialogue would do
    if abs(got - held_fraction * n) > slack:
        raise CheckError(
            f"`{name}` held out {got} of {n} dialogues ({got / n:.0%}), but held_fraction = {held_fraction} "
            f"asks for about {held_fraction * n:.0f}"
            + (": are (train, held) the wrong way round?" if got > n / 2 > held_fraction * n else "")
            + " - hold out that fraction of the *dialogues*, using the argument"
        )
    again = call_learner(split_fn, name, pairs, held_fraction, split_seed)
    same = isinstance(again, tuple) and len(again) == 2 and "prompt" in getattr(again[1], "column_names", ())
    if not (same and set(map(_as_key, again[1]["prompt"])) == held_keys):
        raise CheckError(
            f"`{name}` held out different dialogues in two calls with the same seed ({split_seed}): shuffle "
            "with a generator seeded by `seed` (random.Random(seed)), not the global random state, so that "
            "the split is reproducible"
        )


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
    gold judge to label with), checks those instead, without the gold-label checks.

    Before that, the contracts of the two functions: ``make_fn`` on 16 of the dialogues twice gives
    the same pairs (the seed makes the draw reproducible); the pairs are not empty and hold at most
    k(k - 1)/2 pairs per dialogue; ``split_fn`` holds out about ``held_fraction`` of the dialogues, the
    same ones again with the same seed."""
    if _smoke():  # a smoke test cuts every set: any number of pairs will do
        min_pairs = 1
    if given is not None:
        print("hub profile: Step 0 is given (the profile's public preference pairs)")
        train, held = given
        check_preference_data(train, held, test_dialogues, min_pairs=min_pairs, gold=False)
        return train, held
    make_name = getattr(make_fn, "__name__", "make_preference_pairs")
    split_name = getattr(split_fn, "__name__", "split_by_prompt")
    dialogues = list(dialogues)
    if dialogues:
        _reproducible_pairs(make_fn, make_name, sft_model, tokenizer, dialogues[:16], k, seed)
    pairs = call_learner(make_fn, make_name, sft_model, tokenizer, dialogues, k, seed)
    if not hasattr(pairs, "column_names"):
        raise CheckError(
            f"`{make_name}` should return a datasets.Dataset of pairs, got {type(pairs).__name__}"
        )
    if len(pairs) == 0:
        raise CheckError(
            f"`{make_name}` returned no pairs: `label_pairs` drops pairs of identical answers (and ties), so "
            "every dialogue's k answers came out the same - sampled greedily, or with one seed for all k "
            "draws? Sample with do_sample=True and a different seed per answer (seed + j)"
        )
    _one_pair_per_comparison(pairs, make_name, dialogues, k)
    out = call_learner(split_fn, split_name, pairs, held_fraction, split_seed)
    if not (isinstance(out, tuple) and len(out) == 2):
        raise CheckError(f"`{split_name}` should return a pair (train, held), got {type(out).__name__}")
    train, held = out
    if len(train) + len(held) != len(pairs):
        raise CheckError(
            f"`{split_name}` returned {len(train)} + {len(held)} pairs of {len(pairs)}: every pair "
            "belongs on exactly one side"
        )
    _split_as_asked(split_fn, split_name, pairs, train, held, held_fraction, split_seed)
    check_preference_data(train, held, test_dialogues, min_pairs=min_pairs)
    return train, held


def _win_rate_cases():
    """(what, {model: gold scores}): three models on five prompts, then five (in no alphabetical order)
    on eight, with many ties - two models tie on every prompt - so that leaving ties out shows."""
    import numpy as np

    sft = [1.0, 0.0, -1.0, 0.5, 1.0, 0.0, -1.0, 0.5]
    return [
        (
            "3 models on 5 prompts",
            {
                "A": np.array([1.0, 0.0, 0.5, 1.0, -1.0]),
                "B": np.array([0.0, 0.0, 1.0, 1.0, -1.0]),
                "C": np.array([-1.0, 1.0, 0.5, 0.0, 1.0]),
            },
        ),
        (
            "5 models on 8 prompts, with ties",
            {
                "SFT": np.array(sft),
                "DPO": np.array([1.0, 0.5, -1.0, 0.5, 0.0, 1.0, 0.0, 0.5]),
                "RLHF (PPO)": np.array([0.5, 0.0, 1.0, 0.5, 1.0, 0.0, -1.0, 1.0]),
                "best-of-4, gold": np.array([1.0, 1.0, 1.0, 1.0, 0.5, 1.0, 0.0, 0.5]),
                "SFT, T = 0.7": np.array(sft),
            },
        ),
    ]


def _win_rate_hint(got, scores) -> str:
    """The known mistake that gives the matrix ``got`` (an array) on ``scores``, else the definition."""
    import numpy as np

    s, names = scores, list(scores)

    def rates(win, tie=0.5):
        return np.array(
            [[np.mean(win(s[a], s[b])) + tie * np.mean(s[a] == s[b]) for b in names] for a in names]
        )

    def close(x):
        return np.allclose(got, x, atol=1e-6)

    want = rates(np.greater)
    with np.errstate(invalid="ignore", divide="ignore"):
        decided = np.array([[np.sum(s[a] > s[b]) / np.sum(s[a] != s[b]) for b in names] for a in names])
    off = ~np.eye(len(names), dtype=bool)
    if close(want.T):
        return "the matrix is transposed: rows should be the winners, columns the opponents"
    if close(rates(np.greater, 0.0)):
        return "ties should count one half (otherwise [a, b] + [b, a] < 1 when answers tie)"
    if close(rates(np.greater, 1.0)):
        return (
            "a tie counts as a whole win for both models (>=): count it one half, so that [a, b] + [b, a] = 1"
        )
    if np.allclose(got[off], want[off], atol=1e-6):
        hint = "the diagonal: a model against itself ties on every prompt, so [a, a] = 0.5"
        if np.isnan(np.diag(got)).any():
            hint += " (NaN there is 0 / 0: are ties left out of the mean? Average over all the prompts)"
        return hint
    if np.allclose(got[off], np.where(np.isnan(decided), 0.5, decided)[off], atol=1e-6, equal_nan=True) or (
        np.allclose(got[off], decided[off], atol=1e-6, equal_nan=True)
    ):
        return (
            "ties are left out of the mean (it is a share of the prompts where one answer won): average over "
            "all the prompts, a tie counting one half for each model"
        )
    across = rates(lambda x, y: x[:, None] > y[None, :], 0.0) + 0.5 * np.array(
        [[np.mean(s[a][:, None] == s[b][None, :]) for b in names] for a in names]
    )
    if close(across):
        return (
            "it compares every answer of a with every answer of b: compare the two answers to the same "
            "prompt (element by element), then average over the prompts"
        )
    return "entry [a, b] = mean over prompts of 1 if a > b, 1/2 if a == b, 0 if a < b"


@learner_facing
def check_win_rate_matrix(fn) -> None:
    """``fn({name: gold scores}) -> DataFrame`` whose entry ``[a, b]`` is how often ``a``'s answer scores
    higher than ``b``'s on the same prompt, ties counting one half (so ``[a, b] + [b, a] = 1``). On three
    models and on five (more prompts than models, models in no alphabetical order, many ties)."""
    import numpy as np
    import pandas as pd

    name = getattr(fn, "__name__", "win_rate_matrix")
    for what, scores in _win_rate_cases():
        got = call_learner(fn, name, {k: v.copy() for k, v in scores.items()})
        if not isinstance(got, pd.DataFrame):
            raise CheckError(f"`{name}` should return a pandas DataFrame, got {type(got).__name__}")
        m, n = len(scores), len(next(iter(scores.values())))
        if got.shape != (m, m):
            per_prompt = " - it has one entry per prompt: average over the prompts" if n in got.shape else ""
            raise CheckError(
                f"`{name}` returned a {got.shape[0]} x {got.shape[1]} table on {what}; expected {m} x {m}, "
                f"one row and one column per model{per_prompt}"
            )
        if list(got.index) != list(scores) or list(got.columns) != list(scores):
            raise CheckError(
                f"`{name}`'s rows and columns should both be the models, in order {list(scores)}; "
                f"got rows {list(got.index)} and columns {list(got.columns)}"
            )
        want = pd.DataFrame(
            {
                b: {
                    a: float(np.mean((scores[a] > scores[b]) + 0.5 * (scores[a] == scores[b])))
                    for a in scores
                }
                for b in scores
            }
        ).loc[list(scores), list(scores)]
        if np.allclose(got.to_numpy(dtype=float), want.to_numpy(), atol=1e-6):
            continue
        hint = _win_rate_hint(got.to_numpy(dtype=float), scores)
        raise CheckError(f"`{name}` is wrong on {what}: {hint}\n got\n{got}\n want\n{want}")
    passed(f"`{name}`: pairwise win rates with ties as one half, rows beating columns")


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
