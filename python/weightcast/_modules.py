"""Mixed precision that runs in PyTorch: :func:`runnable` makes a module whose parameters and
buffers have different floating dtypes run; :func:`cast_module` casts a module in memory with
the rules of ``convert``; :func:`load_module` loads any input ``convert`` reads into a module,
every tensor in its stored dtype."""

import functools
import itertools
import json
import threading
import weakref
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple, Union

from . import _weightcast as _native

# Modules made runnable, and their handles (weak: a module that goes away takes its entry).
_ACTIVE: "weakref.WeakKeyDictionary[Any, Runnable]" = weakref.WeakKeyDictionary()
# The promotion modes entered by the roots being run, per thread (a root may run inside
# another's forward).
_LOCAL = threading.local()


def _floating(tensors) -> List[Any]:
    return [t for t in tensors if t is not None and t.is_floating_point()]


def _own_dtype(module) -> Optional[Any]:
    """The dtype a module computes in: its own floating weight's, else the one most of its own
    floating parameters (then buffers) have; None for a module without floating tensors of
    its own."""
    weight = module._parameters.get("weight")
    if weight is not None and weight.is_floating_point():
        return weight.dtype
    for group in (module._parameters.values(), module._buffers.values()):
        own = _floating(group)
        if own:
            sizes: Dict[Any, int] = {}
            for t in own:
                sizes[t.dtype] = sizes.get(t.dtype, 0) + t.numel()
            return max(sizes, key=sizes.get)
    return None


def _map_floating(obj, fn):
    """`obj` with every floating tensor in it (through tuples, lists and dicts) replaced by
    `fn(tensor)`; the same object where nothing changes."""
    import torch

    if isinstance(obj, torch.Tensor):
        return fn(obj) if obj.is_floating_point() else obj
    if isinstance(obj, (list, tuple)):
        items = [_map_floating(x, fn) for x in obj]
        if all(a is b for a, b in zip(items, obj)):
            return obj
        if isinstance(obj, tuple) and hasattr(obj, "_fields"):  # a namedtuple
            return type(obj)(*items)
        return type(obj)(items)
    if isinstance(obj, dict):
        items = {k: _map_floating(v, fn) for k, v in obj.items()}
        if all(items[k] is obj[k] for k in obj):
            return obj
        return type(obj)(items) if type(obj) is not dict else items
    return obj


def _floating_dtypes(obj, found: set) -> None:
    import torch

    if isinstance(obj, torch.Tensor):
        if obj.is_floating_point():
            found.add(obj.dtype)
    elif isinstance(obj, (list, tuple)):
        for x in obj:
            _floating_dtypes(x, found)
    elif isinstance(obj, dict):
        for x in obj.values():
            _floating_dtypes(x, found)


def _is_norm(module) -> bool:
    """A normalization layer (torch's, or a model's own `...Norm` class such as T5's)."""
    import torch.nn as nn

    kinds = (nn.modules.batchnorm._NormBase, nn.LayerNorm, nn.GroupNorm, nn.LocalResponseNorm)
    if hasattr(nn, "RMSNorm"):
        kinds += (nn.RMSNorm,)
    return isinstance(module, kinds) or type(module).__name__.endswith("Norm")


def _cast_inputs(dtype, module, args, kwargs):
    """Forward pre-hook: floating inputs in the module's dtype (integer and bool untouched)."""
    cast = functools.partial(_to_dtype, dtype)
    new_args, new_kwargs = _map_floating(args, cast), _map_floating(kwargs, cast)
    if new_args is args and new_kwargs is kwargs:
        return None
    return new_args, new_kwargs


def _to_dtype(dtype, t):
    return t if t.dtype == dtype else t.to(dtype)


def _widen(dtype, t):
    """`t` in `dtype` when that is wider (more range and bits); as it is otherwise."""
    import torch

    if t.dtype == dtype or torch.promote_types(t.dtype, dtype) != dtype:
        return t
    return t.to(dtype)


def _widen_inputs(dtype, module, args, kwargs):
    """Forward pre-hook of a normalization layer: narrower floating inputs widened to its
    dtype; wider ones (a residual stream kept in f32 beyond f16's range) pass as they are,
    since its statistics need their range (torch's norms promote, T5's computes in f32)."""
    cast = functools.partial(_widen, dtype)
    new_args, new_kwargs = _map_floating(args, cast), _map_floating(kwargs, cast)
    if new_args is args and new_kwargs is kwargs:
        return None
    return new_args, new_kwargs


@functools.lru_cache(maxsize=None)
def _promote_mode():
    import torch

    class Promote(torch.overrides.TorchFunctionMode):
        """Inside a runnable module's forward: an operation that refuses operands of different
        floating dtypes (matmul, bmm, linear, attention, ...) runs again with them promoted
        to the widest (as `torch.promote_types` says). Operations that work are not touched:
        nothing is converted unless torch refused."""

        def __torch_function__(self, func, types, args=(), kwargs=None):
            kwargs = kwargs or {}
            try:
                return func(*args, **kwargs)
            except RuntimeError as refused:
                found: set = set()
                _floating_dtypes(args, found)
                _floating_dtypes(kwargs, found)
                name = getattr(func, "__name__", "")
                if len(found) < 2 or name.endswith("_"):
                    raise  # not a dtype mismatch, or in place: the caller's tensor must stay
                to = functools.reduce(torch.promote_types, found)
                cast = functools.partial(_to_dtype, to)
                try:
                    return func(*_map_floating(args, cast), **_map_floating(kwargs, cast))
                except Exception:
                    raise refused from None

    return Promote


def _enter(module, args):
    mode = _promote_mode()()
    mode.__enter__()
    stack = getattr(_LOCAL, "modes", None)
    if stack is None:
        stack = _LOCAL.modes = []
    stack.append(mode)


def _exit(module, args, output):
    stack = getattr(_LOCAL, "modes", None)
    if stack:
        stack.pop().__exit__(None, None, None)


class Runnable:
    """What :func:`runnable` did to a module: :meth:`remove` undoes it. ``mixed`` says whether
    the module has floating tensors of several dtypes (when not, nothing was done)."""

    def __init__(self, module, hooks: list, mixed: bool):
        self._module = weakref.ref(module)
        self._hooks = hooks
        self.mixed = mixed

    def remove(self) -> None:
        """Removes the hooks: the module is as it was before :func:`runnable`."""
        for h in self._hooks:
            h.remove()
        self._hooks = []
        module = self._module()
        if module is not None and _ACTIVE.get(module) is self:
            del _ACTIVE[module]

    def __enter__(self) -> "Runnable":
        return self

    def __exit__(self, *exc) -> None:
        self.remove()

    def __repr__(self) -> str:
        return f"<weightcast.Runnable mixed={self.mixed} hooks={len(self._hooks)}>"


def runnable(module) -> Runnable:
    """Make ``module`` run although its parameters and buffers have different floating dtypes
    (linear layers in bf16, norms and convolutions in f32, ...): each module with floating
    tensors of its own computes in their dtype (floating inputs are cast on entry; integer and
    bool inputs untouched; a normalization layer only widens narrower inputs, since its
    statistics need a wider input's range), and floating tensors of different dtypes that meet in a parent's
    forward (matmul, attention, concatenation) are promoted instead of raising. Idempotent;
    nothing is done to a module whose floating tensors all have one dtype. Works on CPU and
    CUDA, under ``torch.no_grad`` and ``torch.inference_mode``. Returns a handle whose
    ``remove()`` undoes it.

    >>> model = torch.load("resnet18-bf16-fc.pt", weights_only=False)
    >>> weightcast.runnable(model)
    >>> model(images)
    """
    handle = _ACTIVE.get(module)
    if handle is not None:
        return handle
    dtypes = {t.dtype for t in _floating(itertools.chain(module.parameters(), module.buffers()))}
    if len(dtypes) <= 1:
        handle = Runnable(module, [], False)
        _ACTIVE[module] = handle
        return handle
    hooks = []
    for m in module.modules():
        d = _own_dtype(m)
        if d is not None:
            hook = _widen_inputs if _is_norm(m) else _cast_inputs
            hooks.append(m.register_forward_pre_hook(functools.partial(hook, d),
                                                     with_kwargs=True))
    hooks.append(module.register_forward_pre_hook(_enter, prepend=True))
    hooks.append(module.register_forward_hook(_exit, always_call=True))
    handle = Runnable(module, hooks, True)
    _ACTIVE[module] = handle
    return handle


def _class_name(m) -> str:
    t = type(m)
    return f"{t.__module__}.{t.__qualname__}"


def _state_tensors(module) -> List[Tuple[str, Any, Any, str, bool]]:
    """(state-dict name, tensor, owning module, attribute, is a parameter) for each tensor of
    the module's state dict, each tensor once (a tied weight under its first name)."""
    seen = set()
    out = []
    for name, t in module.state_dict(keep_vars=True).items():
        if id(t) in seen:
            continue
        seen.add(id(t))
        prefix, _, attr = name.rpartition(".")
        owner = module.get_submodule(prefix) if prefix else module
        out.append((name, t, owner, attr, attr in owner._parameters))
    return out


def _as_memory(name: str, t) -> tuple:
    """(name, dtype, shape, address, bytes, owner) of a tensor, for the native planner."""
    t = t.detach()
    if t.device.type != "cpu":
        t = t.cpu()
    t = t.contiguous()
    return (name, str(t.dtype)[len("torch."):], list(t.shape), t.data_ptr(),
            t.numel() * t.element_size(), t)


# The config keys that hold a norm's epsilon: a module built from the config copies the value
# into its norms' `eps` / `variance_epsilon`, which an edit of the key must follow.
_EPS_KEYS = ("rms_norm_eps", "layer_norm_eps", "layer_norm_epsilon", "norm_eps")


def _check_config(module, edits: Mapping[str, Any]) -> None:
    """Refuses config edits (a rules file's ``[config]``) the module cannot take, before
    anything changes: a module without ``config``, or a key its config does not have (as
    ``convert`` refuses for a ``config.json``)."""
    from . import UsageError

    if not edits:
        return
    cfg = getattr(module, "config", None)
    if cfg is None:
        raise UsageError(f"the rules set config keys ({', '.join(edits)}) but the module has no "
                         "`config` to edit; nothing was changed")
    for key in edits:
        if not hasattr(cfg, key):
            raise UsageError(f"the module's config has no `{key}` (a rules file's [config] "
                             "sets keys the config already has); nothing was changed")


def _apply_config(module, edits: Mapping[str, Any]) -> None:
    """Sets each key on ``module.config``; for an epsilon key, every submodule's ``eps`` /
    ``variance_epsilon`` that holds the config's old value takes the new one."""
    if not edits:
        return
    cfg = module.config
    for key, value in edits.items():
        old = getattr(cfg, key)
        setattr(cfg, key, value)
        if key not in _EPS_KEYS:
            continue
        for m in module.modules():
            for attr in ("eps", "variance_epsilon"):
                v = getattr(m, attr, None)
                if isinstance(v, (int, float)) and not isinstance(v, bool) and v == old:
                    setattr(m, attr, value)


def _cast_value(t, row: Mapping[str, Any], dtype, clamp: bool):
    """The tensor a plan row writes for `t`, as ``convert`` writes it: scaled in f32 first
    when the row has a ``scale`` (``(t.float() * scale).to(dtype)``, or with form ``1+w``
    ``(scale * (1 + t.float()) - 1).to(dtype)``), clamped under ``on_overflow="clamp"``."""
    import torch

    src = t.detach()
    scale = row.get("scale")
    if scale is None:
        new = src
        big = torch.finfo(dtype).max
    else:
        x = src.float()
        new = scale * (1 + x) - 1 if row.get("form") == "1+w" else x * scale
        # the products are f32: a finite value they take beyond f32's range clamps to the
        # target's largest finite value that f32 holds
        big = min(torch.finfo(dtype).max, torch.finfo(torch.float32).max)
    if clamp:
        new = torch.where(torch.isfinite(src), new.clamp(-big, big), new)
    return new.to(dtype)


def cast_module(
    module,
    to: Any,
    *,
    keep: Union[str, Sequence[str]] = (),
    only: Union[str, Sequence[str]] = (),
    rules: Union[Any, Mapping[str, str], Sequence[str], None] = None,
    preset: Union[str, Sequence[str], None] = None,
    on_overflow: str = "error",
    dry_run: bool = False,
):
    """Cast ``module`` in memory with the rules of :func:`convert`: the same rules engine,
    names (state-dict names), ``class:``/``kind:`` patterns, presets and ``on_overflow``
    policy, each tensor cast as ``tensor.to(dtype)`` (bit-identical to ``convert`` writing
    it); then :func:`runnable`. Tied weights stay tied. Returns the module, or with
    ``dry_run=True`` the plan (as ``convert --dry-run --json``) and changes nothing.

    A rules file's ``scale`` multiplies a tensor as ``convert`` does,
    ``(t.float() * scale).to(dtype)`` (form ``1+w``: ``(scale * (1 + t.float()) - 1)``),
    a tied Parameter once; its ``[config]`` keys are set on ``module.config`` (a module
    without one, or a key its config lacks, is refused), and for an epsilon key
    (``rms_norm_eps``, ``layer_norm_eps``, ``layer_norm_epsilon``, ``norm_eps``) every
    submodule's ``eps`` / ``variance_epsilon`` equal to the old value takes the new one.

    >>> weightcast.cast_module(model, "bf16", only="class:Linear")
    >>> model(x)   # linear layers in bf16, the rest in f32
    """
    import torch

    from . import Result, _dtype_text, _rules, _warn, _TORCH

    entries = _state_tensors(module)
    parts = [_as_memory(name, t) for name, t, _, _, _ in entries]
    classes = [_class_name(owner) for _, _, owner, _, _ in entries]
    text = _native.plan_memory(parts, classes, _dtype_text(to), _rules(keep, only, rules, preset),
                               on_overflow)
    del parts
    doc = json.loads(text)
    _warn(doc)
    edits = doc.get("config") or {}
    _check_config(module, edits)
    if dry_run:
        return Result(doc)
    by_name = {e[0]: e for e in entries}
    with torch.no_grad():
        for row in doc["tensors"]:
            if not row["cast"]:
                continue
            name, t, owner, attr, is_param = by_name[row["name"]]
            dtype = getattr(torch, _TORCH[row["to"]])
            new = _cast_value(t, row, dtype, on_overflow == "clamp")
            if is_param:
                t.data = new  # the same Parameter: tied modules keep sharing it
            else:
                owner._buffers[attr] = new
    _apply_config(module, edits)
    runnable(module)
    return module


def load_module(module, source: Any, *, strict: bool = True, key: Optional[str] = None):
    """Load ``source`` (any input :func:`convert` reads: a file, a folder, a state dict file,
    ``https://``, ``hf://``, ``s3://``) into ``module`` with every tensor in its stored dtype
    (not the module's: a checkpoint whose norms were kept in f32 keeps them), then
    :func:`runnable`. Read by weightcast's own pickle engine: nothing in the file runs.
    ``strict`` raises :class:`UsageError` for missing or unexpected names, as
    ``load_state_dict`` does; a tied weight stored once satisfies both its names.

    >>> model = AutoModel.from_config(AutoConfig.from_pretrained(folder))
    >>> weightcast.load_module(model, folder)
    """
    import torch

    from . import UsageError, load

    sd = load(source, key=key)
    required = module.state_dict(keep_vars=True)
    # A buffer the module does not save (transformers' `position_ids`) may still be in a file
    # written by an older version: it is loaded, not required.
    wanted = dict(required)
    for name, b in module.named_buffers():
        wanted.setdefault(name, b)
    unexpected = [k for k in sd if k not in wanted]
    given = {id(wanted[k]) for k in sd if k in wanted}
    missing = [k for k, t in required.items() if id(t) not in given]
    if strict and (missing or unexpected):
        parts = []
        for what, names in (("missing", missing), ("unexpected", unexpected)):
            if names:
                more = f" and {len(names) - 5} more" if len(names) > 5 else ""
                parts.append(f"{what} {', '.join(names[:5])}{more}")
        raise UsageError(f"{source}: the names do not match the module: {'; '.join(parts)} "
                         "(strict=False loads what matches); nothing was loaded")
    for name, value in sd.items():
        t = wanted.get(name)
        if t is not None and tuple(t.shape) != tuple(value.shape):
            raise UsageError(f"{source}: `{name}` has shape {list(value.shape)}, the module's "
                             f"{list(t.shape)}; nothing was loaded")
    with torch.no_grad():
        for name, value in sd.items():
            t = wanted.get(name)
            if t is None:
                continue
            value = value.to(t.device)
            prefix, _, attr = name.rpartition(".")
            owner = module.get_submodule(prefix) if prefix else module
            if attr in owner._parameters:
                t.data = value  # the same Parameter: tied modules keep sharing it
            else:
                owner._buffers[attr] = value
    runnable(module)
    return module
