"""The search (``profile(search=True)``): for a candidate that misses the tolerance, the fewest
modules to keep at the reference precision, as keep rules: the modules ranked (the non-finite
origin first, then by sensitivity), the shortest passing prefix found by bisection within a
budget of forward passes, then verified as a user applies the rules, with timing."""

import re
import warnings
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

from .._modules import _state_tensors
from .candidates import build
from .measure import Bench

Found = Tuple[List[str], Dict[str, Any]]


def rank(compute: Sequence[str], origin: Optional[str],
         sensitivity: Mapping[str, float]) -> List[str]:
    """The order in which modules are kept: the module whose outputs first went non-finite
    (when it is one of `compute`), then the most sensitive first."""
    ranked = []
    if origin and origin in compute:
        ranked.append(origin)
    ranked += [n for n in sorted(compute, key=lambda n: -sensitivity.get(n, 0.0))
               if n not in ranked]
    return ranked


def _patterns(module, first: Dict[int, str], mods: Sequence[str]) -> List[str]:
    """Rules for the planned (first) state-dict names of the modules' own tensors (tied weights
    are planned under their first name), each matching that name alone."""
    out = []
    for m in mods:
        sub = module.get_submodule(m)
        for t in list(sub._parameters.values()) + list(sub._buffers.values()):
            if t is not None and id(t) in first:
                pat = "re:^" + re.escape(first[id(t)]) + "$"
                if pat not in out:
                    out.append(pat)
    return out


def fewest_to_keep(module, bench: Bench, kw: Dict[str, Any], ranked: List[str],
                   budget: int) -> Tuple[Optional[Found], int]:
    """The shortest prefix of `ranked` to keep at the reference precision so that the
    candidate (its cast_module keywords `kw`) meets the tolerance, in at most `budget` trial
    passes (untimed) plus the verified one; returns ((kept, row) or None, passes used). The
    row's ``keep_rules`` are the candidate's keep rules with the kept modules'."""
    first = {id(t): name for name, t, _, _, _ in _state_tensors(module)}
    base = kw.get("keep", ())
    base = [base] if isinstance(base, str) else list(base)
    used = 0
    cache: Dict[int, Dict[str, Any]] = {}

    def evaluate(k: int) -> Dict[str, Any]:
        nonlocal used
        if k not in cache:
            spec = {**kw, "keep": base + _patterns(module, first, ranked[:k])}
            with warnings.catch_warnings():  # the trial rules' overlaps are the search's own
                warnings.simplefilter("ignore")
                cand = build(module, spec)
            cache[k] = bench.measure(cand, timed=False)
            used += 1
        return cache[k]

    lo, hi = 0, len(ranked)
    if budget < 1 or not bench.scoring.meets(evaluate(hi)):
        return None, used
    while hi - lo > 1 and used < budget:
        mid = (lo + hi) // 2
        if bench.scoring.meets(evaluate(mid)):
            hi = mid
        else:
            lo = mid
    keep = ranked[:hi]
    # The verified run: the rules as a user applies them, with timing.
    spec = {**kw, "keep": base + _patterns(module, first, keep)}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        cand = build(module, spec)
    row = bench.measure(cand)
    used += 1
    if not bench.scoring.meets(row):
        return None, used
    row["keep_rules"] = spec["keep"]
    return (keep, row), used
