"""The checker framework: calling the learner's function, judging its answer, and one harness that
compares a loss with a TRL trainer's on a real batch."""

from __future__ import annotations

import contextlib
import functools
import inspect
import sys
import sysconfig
import textwrap
import traceback
from pathlib import Path

import torch

from ..config import fit_trl_logprob_tiles

# Code that is not the learner's: the course's package and the installed libraries and stdlib.
_NOT_LEARNERS = tuple(
    str(Path(p).resolve())
    for p in {
        Path(__file__).resolve().parents[1],  # utils/
        *(sysconfig.get_paths()[k] for k in ("stdlib", "platstdlib", "purelib", "platlib")),
    }
)


class CheckError(AssertionError):
    """A learner's function gave a wrong answer; the message says what to fix.

    In IPython (Jupyter, Colab, nbval's kernel) a failing check shows this message only, not a
    traceback through the checker: the checker's source holds the reference solution and its
    catalogue of known mistakes, which a learner who got one thing wrong should not be shown."""

    def _render_traceback_(self) -> list[str]:
        shown = wrap_lines(f"CheckError: {self}")  # wrapped as plain text, then coloured
        return f"\x1b[0;31mCheckError\x1b[0m{shown[len('CheckError') :]}".split("\n")


# The widest line a notebook's output shows without a horizontal scroll in the book (its code is
# formatted to the same width).
OUTPUT_WIDTH = 88


def wrap_lines(text: str, width: int = OUTPUT_WIDTH) -> str:
    """``text`` with every line longer than ``width`` broken at spaces, its continuation lines
    indented by four spaces more than the line itself."""
    out = []
    for line in text.split("\n"):
        if len(line) <= width:
            out.append(line)
            continue
        lead = line[: len(line) - len(line.lstrip())]
        out.append(
            textwrap.fill(
                line,
                width=width,
                subsequent_indent=lead + "    ",
                break_long_words=False,
                break_on_hyphens=False,
            )
        )
    return "\n".join(out)


def _learners_frames(tb) -> list[traceback.FrameSummary]:
    """The frames of ``tb`` from the first one in the learner's own code (a notebook cell, their
    module) to the end; empty when the error never passed through the learner's code."""
    frames = traceback.extract_tb(tb)
    for i, frame in enumerate(frames):
        path = frame.filename
        if not path.startswith("<frozen") and not str(Path(path).resolve()).startswith(_NOT_LEARNERS):
            return frames[i:]
    return []


def learner_facing(check):
    """Make a checker's failures readable without showing its source.

    A :class:`CheckError` is shown as its message. An error raised inside the learner's own function
    is re-raised as it is (its type, its message), shown with the learner's frames only. Any other
    error - a library's, from what the learner's function returned (a shape mismatch, an index out
    of range in the checker's comparison) - becomes a :class:`CheckError` that says so, with the
    original kept as its ``__cause__`` for a maintainer."""

    @functools.wraps(check)
    def guarded(*args, **kwargs):
        models = _loaded_models(args, kwargs)
        _already_changed(models)
        try:
            result = check(*args, **kwargs)
        except CheckError as error:
            _changed_during(models, check.__name__, error)
            raise
        except Exception as error:
            _changed_during(models, check.__name__, error)
            mine = _learners_frames(error.__traceback__)
            if mine:
                lines = ["Traceback (your code):\n", *traceback.format_list(mine)]
                lines += traceback.format_exception_only(type(error), error)
                error._render_traceback_ = lambda: "".join(lines).rstrip("\n").split("\n")
                raise
            raise CheckError(
                f"`{check.__name__}` could not finish checking: {type(error).__name__}: {error}. "
                "Your function ran, but what it returned broke the comparison: check its shape, "
                "dtype and device against the exercise's description."
            ) from error
        _changed_during(models, check.__name__)
        return result

    return guarded


def _loaded_models(args, kwargs) -> list:
    """The models among a check's arguments that a getter (``get_sft_model``, ``get_base_model``)
    returned, with how it described them."""
    artifacts = sys.modules.get(__name__.split(".")[0] + ".artifacts")
    if artifacts is None:  # not imported: no getter has handed out a model
        return []
    loaded_as = artifacts.loaded_as
    seen, out = set(), []
    for value in (*args, *kwargs.values()):
        if isinstance(value, torch.nn.Module) and id(value) not in seen and loaded_as(value):
            seen.add(id(value))
            out.append(value)
    return out


def _already_changed(models) -> None:
    from ..artifacts import changed_since_loaded, loaded_as

    for model in models:
        if changed_since_loaded(model):
            role = loaded_as(model)
            raise CheckError(
                f"{role[0].upper()}{role[1:]} given to this check is no longer the model the setup cell "
                "loaded: its weights changed after loading. An earlier cell trained it in place - a run "
                "given it as the policy instead of a copy (`copy.deepcopy`), or given the policy and the "
                "frozen reference in the wrong order. Re-run the setup cell that loads it (and the cells "
                "you need after it), then this one."
            )


def _changed_during(models, check_name: str, cause: BaseException | None = None) -> None:
    from ..artifacts import changed_since_loaded, loaded_as

    for model in models:
        if changed_since_loaded(model):
            role = loaded_as(model)
            raise CheckError(
                f"Your function trained {role} itself: its weights changed while `{check_name}` ran it. "
                "Train a copy (`policy = copy.deepcopy(...)`) and pass the loaded model as the frozen "
                "reference - check the order of the arguments (the policy being trained first, then "
                "the reference). The loaded model is no longer what the setup cell loaded: re-run that "
                "cell before you try again."
            ) from cause


_REFERENCES_ALLOWED = False


@contextlib.contextmanager
def references_allowed(allowed: bool = True):
    """Let checkers accept the course's own implementations in place of a learner's (the tests
    check that every reference passes its checker); a learner's check rejects them."""
    global _REFERENCES_ALLOWED
    before, _REFERENCES_ALLOWED = _REFERENCES_ALLOWED, allowed
    try:
        yield
    finally:
        _REFERENCES_ALLOWED = before


def _course_reference(fn) -> str | None:
    """``module.name`` when ``fn`` is one of the course's own functions (from ``utils``), else ``None``."""
    target = fn
    while isinstance(target, functools.partial):
        target = target.func
    module = getattr(target, "__module__", None) or ""
    if module == "utils" or (module.startswith("utils.") and not module.startswith("utils.checks")):
        return f"{module}.{getattr(target, '__qualname__', getattr(target, '__name__', '?'))}"
    return None


def call_learner(fn, name: str, *args, **kwargs):
    """Call the learner's ``fn``, turning the usual early failures into helpful messages. The course's
    own implementation passed in place of the learner's is refused: there is nothing of theirs to
    check (tests allow it with :func:`references_allowed`)."""
    if not callable(fn):
        raise CheckError(f"expected a function for `{name}`, got {type(fn).__name__}")
    reference = _course_reference(fn)
    if reference and not _REFERENCES_ALLOWED:
        raise CheckError(
            f"`{name}` here is the course's own `{reference}`, imported rather than written, so there is "
            f"nothing of yours to check. The chapter can go on with it; to pass this check, write `{name}` "
            "yourself in the exercise's cell, run that cell, then this one."
        )
    try:
        inspect.signature(fn).bind(*args, **kwargs)
    except TypeError as e:
        raise CheckError(
            f"`{name}` has the wrong signature {inspect.signature(fn)}: it must accept "
            f"{_describe_args(args, kwargs)} ({e})"
        ) from None
    try:
        return fn(*args, **kwargs)
    except NotImplementedError:
        raise CheckError(
            f"`{name}` is not implemented yet: replace `raise NotImplementedError()` "
            "in its cell with your code, run that cell, then run this check again."
        ) from None


def _describe_args(args, kwargs) -> str:
    parts = [f"{type(a).__name__}" for a in args] + [f"{k}=" for k in kwargs]
    return "(" + ", ".join(parts) + ")"


def expect_tensor(value, name: str, shape: tuple | None = None, dtype=None) -> torch.Tensor:
    if not isinstance(value, torch.Tensor):
        raise CheckError(f"`{name}` should return a torch.Tensor, got {type(value).__name__}")
    if shape is not None and tuple(value.shape) != tuple(shape):
        raise CheckError(f"`{name}` returned shape {tuple(value.shape)}; expected {tuple(shape)}")
    if dtype is not None and value.dtype != dtype:
        raise CheckError(f"`{name}` returned dtype {value.dtype}; expected {dtype}")
    return value


def _scalar(got, name: str) -> torch.Tensor:
    """A loss: one number, or a tuple whose first element is one."""
    got = expect_tensor(got[0] if isinstance(got, tuple) else got, name)
    if got.dim() != 0:
        raise CheckError(
            f"`{name}` should return one number (the mean over the batch), got shape {tuple(got.shape)}"
        )
    return got


def _loss_verdict(
    got: torch.Tensor, want: torch.Tensor, name: str, where: str, mistakes, default_hint: str, detached: str
) -> None:
    """The common end of a loss checker. Returns if ``got`` equals ``want`` and carries a gradient;
    otherwise raises, naming the first of ``mistakes()`` - ``(wrong value, hint)`` pairs, computed
    only on failure - that ``got`` equals, or ``default_hint``.
    The message reads "`name` gave <got> <where> <want>: <hint>"."""
    if torch.allclose(got.detach(), want, atol=1e-5):
        if not got.requires_grad:
            raise CheckError(f"`{name}`'s result is detached{detached}")
        return
    hint = next(
        (h for value, h in mistakes() if torch.allclose(got.detach(), value, atol=1e-5)), default_hint
    )
    raise CheckError(f"`{name}` gave {got.item():.5f} {where} {want.item():.5f}: {hint}")


def continues_with(line: str):
    """Give a checker the one line that lets a stuck learner go on with the course's own
    implementation: when the check fails, its message ends with ``line``, so a wrong exercise need
    not make every later cell fail (or, worse, train on a wrong loss). The line is also the
    checker's ``continuation`` attribute; a test runs every checker on what its line imports."""

    def wrap(check):
        check = learner_facing(check)

        @functools.wraps(check)
        def checked(*args, **kwargs):
            try:
                return check(*args, **kwargs)
            except CheckError as error:
                raise CheckError(
                    f"{error}\n\nStuck? This line goes on with the course's own implementation\n"
                    f"(come back to yours later):\n    {line}"
                ) from error.__cause__  # a library error behind it stays reachable

        checked.continuation = line
        return checked

    return wrap


def passed(message: str) -> None:
    print(wrap_lines(f"[check passed] {message}"))


def compare_with_trl_trainer(
    fn,
    name: str,
    *,
    trainer_cls,
    config_cls,
    models: dict,
    tokenizer,
    pairs,
    tag: str,
    trl_loss,
    learner_inputs,
    who: str,
    whose: str,
    tol: float = 1e-4,
    note: str = "",
    **options,
) -> str:
    """Build ``trainer_cls`` on (at most) 16 of ``pairs`` and compare its loss on one collated batch
    with the learner's ``fn``.

    ``models`` are the trainer's model arguments (``{"model": ..., "ref_model": ...}``), deep-copied;
    the first one's device decides CPU or not. ``options`` go to ``config_cls`` on top of the shared
    settings (fp32, no logging, no saving, no progress bars). Under ``torch.no_grad()`` and in eval
    mode, ``trl_loss(trainer, batch)`` gives the trainer's loss and ``learner_inputs(trainer, batch, n)``
    the arguments for ``fn`` (``n`` pairs; the chapter-specific part). Raises :class:`CheckError`
    if the two losses differ by more than ``tol`` - "... `name` gives <got> but <who> gives <want><note>" -
    and otherwise returns the end of the pass message: ", and equals <whose> loss on n real pairs (...)".
    """
    import copy

    import datasets

    datasets.disable_progress_bars()
    data = pairs.select_columns(["prompt", "chosen", "rejected"]).select(range(min(16, len(pairs))))
    on_cpu = next(next(iter(models.values())).parameters()).device.type == "cpu"
    args = config_cls(
        output_dir=f"/tmp/course-{tag}-check",
        per_device_train_batch_size=len(data),
        report_to=[],
        save_strategy="no",
        use_cpu=on_cpu,
        bf16=False,
        fp16=False,
        disable_tqdm=True,
        **options,
    )
    trainer = trainer_cls(
        **{k: copy.deepcopy(m) for k, m in models.items()},
        args=args,
        train_dataset=data,
        processing_class=tokenizer,
    )
    fit_trl_logprob_tiles(trainer.model)  # every trainer_cls here is TRL's
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(len(data))])
    batch = {k: v.to(trainer.model.device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
    n = len(data)
    trainer.model.eval()
    with torch.no_grad():
        want = float(trl_loss(trainer, batch))
        inputs = learner_inputs(trainer, batch, n)
    got = _scalar(call_learner(fn, name, *inputs), name).item()
    if abs(got - want) > tol:
        raise CheckError(
            f"on a batch of {n} real pairs `{name}` gives {got:.5f} but {who} gives {want:.5f}{note}"
        )
    return f", and equals {whose} loss on {n} real pairs ({want:.5f})"
