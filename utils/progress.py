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
