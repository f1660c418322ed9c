"""`weightcast.rescale()`: the model's ranges on the user's batches, its family's symmetries
solved for power-of-two factors, and the proof on the same batches: the rescaled model in f32
against the original, and in the target dtype against plain casting."""

import copy
from typing import Any, Iterable

from .._weightcast import UsageError, torch_dtype_name
from .._dtypes import dtype_text
from .families import family_of
from .ranges import compare, run
from .result import Rescale, unreachable
from .solve import Factors, solve


def rescale(module, inputs: Iterable[Any], to: Any = "f16", *, headroom: float = 4.0) -> Rescale:
    """Find power-of-two factors that bring ``module``'s activations on ``inputs`` (an iterable
    of batches: a tensor, a tuple of arguments or a dict of keywords) within ``to``'s range
    with ``headroom`` to spare (the largest magnitude at most ``finfo(to).max / headroom``),
    using the scale symmetries of the model's family (Llama, Mistral, Qwen2, Qwen3, Gemma 1-3,
    T5/mT5/UMT5: the table in ``weightcast._rescale.families``). The model's function is
    unchanged: the residual stream is multiplied by ``alpha`` (the embedding and every tensor
    writing into it, the norms' epsilon times ``alpha**2`` in the config, a tied head's final
    norm divided by ``alpha``), and linear paths inside blocks by ``beta``.

    The module is not changed. The result holds the factors, the config edits, the ranges
    before and after, the modules no symmetry reaches, and the proof, measured on the same
    batches: the rescaled model in f32 against the original (``proof["f32"]["max_rel_diff"]``)
    and in ``to`` against the original (non-finite values, cosine, top-1), beside plain
    ``to`` (``proof["plain"]``). ``result.apply(model)`` applies it in memory;
    ``result.save_rules("rescale.toml")`` writes the rules ``convert --rules`` applies while
    casting.

    >>> r = weightcast.rescale(model.eval(), batches, to="f16")
    >>> print(r); r.save_rules("rescale.toml")
    """
    import torch

    batches = list(inputs)
    if not batches:
        raise UsageError("rescale: inputs= holds no batch")
    if not headroom >= 1:
        raise UsageError(f"rescale: headroom={headroom}: give a number of at least 1")
    to_text = dtype_text(to)
    dtype = getattr(torch, torch_dtype_name(to_text))
    if not dtype.is_floating_point:
        raise UsageError(f"rescale: to={to_text}: give a floating dtype (f16)")
    limit = torch.finfo(dtype).max / headroom
    config = getattr(module, "config", None)
    family = family_of(config)

    ref, before = run(module, batches)
    plain = compare(ref, run(copy.deepcopy(module).to(dtype), batches, watch=False)[0])
    factors = solve(module, family, before, limit) if family is not None else Factors()
    d = {
        "to": to_text,
        "family": family.name if family is not None else None,
        "model_type": getattr(config, "model_type", None),
        "headroom": float(headroom),
        "limit": limit,
        "alpha": factors.alpha,
        "stream_max": factors.stream_max,
        "tied_head": factors.tied_head,
        "pairs": factors.pairs,
        "factors": [{"names": list(n), "scale": s, "form": form, "match": pat}
                    for n, s, form, pat in factors.params],
        "config": factors.config,
        "config_before": {k: getattr(config, k) for k in factors.config},
        "before": dict(before.outputs),
    }
    result = Rescale({**d, "after": {}, "unreachable": [], "proof": {}})
    rescaled = result.apply(copy.deepcopy(module))
    got32, after = run(rescaled, batches)
    classes = {n: type(m).__name__ for n, m in module.named_modules()}
    leaves = {n for n, m in module.named_modules() if n and not any(True for _ in m.children())}
    after.order = [n for n in after.order if n in leaves]
    target = compare(ref, run(rescaled.to(dtype), batches, watch=False)[0])
    del rescaled
    d["after"] = dict(after.outputs)
    d["unreachable"] = unreachable(after, float(torch.finfo(dtype).max),
                                   d["family"], classes)
    d["proof"] = {"f32": compare(ref, got32), "target": target, "plain": plain}
    return Rescale(d)
