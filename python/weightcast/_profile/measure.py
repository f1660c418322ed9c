"""A row: a module's outputs against the reference's, accumulated over the batches (cosine,
absolute and relative error, top-1 agreement and KL for logits, non-finite values, the user's
metric with a bootstrap interval), its weight bytes and, when timed, its speed. The reference's
outputs, the scoring and the timing travel together as a :class:`Bench`."""

import random
from dataclasses import dataclass, replace
from typing import Any, Callable, Dict, List, Optional, Tuple

from .candidates import weight_bytes
from .outputs import call, detach
from .recommend import meets
from .speed import Timing, time_module

Leaves = List[Tuple[str, Any]]


@dataclass(frozen=True)
class Reference:
    """The reference's run on the batches: what every candidate is compared with."""

    batches: List[Any]
    outputs: List[Leaves]  # per batch, the floating outputs (detached, float32, on the CPU)
    raw: List[Any]  # per batch, the output as the module returned it (for the metric)
    main: int  # the output compared for cosine, top-1 and KL (``key``, else the first)


@dataclass(frozen=True)
class Scoring:
    """How rows are judged: the user's ``metric`` (and which way is better), the bootstrap's
    ``seed``, and the ``tolerance`` a row must meet."""

    metric: Optional[Callable[[Any, Any, Any], float]]
    higher_is_better: bool
    seed: int
    tolerance: Dict[str, float]

    def meets(self, row: Dict[str, Any]) -> bool:
        return meets(row, self.tolerance, self.higher_is_better)


@dataclass(frozen=True)
class Bench:
    """What every measurement of one profile shares: the reference to compare with, the
    scoring, the timing."""

    reference: Reference
    scoring: Scoring
    timing: Timing

    def measure(self, module, timed: bool = True) -> Dict[str, Any]:
        """The row of `module`; timed as the settings say, unless `timed` is False."""
        timing = self.timing if timed else replace(self.timing, enabled=False)
        return measure(module, self.reference, self.scoring, timing)


class Accuracy:
    """Outputs of a candidate against the reference's, accumulated over batches."""

    def __init__(self):
        self.max_abs = 0.0
        self.ref_max = 0.0
        self.nonfinite = 0
        self.cosines: List[float] = []
        self.top1: List[float] = []
        self.kl: List[float] = []
        self.metric: List[float] = []

    def add(self, ref: Leaves, got: Leaves, main: int):
        import torch

        for (_, r), (_, g) in zip(ref, got):
            finite = torch.isfinite(r)
            self.nonfinite += int((finite & ~torch.isfinite(g)).sum())
            d = (g - r).abs()[finite & torch.isfinite(g)]
            if d.numel():
                self.max_abs = max(self.max_abs, float(d.max()))
            if finite.any():
                self.ref_max = max(self.ref_max, float(r[finite].abs().max()))
        r, g = ref[main][1].double(), got[main][1].double()
        if not torch.isfinite(g).all():
            self.cosines.append(float("nan"))
        else:
            self.cosines.append(float(torch.nn.functional.cosine_similarity(
                r.flatten(), g.flatten(), dim=0)))
        if r.dim() >= 2 and r.shape[-1] >= 2:
            self.top1.append(float((r.argmax(-1) == g.argmax(-1)).double().mean()))
            if torch.isfinite(g).all():
                lp, lq = r.log_softmax(-1), g.log_softmax(-1)
                self.kl.append(float((lp.exp() * (lp - lq)).sum(-1).mean()))
            else:
                self.kl.append(float("inf"))


def bootstrap(values: List[float], seed: int, rounds: int = 1000) -> Tuple[float, float]:
    """A 95% percentile bootstrap interval of the mean."""
    if len(values) < 2:
        v = values[0] if values else float("nan")
        return v, v
    rng = random.Random(seed)
    n = len(values)
    means = sorted(sum(rng.choice(values) for _ in range(n)) / n for _ in range(rounds))
    return means[int(0.025 * rounds)], means[int(0.975 * rounds) - 1]


def measure(module, ref: Reference, scoring: Scoring, timing: Timing) -> Dict[str, Any]:
    """One module's accuracy (and, when ``timing.enabled``, speed) row."""
    import torch

    acc = Accuracy()
    with torch.no_grad():
        for b, outs, raw in zip(ref.batches, ref.outputs, ref.raw):
            out = call(module, b)
            acc.add(outs, detach(out), ref.main)
            if scoring.metric is not None:
                acc.metric.append(float(scoring.metric(raw, out, b)))
    cos = acc.cosines
    row: Dict[str, Any] = {
        "metric": sum(acc.metric) / len(acc.metric) if acc.metric else None,
        "metric_ci": list(bootstrap(acc.metric, scoring.seed)) if acc.metric else None,
        "cosine": min(cos) if all(c == c for c in cos) else float("nan"),
        "max_abs": acc.max_abs,
        "max_rel": acc.max_abs / acc.ref_max if acc.ref_max else 0.0,
        "top1": sum(acc.top1) / len(acc.top1) if acc.top1 else None,
        "kl": sum(acc.kl) / len(acc.kl) if acc.kl else None,
        "nonfinite": acc.nonfinite,
        "weight_bytes": weight_bytes(module),
        "latency_ms": None,
        "throughput": None,
        "peak_memory_bytes": None,
    }
    if timing.enabled:
        t = time_module(module, ref.batches, timing)
        row["latency_ms"] = {k: t[k] for k in ("p50", "p90", "p99")}
        row["throughput"] = t["throughput"]
        row["peak_memory_bytes"] = max(t["peak_memory_bytes"], row["weight_bytes"])
    return row
