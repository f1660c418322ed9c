"""Benchmark: `weightcast audit` against picklescan on the same files, in one run.

    .venv/bin/python bench/audit_bench.py FILE... [--runs 5] [--picklescan-path DIR]

picklescan is installed outside the test environment (`pip install --target DIR
picklescan==1.0.5`) and run as `python -m picklescan -p FILE`. Both are timed end to end as a
user runs them (process start included); medians of RUNS, interleaved."""

import argparse
import os
import pathlib
import statistics
import subprocess
import sys
import time

ROOT = pathlib.Path(__file__).resolve().parents[1]
BIN = ROOT / "target" / "release" / "weightcast"


def timed(cmd, env=None):
    start = time.perf_counter()
    subprocess.run(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
    return time.perf_counter() - start


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("files", nargs="+")
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--picklescan-path", default="/tmp/ps")
    a = ap.parse_args()
    env = dict(os.environ, PYTHONPATH=a.picklescan_path)
    rows = []
    for f in a.files:
        size = pathlib.Path(f).stat().st_size
        w, p = [], []
        for _ in range(a.runs):
            w.append(timed([str(BIN), "audit", f]))
            p.append(timed([sys.executable, "-m", "picklescan", "-p", f], env))
        mw, mp = statistics.median(w), statistics.median(p)
        rows.append(f"| {pathlib.Path(f).name} | {size / 2**30:.2f} GiB | {mw * 1000:.1f} ms | "
                    f"{mp * 1000:.1f} ms | {mp / mw:.1f}x |")
    print("| file | size | weightcast audit | picklescan 1.0.5 | picklescan / weightcast |")
    print("|---|---:|---:|---:|---:|")
    print("\n".join(rows))


if __name__ == "__main__":
    main()
