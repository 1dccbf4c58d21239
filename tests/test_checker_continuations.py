"""A learner who is stuck can go on: every exercise checker's failure message ends with the one line
that continues the chapter with the course's own implementation, and that line works - what it
imports passes the very checker that offers it."""

from __future__ import annotations

import pytest

import utils.checks as checks
from utils.checks import CheckError

# Project 2's checkpoints judge the learner's own runs (their data, reward model and policies):
# there is no course implementation of a learner's run to fall back on.
RUN_CHECKPOINTS = {
    "check_beta_choice",
    "check_dpo_sweep",
    "check_policy_run",
    "check_preference_data",
    "check_preference_pairs_run",
    "check_reward_model_choice",
    "check_reward_model_run",
    "check_win_rate_matrix",
}
CHECKERS = sorted(n for n in dir(checks) if n.startswith("check_"))
EXERCISES = [n for n in CHECKERS if n not in RUN_CHECKPOINTS]


def test_every_exercise_checker_offers_a_way_on():
    missing = [n for n in EXERCISES if not getattr(getattr(checks, n), "continuation", None)]
    assert not missing, f"checkers without a continuation line: {missing}"


def _continuation(name: str):
    line = getattr(checks, name).continuation
    namespace: dict = {}
    exec(line, namespace)  # noqa: S102 - the line a learner is told to run
    functions = [v for k, v in namespace.items() if not k.startswith("__") and callable(v)]
    assert functions, f"{name}: `{line}` brings in no function"
    return line, functions  # one per function the exercise asks for, in the checker's order


@pytest.mark.parametrize("name", EXERCISES)
def test_the_line_brings_in_an_implementation_that_passes_the_check(name, capsys):
    _, functions = _continuation(name)
    getattr(checks, name)(*functions)
    assert "[check passed]" in capsys.readouterr().out


@pytest.mark.parametrize("name", EXERCISES)
def test_a_failing_check_ends_with_the_line(name):
    line, functions = _continuation(name)

    def stub(*args, **kwargs):
        raise NotImplementedError()

    with pytest.raises(CheckError) as failure:
        getattr(checks, name)(*[stub] * len(functions))
    message = str(failure.value)
    assert "is not implemented yet" in message  # the checker's own message comes first
    assert message.rstrip().endswith(line)
