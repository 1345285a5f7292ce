"""Likelihood-ratio estimator: unbiasedness on a linear model with quadratic loss, exact identities.

For ``½‖Θx + ε − y‖²`` the smoothed and true gradients coincide, so the exact
population gradient is the target.  Every statistical test has a power check
against a named mutant at the same sample size.
"""

from __future__ import annotations

import pytest
import torch

import estimators.lr as lr_mod
from conftest import ALPHA
from estimators import Projector
from estimators.estimate import estimate
from estimators.lowrank import convert
from estimators.lr import lr_grad_B
from estimators.models import MLP, linear_regression, squared_loss
from _estimator_helpers import FixedSubspace, _one_thread, linear, replications  # noqa: F401
from theory.testing import unbiasedness_test

N_BATCH, RANK, SIGMA = 4, 2, 0.5


def _reps(linear, gen, R, *, projector=None, share=True, **opts):
    return replications(linear, gen, R, method="lr", n_batch=N_BATCH, rank=RANK, projector=projector,
                        share=share, sigma=SIGMA, **opts)


OPTIONS = {
    "plain": ({}, 2000),  # no baseline: heavier tails, more replications
    "antithetic": ({"antithetic": True}, 1000),
    "loo": ({"baseline": "loo"}, 1000),
}


@pytest.mark.parametrize("option", list(OPTIONS))
def test_full_rank_lr_unbiased(linear, option, gen, monkeypatch):
    opts, R = OPTIONS[option]
    truth = linear[2]
    assert unbiasedness_test(_reps(linear, gen, R, **opts), truth).pvalue > ALPHA
    # power: MUTANT "noise injected at 1.5σ while the score divides by σ²"
    orig = lr_mod._draw_normal
    monkeypatch.setattr(lr_mod, "_draw_normal", lambda *a: 1.5 * orig(*a))
    assert unbiasedness_test(_reps(linear, gen, R, **opts), truth).pvalue < ALPHA


def _lowrank_case(linear, gen, family, share, option):
    opts, R = OPTIONS[option]
    truth = linear[2]
    res = unbiasedness_test(_reps(linear, gen, R, projector=family, share=share, **opts), truth)
    assert res.pvalue > ALPHA, res
    # power: a frozen subspace at the same sample size is rejected
    mut = _reps(linear, gen, R, projector=lambda n: FixedSubspace(n, RANK), share=share, **opts)
    assert unbiasedness_test(mut, truth).pvalue < ALPHA


@pytest.mark.parametrize("share", [True, False], ids=["shared", "independent"])
@pytest.mark.parametrize("family", ["haar", "coordinate"])
def test_lowrank_lr_unbiased(linear, family, share, gen):
    _lowrank_case(linear, gen, family, share, "plain" if share else "loo")


@pytest.mark.slow
@pytest.mark.parametrize("option", list(OPTIONS))
@pytest.mark.parametrize("share", [True, False], ids=["shared", "independent"])
@pytest.mark.parametrize("family", ["haar", "coordinate", "coordinate_replace", "gaussian", "rademacher"])
def test_lowrank_lr_unbiased_all(linear, family, share, option, gen):
    _lowrank_case(linear, gen, family, share, option)


# ----------------------------------------------------------------------------- exact identities
def _record_noise(monkeypatch):
    seen = []
    orig = lr_mod._draw_normal

    def rec(*a):
        e = orig(*a)
        seen.append(e)
        return e

    monkeypatch.setattr(lr_mod, "_draw_normal", rec)
    return seen


def test_lr_formula_single_layer(monkeypatch):
    """G = (1/N) Σ_i (ℓ_i − b_i) ε_i x_iᵀ / σ², recomputed by hand from the recorded noise."""
    g = torch.Generator().manual_seed(1)
    model, pop = linear_regression(4, 3, population=6, dtype=torch.float64, generator=g)
    X, Y = pop.data
    seen = _record_noise(monkeypatch)
    est = estimate(model, squared_loss, (X, Y), method="lr", sigma=0.3, baseline="loo", generator=g)["fc.weight"]
    (eps,) = seen  # the hook scales the recorded draw by σ in place: this is ε itself
    losses = 0.5 * ((X @ model.fc.weight.T + eps - Y) ** 2).sum(1)
    w = losses - (losses.sum() - losses) / (len(losses) - 1)
    expected = torch.einsum("i,im,in->mn", w, eps, X) / (0.3 ** 2) / len(losses)
    torch.testing.assert_close(est, expected)


def test_lowrank_lr_uses_compressed_input_and_antithetic_pairs(monkeypatch):
    g = torch.Generator().manual_seed(2)
    model, pop = linear_regression(6, 2, population=5, dtype=torch.float64, generator=g)
    X, Y = pop.data
    seen = _record_noise(monkeypatch)
    rec = []

    class Rec(Projector):
        family = None

        def _sample(self, batch_shape, generator, device, dtype):
            from estimators import HaarStiefel

            V = HaarStiefel(self.n, self.r)._sample(batch_shape, generator, device, dtype)
            rec.append(V)
            return V

    est = estimate(model, squared_loss, (X, Y), method="lr", projector=lambda n: Rec(n, 2), sigma=0.2,
                   antithetic=True, generator=g)["fc.weight"]
    (eps,), (V,) = seen, rec
    W = model.fc.weight
    lp = 0.5 * ((X @ W.T + eps - Y) ** 2).sum(1)
    lm = 0.5 * ((X @ W.T - eps - Y) ** 2).sum(1)
    GB = torch.einsum("i,im,ir->mr", (lp - lm) / 2, eps, X @ V) / 0.2 ** 2 / len(lp)
    torch.testing.assert_close(est, GB @ V.T)


def test_lr_grad_B_on_converted_model_matches_estimate_in_B(monkeypatch):
    """lr_grad_B of a converted model is the LR estimate in B with the layers' own V (forward only)."""
    g = torch.Generator().manual_seed(3)
    net = MLP([5, 4, 2], dtype=torch.float64, generator=g)
    X, Y = torch.randn(6, 5, generator=g, dtype=torch.float64), torch.randn(6, 2, generator=g, dtype=torch.float64)
    convert(net, rank=2, generator=g)
    seen = _record_noise(monkeypatch)
    with torch.no_grad():
        gB = lr_grad_B(net, squared_loss, (X, Y), sigma=0.1, antithetic=False, generator=g)
    assert set(gB) == {"net.0", "net.2"} and gB["net.0"].shape == (4, 2) and gB["net.2"].shape == (2, 2)
    # last layer: its input does not depend on its own noise, so the formula is explicit
    eps0, eps2 = seen  # ε of each layer (scaled by σ in place by the hook)
    h = torch.tanh(net.net[0](X) + eps0)
    losses = 0.5 * ((net.net[2](h) + eps2 - Y) ** 2).sum(1)
    expected = torch.einsum("i,im,ir->mr", losses, eps2, h @ net.net[2].V) / 0.1 ** 2 / 6
    torch.testing.assert_close(gB["net.2"], expected)
