r"""Study ``functional``: the functional optimisation against the closed forms, and the instance-dependent gain.

Two parts (theory.md §5–§6):

1. ``functional.csv`` — for a grid of spectra (isotropic, power-law decay
   ``σ_i = i^{-a}`` for several exponents ``a``, one spike, rank-deficient) and
   ranks: the column-generation solver :func:`theory.solve_functional` (its
   value, its certified Lagrangian lower bound, its number of atoms), the
   water-filling closed form :func:`theory.instance_dependent_value` and the
   Haar value ``c² (n/r) tr S``.  ``S = Q diag(σ) Qᵀ`` with a random rotation
   ``Q`` (the solver is not told the eigenbasis unless ``init="eigen"``, which
   it computes itself).  A rank-deficient ``S`` has no minimiser (the infimum
   needs atoms of unbounded scale); the solver then solves ``S + 10⁻⁶ (tr S/n) I``
   and ``closed_form`` is that of the ridged ``S`` (``closed_form_exact``: of
   ``S`` itself).
2. ``functional_gain.csv`` — the MSE ``E‖G V Vᵀ − ∇‖²`` (``∇ = 0``, so the MSE
   is ``tr(S M)``) of :class:`estimators.InstanceDependent` and
   :class:`estimators.HaarStiefel` for power-law spectra of growing exponent:
   :func:`theory.mse` beside a Monte Carlo estimate (Gaussian ``G`` with
   ``E[GᵀG] = S``) and its standard error; ``gain_theory = V_Haar / V*``.

Figure ``functional.png``/``.pdf``: (a) solver and Haar values relative to the
closed form, per spectrum and rank; (b) the gain against the exponent.
"""

from __future__ import annotations

import math
import time

import numpy as np

import theory

from ._core import StudyContext, make_generator, save_figure, set_plot_theme

__all__ = ["run", "spectrum", "SOLVER_COLUMNS", "GAIN_COLUMNS"]

SOLVER_CSV = "functional.csv"
SOLVER_COLUMNS = ["spectrum", "exponent", "n", "rank", "solver_value", "lower_bound", "closed_form",
                  "closed_form_exact", "haar_value", "rel_diff", "rel_gap", "n_atoms", "n_iter",
                  "converged", "pricing_exact", "ridge", "wall_s"]
GAIN_CSV = "functional_gain.csv"
GAIN_COLUMNS = ["n", "rank", "exponent", "projector", "mse_theory", "mse", "mse_se", "n_reps", "gain_theory"]


def spectrum(kind: str, n: int, exponent: float = 1.0) -> np.ndarray:
    """Eigenvalues of the study's spectra (decreasing, ``tr = n`` except rank-deficient).

    ``"isotropic"``: ones; ``"power"``: ``i^{-a}`` rescaled to trace ``n``;
    ``"spike"``: one eigenvalue ``n`` above ``n − 1`` ones; ``"rank_deficient"``:
    ``i^{-1}`` on the first ``n/2`` coordinates, zero elsewhere.
    """
    i = np.arange(1, n + 1, dtype=float)
    if kind == "isotropic":
        return np.ones(n)
    if kind == "power":
        s = i ** (-exponent)
        return s * n / s.sum()
    if kind == "spike":
        return np.concatenate([[float(n)], np.ones(n - 1)])
    if kind == "rank_deficient":
        s = np.where(i <= n // 2, 1.0 / i, 0.0)
        return s * n / s.sum()
    raise ValueError(f"`kind` must be isotropic, power, spike or rank_deficient, got kind={kind!r}")


def _solver_unit(unit, seed):
    n, r = int(unit["n"]), int(unit["rank"])
    sigma = spectrum(unit["spectrum"], n, float(unit["exponent"]))
    g = np.random.default_rng(seed)
    Q, _ = np.linalg.qr(g.standard_normal((n, n)))
    S = (Q * sigma) @ Q.T
    t0 = time.perf_counter()
    res = theory.solve_functional(S, r, 1.0, rng=g)
    wall = time.perf_counter() - t0
    return [dict(unit, solver_value=res.value, lower_bound=res.lower_bound, closed_form=res.closed_form,
                 closed_form_exact=theory.instance_dependent_value(sigma, r),
                 haar_value=theory.haar_value(sigma, r),
                 rel_diff=(res.value - res.closed_form) / res.closed_form, rel_gap=res.gap,
                 n_atoms=int(res.weights.size), n_iter=res.n_iter, converged=res.converged,
                 pricing_exact=res.pricing_exact, ridge=res.ridge, wall_s=wall)]


def _gain_unit(unit, seed, *, n_reps, m=4, device="cpu", chunk=1000):
    import torch

    from estimators import HaarStiefel, InstanceDependent

    n, r, a = int(unit["n"]), int(unit["rank"]), float(unit["exponent"])
    sigma = spectrum("power", n, a)
    g = np.random.default_rng(seed)
    Q, _ = np.linalg.qr(g.standard_normal((n, n)))
    S = (Q * sigma) @ Q.T
    grad = np.zeros((1, n))
    gen = make_generator(seed, device)
    root = torch.as_tensor((Q * np.sqrt(sigma)).T, device=device)  # G = Z root/√m has E[GᵀG] = S
    designs = {"haar": HaarStiefel(n, r), "instance": InstanceDependent(S, r)}
    gain = theory.instance_dependent_gain(sigma, r)
    rows = []
    for name, P in designs.items():
        errs = []
        for start in range(0, n_reps, chunk):  # bounded memory: chunk × n × r at a time
            k = min(chunk, n_reps - start)
            Z = torch.randn(k, m, n, generator=gen, dtype=torch.float64, device=device)
            G = Z @ root / math.sqrt(m)
            V = P.sample(batch_shape=(k,), generator=gen, dtype=torch.float64, device=device)
            errs.append(((G @ V) @ V.mT).pow(2).sum((-1, -2)).cpu().numpy())
        err = np.concatenate(errs)
        rows.append(dict(unit, projector=name, mse_theory=theory.mse(S, grad, P.second_moment().numpy()),
                         mse=float(err.mean()), mse_se=float(err.std(ddof=1) / math.sqrt(n_reps)),
                         n_reps=n_reps, gain_theory=gain))
    return rows


def run(ctx: StudyContext) -> None:
    ns = ctx.param("ns", [6], [6, 8])
    ranks = ctx.param("ranks", [1, 3], [1, 2, 3, 4])
    exps = ctx.param("exponents", [1.0, 2.0], [0.5, 1.0, 1.5, 2.0, 3.0])
    gain_n = ctx.param("gain_n", [64], [64, 256])
    n_exps = ctx.param("gain_n_exponents", 7, 13)
    n_reps = ctx.param("n_reps", 2000, 20000)
    gain_ns = [(n, [max(1, n // 16), n // 4]) for n in gain_n]
    gain_exps = np.linspace(0, 3, n_exps)
    units = []
    for n in ns:
        for r in ranks:
            units.append(dict(spectrum="isotropic", exponent=0.0, n=n, rank=r))
            units += [dict(spectrum="power", exponent=a, n=n, rank=r) for a in exps]
            units.append(dict(spectrum="spike", exponent=0.0, n=n, rank=r))
            units.append(dict(spectrum="rank_deficient", exponent=1.0, n=n, rank=r))
    ctx.record_config(c=1.0, gain_grid=gain_ns)
    rows = ctx.run_units(SOLVER_CSV, SOLVER_COLUMNS, ["spectrum", "exponent", "n", "rank"], units, _solver_unit,
                         desc="functional: solver")
    gain_units = [dict(n=n, rank=r, exponent=round(float(a), 4)) for n, rs in gain_ns for r in rs for a in gain_exps]
    from functools import partial

    gain_rows = ctx.run_units(GAIN_CSV, GAIN_COLUMNS, ["n", "rank", "exponent"], gain_units,
                              partial(_gain_unit, n_reps=n_reps, device=ctx.device), desc="functional: gain")
    worst = max(abs(float(r_["rel_diff"])) for r_ in rows)
    z = [abs(float(r_["mse"]) - float(r_["mse_theory"])) / float(r_["mse_se"]) for r_ in gain_rows
         if float(r_["mse_se"]) > 0]
    ctx.add_check("solver matches closed form (rel 1e-6)", worst <= 1e-6, max_abs_rel_diff=worst)
    ctx.add_check("solver converged with certified bound", all(r_["converged"] == "True" for r_ in rows),
                  max_rel_gap=max(float(r_["rel_gap"]) for r_ in rows))
    ctx.add_check("Monte Carlo MSE within 4 SE of theory.mse", bool(z) and max(z) <= 4.0,
                  max_abs_z=max(z) if z else None,
                  max_gain=max(float(r_["gain_theory"]) for r_ in gain_rows))
    plot(rows, gain_rows, ctx.out)


def plot(rows, gain_rows, out):
    import matplotlib.pyplot as plt
    import pandas as pd
    import seaborn as sns

    set_plot_theme()
    df = pd.DataFrame(rows)
    for col in ("solver_value", "closed_form", "haar_value", "exponent"):
        df[col] = df[col].astype(float)
    df["label"] = [f"{s}" + (f" a={e:g}" if s == "power" else "") for s, e in zip(df.spectrum, df.exponent)]
    long = pd.concat([
        df.assign(design="solver", ratio=df.solver_value / df.closed_form),
        df.assign(design="Haar", ratio=df.haar_value / df.closed_form),
    ])
    gdf = pd.DataFrame(gain_rows)
    for col in ("exponent", "mse", "mse_se", "mse_theory", "gain_theory"):
        gdf[col] = gdf[col].astype(float)
    gdf["setting"] = [f"n={n}, r={r}" for n, r in zip(gdf.n, gdf["rank"])]
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.2))
    ax = axes[0]
    sns.stripplot(data=long, x="label", y="ratio", hue="design", dodge=True, ax=ax)
    ax.axhline(1.0, color="k", lw=0.8)
    ax.set_yscale("log")
    ax.set_xlabel("spectrum")
    ax.set_ylabel("value / closed form  (all n, r)")
    ax.set_title("(a) functional optimisation: solver vs closed form")
    ax.tick_params(axis="x", rotation=45)
    ax = axes[1]
    piv = gdf.pivot_table(index=["setting", "exponent"], columns="projector", values=["mse", "mse_se", "mse_theory"])
    for setting, sub in piv.groupby(level=0):
        e = sub.index.get_level_values(1)
        line, = ax.plot(e, sub[("mse_theory", "haar")] / sub[("mse_theory", "instance")], label=setting)
        ratio = sub[("mse", "haar")] / sub[("mse", "instance")]
        rel = np.sqrt((sub[("mse_se", "haar")] / sub[("mse", "haar")]) ** 2
                      + (sub[("mse_se", "instance")] / sub[("mse", "instance")]) ** 2)
        ax.errorbar(e, ratio, yerr=2 * rel * ratio, fmt="o", color=line.get_color(), ms=3)
    ax.set_xlabel("power-law exponent a  (σ_i ∝ i^{-a})")
    ax.set_ylabel("MSE(Haar) / MSE(instance-dependent)")
    ax.set_yscale("log")
    ax.set_title("(b) gain of the instance-dependent design (lines: theory, dots: MC ± 2 SE)")
    ax.legend()
    fig.tight_layout()
    save_figure(fig, out, "functional")
