"""Phase timers injected into a notebook's kernel by ``tools/profile_course.py``.

This file is executed as the first cell of a profiled notebook (it does not import the course's
``utils`` until the notebook does, and it patches library entry points that every version of the
course calls), and ``_course_profile_dump(path)`` as its last cell.

Every second of a cell's execution goes to exactly one phase: the innermost timed call that is
running. Some phases are *opaque*: what runs inside them is theirs (a ``generate`` call owns the
forward passes it makes; the gold judge owns the parsing it does). Others are containers: a TRL
trainer's ``train`` owns only what its forward/backward/optimiser calls do not (its own overhead).

Phases (the keys of the dump):

* ``imports``: top-level ``import`` statements that load a module (not already-loaded ones);
* ``sampling``: ``generate`` (transformers, TRL's trainers included) and the course's samplers;
* ``forward (train)`` / ``backward`` / ``optimiser``: a model's forward with gradients on, autograd's
  backward, optimiser steps with gradient clipping and zeroing;
* ``forward (no grad)``: a model's forward without gradients outside sampling: log-probabilities of
  the reference and old policy, the reward model's and value model's scores, perplexity;
* ``gold judge``: the gold judge's rubric and the verifier;
* ``trainer overhead``: ``transformers.Trainer`` (and so every TRL trainer): ``__init__``, ``train``,
  ``evaluate``, without the phases above; ``datasets`` ``map``/``filter`` counted apart as
  ``dataset map``;
* ``tokenising``: tokenizer calls and chat templates outside the phases above;
* ``evaluation (other)``: the course's evaluation helpers, without the phases above (decoding,
  pandas, bootstrap intervals);
* ``plotting``: figure creation and rendering (the inline backend draws after each cell);
* ``other``: everything else a cell runs (the notebook's own Python, data building, caches).

Each phase also counts tokens: ``sampling`` the sampled positions (rows x new tokens) and the
prompt positions of its prefill, the forwards the positions they process, so that throughput and
FLOP rates (``2 N`` per position forward, ``6 N`` forward + backward) come out of the dump.
"""

import builtins as _builtins
import functools as _functools
import json as _json
import sys as _sys
import time as _time


class _CourseProfiler:
    def __init__(self):
        self.stack = []  # the phases of the timed calls now running, innermost last
        self.opaque_depth = 0
        self.last = _time.perf_counter()
        self.cell = None  # the current cell's record
        self.cells = []
        self.in_cell = False
        self.param_count = {}

    # --- time accounting -------------------------------------------------------------------
    def _charge(self, now):
        if self.in_cell and self.cell is not None:
            phase = self.stack[-1] if self.stack else "other"
            t = self.cell["phases"]
            t[phase] = t.get(phase, 0.0) + (now - self.last)
        self.last = now

    def enter(self, phase, opaque):
        if self.opaque_depth:
            self.opaque_depth += 1
            return False
        self._charge(_time.perf_counter())
        self.stack.append(phase)
        if opaque:
            self.opaque_depth = 1
        return True

    def exit(self, pushed):
        if not pushed:
            if self.opaque_depth:
                self.opaque_depth -= 1
            return
        self._charge(_time.perf_counter())
        self.stack.pop()
        self.opaque_depth = 0

    def count(self, key, value):
        if self.in_cell and self.cell is not None:
            c = self.cell["counts"]
            c[key] = c.get(key, 0) + value

    # --- cells -----------------------------------------------------------------------------
    def pre_cell(self, info=None):
        src = getattr(info, "raw_cell", "") or ""
        label = next((ln.strip() for ln in src.splitlines() if ln.strip()), "")
        self.cell = {
            "index": len(self.cells),
            "label": label[:100],
            "phases": {},
            "counts": {},
            "start": _time.perf_counter(),
        }
        self.stack, self.opaque_depth = [], 0
        self.last = _time.perf_counter()
        self.in_cell = True

    def post_cell(self, result=None):
        if self.cell is None:
            return
        self._charge(_time.perf_counter())
        self.cell["wall_s"] = _time.perf_counter() - self.cell.pop("start")
        self.cells.append(self.cell)
        self.in_cell = False

    def n_params(self, model):
        key = id(model)
        if key not in self.param_count:
            seen, total = set(), 0
            for p in model.parameters():
                if id(p) not in seen:
                    seen.add(id(p))
                    total += p.numel()
            self.param_count[key] = total
        return self.param_count[key]


_course_prof = _CourseProfiler()


def _course_wrap(fn, phase, opaque=True, counter=None):
    if getattr(fn, "_course_profiled", False):
        return fn

    @_functools.wraps(fn)
    def wrapper(*args, **kwargs):
        pushed = _course_prof.enter(phase if isinstance(phase, str) else phase(args, kwargs), opaque)
        try:
            out = fn(*args, **kwargs)
        finally:
            _course_prof.exit(pushed)
        if counter is not None:
            try:
                counter(args, kwargs, out)
            except Exception:  # counting must never break the notebook
                pass
        return out

    wrapper._course_profiled = True
    wrapper._course_original = fn
    return wrapper


def _course_patch(owner, name, phase, opaque=True, counter=None):
    fn = owner.__dict__.get(name) if isinstance(owner, type) else getattr(owner, name, None)
    if fn is None or getattr(fn, "_course_profiled", False):
        return
    if isinstance(fn, (staticmethod, classmethod)):
        return
    setattr(owner, name, _course_wrap(fn, phase, opaque, counter))


# --- imports ---------------------------------------------------------------------------------
_course_import = _builtins.__import__


def _course_timed_import(
    name,
    globals=None,
    locals=None,
    fromlist=(),
    level=0,
    _modules=_sys.modules,
    _prof=_course_prof,
    _imp=_course_import,
):
    # (the module globals this needs are bound as defaults: it still runs while the kernel shuts down)
    if level == 0 and name in _modules and not fromlist:
        return _imp(name, globals, locals, fromlist, level)
    try:
        pushed = _prof.enter("imports", True)
    except Exception:  # the kernel is shutting down (another thread importing): just import
        return _imp(name, globals, locals, fromlist, level)
    try:
        module = _imp(name, globals, locals, fromlist, level)
    finally:
        _prof.exit(pushed)
    # A course module imported inside a function (``from .sampling import sample_tokens`` in
    # ``generate_texts``) is patched before the caller reads the name from it.
    course = name if level == 0 else (globals or {}).get("__name__", "") or ""
    if course == "utils" or course.startswith("utils."):
        _course_patch_libraries()
    return module


_builtins.__import__ = _course_timed_import


# --- library entry points (patched once they are imported) ----------------------------------
def _input_positions(args, kwargs):
    ids = kwargs.get("input_ids")
    if ids is None and args and hasattr(args[0], "shape"):
        ids = args[0]
    if ids is None:
        ids = kwargs.get("inputs_embeds")
        return 0 if ids is None else int(ids.shape[0] * ids.shape[1])
    return int(ids.numel())


def _forward_phase(args, kwargs):
    import torch

    return "forward (train)" if torch.is_grad_enabled() else "forward (no grad)"


def _forward_counter(args, kwargs, out):
    import torch

    if _course_prof.opaque_depth:
        return  # inside a sampler (counted by it) or another model's forward (counted there)
    model = args[0]
    n = _input_positions(args[1:], kwargs)
    key = "train" if torch.is_grad_enabled() else "no_grad"
    _course_prof.count(f"{key}_positions", n)
    _course_prof.count(f"{key}_flop", 2 * _course_prof.n_params(model) * n)


def _generate_counter(args, kwargs, out):
    model = args[0]
    ids = kwargs.get("input_ids")
    if ids is None and len(args) > 1:
        ids = args[1]
    seqs = out if hasattr(out, "shape") else getattr(out, "sequences", None)
    if ids is None or seqs is None:
        return
    rows, prompt = ids.shape
    new = seqs.shape[1] - prompt
    n = _course_prof.n_params(model)
    _course_prof.count("sampled_positions", rows * new)
    _course_prof.count("prefill_positions", rows * prompt)
    _course_prof.count("sampling_flop", 2 * n * rows * (new + prompt))


def _sampler_counter(args, kwargs, out):
    model, ids = args[0], kwargs.get("input_ids", args[1] if len(args) > 1 else None)
    if ids is None or not hasattr(out, "shape"):
        return
    rows, prompt = ids.shape
    new = out.shape[1]
    n = _course_prof.n_params(model)
    _course_prof.count("sampled_positions", rows * new)
    _course_prof.count("prefill_positions", rows * prompt)
    _course_prof.count("sampling_flop", 2 * n * rows * (new + prompt))


def _course_patch_libraries():
    mods = _sys.modules
    if "torch" in mods:
        import torch

        _course_patch(torch.Tensor, "backward", "backward")
        _course_patch(torch.autograd, "backward", "backward")
        for cls in (torch.optim.AdamW, torch.optim.Adam, torch.optim.SGD):
            _course_patch(cls, "step", "optimiser")
        _course_patch(torch.optim.Optimizer, "zero_grad", "optimiser")
        _course_patch(torch.nn.utils, "clip_grad_norm_", "optimiser")
    if "transformers" in mods:
        try:
            from transformers import LlamaForCausalLM, LlamaForSequenceClassification, LlamaModel
            from transformers.generation.utils import GenerationMixin

            _course_patch(GenerationMixin, "generate", "sampling", counter=_generate_counter)
            for cls in (LlamaForCausalLM, LlamaModel, LlamaForSequenceClassification):
                for klass in cls.__mro__:
                    if "forward" in klass.__dict__:
                        _course_patch(klass, "forward", _forward_phase, counter=_forward_counter)
                        break
        except Exception:
            pass
        try:
            import transformers

            for name in ("__init__", "train", "evaluate"):
                _course_patch(transformers.Trainer, name, "trainer overhead", opaque=False)
            from transformers import PreTrainedTokenizerBase

            for name in ("__call__", "apply_chat_template", "batch_decode", "decode"):
                _course_patch(PreTrainedTokenizerBase, name, "tokenising", opaque=False)
        except Exception:
            pass
    if "datasets" in mods:
        try:
            import datasets

            for name in ("map", "filter"):
                _course_patch(datasets.Dataset, name, "dataset map", opaque=False)
        except Exception:
            pass
    if "matplotlib" in mods:
        try:
            import matplotlib.backend_bases as bb
            import matplotlib.pyplot as plt

            _course_patch(bb.FigureCanvasBase, "print_figure", "plotting")
            for name in ("subplots", "figure", "show"):
                _course_patch(plt, name, "plotting")
        except Exception:
            pass
    # the course's own functions, in every utils module that holds a reference to them
    utils_mods = [m for k, m in list(mods.items()) if k == "utils" or k.startswith("utils.")]
    if not utils_mods:
        return
    targets = {
        "score": "gold judge",
        "score_breakdown": "gold judge",
        "is_rude": "gold judge",
        "is_refusal": "gold judge",
        "about_subject": "gold judge",
        "verify": "gold judge",
        "verifier_scores": "gold judge",
        "gold_scores": "gold judge",
        "generate_texts": "sampling",
        "sample_tokens": "sampling",
        "sample_rollout": "sampling",
    }
    containers = {
        "evaluate": "evaluation (other)",
        "measure": "evaluation (other)",
        "answer_stats": "evaluation (other)",
        "results_table": "evaluation (other)",
        "win_rate": "evaluation (other)",
        "sequence_kl": "evaluation (other)",
        "rollout_kl": "evaluation (other)",
        "answer_logprobs": "evaluation (other)",
        "best_of_n": "evaluation (other)",
        "plot_curves": "plotting",
        "bar_compare": "plotting",
    }
    originals = {}
    for m in utils_mods:
        for name, phase in list(targets.items()) + list(containers.items()):
            fn = getattr(m, name, None)
            if fn is None or not callable(fn) or isinstance(fn, type):
                continue
            if getattr(fn, "_course_profiled", False):
                continue
            mod_name = getattr(fn, "__module__", "") or ""
            if not (mod_name == "utils" or mod_name.startswith("utils.")):
                continue
            key = id(fn)
            if key not in originals:
                counter = _sampler_counter if name == "sample_tokens" else None
                originals[key] = _course_wrap(fn, phase, opaque=name in targets, counter=counter)
            setattr(m, name, originals[key])


def _course_pre_cell(info=None):
    _course_patch_libraries()
    _course_prof.pre_cell(info)
    # names a notebook imported from utils before they were patched
    ip = get_ipython()  # noqa: F821 (IPython's)
    ns = ip.user_ns
    for name, value in list(ns.items()):
        if callable(value) and not getattr(value, "_course_profiled", False):
            mod = getattr(value, "__module__", "") or ""
            if mod == "utils" or mod.startswith("utils."):
                real = getattr(_sys.modules.get(mod), getattr(value, "__name__", ""), None)
                if getattr(real, "_course_original", None) is value:
                    ns[name] = real


def _course_post_cell(result=None):
    _course_prof.post_cell(result)
    _course_patch_libraries()


def _course_profile_dump(path):
    with open(path, "w") as f:
        _json.dump({"cells": _course_prof.cells}, f)


get_ipython().events.register("pre_run_cell", _course_pre_cell)  # noqa: F821
get_ipython().events.register("post_run_cell", _course_post_cell)  # noqa: F821
