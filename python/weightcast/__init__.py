"""weightcast: change the precision of pretrained model weights, safely and at disk speed.

The same engine as the ``weightcast`` command, from Python::

    import weightcast

    # A model folder to float16, norms kept in float32, sharded like the Hub:
    result = weightcast.convert("bert", "bert-f16", to="f16", preset="keep-norms",
                                max_shard_size="2GB")
    print(result.totals, result.tensors[0].to_dtype)

    # A state dict, cast on the way in, read without running any pickle code:
    state = weightcast.load("pytorch_model.bin", dtype="bf16")
    model.load_state_dict(state)

    # Tensors to a file, cast on the way out:
    weightcast.save(model.state_dict(), "model.safetensors", dtype="f16")

    # Mixed precision that runs: linear layers in bf16, the rest in f32, in memory or loaded
    # from a converted file with every tensor in its stored dtype:
    weightcast.cast_module(model, "bf16", only="class:Linear")
    weightcast.load_module(AutoModel.from_config(config), "bert-f16")

Rules (``keep``, ``only``, ``rules``, ``preset``) work as on the command line; they apply in the
order preset, rules, only, keep, and the last rule that matches a tensor decides.

Errors are :class:`Error` subclasses with the command line's one-line messages:
:class:`InvalidFileError` (a file is not what its format requires), :class:`RefusedError`
(a dangerous pickle, values that would overflow) and :class:`UsageError` (bad options).
Every call releases the GIL while it works; Ctrl-C raises ``KeyboardInterrupt`` and leaves
no partial output (an interrupt that arrives after the work has committed its output is raised
saying the output is complete).
"""

from __future__ import annotations

import json
import os
import sys
from typing import Any, Callable, Dict, Iterable, List, Mapping, Optional, Sequence, Union

from . import _weightcast as _native
from ._dtypes import dtype_text as _dtype_text
from ._weightcast import Error, InvalidFileError, RefusedError, UsageError, __version__

__all__ = [
    "convert",
    "inspect",
    "analyze",
    "diff",
    "audit",
    "load",
    "save",
    "runnable",
    "cast_module",
    "load_module",
    "Runnable",
    "profile",
    "Profile",
    "rescale",
    "Rescale",
    "Result",
    "Document",
    "Entry",
    "Error",
    "InvalidFileError",
    "RefusedError",
    "UsageError",
    "__version__",
]

PathLike = Union[str, "os.PathLike[str]"]
Progress = Union[bool, Callable[[int, int], Any], None]


class Entry:
    """One row of a document (a tensor of a plan, an analysis or a diff): its fields as
    attributes (``from``/``to`` also as ``from_dtype``/``to_dtype``); :meth:`to_dict` gives them
    as the command line's ``--json`` prints them."""

    __slots__ = ("_d",)

    def __init__(self, d: Dict[str, Any]):
        self._d = d

    def __getattr__(self, name: str) -> Any:
        d = object.__getattribute__(self, "_d")
        if name in d:
            return d[name]
        if name in ("from_dtype", "to_dtype") and name[:-6] in d:
            return d[name[:-6]]
        raise AttributeError(name)

    def __getitem__(self, key: str) -> Any:
        return self._d[key]

    def to_dict(self) -> Dict[str, Any]:
        return dict(self._d)

    def __repr__(self) -> str:
        keys = [k for k in ("name", "shape", "from", "to", "rule", "snr_db", "verdict") if k in self._d]
        inner = ", ".join(f"{k}={self._d[k]!r}" for k in keys)
        return f"Entry({inner})"


class Document:
    """A command's ``--json`` document: its keys as attributes (lists of rows as
    :class:`Entry`), :meth:`to_dict` for the raw document, :meth:`to_pandas` for its
    ``tensors`` as a DataFrame (pandas needed)."""

    def __init__(self, d: Dict[str, Any]):
        self._d = d

    def __getattr__(self, name: str) -> Any:
        d = self.__dict__.get("_d", {})
        if name not in d:
            raise AttributeError(name)
        v = d[name]
        if isinstance(v, list) and v and all(isinstance(x, dict) for x in v):
            return [Entry(x) for x in v]
        return v

    def __getitem__(self, key: str) -> Any:
        return self._d[key]

    def __contains__(self, key: str) -> bool:
        return key in self._d

    def keys(self):
        return self._d.keys()

    def to_dict(self) -> Dict[str, Any]:
        return json.loads(json.dumps(self._d))

    def to_pandas(self):
        """The ``tensors`` rows as a ``pandas.DataFrame``."""
        try:
            import pandas as pd
        except ImportError as e:  # pragma: no cover - depends on the environment
            raise ImportError("to_pandas() needs pandas: pip install pandas") from e
        return pd.DataFrame(self._d.get("tensors", []))

    def __repr__(self) -> str:
        keys = ", ".join(self._d.keys())
        return f"{type(self).__name__}({keys})"


class Result(Document):
    """What :func:`convert` planned (``dry_run=True``) or did: ``tensors`` (one
    :class:`Entry` per tensor: name, shape, from, to, rule, bytes_before, bytes_after),
    ``totals``, ``files``, ``written`` and ``warnings``, exactly as ``convert --json``."""


def _seq(x: Union[str, Iterable[str], None]) -> List[str]:
    if x is None:
        return []
    if isinstance(x, str):
        return [x]
    return list(x)


def _rules(keep, only, rules, preset) -> List[tuple]:
    out: List[tuple] = [("preset", p) for p in _seq(preset)]
    if rules is not None:
        if isinstance(rules, (str, os.PathLike)):
            out.append(("rules", os.fspath(rules)))
        elif isinstance(rules, Mapping):
            out.extend(("rule", f"{pat}={dt}") for pat, dt in rules.items())
        else:
            out.extend(("rule", r) for r in rules)
    out.extend(("only", p) for p in _seq(only))
    out.extend(("keep", p) for p in _seq(keep))
    return out


def _warn(doc: Dict[str, Any]) -> None:
    import warnings

    for w in doc.pop("_warnings", None) or []:
        warnings.warn(w, stacklevel=3)


def _progress(progress: Progress, what: str):
    """A callable(done, total) for the Rust side, and a closer."""
    if progress is None or progress is False:
        return None, lambda: None
    if callable(progress):
        return progress, lambda: None
    try:
        from tqdm.auto import tqdm

        bar = tqdm(total=0, unit="B", unit_scale=True, desc=what)

        def update(done: int, total: int) -> None:
            if total and bar.total != total:
                bar.total = total
            bar.n = done
            bar.refresh()

        return update, bar.close
    except ImportError:
        last = [-1]

        def update(done: int, total: int) -> None:
            if total:
                pct = int(100 * done / total)
                if pct != last[0]:
                    last[0] = pct
                    bar = "=" * (pct * 30 // 100)
                    sys.stderr.write(f"\r{what} [{bar:<30}] {pct:3d}%")
                    sys.stderr.flush()

        return update, lambda: sys.stderr.write("\n") if last[0] >= 0 else None


def convert(
    src: PathLike,
    dst: PathLike,
    to: Any = None,
    *,
    keep: Union[str, Sequence[str]] = (),
    only: Union[str, Sequence[str]] = (),
    rules: Union[PathLike, Mapping[str, str], Sequence[str], None] = None,
    preset: Union[str, Sequence[str], None] = None,
    on_overflow: str = "error",
    max_underflow: Optional[float] = None,
    auto: Optional[float] = None,
    max_shard_size: Union[int, str, None] = None,
    key: Optional[str] = None,
    inference: bool = False,
    state_dict_only: bool = False,
    strip_prefix: Optional[str] = None,
    dry_run: bool = False,
    force: bool = False,
    progress: Progress = None,
    cast_optimizer: bool = False,
    strict: bool = False,
    strict_rules: bool = False,
    on_quantized: str = "dequantize",
    scale: Optional[str] = None,
    scale_format: Optional[str] = None,
    sync: bool = True,
    part: Optional[str] = None,
    allow: Sequence[str] = (),
    allow_file: Union[PathLike, Sequence[PathLike], None] = None,
) -> Result:
    """Convert ``src`` (a .safetensors file, an index, a model folder, a PyTorch file, or
    remotely ``https://.../model.safetensors``, ``hf://ORG/NAME[@REVISION]`` and
    ``s3://BUCKET/PREFIX``) into ``dst`` (a local path or ``s3://BUCKET/PREFIX``, written by
    multipart uploads, index last), as ``weightcast convert SRC -o DST --to TO``: same
    engine, same defaults, same output bytes.

    ``to`` is a dtype (``"f16"``, ``"bf16"``, ``"f32"``, ``"f8e4m3"``, ``torch.float16``...),
    ``"auto"`` (keep the source precision), ``"nvfp4"`` / ``"mxfp4"`` (linear layers' weights
    in compressed-tensors' packed FP4, scales as llm-compressor's NVFP4A16 / MXFP4A16 presets
    compute them; the rest keeps its dtype), or with ``auto=SNR_DB`` a list of candidates
    (``"f8e4m3,bf16,f16"``). ``rules`` is a TOML rules file, a mapping ``{pattern: dtype}`` or
    a list of ``"PATTERN=DTYPE"``. ``on_overflow`` is ``"error"`` (default: raise
    :class:`RefusedError`, write nothing), ``"keep"``, ``"clamp"`` or ``"allow"``.
    ``dry_run=True`` returns the plan and writes nothing, after every check the run makes: it
    reads the tensors that are cast and raises as the run would (an overflow under ``"error"``,
    an existing ``dst`` without ``force``); ``replaces_existing`` says whether ``dst`` exists.
    ``progress=True`` shows a bar (tqdm
    when installed); a callable gets ``(bytes_done, bytes_total)``. ``part="K/N"`` writes only
    part K of N of a sharded output (run the N parts anywhere, with the same options), and
    ``part="finish"`` then checks them and writes the index: byte-identical to one run.
    ``inference=True`` drops a training checkpoint's training state (optimizer, scheduler,
    AMP scaler, RNG states, gradient buffers) and keeps the rest of a ``.pt`` checkpoint;
    ``state_dict_only=True`` writes the state dict alone. A ``.pt`` output never carries a
    call that :func:`audit` does not allow (raises :class:`RefusedError`, writes nothing)
    unless ``allow=["module.Name", ...]`` (or ``allow_file=``) accepts it; the result's
    ``pickle["loads_with_weights_only"]`` says whether ``torch.load(weights_only=True)``
    loads it.

    >>> r = weightcast.convert("model.safetensors", "model-f16.safetensors", to="f16")
    >>> r.totals["cast"], r.written
    """
    if isinstance(to, (list, tuple)):
        to = ",".join(_dtype_text(t) for t in to)
    cb, close = _progress(progress, "converting")
    try:
        text = _native.convert(
            os.fspath(src),
            os.fspath(dst),
            _dtype_text(to),
            _rules(keep, only, rules, preset),
            on_overflow,
            max_underflow,
            auto,
            None if max_shard_size is None else str(max_shard_size),
            key,
            inference,
            strip_prefix,
            dry_run,
            force,
            cb,
            cast_optimizer,
            strict,
            on_quantized,
            scale,
            scale_format,
            sync,
            strict_rules,
            part,
            state_dict_only,
            list(allow),
            _paths(allow_file),
        )
    finally:
        close()
    doc = json.loads(text)
    _warn(doc)
    return Result(doc)


def inspect(path: PathLike, *, key: Optional[str] = None) -> Document:
    """What ``path`` holds (``inspect --json``): format, tensors (name, dtype, shape, bytes),
    metadata, quantization scheme. Reads headers and pickles only, never tensor data.

    >>> doc = weightcast.inspect("model.safetensors")
    >>> [(t.name, t.dtype) for t in doc.tensors][:3]
    """
    doc = json.loads(_native.inspect(os.fspath(path), key))
    _warn(doc)
    return Document(doc)


def analyze(
    path: PathLike,
    to: Any,
    *,
    keep: Union[str, Sequence[str]] = (),
    only: Union[str, Sequence[str]] = (),
    rules: Union[PathLike, Mapping[str, str], Sequence[str], None] = None,
    preset: Union[str, Sequence[str], None] = None,
    key: Optional[str] = None,
    scale: Optional[str] = None,
    scale_format: str = "compressed-tensors",
    lossy_below: float = 40.0,
    report: Optional[PathLike] = None,
    progress: Progress = None,
) -> Document:
    """What casting ``path`` to ``to`` would cost, per tensor (``analyze --json``): overflow,
    underflow, subnormals, errors, SNR and a verdict, worst first. ``report`` writes the HTML
    report too. ``.tensors`` are :class:`Entry` rows; ``.to_pandas()`` gives a DataFrame.

    >>> a = weightcast.analyze("model.safetensors", "f16")
    >>> worst = a.tensors[0]; worst.name, worst.snr_db
    """
    cb, close = _progress(progress, "analyzing")
    try:
        text = _native.analyze(
            os.fspath(path),
            _dtype_text(to),
            _rules(keep, only, rules, preset),
            key,
            scale,
            scale_format,
            float(lossy_below),
            None if report is None else os.fspath(report),
            cb,
        )
    finally:
        close()
    doc = json.loads(text)
    _warn(doc)
    return Document(doc)


def diff(a: PathLike, b: PathLike, *, tolerance: Optional[float] = None) -> Document:
    """Tensor by tensor comparison of two checkpoints (``diff --json``): names only in one,
    dtype and shape changes, error statistics of common tensors; ``failures`` lists the tensors
    below ``tolerance`` (SNR in dB). Scaled FP8 checkpoints are compared dequantized.

    >>> d = weightcast.diff("model", "model-f16", tolerance=40)
    >>> d.failures, [(t.name, t.snr_db) for t in d.common][:3]
    """
    doc = json.loads(_native.diff(os.fspath(a), os.fspath(b), tolerance))
    _warn(doc)
    return Document(doc)


def _paths(p) -> list:
    if p is None:
        return []
    if isinstance(p, (str, os.PathLike)):
        return [os.fspath(p)]
    return [os.fspath(x) for x in p]


def audit(
    paths: Union[PathLike, Sequence[PathLike]],
    *,
    strict: bool = False,
    allow: Sequence[str] = (),
    allow_file: Union[PathLike, Sequence[PathLike], None] = None,
) -> Document:
    """What the pickles in ``paths`` (files or folders) would import or call if loaded
    (``audit --json``): a verdict per file (dangerous, unknown call, other, clean,
    incomplete, unreadable), each global with its class, use, byte offset and opcode. Nothing
    is run. A call to a global on no allowlist is an "unknown call" and fails the audit;
    ``allow=["mypkg.MyModel", "mypkg.*"]`` or ``allow_file=`` accepts your own classes.

    >>> weightcast.audit("downloads/").failed
    """
    doc = json.loads(_native.audit(_paths(paths), strict, list(allow), _paths(allow_file)))
    _warn(doc)
    return Document(doc)


_NUMPY = {
    "F16": "float16", "F32": "float32", "F64": "float64", "I8": "int8", "I16": "int16",
    "I32": "int32", "I64": "int64", "U8": "uint8", "U16": "uint16", "U32": "uint32",
    "U64": "uint64", "BOOL": "bool", "C64": "complex64", "C128": "complex128",
}
_ML_DTYPES = {"BF16": "bfloat16", "F8_E4M3": "float8_e4m3fn", "F8_E5M2": "float8_e5m2",
              "F8_E4M3FNUZ": "float8_e4m3fnuz", "F8_E5M2FNUZ": "float8_e5m2fnuz",
              "F8_E8M0": "float8_e8m0fnu"}
_TORCH = {
    "F16": "float16", "BF16": "bfloat16", "F32": "float32", "F64": "float64", "I8": "int8",
    "I16": "int16", "I32": "int32", "I64": "int64", "U8": "uint8", "U16": "uint16",
    "U32": "uint32", "U64": "uint64", "BOOL": "bool", "C64": "complex64",
    "C128": "complex128", "F8_E4M3": "float8_e4m3fn", "F8_E5M2": "float8_e5m2",
    "F8_E4M3FNUZ": "float8_e4m3fnuz", "F8_E5M2FNUZ": "float8_e5m2fnuz",
    "F8_E8M0": "float8_e8m0fnu",
}


def _np_dtype(name: str):
    import numpy as np

    if name in _NUMPY:
        return np.dtype(_NUMPY[name])
    try:
        import ml_dtypes  # noqa: F401  (registers bfloat16 and the float8 types)

        return np.dtype(getattr(ml_dtypes, _ML_DTYPES[name]))
    except (ImportError, KeyError):
        raise UsageError(
            f"numpy has no {name} dtype: use framework='pt', another dtype, or install ml_dtypes"
        ) from None


def load(
    path: PathLike,
    *,
    dtype: Any = None,
    keep: Union[str, Sequence[str]] = (),
    only: Union[str, Sequence[str]] = (),
    rules: Union[PathLike, Mapping[str, str], Sequence[str], None] = None,
    preset: Union[str, Sequence[str], None] = None,
    key: Optional[str] = None,
    strip_prefix: Optional[str] = None,
    on_overflow: str = "error",
    framework: str = "pt",
    device: Any = "cpu",
    progress: Progress = None,
) -> Dict[str, Any]:
    """Read a state dict from ``path`` (safetensors, shard sets, model folders, PyTorch zip,
    legacy and TorchScript files, scaled FP8 checkpoints dequantized; ``https://`` safetensors,
    ``hf://ORG/NAME`` repositories and ``s3://BUCKET/PREFIX`` by range requests) into ``{name: tensor}``,
    cast to ``dtype`` on the way in (``None``: as stored) with the same rules as
    :func:`convert`.

    PyTorch files are read by weightcast's own pickle engine: nothing a pickle names is
    imported or called, and a file whose pickle references dangerous globals raises
    :class:`RefusedError`. Tensors are built on buffers Rust filled (no extra copy); views
    and tied weights of a PyTorch file keep sharing memory. ``framework="np"`` returns numpy
    arrays (bfloat16 and float8 need ``ml_dtypes``).

    >>> model.load_state_dict(weightcast.load("pytorch_model.bin", dtype="f16"))
    """
    if framework not in ("pt", "np"):
        raise UsageError(f"framework={framework!r}: use 'pt' (torch) or 'np' (numpy)")
    loader = _native.Loader(
        os.fspath(path),
        _dtype_text(dtype),
        _rules(keep, only, rules, preset),
        key,
        on_overflow,
        strip_prefix,
    )
    import warnings

    for w in loader.warnings:
        warnings.warn(w, stacklevel=2)
    views = loader.views()
    if framework == "np":
        np_types = {v[2]: _np_dtype(v[2]) for v in views}
    cb, close = _progress(progress, "loading")
    try:
        buffers, clamped = loader.fill(cb)
    finally:
        close()
    if clamped:
        warnings.warn(
            f"{sum(c for _, c in clamped)} values clamped to the largest finite value in "
            f"{len(clamped)} tensor(s)",
            stacklevel=2,
        )
    out: Dict[str, Any] = {}
    if framework == "pt":
        import torch

        bases: Dict[tuple, Any] = {}
        for name, b, dt, shape, strides, offset in views:
            tdt = getattr(torch, _TORCH[dt])
            base = bases.get((b, dt))
            if base is None:
                raw = buffers[b]
                if len(raw) == 0:
                    base = torch.empty(0, dtype=tdt)
                else:
                    base = torch.frombuffer(raw, dtype=torch.uint8).view(tdt)
                bases[(b, dt)] = base
            if base.numel() == 0:
                out[name] = torch.empty(shape, dtype=tdt)
            else:
                out[name] = base.as_strided(shape, strides, offset)
        if str(device) != "cpu":
            # Copies to the device: tensors that shared a buffer no longer share memory there.
            out = {name: t.to(device) for name, t in out.items()}
        return out
    import numpy as np

    for name, b, dt, shape, strides, offset in views:
        ndt = np_types[dt]
        base = np.frombuffer(buffers[b], dtype=np.uint8).view(ndt) if len(buffers[b]) else \
            np.empty(0, dtype=ndt)
        item = ndt.itemsize
        if base.size == 0:
            out[name] = np.empty(shape, dtype=ndt)
        else:
            out[name] = np.lib.stride_tricks.as_strided(
                base[offset:], shape=shape, strides=[s * item for s in strides]
            )
    return out


def _tensor_memory(t: Any):
    """(dtype name, shape, address, byte length, owner) of a torch tensor or numpy array: the
    memory weightcast reads it from, without a copy (one is made only for a tensor that is not
    a contiguous CPU tensor already; `owner` keeps that memory alive)."""
    mod = type(t).__module__
    if mod.startswith("torch"):
        t = t.detach()
        if t.device.type != "cpu":
            t = t.cpu()
        t = t.contiguous()
        name = str(t.dtype)[len("torch."):]
        return name, list(t.shape), t.data_ptr(), t.numel() * t.element_size(), t
    import numpy as np

    a = np.ascontiguousarray(t)
    if not a.dtype.isnative and a.dtype.itemsize > 1:
        a = a.astype(a.dtype.newbyteorder("="))
    return a.dtype.name, list(a.shape), a.__array_interface__["data"][0], a.nbytes, a


def save(
    tensors: Mapping[str, Any],
    path: PathLike,
    *,
    dtype: Any = None,
    keep: Union[str, Sequence[str]] = (),
    only: Union[str, Sequence[str]] = (),
    rules: Union[PathLike, Mapping[str, str], Sequence[str], None] = None,
    preset: Union[str, Sequence[str], None] = None,
    metadata: Optional[Mapping[str, str]] = None,
    max_shard_size: Union[int, str, None] = None,
    on_overflow: str = "error",
    force: bool = True,
    progress: Progress = None,
) -> Result:
    """Write torch tensors or numpy arrays to ``path``: a ``.safetensors`` file, a
    ``*.safetensors.index.json`` shard set, or a ``.pt`` file that
    ``torch.load(weights_only=True)`` reads; cast to ``dtype`` on the way out (``None``: as
    they are) with the same rules as :func:`convert`. The output appears whole or not at all.
    The tensors are read where they are, streamed through the cast into the output: no copy
    of the model, no temporary file.

    >>> weightcast.save(model.state_dict(), "model.safetensors", dtype="bf16")
    """
    dst = os.fspath(path)
    os.makedirs(os.path.dirname(os.path.abspath(dst)), exist_ok=True)
    parts = []
    for name, t in tensors.items():
        dt, shape, addr, n, owner = _tensor_memory(t)
        parts.append((str(name), dt, shape, addr, n, owner))
    to = _dtype_text(dtype)
    if to is None:
        # As they are: every tensor keeps its dtype (and a file without floating tensors has
        # nothing to cast).
        floating = any(p[1].startswith(("float", "bfloat")) for p in parts)
        to = "auto" if floating else "f32"
    meta = [(str(k), str(v)) for k, v in (metadata or {}).items()]
    cb, close = _progress(progress, "saving")
    try:
        text = _native.save(
            dst,
            parts,
            meta,
            to,
            _rules(keep, only, rules, preset),
            on_overflow,
            None if max_shard_size is None else str(max_shard_size),
            force,
            cb,
        )
    finally:
        close()
    doc = json.loads(text)
    _warn(doc)
    return Result(doc)


from ._modules import Runnable, cast_module, load_module, runnable  # noqa: E402
from ._profile import Profile, profile  # noqa: E402
from ._rescale import Rescale, rescale  # noqa: E402
