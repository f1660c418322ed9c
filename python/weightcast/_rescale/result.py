"""The result of :func:`weightcast.rescale`: the factors and config edits, the ranges before and
after, what no symmetry reaches, the proof; applied in memory through :func:`cast_module` or
written as the rules file ``convert --rules`` reads."""

import json
import math
import os
import tempfile
from typing import Any, Dict, List, Optional

from .._measured import Measured


def _pow2(x: float) -> str:
    e = math.log2(x) if x > 0 else math.nan
    return f"2^{int(e)}" if e == int(e) else f"{x:g}"


class Rescale(Measured):
    """What :func:`rescale` found: ``to_dict()``, ``apply(module)``, ``save_rules(path)``,
    ``rules_toml()``, and a report as ``str()``. ``ok`` is True when the rescaled model has no
    non-finite output in the target dtype and its f32 outputs equal the original's to
    rounding."""

    @property
    def factors(self) -> Dict[str, float]:
        """Each scaled tensor's factor, by its (first) state-dict name."""
        return {f["names"][0]: f["scale"] for f in self._d["factors"]}

    def rules_toml(self, to: Optional[str] = None) -> str:
        """The rules file: one rule per scaled tensor (a tied tensor's names in one rule), the
        config edits under ``[config]``, ``to`` the target (``None`` for the result's)."""
        to = self._d["to"] if to is None else to
        d = self._d
        lines = [f"# weightcast.rescale for {d['to']}: {d['family'] or 'no family'}, "
                 f"alpha {_pow2(d['alpha'])}, headroom {d['headroom']:g}x"]
        if to:
            lines.append(f"to = {json.dumps(to)}")
        for f in d["factors"]:
            lines += ["", "[[rule]]", f"match = {json.dumps(f['match'])}",
                      f"scale = {f['scale']!r}"]
            if f["form"] != "w":
                lines.append(f"form = {json.dumps(f['form'])}")
        if d["config"]:
            lines += ["", "[config]"]
            # repr() of a float is the shortest text that reads back as the same double;
            # anything else as JSON, which TOML reads for strings, bools and integers.
            lines += [f"{k} = {v!r}" if isinstance(v, float) else f"{k} = {json.dumps(v)}"
                      for k, v in d["config"].items()]
        return "\n".join(lines) + "\n"

    def save_rules(self, path, to: Optional[str] = None) -> None:
        """Writes :meth:`rules_toml` (``weightcast convert IN -o OUT --rules PATH``,
        ``cast_module(rules=PATH)``)."""
        with open(path, "w", encoding="utf-8") as f:
            f.write(self.rules_toml(to))

    def apply(self, module, to: Any = None):
        """Applies the factors and config edits to `module` in memory with
        :func:`weightcast.cast_module` (the same rules, the same arithmetic as ``convert``),
        casting to `to` (default: the module's own floating dtype, so only the factors
        change). Returns the module."""
        from .._modules import cast_module
        from .._profile.candidates import dominant_dtype

        if to is None:
            d = dominant_dtype(module)
            to = str(d).replace("torch.", "") if d is not None else "f32"
        if not self._d["factors"] and not self._d["config"]:
            return cast_module(module, to)
        fd, path = tempfile.mkstemp(suffix=".toml", prefix="weightcast-rescale-")
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                f.write(self.rules_toml(to=""))
            return cast_module(module, to, rules=path)
        finally:
            os.unlink(path)

    @property
    def ok(self) -> bool:
        p = self._d["proof"]
        return p["target"]["nonfinite"] == 0 and p["f32"]["max_rel_diff"] <= 1e-5

    def __str__(self) -> str:
        d = self._d
        p = d["proof"]
        lines = [f"rescale for {d['to']} ({d['family'] or 'family not in the table'}, "
                 f"headroom {d['headroom']:g}x, limit {d['limit']:.6g})"]
        lines.append(f"  residual stream: max {d['stream_max']:.4g} -> "
                     f"{d['stream_max'] * d['alpha']:.4g} (alpha {_pow2(d['alpha'])})")
        for pr in d["pairs"]:
            lines.append(f"  {pr['producer']} -> {pr['consumer']}: max {pr['largest']:.4g}, "
                         f"beta {_pow2(pr['beta'])}")
        lines.append(f"  factors: {len(d['factors'])} tensor(s)"
                     + (f"; tied head: final norm times 1/alpha" if d["tied_head"] else ""))
        for k, v in d["config"].items():
            lines.append(f"  config.json: {k} {d['config_before'][k]!r} -> {v!r}")
        for u in d["unreachable"]:
            lines.append(f"  not reached: {u['module']} ({u['class']}) max {u['max']:.4g}: "
                         f"{u['why']}")
        t, pl = p["target"], p["plain"]
        lines.append(f"  proof: rescaled f32 vs original, max relative difference "
                     f"{p['f32']['max_rel_diff']:.3g}")
        lines.append(f"  {d['to']}: non-finite {t['nonfinite']} (plain {d['to']}: "
                     f"{pl['nonfinite']}), cosine {t['cosine']:.6f} (plain {pl['cosine']:.6f})"
                     + (f", top-1 {t['top1']:.4f} (plain {pl['top1']:.4f})"
                        if t.get("top1") is not None else ""))
        return "\n".join(lines)

    def __repr__(self) -> str:
        return f"<weightcast.Rescale {len(self._d['factors'])} factors>\n{self}"


def unreachable(after, limit: float, family_name: Optional[str], classes: Dict[str, str]
                ) -> List[Dict[str, Any]]:
    """The modules whose input or output still passes `limit` after the rescale, each with why
    no symmetry reached it."""
    rows = []
    for name in after.order:
        top = after.largest(name)
        if top <= limit:
            continue
        cls = classes.get(name, "")
        if family_name is None:
            why = ("the model's family is not in the rescale table: keep it in f32 "
                   "(profile(search=True) finds the fewest modules)")
        else:
            why = (f"no symmetry of the {family_name} table scales it (its output feeds a "
                   "non-homogeneous activation, a norm's weight or a score): keep it in f32 "
                   "(profile(search=True))")
        rows.append({"module": name, "class": cls, "max": top, "why": why})
    return rows
