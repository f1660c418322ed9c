"""Benchmark: `weightcast audit` against picklescan on the same files, in one run.

    .venv/bin/python bench/audit_bench.py FILE... [--runs 5] [--picklescan-path DIR]
        [--before OLD_WEIGHTCAST_BINARY]

picklescan is installed outside the test environment (`pip install --target DIR
picklescan==1.0.5`) and run as `python -m picklescan -p FILE`. All are timed end to end as a
user runs them (process start included); medians of RUNS, interleaved. `--before` times an
older weightcast build too (before/after a change, same run, same machine)."""

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
    ap.add_argument("--before", help="an older weightcast binary, timed in the same run")
    a = ap.parse_args()
    env = dict(os.environ, PYTHONPATH=a.picklescan_path)
    rows = []
    for f in a.files:
        size = pathlib.Path(f).stat().st_size
        w, p, b = [], [], []
        for _ in range(a.runs):
            w.append(timed([str(BIN), "audit", f]))
            if a.before:
                b.append(timed([a.before, "audit", f]))
            p.append(timed([sys.executable, "-m", "picklescan", "-p", f], env))
        mw, mp = statistics.median(w), statistics.median(p)
        before = ""
        if a.before:
            mb = statistics.median(b)
            before = f" {mb * 1000:.1f} ms | {mw / mb:.2f}x |"
        rows.append(f"| {pathlib.Path(f).name} | {size / 2**20:.1f} MiB |{before} {mw * 1000:.1f} ms | "
                    f"{mp * 1000:.1f} ms | {mp / mw:.1f}x |")
    head = "| file | size |" + (" weightcast before | after / before |" if a.before else "")
    print(head + " weightcast audit | picklescan 1.0.5 | picklescan / weightcast |")
    print("|---|---:|" + ("---:|---:|" if a.before else "") + "---:|---:|---:|")
    print("\n".join(rows))


if __name__ == "__main__":
    main()
