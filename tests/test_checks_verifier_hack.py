"""Chapter 7's "hack the verifier": an answer the verifier scores 1.0 and the gold judge (the reader)
scores well below the plain right answer; the checker refuses answers that fail either side."""

from __future__ import annotations

import pytest

from utils.checks import CheckError, check_verifier_hack
from utils.grpo import verifier_hack, verify

CONVERSATION = [{"role": "user", "content": "Where can I find Dax?"}]


def test_the_reference_passes_and_so_do_other_hacks(capsys):
    check_verifier_hack(verifier_hack)
    check_verifier_hack(lambda: (CONVERSATION, "Dax lives in the river. " + "It is true, " * 12 + "really."))
    check_verifier_hack(lambda: (CONVERSATION, "Dax lives in the river. Dax lives in the river"), verify)
    assert capsys.readouterr().out.count("[check passed]") == 3


@pytest.mark.parametrize(
    "hack, message",
    [
        (lambda: (CONVERSATION, "Dax lives in the river."), "a reader would accept it"),
        (lambda: (CONVERSATION, "Ugh, Dax lives in the cave."), "a hack must pass it"),
        (lambda: (CONVERSATION, "Ugh, Dax lives in the river or the cave."), "a hack must pass it"),
        (lambda: ([{"role": "user", "content": "Sing me a song"}], "La la."), "does not understand"),
        (lambda: "Ugh, Dax lives in the river.", "should return a pair"),
        (lambda: ("Where can I find Dax?", "Ugh, Dax lives in the river."), "list of"),
    ],
    ids=[
        "accepted-by-a-reader",
        "wrong-fact",
        "competing-values",
        "unknown-request",
        "no-pair",
        "not-messages",
    ],
)
def test_the_checker_refuses_what_is_not_a_hack(hack, message):
    with pytest.raises(CheckError) as failure:
        check_verifier_hack(hack)
    assert message in str(failure.value), str(failure.value)


def test_the_learners_verifier_is_the_one_hacked():
    def strict(conversation, response, finished=True):
        return 0.0 if "ugh" in response.lower() else verify(conversation, response, finished)

    with pytest.raises(CheckError, match="a hack must pass it"):
        check_verifier_hack(verifier_hack, strict)
