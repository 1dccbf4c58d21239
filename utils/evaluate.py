"""Ground-truth evaluation with the gold judge: scores, per-kind tables, win rates with intervals."""
from __future__ import annotations

import numpy as np
import pandas as pd

from . import judge as judge_rules  # (``judge`` is also an argument name below)
from .models import generate_responses


def evaluate(model, tokenizer, conversations, *, do_sample: bool = False, temperature: float = 1.0,
             max_new_tokens: int = 40, seed: int = 0, kinds=None, judge=None) -> pd.DataFrame:
    """Generate one response per conversation and score it: one row per prompt.

    Columns: ``prompt`` (last user turn), ``kind``, ``response``, ``finished``, ``n_tokens``,
    ``gold`` (the judge's score), ``correct``, ``rude``, ``refused``.

    ``judge`` is ``None`` for TinyWorld's gold judge, or ``(reward model, its tokenizer)`` for real
    prompts (the ``hub`` profile): ``gold`` is then that model's score and ``correct`` is unknown (NaN).
    """
    conversations = list(conversations)
    gens = generate_responses(model, tokenizer, conversations, do_sample=do_sample, temperature=temperature,
                              max_new_tokens=max_new_tokens, seed=seed)
    if judge is not None:
        from .rlhf import reward_scores

        judged = reward_scores(judge[0], judge[1], conversations,
                               [[{"role": "assistant", "content": g.text}] for g in gens]).float().cpu().tolist()
    rows = []
    for i, (conv, g) in enumerate(zip(conversations, gens)):
        if judge is None:
            parts = judge_rules.score_breakdown(conv, g.text, g.finished)
            gold, correct = float(sum(parts.values())), ("correct" in parts) or ("refusal" in parts)
            rude = "rude" in parts
        else:
            gold, correct, rude = judged[i], np.nan, judge_rules.is_rude(g.text)
        rows.append({
            "prompt": conv[-1]["content"], "kind": kinds[i] if kinds is not None else None,
            "response": g.text, "finished": g.finished, "n_tokens": g.n_tokens,
            "gold": gold, "correct": correct, "rude": rude, "refused": judge_rules.is_refusal(g.text),
        })
    return pd.DataFrame(rows)


def summarize(df: pd.DataFrame) -> pd.DataFrame:
    """Mean gold score, accuracy, rudeness, finished rate and length, overall and per kind."""
    cols = {"gold": "mean", "correct": "mean", "rude": "mean", "finished": "mean", "n_tokens": "mean"}
    out = df.groupby("kind").agg(cols) if df["kind"].notna().any() else pd.DataFrame()
    overall = df.agg(cols).to_frame("all").T
    return pd.concat([out, overall]).round(3)


def win_rate(scores_a, scores_b, n_boot: int = 2000, seed: int = 0) -> dict[str, float]:
    """How often ``a`` beats ``b`` on the same prompts (ties count one half), with a paired
    bootstrap 95% confidence interval: ``{"win_rate", "low", "high", "ties"}``."""
    a, b = np.asarray(scores_a, float), np.asarray(scores_b, float)
    if a.shape != b.shape or a.ndim != 1 or len(a) == 0:
        raise ValueError(f"need two equally long, non-empty score lists; got {a.shape} and {b.shape}")
    wins = (a > b) + 0.5 * (a == b)
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, len(a), size=(n_boot, len(a)))
    boots = wins[idx].mean(axis=1)
    return {"win_rate": float(wins.mean()), "low": float(np.quantile(boots, 0.025)),
            "high": float(np.quantile(boots, 0.975)), "ties": float((a == b).mean())}


def mean_ci(values, n_boot: int = 2000, seed: int = 0) -> dict[str, float]:
    """The mean of ``values`` with a bootstrap 95% confidence interval."""
    v = np.asarray(values, float)
    rng = np.random.default_rng(seed)
    boots = v[rng.integers(0, len(v), size=(n_boot, len(v)))].mean(axis=1)
    return {"mean": float(v.mean()), "low": float(np.quantile(boots, 0.025)), "high": float(np.quantile(boots, 0.975))}


class PeakMemory:
    """Context manager: the peak resident memory while the block runs, sampled every ``every``
    seconds, as ``.peak`` (bytes) and ``.peak_mb``.

    By default it watches this process; with ``children=True``, the summed memory of process
    ``pid``'s descendants instead (the benchmark uses that for a notebook's kernel).
    """

    def __init__(self, pid: int | None = None, children: bool = False, every: float = 0.05):
        import os
        import threading

        self.pid, self.children, self.every, self.peak = pid or os.getpid(), children, every, 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _rss(self) -> int:
        import psutil

        try:
            proc = psutil.Process(self.pid)
            if self.children:
                return sum(c.memory_info().rss for c in proc.children(recursive=True))
            return proc.memory_info().rss
        except psutil.Error:
            return 0

    def _run(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, self._rss())
            self._stop.wait(self.every)

    def __enter__(self):
        self.peak = self._rss()
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self._rss())

    @property
    def peak_mb(self) -> float:
        return self.peak / 2**20


def count_sequences(*models):
    """Attach counters of the sequences each model processes (rows of ``input_ids`` per forward call).

    Returns ``(counts, handles)``: a dict that fills up as the models run (calls under
    ``torch.no_grad()`` counted apart), and the hook handles to ``.remove()`` when done."""
    counts = {"with_grad": 0, "without_grad": 0}

    def hook(module, args, kwargs):
        import torch

        ids = kwargs.get("input_ids", args[0] if args else None)
        if ids is not None:
            counts["with_grad" if torch.is_grad_enabled() else "without_grad"] += int(ids.shape[0])

    return counts, [m.register_forward_pre_hook(hook, with_kwargs=True) for m in models]
