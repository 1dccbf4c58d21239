"""Claims: the helper states them, the sweep proves them, and no claim lands without its sweep."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from utils.claims import ClaimFailed, claim

ROOT = Path(__file__).resolve().parent.parent
CLAIMS_JSON = ROOT / "benchmarks" / "claims.json"


@pytest.fixture(autouse=True)
def _raising(monkeypatch):
    monkeypatch.delenv("COURSE_CLAIMS_RECORD", raising=False)


def test_a_claim_that_holds_returns_true():
    assert (
        bool(claim("two is less than three", (2, "<", 3), (torch.tensor(5.0), ">=", np.float64(5.0)))) is True
    )


def test_a_failing_claim_names_itself_and_shows_its_values():
    with pytest.raises(ClaimFailed) as e:
        claim(
            "KL falls as β grows",
            (0.21, "<", 0.19),
            (0.1, "<", 0.5),
            values={"KL β=1": 0.21, "KL β=0.3": 0.19},
        )
    msg = str(e.value)
    assert "KL falls as β grows" in msg and "0.21 < 0.19 is false" in msg and "KL β=0.3 = 0.19" in msg
    assert "0.1 < 0.5" not in msg  # only the comparisons that failed
    assert isinstance(e.value, AssertionError)


def test_booleans_and_nan():
    assert claim("a condition without a size", True)
    with pytest.raises(ClaimFailed):
        claim("a false condition", np.bool_(False))
    with pytest.raises(ClaimFailed):
        claim("NaN holds nothing", (float("nan"), ">", 0.0))


def test_malformed_claims_are_errors_not_failures():
    with pytest.raises(TypeError, match="at least one comparison"):
        claim("nothing to check")
    with pytest.raises(TypeError, match="op in"):
        claim("a bad operator", (1, "==", 1))


def test_record_mode_writes_each_claim_and_goes_on(tmp_path, monkeypatch):
    record = tmp_path / "claims.jsonl"
    monkeypatch.setenv("COURSE_CLAIMS_RECORD", str(record))
    monkeypatch.setenv("COURSE_NOTEBOOK", "04_dpo")
    monkeypatch.setenv("COURSE_SEED", "2")
    assert bool(claim("holds", (0.1, "<", 0.3), (5, ">", 1))) is True
    assert bool(claim("fails", (0.4, "<", 0.3))) is False  # recorded, not raised
    rows = [json.loads(line) for line in record.read_text().splitlines()]
    assert [(r["claim"], r["held"], r["notebook"], r["seed"]) for r in rows] == [
        ("holds", True, "04_dpo", 2),
        ("fails", False, "04_dpo", 2),
    ]
    assert rows[0]["margin"] == pytest.approx(0.2)  # the tightest comparison's slack
    assert rows[1]["margin"] == pytest.approx(-0.1)
    assert rows[0]["threads"] == torch.get_num_threads() and rows[0]["device"] in ("cpu", "cuda")


# --- every claim in the text held in every run of the sweep ---------------------------------
def _stated_claims() -> list[tuple[str, str]]:
    """(notebook, sentence) of every ``claim(...)`` call in the solution notebooks (literal
    sentences only)."""
    from tools.claims_sweep import stated_claims

    return stated_claims()


def test_claim_sentences_are_unique():
    stated = _stated_claims()
    assert stated, "the solutions state no claims"
    seen = set()
    for nb, sentence in stated:
        assert (nb, sentence) not in seen, (
            f"{nb}: the claim {sentence!r} is stated twice; name each claim once"
        )
        seen.add((nb, sentence))


def test_every_claim_held_in_every_run_of_the_sweep():
    """A claim lands only with its sweep: ``python tools/claims_sweep.py`` (README, "Claims")."""
    data = json.loads(CLAIMS_JSON.read_text())
    assert set(data["required_runs"]) <= set(data["runs"]), (
        f"the sweep is missing runs: {data['required_runs']}"
    )
    recorded = {(c["notebook"], c["claim"]): c for c in data["claims"]}
    problems = []
    for nb, sentence in _stated_claims():
        c = recorded.get((nb, sentence))
        if c is None:
            problems.append(f"{nb}: {sentence!r} is not in benchmarks/claims.json: run the claims sweep")
            continue
        missing = [
            r for r in data["required_runs"] if r not in c["runs"]
        ]  # a GPU run is added where one was had
        failed = {r: x["checks"] for r, x in c["runs"].items() if not x["held"]}
        if missing or failed:
            problems.append(
                f"{nb}: {sentence!r}: "
                + (f"not run in {missing}; " if missing else "")
                + (f"failed in {failed}" if failed else "")
            )
    assert not problems, "\n".join(problems)
    assert not data["errors"], f"sweep runs that stopped with an error: {data['errors']}"


def test_the_record_holds_no_claim_the_text_dropped():
    stated = set(_stated_claims())
    stale = [
        (c["notebook"], c["claim"])
        for c in json.loads(CLAIMS_JSON.read_text())["claims"]
        if (c["notebook"], c["claim"]) not in stated
    ]
    assert not stale, f"benchmarks/claims.json records claims no notebook states (re-run the sweep): {stale}"


def test_the_book_page_is_the_record():
    from tools.claims_sweep import PAGE, render_page

    assert PAGE.read_text() == render_page(json.loads(CLAIMS_JSON.read_text())), (
        "book/claims.md is stale: python tools/claims_sweep.py --report"
    )


def test_a_claim_is_not_echoed_as_a_cells_last_value(monkeypatch):
    """In a notebook a claim that ends a cell used to print `True` under it; its verdict tests like
    a bool but IPython displays nothing for it."""
    from IPython.core.interactiveshell import InteractiveShell
    from IPython.utils.capture import capture_output

    monkeypatch.delenv("COURSE_CLAIMS_RECORD", raising=False)
    shell = InteractiveShell.instance()
    with capture_output() as claimed:
        shell.run_cell("from utils.claims import claim\nclaim('two is less than three', (2, '<', 3))")
    with capture_output() as control:  # a plain value is echoed
        shell.run_cell("1 + 1")
    assert "2" in control.stdout + str([o.data for o in control.outputs])
    shown = claimed.stdout + str([o.data for o in claimed.outputs])
    assert "True" not in shown, shown
    held = claim("two is less than three", (2, "<", 3))
    assert held and held == True and repr(held) == "True" and not (held == False)  # noqa: E712
