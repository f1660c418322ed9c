"""picklescan's own test corpus (tests/fixtures/picklescan, MIT, with picklescan 1.0.5's
verdicts in verdicts.tsv): every file it flags fails weightcast's audit with exit 1 and a
finding (none as an error), and its benign files are clean (the password-protected zip may stay
incomplete: no loader reads it without the password). No file is ever unpickled."""

import json
import pathlib

import pytest

from conftest import ROOT, run

CORPUS = ROOT / "tests" / "fixtures" / "picklescan"


def verdicts():
    out = {}
    for line in (CORPUS / "verdicts.tsv").read_text().splitlines():
        code, _, path = line.split("\t")
        out[path] = int(code)
    return out


def audit(paths):
    p = run("audit", *paths, "--json", check=False)
    j = json.loads(p.stdout)
    files = {str(pathlib.Path(f["path"]).relative_to(CORPUS)): f for f in j["files"]}
    none = {str(pathlib.Path(f["path"]).relative_to(CORPUS)): f for f in j["no_pickle"]}
    return p.returncode, files, none


def test_every_file_picklescan_flags_fails_with_a_finding():
    flagged = [p for p, c in verdicts().items() if c == 1]
    assert len(flagged) == 91
    code, files, none = audit([CORPUS / p for p in flagged])
    assert code == 1
    assert not none, f"flagged files said to hold no pickle: {sorted(none)}"
    weak = {}
    for p in flagged:
        f = files[p]
        failing = f["verdict"] in ("dangerous", "unknown call")
        named = f["dangerous"] or f["unknown_calls"] or f.get("ambiguities")
        if not (failing and named and "error" not in f):
            weak[p] = (f["verdict"], f.get("error"), f.get("incomplete"))
    assert not weak, weak


@pytest.mark.parametrize("single", sorted(p for p, c in verdicts().items() if c == 1)[:3])
def test_each_flagged_file_alone_exits_1(single):
    assert run("audit", CORPUS / single, check=False).returncode == 1


def test_the_three_files_weightcast_used_to_miss():
    """A BUILD into an imported module (it rewrites `torch._utils`, then resolves
    `builtins.eval` through it), a zip member whose encryption flag is set over plaintext, and a
    test helper that spawns an interpreter, which no list names: an unknown call."""
    _, files, _ = audit([CORPUS / "data" / "sys_module_override_sploit.pkl",
                         CORPUS / "data" / "malicious1_0x1.zip",
                         CORPUS / "data2" / "GHSA-g38g-8gr9-h9xp-test.pkl"])
    f = files["data/sys_module_override_sploit.pkl"]
    assert f["verdict"] == "dangerous"
    assert any("rewrites imported code" in d for d in f["dangerous"]), f["dangerous"]
    f = files["data/malicious1_0x1.zip"]
    assert f["verdict"] == "dangerous" and "builtins.eval" in f["dangerous"]
    assert any("encryption flag set over plaintext" in a for a in f["ambiguities"])
    f = files["data2/GHSA-g38g-8gr9-h9xp-test.pkl"]
    assert f["verdict"] == "unknown call"
    assert f["unknown_calls"] == ["test.support.script_helper.assert_python_ok"]
    call = [x for x in f["findings"] if x["class"] == "unknown call"][0]
    assert call["use"] == "called" and call["opcode"] in ("GLOBAL", "STACK_GLOBAL", "INST")
    assert isinstance(call["offset"], int)


def test_benign_files_are_clean():
    benign = [p for p, c in verdicts().items() if c == 0]
    code, files, none = audit([CORPUS / p for p in benign])
    for p in benign:
        if p in none:
            continue
        f = files[p]
        if p.endswith("password_protected.zip"):
            assert f["verdict"] == "incomplete" and "password" in f["incomplete"], f
        else:
            assert f["verdict"] == "clean", (p, f["verdict"], f.get("incomplete"), f["other"])
