"""Lint and format: ``ruff`` over utils, tests, tools and the solution notebooks' code cells.

The configuration is in ``pyproject.toml`` (line length 110) and ``solutions/ruff.toml`` (88: the
book's code column shows about 90 characters before it scrolls). The student notebooks are generated
from the solutions, so they are not linted separately.
"""

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
TARGETS = ["utils", "tests", "tools", "solutions"]


def _ruff() -> list[str]:
    exe = shutil.which("ruff", path=str(Path(sys.executable).parent)) or shutil.which("ruff")
    if exe is None:
        pytest.fail("ruff is not installed: it is in requirements-dev.txt (tools/env.sh installs it)")
    return [exe]


def test_ruff_check():
    result = subprocess.run([*_ruff(), "check", *TARGETS], cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout[-5000:] + result.stderr


def test_ruff_format():
    result = subprocess.run(
        [*_ruff(), "format", "--check", *TARGETS], cwd=ROOT, capture_output=True, text=True
    )
    assert result.returncode == 0, f"run `ruff format {' '.join(TARGETS)}`:\n{result.stdout[-3000:]}"


def test_notebook_code_fits_the_book_column():
    """The solutions' own ruff.toml must keep the narrower limit (a test that the config is the one meant)."""
    assert "line-length = 88" in (ROOT / "solutions" / "ruff.toml").read_text()
