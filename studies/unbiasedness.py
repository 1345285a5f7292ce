r"""Study ``unbiasedness``: every method × projector × mode, tested for ``E ĝ = ∇``.

The paper's Theorem 1 (theory.md §2): if ``E[VVᵀ] = I`` then the low-rank
estimator ``ĝ = G V Vᵀ`` has the mean of its base estimator ``G``, for every
base estimator and data law.  For each cell — method (IPA, LR, ZO) × projector
(full rank, the five isotropic families, the instance-dependent design) × mode
(dependent: one ``V`` per batch; independent: one per example) — the study draws
``n_reps`` independent estimates on a batch of ``n_samples`` examples through
:func:`estimators.estimate` and applies :func:`theory.testing.unbiasedness_test`
(Student-t tests of every entry, Holm-corrected within the cell).  Across cells
the p-values are Holm-corrected again (statsmodels) into ``p_value``; a cell is
``rejected`` when ``p_value < alpha``.

Problems (:func:`studies.mse_vs_samples.build_problem`; finite data sets, so the
truth is exact by enumeration):

* ``relu`` — the ReLU network of the paper's Example 1 → ``unbiasedness.csv``;
* ``quadratic`` — a linear layer with a quadratic loss →
  ``unbiasedness_quadratic.csv`` (same schema).

Targets.  IPA targets ``∇F``.  LR and ZO target the gradient of a Gaussian-
smoothed objective, which equals ``∇F`` for the quadratic problem.  On the ReLU
network they run with small smoothing (LR: ``σ = 0.01`` with antithetic pairs;
ZO: two-point, ``μ = 1e-3``) and are tested against ``∇F``: the smoothing bias
(``O(σ²)`` away from the ReLU kinks, ``O(σ)`` times the rare kink crossings) is
orders of magnitude below the tests' resolution at these sample sizes.

Power.  For each method and problem a *mutant* — orthonormal Haar frames
without the ``√(n/r)`` scale, so ``E[VVᵀ] = (r/n) I`` and ``E ĝ = (r/n) ∇`` —
runs at the same sample size and must be rejected (its rows are in
``unbiasedness_raw.csv`` and the checks, not in the schema files).

Output: ``unbiasedness.csv`` and ``unbiasedness_quadratic.csv`` with columns
``method, projector, rank, mode, n_reps, statistic, p_value, max_abs_z, rejected``;
``unbiasedness_raw.csv`` (every cell, raw p-values, the controls);
``unbiasedness.png``/``.pdf``; the checks in ``run.json``.
"""

from __future__ import annotations

import math

import numpy as np

from ._core import StudyContext, make_generator, save_figure, set_plot_theme
from .mse_vs_samples import build_problem, exact_moments

__all__ = ["run", "plot", "COLUMNS", "CSV", "RAW_COLUMNS", "PROJECTORS", "METHODS"]

#: torch threads for ``--quick`` runs (tiny models: one thread is fastest; scale out with ``--n-jobs``)
QUICK_THREADS = 1

CSV = "unbiasedness.csv"
CSV_QUADRATIC = "unbiasedness_quadratic.csv"
RAW = "unbiasedness_raw.csv"
COLUMNS = ["method", "projector", "rank", "mode", "n_reps", "statistic", "p_value", "max_abs_z", "rejected"]
RAW_COLUMNS = ["problem", "method", "projector", "rank", "mode", "c", "control", "n_reps", "n_samples",
               "statistic", "p_raw", "max_abs_z", "n_tests"]
METHODS = ("ipa", "lr", "zo")
PROJECTORS = ("full", "haar", "coordinate", "coordinate_replace", "gaussian", "rademacher", "instance")
PROBLEM_FILES = {"relu": CSV, "quadratic": CSV_QUADRATIC}
_OPTIONS = {
    ("lr", "relu"): {"sigma": 0.01, "antithetic": True},
    ("lr", "quadratic"): {"sigma": 0.5, "antithetic": True},
    ("zo", "relu"): {"mu": 1e-3, "two_point": True},
    ("zo", "quadratic"): {"mu": 1e-3, "two_point": True},
}


def _unit(unit: dict, seed: int) -> list[dict]:
    import torch

    from estimators.estimate import estimate
    from estimators.instance import InstanceDependent
    from theory.testing import unbiasedness_test

    model, loss_fn, pop = build_problem(unit["problem"], n=unit["n"], m=unit["m"], n_data=unit["n_data"],
                                        seed=unit["problem_seed"])
    grad, S = exact_moments(model, loss_fn, pop)
    name, rank, c = unit["projector"], unit["rank"], unit["c"]
    if name == "full":
        projector = None
    elif name == "instance":
        projector = lambda n_: InstanceDependent(S, rank, c=c)  # noqa: E731
    else:
        projector = name
    gen = make_generator(seed)
    options = _OPTIONS.get((unit["method"], unit["problem"]), {})
    R, N = unit["n_reps"], unit["n_samples"]
    est = torch.empty((R, *grad.shape), dtype=torch.float64)
    kw = dict(projector=projector, rank=None if projector is None else rank, c=c,
              share_projection=unit["mode"] == "dependent")
    if unit["method"] == "ipa":
        from estimators.ipa import ipa_replications

        est = ipa_replications(model, loss_fn, pop.sample_batches(R, N, generator=gen), generator=gen,
                               **kw)["fc.weight"]
    else:
        for i in range(R):
            est[i] = estimate(model, loss_fn, pop.sample(N, generator=gen), method=unit["method"],
                              generator=gen, **kw, **options)["fc.weight"]
    res = unbiasedness_test(est.numpy(), grad)
    return [{
        "problem": unit["problem"], "method": unit["method"], "projector": name, "rank": rank, "mode": unit["mode"],
        "c": c, "control": unit["control"], "n_reps": R, "n_samples": N, "statistic": res.statistic,
        "p_raw": res.pvalue, "max_abs_z": res.max_abs_z, "n_tests": res.n_tests,
    }]


def run(ctx: StudyContext) -> None:
    """Test every cell; write the raw and the schema CSVs, the figure and the checks."""
    from statsmodels.stats.multitest import multipletests

    n = ctx.param("n", 8)
    m = ctx.param("m", 4)
    rank = ctx.param("rank", 3)
    n_data = ctx.param("n_data", 32)
    n_samples = ctx.param("n_samples", 4)
    n_reps = ctx.param("n_reps", 2000, 20000)
    n_reps_loop = ctx.param("n_reps_loop", 400, 4000)  # LR and ZO: one estimate() call per replication
    alpha = ctx.param("alpha", 0.01)
    methods = ctx.param("methods", list(METHODS))
    projectors = ctx.param("projectors", list(PROJECTORS))
    problems = ctx.param("problems", list(PROBLEM_FILES))
    ctx.record_config(method_options={f"{k[0]}/{k[1]}": v for k, v in _OPTIONS.items()},
                      correction="Holm across the non-control cells of all problems (statsmodels)")
    from ._core import unit_seed

    problem_seed = unit_seed(ctx.seed, ("problem",)) % 2**31
    base = {"n": n, "m": m, "n_data": n_data, "problem_seed": problem_seed, "n_samples": n_samples}
    units = []
    for prob in problems:
        for meth in methods:
            R = n_reps if meth == "ipa" else n_reps_loop
            for proj in projectors:
                for mode in ("dependent", "independent"):
                    units.append({**base, "problem": prob, "method": meth, "projector": proj,
                                  "rank": n if proj == "full" else rank, "mode": mode, "c": 1.0,
                                  "control": False, "n_reps": R})
            # the mutant: Haar frames without the √(n/r) scale, so E[VVᵀ] = (r/n) I
            units.append({**base, "problem": prob, "method": meth, "projector": "haar", "rank": rank,
                          "mode": "dependent", "c": rank / n, "control": True, "n_reps": R})
    key = ["problem", "method", "projector", "rank", "mode", "c"]
    rows = ctx.run_units(RAW, RAW_COLUMNS, key, units, _unit)

    import pandas as pd

    raw = pd.read_csv(ctx.csv_path(RAW))
    raw["control"] = raw["control"].astype(str) == "True"
    cells = raw[~raw["control"]].copy()
    cells["p_value"] = multipletests(cells["p_raw"].to_numpy(), method="holm")[1]
    cells["rejected"] = cells["p_value"] < alpha
    for prob, fname in PROBLEM_FILES.items():
        d = cells[cells["problem"] == prob]
        if len(d):
            d[COLUMNS].to_csv(ctx.csv_path(fname), index=False, float_format="%.17g")
    for _, row in cells.iterrows():
        ctx.add_check(
            f"unbiasedness {row['problem']}/{row['method']}/{row['projector']}/{row['mode']}: not rejected",
            not row["rejected"], p_value=float(row["p_value"]), p_raw=float(row["p_raw"]),
            max_abs_z=float(row["max_abs_z"]),
            **({} if not row["rejected"] else {
                "why": f"Holm-adjusted p = {row['p_value']:.2g} < alpha = {alpha}: a bias this size is "
                       "not expected from the theory; look at this estimator"}))
    for _, row in raw[raw["control"]].iterrows():
        ctx.add_check(
            f"unbiasedness power: unscaled-Haar mutant c=r/n={row['c']:.3g} ({row['problem']}/{row['method']}) rejected",
            row["p_raw"] < alpha, p_raw=float(row["p_raw"]), max_abs_z=float(row["max_abs_z"]),
            n_reps=int(row["n_reps"]),
            **({} if row["p_raw"] < alpha else {"why": f"too few replications (n_reps={row['n_reps']}) "
                                                       "to detect the shrunken mean of this noisy estimator"}))
    if ctx.param("figures", True):
        save_figure(plot(raw, alpha=alpha), ctx.out, "unbiasedness")


def plot(raw, *, alpha: float = 0.01, **_):
    """``−log10 p`` of every cell by projector, method and mode, with the mutants for scale.

    Parameters
    ----------
    raw : pandas.DataFrame
        ``unbiasedness_raw.csv``: per-cell p-values (Holm within the cell).
    alpha : float
        Family-wise level; the dashed line is the Holm threshold of the
        smallest p-value, ``α / K`` over the ``K`` cells.

    Returns
    -------
    matplotlib.figure.Figure
    """
    set_plot_theme()
    import matplotlib.pyplot as plt
    import seaborn as sns

    raw = raw.copy()
    raw["neglog10p"] = -np.log10(np.clip(raw["p_raw"].astype(float), 1e-300, 1.0))
    is_ctrl = raw["control"].astype(str) == "True"
    d = raw[~is_ctrl]
    ctrl = raw[is_ctrl]
    thresh = -math.log10(alpha / max(len(d), 1))
    top = max(thresh + 2.0, float(d["neglog10p"].max()) + 1.0)
    problems = [p for p in PROBLEM_FILES if p in set(d["problem"])]
    order = [p for p in PROJECTORS if p in set(d["projector"])]
    methods = [m for m in METHODS if m in set(d["method"])]
    palette = dict(zip(methods, sns.color_palette("colorblind", len(methods))))
    fig, axes = plt.subplots(len(problems), 2, figsize=(11, 3.6 * len(problems)), squeeze=False,
                             constrained_layout=True, sharey=True)
    for i, prob in enumerate(problems):
        for j, mode in enumerate(("dependent", "independent")):
            ax = axes[i, j]
            e = d[(d["problem"] == prob) & (d["mode"] == mode)]
            sns.stripplot(data=e, x="projector", y="neglog10p", hue="method", order=order, hue_order=methods,
                          palette=palette, dodge=True, size=6, jitter=False, ax=ax, legend=(i == 0 and j == 0))
            ax.axhline(thresh, color="black", ls="--", lw=1)
            if mode == "dependent":
                cc = ctrl[ctrl["problem"] == prob]
                for k, (_, row) in enumerate(cc.iterrows()):
                    x = order.index("haar") + (methods.index(row["method"]) - (len(methods) - 1) / 2) * 0.27
                    ax.plot([x], [top - 0.4], marker="X", ms=9, color=palette[row["method"]], mec="firebrick")
                    ax.annotate(f"{row['neglog10p']:.0f}", (x, top - 0.4), textcoords="offset points",
                                xytext=(0, -12), ha="center", fontsize=7, color="firebrick")
            ax.set_ylim(0, top)
            ax.set_title(f"{'ReLU network (Example 1)' if prob == 'relu' else 'quadratic model'}, {mode}")
            ax.set_xlabel("projector")
            ax.set_ylabel("−log10 p of the cell")
            ax.tick_params(axis="x", rotation=30)
    fig.suptitle("Unbiasedness tests: points (correct estimators) should stay below the dashed Holm threshold "
                 f"α/K (α = {alpha:g});\n red-edged X: the unscaled-Haar mutant (E ĝ = (r/n)∇), drawn at the top, "
                 "its −log10 p written below", fontsize=9)
    return fig
