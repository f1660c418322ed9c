"""Batches and outputs: a module run on one batch (a tensor, a tuple/list of arguments or a dict
of keywords), and the floating tensors of what it returns, with their paths."""

from typing import Any, Iterable, List, Tuple


def call(module, batch):
    """Runs `module` on a batch: a tensor, a tuple/list of arguments, or a dict of keywords."""
    if isinstance(batch, dict):
        return module(**batch)
    if isinstance(batch, (tuple, list)):
        return module(*batch)
    return module(batch)


def leaves(out, path: str = "") -> List[Tuple[str, Any]]:
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
        found.extend(leaves(v, f"{path}.{k}" if path else str(k)))
    return found


def batch_size(batch) -> int:
    """The first dimension of a batch's first tensor with one (1 when none has)."""
    import torch

    for t in _tensors(batch):
        if isinstance(t, torch.Tensor) and t.dim() > 0:
            return t.shape[0]
    return 1


def _tensors(obj):
    """Every tensor of a batch (any nesting of tuples, lists and dicts), in order."""
    import torch

    if isinstance(obj, torch.Tensor):
        yield obj
    elif isinstance(obj, dict):
        for v in obj.values():
            yield from _tensors(v)
    elif isinstance(obj, (tuple, list)):
        for v in obj:
            yield from _tensors(v)


def detach(out) -> List[Tuple[str, Any]]:
    """The floating leaves of an output, detached, as float32 copies on the CPU."""
    return [(p, t.detach().float().cpu().clone()) for p, t in leaves(out)]
