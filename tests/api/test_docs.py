"""The Python sessions (```pycon blocks) of the README and docs/ run as doctests against the
installed wheel, in a scratch folder that has the repository's `examples/`, so their output
cannot drift; so do the ```console blocks that use the package's own command (`weightcast
profile`), with the wheel's `weightcast` first on PATH (the other command-line blocks run in
tests/python/test_docs.py)."""

import doctest
import os
import pathlib
import subprocess
import sys

import pytest

from conftest import ROOT
from docs_runner import PACKAGE, blocks, output_matches, session

DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


def pycon(path: pathlib.Path) -> str:
    """The text of the file's ```pycon blocks, one after the other (one namespace per file)."""
    out, inside = [], False
    for line in path.read_text().split("\n"):
        if line.strip() == "```pycon":
            inside = True
        elif inside and line.strip() == "```":
            inside = False
            out.append("")
        elif inside:
            out.append(line)
    return "\n".join(out)


@pytest.mark.parametrize("path", [p for p in DOCS if pycon(p).strip()],
                         ids=lambda p: str(p.relative_to(ROOT)))
def test_python_sessions_in_docs_run_as_shown(path, tmp_path, monkeypatch):
    (tmp_path / "examples").symlink_to(ROOT / "examples")
    monkeypatch.chdir(tmp_path)
    parser = doctest.DocTestParser()
    test = parser.get_doctest(pycon(path), {}, path.name, str(path), 0)
    assert test.examples, path
    runner = doctest.DocTestRunner(optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    out = []
    runner.run(test, out=out.append)
    assert runner.failures == 0, "".join(out)


def test_readme_and_docs_show_python_sessions():
    assert pycon(ROOT / "README.md").count(">>>") >= 3
    assert pycon(ROOT / "docs" / "python.md").count(">>>") >= 10
    assert os.path.isdir(ROOT / "examples" / "tiny-bert")


@pytest.mark.parametrize("path", [p for p in DOCS if any(
    kind == "console" and any(PACKAGE in line for line in body) for kind, _, body in blocks(p))],
    ids=lambda p: str(p.relative_to(ROOT)))
def test_package_commands_in_docs_run_as_shown(path, tmp_path):
    """Each console block that runs `weightcast profile`, in order, in one scratch folder."""
    work = tmp_path / "work"
    work.mkdir()
    (work / "examples").symlink_to(ROOT / "examples")
    env = dict(os.environ, NO_COLOR="1", COLUMNS="100", TERM="dumb")
    env["PATH"] = f"{pathlib.Path(sys.executable).parent}{os.pathsep}{env['PATH']}"
    failures = []
    for kind, start, body in blocks(path):
        if kind != "console" or not any(PACKAGE in line for line in body):
            continue
        for cmd, code, expected in session(body):
            p = subprocess.run(["bash", "-c", cmd], cwd=work, env=env, stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT, text=True, timeout=600)
            text = p.stdout.replace(str(work) + "/", "").rstrip("\n")
            actual = text.split("\n") if text else []
            if p.returncode != code or not output_matches(expected, actual):
                failures.append(f"{path.name}:{start}: `{cmd}` exited {p.returncode} (expected "
                                f"{code}); printed:\n" + "\n".join(actual) + "\n--- expected:\n"
                                + "\n".join(expected))
    assert not failures, "\n\n".join(failures)
