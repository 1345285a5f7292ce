r"""Study ``llm-gradients``: what LLaMA layer gradients look like to each projector.

A LLaMA model (random initialisation, the byte-level corpus of
:mod:`estimators.data`) is pretrained with full-rank AdamW under the schedule
of the ``pretrain`` study.  At each checkpoint step, for every weight matrix
``Θ ∈ R^{m×n}`` of the transformer blocks (attention q/k/v/o, MLP
gate/up/down), a window of ``window`` mini-batch gradients ``G_1..G_w`` is
taken at the frozen parameters, and

* the full gradient ``∇ = w⁻¹ Σ G_k`` (the gradient of the window's union
  batch): its singular values, stable rank ``‖∇‖²_F/‖∇‖²_2`` and effective rank
  ``exp(H(s/Σs))`` (Roy & Vetterli);
* ``S = w⁻¹ Σ G_kᵀ G_k``, the second moment of the mini-batch gradient;
* for each projector family and rank ``r``: the exact MSE ``E‖G V Vᵀ − ∇‖²_F``
  of the low-rank estimator of one mini-batch gradient, by :func:`theory.mse`
  (``S``, ``∇`` and ``M = E[(VVᵀ)²]`` of the family; for ``instance``, the
  optimal design for this ``S``: ``M = Q diag(1/π*) Qᵀ``), and by Monte Carlo
  (``n_reps`` draws of ``V`` from the sampler, each scored by its error averaged over the window) on
  the matrices of ``mc_blocks``.

Taking ``G`` uniform over the window makes ``S`` and ``∇`` the exact moments
of the law sampled by the Monte Carlo, so the two must agree within Monte
Carlo error; ``z = (mc − theory)/se`` is recorded and checked (``run.json``).

Outputs
-------
``llm_ranks.csv``
    ``step, layer, layer_type, block, m, n, grad_norm2, trace_S, stable_rank,
    effective_rank, stable_rank_S``
``llm_spectra.csv``
    ``step, layer, layer_type, block, index, singular_value`` (of ``∇``)
``llm_mse.csv``
    ``step, layer, layer_type, block, m, n, projector, rank, mse_theory, mse_mc,
    mse_se, n_reps, z, gain_vs_haar`` (``gain_vs_haar`` = Haar MSE / this MSE,
    theory)
figures
    ``llm_gain`` (instance-dependent gain over Haar per layer type across
    training), ``llm_ranks`` (stable/effective rank), ``llm_spectra``,
    ``llm_mse_check`` (Monte Carlo against theory).
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch

import theory

from ._core import StudyContext, make_generator, save_figure, set_plot_theme, unit_seed
from .pretrain import _data, build_model, lr_factor, per_example_loss

__all__ = ["run", "layer_type", "rank_measures", "window_moments", "theory_mses", "monte_carlo_values", "monte_carlo_mse",
           "projector_mse", "PROJECTORS"]

PROJECTORS = ["haar", "coordinate", "gaussian", "rademacher", "instance"]
RANK_COLUMNS = ["step", "layer", "layer_type", "block", "m", "n", "grad_norm2", "trace_S", "stable_rank",
                "effective_rank", "stable_rank_S"]
SPEC_COLUMNS = ["step", "layer", "layer_type", "block", "index", "singular_value"]
MSE_COLUMNS = ["step", "layer", "layer_type", "block", "m", "n", "projector", "rank", "mse_theory", "mse_mc",
               "mse_se", "n_reps", "z", "gain_vs_haar"]
_TYPES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def layer_type(name: str) -> str:
    """``"q"``, ``"k"``, ``"v"``, ``"o"``, ``"gate"``, ``"up"`` or ``"down"`` from a module name.

    Examples
    --------
    >>> layer_type("model.layers.3.mlp.down_proj")
    'down'
    """
    last = name.rsplit(".", 1)[-1]
    if last not in _TYPES:
        raise ValueError(f"`name` is not an attention/MLP projection, got name={name!r}")
    return last[: -len("_proj")]


def _block(name: str) -> int:
    return next(int(p) for p in name.split(".") if p.isdigit())


def rank_measures(s) -> tuple[float, float]:
    """Stable rank ``Σs²/max s²`` and effective rank ``exp(−Σ p log p)``, ``p = s/Σs``.

    Examples
    --------
    >>> rank_measures(np.array([1.0, 1.0, 0.0]))
    (2.0, 2.0)
    """
    s = np.asarray(s, dtype=np.float64)
    if s.size == 0 or s.max() <= 0:
        return 0.0, 0.0
    stable = float((s**2).sum() / s.max() ** 2)
    p = s[s > 0] / s.sum()
    return stable, float(np.exp(-(p * np.log(p)).sum()))


def window_moments(G: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """``∇ = mean G_k`` and ``S = mean G_kᵀ G_k`` (float64) of a window ``G`` of shape ``(w, m, n)``."""
    G64 = G.detach().double().cpu()
    grad = G64.mean(0)
    S = torch.einsum("kmi,kmj->ij", G64, G64) / G64.shape[0]
    return grad.numpy(), (0.5 * (S + S.T)).numpy()


def _design(projector: str, n: int, r: int, S: np.ndarray):
    """The sampler of a family and its ``M = E[(VVᵀ)²]`` (a float ``α`` for the isotropic families)."""
    from estimators import InstanceDependent, make_projector

    if projector == "instance":
        P = InstanceDependent(S, r)  # the optimal design for this S (floor 0: S is exact for the window)
        return P, P.second_moment().numpy()
    P = make_projector(projector, n, r)
    return P, P.second_moment_factor()


def theory_mses(S: np.ndarray, grad: np.ndarray, projectors, r: int) -> dict:
    """``theory.mse`` of each projector family at rank ``r`` (one estimator sample, shared ``V``).

    ``theory.mse`` is affine in a scalar ``M = αI``, so the isotropic families
    cost two evaluations (``α = 0, 1``) instead of one each (each evaluation
    checks ``S`` with an eigendecomposition).
    """
    n = S.shape[0]
    out, designs = {}, {}
    iso = [p for p in projectors if p != "instance"]
    if iso:
        m0, m1 = theory.mse(S, grad, 0.0), theory.mse(S, grad, 1.0)
        for p in iso:
            P, alpha = _design(p, n, r, S)
            out[p], designs[p] = m0 + alpha * (m1 - m0), P
    if "instance" in projectors:
        P, M = _design("instance", n, r, S)
        out["instance"], designs["instance"] = theory.mse(S, grad, M), P
    return out, designs


def monte_carlo_values(G: torch.Tensor, grad, P, n_reps: int, *, generator, chunk=8) -> np.ndarray:
    """``n_reps`` i.i.d. draws of ``X(V) = w⁻¹ Σ_j ‖G_j V Vᵀ − ∇‖²_F``, ``V ~ P``; ``E X`` is the MSE.

    The average over the window is the exact conditional expectation over which
    mini-batch gradient is drawn (that choice would only add variance, large
    when one mini-batch gradient dominates the window).
    """
    if generator is None:
        raise TypeError("`generator` is required for the Monte Carlo")
    dtype = G.dtype
    gt = torch.as_tensor(np.asarray(grad), dtype=dtype)
    g2 = float((gt.double() ** 2).sum())
    vals = []
    for start in range(0, n_reps, chunk):
        k = min(chunk, n_reps - start)
        V = P.sample(batch_shape=(k,), generator=generator, dtype=dtype)  # (k, n, r)
        A = G.unsqueeze(0) @ V.unsqueeze(1)  # (k, w, m, r): G_j V for every window element
        C = (gt @ V).unsqueeze(1)  # (k, 1, m, r)
        W = (V.transpose(-1, -2) @ V).unsqueeze(1)  # (k, 1, r, r)
        sq = ((A.transpose(-1, -2) @ A) * W).sum(dim=(-2, -1))  # ‖G_j V Vᵀ‖²
        cross = (A * C).sum(dim=(-2, -1))  # ⟨G_j V Vᵀ, ∇⟩ = ⟨G_j V, ∇V⟩
        vals.append((sq - 2 * cross).double().mean(dim=1) + g2)
    return torch.cat(vals).numpy()


def monte_carlo_mse(G: torch.Tensor, grad, P, n_reps: int, *, generator, chunk=8) -> tuple[float, float]:
    """Mean and standard error of :func:`monte_carlo_values`."""
    x = monte_carlo_values(G, grad, P, n_reps, generator=generator, chunk=chunk)
    return float(x.mean()), (float(x.std(ddof=1) / math.sqrt(x.size)) if x.size > 1 else 0.0)


def _z(mc, se, th, dtype) -> float:
    # rounding floor: a (nearly) deterministic design, e.g. the instance design with most π_i = 1,
    # agrees with theory to the working precision only
    se_eff = math.hypot(se, 10 * float(torch.finfo(dtype).eps) * abs(th))
    return (mc - th) / se_eff if se_eff > 0 else 0.0


def projector_mse(G: torch.Tensor, projector: str, r: int, *, n_reps=0, generator=None) -> dict:
    """Exact and Monte Carlo MSE of ``ĝ = G_k V Vᵀ`` (``k`` uniform in the window) about ``∇``.

    Parameters
    ----------
    G : Tensor, shape (w, m, n)
        The window of mini-batch gradients (the law of ``G``).
    projector : {"haar", "coordinate", "gaussian", "rademacher", "instance"}
    r : int
    n_reps : int, default 0
        Monte Carlo draws of ``V`` (0: theory only); see :func:`monte_carlo_mse`.
    generator : torch.Generator
        Required when ``n_reps > 0``.

    Returns
    -------
    dict
        ``mse_theory`` (:func:`theory.mse` with the window's ``S`` and ``∇``),
        ``mse_mc``, ``mse_se``, ``n_reps``, ``z``.

    Examples
    --------
    >>> import torch
    >>> G = torch.randn(4, 3, 6, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    >>> out = projector_mse(G, "haar", 2, n_reps=200, generator=torch.Generator().manual_seed(1))
    >>> abs(out["z"]) < 5
    True
    """
    grad, S = window_moments(G)
    ths, designs = theory_mses(S, grad, [projector], r)
    th = ths[projector]
    out = {"mse_theory": th, "mse_mc": float("nan"), "mse_se": float("nan"), "n_reps": int(n_reps),
           "z": float("nan")}
    if n_reps > 0:
        mc, se = monte_carlo_mse(G, grad, designs[projector], n_reps, generator=generator)
        out.update(mse_mc=mc, mse_se=se, z=_z(mc, se, th, G.dtype))
    return out


# ----------------------------------------------------------------------------- training to checkpoints
def _train_to(cfg: dict, step_target: int, ckpt_dir: Path):
    """Model at ``step_target`` of the full-rank AdamW run (resumes from the latest checkpoint)."""
    data = _data(cfg["source"], cfg["seq_len"], None)
    init_gen = make_generator(unit_seed(cfg["study_seed"], ("init", 0)), "cpu")
    data_gen = make_generator(unit_seed(cfg["study_seed"], ("data", 0)), "cpu")
    device = torch.device(cfg["device"])
    extra = {"num_hidden_layers": int(cfg["layers"])} if cfg.get("layers") else {}
    model = build_model(cfg["size"], vocab_size=data.vocab_size, seq_len=cfg["seq_len"], generator=init_gen,
                        device=device, **extra)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg["lr"], betas=(0.9, 0.999), eps=1e-6, weight_decay=0.0)
    start = 0
    ckpts = sorted((int(p.stem.split("_")[1]), p) for p in ckpt_dir.glob("train_*.pt"))
    ckpts = [(s, p) for s, p in ckpts if s <= step_target]
    if ckpts:
        start, path = ckpts[-1]
        ck = torch.load(path, weights_only=False)
        model.load_state_dict(ck["model"])
        opt.load_state_dict(ck["opt"])
        data_gen.set_state(ck["data_gen"])
    for step in range(start, step_target):
        for g in opt.param_groups:
            g["lr"] = cfg["lr"] * lr_factor(step, cfg["steps"])
        ids = data.train[torch.randint(data.train.shape[0], (cfg["batch"],), generator=data_gen)].to(device)
        per_example_loss(model, ids).mean().backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    ckpt_dir.mkdir(parents=True, exist_ok=True)
    tmp = ckpt_dir / f"train_{step_target}.pt.tmp"
    torch.save({"model": model.state_dict(), "opt": opt.state_dict(), "data_gen": data_gen.get_state()}, tmp)
    tmp.replace(ckpt_dir / f"train_{step_target}.pt")
    return model, data


def _window(model, data, cfg, step) -> dict[str, torch.Tensor]:
    from estimators.llm import block_linear_names

    names = block_linear_names(model)
    gen = make_generator(unit_seed(cfg["study_seed"], ("window", step)), "cpu")
    device = next(model.parameters()).device
    out = {n: [] for n in names}
    for _ in range(cfg["window"]):
        ids = data.train[torch.randint(data.train.shape[0], (cfg["batch"],), generator=gen)].to(device)
        model.zero_grad(set_to_none=True)
        per_example_loss(model, ids).mean().backward()
        for n in names:
            out[n].append(model.get_submodule(n).weight.grad.detach().clone())
    model.zero_grad(set_to_none=True)
    return {n: torch.stack(v) for n, v in out.items()}




def _unit(unit: dict, seed: int) -> list[dict]:
    """All rows of one checkpoint; the three tables are cached and split by ``run``."""
    cfg = unit["_cfg"]
    step = int(unit["step"])
    model, data = _train_to(cfg, step, Path(cfg["ckpt_dir"]))
    window = _window(model, data, cfg, step)
    del model
    ranks, spectra, mses = [], [], []
    gen = make_generator(unit_seed(cfg["study_seed"], ("mc", step)), "cpu")
    for name, G in window.items():
        base = {"step": step, "layer": name, "layer_type": layer_type(name), "block": _block(name)}
        w, m, n = G.shape
        grad, S = window_moments(G)
        s = np.linalg.svd(grad, compute_uv=False)
        sS = np.sqrt(np.clip(np.linalg.eigvalsh(S), 0, None))[::-1]
        stable, eff = rank_measures(s)
        ranks.append({**base, "m": m, "n": n, "grad_norm2": float((s**2).sum()), "trace_S": float(np.trace(S)),
                      "stable_rank": stable, "effective_rank": eff, "stable_rank_S": rank_measures(sS)[0]})
        spectra += [{**base, "index": i, "singular_value": float(v)} for i, v in enumerate(s)]
        do_mc = base["block"] in cfg["mc_blocks"]
        Gc = G.double() if cfg["mc_float64"] else G
        for r in cfg["ranks"]:
            if r > n:
                continue
            ths, designs = theory_mses(S, grad, cfg["projectors"], r)
            haar = ths["haar"] if "haar" in ths else theory_mses(S, grad, ["haar"], r)[0]["haar"]
            for p in cfg["projectors"]:
                o = {"mse_theory": ths[p], "mse_mc": float("nan"), "mse_se": float("nan"), "n_reps": 0,
                     "z": float("nan")}
                if do_mc:
                    mc, se = monte_carlo_mse(Gc, grad, designs[p], cfg["n_reps"], generator=gen)
                    o.update(mse_mc=mc, mse_se=se, n_reps=cfg["n_reps"], z=_z(mc, se, ths[p], Gc.dtype))
                mses.append({**base, "m": m, "n": n, "projector": p, "rank": r, **o,
                             "gain_vs_haar": haar / ths[p] if ths[p] > 0 else float("nan")})
    parts = Path(cfg["ckpt_dir"]) / "parts"
    parts.mkdir(parents=True, exist_ok=True)
    import pandas as pd

    for table, rows in (("ranks", ranks), ("spectra", spectra)):
        tmp = parts / f"{table}_{step}.csv.tmp"
        pd.DataFrame(rows).to_csv(tmp, index=False)
        tmp.replace(parts / f"{table}_{step}.csv")
    return mses


def _plot(ranks, mse, spectra, out):
    import matplotlib.pyplot as plt
    import seaborn as sns

    set_plot_theme()
    order = ["q", "k", "v", "o", "gate", "up", "down"]
    inst = mse[mse.projector == "instance"]
    g = sns.relplot(inst, x="step", y="gain_vs_haar", hue="layer_type", hue_order=order, col="rank",
                    kind="line", marker="o", errorbar=None, estimator="median", height=3.4, aspect=1.1)
    g.set_axis_labels("training step", "MSE(Haar) / MSE(instance)  (median over blocks)")
    g.figure.suptitle("instance-dependent gain over Haar–Stiefel, per layer type", y=1.03)
    save_figure(g.figure, out, "llm_gain")
    fig, axes = plt.subplots(1, 2, figsize=(11, 3.8))
    sns.lineplot(ranks, x="step", y="stable_rank", hue="layer_type", hue_order=order, marker="o", ax=axes[0],
                 estimator="median", errorbar=None)
    sns.lineplot(ranks, x="step", y="effective_rank", hue="layer_type", hue_order=order, marker="o", ax=axes[1],
                 estimator="median", errorbar=None, legend=False)
    axes[0].set(title="stable rank of ∇ (median over blocks)")
    axes[1].set(title="effective rank of ∇ (median over blocks)")
    save_figure(fig, out, "llm_ranks")
    b0 = spectra[spectra.block == spectra.block.min()].copy()
    b0["s / s_max"] = b0["singular_value"] / b0.groupby(["step", "layer"])["singular_value"].transform("max")
    g = sns.relplot(b0, x="index", y="s / s_max", hue="step", col="layer_type", col_order=order, kind="line",
                    col_wrap=4, height=2.6, palette="viridis", facet_kws={"sharex": False})
    g.set(yscale="log")
    save_figure(g.figure, out, "llm_spectra")
    mc = mse.dropna(subset=["mse_mc"])
    if len(mc):
        fig, ax = plt.subplots(figsize=(5, 4.5))
        sns.scatterplot(mc, x="mse_theory", y="mse_mc", hue="projector", style="rank", ax=ax)
        lim = [mc[["mse_theory", "mse_mc"]].min().min(), mc[["mse_theory", "mse_mc"]].max().max()]
        ax.plot(lim, lim, "k:", lw=1)
        ax.set(xscale="log", yscale="log", xlabel="theory.mse", ylabel="Monte Carlo MSE",
               title="low-rank estimator MSE on LLaMA gradients")
        save_figure(fig, out, "llm_mse_check")


def run(ctx: StudyContext) -> None:
    """Train, take gradient windows at the checkpoints, write the three tables, figures and checks."""
    import pandas as pd
    from scipy import stats

    size = ctx.param("size", "llama_20m", "llama_60m")
    cfg = {
        "size": size,
        "steps": ctx.param("steps", 40, 2000),
        "checkpoints": ctx.param("checkpoints", [0, 20, 40], [0, 250, 500, 1000, 2000]),
        "batch": ctx.param("batch", 8, 32),
        "seq_len": ctx.param("seq_len", 64, 256),
        "lr": ctx.param("lr", 1e-3, 1e-3),
        "window": ctx.param("window", 4, 16),
        "ranks": ctx.param("ranks", [16, 64], [16, 64, 128]),
        "projectors": ctx.param("projectors", list(PROJECTORS)),
        "n_reps": ctx.param("n_reps", 16, 200),
        "mc_blocks": ctx.param("mc_blocks", [0], [0, 1, 2, 3, 4, 5, 6, 7]),
        "mc_float64": ctx.param("mc_float64", False, False),
        "source": ctx.param("source", "stdlib", "stdlib"),
        "layers": ctx.param("layers", 0, 0),  # 0: the shape's number of blocks
        "study_seed": int(ctx.seed),
        "device": ctx.device,
        "ckpt_dir": str(ctx.out / "ckpt"),
    }
    steps = sorted(cfg["checkpoints"])
    if steps[-1] > cfg["steps"]:
        raise ValueError(f"checkpoints must not exceed steps={cfg['steps']}, got {steps}")
    # one unit per checkpoint (in training order: each resumes from the previous checkpoint);
    # it returns the llm_mse.csv rows and leaves its ranks/spectra rows in ckpt/parts/
    units = [{"step": s, "_cfg": cfg} for s in steps]
    mse = pd.DataFrame(ctx.run_units("llm_mse.csv", MSE_COLUMNS, ["step"], units, _unit, desc="llm-gradients"))
    parts = Path(cfg["ckpt_dir"]) / "parts"
    ranks = pd.concat([pd.read_csv(parts / f"ranks_{s}.csv") for s in steps], ignore_index=True)[RANK_COLUMNS]
    spectra = pd.concat([pd.read_csv(parts / f"spectra_{s}.csv") for s in steps], ignore_index=True)[SPEC_COLUMNS]
    ranks.to_csv(ctx.out / "llm_ranks.csv", index=False)
    spectra.to_csv(ctx.out / "llm_spectra.csv", index=False)
    for df in (ranks, spectra, mse):
        for c in df.columns:
            if c not in ("layer", "layer_type", "projector"):
                df[c] = pd.to_numeric(df[c], errors="coerce")
    mc = mse.dropna(subset=["z"])
    if len(mc):
        # two-sided p-values of the z statistics, Holm over the whole family
        from statsmodels.stats.multitest import multipletests

        p = 2 * stats.norm.sf(np.abs(mc["z"].to_numpy()))
        reject = multipletests(p, alpha=1e-3, method="holm")[0]
        ctx.add_check("llm_mse_monte_carlo_matches_theory_mse", not reject.any(), n_tests=len(p),
                      max_abs_z=float(np.abs(mc["z"]).max()), min_p=float(p.min()), family_alpha=1e-3)
    inst = mse[mse.projector == "instance"]
    gains = inst.groupby(["rank", "step", "layer_type"])["gain_vs_haar"].median().reset_index()
    gains.to_csv(ctx.out / "llm_gain_by_type.csv", index=False)
    ctx.add_check("instance_never_worse_than_haar_in_theory", bool((inst["gain_vs_haar"] >= 1 - 1e-9).all()),
                  min_gain=float(inst["gain_vs_haar"].min()))
    ctx.record_config(gain_median_by_rank_step_type=gains.to_dict(orient="records"))
    _plot(ranks, mse, spectra, ctx.out)
