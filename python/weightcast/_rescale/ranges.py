"""Activation ranges on the user's batches: per module, the largest finite magnitude of its
first input and of its outputs (forward hooks), and how many non-finite values its outputs held.
"""

import functools
import math
from typing import Any, Dict, List

from .._profile.measure import Accuracy
from .._profile.outputs import call, detach, leaves


def _largest(tensors) -> float:
    import torch

    m = 0.0
    for t in tensors:
        a = t.detach().abs()
        a = a[torch.isfinite(a)]
        if a.numel():
            m = max(m, float(a.max().float()))
    return m


def _nonfinite(tensors) -> int:
    import torch

    return sum(int((~torch.isfinite(t.detach())).sum()) for t in tensors)


class Ranges:
    """Hooks on every module of `module`: ``inputs[name]`` (max |x| of the first floating input),
    ``outputs[name]`` (max |x| over its floating outputs), ``nonfinite[name]``."""

    def __init__(self, module):
        self.inputs: Dict[str, float] = {}
        self.outputs: Dict[str, float] = {}
        self.nonfinite: Dict[str, int] = {}
        self.order: List[str] = []
        self._handles = []
        for name, m in module.named_modules():
            if not name:
                continue
            self._handles.append(m.register_forward_pre_hook(
                functools.partial(self._pre, name), with_kwargs=True))
            self._handles.append(m.register_forward_hook(functools.partial(self._post, name)))

    def _pre(self, name, module, args, kwargs):
        first = [t for _, t in leaves(list(args[:1]) or [kwargs.get("hidden_states")])]
        if first:
            self.inputs[name] = max(self.inputs.get(name, 0.0), _largest(first[:1]))

    def _post(self, name, module, args, output):
        outs = [t for _, t in leaves(output)]
        if not outs:
            return
        if name not in self.outputs:
            self.order.append(name)
        self.outputs[name] = max(self.outputs.get(name, 0.0), _largest(outs))
        self.nonfinite[name] = self.nonfinite.get(name, 0) + _nonfinite(outs)

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []

    def largest(self, name: str) -> float:
        """The larger of a module's input and output magnitudes."""
        return max(self.inputs.get(name, 0.0), self.outputs.get(name, 0.0))


def run(module, batches: List[Any], watch: bool = True):
    """The module's outputs on every batch (detached float32 leaves) and, with `watch`, its
    :class:`Ranges`."""
    import torch

    ranges = Ranges(module) if watch else None
    outs = []
    try:
        with torch.no_grad():
            for b in batches:
                outs.append(detach(call(module, b)))
    finally:
        if ranges is not None:
            ranges.remove()
    return outs, ranges


def compare(ref, got) -> Dict[str, Any]:
    """Outputs against the reference's, as profile measures a candidate (its
    :class:`~weightcast._profile.measure.Accuracy`): max relative difference over every
    floating output (max |got - ref| over max |ref|), non-finite values where the reference is
    finite, the cosine of the first output (the worst batch) and its top-1 agreement."""
    acc = Accuracy()
    for r, g in zip(ref, got):
        acc.add(r, g, 0)
    cos = acc.cosines
    return {
        "max_rel_diff": acc.max_abs / acc.ref_max if acc.ref_max else 0.0,
        "nonfinite": acc.nonfinite,
        "cosine": min(cos) if all(c == c for c in cos) else math.nan,
        "top1": sum(acc.top1) / len(acc.top1) if acc.top1 else None,
    }
