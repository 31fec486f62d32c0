"""`make lint`'s checks: ruff's linter and its formatter (configured in pyproject.toml)."""

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
RUFF = Path(sys.executable).parent / "ruff"


def ruff(*args: str) -> subprocess.CompletedProcess:
    exe = str(RUFF) if RUFF.exists() else shutil.which("ruff")
    if exe is None:
        pytest.fail("ruff is not installed: `pip install -e '.[test]'` (make venv) installs it")
    return subprocess.run(
        [exe, *args, "src", "tests", "run.py"], cwd=ROOT, capture_output=True, text=True, timeout=120
    )


def test_ruff_lint_is_clean():
    out = ruff("check")
    assert out.returncode == 0, out.stdout[-4000:] + out.stderr[-2000:]


def test_ruff_format_is_clean():
    out = ruff("format", "--check")
    assert out.returncode == 0, out.stdout[-4000:] + out.stderr[-2000:]
