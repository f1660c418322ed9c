"""The result of :func:`weightcast.profile`: :class:`Profile`, the measured dict with the
candidates' rules (as a dict, or written as a rules file ``convert --rules`` reads), as a pandas
frame, a text table and an HTML page."""

from typing import Any, Dict, Optional

from .._measured import Measured
from .report import html_page, text_table


class Profile(Measured):
    """What :func:`profile` measured: ``to_dict()``, ``to_pandas()``, ``save_rules(path)``
    (the recommended candidate as a rules file ``convert --rules`` reads), and a table as
    ``str()``."""

    def __init__(self, d: Dict[str, Any], rules: Dict[str, Dict[str, Any]]):
        super().__init__(d)
        self._rules = rules

    def to_pandas(self, what: str = "candidates"):
        """``candidates`` or ``layers`` as a ``pandas.DataFrame``."""
        import pandas as pd

        return pd.DataFrame(self._d[what])

    def rules(self, candidate: Optional[str] = None) -> Dict[str, Any]:
        """The rules of a candidate (default: the recommended one)."""
        name = candidate or self._d["recommended"]
        if name is None:
            raise ValueError("no candidate meets the tolerance: nothing to recommend")
        return self._rules[name]

    def save_rules(self, path, candidate: Optional[str] = None) -> None:
        """Writes a candidate's rules as TOML (``weightcast convert --rules PATH``,
        ``cast_module(rules=PATH)``)."""
        import json

        r = self.rules(candidate)
        lines = []
        if r.get("to"):
            lines.append(f"to = {json.dumps(str(r['to']))}")  # a JSON string is a TOML string
        if r.get("rules"):
            raise ValueError(f"{r['rules']}: the candidate came from this rules file; add the "
                             f"kept modules to it by hand: {r.get('keep')}")

        rescaled = r.get("rescale")
        if rescaled is not None:
            # The factors and config edits first: the rules below decide dtypes only.
            lines = rescaled.rules_toml(to=r.get("to") or "").rstrip("\n").split("\n")
            config_at = lines.index("[config]") if "[config]" in lines else len(lines)
            config, lines = lines[config_at:], lines[:config_at]

        def many(v):
            return [v] if isinstance(v, str) else list(v or [])

        # In convert's order (preset, only, keep): the last rule that matches decides.
        for preset in many(r.get("preset")):
            lines += ["", "[[rule]]", f"preset = {json.dumps(preset)}"]
        for pat in many(r.get("only")):
            lines += ["", "[[rule]]", f"match = {json.dumps(pat)}", "only = true"]
        for pat in many(r.get("keep")):
            lines += ["", "[[rule]]", f"match = {json.dumps(pat)}", "keep = true"]
        if rescaled is not None:
            lines += [""] + config if config else []
        with open(path, "w") as f:
            f.write("\n".join(lines) + "\n")

    def report(self, path) -> None:
        """Writes a self-contained HTML page (inline SVG, no script, no network): the
        candidates' table, each module's output range against the dtypes' limits, and the
        latencies; the same look as ``analyze --report``."""
        with open(path, "w", encoding="utf-8") as f:
            f.write(html_page(self._d))

    def __str__(self) -> str:
        return text_table(self._d)

    def __repr__(self) -> str:
        return f"<weightcast.Profile {len(self._d['candidates'])} candidates>\n{self}"
