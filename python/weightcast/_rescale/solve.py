"""From measured ranges to factors: the residual stream's ``alpha`` and each pair's ``beta``,
powers of two, each the largest at most 1 that brings what it scales within the limit; then
the factor of every parameter they touch and the config edits."""

import math
import re
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Tuple

from .._weightcast import UsageError
from .families import Family, holds
from .ranges import Ranges


def pow2_within(largest: float, limit: float) -> float:
    """The largest power of two at most 1 by which `largest` times it is at most `limit`."""
    if largest <= limit or largest == 0 or not math.isfinite(largest):
        return 1.0
    return 2.0 ** math.floor(math.log2(limit / largest))


@dataclass
class Factors:
    """A solution: ``alpha``, each applied pair's ``beta``, each parameter's factor (by its
    state-dict names) and form, and the config edits."""

    alpha: float = 1.0
    stream_max: float = 0.0
    pairs: List[Dict[str, Any]] = field(default_factory=list)
    params: List[Tuple[Tuple[str, ...], float, str, str]] = field(default_factory=list)
    config: Dict[str, Any] = field(default_factory=dict)
    tied_head: bool = False


def _is_norm(m) -> bool:
    return "Norm" in type(m).__name__


def _is_embedding(m) -> bool:
    return "Embedding" in type(m).__name__


def _tied_head(module) -> Optional[bool]:
    """Whether the module's output head shares the input embedding's weight (None when it has
    no head)."""
    get_in = getattr(module, "get_input_embeddings", None)
    get_out = getattr(module, "get_output_embeddings", None)
    head = get_out() if get_out else None
    if head is None or get_in is None:
        return None
    return getattr(head, "weight", None) is getattr(get_in(), "weight", object())


def solve(module, family: Family, ranges: Ranges, limit: float) -> Factors:
    """The factors that bring every range the family's symmetries reach within `limit`."""
    mods = dict(module.named_modules())
    names = [n for n in mods if n]
    f = Factors()
    blocks = [n for n in names if re.search(family.blocks, n)]
    alpha_mods = [n for n in names
                  if family.matches(family.writers, n) or family.matches(family.eps_readers, n)]
    alpha_params = [n for n, _ in module.named_parameters()
                    if family.matches(family.writer_params, n)]
    # A parameter that writes into the stream: its module's output carries alpha too.
    owners = sorted({n.rpartition(".")[0] for n in alpha_params} - {""})
    f.stream_max = max([ranges.largest(b) for b in blocks] + [0.0])
    scaled_max = max([f.stream_max] + [ranges.outputs.get(n, 0.0) for n in alpha_mods + owners])
    f.alpha = pow2_within(scaled_max, limit)
    out: Dict[str, float] = {}
    inn: Dict[str, float] = {}
    config = getattr(module, "config", None)
    if f.alpha != 1.0:
        for n in alpha_mods:
            out[n] = f.alpha
        tied = _tied_head(module)
        if tied is None and getattr(config, "tie_word_embeddings", False):
            raise UsageError(
                "rescale: the model's output head is tied to the embedding the rescale scales, "
                "and this module has no head: pass the model with its head "
                "(AutoModelForCausalLM, AutoModelForSeq2SeqLM)")
        if tied:
            f.tied_head = True
            for n in names:
                if family.matches(family.tied_final_norms, n):
                    out[n] = out.get(n, 1.0) / f.alpha
        for key in family.eps_keys:
            old = getattr(config, key, None)
            if isinstance(old, (int, float)) and not isinstance(old, bool):
                f.config[key] = float(old) * f.alpha * f.alpha
    for pair in family.pairs:
        if not holds(pair, config):
            continue
        for n in names:
            m = re.search(pair.producer, n)
            if not m:
                continue
            consumer = m.expand(pair.consumer)
            if consumer not in mods:
                continue
            largest = max(ranges.outputs.get(n, 0.0) * out.get(n, 1.0),
                          ranges.inputs.get(consumer, 0.0))
            beta = pow2_within(largest, limit)
            if beta == 1.0:
                continue
            out[n] = out.get(n, 1.0) * beta
            inn[consumer] = inn.get(consumer, 1.0) / beta
            f.pairs.append({"producer": n, "consumer": consumer, "beta": beta,
                            "largest": largest, "why": pair.why})
    params = {n: f.alpha for n in alpha_params} if f.alpha != 1.0 else {}
    shapes = {n: tuple(p.shape) for n, p in module.named_parameters(remove_duplicate=False)}
    f.params = []
    for aliases, scale, form in _param_factors(module, mods, out, inn, params, family.norm_form):
        names_ = list(aliases)
        for n in aliases:
            names_ += [x for x in file_names(module, n, shapes[n]) if x not in names_]
        f.params.append((tuple(names_), scale, form, pattern(names_)))
    return f


def pattern(names: List[str]) -> str:
    """The rule pattern that selects a tensor by its names (in memory, and in the files): the
    name itself (a glob of whole components), else one anchored regex; names that differ in one
    numeric component only (one tensor per MoE expert on disk) take ``\\d+`` there."""
    if len(names) == 1:
        return names[0]
    alts = [re.escape(n) for n in names]
    parts = [n.split(".") for n in names[1:]]
    if len(parts) > 2 and len({len(p) for p in parts}) == 1:
        differ = [i for i in range(len(parts[0])) if len({p[i] for p in parts}) > 1]
        if len(differ) == 1 and all(p[differ[0]].isdigit() for p in parts):
            template = list(parts[0])
            template[differ[0]] = "\0"
            alts = [alts[0], re.escape(".".join(template)).replace("\0", r"\d+")]
    return "re:(^|\\.)(" + "|".join(alts) + ")$"


def file_names(module, name: str, shape) -> List[str]:
    """The names a parameter has on disk: transformers' reverse of its loading conversions
    (what ``save_pretrained`` writes), run on a shape-only tensor; the name itself when there
    is no conversion or transformers is not there."""
    try:
        import torch
        from transformers.core_model_loading import revert_weight_conversion

        out = revert_weight_conversion(module, {name: torch.empty(shape, device="meta")})
        return [n for n in out if n != name]
    except Exception:  # not a transformers model, or a transformers without conversions
        return []


def _param_factors(module, mods, out, inn, params, norm_form
                   ) -> List[Tuple[Tuple[str, ...], float, str]]:
    """Each touched parameter's names, factor and form: a linear layer's weight takes its
    output and input factors, its bias the output factor; an embedding's weight and a norm's
    weight (in the family's form) and bias the output factor. A parameter shared by modules
    (tied) must get one factor."""
    aliases: Dict[int, List[str]] = {}
    for name, p in module.named_parameters(remove_duplicate=False):
        aliases.setdefault(id(p), []).append(name)
    chosen: Dict[int, Tuple[float, str, str]] = {}
    for n in sorted(set(out) | set(inn)):
        m = mods[n]
        o, i = out.get(n, 1.0), inn.get(n, 1.0)
        for attr, p in m.named_parameters(recurse=False):
            if not p.is_floating_point():
                continue
            if _is_norm(m):
                factor, form = o, (norm_form if attr == "weight" else "w")
            elif attr == "weight" and not _is_embedding(m):
                factor, form = o * i, "w"
            else:
                factor, form = o, "w"
            if factor == 1.0:
                continue
            full = f"{n}.{attr}"
            prev = chosen.get(id(p))
            if prev is not None and prev[:2] != (factor, form):
                raise UsageError(f"rescale: `{full}` and `{prev[2]}` are one tensor but would get "
                                 f"factors {factor} and {prev[0]}")
            chosen[id(p)] = (factor, form, full)
    named = dict(module.named_parameters())
    for full, factor in params.items():
        chosen[id(named[full])] = (factor, "w", full)
    return [(tuple(aliases[k]), v[0], v[1]) for k, v in chosen.items()]
