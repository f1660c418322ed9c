"""The runner of the docs' ```console blocks, shared by tests/python/test_docs.py (blocks of
the command line) and tests/api/test_docs.py (blocks that use the Python package's own command,
`weightcast profile`, run with the installed wheel's `weightcast` first on PATH)."""

import pathlib
import re

# A block with this command runs against the installed package (tests/api/test_docs.py).
PACKAGE = "$ weightcast profile"

FENCE = re.compile(r"^```(\w*)\s*$")


def blocks(path: pathlib.Path):
    """(kind, first line number, lines) of each fenced block."""
    out, kind, start, body = [], None, 0, []
    for n, line in enumerate(path.read_text().split("\n"), 1):
        m = FENCE.match(line.strip()) if line.startswith("```") else None
        if kind is None and m:
            kind, start, body = m.group(1), n, []
        elif kind is not None and line.strip() == "```":
            out.append((kind, start, body))
            kind = None
        elif kind is not None:
            body.append(line)
    assert kind is None, f"{path}: block opened at line {start} is never closed"
    return out


def session(body):
    """[(command, expected exit code, expected output lines)] of a console block."""
    steps, i = [], 0
    while i < len(body):
        line = body[i]
        assert line.startswith("$ "), f"console block: expected `$ command`, got {line!r}"
        cmd = line[2:]
        while cmd.endswith("\\"):
            i += 1
            cmd = cmd[:-1] + "\n" + body[i]
        i += 1
        code = 0
        if i < len(body) and re.fullmatch(r"\? \d+", body[i]):
            code = int(body[i][2:])
            i += 1
        expected = []
        while i < len(body) and not body[i].startswith("$ "):
            expected.append(body[i])
            i += 1
        steps.append((cmd, code, expected))
    return steps


def line_matches(pattern: str, line: str) -> bool:
    parts = [re.escape(p) for p in pattern.rstrip().split("[..]")]
    return re.fullmatch(".*".join(parts), line.rstrip()) is not None


def output_matches(expected, actual) -> bool:
    """trycmd's rules: `...` any number of lines, `[..]` any text in a line."""
    memo = {}

    def go(i, j):
        if (i, j) in memo:
            return memo[(i, j)]
        if i == len(expected):
            r = j == len(actual)
        elif expected[i].strip() == "...":
            r = any(go(i + 1, k) for k in range(j, len(actual) + 1))
        else:
            r = j < len(actual) and line_matches(expected[i], actual[j]) and go(i + 1, j + 1)
        memo[(i, j)] = r
        return r

    return go(0, 0)
