"""Study ``memory``: peak memory of one training step, full backprop against GaLore, MeZO and ours.

The paper's practical claim (arXiv 2603.20632, abstract): fine-tuning RoBERTa-large
with its low-rank estimator needs 3.83 GB of GPU memory against 16.7 GB for full
backpropagation (ratio 0.229).  This study measures the same ratio on our code.

Per model and method, in a fresh process (see :mod:`studies._memory_worker`),
two training steps on a fixed batch:

* ``full_bp``: backpropagation, ``torch.optim.AdamW`` on every parameter;
* ``galore``: backpropagation, galore-torch's ``GaLoreAdamW`` on the block
  ``Linear`` weights (same rank, its defaults: ``update_proj_gap=200``,
  ``scale=0.25``, ``proj_type="std"``), AdamW for the rest;
* ``mezo``: two-point zeroth order on every parameter, full rank, in-place
  perturbations regenerated from a seed, SGD (Malladi et al., 2023);
* ``lr_full``: the full-rank likelihood-ratio estimator (noise on every block
  Linear output, :func:`estimators.estimate.estimate`), SGD;
* ``ipa_lowrank``, ``lr_lowrank``, ``zo_lowrank``: every block Linear converted
  (:func:`estimators.lowrank.convert`, rank ``r``, Haar–Stiefel ``V``), trained by
  :class:`estimators.lazy.LazyUpdate` with AdamW on ``B`` (and on the norms and
  the head); embeddings frozen.

Outputs: ``memory.csv`` (schema of shared/design.md), ``memory_breakdown.csv``
(long format: weights, gradients, optimiser state, saved activations, and
``rest_of_peak`` = peak minus their sum, which is negative when they do not
coexist, e.g. full backprop frees its activations before AdamW allocates its
state), ``memory_table.md`` (ratios to full backprop beside the paper's
0.229), ``memory.png``/``.pdf`` and ``workers/*.json`` (everything each process
reported).  Parameters (``--set NAME=VALUE``): ``models``, ``methods``,
``rank``, ``steps``, ``threads``, ``launcher`` (``fork``: one import, a forked
child per unit; ``spawn``: a new interpreter per unit).
"""

from __future__ import annotations

import atexit
import json
import os
import subprocess
import sys
from pathlib import Path

from ._core import StudyContext, save_figure, set_plot_theme

__all__ = ["run", "COLUMNS", "METHODS", "MODELS", "PAPER_RATIO"]

COLUMNS = ["model", "method", "rank", "batch", "seq_len", "dtype", "device",
           "peak_bytes", "saved_bytes", "state_bytes", "step_s"]
KEYS = ["model", "method"]
METHODS = ["full_bp", "galore", "mezo", "lr_full", "ipa_lowrank", "lr_lowrank", "zo_lowrank"]
LOWRANK = ["ipa_lowrank", "lr_lowrank", "zo_lowrank"]
#: Peak GPU memory ratio, low-rank estimator over full backprop, RoBERTa-large (paper abstract: 3.83 / 16.7 GB).
PAPER_RATIO = 0.229

#: name -> (kind, shape, overrides, batch, seq_len)
MODELS = {
    "roberta_large": ("roberta", "roberta_large", {}, 8, 128),
    "llama_60m": ("llama", "llama_60m", {}, 8, 256),
    # the batch dependence of the ratio: --set models=roberta_large_b16
    "roberta_large_b16": ("roberta", "roberta_large", {}, 16, 128),
    # quick mode: a 4-layer RoBERTa of width 256 with a 1000-token vocabulary
    "roberta_small": ("roberta", "roberta_large", {"vocab_size": 1000, "num_hidden_layers": 4, "hidden_size": 256,
                                                   "intermediate_size": 1024, "num_attention_heads": 4}, 8, 128),
}

_TAG = "MEMORY-RESULT"
_SERVER: dict = {}


def _env() -> dict:
    """Worker environment: glibc's mmap threshold fixed at 64 KiB, so that a freed
    tensor is unmapped at once and the resident set follows the live tensors
    (glibc otherwise raises the threshold as blocks are freed and serves later
    tensors from a heap that fragments and is rarely returned)."""
    env = dict(os.environ)
    env.setdefault("MALLOC_MMAP_THRESHOLD_", "65536")
    env.setdefault("HF_HUB_OFFLINE", "1")
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    return env


def _server():
    proc = _SERVER.get("proc")
    if proc is None or proc.poll() is not None:
        proc = subprocess.Popen([sys.executable, "-m", "studies._memory_worker", "--serve"],
                                stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=_env(),
                                cwd=str(Path(__file__).resolve().parent.parent))
        _SERVER["proc"] = proc
        atexit.register(_close_server)
    return proc


def _close_server():
    proc = _SERVER.pop("proc", None)
    if proc is not None and proc.poll() is None:
        proc.stdin.close()
        proc.wait(timeout=60)


def _read_result(stream) -> dict:
    for line in stream:
        if line.startswith(_TAG + " "):
            return json.loads(line[len(_TAG) + 1:])
    raise RuntimeError("the memory worker ended without a result")


def _launch(spec: dict, launcher: str) -> dict:
    if launcher == "spawn":
        out = subprocess.run([sys.executable, "-m", "studies._memory_worker", json.dumps(spec)],
                             capture_output=True, text=True, env=_env(),
                             cwd=str(Path(__file__).resolve().parent.parent))
        try:
            return _read_result(out.stdout.splitlines())
        except RuntimeError as exc:
            raise RuntimeError(f"{exc}; stderr:\n{out.stderr[-4000:]}") from None
    proc = _server()
    proc.stdin.write(json.dumps(spec) + "\n")
    proc.stdin.flush()
    return _read_result(proc.stdout)


def _unit(unit, seed):
    kind, shape, overrides, batch, seq_len = MODELS[unit["model"]]
    spec = {"model": {"kind": kind, "shape": shape, "overrides": overrides}, "method": unit["method"],
            "rank": unit["rank"], "batch": batch, "seq_len": seq_len, "dtype": unit["dtype"],
            "device": unit["device"], "seed": seed, "steps": unit["steps"], "threads": unit["threads"]}
    res = _launch(spec, unit["_launcher"])
    if "error" in res:
        raise RuntimeError(f"memory measurement of {unit['model']}/{unit['method']} failed:\n{res['error']}")
    sidecar = Path(unit["_out"]) / "workers" / f"{unit['model']}__{unit['method']}.json"
    sidecar.parent.mkdir(parents=True, exist_ok=True)
    sidecar.write_text(json.dumps({"spec": spec, "result": res}, indent=2))
    return [dict(model=unit["model"], method=unit["method"], rank=unit["rank"], batch=batch, seq_len=seq_len,
                 dtype=unit["dtype"], device=unit["device"], peak_bytes=res["peak_bytes"],
                 saved_bytes=res["saved_bytes"], state_bytes=res["state_bytes"], step_s=res["step_s"])]


def _breakdown(out: Path, rows):
    """Long-format components of each peak from the workers' reports."""
    recs = []
    for row in rows:
        path = out / "workers" / f"{row['model']}__{row['method']}.json"
        if not path.exists():
            continue
        res = json.loads(path.read_text())["result"]
        parts = {"weights": res["weight_bytes"], "gradients": res["grad_bytes"],
                 "optimizer_state": res["opt_bytes"], "saved_activations": res["saved_bytes"]}
        parts["rest_of_peak"] = res["peak_bytes"] - sum(parts.values())
        for comp, b in parts.items():
            recs.append(dict(model=row["model"], method=row["method"], component=comp, bytes=int(b)))
    return recs


def _table(df) -> str:
    gb = 1e9
    lines = []
    for model, sub in df.groupby("model", sort=False):
        full = sub.loc[sub.method == "full_bp", "peak_bytes"]
        ref = float(full.iloc[0]) if len(full) else float("nan")
        r0 = sub.iloc[0]
        lines.append(f"### {model} (batch {r0['batch']}, sequence {r0['seq_len']}, {r0['dtype']}, "
                     f"rank {r0['rank']}, device {r0['device']})\n")
        lines.append("| method | peak GB | peak / full_bp | paper (RoBERTa-large, GPU) | saved for backward GB | "
                     "params+grads+opt state GB | step s |")
        lines.append("|---|---|---|---|---|---|---|")
        for _, r in sub.iterrows():
            paper = f"{PAPER_RATIO}" if r["method"] in LOWRANK else ("1" if r["method"] == "full_bp" else "")
            lines.append(f"| {r['method']} | {r['peak_bytes'] / gb:.3f} | {r['peak_bytes'] / ref:.3f} | {paper} | "
                         f"{r['saved_bytes'] / gb:.3f} | {r['state_bytes'] / gb:.3f} | {r['step_s']:.2f} |")
        lines.append("")
    lines.append(f"Paper (arXiv 2603.20632, abstract): 3.83 GB against 16.7 GB for full backpropagation, "
                 f"ratio {PAPER_RATIO}, peak GPU memory.")
    return "\n".join(lines) + "\n"


def run(ctx: StudyContext) -> None:
    import pandas as pd

    models = ctx.param("models", ["roberta_small"], ["roberta_large", "llama_60m"])
    methods = ctx.param("methods", list(METHODS))
    rank = ctx.param("rank", 8)
    steps = ctx.param("steps", 2)
    threads = ctx.param("threads", 1)
    launcher = ctx.param("launcher", "fork")
    dtype = ctx.param("dtype", "float32")
    for m in models:
        if m not in MODELS:
            raise ValueError(f"--set models: unknown model {m!r}; known: {sorted(MODELS)}")
    for m in methods:
        if m not in METHODS:
            raise ValueError(f"--set methods: unknown method {m!r}; known: {METHODS}")
    if launcher not in ("fork", "spawn"):
        raise ValueError(f"--set launcher must be 'fork' or 'spawn', got {launcher!r}")
    if launcher == "fork" and not hasattr(os, "fork"):
        launcher = "spawn"
    ctx.record_config(paper_ratio=PAPER_RATIO, shapes={m: MODELS[m] for m in models},
                      measurement=("torch.cuda.max_memory_allocated" if ctx.device == "cuda"
                                   else "peak resident set (VmHWM, reset after imports) minus the baseline"))
    units = [dict(model=m, method=meth, rank=rank, dtype=dtype, device=ctx.device, steps=steps, threads=threads,
                  _launcher=launcher, _out=str(ctx.out)) for m in models for meth in methods]
    n_jobs = ctx.n_jobs
    ctx.n_jobs = 1  # measurements must not overlap
    try:
        rows = ctx.run_units("memory.csv", COLUMNS, KEYS, units, _unit, desc="memory")
    finally:
        ctx.n_jobs = n_jobs
        _close_server()
    df = pd.DataFrame(rows)
    for c in ("peak_bytes", "saved_bytes", "state_bytes", "rank", "batch", "seq_len"):
        df[c] = df[c].astype(int)
    df["step_s"] = df["step_s"].astype(float)
    pd.DataFrame(_breakdown(ctx.out, rows)).to_csv(ctx.out / "memory_breakdown.csv", index=False)
    table = _table(df)
    (ctx.out / "memory_table.md").write_text(table)
    print(table, flush=True)
    for model, sub in df.groupby("model", sort=False):
        peak = dict(zip(sub.method, sub.peak_bytes))
        if "full_bp" in peak:
            low = {m: peak[m] / peak["full_bp"] for m in LOWRANK if m in peak}
            if low:
                best = min(low, key=low.get)
                ctx.add_check(f"{model}: best low-rank peak <= {PAPER_RATIO} x full_bp", low[best] <= PAPER_RATIO,
                              best=best, ratio=low[best])
        if "ipa_lowrank" in peak and "galore" in peak:
            ctx.add_check(f"{model}: ipa_lowrank peak below galore", peak["ipa_lowrank"] < peak["galore"],
                          ipa_lowrank=peak["ipa_lowrank"], galore=peak["galore"])
    _plot(df, ctx.out)


def _plot(df, out):
    import matplotlib.pyplot as plt
    import seaborn as sns

    set_plot_theme()
    d = df.assign(peak_gb=df.peak_bytes / 1e9)
    models = list(dict.fromkeys(d.model))
    fig, axes = plt.subplots(1, len(models), figsize=(5.2 * len(models), 3.8), squeeze=False)
    for ax, model in zip(axes[0], models):
        sub = d[d.model == model]
        sns.barplot(data=sub, x="method", y="peak_gb", ax=ax, color=sns.color_palette()[0])
        full = sub.loc[sub.method == "full_bp", "peak_gb"]
        if len(full):
            ax.axhline(PAPER_RATIO * float(full.iloc[0]), ls="--", color="k", lw=1,
                       label=f"paper's ratio {PAPER_RATIO} x full_bp")
            ax.legend(loc="upper right", fontsize=8)
        ax.set_title(model)
        ax.set_xlabel("")
        ax.set_ylabel("peak memory (GB)")
        ax.tick_params(axis="x", rotation=45)
    fig.tight_layout()
    save_figure(fig, out, "memory")
