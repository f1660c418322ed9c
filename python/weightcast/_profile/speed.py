"""Speed: a module timed on the batches (latency percentiles, throughput, peak memory), with the
timing settings, and what this device does with a dtype (native or emulated arithmetic)."""

import resource
import time
from dataclasses import dataclass
from typing import Any, Dict, Optional

from .outputs import batch_size, call


@dataclass(frozen=True)
class Timing:
    """How rows are timed (``profile``'s ``timing``, ``warmup`` and ``repeats``): after
    ``warmup`` batches, ``repeats`` passes over the batches on ``device`` (the module's)."""

    enabled: bool
    warmup: int
    repeats: int
    device: Any


def _cuda(device) -> bool:
    return device is not None and str(device).startswith("cuda")


def _sync(device):
    import torch

    if _cuda(device):
        torch.cuda.synchronize(device)


def time_module(module, batches, timing: Timing) -> Dict[str, Any]:
    """Latency per batch (p50, p90, p99 in ms), throughput (samples per second) and peak memory
    (the device's allocator on CUDA, the process's resident size otherwise)."""
    import torch

    device = timing.device
    with torch.no_grad():
        for b in batches[: max(1, timing.warmup)]:
            call(module, b)
        _sync(device)
        if _cuda(device):
            torch.cuda.reset_peak_memory_stats(device)
        times = []
        samples = 0
        cuda = _cuda(device)
        for _ in range(timing.repeats):
            for b in batches:
                if cuda:  # CUDA events on the device's stream, read once it is done
                    start = torch.cuda.Event(enable_timing=True)
                    end = torch.cuda.Event(enable_timing=True)
                    start.record()
                    call(module, b)
                    end.record()
                    end.synchronize()
                    times.append(start.elapsed_time(end) / 1000.0)
                else:
                    t0 = time.perf_counter()
                    call(module, b)
                    times.append(time.perf_counter() - t0)
                samples += batch_size(b)
    times.sort()

    def pct(q):
        return 1000.0 * times[min(len(times) - 1, int(round(q * (len(times) - 1))))]

    if _cuda(device):
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


def support(dtype, device) -> Optional[str]:
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
