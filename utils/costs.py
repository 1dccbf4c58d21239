"""What a run costs: peak memory and the sequences each model processes (the benchmark imports this)."""

from __future__ import annotations


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
