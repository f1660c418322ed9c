"""The Python sessions (```pycon blocks) of the README and docs/ run as doctests against the
installed wheel, in a scratch folder that has the repository's `examples/`, so their output
cannot drift (the command-line blocks run in tests/python/test_docs.py)."""

import doctest
import os
import pathlib

import pytest

from conftest import ROOT

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
