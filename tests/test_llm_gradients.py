"""Tests of the llm-gradients study: rank measures, and Monte Carlo MSE of every projector
on real LLaMA gradients against theory.mse (with mutants)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import theory
from theory.testing import mean_test

from conftest import ALPHA
from studies.llm_gradients import (
    layer_type,
    monte_carlo_values,
    projector_mse,
    rank_measures,
    theory_mses,
    window_moments,
)


def test_rank_measures_and_layer_type():
    assert rank_measures(np.array([2.0, 0.0, 0.0])) == (1.0, 1.0)
    stable, eff = rank_measures(np.ones(5))
    assert stable == pytest.approx(5.0) and eff == pytest.approx(5.0)
    stable, eff = rank_measures(np.array([3.0, 1.0]))
    assert stable == pytest.approx(10 / 9) and 1 < eff < 2
    assert [layer_type(f"model.layers.0.self_attn.{t}_proj") for t in "qkvo"] == list("qkvo")
    assert layer_type("model.layers.11.mlp.gate_proj") == "gate"
    with pytest.raises(ValueError, match="name"):
        layer_type("lm_head")


@pytest.fixture(scope="module")
def llama_window():
    """A window of 4 mini-batch gradients of one MLP matrix of a tiny LLaMA on stdlib text."""
    from estimators.data import load_lm_data
    from studies.pretrain import build_model, per_example_loss

    data = load_lm_data(seq_len=16, max_train_tokens=16 * 64, max_val_tokens=16 * 4)
    g = torch.Generator().manual_seed(7)
    model = build_model("llama_20m", vocab_size=data.vocab_size, seq_len=16, generator=g, num_hidden_layers=1,
                        hidden_size=32, intermediate_size=48, num_attention_heads=2, num_key_value_heads=2)
    model.double()
    out = []
    for _ in range(4):
        ids = data.train[torch.randint(data.train.shape[0], (4,), generator=g)]
        model.zero_grad()
        per_example_loss(model, ids).mean().backward()
        out.append(model.model.layers[0].mlp.down_proj.weight.grad.clone())  # (32, 48)
    return torch.stack(out)


def test_window_moments(llama_window):
    grad, S = window_moments(llama_window)
    G = llama_window.numpy()
    np.testing.assert_allclose(grad, G.mean(0))
    np.testing.assert_allclose(S, np.mean([g.T @ g for g in G], axis=0), rtol=1e-12, atol=1e-18)


def test_theory_mses_ordering(llama_window):
    """Haar = coordinate (minimax), Gaussian worse by (n+r+1)/n in tr(SM), instance best."""
    grad, S = window_moments(llama_window)
    ths, _ = theory_mses(S, grad, ["haar", "coordinate", "gaussian", "rademacher", "instance"], 8)
    assert ths["haar"] == pytest.approx(ths["coordinate"])
    g2 = float((grad**2).sum())
    n, r = S.shape[0], 8
    assert (ths["gaussian"] + g2) / (ths["haar"] + g2) == pytest.approx((n + r + 1) / n)
    assert ths["instance"] <= ths["haar"]
    assert ths["instance"] == pytest.approx(theory.mse(S, grad, _instance_M(S, r)))


def _instance_M(S, r):
    from estimators import InstanceDependent

    return InstanceDependent(S, r).second_moment().numpy()


@pytest.mark.parametrize("projector", ["haar", "coordinate", "gaussian", "rademacher", "instance"])
def test_monte_carlo_mse_matches_theory_on_llama_gradients(llama_window, projector, gen):
    """Mean of the Monte Carlo squared errors equals theory.mse (t-test, ALPHA); mutants rejected."""
    from estimators import make_projector

    G, r, R = llama_window, 8, 600
    grad, S = window_moments(G)
    ths, designs = theory_mses(S, grad, ["haar", "gaussian", "instance", projector], r)
    x = monte_carlo_values(G, grad, designs[projector], R, generator=gen)
    res = mean_test(x, np.array(ths[projector]))
    assert res.pvalue > ALPHA, res
    # power: the same draws tested against the closed form of another family
    wrong = {"haar": "gaussian", "coordinate": "gaussian", "gaussian": "haar", "rademacher": "instance",
             "instance": "haar"}[projector]
    assert mean_test(x, np.array(ths[wrong])).pvalue < ALPHA
    if projector == "haar":
        # mutant sampler: a Gaussian matrix without orthonormalisation, scaled as Haar's columns
        mutant = make_projector("gaussian", G.shape[2], r)
        xm = monte_carlo_values(G, grad, mutant, R, generator=gen)
        assert mean_test(xm, np.array(ths["haar"])).pvalue < ALPHA


def test_projector_mse_reproducible_and_rounding_floor(llama_window):
    a = projector_mse(llama_window, "haar", 4, n_reps=32, generator=torch.Generator().manual_seed(3))
    b = projector_mse(llama_window, "haar", 4, n_reps=32, generator=torch.Generator().manual_seed(3))
    assert a == b
    # r = n: every design is V Vᵀ = I, the estimator is G itself: MSE = tr S − ‖∇‖² exactly
    n = llama_window.shape[2]
    c = projector_mse(llama_window, "instance", n, n_reps=8, generator=torch.Generator().manual_seed(3))
    assert c["mse_mc"] == pytest.approx(c["mse_theory"], rel=1e-9) and abs(c["z"]) < 1
    with pytest.raises(TypeError, match="generator"):
        projector_mse(llama_window, "haar", 4, n_reps=4, generator=None)


@pytest.mark.slow
def test_study_end_to_end_resumes(tmp_path):
    from studies.__main__ import run_study

    ov = {"steps": "2", "checkpoints": "0,2", "window": "2", "n_reps": "4", "ranks": "8", "layers": "1",
          "batch": "2", "seq_len": "16", "projectors": "haar,gaussian,instance"}
    path = run_study("llm-gradients", quick=True, out=tmp_path, progress=False, overrides=ov)
    import json

    import pandas as pd

    info = json.loads(path.read_text())
    mse = pd.read_csv(tmp_path / "llm_mse.csv")
    ranks = pd.read_csv(tmp_path / "llm_ranks.csv")
    assert set(mse["step"]) == {0, 2} and len(ranks) == 2 * 7
    assert set(mse["projector"]) == {"haar", "gaussian", "instance"}
    assert (mse.loc[mse.projector == "instance", "gain_vs_haar"] >= 1 - 1e-9).all()
    assert all(c["passed"] for c in info["checks"]), info["checks"]
    for stem in ("llm_gain", "llm_ranks", "llm_spectra", "llm_mse_check"):
        assert (tmp_path / f"{stem}.png").exists()
    before = (tmp_path / "llm_mse.csv").read_text()
    run_study("llm-gradients", quick=True, out=tmp_path, progress=False, overrides=ov)  # resumes: nothing redone
    assert (tmp_path / "llm_mse.csv").read_text() == before
