"""What a checker guards besides the learner's answer: the course's own implementation passed in
place of the learner's is refused; a model a getter loaded and a run then trained in place is named
as the cause (before the check, and when the learner's function does it during the check); a run
that must use the learner's function is refused when it never calls it; and, executed in a Jupyter
kernel from a student notebook, a failing check shows its message and no line of the checker."""

from __future__ import annotations

import copy
import functools
import json
from pathlib import Path

import pytest
import torch
from test_checker_continuations import EXERCISES, _continuation

import utils.checks as checks
from utils import artifacts
from utils.checks import CheckError
from utils.checks.core import references_allowed

ROOT = Path(__file__).resolve().parent.parent


# --- the course's own implementation is not the learner's ------------------------------------------
@pytest.mark.parametrize("name", EXERCISES)
def test_a_checker_refuses_the_courses_own_implementation(name):
    line, functions = _continuation(name)  # what a stuck learner imports to go on
    with references_allowed(False), pytest.raises(CheckError, match="the course's own") as failure:
        getattr(checks, name)(*functions)
    assert "write" in str(failure.value)


def test_a_wrapped_reference_is_refused_too():
    from utils.ppo import gae

    with references_allowed(False), pytest.raises(CheckError, match="the course's own `utils.ppo.gae`"):
        checks.check_gae(functools.partial(gae))


def test_a_learners_function_is_not_taken_for_the_courses():
    def gae(*args):
        raise NotImplementedError()

    with references_allowed(False), pytest.raises(CheckError, match="not implemented yet"):
        checks.check_gae(gae)


# --- a loaded model trained in place -------------------------------------------------------------
def _step(model):
    """One small SGD step on the model itself: what a run given the loaded model does to it."""
    ids = torch.tensor([[1, 2, 3, 4, 5]])
    model.train()
    model(input_ids=ids, labels=ids).loss.backward()
    with torch.no_grad():
        for p in model.parameters():
            if p.grad is not None:
                p -= 1e-4 * p.grad
                p.grad = None
    model.eval()


def _loaded(tiny_model, tiny_tokenizer, stage="sft"):
    model = copy.deepcopy(tiny_model)
    return artifacts._remember(stage, (model, tiny_tokenizer))[0]


def test_the_fingerprint_sees_one_small_step_and_not_a_copy(tiny_model, tiny_tokenizer):
    model = _loaded(tiny_model, tiny_tokenizer)
    assert artifacts.loaded_as(model) == "the SFT model (`get_sft_model`)"
    twin = copy.deepcopy(model)
    assert artifacts.loaded_as(twin) is None  # a copy is the learner's to train
    assert not artifacts.changed_since_loaded(model.to("cpu").eval())
    _step(twin)
    assert not artifacts.changed_since_loaded(model)
    _step(model)
    assert artifacts.changed_since_loaded(model)


def _dialogues(n=6):
    from utils.data import eval_conversations

    return eval_conversations(n, seed=0)["prompt"]


def test_a_checkpoint_names_a_model_trained_before_it(tiny_model, tiny_tokenizer):
    sft = _loaded(tiny_model, tiny_tokenizer)
    _step(sft)  # an earlier cell trained it: e.g. DPO with policy and reference swapped

    def align(model, tokenizer):
        return copy.deepcopy(model)

    with pytest.raises(CheckError, match="no longer the model the setup cell loaded") as failure:
        checks.check_policy_run(
            align, sft, tiny_tokenizer, start=sft, tokenizer=tiny_tokenizer, conversations=_dialogues()
        )
    assert "Re-run the setup cell" in str(failure.value)


def test_a_checkpoint_names_a_run_that_trains_the_loaded_model(tiny_model, tiny_tokenizer):
    sft = _loaded(tiny_model, tiny_tokenizer)

    def align(model, tokenizer):
        policy = copy.deepcopy(model)
        _step(model)  # arguments in the wrong order: the reference is the one trained
        return policy

    with pytest.raises(CheckError, match="Your function trained the SFT model") as failure:
        checks.check_policy_run(
            align, sft, tiny_tokenizer, start=sft, tokenizer=tiny_tokenizer, conversations=_dialogues()
        )
    assert "order of the arguments" in str(failure.value)


def test_a_reward_model_run_that_trains_the_loaded_model_is_named(tiny_model, tiny_tokenizer):
    sft = _loaded(tiny_model, tiny_tokenizer)

    def train_reward(model, tokenizer, pairs):
        _step(model)  # forgot the copy (and the head): the SFT model itself was trained
        return model

    with pytest.raises(CheckError, match="Your function trained the SFT model"):
        checks.check_reward_model_run(train_reward, sft, tiny_tokenizer, [], [])


def test_an_untouched_loaded_model_passes_through(tiny_model, tiny_tokenizer):
    sft = _loaded(tiny_model, tiny_tokenizer)

    def align(model, tokenizer):
        return "not a model"

    with pytest.raises(CheckError, match="should return the trained language model"):
        checks.check_policy_run(
            align, sft, tiny_tokenizer, start=sft, tokenizer=tiny_tokenizer, conversations=_dialogues()
        )


# --- a run that must use the learner's function --------------------------------------------------
def _align_in(namespace_source: str):
    namespace: dict = {}
    exec(namespace_source, namespace)  # noqa: S102 - a notebook's globals
    return namespace


LEARNERS_BLOCK = """
def rlhf_advantages(*args):
    return None

def align_without(model, tokenizer):
    return "trained with the course's block"   # train_ppo(...) without advantages_fn

def align_with(model, tokenizer):
    rlhf_advantages(1, 2)                       # train_ppo(..., advantages_fn=rlhf_advantages)
    return "trained with theirs"
"""


def test_a_run_that_never_calls_the_learners_block_is_refused(tiny_model, tiny_tokenizer):
    ns = _align_in(LEARNERS_BLOCK)
    theirs = ns["rlhf_advantages"]
    kwargs = dict(start=tiny_model, tokenizer=tiny_tokenizer, conversations=[], calls=ns["rlhf_advantages"])
    with pytest.raises(CheckError, match="never called your `rlhf_advantages`"):
        checks.check_policy_run(ns["align_without"], tiny_model, tiny_tokenizer, **kwargs)
    # with it, the run goes on to be judged (here: it returned no model)
    with pytest.raises(CheckError, match="should return the trained language model"):
        checks.check_policy_run(ns["align_with"], tiny_model, tiny_tokenizer, **kwargs)
    assert ns["rlhf_advantages"] is theirs  # the notebook's name is bound to their function again


# --- in a Jupyter kernel, from the student notebook ---------------------------------------------
def _run_cells(cells: list[str]):
    import nbformat
    from nbclient import NotebookClient

    nb = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell(c) for c in cells])
    NotebookClient(nb, timeout=120, kernel_name="python3", allow_errors=True).execute(cwd=str(ROOT))
    return nb.cells


def _student_exercise(notebook: str, function: str) -> tuple[str, str]:
    cells = [c for c in json.loads((ROOT / "notebooks" / notebook).read_text())["cells"]]
    code = ["".join(c["source"]) for c in cells if c["cell_type"] == "code"]
    i = next(i for i, s in enumerate(code) if f"def {function}(" in s and "NotImplementedError" in s)
    return code[i], code[i + 1]


@pytest.mark.parametrize(
    "planted, shows, hides",
    [
        # a wrong answer: the checker's message, none of its source (which holds the reference)
        (
            "return torch.zeros(labels.shape[0])",
            ["CheckError", "sequence_logprobs"],
            ["gather", "def check_"],
        ),
        # an error in the learner's own code: their frames, not the checker's
        (
            "return logits[10_000]",
            ["IndexError", "Traceback (your code)", "logits[10_000]"],
            ["call_learner"],
        ),
    ],
    ids=["wrong-values", "error-in-learners-code"],
)
def test_a_student_notebooks_failing_check_shows_no_line_of_the_checker(planted, shows, hides):
    exercise, check = _student_exercise("04_dpo.ipynb", "sequence_logprobs")
    mine = exercise.replace("raise NotImplementedError()", planted)
    out = _run_cells([mine, check])[1].outputs
    errors = [o for o in out if o.output_type == "error"]
    assert len(errors) == 1, out
    shown = "\n".join(errors[0].traceback)
    for text in shows:
        assert text in shown, shown
    for text in [*hides, "utils/checks", "site-packages"]:
        assert text not in shown, shown
