"""Every cast weightcast makes is bit-identical to torch's own CPU `tensor.to(dtype)`.

Inputs: every f16 and bf16 bit pattern, every fp8 code, f32 values at and around every rounding
and overflow boundary of the narrow types, special values, and millions of random f32 (random
bit patterns and random normals).

NaN must stay NaN; its bit pattern is not compared, because torch itself is not consistent about
it: the same input gives different NaN bits depending on the tensor's length (f64 -> bf16 gives
0x7fc0 for one element and 0xffff for a hundred; f16 -> f32 gives 0x7fffffff or the payload).
"""

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from conftest import run

DTYPES = {
    "f64": torch.float64,
    "f32": torch.float32,
    "f16": torch.float16,
    "bf16": torch.bfloat16,
    "f8e4m3": torch.float8_e4m3fn,
    "f8e5m2": torch.float8_e5m2,
}
INT_VIEW = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def bits(t: torch.Tensor) -> np.ndarray:
    return t.contiguous().view(INT_VIEW[t.element_size()]).numpy()


def all_patterns(dtype) -> torch.Tensor:
    size = torch.empty((), dtype=dtype).element_size()
    n = 1 << (8 * size)
    raw = torch.arange(n, dtype=torch.int64)
    raw = raw.to(torch.uint8) if size == 1 else raw.to(torch.int32).to(torch.int16)
    return raw.view(dtype)


def f32_boundaries() -> torch.Tensor:
    """f32 values at, just around and exactly between consecutive values of each narrow type,
    plus the overflow thresholds."""
    parts = []
    for dt in (torch.float16, torch.bfloat16, torch.float8_e4m3fn, torch.float8_e5m2,
               torch.float8_e4m3fnuz, torch.float8_e5m2fnuz, torch.float8_e8m0fnu):
        v = all_patterns(dt).float()
        v = v[torch.isfinite(v)].unique()
        mid = (v[:-1].double() + v[1:].double()) / 2  # exact ties (representable in f32 for these)
        m32 = mid.float()
        up = torch.nextafter(m32, torch.tensor(float("inf")))
        down = torch.nextafter(m32, torch.tensor(float("-inf")))
        parts += [v, m32, up, down]
    specials = torch.tensor(
        [0.0, -0.0, float("inf"), float("-inf"), float("nan"), 65504.0, 65519.99, 65520.0, 65536.0,
         448.0, 464.0, 480.0, 1e6, 57344.0, 61440.0, 3.3895314e38, 3.4028235e38, 1e-45, -1e-45,
         2.0**-24, 2.0**-25, 2.0**-9, 2.0**-10, 2.0**-16, 2.0**-17, 240.0, 247.9, 248.0, 256.0,
         2.0**-11, 2.0**-12, 2.0**-18, 2.0**-126, 2.0**-127, 1.5 * 2.0**-127, 2.0**127,
         1.5 * 2.0**127],
        dtype=torch.float32,
    )
    # NaNs with payloads and signs, and signalling NaNs.
    nan_bits = torch.tensor([0x7FC00000, 0xFFC00000, 0x7F800001, 0xFFC12345, 0x7FBFFFFF],
                            dtype=torch.int64).to(torch.int32)
    parts += [specials, -specials, nan_bits.view(torch.float32)]
    return torch.cat(parts)


def f32_random(n: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    raw = torch.randint(-(2**31), 2**31, (n,), generator=g, dtype=torch.int64).to(torch.int32)
    normals = torch.randn(n, generator=g) * torch.exp(torch.randn(n, generator=g) * 6)
    return torch.cat([raw.view(torch.float32), normals])


def inputs_for(src: str) -> dict:
    dt = DTYPES[src]
    if src == "f32":
        return {"boundaries": f32_boundaries(), "random": f32_random(2_000_000, 1)}
    if src == "f64":
        g = torch.Generator().manual_seed(2)
        x = torch.randn(1_000_000, generator=g, dtype=torch.float64) * torch.exp(
            torch.randn(1_000_000, generator=g, dtype=torch.float64) * 8)
        # f64 values just off the f32 ties of f16: torch rounds twice (f64 -> f32 -> f16).
        b = f32_boundaries().double()
        return {"random": x, "boundaries": torch.cat([b, b * (1 + 2**-40), b * (1 - 2**-40)])}
    return {"all_patterns": all_patterns(dt)}


@pytest.mark.parametrize("src", list(DTYPES))
@pytest.mark.parametrize("dst", list(DTYPES))
def test_cast_matches_torch(tmp_path, src, dst):
    tensors = inputs_for(src)
    # An odd length and a one-element tensor exercise the kernels' tails.
    first = next(iter(tensors.values()))
    tensors["odd"] = first[:1001].clone()
    tensors["one"] = first[5:6].clone()
    convert_and_compare(tmp_path, tensors, src, dst, DTYPES[dst])


def convert_and_compare(tmp_path, tensors, src, dst, dtype):
    """Converts `tensors` with weightcast and compares every element's bits with torch's."""
    inp, out = tmp_path / "in.safetensors", tmp_path / "out.safetensors"
    save_file(tensors, inp)
    # `allow`: cast out-of-range values exactly as torch does (inf, or fp8 saturation).
    run("convert", inp, "-o", out, "--to", dst, "-q", "--on-overflow", "allow")
    got = load_file(out)
    for name, x in tensors.items():
        want = x.to(dtype)
        assert got[name].dtype == want.dtype
        g, w = bits(got[name]), bits(want)
        nan_want = torch.isnan(want.float()).numpy()
        nan_got = torch.isnan(got[name].float()).numpy()
        assert (nan_want == nan_got).all(), f"{src}->{dst} `{name}`: NaN positions differ"
        bad = np.nonzero((g != w) & ~nan_want)[0]
        assert bad.size == 0, (
            f"{src}->{dst} `{name}`: {bad.size} of {g.size} differ; first at {bad[0]}: "
            f"input {x[bad[0]].item()!r} got {g[bad[0]]:#x} torch {w[bad[0]]:#x}")


# AMD's fnuz float8 types and e8m0 (MX scales): read and written as torch 2.15 casts them on
# CPU (fnuz: values that round beyond the range, inf and NaN become the one NaN 0x80; e8m0:
# the exponent alone, rounded up from half, sign dropped).
EXTRA = {
    "f8e4m3fnuz": torch.float8_e4m3fnuz,
    "f8e5m2fnuz": torch.float8_e5m2fnuz,
    "f8e8m0": torch.float8_e8m0fnu,
}


@pytest.mark.parametrize("src,dst", [(s, d) for s in ["f32", "f16", "bf16", "f64"]
                                     for d in EXTRA] +
                         [(s, d) for s in EXTRA for d in ["f32", "bf16", "f16", "f8e4m3"]])
def test_fnuz_and_e8m0_casts_match_torch(tmp_path, src, dst):
    all_types = {**DTYPES, **EXTRA}
    if src in EXTRA:
        tensors = {"all_patterns": all_patterns(EXTRA[src])}
    else:
        tensors = inputs_for(src)
    first = next(iter(tensors.values()))
    tensors["odd"] = first[:1001].clone()
    convert_and_compare(tmp_path, tensors, src, dst, all_types[dst])
