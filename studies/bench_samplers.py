"""Study ``bench-samplers``: the cost of drawing a projection, side by side.

Times, interleaved in one run on the same machine, for each (n, r):

* ``haar``: :meth:`estimators.HaarStiefel.sample` (float32),
* ``orthogonal_``: ``torch.nn.init.orthogonal_`` on an ``n×r`` tensor (the anchor),
* ``randn_qr``: ``torch.randn`` + ``torch.linalg.qr`` (no sign fix, a lower bound),
* ``scipy_ortho_group``: ``scipy.stats.ortho_group.rvs(n)`` (``n×n``, O(n³)) then sliced
  (timed once per n, since it does not depend on r),

and batched draws: ``HaarStiefel.sample(batch_shape=(B,))`` against ``B`` single
draws in a Python loop.  Writes ``bench_samplers.csv`` (one row per
configuration and method: median and minimum seconds over the repeats) and
``ratios.csv``, prints the ratios, and plots the times.
"""

from __future__ import annotations

import time

import numpy as np
import pandas as pd
import torch

from estimators import HaarStiefel

from ._core import StudyContext, save_figure, set_plot_theme

COLUMNS = ["n", "r", "batch", "method", "time_s", "time_min_s", "repeats", "threads"]
KEYS = ["n", "r", "batch"]


def _time_interleaved(fns: dict, repeats: int, min_time: float = 0.05) -> dict:
    """Seconds per call of each function: ``repeats`` rounds, methods interleaved
    within a round in a rotating order; each measurement loops a callable enough times (as
    ``timeit.autorange`` does) to last about ``min_time`` seconds."""
    number = {}
    for k, f in fns.items():  # warm-up and calibration
        f()
        t0 = time.perf_counter()
        f()
        number[k] = max(1, int(np.ceil(min_time / max(time.perf_counter() - t0, 1e-7))))
    times = {k: [] for k in fns}
    names = list(fns)
    for i in range(repeats):
        # rotate the order each round so no method always runs first (cache, clock effects)
        for k in names[i % len(names):] + names[: i % len(names)]:
            f = fns[k]
            t0 = time.perf_counter()
            for _ in range(number[k]):
                f()
            times[k].append((time.perf_counter() - t0) / number[k])
    return times


def _unit(unit, seed, *, repeats, scipy_max_n, device):
    from scipy.stats import ortho_group

    n, r, batch = int(unit["n"]), int(unit["r"]), int(unit["batch"])
    g = torch.Generator(device=device).manual_seed(seed)
    P = HaarStiefel(n, r)
    if batch == 1:
        buf = torch.empty(n, r, device=device)
        fns = {
            "haar": lambda: P.sample(generator=g, device=device, dtype=torch.float32),
            "orthogonal_": lambda: torch.nn.init.orthogonal_(buf, generator=g),
            "randn_qr": lambda: torch.linalg.qr(torch.randn(n, r, generator=g, device=device))[0],
        }
        rng = np.random.default_rng(seed)
        if n <= scipy_max_n and r == unit["_first_r"]:
            fns["scipy_ortho_group"] = lambda: ortho_group.rvs(n, random_state=rng)[:, :r]
    else:
        fns = {
            f"haar_batch{batch}": lambda: P.sample(batch_shape=(batch,), generator=g, device=device,
                                                   dtype=torch.float32),
            f"haar_loop{batch}": lambda: [P.sample(generator=g, device=device, dtype=torch.float32)
                                          for _ in range(batch)],
        }
    reps = repeats if "scipy_ortho_group" not in fns or n < 4096 else max(1, min(repeats, 3))
    times = _time_interleaved(fns, reps)
    threads = torch.get_num_threads()
    return [
        dict(n=n, r=r, batch=batch, method=k, time_s=float(np.median(v)), time_min_s=float(np.min(v)),
             repeats=len(v), threads=threads)
        for k, v in times.items()
    ]


def ratios(df: pd.DataFrame) -> pd.DataFrame:
    """Ratios of each method to the anchor (``orthogonal_``) and batch speed-ups."""
    rows = []
    single = df[df.batch == 1].pivot_table(index=["n", "r"], columns="method", values="time_s")
    for (n, r), row in single.iterrows():
        for m in row.index:
            if m != "orthogonal_" and np.isfinite(row[m]):
                rows.append(dict(n=n, r=r, comparison=f"{m} / orthogonal_", ratio=row[m] / row["orthogonal_"]))
    for (n, r, b), grp in df[df.batch > 1].groupby(["n", "r", "batch"]):
        t = grp.set_index("method").time_s
        rows.append(dict(n=n, r=r, comparison=f"loop{b} / batch{b} (speed-up)",
                         ratio=t[f"haar_loop{b}"] / t[f"haar_batch{b}"]))
    return pd.DataFrame(rows)


def run(ctx: StudyContext) -> None:
    ns = [256, 1024] if ctx.quick else [256, 1024, 4096]
    rs = [8, 32, 128]
    repeats = 5 if ctx.quick else 9
    batch = 64
    scipy_max_n = 1024 if ctx.quick else 4096
    ctx.record_config(ns=ns, rs=rs, repeats=repeats, batch=batch, scipy_max_n=scipy_max_n,
                      torch_threads=torch.get_num_threads(), dtype="float32")
    units = []
    for n in ns:
        rr = [r for r in rs if r <= n]
        for r in rr:
            units.append(dict(n=n, r=r, batch=1, _first_r=rr[0]))
    units.append(dict(n=1024, r=32, batch=batch, _first_r=32))
    if not ctx.quick:
        units += [dict(n=n, r=r, batch=batch, _first_r=r) for n, r in [(256, 8), (4096, 128)]]

    def fn(unit, seed):
        return _unit(unit, seed, repeats=repeats, scipy_max_n=scipy_max_n, device=ctx.device)

    keyed = [{k: u[k] for k in KEYS} | {"_first_r": u["_first_r"]} for u in units]
    # the key is (n, r, batch); the extra field only tells which r times scipy
    rows = ctx.run_units("bench_samplers.csv", COLUMNS, KEYS, keyed, fn, desc="bench-samplers")
    df = pd.DataFrame(rows).astype({"n": int, "r": int, "batch": int, "time_s": float})
    rat = ratios(df)
    rat.to_csv(ctx.out / "ratios.csv", index=False)
    print(rat.to_string(index=False, float_format=lambda x: f"{x:.3f}"))

    set_plot_theme()
    import matplotlib.pyplot as plt
    import seaborn as sns

    single = df[df.batch == 1].copy()
    single["time_ms"] = single.time_s * 1e3
    grid = sns.catplot(data=single, x="n", y="time_ms", hue="method", col="r", kind="bar",
                       height=3.2, aspect=1.0)
    grid.set(yscale="log")
    grid.set_axis_labels("n", "time per draw (ms, median)")
    grid.figure.suptitle("Drawing one n×r projection (float32, CPU)", y=1.04)
    save_figure(grid.figure, ctx.out, "bench_samplers")
    plt.close("all")
