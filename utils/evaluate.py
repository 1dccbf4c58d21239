"""Evaluation: the gold judge's scores, per-kind tables, win rates with intervals, KL to a reference,
and the measurement every chapter's results table is made of."""

from __future__ import annotations

import numpy as np
import pandas as pd
import torch

from . import judge as judge_rules  # (``judge`` is also an argument name below)
from .models import generate_responses
from .rollout import require_tinyworld_judge, sequence_kl


def evaluate(
    model,
    tokenizer,
    conversations,
    *,
    do_sample: bool = False,
    temperature: float = 1.0,
    max_new_tokens: int = 40,
    seed: int = 0,
    kinds=None,
    judge=None,
) -> pd.DataFrame:
    """Generate one response per conversation and score it: one row per prompt.

    Columns: ``prompt`` (last user turn), ``kind``, ``response``, ``finished``, ``n_tokens``,
    ``gold`` (the judge's score), ``correct``, ``rude``, ``refused``, and ``token_ids`` (the tokens the
    model drew, which is what :func:`utils.rollout.sequence_kl` measures a KL on).

    ``judge`` is ``None`` for TinyWorld's gold judge, or ``(reward model, its tokenizer)`` for real
    prompts (the ``hub`` profile): ``gold`` is then that model's score and ``correct`` is unknown (NaN).
    On the ``hub`` profile a judge is required: TinyWorld's rubric does not score real prompts.
    """
    conversations = list(conversations)
    if judge is None:
        require_tinyworld_judge("evaluate")
    gens = cached_responses(
        model,
        tokenizer,
        conversations,
        do_sample=do_sample,
        temperature=temperature,
        max_new_tokens=max_new_tokens,
        seed=seed,
    )
    if judge is not None:
        from .reward import score_answers

        judged = score_answers(*judge, conversations, [g.text for g in gens]).cpu().tolist()
    rows = []
    for i, (conv, g) in enumerate(zip(conversations, gens)):
        if judge is None:
            parts = judge_rules.score_breakdown(conv, g.text, g.finished)
            gold, correct = float(sum(parts.values())), ("correct" in parts) or ("refusal" in parts)
            rude = "rude" in parts
        else:
            gold, correct, rude = judged[i], np.nan, judge_rules.is_rude(g.text)
        rows.append(
            {
                "prompt": conv[-1]["content"],
                "kind": kinds[i] if kinds is not None else None,
                "response": g.text,
                "finished": g.finished,
                "n_tokens": g.n_tokens,
                "gold": gold,
                "correct": correct,
                "rude": rude,
                "refused": judge_rules.is_refusal(g.text),
                "token_ids": g.token_ids,
            }
        )
    return pd.DataFrame(rows)


# A model's answers are stored by what determines them (the weights, the tokenizer, the prompts, the
# decoding settings and seed, the sampler), so the same model on the same prompts is answered once:
# Chapters 2-5 all evaluate the SFT model on the evaluation set. Above this size, hashing the weights
# is not worth what it saves.
ANSWERS_CACHE_MAX_PARAMS = 20_000_000
# Bump when what is stored per answer changes (2: the sampled token ids).
ANSWERS_FORMAT = 2


def cached_responses(model, tokenizer, conversations, **settings) -> list:
    """:func:`utils.models.generate_responses`, answered from the artifact cache when this model (its
    exact weights) already answered these conversations with these settings in this run's
    ``COURSE_SEED``; stored atomically otherwise. Models above :data:`ANSWERS_CACHE_MAX_PARAMS` are
    not cached."""
    import dataclasses
    import json

    from . import cache
    from .config import course_seed
    from .models import Generation
    from .sampling import SAMPLER_VERSION

    conversations = list(conversations)  # a list, or a dataset's column
    n_params = sum(p.numel() for p in model.parameters())
    if n_params > ANSWERS_CACHE_MAX_PARAMS:
        return generate_responses(model, tokenizer, conversations, **settings)
    device = next(model.parameters()).device
    recipe = {
        "weights": weights_fingerprint(model),
        "tokenizer": tokenizer_fingerprint(tokenizer),
        "conversations": _sha(json.dumps(conversations, sort_keys=True)),
        "settings": {**settings, "seed": course_seed(settings.get("seed", 0))},
        "device": device.type,
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "sampler": SAMPLER_VERSION,
        "format": ANSWERS_FORMAT,
    }
    path = cache.artifact_path("answers", recipe) / "answers.json"
    if cache.is_cached("answers", recipe):
        return [Generation(**g) for g in json.loads(path.read_text())]
    gens = generate_responses(model, tokenizer, conversations, **settings)
    rows = [dataclasses.asdict(g) for g in gens]
    cache.save_artifact("answers", recipe, lambda tmp: (tmp / "answers.json").write_text(json.dumps(rows)))
    return gens


def _sha(text: str) -> str:
    import hashlib

    return hashlib.sha256(text.encode()).hexdigest()


def weights_fingerprint(model) -> str:
    """A hash of a model's configuration and every parameter and buffer (names, dtypes, shapes, bytes)."""
    import hashlib

    h = hashlib.sha256(model.config.to_json_string().encode() if hasattr(model, "config") else b"")
    for name, t in sorted(model.state_dict().items()):
        t = t.detach().cpu().contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


_TOKENIZER_FINGERPRINTS = None  # a weakref.WeakKeyDictionary once used


def tokenizer_fingerprint(tokenizer) -> str:
    """A hash of what a tokenizer does to text: its vocabulary and merges, special tokens and chat template
    (remembered per tokenizer object while its template and vocabulary size stay the same)."""
    import weakref

    global _TOKENIZER_FINGERPRINTS
    if _TOKENIZER_FINGERPRINTS is None:
        _TOKENIZER_FINGERPRINTS = weakref.WeakKeyDictionary()
    state = (str(getattr(tokenizer, "chat_template", "")), len(tokenizer), repr(tokenizer.special_tokens_map))
    known = _TOKENIZER_FINGERPRINTS.get(tokenizer)
    if known is not None and known[0] == state:
        return known[1]
    backend = getattr(tokenizer, "backend_tokenizer", None)
    vocab = backend.to_str() if backend is not None else repr(sorted(tokenizer.get_vocab().items()))
    fingerprint = _sha("\n".join([vocab, *map(str, state)]))
    _TOKENIZER_FINGERPRINTS[tokenizer] = (state, fingerprint)
    return fingerprint


def summarize(df: pd.DataFrame) -> pd.DataFrame:
    """Mean gold score, accuracy, rudeness, finished rate and length, overall and per kind."""
    cols = {"gold": "mean", "correct": "mean", "rude": "mean", "finished": "mean", "n_tokens": "mean"}
    out = df.groupby("kind").agg(cols) if df["kind"].notna().any() else pd.DataFrame()
    overall = df.agg(cols).to_frame("all").T
    return pd.concat([out, overall]).round(3)


def _paired(values_a, values_b) -> tuple[np.ndarray, np.ndarray]:
    a, b = np.asarray(values_a, float), np.asarray(values_b, float)
    if a.shape != b.shape or a.ndim != 1 or len(a) == 0:
        raise ValueError(f"need two equally long, non-empty score lists; got {a.shape} and {b.shape}")
    return a, b


def _bootstrap_interval(per_prompt: np.ndarray, n_boot: int, seed: int) -> dict[str, float]:
    """A 95% bootstrap interval of the mean of per-prompt values (prompts resampled whole)."""
    rng = np.random.default_rng(seed)
    boots = per_prompt[rng.integers(0, len(per_prompt), size=(n_boot, len(per_prompt)))].mean(axis=1)
    return {"low": float(np.quantile(boots, 0.025)), "high": float(np.quantile(boots, 0.975))}


def win_rate(scores_a, scores_b, n_boot: int = 2000, seed: int = 0) -> dict[str, float]:
    """How often ``a`` beats ``b`` on the same prompts (ties count one half), with a paired
    bootstrap 95% confidence interval: ``{"win_rate", "low", "high", "ties"}``."""
    a, b = _paired(scores_a, scores_b)
    wins = (a > b) + 0.5 * (a == b)
    return {
        "win_rate": float(wins.mean()),
        **_bootstrap_interval(wins, n_boot, seed),
        "ties": float((a == b).mean()),
    }


def mean_difference(values_a, values_b, n_boot: int = 2000, seed: int = 0) -> dict[str, float]:
    """The mean of ``a - b`` over the same prompts (scores, or 0/1 flags such as ``rude``), with a
    paired bootstrap 95% confidence interval: ``{"difference", "low", "high"}``. Paired: each prompt's
    two values are resampled together, so what the prompts share cancels."""
    a, b = _paired(values_a, values_b)
    return {"difference": float((a - b).mean()), **_bootstrap_interval(a - b, n_boot, seed)}


def per_token_mean(values, mask, n_boot: int = 2000, seed: int = 0) -> dict[str, float]:
    """The mean of per-token ``values`` ``[B, T]`` over the tokens ``mask`` marks, with a 95% bootstrap
    interval that resamples the ``B`` answers whole (one answer's tokens are not independent draws):
    ``{"mean", "low", "high"}``."""
    values = torch.as_tensor(values, dtype=torch.float64).cpu()
    mask = torch.as_tensor(mask).cpu().to(torch.float64)
    if values.shape != mask.shape or values.ndim != 2 or mask.sum() == 0:
        raise ValueError(f"need values and a non-empty mask of one [B, T] shape; got {list(values.shape)}")
    values = torch.where(mask > 0, values, 0.0)  # padding may hold anything, inf included
    sums, counts = values.sum(1).numpy(), mask.sum(1).numpy()
    rng = np.random.default_rng(seed)
    rows = rng.integers(0, len(sums), size=(n_boot, len(sums)))
    boots = sums[rows].sum(1) / counts[rows].sum(1)
    return {
        "mean": float(sums.sum() / counts.sum()),
        "low": float(np.quantile(boots, 0.025)),
        "high": float(np.quantile(boots, 0.975)),
    }


def best_of_n_kl(n: int) -> float:
    """``log n - (n - 1) / n``: an upper bound on KL(best-of-n || base) in nats for every ranker
    (Beirami et al. 2024), reached only in the limit where no single answer (no single score) has real
    probability; Stiennon et al. 2020 state it as the KL. Estimate the KL itself from samples with
    :func:`best_of_n_kl_estimate`."""
    return float(np.log(n) - (n - 1) / n)


def best_of_n_kl_estimate(scores, n: int, decimals: int = 6) -> np.ndarray:
    """Per-prompt KL(best-of-n || base) in nats, estimated from ``m >= n`` samples of the base policy
    per prompt and the ranker's ``scores`` ``[m, prompts]`` of them (a plug-in estimate).

    Best-of-n keeps the highest-scoring of ``n`` samples (the first of equals). Group a prompt's answers
    by score: the selected answer's score is ``s`` with probability ``F(s)^n - F(s-)^n``, where ``F`` is
    the base policy's distribution function of the score, and within a score the selected answer is
    drawn as the base policy draws it. So the likelihood ratio is constant within a score and the KL is
    the KL between the two distributions of the score (Beirami et al. 2024, who also show
    ``log n - (n - 1)/n``, :func:`best_of_n_kl`, is an upper bound, reached when no score has real
    probability). The plug-in takes ``F`` from the ``m`` samples. For a pass/fail ranker (a verifier)
    with pass rate ``p`` this is exact in ``p``: ``q log(q/p) + (1-q) log((1-q)/(1-p))``, ``q = 1-(1-p)^n``;
    for a ranker whose scores are all distinct it falls short of the bound by about 2% at
    ``m = n = 16`` and 7% at ``m = n = 4`` (the samples cannot show the tail), and reaches it as ``m`` grows.
    Scores are compared after rounding to ``decimals`` (the same answer scored in two batches can
    differ in the last float bits).
    """
    scores = np.round(np.asarray(scores, float), decimals)
    if scores.ndim != 2 or len(scores) < n or n < 1:
        raise ValueError(f"scores should be [m >= n, prompts], got shape {list(scores.shape)} for n = {n}")
    m = len(scores)
    out = np.empty(scores.shape[1])
    for j in range(scores.shape[1]):
        values, counts = np.unique(scores[:, j], return_counts=True)  # ascending scores
        cdf = np.cumsum(counts) / m
        below = np.concatenate([[0.0], cdf[:-1]])
        base = counts / m
        best = cdf**n - below**n
        keep = best > 0
        out[j] = float(np.sum(best[keep] * np.log(best[keep] / base[keep])))
    return out


def best_of_n(candidates: list[pd.DataFrame], scores) -> pd.DataFrame:
    """Best-of-n selection: ``candidates`` are ``n`` frames of :func:`evaluate` on the same prompts
    (``n`` samples per prompt), ``scores`` ``[n, prompts]`` how a ranker scores each; returns, per
    prompt, the row of the highest-scoring candidate (the first of equals)."""
    scores = np.asarray(scores, float)
    if scores.shape != (len(candidates), len(candidates[0])):
        want = f"[n={len(candidates)}, prompts={len(candidates[0])}]"
        raise ValueError(f"scores should be {want}, got {list(scores.shape)}")
    pick = scores.argmax(0)
    rows = [candidates[k].iloc[i] for i, k in enumerate(pick)]
    return pd.DataFrame(rows).reset_index(drop=True)


def measure(
    model,
    tokenizer,
    prompts,
    reference,
    *,
    kinds=None,
    greedy: bool = True,
    reward=None,
    judge=None,
    unsafe=None,
    reference_name: str = "SFT",
    seed: int = 3,
    temperature: float = 1.0,
    coreference: bool = False,
):
    """What every chapter's results table reports about one model, on the same prompts.

    Samples one answer per prompt (at ``temperature``, ``seed``) and, with ``greedy``, one greedy answer,
    both scored by :func:`evaluate` (the gold judge, or ``judge``). Returns ``(sampled, greedy, stats)``:
    the two per-prompt frames (``greedy`` is ``None`` without it) and :func:`answer_stats` of the
    sampled answers, with ``"KL to SFT"`` (named after ``reference_name``):
    :func:`utils.rollout.sequence_kl` to ``reference`` (at temperature 1) on the sampled token ids,
    0 for the reference itself sampled at temperature 1.
    """
    prompts = list(prompts)
    sampled = evaluate(
        model,
        tokenizer,
        prompts,
        kinds=kinds,
        do_sample=True,
        temperature=temperature,
        seed=seed,
        judge=judge,
    )
    greedy_df = evaluate(model, tokenizer, prompts, kinds=kinds, judge=judge) if greedy else None
    kl = sequence_kl(model, reference, tokenizer, prompts, list(sampled["token_ids"]), temperature)
    stats = answer_stats(
        sampled,
        prompts,
        tokenizer,
        kl=kl,
        reward=reward,
        unsafe=unsafe,
        reference_name=reference_name,
        coreference=coreference,
    )
    return sampled, greedy_df, stats


def answer_stats(
    answers: pd.DataFrame,
    prompts,
    tokenizer,
    *,
    kl: float = np.nan,
    reward=None,
    unsafe=None,
    reference_name: str = "SFT",
    coreference: bool = False,
) -> dict:
    """What a results table reports about one set of answers (a frame of :func:`evaluate`), beyond gold:

    * ``"learned reward"``: the mean score of ``reward = (reward_model, mean, std)`` in those units
      (the SFT model's answers score about 0), when ``reward`` is given;
    * ``"KL to SFT"`` (named after ``reference_name``): ``kl``, as measured by the caller;
    * ``"words"``, ``"rude"``, ``"finished"`` and, where the judge knows it, ``"correct"``;
    * with ``unsafe`` (a boolean per prompt): ``"refuses unsafe"`` and ``"refuses harmless"``;
    * with ``coreference`` (TinyWorld dialogues), ``"right creature"``: of the answers to fact
      follow-ups that name a creature, the share whose subject is the creature the dialogue is
      about (:func:`utils.judge.about_subject`).
    """
    prompts, sampled, stats = list(prompts), answers, {}
    if reward is not None:
        from .reward import score_answers

        reward_model, mean, std = reward
        learned = score_answers(reward_model, tokenizer, prompts, sampled["response"]).cpu()
        stats["learned reward"] = ((learned - mean) / std).mean().item()
    stats[f"KL to {reference_name}"] = kl
    stats["words"] = sampled["response"].map(lambda t: len(t.split())).mean()
    stats["rude"] = sampled["rude"].mean()
    stats["finished"] = sampled["finished"].mean()
    if sampled["correct"].notna().all():
        stats["correct"] = sampled["correct"].astype(float).mean()
    if unsafe is not None:
        unsafe = np.asarray(unsafe, bool)
        stats["refuses unsafe"] = sampled["refused"][unsafe].mean() if unsafe.any() else np.nan
        stats["refuses harmless"] = sampled["refused"][~unsafe].mean()
    if coreference:
        about = [judge_rules.about_subject(p, r) for p, r in zip(prompts, sampled["response"])]
        named = [a for a in about if a is not None]
        stats["right creature"] = float(np.mean(named)) if named else np.nan
    return stats


def results_table(results: dict, baseline: str = "SFT") -> pd.DataFrame:
    """One row per model of ``results = {name: measure(...)}``: gold score and win rate against
    ``baseline`` (with its 95% interval) for sampled and, where measured, greedy answers, then the stats."""
    base_sampled, base_greedy, _ = results[baseline]
    rows = {}
    for name, (sampled, greedy, stats) in results.items():
        ws = win_rate(sampled["gold"], base_sampled["gold"])
        row = {
            "gold, sampled": sampled["gold"].mean(),
            f"win vs {baseline}, sampled": ws["win_rate"],
            "95% CI": f"[{ws['low']:.3f}, {ws['high']:.3f}]",
        }
        if greedy is not None and base_greedy is not None:
            wg = win_rate(greedy["gold"], base_greedy["gold"])
            row.update(
                {
                    "gold, greedy": greedy["gold"].mean(),
                    f"win vs {baseline}, greedy": wg["win_rate"],
                    "95% CI ": f"[{wg['low']:.3f}, {wg['high']:.3f}]",
                }
            )
        rows[name] = row | stats
    # one row per model, built by rows: each column keeps its own type (the numbers stay floats, so
    # the table's .round(3) rounds them; a frame built by columns and transposed holds objects)
    return pd.DataFrame.from_dict(rows, orient="index")
