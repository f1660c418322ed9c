"""`weightcast.profile`: what each candidate precision does to a module on the user's data,
down to the layer that breaks, and how fast it runs on this machine; with ``search=True``,
the cheapest set of modules to keep at the reference precision, as rules ``convert`` reads."""

import copy
import functools
import math
import os
import random
import resource
import time
import warnings
from typing import Any, Callable, Dict, Iterable, List, Optional, Sequence, Tuple, Union

Candidate = Union[str, Dict[str, Any], "os.PathLike[str]"]


# ---------------------------------------------------------------------------------------------
# Batches and outputs


def _call(module, batch):
    """Runs `module` on a batch: a tensor, a tuple/list of arguments, or a dict of keywords."""
    if isinstance(batch, dict):
        return module(**batch)
    if isinstance(batch, (tuple, list)):
        return module(*batch)
    return module(batch)


def _leaves(out, path: str = "") -> List[Tuple[str, Any]]:
    """The floating tensors of an output (a tensor, or any nesting of tuples, lists, dicts and
    transformers `ModelOutput`s), with their paths, in order."""
    import torch

    if isinstance(out, torch.Tensor):
        return [(path or "output", out)] if out.is_floating_point() else []
    items: Iterable[Tuple[Any, Any]]
    if isinstance(out, dict) or hasattr(out, "items") and hasattr(out, "keys"):
        items = list(out.items())
    elif isinstance(out, (tuple, list)):
        items = list(enumerate(out))
    else:
        return []
    found = []
    for k, v in items:
        found.extend(_leaves(v, f"{path}.{k}" if path else str(k)))
    return found


def _batch_size(batch) -> int:
    import torch

    for t in _leaves_any(batch):
        if isinstance(t, torch.Tensor) and t.dim() > 0:
            return t.shape[0]
    return 1


def _leaves_any(obj):
    import torch

    if isinstance(obj, torch.Tensor):
        yield obj
    elif isinstance(obj, dict):
        for v in obj.values():
            yield from _leaves_any(v)
    elif isinstance(obj, (tuple, list)):
        for v in obj:
            yield from _leaves_any(v)


def _detach(out):
    """The floating leaves of an output, detached, as float32 copies on the CPU."""
    return [(p, t.detach().float().cpu().clone()) for p, t in _leaves(out)]


# ---------------------------------------------------------------------------------------------
# Candidates


def _spec(c: Candidate) -> Tuple[str, Dict[str, Any]]:
    """(name, cast_module keywords) of a candidate: a dtype name, a rule dict, a rules file."""
    if isinstance(c, dict):
        kw = dict(c)
        to = kw.pop("to", None)
        bits = [str(to)] + [f"{k}={v}" for k, v in kw.items()]
        return kw.pop("name", None) or " ".join(bits), {"to": to, **kw}
    s = os.fspath(c)
    if s.endswith(".toml") or os.path.isfile(s):
        return os.path.basename(s), {"to": None, "rules": s}
    return s, {"to": s}


def _target(kw: Dict[str, Any], module) -> Any:
    """The torch dtype a candidate casts to by default (for headroom and sensitivity)."""
    import torch

    from . import _dtype_text, _native

    to = _dtype_text(kw.get("to"))
    if to is None:
        return None  # a rules file decides; its candidate's dtype is read once it is built
    # Every spelling convert accepts, parsed by the same parser (a bad one is its UsageError).
    return getattr(torch, _native.torch_dtype_name(to))


def _build(module, kw: Dict[str, Any]):
    """A copy of `module` cast as the candidate says (the reference is left as it is)."""
    from ._modules import _cast_inputs, cast_module, runnable

    cand = copy.deepcopy(module)
    cast_module(cand, kw.get("to"), keep=kw.get("keep", ()), only=kw.get("only", ()),
                rules=kw.get("rules"), preset=kw.get("preset"),
                on_overflow=kw.get("on_overflow", "allow"))
    d = _dominant(cand)
    if not runnable(cand).mixed and d is not None:
        # One dtype throughout: the reference's floating inputs (f32 images) enter in it.
        cand.register_forward_pre_hook(functools.partial(_cast_inputs, d), with_kwargs=True)
    return cand


def _weight_bytes(module) -> int:
    seen, n = set(), 0
    for t in list(module.parameters()) + list(module.buffers()):
        key = (t.untyped_storage().data_ptr(), t.storage_offset())
        if key not in seen:
            seen.add(key)
            n += t.numel() * t.element_size()
    return n


def _dominant(module):
    sizes: Dict[Any, int] = {}
    for p in module.parameters():
        if p.is_floating_point():
            sizes[p.dtype] = sizes.get(p.dtype, 0) + p.numel()
    return max(sizes, key=sizes.get) if sizes else None


# ---------------------------------------------------------------------------------------------
# Layers


def _compute_modules(module) -> List[Tuple[str, Any]]:
    """The modules that hold floating parameters of their own (where a cast changes the math),
    in registration order."""
    return [(n, m) for n, m in module.named_modules()
            if n and any(p.is_floating_point() for p in m._parameters.values() if p is not None)]


class _Recorder:
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

        outs = [t for _, t in _leaves(output)]
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
            ins = [t for _, t in _leaves(args)]
            if all(torch.isfinite(t).all() for t in ins):
                self.first_nonfinite = name

    def remove(self):
        for h in self.handles:
            h.remove()


# ---------------------------------------------------------------------------------------------
# Accuracy


class _Accuracy:
    """Outputs of a candidate against the reference's, accumulated over batches."""

    def __init__(self):
        self.max_abs = 0.0
        self.ref_max = 0.0
        self.nonfinite = 0
        self.cosines: List[float] = []
        self.top1: List[float] = []
        self.kl: List[float] = []
        self.metric: List[float] = []

    def add(self, ref: List[Tuple[str, Any]], got: List[Tuple[str, Any]], main: int):
        import torch

        for (_, r), (_, g) in zip(ref, got):
            finite = torch.isfinite(r)
            self.nonfinite += int((finite & ~torch.isfinite(g)).sum())
            d = (g - r).abs()[finite & torch.isfinite(g)]
            if d.numel():
                self.max_abs = max(self.max_abs, float(d.max()))
            if finite.any():
                self.ref_max = max(self.ref_max, float(r[finite].abs().max()))
        r, g = ref[main][1].double(), got[main][1].double()
        if not torch.isfinite(g).all():
            self.cosines.append(float("nan"))
        else:
            self.cosines.append(float(torch.nn.functional.cosine_similarity(
                r.flatten(), g.flatten(), dim=0)))
        if r.dim() >= 2 and r.shape[-1] >= 2:
            self.top1.append(float((r.argmax(-1) == g.argmax(-1)).double().mean()))
            if torch.isfinite(g).all():
                lp, lq = r.log_softmax(-1), g.log_softmax(-1)
                self.kl.append(float((lp.exp() * (lp - lq)).sum(-1).mean()))
            else:
                self.kl.append(float("inf"))


def _bootstrap(values: List[float], seed: int, rounds: int = 1000) -> Tuple[float, float]:
    """A 95% percentile bootstrap interval of the mean."""
    if len(values) < 2:
        v = values[0] if values else float("nan")
        return v, v
    rng = random.Random(seed)
    n = len(values)
    means = sorted(sum(rng.choice(values) for _ in range(n)) / n for _ in range(rounds))
    return means[int(0.025 * rounds)], means[int(0.975 * rounds) - 1]


# ---------------------------------------------------------------------------------------------
# Speed


def _sync(device):
    import torch

    if device is not None and str(device).startswith("cuda"):
        torch.cuda.synchronize(device)


def _timing(module, batches, warmup: int, repeats: int, device) -> Dict[str, Any]:
    import torch

    with torch.no_grad():
        for b in batches[: max(1, warmup)]:
            _call(module, b)
        _sync(device)
        if device is not None and str(device).startswith("cuda"):
            torch.cuda.reset_peak_memory_stats(device)
        times = []
        samples = 0
        cuda = device is not None and str(device).startswith("cuda")
        for _ in range(repeats):
            for b in batches:
                if cuda:  # CUDA events on the device's stream, read once it is done
                    start = torch.cuda.Event(enable_timing=True)
                    end = torch.cuda.Event(enable_timing=True)
                    start.record()
                    _call(module, b)
                    end.record()
                    end.synchronize()
                    times.append(start.elapsed_time(end) / 1000.0)
                else:
                    t0 = time.perf_counter()
                    _call(module, b)
                    times.append(time.perf_counter() - t0)
                samples += _batch_size(b)
    times.sort()

    def pct(q):
        return 1000.0 * times[min(len(times) - 1, int(round(q * (len(times) - 1))))]

    if device is not None and str(device).startswith("cuda"):
        peak = int(torch.cuda.max_memory_allocated(device))
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return {"p50": pct(0.5), "p90": pct(0.9), "p99": pct(0.99),
            "throughput": samples / max(sum(times), 1e-12), "peak_memory_bytes": peak}


def _cpu_flags() -> set:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def _support(dtype, device) -> Optional[str]:
    """What this device does with `dtype`, when it is not native arithmetic."""
    import torch

    if dtype is None or (device is not None and not str(device).startswith("cpu")):
        return None
    flags = _cpu_flags()
    for d, name, native in ((torch.float16, "f16", ("avx512_fp16", "amx_fp16")),
                            (torch.bfloat16, "bf16", ("avx512_bf16", "amx_bf16"))):
        if dtype == d:
            have = [f for f in native if f in flags]
            if not have:
                return f"this CPU has no {name} arithmetic: {name} is emulated"
            return f"this CPU reports {name} arithmetic ({', '.join(have)})"
    return None


# ---------------------------------------------------------------------------------------------
# The result


class Profile:
    """What :func:`profile` measured: ``to_dict()``, ``to_pandas()``, ``save_rules(path)``
    (the recommended candidate as a rules file ``convert --rules`` reads), and a table as
    ``str()``."""

    def __init__(self, d: Dict[str, Any], rules: Dict[str, Dict[str, Any]]):
        self._d = d
        self._rules = rules

    def to_dict(self) -> Dict[str, Any]:
        return self._d

    def __getattr__(self, name: str) -> Any:
        try:
            return self._d[name]
        except KeyError:
            raise AttributeError(name) from None

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

        def many(v):
            return [v] if isinstance(v, str) else list(v or [])

        # In convert's order (preset, only, keep): the last rule that matches decides.
        for preset in many(r.get("preset")):
            lines += ["", "[[rule]]", f"preset = {json.dumps(preset)}"]
        for pat in many(r.get("only")):
            lines += ["", "[[rule]]", f"match = {json.dumps(pat)}", "only = true"]
        for pat in many(r.get("keep")):
            lines += ["", "[[rule]]", f"match = {json.dumps(pat)}", "keep = true"]
        with open(path, "w") as f:
            f.write("\n".join(lines) + "\n")

    def report(self, path) -> None:
        """Writes a self-contained HTML page (inline SVG, no script, no network): the
        candidates' table, each module's output range against the dtypes' limits, and the
        latencies; the same look as ``analyze --report``."""
        with open(path, "w", encoding="utf-8") as f:
            f.write(_html(self._d))

    def __str__(self) -> str:
        rows = [["candidate", "cosine", "max abs", "non-finite", "metric", "p50 ms", "weights"]]
        for c in self._d["candidates"]:
            m = c.get("metric")
            rows.append([c["name"], f"{c['cosine']:.6f}", f"{c['max_abs']:.3g}",
                         str(c["nonfinite"]), "" if m is None else f"{m:.4g}",
                         "" if c["latency_ms"] is None else f"{c['latency_ms']['p50']:.2f}",
                         str(c["weight_bytes"])])
        w = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
        text = "\n".join("  ".join(x.ljust(w[i]) for i, x in enumerate(r)) for r in rows)
        f = self._d.get("first_nonfinite")
        if f:
            text += f"\nfirst non-finite: {f['module']} ({f['candidate']})"
        text += f"\nrecommended: {self._d.get('recommended')}"
        return text

    def __repr__(self) -> str:
        return f"<weightcast.Profile {len(self._d['candidates'])} candidates>\n{self}"


def _meets(row: Dict[str, Any], tolerance: Dict[str, float], higher_is_better: bool) -> bool:
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


# ---------------------------------------------------------------------------------------------
# profile()


def _capture(module, names: Sequence[str], batch):
    """The inputs and floating outputs of the named modules on one batch (for sensitivity)."""
    import torch

    seen: Dict[str, Any] = {}
    handles = []

    def hook(name, m, args, kwargs, output):
        if name not in seen:
            seen[name] = (args, kwargs, _detach(output))

    for name in names:
        sub = module.get_submodule(name)
        handles.append(sub.register_forward_hook(functools.partial(hook, name), with_kwargs=True))
    try:
        with torch.no_grad():
            _call(module, batch)
    finally:
        for h in handles:
            h.remove()
    return seen


def _sensitivity(module, captured, dtype) -> Dict[str, float]:
    """Per module: the relative error of its output when it alone runs in `dtype`, on the
    reference's inputs (inf where it goes non-finite)."""
    import torch

    from ._modules import _is_norm, _map_floating, _promote_mode, _to_dtype, _widen, runnable

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
                    got = _detach(sub(*args, **kwargs))
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


def _measure(module, batches, ref_outs, ref_raw, main, metric, seed, higher_is_better,
             timing, warmup, repeats, device, recorder=None):
    """One candidate's accuracy (and speed) row, and the module its outputs first went
    non-finite in."""
    import torch

    acc = _Accuracy()
    rec = recorder
    with torch.no_grad():
        for b, ref, raw in zip(batches, ref_outs, ref_raw):
            out = _call(module, b)
            acc.add(ref, _detach(out), main)
            if metric is not None:
                acc.metric.append(float(metric(raw, out, b)))
    cos = [c for c in acc.cosines]
    row: Dict[str, Any] = {
        "metric": sum(acc.metric) / len(acc.metric) if acc.metric else None,
        "metric_ci": list(_bootstrap(acc.metric, seed)) if acc.metric else None,
        "cosine": min(cos) if all(c == c for c in cos) else float("nan"),
        "max_abs": acc.max_abs,
        "max_rel": acc.max_abs / acc.ref_max if acc.ref_max else 0.0,
        "top1": sum(acc.top1) / len(acc.top1) if acc.top1 else None,
        "kl": sum(acc.kl) / len(acc.kl) if acc.kl else None,
        "nonfinite": acc.nonfinite,
        "weight_bytes": _weight_bytes(module),
        "latency_ms": None,
        "throughput": None,
        "peak_memory_bytes": None,
    }
    if timing:
        t = _timing(module, batches, warmup, repeats, device)
        row["latency_ms"] = {k: t[k] for k in ("p50", "p90", "p99")}
        row["throughput"] = t["throughput"]
        row["peak_memory_bytes"] = max(t["peak_memory_bytes"], row["weight_bytes"])
    return row


def profile(
    module,
    inputs: Iterable[Any],
    candidates: Sequence[Candidate] = ("f16", "bf16"),
    *,
    metric: Optional[Callable[[Any, Any, Any], float]] = None,
    higher_is_better: bool = False,
    key: Optional[str] = None,
    layers: bool = True,
    timing: bool = True,
    warmup: int = 1,
    repeats: int = 3,
    search: bool = False,
    tolerance: Optional[Dict[str, float]] = None,
    max_passes: int = 32,
    seed: int = 0,
    progress: Any = None,
) -> Profile:
    """Measure what each candidate precision does to ``module`` on ``inputs`` (an iterable of
    batches: a tensor, a tuple of arguments or a dict of keywords), against the module as
    given (the reference, usually f32; call ``.eval()`` first for inference), and how fast
    each runs on this machine.

    ``candidates``: dtype names (``"f16"``), rule dicts (``{"to": "f16", "keep":
    ["class:Conv2d"]}``) or rules files, each built in turn with :func:`cast_module` (memory:
    the reference and one candidate). Per candidate: cosine of the outputs (the worst batch),
    max absolute and relative error, top-1 agreement and KL for logits (the first floating
    output, or ``key``), non-finite values, ``metric(reference_output, candidate_output,
    batch)`` averaged with a 95% bootstrap interval; latency p50/p90/p99 after ``warmup``,
    throughput, peak memory, weight bytes, and what the device does with the dtype. Per layer
    (``layers=True``): the reference's range of each module's output against each candidate
    dtype (headroom in powers of two, overflow, values below the smallest normal), the first
    module whose output went non-finite while its inputs were finite, and each module's
    sensitivity (its output's relative error when it alone runs at the candidate precision).

    ``search=True`` with ``tolerance`` (``{"cosine": 0.9999}`` at least, ``{"max_abs": 1e-2}``
    at most, ``{"metric": x}``: lower is better unless ``higher_is_better``): for each
    candidate that misses it, the fewest modules to keep at the reference precision, starting
    from the non-finite origin and the most sensitive, found by bisection in at most
    ``max_passes`` forward passes over the inputs and verified; the result's
    ``save_rules(path)`` writes them for ``convert --rules``.

    >>> p = weightcast.profile(model.eval(), batches, ["f16", "bf16"], search=True,
    ...                        tolerance={"cosine": 0.9999})
    >>> print(p); p.save_rules("rules.toml")
    """
    import torch

    from . import UsageError

    batches = list(inputs)
    if not batches:
        raise UsageError("profile: inputs= holds no batch")
    tolerance = dict(tolerance or {"cosine": 0.999})
    known = ("cosine", "max_abs", "max_rel", "kl", "top1", "metric")
    unknown = [k for k in tolerance if k not in known]
    if unknown:
        raise UsageError(f"profile: tolerance {', '.join(unknown)}: use {', '.join(known)}")
    params = list(module.parameters())
    device = params[0].device if params else torch.device("cpu")
    specs = [_spec(c) for c in candidates]
    targets = [_target(kw, module) for _, kw in specs]
    floats = [t for t in targets if t is not None and t.is_floating_point]
    tinies = [torch.finfo(t).tiny for t in floats]
    bar = None
    if progress:
        try:
            from tqdm.auto import tqdm

            bar = tqdm(total=1 + len(specs), desc="profiling")
        except ImportError:
            bar = None

    # The reference: outputs, layer ranges.
    rec = _Recorder(module, tinies) if layers else None
    ref_raw, ref_outs = [], []
    try:
        with torch.no_grad():
            for b in batches:
                out = _call(module, b)
                ref_raw.append(out)
                ref_outs.append(_detach(out))
    finally:
        if rec is not None:
            rec.remove()
    paths = [p for p, _ in ref_outs[0]]
    if not paths:
        raise UsageError("profile: the module's output holds no floating tensor to compare")
    main = paths.index(key) if key in paths else 0
    if key is not None and key not in paths:
        raise UsageError(f"profile: key={key!r} is not an output (outputs: {', '.join(paths)})")
    ref_row = _measure(module, batches, ref_outs, ref_raw, main, metric, seed,
                       higher_is_better, timing, warmup, repeats, device)
    ref_dtype = _dominant(module)
    ref_row.update(name="reference", dtype=str(ref_dtype).replace("torch.", ""))
    if bar:
        bar.update(1)

    compute = [n for n, _ in _compute_modules(module)]
    captured = _capture(module, compute, batches[0]) if layers else {}
    rows = [ref_row]
    rules: Dict[str, Dict[str, Any]] = {}
    sensitivity: Dict[str, Dict[str, float]] = {}
    first_nonfinite = None
    passes = 0
    for (name, kw), target in zip(specs, targets):
        cand = _build(module, kw)
        crec = _Recorder(cand, []) if layers else None
        try:
            row = _measure(cand, batches, ref_outs, ref_raw, main, metric, seed,
                           higher_is_better, timing, warmup, repeats, device)
        finally:
            if crec is not None:
                crec.remove()
        passes += 1
        row.update(name=name, dtype=str(target or _dominant(cand)).replace("torch.", ""),
                   support=_support(target, device))
        if row["latency_ms"] and ref_row["latency_ms"]:
            ratio = row["latency_ms"]["p50"] / max(ref_row["latency_ms"]["p50"], 1e-9)
            if ratio > 1.1:
                note = f"{ratio:.1f}x slower than the reference here (measured)"
                row["support"] = f"{row['support']}; {note}" if row["support"] else note
        if crec is not None and crec.first_nonfinite and first_nonfinite is None:
            first_nonfinite = {"candidate": name, "module": crec.first_nonfinite}
        row["first_nonfinite"] = crec.first_nonfinite if crec is not None else None
        rows.append(row)
        rules[name] = {k: v for k, v in kw.items() if v not in (None, (), [])}
        if target is not None and layers:
            sensitivity[name] = _sensitivity(module, captured, target)
        del cand
        if bar:
            bar.update(1)
        if search and target is not None and not _meets(row, tolerance, higher_is_better):
            found, used = _search(module, batches, ref_outs, ref_raw, main, metric, seed,
                                  higher_is_better, kw, row.get("first_nonfinite"),
                                  sensitivity.get(name, {}), compute, tolerance,
                                  max_passes - passes, timing, warmup, repeats, device)
            passes += used
            if found is not None:
                keep, srow = found
                sname = f"{name} keeping {len(keep)} module(s)"
                srow.update(name=sname, dtype=row["dtype"], support=row["support"],
                            kept_modules=keep, first_nonfinite=None,
                            bytes_saved=ref_row["weight_bytes"] - srow["weight_bytes"])
                rows.append(srow)
                rules[sname] = {**rules[name], "keep": srow.pop("keep_rules")}
    if bar:
        bar.close()

    ok = [r for r in rows[1:] if _meets(r, tolerance, higher_is_better)]
    recommended = min(ok, key=lambda r: r["weight_bytes"])["name"] if ok else None
    layer_rows = []
    if rec is not None:
        for mod in rec.order:
            s = rec.stats[mod]
            for i, t in enumerate(floats):
                big = torch.finfo(t).max
                layer_rows.append({
                    "module": mod, "class": s["class"],
                    "dtype": str(t).replace("torch.", ""),
                    "max_abs": s["max_abs"],
                    "min_nonzero": s["min_nonzero"] if s["min_nonzero"] != math.inf else None,
                    "headroom_bits": (math.log2(big / s["max_abs"]) if s["max_abs"] > 0
                                      else None),
                    "overflow": s["max_abs"] > big,
                    "below_normal_fraction": s["below"][i] / s["nonzero"] if s["nonzero"] else 0.0,
                    "nonfinite": s["nonfinite"],
                    "sensitivity": next((sensitivity[n].get(mod) for n, tt in
                                         zip([n for n, _ in specs], targets)
                                         if tt == t and n in sensitivity), None),
                })
    d = {
        "reference": {"dtype": ref_row["dtype"]},
        "inputs": len(batches),
        "device": str(device),
        "tolerance": tolerance,
        "candidates": rows,
        "layers": layer_rows,
        "first_nonfinite": first_nonfinite,
        "recommended": recommended,
        "search_passes": passes,
    }
    return Profile(d, rules)


def _search(module, batches, ref_outs, ref_raw, main, metric, seed, higher_is_better, kw,
            origin, sens, compute, tolerance, budget, timing, warmup, repeats, device):
    """The fewest modules to keep at the reference precision so that the candidate meets the
    tolerance: modules ranked (the non-finite origin first, then by sensitivity), the shortest
    passing prefix found by bisection; returns ((kept, row) or None, passes used)."""
    from ._modules import _state_tensors

    first = {id(t): name for name, t, _, _, _ in _state_tensors(module)}

    def patterns(mods):
        """Rules for the planned (first) state-dict names of the modules' own tensors (tied
        weights are planned under their first name), each matching that name alone."""
        import re

        out = []
        for m in mods:
            sub = module.get_submodule(m)
            for t in list(sub._parameters.values()) + list(sub._buffers.values()):
                if t is not None and id(t) in first:
                    pat = "re:^" + re.escape(first[id(t)]) + "$"
                    if pat not in out:
                        out.append(pat)
        return out

    ranked = []
    if origin and origin in compute:
        ranked.append(origin)
    ranked += [n for n in sorted(compute, key=lambda n: -sens.get(n, 0.0)) if n not in ranked]
    used = 0
    cache: Dict[int, Dict[str, Any]] = {}

    def evaluate(k: int) -> Dict[str, Any]:
        nonlocal used
        if k not in cache:
            spec = {**kw, "keep": base + patterns(ranked[:k])}
            with warnings.catch_warnings():  # the trial rules' overlaps are the search's own
                warnings.simplefilter("ignore")
                cand = _build(module, spec)
            cache[k] = _measure(cand, batches, ref_outs, ref_raw, main, metric, seed,
                                higher_is_better, False, 0, 0, device)
            used += 1
        return cache[k]

    base = kw.get("keep", ())
    base = [base] if isinstance(base, str) else list(base)
    lo, hi = 0, len(ranked)
    if budget < 1 or not _meets(evaluate(hi), tolerance, higher_is_better):
        return None, used
    while hi - lo > 1 and used < budget:
        mid = (lo + hi) // 2
        if _meets(evaluate(mid), tolerance, higher_is_better):
            hi = mid
        else:
            lo = mid
    keep = ranked[:hi]
    # The verified run: the rules as a user applies them, with timing.
    spec = {**kw, "keep": base + patterns(keep)}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        cand = _build(module, spec)
    row = _measure(cand, batches, ref_outs, ref_raw, main, metric, seed, higher_is_better,
                   timing, warmup, repeats, device)
    used += 1
    if not _meets(row, tolerance, higher_is_better):
        return None, used
    row["keep_rules"] = spec["keep"]
    return (keep, row), used


# ---------------------------------------------------------------------------------------------
# `weightcast profile` (the wheel's command runs it here: it needs torch and transformers)

_TEXTS = [
    "A man is eating food.", "A man is eating a piece of bread.",
    "The girl is carrying a baby.", "A man is riding a horse.", "A woman is playing violin.",
    "Two men pushed carts through the woods.", "A monkey is playing drums.",
    "A cheetah is running behind its prey.", "The new movie is awesome.",
    "The cat sits outside.", "Half precision halves the memory of every weight.",
    "Some layers overflow in float16 and need float32.",
]


def cli(argv: List[str]) -> int:
    """`weightcast profile MODEL_FOLDER ...`; returns the exit code."""
    import argparse
    import json as _json
    import sys

    ap = argparse.ArgumentParser(
        prog="weightcast profile",
        description="Measure each precision on a Hugging Face model folder with PyTorch and "
                    "transformers: accuracy against f32 down to the layer, speed on this "
                    "machine; --search finds the modules to keep in f32. (`weightcast eval` "
                    "runs BERT and Llama-family folders without Python.)")
    ap.add_argument("model", help="a model folder transformers can load")
    ap.add_argument("--dtypes", default="f16,bf16", help="candidates (default f16,bf16)")
    ap.add_argument("--keep", action="append", default=[], help="keep matching tensors")
    ap.add_argument("--only", action="append", default=[], help="cast only matching tensors")
    ap.add_argument("--rules", help="a rules file applied to every candidate")
    ap.add_argument("--preset", action="append", default=[], help="a named preset")
    ap.add_argument("--inputs", help="a text file, one input per line (default: built-in)")
    ap.add_argument("--batch", type=int, default=4, help="inputs per batch (default 4)")
    ap.add_argument("--search", action="store_true", help="find the modules to keep")
    ap.add_argument("--tolerance", action="append", default=[], metavar="NAME=VALUE",
                    help="cosine=0.9999 (at least), max_abs=0.01 (at most)")
    ap.add_argument("--rules-out", help="write the recommended candidate's rules here")
    ap.add_argument("--report", help="write the HTML report here")
    ap.add_argument("--repeats", type=int, default=3, help="timed passes (default 3)")
    ap.add_argument("--json", action="store_true", help="print the result as JSON")
    a = ap.parse_args(argv)

    def fail(msg: str, code: int) -> int:
        sys.stderr.write(f"weightcast: error: {msg}\n")
        if a.json:
            print(_json.dumps({"error": msg, "exit_code": code}))
        return code

    try:
        import torch
        from transformers import AutoModel, AutoTokenizer
    except ImportError as e:
        return fail(f"profile needs torch and transformers ({e}): pip install torch transformers", 2)
    tolerance = {}
    for t in a.tolerance:
        k, _, v = t.partition("=")
        try:
            tolerance[k] = float(v)
        except ValueError:
            return fail(f"--tolerance {t}: give NAME=NUMBER (cosine=0.9999)", 2)
    if not os.path.isdir(a.model) or not os.path.isfile(os.path.join(a.model, "config.json")):
        return fail(f"{a.model}: profile needs a Hugging Face model folder (config.json and "
                    "the weights)", 2)
    vocab_files = ("tokenizer.json", "vocab.txt", "vocab.json", "tokenizer.model", "spiece.model",
                   "sentencepiece.bpe.model")
    try:
        if not any(os.path.isfile(os.path.join(a.model, f)) for f in vocab_files):
            raise FileNotFoundError("no tokenizer files")
        tok = AutoTokenizer.from_pretrained(a.model)
    except Exception:
        return fail(f"{a.model}: no tokenizer: this model needs images or audio; profile it "
                    "from Python with weightcast.profile(model, inputs)", 2)
    texts = _TEXTS
    if a.inputs:
        with open(a.inputs, encoding="utf-8") as f:
            texts = [line.strip() for line in f if line.strip()]
        if not texts:
            return fail(f"{a.inputs}: no input (one per line)", 2)
    try:
        model = AutoModel.from_pretrained(a.model, dtype=torch.float32).eval()
    except Exception as e:  # transformers' own message: what is missing or unknown
        return fail(f"{a.model}: transformers cannot load it: {' '.join(str(e).split())}", 1)
    batches = [dict(tok(texts[i:i + a.batch], padding=True, return_tensors="pt"))
               for i in range(0, len(texts), a.batch)]
    candidates = []
    for d in a.dtypes.split(","):
        spec: Dict[str, Any] = {"to": d.strip(), "name": d.strip()}
        if a.keep:
            spec["keep"] = a.keep
        if a.only:
            spec["only"] = a.only
        if a.rules:
            spec["rules"] = a.rules
        if a.preset:
            spec["preset"] = a.preset
        candidates.append(spec)
    from . import Error, UsageError

    try:
        p = profile(model, batches, candidates, search=a.search, tolerance=tolerance or None,
                    repeats=a.repeats, progress=not a.json and sys.stderr.isatty())
    except Error as e:
        return fail(str(e), 2 if isinstance(e, UsageError) else 1)
    if a.rules_out:
        if p.recommended is None:
            return fail("no candidate meets the tolerance: no rules written", 1)
        p.save_rules(a.rules_out)
    if a.report:
        p.report(a.report)
    if a.json:
        print(_json.dumps(p.to_dict(), indent=2, default=str))
    else:
        print(p)
        if a.rules_out:
            print(f"rules: {a.rules_out}")
        if a.report:
            print(f"report: {a.report}")
    return 0


# ---------------------------------------------------------------------------------------------
# The HTML report


def _esc(x: Any) -> str:
    return (str(x).replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")
            .replace('"', "&quot;"))


def _headroom_svg(layers: List[Dict[str, Any]]) -> str:
    """log2 of each module's largest output magnitude, in execution order, with the largest
    finite value and the smallest normal of each dtype as lines."""
    import torch

    mods: List[str] = []
    peak: Dict[str, float] = {}
    for r in layers:
        if r["module"] not in peak and r["max_abs"] > 0:
            mods.append(r["module"])
            peak[r["module"]] = math.log2(r["max_abs"])
    dtypes = sorted({r["dtype"] for r in layers})
    limits = []
    for d in dtypes:
        fi = torch.finfo(getattr(torch, d))
        limits.append((d, math.log2(fi.max), math.log2(fi.tiny)))
    if not mods:
        return "<p>No module output to chart.</p>"
    top = max(max(peak.values()), *(m for _, m, _ in limits if m < 200)) + 2
    low = min(min(peak.values()), -20) - 2
    w, h, left = max(600, 8 * len(mods) + 80), 320, 60

    def y(v: float) -> float:
        v = max(low, min(top, v))
        return 10 + (top - v) / (top - low) * (h - 40)

    out = [f'<svg id="headroom" width="{w}" height="{h}" xmlns="http://www.w3.org/2000/svg">']
    step = (w - left - 10) / len(mods)
    for i, m in enumerate(mods):
        x = left + i * step
        over = any(r["module"] == m and r["overflow"] for r in layers)
        out.append(f'<rect x="{x:.1f}" y="{y(peak[m]):.1f}" width="{max(step - 1, 1):.1f}" '
                   f'height="{y(low) - y(peak[m]):.1f}" fill="{"#c33" if over else "#4a7"}">'
                   f'<title>{_esc(m)}: max |x| = 2^{peak[m]:.1f}</title></rect>')
    colors = ["#a33", "#36a", "#a60", "#555"]
    for k, (d, big, tiny) in enumerate(limits):
        c = colors[k % len(colors)]
        for v, what in ((big, "max finite"), (tiny, "smallest normal")):
            if low <= v <= top:
                out.append(f'<line x1="{left}" x2="{w - 10}" y1="{y(v):.1f}" y2="{y(v):.1f}" '
                           f'stroke="{c}" stroke-dasharray="4 3"/><text x="{w - 12}" '
                           f'y="{y(v) - 3:.1f}" text-anchor="end" font-size="11" fill="{c}">'
                           f'{_esc(d)} {what} (2^{v:.0f})</text>')
    out.append(f'<text x="4" y="{y(top - 2) + 4:.1f}" font-size="11">log2 max|x|</text></svg>')
    return "".join(out)


def _latency_svg(rows: List[Dict[str, Any]]) -> str:
    timed = [r for r in rows if r.get("latency_ms")]
    if not timed:
        return "<p>Not timed.</p>"
    big = max(r["latency_ms"]["p99"] for r in timed) or 1.0
    w, bar = 600, 22
    out = [f'<svg id="latency" width="{w}" height="{bar * len(timed) + 10}" '
           f'xmlns="http://www.w3.org/2000/svg">']
    for i, r in enumerate(timed):
        lat = r["latency_ms"]
        y = 5 + i * bar
        wid = 380 * lat["p50"] / big
        out.append(f'<text x="0" y="{y + 14}" font-size="12">{_esc(r["name"])[:28]}</text>'
                   f'<rect x="200" y="{y + 3}" width="{wid:.1f}" height="{bar - 8}" fill="#36a">'
                   f'<title>p50 {lat["p50"]:.2f} ms, p90 {lat["p90"]:.2f}, p99 '
                   f'{lat["p99"]:.2f}</title></rect><text x="{205 + wid:.1f}" y="{y + 14}" '
                   f'font-size="11">{lat["p50"]:.2f} ms</text>')
    out.append("</svg>")
    return "".join(out)


def _html(d: Dict[str, Any]) -> str:
    rows = d["candidates"]
    head = ("<tr><th>candidate</th><th>cosine</th><th>max abs</th><th>max rel</th>"
            "<th>top-1</th><th>non-finite</th><th>metric</th><th>p50 ms</th><th>weights</th>"
            "<th>note</th></tr>")
    body = []
    for r in rows:
        m, ci, top1, lat = r.get("metric"), r.get("metric_ci"), r.get("top1"), r.get("latency_ms")
        metric = "" if m is None else f"{m:.4g}" + (f" [{ci[0]:.4g}, {ci[1]:.4g}]" if ci else "")
        cells = [_esc(r["name"]), f"{r['cosine']:.6f}", f"{r['max_abs']:.3g}",
                 f"{r['max_rel']:.3g}", "" if top1 is None else f"{top1:.4f}",
                 str(r["nonfinite"]), metric, "" if not lat else f"{lat['p50']:.2f}",
                 str(r["weight_bytes"]), _esc(r.get("support") or "")]
        cls = "rec" if r["name"] == d["recommended"] else ""
        body.append(f'<tr class="{cls}">' + "".join(f"<td>{c}</td>" for c in cells) + "</tr>")
    f = d.get("first_nonfinite")
    cards = [("recommended", d.get("recommended") or "none meets the tolerance"),
             ("first non-finite", f"{f['module']} ({f['candidate']})" if f else "none"),
             ("tolerance", ", ".join(f"{k} {v}" for k, v in d["tolerance"].items())),
             ("forward passes", str(d.get("search_passes")))]
    card = "".join(f'<div class="card">{_esc(k)}<b>{_esc(v)}</b></div>' for k, v in cards)
    return (
        '<!doctype html><html lang="en"><head><meta charset="utf-8"><title>weightcast profile'
        '</title><style>body{font:14px system-ui,sans-serif;margin:2em;max-width:1100px;'
        'color:#222}table{border-collapse:collapse}td,th{padding:2px 8px;border-bottom:1px '
        'solid #ddd;text-align:right}td:first-child,th:first-child{text-align:left}'
        'tr.rec{background:#eef6ee}.cards{display:flex;gap:1em;flex-wrap:wrap}'
        '.card{border:1px solid #ccc;border-radius:6px;padding:.6em 1em}.card b{display:block;'
        'font-size:18px}</style></head><body><h1>What each precision does to the model</h1>'
        f'<p>{d["inputs"]} batches on {_esc(d["device"])}, against the reference in '
        f'{_esc(d["reference"]["dtype"])}.</p><div class="cards">{card}</div>'
        f'<h2>Candidates</h2><table id="candidates">{head}{"".join(body)}</table>'
        '<h2>Each module\'s output against the dtypes\' range</h2><p>The largest magnitude of '
        'each module\'s output in the reference run, in execution order, on a log2 scale; red: '
        'beyond a candidate dtype\'s largest finite value.</p>'
        f'{_headroom_svg(d["layers"])}<h2>Latency per batch (p50)</h2>'
        f'{_latency_svg(rows)}<p>Made by weightcast.</p></body></html>\n')
