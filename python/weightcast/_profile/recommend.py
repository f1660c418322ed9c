"""The recommendation: whether a row meets the tolerance, the candidate with the fewest weight
bytes among those that do, and each timed row's speed against the reference's. Pure: rows'
figures in, no measuring."""

import math
from typing import Any, Dict, List

# The figures a tolerance may bound (``profile(tolerance=...)``, ``--tolerance NAME=VALUE``).
TOLERANCES = ("cosine", "max_abs", "max_rel", "kl", "top1", "metric")


def slower(ratio: float) -> str:
    """How much slower a latency ratio above 1 is: `14.4x slower`, `4.0% slower` (near 1)."""
    return f"{ratio:.1f}x slower" if ratio >= 1.1 else f"{100 * (ratio - 1):.1f}% slower"


def tolerance_text(tolerance: Dict[str, float], higher_is_better: bool) -> str:
    """The tolerance as a bound a reader checks: `cosine >= 0.999, no non-finite value`."""
    at_least = {"cosine", "top1"} | ({"metric"} if higher_is_better else set())
    parts = [f"{k} {'>=' if k in at_least else '<='} {v}" for k, v in tolerance.items()]
    return ", ".join(parts + ["no non-finite value"])


def recommend(rows: List[Dict[str, Any]], tolerance: Dict[str, float],
              higher_is_better: bool) -> Dict[str, Any]:
    """The recommendation and what it optimised, from the rows (the reference first).

    The objective is weight bytes: the candidate with the fewest among those within the
    tolerance (accuracy is the bound, not the objective), the lower p50 breaking ties (f16 and
    bf16 weigh the same). Speed is otherwise not an objective, so it is reported beside it:
    each timed row gets ``latency_ratio`` (its p50 over the reference's) and
    ``slower_than_reference`` (its p50 above the reference's; None when either is untimed),
    and a slower row's ``support`` says by how much. Pure: the rows' figures in, no
    measuring."""
    ref_p50 = (rows[0].get("latency_ms") or {}).get("p50")
    for r in rows:
        p50 = (r.get("latency_ms") or {}).get("p50")
        if p50 is None or not ref_p50:
            r["latency_ratio"], r["slower_than_reference"] = None, None
            continue
        ratio = p50 / ref_p50
        r["latency_ratio"], r["slower_than_reference"] = ratio, p50 > ref_p50
        note = f"{slower(ratio)} than the reference here (measured)"
        if p50 > ref_p50 and note not in (r.get("support") or ""):
            r["support"] = f"{r['support']}; {note}" if r.get("support") else note

    def cost(r):  # bytes first; among equals (f16 and bf16), the faster on this machine
        p50 = (r.get("latency_ms") or {}).get("p50")
        return r["weight_bytes"], math.inf if p50 is None else p50

    ok = [r for r in rows[1:] if meets(r, tolerance, higher_is_better)]
    best = min(ok, key=cost) if ok else None
    bounds = tolerance_text(tolerance, higher_is_better)
    return {
        "recommended": best["name"] if best else None,
        "objective": "weight_bytes",
        "recommended_for": f"the fewest weight bytes within the tolerance ({bounds}), the "
                           "fastest of equals; speed is not otherwise an objective",
        "bounds": bounds,
    }


def meets(row: Dict[str, Any], tolerance: Dict[str, float], higher_is_better: bool) -> bool:
    """Whether a row is within the tolerance (and has no non-finite value)."""
    if row["nonfinite"]:
        return False
    for k, v in tolerance.items():
        if k == "cosine" and not row["cosine"] >= v:
            return False
        if k in ("max_abs", "max_rel", "kl") and not (row.get(k) is not None and row[k] <= v):
            return False
        if k == "top1" and not (row.get("top1") is not None and row["top1"] >= v):
            return False
        if k == "metric":
            m = row.get("metric")
            if m is None or (m < v if higher_is_better else m > v):
                return False
    return True
