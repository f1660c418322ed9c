"""`weightcast.profile()`: the reference run on the batches (its outputs, its modules' ranges),
then each candidate built, measured, its modules' sensitivity and, with ``search=True``, the
modules to keep; then the recommendation and the layer rows, as a :class:`Profile`."""

from typing import Any, Callable, Dict, Iterable, List, Optional, Sequence

from .._weightcast import UsageError
from .candidates import Candidate, build, dominant_dtype, parse, target_dtype
from .layers import Recorder, capture, compute_modules, layer_rows, sensitivity
from .measure import Bench, Reference, Scoring
from .outputs import call, detach
from .recommend import TOLERANCES, recommend
from .result import Profile
from .search import fewest_to_keep, rank
from .speed import Timing, support


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
    ["class:Conv2d"]}``; ``{"to": "f16", "rescale": True}`` is the model rescaled by
    :func:`weightcast.rescale` on the same inputs, its row's ``rescale`` says how) or rules
    files, each built in turn with :func:`cast_module` (memory: the reference and one
    candidate). Per candidate: cosine of the outputs (the worst batch),
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

    ``recommended``: the candidate with the fewest weight bytes within ``tolerance`` (default
    ``{"cosine": 0.999}``, and no non-finite value), or None; ``objective`` (``"weight_bytes"``)
    and ``recommended_for`` say so. Speed is measured, not optimised: each timed candidate's
    ``latency_ratio`` (p50 over the reference's) and ``slower_than_reference`` say where the
    recommendation runs slower than the reference on this machine, and ``str()`` notes it.

    >>> p = weightcast.profile(model.eval(), batches, ["f16", "bf16"], search=True,
    ...                        tolerance={"cosine": 0.9999})
    >>> print(p); p.save_rules("rules.toml")
    """
    import torch

    batches = list(inputs)
    if not batches:
        raise UsageError("profile: inputs= holds no batch")
    tolerance = dict(tolerance or {"cosine": 0.999})
    unknown = [k for k in tolerance if k not in TOLERANCES]
    if unknown:
        raise UsageError(f"profile: tolerance {', '.join(unknown)}: use {', '.join(TOLERANCES)}")
    params = list(module.parameters())
    device = params[0].device if params else torch.device("cpu")
    specs = [parse(c) for c in candidates]
    for _, kw in specs:
        if kw.get("rescale") is True:
            # The factors that make this candidate's dtype fit, measured on the same batches.
            from .._rescale import rescale

            kw["rescale"] = rescale(module, batches, kw.get("to") or "f16")
        elif kw.get("rescale") not in (None, False):
            raise UsageError("profile: a candidate's rescale= takes True or False")
        else:
            kw.pop("rescale", None)
    targets = [target_dtype(kw) for _, kw in specs]
    floats = [t for t in targets if t is not None and t.is_floating_point]
    bar = _progress_bar(progress, 1 + len(specs))

    # The reference: outputs, layer ranges.
    rec = Recorder(module, [torch.finfo(t).tiny for t in floats]) if layers else None
    bench = Bench(_reference(module, batches, key, rec),
                  Scoring(metric, higher_is_better, seed, tolerance),
                  Timing(timing, warmup, repeats, device))
    ref_row = bench.measure(module)
    ref_row.update(name="reference", dtype=_dtype_name(dominant_dtype(module)))
    if bar:
        bar.update(1)

    compute = compute_modules(module)
    captured = capture(module, compute, batches[0]) if layers else {}
    rows = [ref_row]
    rules: Dict[str, Dict[str, Any]] = {}
    sensitivities: Dict[str, Dict[str, float]] = {}
    first_nonfinite = None
    passes = 0
    for (name, kw), target in zip(specs, targets):
        row = _candidate_row(module, bench, name, kw, target, layers)
        passes += 1
        if row["first_nonfinite"] and first_nonfinite is None:
            first_nonfinite = {"candidate": name, "module": row["first_nonfinite"]}
        rows.append(row)
        rules[name] = {k: v for k, v in kw.items() if v is not None and not (
            isinstance(v, (tuple, list)) and not v)}
        if kw.get("rescale") is not None:
            row["rescale"] = {k: kw["rescale"].to_dict()[k]
                              for k in ("alpha", "stream_max", "config", "unreachable")}
            row["rescale"]["factors"] = len(kw["rescale"].factors)
        if target is not None and layers:
            sensitivities[name] = sensitivity(module, captured, target)
        if bar:
            bar.update(1)
        if (search and target is not None and kw.get("rescale") is None
                and not bench.scoring.meets(row)):
            ranked = rank(compute, row["first_nonfinite"], sensitivities.get(name, {}))
            found, used = fewest_to_keep(module, bench, kw, ranked, max_passes - passes)
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

    recommendation = recommend(rows, tolerance, higher_is_better)
    named_targets = [(n, t) for (n, _), t in zip(specs, targets)]
    d = {
        "reference": {"dtype": ref_row["dtype"]},
        "inputs": len(batches),
        "device": str(device),
        "tolerance": tolerance,
        "candidates": rows,
        "layers": layer_rows(rec, floats, named_targets, sensitivities) if rec is not None else [],
        "first_nonfinite": first_nonfinite,
        **recommendation,
        "search_passes": passes,
    }
    return Profile(d, rules)


def _dtype_name(dtype) -> str:
    return str(dtype).replace("torch.", "")


def _progress_bar(progress: Any, total: int):
    """A tqdm bar when `progress` asks for one and tqdm is installed (else None)."""
    if not progress:
        return None
    try:
        from tqdm.auto import tqdm

        return tqdm(total=total, desc="profiling")
    except ImportError:
        return None


def _reference(module, batches: List[Any], key: Optional[str],
               rec: Optional[Recorder]) -> Reference:
    """The reference run on the batches (its modules' ranges recorded by `rec`, which is
    removed after it), and which output is compared (``key``, else the first)."""
    import torch

    raw, outs = [], []
    try:
        with torch.no_grad():
            for b in batches:
                out = call(module, b)
                raw.append(out)
                outs.append(detach(out))
    finally:
        if rec is not None:
            rec.remove()
    paths = [p for p, _ in outs[0]]
    if not paths:
        raise UsageError("profile: the module's output holds no floating tensor to compare")
    main = paths.index(key) if key in paths else 0
    if key is not None and key not in paths:
        raise UsageError(f"profile: key={key!r} is not an output (outputs: {', '.join(paths)})")
    return Reference(batches, outs, raw, main)


def _candidate_row(module, bench: Bench, name: str, kw: Dict[str, Any], target: Any,
                   layers: bool) -> Dict[str, Any]:
    """A candidate built from the module, measured (with `layers`, its modules watched for the
    first non-finite output), and named; the copy is dropped once measured."""
    cand = build(module, kw)
    crec = Recorder(cand, []) if layers else None
    try:
        row = bench.measure(cand)
    finally:
        if crec is not None:
            crec.remove()
    row.update(name=name, dtype=_dtype_name(target or dominant_dtype(cand)),
               support=support(target, bench.timing.device))
    row["first_nonfinite"] = crec.first_nonfinite if crec is not None else None
    return row
