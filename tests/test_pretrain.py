"""Tests of the pretrain study: schedule, determinism and resumption of every method, shared init and tokens."""

from __future__ import annotations

import math

import pytest
import torch

from studies.pretrain import METHODS, lr_factor, train_run

TINY = {"hidden_size": 32, "intermediate_size": 48, "num_attention_heads": 2, "num_key_value_heads": 2}


def _spec(method, projector, **kw):
    spec = dict(size="llama_20m", method=method, projector=projector, rank=0 if projector == "full" else 8,
                seed=0, lr=3e-3, steps=6, batch=2, seq_len=16, K=2, galore_scale=0.25, warmup=0.1,
                min_lr_ratio=0.1, eval_every=3, n_val_blocks=4, lr_sigma=1e-2, instance_floor=0.1,
                source="stdlib", max_train_tokens=16 * 200, study_seed=0, device="cpu", ckpt_every=0,
                layers=1, _model_overrides=TINY)
    spec.update(kw)
    return spec


def _strip(rows):
    """Rows without wall_s, NaN made comparable."""
    return [{k: ("nan" if isinstance(v, float) and math.isnan(v) else v) for k, v in r.items() if k != "wall_s"}
            for r in rows]


def test_lr_schedule():
    total = 100
    f = [lr_factor(s, total) for s in range(total)]
    assert f[0] == pytest.approx(0.1) and max(f) == pytest.approx(1.0)
    assert f[-1] == pytest.approx(0.1) and all(a >= b - 1e-12 for a, b in zip(f[10:], f[11:]))
    assert all(0.1 - 1e-12 <= x <= 1 for x in f)


# the three with the most state to restore run by default (GaLore's projector objects, the instance
# refresh's extra backward, the LR noise stream); the other methods in the slow tier
_DEFAULT = {("galore", "svd"), ("ipa_lowrank", "instance"), ("lr_lowrank", "haar")}
_CASES = [pytest.param(m, p, id=f"{m}-{p}", marks=() if (m, p) in _DEFAULT else pytest.mark.slow) for m, p in METHODS]


@pytest.mark.parametrize("method,projector", _CASES)
def test_run_deterministic_and_resumes_to_the_same_rows(tmp_path, method, projector):
    spec = _spec(method, projector)
    full = train_run(spec, 11)
    assert [r["step"] for r in full] == [0, 3, 6]
    assert all(math.isfinite(r["val_loss"]) for r in full) and full[-1]["peak_bytes"] > 0
    ck = tmp_path / "run.pt"
    assert train_run(spec, 11, ckpt_path=ck, stop_at=4) is None and ck.exists()  # "killed" after 4 steps
    resumed = train_run(spec, 11, ckpt_path=ck)
    assert _strip(resumed) == _strip(full)
    assert not ck.exists()


def test_same_init_and_tokens_for_every_method_and_learning():
    rows = {mp: train_run(_spec(*mp, steps=6), 5) for mp in [("full_bp", "full"), ("ipa_lowrank", "haar")]}
    v0 = {mp: r[0]["val_loss"] for mp, r in rows.items()}
    assert len(set(v0.values())) == 1  # same initialisation, same validation blocks
    for r in rows.values():
        assert r[-1]["val_loss"] < r[0]["val_loss"]  # backprop methods learn in 6 steps
    other_seed = train_run(_spec("full_bp", "full", seed=1, steps=3), 5)
    assert other_seed[0]["val_loss"] != v0[("full_bp", "full")]


def test_low_rank_methods_use_the_library_lazy_update():
    """The low-rank runs are driven by estimators.LazyUpdate (instance: InstanceDependentFactory)."""
    from estimators import LazyUpdate
    from estimators.lazy import InstanceDependentFactory
    from studies.pretrain import _setup, build_model
    from studies._core import make_generator

    for method, projector in [("ipa_lowrank", "instance"), ("lr_lowrank", "haar")]:
        spec = _spec(method, projector)
        g = make_generator(0, "cpu")
        model = build_model("llama_20m", vocab_size=64, seq_len=16, generator=g, num_hidden_layers=1, **TINY)
        opt, estimator = _setup(spec, model, g)
        assert isinstance(opt, LazyUpdate) and opt.K == 2 and opt.generator is g
        assert isinstance(opt.projector_factory, InstanceDependentFactory) == (projector == "instance")
        assert (estimator is None) == (method == "ipa_lowrank")


def test_unknown_method_is_an_error():
    with pytest.raises(ValueError, match="method"):
        train_run(_spec("sgd", "full"), 0)


@pytest.mark.slow
def test_study_end_to_end_and_resume(tmp_path):
    import json

    import pandas as pd

    from studies.__main__ import run_study

    ov = {"steps": "4", "sweep_steps": "2", "seeds": "2", "n_lrs": "1", "eval_every": "2", "batch": "2",
          "seq_len": "16", "layers": "1", "rank": "8", "K": "2", "n_val_blocks": "2",
          "methods": "full_bp:full,galore:svd,ipa_lowrank:haar,ipa_lowrank:gaussian"}
    path = run_study("pretrain", quick=True, out=tmp_path, progress=False, overrides=ov)
    df = pd.read_csv(tmp_path / "pretrain.csv")
    assert list(df.columns) == ["size", "method", "projector", "rank", "seed", "step", "tokens", "train_loss",
                                "val_loss", "lr", "wall_s", "peak_bytes"]
    assert len(df) == 4 * 2 * 3
    table = pd.read_csv(tmp_path / "pretrain_table.csv")
    assert set(table["n_seeds"]) == {2}
    summary = json.loads((tmp_path / "pretrain_summary.json").read_text())
    assert "haar_vs_ipa_lowrank:gaussian" in summary["comparisons"]
    assert "chosen_lr" in json.loads(path.read_text())["config"]
    for stem in ("pretrain_loss_steps", "pretrain_loss_wall"):
        assert (tmp_path / f"{stem}.png").exists()
    before = df.drop(columns="wall_s")
    run_study("pretrain", quick=True, out=tmp_path, progress=False, overrides=ov)
    after = pd.read_csv(tmp_path / "pretrain.csv").drop(columns="wall_s")
    pd.testing.assert_frame_equal(before, after)
