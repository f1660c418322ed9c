"""Per module: the range of its outputs in the reference run (forward hooks, in execution order),
the module whose outputs first went non-finite, each module's sensitivity to a candidate dtype
(its error when it alone runs in it), and the result's layer rows."""

import copy
import functools
import math
from typing import Any, Dict, List, Optional, Sequence, Tuple

from .._modules import _is_norm, _map_floating, _promote_mode, _to_dtype, _widen, runnable
from .outputs import call, detach, leaves


def compute_modules(module) -> List[str]:
    """The names of the modules that hold floating parameters of their own (where a cast
    changes the math), in registration order."""
    return [n for n, m in module.named_modules()
            if n and any(p.is_floating_point() for p in m._parameters.values() if p is not None)]


class Recorder:
    """Forward hooks on every module: per module, in execution order, the range of its
    floating outputs (max |x|, smallest non-zero |x|, values below each candidate's smallest
    normal), and whether its outputs were non-finite while its inputs were finite."""

    def __init__(self, module, tinies: Sequence[float]):
        self.tinies = list(tinies)
        self.stats: Dict[str, Dict[str, Any]] = {}
        self.order: List[str] = []
        self.first_nonfinite: Optional[str] = None
        self.handles = []
        for name, m in module.named_modules():
            if name:
                self.handles.append(m.register_forward_hook(functools.partial(self.hook, name)))

    def hook(self, name, module, args, output):
        import torch

        outs = [t for _, t in leaves(output)]
        if not outs:
            return
        s = self.stats.get(name)
        if s is None:
            s = self.stats[name] = {"class": type(module).__name__, "max_abs": 0.0,
                                    "min_nonzero": math.inf, "count": 0, "nonzero": 0,
                                    "below": [0] * len(self.tinies), "nonfinite": 0}
            self.order.append(name)
        for t in outs:
            a = t.detach().abs().float()
            finite = torch.isfinite(a)
            s["nonfinite"] += int((~finite).sum())
            a = torch.where(finite, a, torch.zeros_like(a))
            s["count"] += a.numel()
            if a.numel():
                s["max_abs"] = max(s["max_abs"], float(a.max()))
                nz = a[a > 0]
                s["nonzero"] += nz.numel()
                if nz.numel():
                    s["min_nonzero"] = min(s["min_nonzero"], float(nz.min()))
                    for i, tiny in enumerate(self.tinies):
                        s["below"][i] += int((nz < tiny).sum())
        if self.first_nonfinite is None and any(not torch.isfinite(t).all() for t in outs):
            ins = [t for _, t in leaves(args)]
            if all(torch.isfinite(t).all() for t in ins):
                self.first_nonfinite = name

    def remove(self):
        for h in self.handles:
            h.remove()


def capture(module, names: Sequence[str], batch):
    """The inputs and floating outputs of the named modules on one batch (for sensitivity)."""
    import torch

    seen: Dict[str, Any] = {}
    handles = []

    def hook(name, m, args, kwargs, output):
        if name not in seen:
            seen[name] = (args, kwargs, detach(output))

    for name in names:
        sub = module.get_submodule(name)
        handles.append(sub.register_forward_hook(functools.partial(hook, name), with_kwargs=True))
    try:
        with torch.no_grad():
            call(module, batch)
    finally:
        for h in handles:
            h.remove()
    return seen


def sensitivity(module, captured, dtype) -> Dict[str, float]:
    """Per module: the relative error of its output when it alone runs in `dtype`, on the
    reference's inputs (inf where it goes non-finite)."""
    import torch

    out = {}
    for name, (args, kwargs, ref) in captured.items():
        if not ref:
            continue
        sub = copy.deepcopy(module.get_submodule(name))
        # The module alone at the candidate precision, as runnable runs it inside a model.
        cast = functools.partial(_widen if _is_norm(sub) else _to_dtype, dtype)
        args, kwargs = _map_floating(args, cast), _map_floating(kwargs, cast)
        with torch.no_grad():
            for p in sub.parameters(recurse=False):
                if p.is_floating_point():
                    p.data = p.data.to(dtype)
            for k, b in list(sub._buffers.items()):
                if b is not None and b.is_floating_point():
                    sub._buffers[k] = b.to(dtype)
            handle = runnable(sub)
            try:
                # As inside a runnable model: operands of different dtypes promoted.
                with _promote_mode()():
                    got = detach(sub(*args, **kwargs))
            except RuntimeError:
                out[name] = math.inf
                continue
            finally:
                handle.remove()
        err = 0.0
        for (_, r), (_, g) in zip(ref, got):
            if not torch.isfinite(g).all() and torch.isfinite(r).all():
                err = math.inf
                break
            scale = float(r.abs().max()) or 1.0
            err = max(err, float((g - r).abs().max()) / scale)
        out[name] = err
    return out


def layer_rows(rec: Recorder, floats: Sequence[Any], targets: Sequence[Tuple[str, Any]],
               sensitivities: Dict[str, Dict[str, float]]) -> List[Dict[str, Any]]:
    """The result's layer rows: per recorded module (in execution order) and per candidate
    dtype in `floats`, its output range in the reference run against that dtype's limits, and
    its sensitivity as measured for the first candidate (in `targets`: (name, dtype) pairs, in
    order) that casts to that dtype."""
    import torch

    rows = []
    for mod in rec.order:
        s = rec.stats[mod]
        for i, t in enumerate(floats):
            big = torch.finfo(t).max
            rows.append({
                "module": mod, "class": s["class"],
                "dtype": str(t).replace("torch.", ""),
                "max_abs": s["max_abs"],
                "min_nonzero": s["min_nonzero"] if s["min_nonzero"] != math.inf else None,
                "headroom_bits": (math.log2(big / s["max_abs"]) if s["max_abs"] > 0
                                  else None),
                "overflow": s["max_abs"] > big,
                "below_normal_fraction": s["below"][i] / s["nonzero"] if s["nonzero"] else 0.0,
                "nonfinite": s["nonfinite"],
                "sensitivity": next((sensitivities[n].get(mod) for n, tt in targets
                                     if tt == t and n in sensitivities), None),
            })
    return rows
