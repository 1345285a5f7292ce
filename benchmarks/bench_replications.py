"""Replications per second of the IPA estimator on Example 1: vectorised (torch.func.vmap) against a plain loop.

Example 1 (the paper's one-layer ReLU network) at n = 256, m = 64, rank r = 8, batch N = 16 drawn from a
finite population of 1024.  For each estimator (full rank; Haar low rank, shared V; Haar low rank, a fresh V
per example) it times

* ``vmap``: :func:`estimators.ipa.ipa_replications` computing all R replications in one call (no Python loop);
* ``loop``: R calls of :func:`estimators.estimate` in a Python loop,

side by side in one run, and prints and saves replications per second and their ratio.

Usage::

    python benchmarks/bench_replications.py [--reps-vmap 1000] [--reps-loop 100] [--threads 1] [--out results/bench_replications]
"""

from __future__ import annotations

import argparse
import csv
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from estimators.estimate import estimate  # noqa: E402
from estimators.ipa import ipa_replications  # noqa: E402
from estimators.models import example1, squared_loss  # noqa: E402


def _time(fn, repeats=3):
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=256)
    ap.add_argument("--m", type=int, default=64)
    ap.add_argument("--rank", type=int, default=8)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--reps-vmap", type=int, default=1000)
    ap.add_argument("--reps-loop", type=int, default=100)
    ap.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: leave as is)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default="results/bench_replications")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    gen = torch.Generator().manual_seed(args.seed)
    model, pop = example1(args.n, args.m, population=1024, dtype=torch.float32, generator=gen)
    configs = [
        ("full", dict()),
        ("haar_shared", dict(projector="haar", rank=args.rank, share_projection=True)),
        ("haar_independent", dict(projector="haar", rank=args.rank, share_projection=False)),
    ]
    rows = []
    print(f"Example 1: n={args.n} m={args.m} r={args.rank} N={args.batch}; threads={torch.get_num_threads()}")
    print(f"{'estimator':<18} {'vmap reps/s':>12} {'loop reps/s':>12} {'ratio':>8}")
    for name, kw in configs:
        batches = pop.sample_batches(args.reps_vmap, args.batch, generator=gen)
        loop_batches = [pop.sample(args.batch, generator=gen) for _ in range(args.reps_loop)]
        ipa_replications(model, squared_loss, tuple(t[:8] for t in batches), generator=gen, **kw)  # warm-up
        t_vmap = _time(lambda: ipa_replications(model, squared_loss, batches, generator=gen, **kw))
        t_loop = _time(lambda: [estimate(model, squared_loss, b, generator=gen, **kw) for b in loop_batches])
        rv, rl = args.reps_vmap / t_vmap, args.reps_loop / t_loop
        print(f"{name:<18} {rv:12.0f} {rl:12.0f} {rv / rl:8.1f}")
        rows.append(dict(estimator=name, n=args.n, m=args.m, rank=args.rank if name != "full" else "",
                         batch=args.batch, threads=torch.get_num_threads(), reps_vmap=args.reps_vmap,
                         reps_loop=args.reps_loop, vmap_reps_per_s=f"{rv:.1f}", loop_reps_per_s=f"{rl:.1f}",
                         ratio=f"{rv / rl:.2f}"))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "replications.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    print(f"saved {out / 'replications.csv'}")


if __name__ == "__main__":
    main()
