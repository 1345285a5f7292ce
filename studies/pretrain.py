r"""Study ``pretrain``: causal-LM pretraining of LLaMA shapes, low-rank estimators against GaLore and full rank.

Every method trains the same randomly initialised ``LlamaForCausalLM`` (one
initialisation per seed) on the same token batches with the same schedule
(linear warm-up over ``warmup`` of the steps, then cosine decay to
``min_lr_ratio`` of the peak):

=================  ============  ==================================================================
method             projector     what is trained, and how
=================  ============  ==================================================================
``full_bp``        ``full``      every parameter, backprop, AdamW
``galore``         ``svd``       GaLore's AdamW (``galore-torch``): block matrices through the top-r
                                 singular subspace of the gradient, refreshed every ``K`` steps,
                                 scale ``galore_scale``; the rest full rank
``ipa_lowrank``    ``haar``,     lazy update (theory.md §8) by :class:`estimators.LazyUpdate`: each
                   ``coordinate``, block ``nn.Linear`` becomes ``Θ + B Vᵀ``
                   ``gaussian``,  (:func:`estimators.lowrank.convert`), inner AdamW on ``B`` (and on
                   ``instance``   embeddings, norms and head, full rank); every ``K`` steps
                                 ``Θ ← Θ + B Vᵀ``, ``B ← 0``, a new ``V``, Adam state of ``B`` reset
``lr_full``        ``full``      forward only: antithetic likelihood-ratio estimates
                                 (:func:`estimators.estimate`, ``method="lr"``: noise ``N(0, σ²)`` on
                                 every block Linear's and the head's output), AdamW
``lr_lowrank``     ``haar``      forward only: :class:`estimators.LazyUpdate` with the same estimator
                                 (:func:`estimators.lr.lr_estimate`) for ``B`` of the low-rank layers
                                 (features ``Vᵀx``) and, in the same passes, the head at full rank
=================  ============  ==================================================================

``instance`` uses :class:`estimators.lazy.InstanceDependentFactory`: at each
merge, every layer's new ``V`` is drawn from the instance-dependent design
(water-filling inclusion probabilities mixed with the uniform ``r/n``, weight
``instance_floor``) built from its last ``instance_window`` lifted gradient
estimates ``G_B Vᵀ``; the first subspace is Haar–Stiefel (no gradient seen yet).

The learning rate of each method is the best (lowest final validation loss) of
a small grid, run first on a separate sweep seed for ``sweep_steps`` steps
(``pretrain_sweep.csv``, and ``chosen_lr`` in ``run.json``); the final runs use
``seeds`` seeds.

Outputs
-------
``pretrain.csv``
    ``size, method, projector, rank, seed, step, tokens, train_loss, val_loss, lr,
    wall_s, peak_bytes`` (shared/design.md): one row per evaluation; ``rank`` 0
    means full rank; ``lr`` is the run's peak learning rate; ``train_loss`` the
    mean training loss since the previous row (NaN at step 0); ``wall_s`` the
    cumulative training time (evaluation excluded); ``peak_bytes`` on CUDA is
    ``torch.cuda.max_memory_allocated``, on the CPU the measured bytes of the live
    tensors at the first step's peak (parameters and buffers, gradients,
    optimiser state, tensors saved for backward; for the LR methods the noise and
    features the estimator keeps, counted from their shapes; for ``instance`` the
    factory's window of ``instance_window`` stored gradients).
``pretrain_sweep.csv``
    the same schema for the learning-rate sweep.
``pretrain_table.csv`` / ``.md``
    final validation loss (mean and 95 % t-interval over seeds), perplexity,
    tokens per second and peak memory per method, at equal steps.
``pretrain_summary.json``
    paired comparisons over seeds (Haar–Stiefel against Gaussian, GaLore, full rank).
figures
    ``pretrain_loss_steps`` and ``pretrain_loss_wall`` (PNG and PDF).

Resumption.  Each run is a unit of :meth:`StudyContext.run_units`; a run that
is interrupted restarts from its last checkpoint (``ckpt/``, every
``ckpt_every`` steps) and ends with the same rows (``wall_s`` aside): the
checkpoint holds the model, the optimiser state (for the low-rank methods
``LazyUpdate.state_dict``: inner AdamW, position in the subspace, ``V``'s,
generator, the instance factory's gradients) and both generators.

Determinism.  Everything random is drawn from generators seeded by the study
seed and the run's key.  Across processes, the methods that call QR or SVD
(Haar and instance projections, GaLore) inherit the run-to-run rounding of
multithreaded LAPACK (``torch.linalg.qr``/``svd`` results differ between
thread counts), which training amplifies (measured: up to 0.035 nats in the
final validation loss of the instance-dependent runs, 5e-5 for Haar); the
other methods were bit-identical between runs.  On one thread (``threads=1``,
the quick default) two quick runs gave identical rows (``wall_s`` aside).
"""

from __future__ import annotations

import math
import time
import warnings
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from ._core import StudyContext, make_generator, save_figure, set_plot_theme, unit_seed

__all__ = [
    "run",
    "train_run",
    "METHODS",
    "COLUMNS",
    "CSV",
    "lr_factor",
    "build_model",
    "per_example_loss",
    "summarise",
]

CSV = "pretrain.csv"
SWEEP_CSV = "pretrain_sweep.csv"
COLUMNS = ["size", "method", "projector", "rank", "seed", "step", "tokens", "train_loss", "val_loss",
           "lr", "wall_s", "peak_bytes"]
KEY = ["size", "method", "projector", "rank", "seed", "lr"]

#: (method, projector) pairs of the study, in display order.
METHODS = [
    ("full_bp", "full"),
    ("galore", "svd"),
    ("ipa_lowrank", "haar"),
    ("ipa_lowrank", "coordinate"),
    ("ipa_lowrank", "gaussian"),
    ("ipa_lowrank", "instance"),
    ("lr_full", "full"),
    ("lr_lowrank", "haar"),
]
_LABEL = {
    ("full_bp", "full"): "full rank (AdamW)",
    ("galore", "svd"): "GaLore",
    ("ipa_lowrank", "haar"): "low rank, Haar–Stiefel",
    ("ipa_lowrank", "coordinate"): "low rank, coordinate",
    ("ipa_lowrank", "gaussian"): "low rank, Gaussian",
    ("ipa_lowrank", "instance"): "low rank, instance-dependent",
    ("lr_full", "full"): "LR, full rank (forward only)",
    ("lr_lowrank", "haar"): "LR, low rank Haar (forward only)",
}
# learning-rate grids (peak lr); quick mode uses the first two of each
_LR_GRID = {
    "full_bp": [1e-3, 3e-3, 3e-4],
    "galore": [1e-2, 3e-3, 3e-2],
    "ipa_lowrank": [1e-3, 3e-3, 3e-4],
    "lr_full": [1e-4, 1e-3, 1e-5],
    "lr_lowrank": [1e-4, 1e-3, 1e-5],
}


def label(method: str, projector: str) -> str:
    """Display name of a (method, projector) pair."""
    return _LABEL.get((method, projector), f"{method}/{projector}")


# ----------------------------------------------------------------------------- schedule, model
def lr_factor(step: int, total: int, *, warmup=0.1, min_ratio=0.1) -> float:
    """Multiplier of the peak learning rate at ``step`` (0-based) of ``total``.

    Linear warm-up over ``warmup · total`` steps, then cosine decay to
    ``min_ratio`` (GaLore's schedule).

    Examples
    --------
    >>> lr_factor(0, 100), round(lr_factor(10, 100), 3), round(lr_factor(99, 100), 3)
    (0.1, 1.0, 0.1)
    """
    n_warm = max(1, int(round(warmup * total)))
    if step < n_warm:
        return (step + 1) / n_warm
    progress = (step - n_warm) / max(1, total - n_warm - 1)
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


def build_model(size: str, *, vocab_size: int, seq_len: int, generator, device="cpu", **overrides):
    """A randomly initialised ``LlamaForCausalLM`` of a named shape (``estimators.llm.build_llama``)."""
    from estimators.llm import build_llama

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = build_llama(size, vocab_size=vocab_size, max_position_embeddings=max(seq_len, 64),
                            generator=generator, **overrides)
    return model.to(device)


def per_example_loss(model, ids: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy of each sequence, shape ``(N,)``."""
    logits = model(input_ids=ids).logits[:, :-1]
    tgt = ids[:, 1:]
    loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), tgt.reshape(-1), reduction="none")
    return loss.view(tgt.shape).mean(dim=1)


@torch.no_grad()
def _evaluate(model, blocks: torch.Tensor, batch: int) -> float:
    tot = 0.0
    for i in range(0, blocks.shape[0], batch):
        tot += float(per_example_loss(model, blocks[i:i + batch]).sum())
    return tot / blocks.shape[0]


# ----------------------------------------------------------------------------- memory
def _storage_bytes(tensors) -> int:
    seen, tot = set(), 0
    for t in tensors:
        if not isinstance(t, torch.Tensor):
            continue
        st = t.untyped_storage()
        key = (st.data_ptr(), t.device.type)
        if key not in seen:
            seen.add(key)
            tot += st.nbytes()
    return tot


def _state_tensors(opt):
    for st in opt.state.values():
        for v in st.values():
            if isinstance(v, torch.Tensor):
                yield v
            elif hasattr(v, "ortho_matrix"):  # GaLore's projector
                om = v.ortho_matrix
                yield from (om if isinstance(om, (list, tuple)) else [om])


# ----------------------------------------------------------------------------- one run
_DATA_CACHE: dict = {}


def _data(source, seq_len, max_train_tokens):
    from estimators.data import load_lm_data

    key = (str(source), seq_len, max_train_tokens)
    if key not in _DATA_CACHE:
        _DATA_CACHE.clear()
        _DATA_CACHE[key] = load_lm_data(source, seq_len=seq_len, max_train_tokens=max_train_tokens)
    return _DATA_CACHE[key]


def _block_layers(model):
    from estimators.llm import block_linear_names

    return block_linear_names(model)


def _lr_kept_bytes(targets, ids, passes) -> int:
    """Bytes the LR estimator keeps per step: the noise ``ε`` (``m`` per token) once, the features per pass.

    ``estimators.lr`` stores, per targeted layer, ``ε`` of shape ``(N, T, m)``
    and, for each of the ``passes`` forward passes, the features ``x`` (``n`` per
    token) or ``Vᵀx`` (``r`` per token); counted from these shapes.
    """
    tokens = ids.shape[0] * ids.shape[1]
    tot = 0
    for t in targets:
        mod = t.module
        k = mod.rank if t.use_layer_V else mod.in_features
        tot += tokens * (mod.out_features + passes * k) * mod.weight.element_size()
    return tot


def _setup(spec, model, proj_gen):
    """Convert the model; return its optimiser and, for forward-only methods, the gradient estimator.

    The estimator is ``None`` (backprop) or a callable ``ids -> (loss, kept_bytes)``
    that sets the ``.grad`` of every trained parameter from library estimates:
    :func:`estimators.estimate` (``method="lr"``) for ``lr_full``;
    :func:`estimators.lr.lr_estimate` on the low-rank layers' ``B`` (their
    current ``V``) and the full-rank head, in the same antithetic passes, for
    ``lr_lowrank``.  Low-rank methods are trained by
    :class:`estimators.LazyUpdate` (inner AdamW).
    """
    from estimators import LazyUpdate, estimate
    from estimators.estimate import lowrank_targets, resolve_targets
    from estimators.lazy import InstanceDependentFactory
    from estimators.lowrank import convert, lowrank_layers
    from estimators.lr import lr_estimate

    method, projector, rank = spec["method"], spec["projector"], int(spec["rank"])
    lr = float(spec["lr"])
    blocks = _block_layers(model)
    adam = dict(lr=lr, betas=(0.9, 0.999), eps=1e-6, weight_decay=0.0)
    sigma = float(spec["lr_sigma"])
    estimator = None
    if method == "full_bp":
        opt = torch.optim.AdamW(model.parameters(), **adam)
    elif method == "galore":
        from galore_torch import GaLoreAdamW

        mats = {id(model.get_submodule(n).weight) for n in blocks}
        low = [p for p in model.parameters() if id(p) in mats]
        rest = [p for p in model.parameters() if id(p) not in mats]
        opt = GaLoreAdamW([{"params": rest},
                           {"params": low, "rank": rank, "update_proj_gap": int(spec["K"]),
                            "scale": float(spec["galore_scale"]), "proj_type": "std"}],
                          lr=lr, weight_decay=0.0, no_deprecation_warning=True)
    elif method in ("ipa_lowrank", "lr_lowrank"):
        fam = "haar" if projector == "instance" else projector
        convert(model, rank=rank, projector=fam, target=blocks, generator=proj_gen)
        factory = None
        if projector == "instance":
            factory = InstanceDependentFactory(window=int(spec.get("instance_window", 8)),
                                               floor=float(spec["instance_floor"]))
        if method == "lr_lowrank":
            for p in model.parameters():
                p.requires_grad_(False)
            for _, layer in lowrank_layers(model):
                layer.B.requires_grad_(True)
            model.lm_head.weight.requires_grad_(True)
        opt = LazyUpdate(model, inner=torch.optim.AdamW, inner_kwargs=adam, K=int(spec["K"]), state="reset",
                         projector_factory=factory, generator=proj_gen)
        if method == "lr_lowrank":
            targets = lowrank_targets(model) + resolve_targets(model, ["lm_head"], None, None, 1.0)

            def estimator(ids):
                losses = []

                def loss_fn(m, b):
                    out = per_example_loss(m, b)
                    losses.append(out)
                    return out

                est = lr_estimate(model, loss_fn, ids, targets, sigma=sigma, antithetic=True, generator=proj_gen)
                for name, layer in lowrank_layers(model):
                    layer.B.grad = est[name]
                model.lm_head.weight.grad = est["lm_head.weight"]
                return float(torch.stack(losses).mean()), _lr_kept_bytes(targets, ids, 2)
    elif method == "lr_full":
        for p in model.parameters():
            p.requires_grad_(False)
        names = list(blocks) + ["lm_head"]
        layers = [(n, model.get_submodule(n)) for n in names]
        for _, m in layers:
            m.weight.requires_grad_(True)
        opt = torch.optim.AdamW([m.weight for _, m in layers], **adam)
        targets = resolve_targets(model, names, None, None, 1.0)

        def estimator(ids):
            losses = []

            def loss_fn(m, b):
                out = per_example_loss(m, b)
                losses.append(out)
                return out

            est = estimate(model, loss_fn, ids, method="lr", params=names, sigma=sigma, antithetic=True,
                           generator=proj_gen)
            for n, m in layers:
                m.weight.grad = est[f"{n}.weight"]
            return float(torch.stack(losses).mean()), _lr_kept_bytes(targets, ids, 2)
    else:
        raise ValueError(f"`method` must be one of {sorted({m for m, _ in METHODS})}, got method={method!r}")
    return opt, estimator


def _factory_bytes(opt) -> int:
    """Steady-state bytes of the instance-dependent factory's gradient window (``window`` observations)."""
    fac = getattr(opt, "projector_factory", None)
    grads = getattr(fac, "_grads", None)
    if not grads:
        return 0
    return int(fac.window * sum(buf[-1].numel() * buf[-1].element_size() for buf in grads.values() if buf))


def train_run(spec: dict, seed: int, *, ckpt_path=None, stop_at=None) -> list[dict]:
    """Train one (method, projector, lr, seed) configuration; return its ``pretrain.csv`` rows.

    Parameters
    ----------
    spec : dict
        ``size, method, projector, rank, seed, lr, steps, batch, seq_len, K,
        galore_scale, warmup, min_lr_ratio, eval_every, n_val_blocks, lr_sigma,
        instance_floor, instance_window (default 8), source, max_train_tokens, study_seed, device, ckpt_every``.
        ``spec['seed']`` (with ``study_seed``) fixes the initialisation and the
        token order, shared by all methods.
    seed : int
        Seed of the method's own randomness (projections, LR noise).
    ckpt_path : path, optional
        Checkpoint file: resumed from if present, written every
        ``spec['ckpt_every']`` steps, removed at the end.
    stop_at : int, optional
        Save a checkpoint after this many steps and return ``None`` (simulates a kill).

    Returns
    -------
    list of dict or None
    """
    device = torch.device(spec.get("device", "cpu"))
    steps, batch = int(spec["steps"]), int(spec["batch"])
    data = _data(spec["source"], int(spec["seq_len"]), spec.get("max_train_tokens"))
    val = data.val[: int(spec["n_val_blocks"])].to(device)
    rep = (int(spec["study_seed"]), int(spec["seed"]))
    init_gen = make_generator(unit_seed(rep[0], ("init", rep[1])), "cpu")
    data_gen = make_generator(unit_seed(rep[0], ("data", rep[1])), "cpu")
    proj_gen = make_generator(seed, "cpu")
    extra = {"num_hidden_layers": int(spec["layers"])} if spec.get("layers") else {}
    extra.update(spec.get("_model_overrides") or {})
    model = build_model(spec["size"], vocab_size=data.vocab_size, seq_len=int(spec["seq_len"]),
                        generator=init_gen, device=device, **extra)
    opt, estimator = _setup(spec, model, proj_gen)
    base = {k: spec[k] for k in ("size", "method", "projector", "rank", "seed", "lr")}
    rows: list[dict] = []
    start, wall, acc, nacc, peak = 0, 0.0, 0.0, 0, None
    ckpt_path = Path(ckpt_path) if ckpt_path is not None else None
    if ckpt_path is not None and ckpt_path.exists():
        ck = torch.load(ckpt_path, weights_only=False)
        model.load_state_dict(ck["model"])
        opt.load_state_dict(ck["opt"])
        data_gen.set_state(ck["data_gen"])
        proj_gen.set_state(ck["proj_gen"])
        start, wall, acc, nacc, peak, rows = ck["step"], ck["wall"], ck["acc"], ck["nacc"], ck["peak"], ck["rows"]
    else:
        rows.append({**base, "step": 0, "tokens": 0, "train_loss": float("nan"),
                     "val_loss": _evaluate(model, val, batch), "wall_s": 0.0, "peak_bytes": 0})
    tokens_per_step = batch * int(spec["seq_len"])
    ckpt_every = int(spec.get("ckpt_every", 0) or 0)
    eval_every = int(spec["eval_every"])
    for step in range(start, steps):
        t0 = time.perf_counter()
        ids = torch.randint(data.train.shape[0], (batch,), generator=data_gen)
        ids = data.train[ids].to(device)
        factor = lr_factor(step, steps, warmup=float(spec["warmup"]), min_ratio=float(spec["min_lr_ratio"]))
        for g in opt.param_groups:
            g["lr"] = float(spec["lr"]) * factor
        measure = peak is None
        if device.type == "cuda" and measure:
            torch.cuda.reset_peak_memory_stats(device)
        if estimator is not None:
            loss, act = estimator(ids)
        else:
            saved = []

            def pack(t):
                saved.append(t)
                return t

            if measure:
                with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
                    lvec = per_example_loss(model, ids)
            else:
                lvec = per_example_loss(model, ids)
            loss_t = lvec.mean()
            loss_t.backward()
            loss = float(loss_t.detach())
            params = {p.untyped_storage().data_ptr() for p in model.parameters()}
            params |= {b.untyped_storage().data_ptr() for b in model.buffers()}
            act = _storage_bytes(t for t in saved if t.untyped_storage().data_ptr() not in params)
            saved.clear()
        grad_bytes = _storage_bytes(p.grad for p in model.parameters() if p.grad is not None) if measure else 0
        opt.step()
        opt.zero_grad(set_to_none=True)
        if measure:
            if device.type == "cuda":
                peak = int(torch.cuda.max_memory_allocated(device))
            else:
                peak = (_storage_bytes(list(model.parameters()) + list(model.buffers())) + grad_bytes
                        + _storage_bytes(_state_tensors(opt)) + act)
                peak += _factory_bytes(opt)
        wall += time.perf_counter() - t0
        if not math.isfinite(loss):
            rows.append({**base, "step": step + 1, "tokens": (step + 1) * tokens_per_step,
                         "train_loss": float("nan"), "val_loss": float("nan"), "wall_s": wall, "peak_bytes": peak})
            break
        acc, nacc = acc + loss, nacc + 1
        done = step + 1
        if done % eval_every == 0 or done == steps:
            rows.append({**base, "step": done, "tokens": done * tokens_per_step, "train_loss": acc / nacc,
                         "val_loss": _evaluate(model, val, batch), "wall_s": wall, "peak_bytes": peak})
            acc, nacc = 0.0, 0
        if ckpt_path is not None and ((ckpt_every and done % ckpt_every == 0) or done == stop_at):
            ckpt_path.parent.mkdir(parents=True, exist_ok=True)
            tmp = ckpt_path.with_name(ckpt_path.name + ".tmp")
            torch.save({"model": model.state_dict(), "opt": opt.state_dict(), "data_gen": data_gen.get_state(),
                        "proj_gen": proj_gen.get_state(), "step": done, "wall": wall, "acc": acc, "nacc": nacc,
                        "peak": peak, "rows": rows}, tmp)
            tmp.replace(ckpt_path)
        if stop_at is not None and done >= stop_at:
            return None
    for row in rows:
        row["peak_bytes"] = peak if peak is not None else 0
    if ckpt_path is not None and ckpt_path.exists():
        ckpt_path.unlink()
    return rows


def _unit(unit: dict, seed: int) -> list[dict]:
    # the method's own seed from the study seed and the run's key only (not from paths or options)
    own = unit_seed(int(unit["study_seed"]), tuple(str(unit[k]) for k in KEY))
    ck = Path(unit["_ckpt_dir"]) / ("run_" + "_".join(str(unit[k]) for k in KEY) + ".pt")
    return train_run(unit, own, ckpt_path=ck)


# ----------------------------------------------------------------------------- summaries
def _final(df):
    last = df["step"].max()
    return df[df["step"] == last]


def summarise(df):
    """Table at equal steps: per (method, projector), the final validation loss over seeds.

    Returns a DataFrame with ``method, projector, label, rank, lr, step, n_seeds,
    val_loss, val_loss_ci95, val_ppl, train_loss, tokens_per_s, peak_mb``.
    """
    import pandas as pd
    from scipy import stats

    out = []
    last = df["step"].max()
    for (m, p), g in df.groupby(["method", "projector"], sort=False):
        fin = g[g["step"] == last]
        v = fin["val_loss"].astype(float).to_numpy()
        k = int(np.isfinite(v).sum())
        mean = float(np.nanmean(v)) if k else float("nan")
        ci = float(stats.t.ppf(0.975, k - 1) * np.nanstd(v, ddof=1) / math.sqrt(k)) if k > 1 else float("nan")
        out.append({
            "method": m, "projector": p, "label": label(m, p), "rank": int(fin["rank"].iloc[0]) if len(fin) else 0,
            "lr": float(fin["lr"].iloc[0]) if len(fin) else float("nan"), "step": int(last), "n_seeds": k,
            "val_loss": mean, "val_loss_ci95": ci, "val_ppl": math.exp(mean) if k else float("nan"),
            "train_loss": float(fin["train_loss"].mean()),
            "tokens_per_s": float((fin["tokens"] / fin["wall_s"]).mean()),
            "peak_mb": float(fin["peak_bytes"].mean() / 2**20),
        })
    return pd.DataFrame(out)


def _paired(df, a, b):
    from scipy import stats

    fin = _final(df)
    ga = fin[(fin.method == a[0]) & (fin.projector == a[1])].set_index("seed")["val_loss"]
    gb = fin[(fin.method == b[0]) & (fin.projector == b[1])].set_index("seed")["val_loss"]
    common = sorted(set(ga.index) & set(gb.index))
    if len(common) < 2:
        return None
    d = ga.loc[common].to_numpy(float) - gb.loc[common].to_numpy(float)
    half = float(stats.t.ppf(0.975, len(d) - 1) * d.std(ddof=1) / math.sqrt(len(d)))
    p = float(stats.ttest_rel(ga.loc[common], gb.loc[common]).pvalue)
    return {"a": label(*a), "b": label(*b), "n_seeds": len(d), "mean_diff_val_loss": float(d.mean()),
            "ci95": [float(d.mean()) - half, float(d.mean()) + half], "p_value_paired_t": p,
            "a_lower_in_every_seed": bool(np.all(d < 0))}


def _plot(df, out):
    import matplotlib.pyplot as plt
    import seaborn as sns

    set_plot_theme()
    df = df.copy()
    df["method "] = [label(m, p) for m, p in zip(df["method"], df["projector"])]
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.2))
    sns.lineplot(df, x="step", y="val_loss", hue="method ", errorbar=("se", 1.96), ax=axes[0], marker="o")
    tr = df.dropna(subset=["train_loss"])
    sns.lineplot(tr, x="step", y="train_loss", hue="method ", errorbar=("se", 1.96), ax=axes[1], legend=False)
    axes[0].set(ylabel="validation loss (nats/token)", title="validation loss, mean ± 1.96 se over seeds")
    axes[1].set(ylabel="train loss (since previous point)", title="training loss")
    save_figure(fig, out, "pretrain_loss_steps")
    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    g = df.groupby(["method ", "step"], sort=False)[["wall_s", "val_loss"]].mean().reset_index()
    sns.lineplot(g, x="wall_s", y="val_loss", hue="method ", marker="o", ax=ax, sort=False)
    ax.set(xlabel="training wall time (s, mean over seeds)", ylabel="validation loss")
    save_figure(fig, out, "pretrain_loss_wall")


# ----------------------------------------------------------------------------- the study
def run(ctx: StudyContext) -> None:
    """Learning-rate sweep, then every method over ``seeds`` seeds; CSV, table, figures.

    ``threads`` (quick default 1, full default 0 = torch's setting) is the number
    of intra-op CPU threads during the study (restored afterwards).  With these
    small matrices two threads were about 1.3× faster per step than one on an
    idle 2-core machine but up to 25× slower when another job shared it
    (README); one thread keeps quick mode within its budget either way.
    """
    threads = int(ctx.param("threads", 1, 0))
    before = torch.get_num_threads()
    if threads > 0:
        torch.set_num_threads(threads)
    try:
        _run(ctx)
    finally:
        torch.set_num_threads(before)


def _run(ctx: StudyContext) -> None:
    import json

    import pandas as pd

    size = ctx.param("size", "llama_20m", "llama_60m")
    spec = {
        "size": size,
        "steps": ctx.param("steps", 80, 10_000),
        "batch": ctx.param("batch", 4, 64),
        "seq_len": ctx.param("seq_len", 32, 256),
        "K": ctx.param("K", 20, 200),
        "galore_scale": ctx.param("galore_scale", 0.25, 0.25),
        "warmup": ctx.param("warmup", 0.1, 0.1),
        "min_lr_ratio": ctx.param("min_lr_ratio", 0.1, 0.1),
        "eval_every": ctx.param("eval_every", 20, 500),
        "n_val_blocks": ctx.param("n_val_blocks", 16, 512),
        "lr_sigma": ctx.param("lr_sigma", 1e-2, 1e-2),
        "instance_floor": ctx.param("instance_floor", 0.1, 0.1),
        "instance_window": ctx.param("instance_window", 8, 8),
        "source": ctx.param("source", "stdlib", "stdlib"),
        "layers": ctx.param("layers", 2, 0),  # 0: the shape's number of blocks
        "max_train_tokens": None,
        "study_seed": ctx.seed,
        "device": ctx.device,
        "ckpt_every": ctx.param("ckpt_every", 0, 1000),
        "_ckpt_dir": str(ctx.out / "ckpt"),
    }
    rank_default = {"llama_20m": 64, "llama_60m": 128, "llama_100m": 128, "llama_130m": 256, "llama_350m": 256}
    rank = ctx.param("rank", rank_default.get(size, 64), rank_default.get(size, 128))
    n_seeds = ctx.param("seeds", 3, 3)
    n_grid = ctx.param("n_lrs", 2, 3)
    sweep_steps = ctx.param("sweep_steps", 25, 2000)
    methods = ctx.param("methods", [f"{m}:{p}" for m, p in METHODS])
    pairs = [tuple(s.split(":")) for s in methods]
    data = _data(spec["source"], spec["seq_len"], None)
    ctx.record_config(corpus=data.info, vocab_size=data.vocab_size, method_labels={f"{m}:{p}": label(m, p)
                                                                                  for m, p in pairs})

    def unit(m, p, s, lr, steps):
        return {**spec, "method": m, "projector": p, "rank": 0 if p == "full" else rank, "seed": s,
                "lr": lr, "steps": steps}

    # 1. learning-rate sweep on a seed not used by the final runs
    sweep_seed = 1000
    sweep = [unit(m, p, sweep_seed, lr, sweep_steps) for m, p in pairs for lr in _LR_GRID[m][:n_grid]]
    srows = ctx.run_units(SWEEP_CSV, COLUMNS, KEY, sweep, _unit, desc="pretrain: lr sweep")
    sdf = _frame(srows)
    chosen = {}
    for m, p in pairs:
        g = sdf[(sdf.method == m) & (sdf.projector == p) & (sdf.step == sweep_steps)]
        best = g.sort_values("val_loss").dropna(subset=["val_loss"])
        chosen[f"{m}:{p}"] = float(best["lr"].iloc[0]) if len(best) else float(_LR_GRID[m][0])
    ctx.record_config(chosen_lr=chosen, sweep_seed=sweep_seed,
                      lr_grid={f"{m}:{p}": _LR_GRID[m][:n_grid] for m, p in pairs})
    # 2. final runs
    final = [unit(m, p, s, chosen[f"{m}:{p}"], spec["steps"]) for m, p in pairs for s in range(n_seeds)]
    rows = ctx.run_units(CSV, COLUMNS, KEY, final, _unit, desc="pretrain: runs")
    df = _frame(rows)
    table = summarise(df)
    table.to_csv(ctx.out / "pretrain_table.csv", index=False)
    cols = ["label", "lr", "n_seeds", "val_loss", "val_loss_ci95", "val_ppl", "tokens_per_s", "peak_mb"]
    (ctx.out / "pretrain_table.md").write_text(table[cols].to_markdown(index=False, floatfmt=".4g")
                                               if _has_tabulate() else table[cols].to_string(index=False))
    comps = {}
    for other in [("ipa_lowrank", "gaussian"), ("galore", "svd"), ("full_bp", "full"), ("ipa_lowrank", "coordinate"),
                  ("ipa_lowrank", "instance")]:
        if ("ipa_lowrank", "haar") in pairs and other in pairs:
            comps[f"haar_vs_{other[0]}:{other[1]}"] = _paired(df, ("ipa_lowrank", "haar"), other)
    (ctx.out / "pretrain_summary.json").write_text(json.dumps({"step": int(df["step"].max()), "comparisons": comps},
                                                              indent=2))
    ctx.record_config(comparisons=comps)
    _plot(df, ctx.out)


def _frame(rows):
    """CSV rows (strings) as a DataFrame with numeric columns ('nan' → NaN)."""
    import pandas as pd

    df = pd.DataFrame(rows, columns=COLUMNS)
    for c in COLUMNS:
        if c not in ("size", "method", "projector"):
            df[c] = pd.to_numeric(df[c], errors="coerce")
    return df


def _has_tabulate() -> bool:
    try:
        import tabulate  # noqa: F401
    except ImportError:
        return False
    return True
