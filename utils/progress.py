"""Progress bars and quiet library output: what a notebook shows while it trains.

The bars are plain text (they render the same in a terminal, Jupyter and the book) and redraw at
most every few seconds: a postfix (the running loss) is shown at the next redraw, not printed on
every step, so an executed notebook keeps a few lines of progress rather than hundreds.
"""

from __future__ import annotations

import contextlib
import sys

from tqdm import tqdm as _tqdm


class _Bar(_tqdm):
    def set_postfix(self, ordered_dict=None, refresh=False, **kwargs):  # tqdm's default redraws every call
        super().set_postfix(ordered_dict, refresh=refresh, **kwargs)


def progress(iterable=None, **kwargs):
    """A compact text progress bar that renders the same in a terminal, Jupyter and the book."""
    kwargs.setdefault("file", sys.stdout)
    kwargs.setdefault("mininterval", 5.0)
    kwargs.setdefault("ncols", 90)
    kwargs.setdefault("ascii", True)
    return _Bar(iterable, **kwargs)


@contextlib.contextmanager
def quiet_transformers(errors_only: bool = False):
    """Hide transformers' one-file progress bars ("writing shards", "loading weights"): noise in a
    notebook. With ``errors_only``, also its warnings (e.g. "some weights were newly initialised"
    when a scalar head is added on purpose)."""
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    verbosity = hf_logging.get_verbosity()
    if errors_only:
        hf_logging.set_verbosity_error()
    try:
        yield
    finally:
        hf_logging.set_verbosity(verbosity)
        hf_logging.enable_progress_bar()


def trainer_bar(trainer, desc: str | None = None):
    """Show a ``transformers``/TRL trainer's progress as one of the course's bars, and stop it
    printing a dict of metrics at every logging step (dozens of lines in an executed notebook).

    The bar's postfix is the last logged training loss. The logs themselves are untouched: read
    them from ``trainer.state.log_history``. It also sizes TRL's fused log-probability tiles to the
    trainer's vocabulary (:func:`utils.config.fit_trl_logprob_tiles`: the same numbers, without
    allocating tiles 40 times wider than the tiny vocabulary). Returns the trainer.
    """
    from transformers import PrinterCallback, ProgressCallback, TrainerCallback
    from transformers.utils.notebook import NotebookProgressCallback

    class _TrainerBar(TrainerCallback):
        bar = None

        def on_train_begin(self, args, state, control, **kwargs):
            self.bar = progress(total=state.max_steps, desc=desc or type(trainer).__name__)

        def on_step_end(self, args, state, control, **kwargs):
            if self.bar is not None:
                self.bar.update(state.global_step - self.bar.n)

        def on_log(self, args, state, control, logs=None, **kwargs):
            if self.bar is not None and logs and "loss" in logs:
                self.bar.set_postfix(loss=f"{logs['loss']:.3f}")

        def on_train_end(self, args, state, control, **kwargs):
            if self.bar is not None:
                self.bar.close()
                self.bar = None

    if type(trainer).__module__.startswith("trl."):
        from .config import fit_trl_logprob_tiles

        fit_trl_logprob_tiles(trainer.model)
    for printer in (PrinterCallback, ProgressCallback, NotebookProgressCallback):
        trainer.remove_callback(printer)
    trainer.add_callback(_TrainerBar())
    return trainer
