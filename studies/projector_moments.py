r"""Study ``projector-moments``: the second-moment factor of each projector family.

For every family of :data:`theory.FAMILIES` and rank ``r`` the study draws
``n_reps`` projections ``V ∈ R^{n×r}`` (``c = 1``) with the samplers of
:mod:`estimators.projectors`, and estimates

    α = tr E[(VVᵀ)²] / n = E ‖VᵀV‖²_F / n,

with its standard error, beside the closed form
:func:`theory.isotropic_second_moment`.  The minimax-optimal families
(Haar–Stiefel, coordinate without replacement) sit on the line ``α = n/r``
(exactly: ``VᵀV = (n/r) I`` for every draw, so the standard error is zero); the
others sit above it by the factor ``(n + r + κ − 2)/n``.

Output: ``projector_moments.csv`` with columns
``family, n, r, r_over_n, n_reps, alpha_mc, alpha_se, alpha_theory, alpha_optimal, z``
(``z = (alpha_mc − alpha_theory)/alpha_se``, 0 when both agree exactly), the
figure ``projector_moments.png``/``.pdf`` and the checks in ``run.json``.
"""

from __future__ import annotations

import math

import numpy as np

import theory

from ._core import StudyContext, make_generator, save_figure, set_plot_theme

__all__ = ["run", "plot", "COLUMNS", "CSV"]

#: torch threads for ``--quick`` runs (tiny models: one thread is fastest; scale out with ``--n-jobs``)
QUICK_THREADS = 1

CSV = "projector_moments.csv"
COLUMNS = ["family", "n", "r", "r_over_n", "n_reps", "alpha_mc", "alpha_se", "alpha_theory",
           "alpha_optimal", "z"]
_LABELS = {
    "haar": "Haar–Stiefel",
    "coordinate": "coordinate",
    "coordinate_replace": "coordinate, with replacement",
    "gaussian": "Gaussian",
    "rademacher": "Rademacher",
}
_CHUNK = 2048


def _unit(unit: dict, seed: int) -> list[dict]:
    import torch

    from estimators import make_projector

    family, n, r, n_reps = unit["family"], int(unit["n"]), int(unit["r"]), int(unit["n_reps"])
    proj = make_projector(family, n, r)
    gen = make_generator(seed, unit["device"])
    vals = []
    for start in range(0, n_reps, _CHUNK):
        k = min(_CHUNK, n_reps - start)
        V = proj.sample(batch_shape=(k,), generator=gen, dtype=torch.float64)
        gram = V.transpose(-1, -2) @ V  # r×r: ‖VᵀV‖² = tr((VVᵀ)²)
        vals.append((gram.square().sum(dim=(-2, -1)) / n).cpu().numpy())
    a = np.concatenate(vals)
    mc = float(a.mean())
    se = float(a.std(ddof=1) / math.sqrt(n_reps))
    th = theory.isotropic_second_moment(family, n, r)
    opt = theory.isotropic_second_moment("haar", n, r)
    if se > 1e-12 * th:
        z = (mc - th) / se
    else:  # a constant: exact agreement or a hard failure
        z = 0.0 if math.isclose(mc, th, rel_tol=1e-9) else math.copysign(math.inf, mc - th)
    return [{
        "family": family, "n": n, "r": r, "r_over_n": r / n, "n_reps": n_reps,
        "alpha_mc": mc, "alpha_se": se, "alpha_theory": th, "alpha_optimal": opt, "z": z,
    }]


def run(ctx: StudyContext) -> None:
    """Monte Carlo of ``α`` for every family and rank; CSV, figure, checks."""
    n = ctx.param("n", 32, 128)
    ranks = ctx.param("ranks", [1, 2, 4, 8, 16, 32], [1, 2, 4, 8, 16, 32, 64, 128])
    n_reps = ctx.param("n_reps", 4000, 100_000)
    families = ctx.param("families", list(theory.FAMILIES))
    ranks = [r for r in ranks if 1 <= r <= n]
    units = [{"family": f, "n": n, "r": r, "n_reps": n_reps, "device": ctx.device}
             for f in families for r in ranks]
    rows = ctx.run_units(CSV, COLUMNS, ["family", "n", "r"], units, _unit)
    n_rows = len(rows)
    for row in rows:
        z = float(row["z"])
        ok = abs(z) <= 3.0
        detail = {"z": z, "alpha_mc": float(row["alpha_mc"]), "alpha_theory": float(row["alpha_theory"])}
        if not ok:
            detail["why"] = (f"|z| = {abs(z):.2f} > 3; under H0 each of the {n_rows} rows exceeds 3 SE "
                             f"with probability 0.27 %, so about {0.0027 * n_rows:.2f} such rows are expected")
        ctx.add_check(f"projector-moments {row['family']} r={row['r']}: MC within 3 SE of closed form",
                      ok, **detail)
        if row["family"] in ("haar", "coordinate"):
            ctx.add_check(f"projector-moments {row['family']} r={row['r']}: on the n/r line",
                          math.isclose(float(row["alpha_mc"]), float(row["alpha_optimal"]), rel_tol=1e-9),
                          alpha_mc=float(row["alpha_mc"]), n_over_r=float(row["alpha_optimal"]))
    if ctx.param("figures", True):
        import pandas as pd

        save_figure(plot(pd.read_csv(ctx.csv_path(CSV))), ctx.out, "projector_moments")


def plot(df):
    """Two panels: ``α`` against ``r/n`` (log–log) and the excess ``α / (n/r)``.

    Theory as lines, Monte Carlo as points with ±2 SE error bars.

    Parameters
    ----------
    df : pandas.DataFrame
        ``projector_moments.csv``.

    Returns
    -------
    matplotlib.figure.Figure
    """
    set_plot_theme()
    import matplotlib.pyplot as plt
    import seaborn as sns

    fams = [f for f in _LABELS if f in set(df["family"])]
    colors = dict(zip(fams, sns.color_palette("colorblind", len(fams))))
    markers = dict(zip(fams, ["o", "s", "^", "D", "v"]))
    fig, axes = plt.subplots(1, 2, figsize=(10, 4), constrained_layout=True)
    opt = df.drop_duplicates("r").sort_values("r_over_n")
    for ax, excess in zip(axes, (False, True)):
        ax.plot(opt["r_over_n"], np.ones(len(opt)) if excess else opt["alpha_optimal"], color="black",
                lw=2.5, alpha=0.35, label="optimum n/r (theory)")
        for f in fams:
            d = df[df["family"] == f].sort_values("r_over_n")
            scale = d["alpha_optimal"] if excess else 1.0
            ax.plot(d["r_over_n"], d["alpha_theory"] / scale, color=colors[f], lw=1.2, ls="--")
            ax.errorbar(d["r_over_n"], d["alpha_mc"] / scale, yerr=2 * d["alpha_se"] / scale,
                        fmt=markers[f], color=colors[f], ms=5, capsize=3, ls="none",
                        label=f"{_LABELS[f]} (MC ± 2 SE)")
        ax.set_xscale("log", base=2)
        ax.set_xlabel("r / n")
        if excess:
            ax.set_ylabel("α / (n/r)   (excess over the optimum)")
            ax.set_title("excess factor (n + r + κ − 2)/n")
        else:
            ax.set_yscale("log", base=2)
            ax.set_ylabel("α = tr E[(VVᵀ)²] / n")
            ax.set_title(f"second-moment factor, n = {int(df['n'].iloc[0])}")
    axes[0].legend(fontsize=8, loc="upper right")
    fig.text(0.5, -0.02, "dashed lines: closed form (theory.isotropic_second_moment); "
             "points: Monte Carlo", ha="center", fontsize=8)
    return fig
