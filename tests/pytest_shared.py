"""Fixtures and hooks both Python test suites (tests/python, tests/api) use; each conftest.py
imports them, which is how pytest finds them."""

import os

import pytest


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
