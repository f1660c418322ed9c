"""The README and docs/ cannot drift: every command they show is run here and its output checked.

- A ```console block is a session, run as trycmd runs its Markdown cases: `$ COMMAND` (lines
  ending in `\\` continue it), then the output expected (stdout and stderr together), then the
  next `$`. `? N` right after a command expects exit code N (0 otherwise). In the output a line
  `...` stands for any number of lines, and `[..]` for any text within a line.
- The blocks of one file run in order, in one scratch folder that has the repository's
  `examples/` (so a later block can read what an earlier one wrote), with the `weightcast` under
  test first on PATH.
- ```pycon blocks (`>>>` sessions) run as doctests against the installed wheel, in
  tests/api/test_docs.py.
- A ```sh block shows the set-up commands (install, build, test), which the suite itself runs
  (scripts/test, scripts/wheel, scripts/api-env): each of its commands must be one of those
  named in SETUP below, and the README's first command, which runs the main job through cargo,
  is run here too. Other fences (toml, text, python) show files, not commands.

`WEIGHTCAST_DOCS=overwrite` rewrites each block's expected output with what the commands
printed (review the diff before committing)."""

from __future__ import annotations

import os
import pathlib
import subprocess

import pytest

from conftest import BIN, ROOT
from docs_runner import PACKAGE, blocks, output_matches, session

DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]

# Set-up commands a ```sh block may show: each is run by the suite itself (scripts/test runs
# the tests, builds the wheel through scripts/wheel's maturin and installs the source
# distribution into a fresh venv with pip, as scripts/api-env does).
SETUP = [
    "scripts/test",
    "cargo run --release -- ",  # run below, as `weightcast ...`
    "cargo build --release",
    "cargo install --path cli",
    "scripts/wheel dist",
    "pip install dist/weightcast-*.whl",
    "pip install ./python",
]

def scratch(tmp_path: pathlib.Path) -> tuple[pathlib.Path, dict]:
    work = tmp_path / "work"
    work.mkdir()
    (work / "examples").symlink_to(ROOT / "examples")
    env = dict(os.environ)
    env["PATH"] = f"{pathlib.Path(BIN).parent}{os.pathsep}{env['PATH']}"
    env.update(NO_COLOR="1", COLUMNS="100", TERM="dumb")
    return work, env


def run_step(cmd, work, env):
    if cmd.startswith("cargo run --release -- "):
        cmd = "weightcast " + cmd[len("cargo run --release -- "):]
    p = subprocess.run(["bash", "-c", cmd], cwd=work, env=env, stdout=subprocess.PIPE,
                       stderr=subprocess.STDOUT, text=True, timeout=600)
    # The scratch folder's path never shows in the docs.
    text = p.stdout.replace(str(work) + "/", "").rstrip("\n")
    return p.returncode, text.split("\n") if text else []


@pytest.mark.parametrize("path", DOCS, ids=lambda p: str(p.relative_to(ROOT)))
def test_commands_in_docs_run_as_shown(path, tmp_path):
    work, env = scratch(tmp_path)
    overwrite = os.environ.get("WEIGHTCAST_DOCS") == "overwrite"
    text = path.read_text().split("\n")
    edits = []  # (first line index, last line index exclusive, new lines)
    failures = []
    for kind, start, body in blocks(path):
        if kind == "sh":
            for line in body:
                cmd = line.split("#", 1)[0].strip()
                if not cmd:
                    continue
                assert any(cmd == s or cmd.startswith(s) for s in SETUP), (
                    f"{path.name}:{start}: `{cmd}` in a sh block is no set-up command the suite "
                    "runs: show it in a console block, with its output")
                if cmd.startswith("cargo run --release -- "):
                    code, out = run_step(cmd, work, env)
                    assert code == 0, f"{path.name}:{start}: `{cmd}` exited {code}:\n" + "\n".join(out)
            continue
        if kind != "console" or any(PACKAGE in line for line in body):
            continue  # the package's own command: tests/api/test_docs.py runs the block
        new_body = []
        for cmd, code, expected in session(body):
            got_code, actual = run_step(cmd, work, env)
            if overwrite:
                new_body += [f"$ {c}" if k == 0 else c for k, c in enumerate(cmd.split("\n"))]
                if got_code:
                    new_body.append(f"? {got_code}")
                new_body += actual
                continue
            if got_code != code or not output_matches(expected, actual):
                failures.append(
                    f"{path.name}:{start}: `{cmd}` exited {got_code} (expected {code}); printed:\n"
                    + "\n".join(actual) + "\n--- expected:\n" + "\n".join(expected))
        if overwrite:
            edits.append((start, start + len(body), new_body))
    if overwrite and edits:
        for first, last, new in reversed(edits):
            text[first:last] = new
        path.write_text("\n".join(text))
    assert not failures, "\n\n".join(failures)


def test_console_sessions_parse():
    """The runner itself: a session with continuation, an exit code and wildcards."""
    steps = session(["$ a \\", "  b", "? 2", "x [..] z", "...", "$ c"])
    assert steps == [("a \n  b", 2, ["x [..] z", "..."]), ("c", 0, [])]
    assert output_matches(["x [..] z", "..."], ["x yy z", "1", "2"])
    assert not output_matches(["x [..] z"], ["x yy z", "1"])
    assert output_matches(["a", "...", "d"], ["a", "b", "c", "d"])
    assert not output_matches(["a", "...", "d"], ["a", "b", "c"])


def test_every_command_the_readme_names_is_in_a_block():
    """The README's task examples are blocks the runner runs, not prose."""
    readme = (ROOT / "README.md").read_text()
    kinds = [k for k, _, _ in blocks(ROOT / "README.md")]
    assert kinds[0] == "sh" and kinds.count("console") >= 4, kinds
    assert len(readme.split("\n")) <= 220
    for page in ["convert", "rules", "audit", "gguf", "measure", "python", "architecture"]:
        assert (ROOT / "docs" / f"{page}.md").is_file(), page
        assert f"docs/{page}.md" in readme, page
    for line in readme.split("\n"):
        assert not line.startswith("weightcast "), f"a command outside a block: {line}"
