"""The candidates: what each one names (a dtype, a rule dict or a rules file) as
:func:`weightcast.cast_module` keywords, the dtype it casts to, the module cast as it says, and
what a module's weights weigh."""

import copy
import functools
import os
from typing import Any, Dict, Optional, Tuple, Union

from .._dtypes import dtype_text
from .._modules import _cast_inputs, cast_module, runnable
from .._weightcast import torch_dtype_name

Candidate = Union[str, Dict[str, Any], "os.PathLike[str]"]


def parse(c: Candidate) -> Tuple[str, Dict[str, Any]]:
    """(name, cast_module keywords) of a candidate: a dtype name, a rule dict, a rules file."""
    if isinstance(c, dict):
        kw = dict(c)
        to = kw.pop("to", None)
        bits = [str(to)] + [f"{k}={v}" for k, v in kw.items() if k != "rescale"]
        if kw.get("rescale"):
            bits.append("rescaled")
        return kw.pop("name", None) or " ".join(bits), {"to": to, **kw}
    s = os.fspath(c)
    if s.endswith(".toml") or os.path.isfile(s):
        return os.path.basename(s), {"to": None, "rules": s}
    return s, {"to": s}


def target_dtype(kw: Dict[str, Any]) -> Any:
    """The torch dtype a candidate casts to by default (for headroom and sensitivity)."""
    import torch

    to = dtype_text(kw.get("to"))
    if to is None:
        return None  # a rules file decides; its candidate's dtype is read once it is built
    # Every spelling convert accepts, parsed by the same parser (a bad one is its UsageError).
    return getattr(torch, torch_dtype_name(to))


def build(module, kw: Dict[str, Any]):
    """A copy of `module` cast as the candidate says (the reference is left as it is)."""
    cand = copy.deepcopy(module)
    if kw.get("rescale") is not None:
        # A rescale candidate (a :class:`~weightcast.Rescale` the profile computed): its factors
        # applied in the module's own dtype first, then the cast, as ``convert`` does both.
        kw["rescale"].apply(cand)
    cast_module(cand, kw.get("to"), keep=kw.get("keep", ()), only=kw.get("only", ()),
                rules=kw.get("rules"), preset=kw.get("preset"),
                on_overflow=kw.get("on_overflow", "allow"))
    d = dominant_dtype(cand)
    if not runnable(cand).mixed and d is not None:
        # One dtype throughout: the reference's floating inputs (f32 images) enter in it.
        cand.register_forward_pre_hook(functools.partial(_cast_inputs, d), with_kwargs=True)
    return cand


def weight_bytes(module) -> int:
    """The bytes of a module's parameters and buffers, tied tensors counted once."""
    seen, n = set(), 0
    for t in list(module.parameters()) + list(module.buffers()):
        key = (t.untyped_storage().data_ptr(), t.storage_offset())
        if key not in seen:
            seen.add(key)
            n += t.numel() * t.element_size()
    return n


def dominant_dtype(module) -> Optional[Any]:
    """The floating dtype that holds the most of a module's parameters (None without any)."""
    sizes: Dict[Any, int] = {}
    for p in module.parameters():
        if p.is_floating_point():
            sizes[p.dtype] = sizes.get(p.dtype, 0) + p.numel()
    return max(sizes, key=sizes.get) if sizes else None
