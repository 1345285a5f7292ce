r"""Study ``mse-vs-samples``: MSE of the low-rank estimators against the batch size.

The paper's Figures 2–5: the mean squared error ``E‖ĝ_N − ∇‖²_F`` of the
{independent, dependent} × {LR, IPA} estimators against the number of samples
``N``, for every projector family and full rank; Monte Carlo with standard
errors beside the closed form :func:`theory.mse` (theory.md §3):

* dependent (one ``V`` for the batch): ``tr(S_N M) − 2c‖∇‖² + ‖∇‖²`` with
  ``S_N = ∇ᵀ∇ + (S − ∇ᵀ∇)/N``; it levels off at the floor
  ``tr(∇ᵀ∇ M) − 2c‖∇‖² + ‖∇‖²`` (``(n/r − 1)‖∇‖²`` for Haar);
* independent (a fresh ``V_i`` per sample): ``[tr(S M) − c²‖∇‖²]/N``.

Problems (a finite data set of ``K`` examples, ``ξ`` uniform on it, so that the
true gradient is exact by enumeration):

* IPA on the one-hidden-layer ReLU network of the paper's Example 1
  (``aᵀ relu(Θx)``, squared loss; the target is ``Θ``).  ``S = E[GᵀG]`` is
  exact: the mean of ``G_kᵀG_k`` over the data set.
* LR (noise ``ε ~ N(0, σ²I)`` in the layer output, antithetic pairs ``±ε``, no
  baseline) on the linear
  layer with a quadratic loss ``½‖Θx − y‖²``, whose smoothed and plain
  gradients coincide, so ``∇`` is exact.  ``S`` involves a Gaussian expectation
  that ``theory`` has no closed form for; it is estimated from ``n_ref``
  independent single-sample LR draws (a separate seed), and the resulting
  uncertainty of ``mse_theory`` is propagated into the 3-SE check (reported in
  ``run.json``, not in the CSV).

The inputs ``x`` have random signs and geometrically decaying scales, so ``S``
is anisotropic
and the instance-dependent projector (water-filling, theory.md §5) beats the
isotropic optimum ``n/r``.  For LR, whose ``S`` is estimated, that projector
mixes in the uniform design with weight ``instance_floor`` (theory.md §5: an
estimated ``S`` needs a floor); ``mse_theory`` uses the mixed design's exact ``M``.

Every sample goes through the library's estimators and their low-rank paths
(not a projection after the fact): :func:`estimators.ipa.ipa_replications` for
IPA (vectorised over replications; each equals an :func:`estimators.estimate`
call) and :func:`estimators.estimate` for LR.

Output: ``mse_vs_samples.csv`` with the schema of design.md
(``method, mode, projector, rank, n_samples, mse, mse_se, mse_theory, n_reps``),
``mse_vs_samples.png``/``.pdf``, the checks in ``run.json`` and the LR
reference sample in ``mse_reference.npz``.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

import theory

from ._core import StudyContext, make_generator, save_figure, set_plot_theme, unit_seed

__all__ = ["run", "plot", "build_problem", "exact_moments", "COLUMNS", "CSV", "PROJECTORS", "METHOD_PROBLEM"]

#: torch threads for ``--quick`` runs (tiny models: one thread is fastest; scale out with ``--n-jobs``)
QUICK_THREADS = 1

CSV = "mse_vs_samples.csv"
COLUMNS = ["method", "mode", "projector", "rank", "n_samples", "mse", "mse_se", "mse_theory", "n_reps"]
#: projector values of the schema ("full": the full-rank base estimator)
PROJECTORS = ("full", "haar", "coordinate", "gaussian", "rademacher", "instance")
#: the problem each method is studied on
METHOD_PROBLEM = {"ipa": "relu", "lr": "quadratic"}
_LABELS = {"full": "full rank", "haar": "Haar–Stiefel", "coordinate": "coordinate",
           "gaussian": "Gaussian", "rademacher": "Rademacher", "instance": "instance-dependent"}
_REF = "mse_reference.npz"


# ----------------------------------------------------------------------------- problems
def build_problem(kind: str, *, n: int, m: int, n_data: int, seed: int, decay: float = 0.85,
                  teacher: float = 3.0, noise: float = 0.1):
    """A model of :mod:`estimators.models` and a finite data set, all from ``seed``.

    Parameters
    ----------
    kind : {"relu", "quadratic"}
        ``"relu"``: :class:`~estimators.models.ReLUNet` ``aᵀ relu(Θx)`` (the
        paper's Example 1); ``"quadratic"``: :class:`~estimators.models.LinearModel`
        ``Θx``; both with :func:`~estimators.models.squared_loss`.
    n, m : int
        Input and output size of the targeted layer (``Θ ∈ R^{m×n}``, key ``"fc.weight"``).
    n_data : int
        Size ``K`` of the data set; ``ξ`` is uniform on it.
    seed : int
    decay : float
        Input ``j`` is ``± decay**j`` (random signs): bounded inputs, light
        tails, and an anisotropic ``S``.
    teacher, noise : float
        Targets ``y = teacher · W* x / √n + noise · N(0, 1)`` for a random linear
        teacher ``W*``: the model is far from it, so the per-example gradients
        share a direction and the signal ``‖∇‖²`` is not swamped by noise.

    Returns
    -------
    (model, loss_fn, population)
        ``population`` is an :class:`~estimators.models.FinitePopulation`.

    Examples
    --------
    >>> model, loss_fn, pop = build_problem("relu", n=6, m=3, n_data=10, seed=0)
    >>> loss_fn(model, pop.data).shape
    torch.Size([10])
    """
    import torch

    from estimators.models import FinitePopulation, LinearModel, ReLUNet, squared_loss

    g = make_generator(seed)
    dt = torch.float64
    scales = decay ** torch.arange(n, dtype=dt)
    X = (torch.randint(0, 2, (n_data, n), generator=g).to(dt) * 2 - 1) * scales
    if kind == "relu":
        model = ReLUNet(n, m, dtype=dt, generator=g)
        w = torch.randn(n, generator=g, dtype=dt)
        Y = teacher * (X @ w) / math.sqrt(n) + noise * torch.randn(n_data, generator=g, dtype=dt)
    elif kind == "quadratic":
        model = LinearModel(n, m, dtype=dt, generator=g)
        W = torch.randn(m, n, generator=g, dtype=dt)
        Y = teacher * (X @ W.T) / math.sqrt(n) + noise * torch.randn(n_data, m, generator=g, dtype=dt)
    else:
        raise ValueError(f"`kind` must be 'relu' or 'quadratic', got kind={kind!r}")
    return model, squared_loss, FinitePopulation(X, Y)


def exact_moments(model, loss_fn, population):
    """Exact ``∇`` (m×n) and ``S = E[GᵀG]`` (n×n) of IPA over the finite data set.

    Per-example gradients by plain autograd, one example at a time: an
    enumeration independent of :func:`estimators.estimate`.
    """
    import torch

    X, Y = population.data
    W = model.fc.weight
    grads = []
    for k in range(X.shape[0]):
        (gk,) = torch.autograd.grad(loss_fn(model, (X[k:k + 1], Y[k:k + 1])).sum(), W)
        grads.append(gk.detach().numpy())
    G = np.stack(grads)  # (K, m, n)
    return G.mean(0), np.einsum("kmi,kmj->ij", G, G) / G.shape[0]


def _make_projector(name, S, n, rank, floor=0.0):
    if name == "full":
        return None
    if name == "instance":
        from estimators.instance import InstanceDependent

        return lambda n_: InstanceDependent(S, rank, floor=floor)
    return name


def _second_moment(name, S, n, rank, floor=0.0) -> np.ndarray | float:
    if name == "full":
        return 1.0
    if name == "instance":
        from estimators.instance import InstanceDependent

        return InstanceDependent(S, rank, floor=floor).second_moment().double().numpy()
    return theory.isotropic_second_moment(name, n, rank)


def _floor(unit) -> float:
    """Mixing weight of the uniform design in the instance-dependent projector.

    0 when ``S`` is exact (IPA); ``instance_floor`` when it is estimated (LR), as
    theory.md §5 advises: tiny inclusion probabilities of an estimated ``S``
    would give the squared error very heavy tails.
    """
    return unit["instance_floor"] if unit["method"] == "lr" else 0.0


# ----------------------------------------------------------------------------- one unit
def _setting(unit):
    """Model, loss, data, exact ``∇`` and ``S`` (estimated ``S`` for LR) of a unit."""
    kind = METHOD_PROBLEM[unit["method"]]
    model, loss_fn, pop = build_problem(kind, n=unit["n"], m=unit["m"], n_data=unit["n_data"],
                                        seed=unit["problem_seed"])
    grad, S = exact_moments(model, loss_fn, pop)
    if unit["method"] == "lr":
        with np.load(unit["_reference"]) as z:
            S = z["S"]
    return model, loss_fn, pop, grad, S


def _squared_errors(unit, model, loss_fn, pop, S, truth, gen):
    """``‖ĝ_N − ∇‖²`` of ``n_reps`` independent replications."""
    import torch

    from estimators.estimate import estimate
    from estimators.ipa import ipa_replications

    n, rank, N, R = unit["n"], unit["rank"], unit["n_samples"], unit["n_reps"]
    projector = _make_projector(unit["projector"], S, n, rank, _floor(unit))
    kw = dict(projector=projector, rank=None if projector is None else rank,
              share_projection=unit["mode"] == "dependent")
    errs = []
    if unit["method"] == "ipa":  # vectorised over replications, in chunks of <= 2**15 examples
        chunk = max(1, 2**15 // N)
        for start in range(0, R, chunk):
            batches = pop.sample_batches(min(chunk, R - start), N, generator=gen)
            est = ipa_replications(model, loss_fn, batches, generator=gen, **kw)["fc.weight"]
            errs.append(((est - truth) ** 2).sum(dim=(-2, -1)).numpy())
        return np.concatenate(errs)
    for _ in range(R):
        est = estimate(model, loss_fn, pop.sample(N, generator=gen), method=unit["method"], generator=gen,
                       sigma=unit["sigma"], antithetic=True, **kw)["fc.weight"]
        errs.append(float(((est - truth) ** 2).sum()))
    return np.asarray(errs)


def _unit(unit: dict, seed: int) -> list[dict]:
    import torch

    model, loss_fn, pop, grad, S = _setting(unit)
    n, rank, N, R = unit["n"], unit["rank"], unit["n_samples"], unit["n_reps"]
    name = unit["projector"]
    errs = _squared_errors(unit, model, loss_fn, pop, S, torch.as_tensor(grad), make_generator(seed))
    M = _second_moment(name, S, n, rank, _floor(unit))
    mse_theory = theory.mse(S, grad, M, n_samples=N, mode=unit["mode"])
    return [{
        "method": unit["method"], "mode": unit["mode"], "projector": name, "rank": rank,
        "n_samples": N, "mse": float(errs.mean()), "mse_se": float(errs.std(ddof=1) / math.sqrt(R)),
        "mse_theory": mse_theory, "n_reps": R,
    }]


def _reference(out: Path, *, n, m, rank, n_data, problem_seed, sigma, n_ref, seed, floor) -> Path:
    """``S`` of the LR estimator from ``n_ref`` independent single-sample full-rank draws ``G_i``.

    Saves ``S = mean G_iᵀG_i`` and, for the standard error of ``mse_theory``,
    the per-draw ``‖G_i‖²`` and ``tr(G_iᵀ G_i M)`` for the instance-dependent
    ``M`` built from that ``S``.  Deterministic given its seed, so a resumed
    run recomputes (or reuses) exactly the same file.
    """
    import torch

    from estimators.estimate import estimate

    path = out / _REF
    tag = np.array([n, m, rank, n_data, problem_seed, n_ref, seed], dtype=np.int64)
    if path.exists():
        with np.load(path) as z:
            if np.array_equal(z["tag"], tag) and float(z["sigma"]) == sigma and float(z["floor"]) == floor:
                return path
    model, loss_fn, pop = build_problem("quadratic", n=n, m=m, n_data=n_data, seed=problem_seed)
    gen = make_generator(seed)
    G = np.empty((n_ref, m, n))
    for i in range(n_ref):
        G[i] = estimate(model, loss_fn, pop.sample(1, generator=gen), method="lr", generator=gen,
                        sigma=sigma, antithetic=True)["fc.weight"].numpy()
    S = np.einsum("kmi,kmj->ij", G, G) / n_ref
    M_inst = _second_moment("instance", S, n, rank, floor)
    tmp = out / (_REF + ".tmp.npz")
    np.savez(tmp, S=S, sqnorm=np.einsum("kmi,kmi->k", G, G), inst=np.einsum("kmi,ij,kmj->k", G, M_inst, G),
             tag=tag, sigma=sigma, floor=floor)
    tmp.replace(path)
    return path


def _theory_se(unit) -> float:
    """Standard error of ``mse_theory`` due to the estimated ``S`` (LR); 0 when ``S`` is exact.

    ``theory.mse`` depends on ``S`` only through ``tr(S M)/N``; its SE is that of
    the mean of ``tr(G_iᵀ G_i M)`` over the reference draws, divided by ``N``.
    """
    if unit["method"] != "lr":
        return 0.0
    with np.load(unit["_reference"]) as z:
        sqnorm, inst = z["sqnorm"], z["inst"]
    name = unit["projector"]
    if name == "instance":
        vals = inst
    else:
        vals = sqnorm * (1.0 if name == "full" else theory.isotropic_second_moment(name, unit["n"], unit["rank"]))
    return float(vals.std(ddof=1) / math.sqrt(len(vals)) / unit["n_samples"])


# ----------------------------------------------------------------------------- study
def run(ctx: StudyContext) -> None:
    """Monte Carlo MSE for every method × mode × projector × N; CSV, figure, checks."""
    n = ctx.param("n", 16)
    m = ctx.param("m", 4)
    rank = ctx.param("rank", 4)
    n_data = ctx.param("n_data", 64)
    sigma = ctx.param("sigma", 0.5)
    n_samples = ctx.param("n_samples", [1, 4, 16, 64, 256, 1024], [2**k for k in range(13)])
    n_reps = ctx.param("n_reps", 1000, 10000)
    n_reps_lr = ctx.param("n_reps_lr", 250, 2500)
    n_ref = ctx.param("n_ref", 10000, 200000)
    instance_floor = ctx.param("instance_floor", 0.1)
    methods = ctx.param("methods", ["ipa", "lr"])
    projectors = ctx.param("projectors", list(PROJECTORS))
    problem_seed = unit_seed(ctx.seed, ("problem",)) % 2**31
    ctx.record_config(problem_seed=problem_seed, problems=METHOD_PROBLEM, lr_options={"sigma": sigma,
                      "antithetic": True, "baseline": None})
    ref_path = None
    if "lr" in methods:
        ref_path = _reference(ctx.out, n=n, m=m, rank=rank, n_data=n_data, problem_seed=problem_seed, sigma=sigma,
                              n_ref=n_ref, seed=unit_seed(ctx.seed, ("reference",)) % 2**31, floor=instance_floor)
    units = [
        {"method": meth, "mode": mode, "projector": proj, "rank": rank if proj != "full" else n,
         "n_samples": N, "n_reps": n_reps_lr if meth == "lr" else n_reps, "n": n, "m": m, "n_data": n_data, "problem_seed": problem_seed,
         "sigma": sigma, "instance_floor": instance_floor, "_reference": str(ref_path) if meth == "lr" else ""}
        for meth in methods for mode in ("independent", "dependent") for proj in projectors for N in n_samples
    ]
    key = ["method", "mode", "projector", "rank", "n_samples"]
    rows = ctx.run_units(CSV, COLUMNS, key, units, _unit)
    floors = _floors(units)
    ctx.record_config(floors={f"{m_}/{p_}": v for (m_, p_), v in floors.items()})
    _check(ctx, rows, units, floors)
    if ctx.param("figures", True):
        import pandas as pd

        save_figure(plot(pd.read_csv(ctx.csv_path(CSV)), floors=floors), ctx.out, "mse_vs_samples")


def _floors(units) -> dict:
    """The predicted dependent floor ``tr(∇ᵀ∇M) − 2‖∇‖² + ‖∇‖²`` per (method, projector)."""
    floors = {}
    for u in units:
        k = (u["method"], u["projector"])
        if k in floors or u["projector"] == "full":
            continue
        _, _, _, grad, S = _setting(u)
        M = _second_moment(u["projector"], S, u["n"], u["rank"], _floor(u))
        floors[k] = theory.mse(grad.T @ grad, grad, M, n_samples=1, mode="dependent")
    return floors


def _check(ctx: StudyContext, rows, units, floors) -> None:
    by_key = {(u["method"], u["mode"], u["projector"], str(u["rank"]), str(u["n_samples"])): u for u in units}
    n_rows = len(rows)
    for row in rows:
        u = by_key[(row["method"], row["mode"], row["projector"], row["rank"], row["n_samples"])]
        mc, se, th = float(row["mse"]), float(row["mse_se"]), float(row["mse_theory"])
        se_th = _theory_se(u)
        tot = math.hypot(se, se_th)
        z = (mc - th) / tot if tot > 0 else (0.0 if math.isclose(mc, th, rel_tol=1e-9) else math.inf)
        ok = abs(z) <= 3.0
        detail = {"mse": mc, "mse_se": se, "mse_theory": th, "theory_se": se_th, "z": z}
        if not ok:
            detail["why"] = (
                f"|z| = {abs(z):.2f} > 3: under H0 each of {n_rows} rows exceeds 3 SE with probability "
                f"about 0.27 % (more for the heavy-tailed squared errors at n_reps={u['n_reps']}, where the "
                "SE itself is noisy)")
        label = f"{row['method']}/{row['mode']}/{row['projector']} N={row['n_samples']}"
        ctx.add_check(f"mse-vs-samples {label}: MC within 3 SE of theory.mse", ok, **detail)
    n_max = max(u["n_samples"] for u in units)
    for row in rows:
        if row["mode"] != "dependent" or row["projector"] == "full" or int(row["n_samples"]) != n_max:
            continue
        floor = floors[(row["method"], row["projector"])]
        th, mc, se = float(row["mse_theory"]), float(row["mse"]), float(row["mse_se"])
        gap = (th - floor) / floor
        ctx.add_check(
            f"mse-vs-samples {row['method']}/dependent/{row['projector']}: levels off at the floor",
            gap < 0.25 and abs(mc - th) <= 3 * se, floor=floor, mse=mc, mse_se=se, mse_theory=th,
            theory_above_floor=gap,
            **({} if gap < 0.25 else {"why": f"N={n_max} is not yet on the plateau (theory {gap:.0%} above it)"}))


def plot(df, *, floors: dict | None = None):
    """Figures 2–5 in one: {independent, dependent} × {IPA, LR}, log–log MSE against N.

    Theory (``mse_theory``) as lines, Monte Carlo as points with ±2 SE error
    bars, the dependent floors as dotted lines.

    Parameters
    ----------
    df : pandas.DataFrame
        ``mse_vs_samples.csv``.
    floors : dict, optional
        ``{(method, projector): floor}`` (or ``{"method/projector": floor}``, as
        in ``run.json``'s ``config.floors``) drawn in the dependent panels.

    Returns
    -------
    matplotlib.figure.Figure
    """
    set_plot_theme()
    import matplotlib.pyplot as plt
    import seaborn as sns

    floors = {tuple(k.split("/", 1)) if isinstance(k, str) else tuple(k): v for k, v in (floors or {}).items()}
    methods = [m for m in ("ipa", "lr") if m in set(df["method"])]
    modes = ["independent", "dependent"]
    projs = [p for p in PROJECTORS if p in set(df["projector"])]
    colors = dict(zip(projs, sns.color_palette("colorblind", len(projs))))
    markers = dict(zip(projs, ["o", "s", "^", "D", "v", "P"]))
    fig, axes = plt.subplots(len(methods), 2, figsize=(10, 3.9 * len(methods)), squeeze=False,
                             constrained_layout=True, sharex=True)
    for i, meth in enumerate(methods):
        for j, mode in enumerate(modes):
            ax = axes[i, j]
            d = df[(df["method"] == meth) & (df["mode"] == mode)]
            for p in projs:
                e = d[d["projector"] == p].sort_values("n_samples")
                if e.empty:
                    continue
                ax.plot(e["n_samples"], e["mse_theory"], color=colors[p], lw=1.3)
                ax.errorbar(e["n_samples"], e["mse"], yerr=2 * e["mse_se"], fmt=markers[p], color=colors[p],
                            ms=4.5, capsize=2.5, ls="none", label=_LABELS[p])
                if floors and mode == "dependent" and (meth, p) in floors:
                    ax.axhline(floors[(meth, p)], color=colors[p], ls=":", lw=1)
            ax.set_xscale("log", base=2)
            ax.set_yscale("log")
            ax.set_title(f"{meth.upper()}, {mode} projections")
            ax.set_xlabel("number of samples N")
            ax.set_ylabel("MSE  E‖ĝ_N − ∇‖²")
    axes[0, 0].legend(fontsize=8, loc="lower left")
    r = df.loc[df["projector"] != "full", "rank"]
    fig.suptitle("MSE against samples: lines theory.mse, points Monte Carlo ± 2 SE, dotted the dependent floor"
                 + (f" (r = {int(r.iloc[0])})" if len(r) else ""), fontsize=10)
    return fig
