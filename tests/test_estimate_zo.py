"""Zeroth-order estimator: unbiasedness (quadratic f), second moments (linear f, theory.md §7), identities."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import estimators.zo as zo_mod
import theory
from conftest import ALPHA
from estimators import HaarStiefel
from estimators.estimate import estimate
from estimators.lowrank import convert
from estimators.models import LinearModel, linear_regression, squared_loss
from estimators.zo import zo_grad_B
from theory.estimator_moments import trace_weighted_moment, zo_second_moment
from _estimator_helpers import FixedSubspace, _one_thread, linear, replications  # noqa: F401
from theory.testing import mean_test, unbiasedness_test

N_BATCH, RANK, MU = 4, 2, 0.1


def _reps(linear, gen, R, *, projector=None, share=True, **opts):
    return replications(linear, gen, R, method="zo", n_batch=N_BATCH, rank=RANK, projector=projector,
                        share=share, mu=MU, **opts)


OPTIONS = {
    "two_point": ({}, 1000),
    "one_point_clean": ({"two_point": False, "baseline": "clean"}, 2000),  # one-point: larger variance
    "one_point": ({"two_point": False}, 2000),
}


@pytest.mark.parametrize("share", [True, False], ids=["shared", "independent"])
@pytest.mark.parametrize("option", ["two_point", "one_point_clean"])
def test_full_rank_zo_unbiased(linear, option, share, gen, monkeypatch):
    opts, R = OPTIONS[option]
    truth = linear[2]
    assert unbiasedness_test(_reps(linear, gen, R, share=share, **opts), truth).pvalue > ALPHA
    # power: MUTANT "directions drawn with variance 2 instead of 1"
    orig = zo_mod._draw_direction
    monkeypatch.setattr(zo_mod, "_draw_direction", lambda *a: 2 ** 0.5 * orig(*a))
    assert unbiasedness_test(_reps(linear, gen, R, share=share, **opts), truth).pvalue < ALPHA


def _lowrank_case(linear, gen, family, share, option):
    opts, R = OPTIONS[option]
    truth = linear[2]
    res = unbiasedness_test(_reps(linear, gen, R, projector=family, share=share, **opts), truth)
    assert res.pvalue > ALPHA, res
    mut = _reps(linear, gen, R, projector=lambda n: FixedSubspace(n, RANK), share=share, **opts)
    assert unbiasedness_test(mut, truth).pvalue < ALPHA


@pytest.mark.parametrize("share", [True, False], ids=["shared", "independent"])
@pytest.mark.parametrize("family", ["haar", "coordinate"])
def test_lowrank_zo_unbiased(linear, family, share, gen):
    _lowrank_case(linear, gen, family, share, "two_point")


@pytest.mark.slow
@pytest.mark.parametrize("option", list(OPTIONS))
@pytest.mark.parametrize("share", [True, False], ids=["shared", "independent"])
@pytest.mark.parametrize("family", ["haar", "coordinate", "coordinate_replace", "gaussian", "rademacher"])
def test_lowrank_zo_unbiased_all(linear, family, share, option, gen):
    _lowrank_case(linear, gen, family, share, option)


# ----------------------------------------------------------------------------- second moments, linear f
M_OUT, N_IN, R_LIN = 2, 4, 1


def _linear_objective(gen, value=None):
    """f(Θ) = mean_i c_iᵀ Θ x_i (+ a constant making f(Θ₀) = value): linear in Θ, gradient mean_i c_i x_iᵀ."""
    model = LinearModel(N_IN, M_OUT, dtype=torch.float64, generator=gen)
    X = torch.randn(3, N_IN, generator=gen, dtype=torch.float64)
    C = torch.randn(3, M_OUT, generator=gen, dtype=torch.float64)
    offset = 0.0
    if value is not None:
        offset = value - float((model(X) * C).sum(-1).mean().detach())
    loss_fn = lambda m, b: (m(b[0]) * b[1]).sum(-1) + offset  # noqa: E731
    grad = (C.T @ X) / 3
    value = float(loss_fn(model, (X, C)).mean().detach())
    return model, loss_fn, (X, C), grad, value


def _sq_norms(model, loss_fn, batch, gen, R, **kw):
    return torch.stack([
        estimate(model, loss_fn, batch, method="zo", generator=gen, **kw)["fc.weight"].pow(2).sum() for _ in range(R)
    ])


def test_zo_second_moment_linear_haar_and_full(gen):
    for family in ("haar", None):
        _second_moment_case(family, gen, 3000)


@pytest.mark.slow
def test_zo_second_moment_linear_gaussian(gen):
    # ‖ĝ‖² is a degree-8 polynomial in Gaussians here (very heavy tails): many more replications
    _second_moment_case("gaussian", gen, 20000)


def _second_moment_case(family, gen, R):
    model, loss_fn, batch, grad, _ = _linear_objective(gen)
    g2 = float(grad.pow(2).sum())
    kw = {} if family is None else {"projector": family, "rank": R_LIN}
    expected = zo_second_moment(g2, M_OUT, N_IN, None if family is None else R_LIN, family=family or "haar")
    if family == "haar":
        assert expected == pytest.approx((N_IN / R_LIN) * (M_OUT * R_LIN + 2) * g2)  # theory.md §7
    if family is None:
        assert expected == pytest.approx((M_OUT * N_IN + 2) * g2)
    res = mean_test(_sq_norms(model, loss_fn, batch, gen, R, mu=0.3, **kw), np.asarray(expected))
    assert res.pvalue > ALPHA, (res, expected)
    if family == "haar":
        # power: MUTANT "orthonormal frame without the √(n/r) rescaling" (E[VVᵀ] = (r/n) I)
        mut = _sq_norms(model, loss_fn, batch, gen, R, mu=0.3,
                        projector=lambda n: HaarStiefel(n, R_LIN, c=R_LIN / n))
        assert mean_test(mut, np.asarray(expected)).pvalue < ALPHA
    else:
        # power: MUTANT "central difference without the 1/2" (4× the second moment)
        mut = 4 * _sq_norms(model, loss_fn, batch, gen, R, mu=0.3, **kw)
        assert mean_test(mut, np.asarray(expected)).pvalue < ALPHA


def test_zo_one_point_second_moment_linear(gen):
    model, loss_fn, batch, grad, value = _linear_objective(gen, value=2.0)
    mu = 0.25  # the value term (f₀/μ)² m n = 512 dominates the gradient term
    expected = zo_second_moment(float(grad.pow(2).sum()), M_OUT, N_IN, R_LIN, family="haar", two_point=False,
                                value=value, mu=mu)
    sq = _sq_norms(model, loss_fn, batch, gen, 3000, mu=mu, two_point=False, projector="haar", rank=R_LIN)
    assert mean_test(sq, np.asarray(expected)).pvalue > ALPHA
    # power: MUTANT "a baseline f(Θ) subtracted silently" (the value term vanishes)
    mut = _sq_norms(model, loss_fn, batch, gen, 3000, mu=mu, two_point=False, baseline="clean",
                    projector="haar", rank=R_LIN)
    assert mean_test(mut, np.asarray(expected)).pvalue < ALPHA


def test_second_moment_closed_forms():
    assert zo_second_moment(2.0, 3, 8) == pytest.approx(2.0 * 26)
    assert zo_second_moment(1.0, 3, 8, 2) == pytest.approx(4 * 8)  # (n/r)(mr + 2)
    assert zo_second_moment(1.0, 3, 8, 2, c=0.5) == pytest.approx(0.25 * 4 * 8)
    # Haar and coordinate share α and β; Gaussian: β = (nr + 2)/r
    assert trace_weighted_moment("coordinate", 8, 2) == trace_weighted_moment("haar", 8, 2) == 8.0
    assert trace_weighted_moment("gaussian", 8, 2) == pytest.approx((16 + 2) / 2)
    alpha = theory.isotropic_second_moment("gaussian", 8, 2)
    assert zo_second_moment(1.0, 3, 8, 2, family="gaussian") == pytest.approx(3 * 9 + 2 * alpha)
    # in the isotropic case low rank costs variance: (n/r)(mr+2) >= mn + 2
    assert zo_second_moment(1.0, 3, 8, 2) >= zo_second_moment(1.0, 3, 8)
    with pytest.raises(ValueError, match="mu"):
        zo_second_moment(1.0, 3, 8, two_point=False)
    with pytest.raises(ValueError, match="r"):
        zo_second_moment(1.0, 3, 8, 9)


@pytest.mark.parametrize("family", ["haar", "coordinate_replace", "gaussian", "rademacher"])
def test_trace_weighted_moment_exact_small_case(family):
    """E[tr(P) P] by Monte Carlo over many draws against β; exact for constant-trace families."""
    from estimators import make_projector

    P = make_projector(family, 4, 2)
    V = P.sample(batch_shape=(200000,), generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    PP = V @ V.transpose(-1, -2)
    est = (PP.diagonal(dim1=-2, dim2=-1).sum(-1)[:, None, None] * PP).mean(0)
    beta = trace_weighted_moment(family, 4, 2)
    torch.testing.assert_close(est, beta * torch.eye(4, dtype=torch.float64), atol=0.15, rtol=0)


# ----------------------------------------------------------------------------- exact identities
def test_two_point_is_exact_directional_derivative_for_linear_f(monkeypatch):
    g = torch.Generator().manual_seed(4)
    model, loss_fn, batch, grad, _ = _linear_objective(g)
    seen = []
    orig = zo_mod._draw_direction
    monkeypatch.setattr(zo_mod, "_draw_direction", lambda *a: seen.append(orig(*a)) or seen[-1])
    est = estimate(model, loss_fn, batch, method="zo", mu=0.7, generator=g)["fc.weight"]
    (Z,) = seen
    torch.testing.assert_close(est, (grad * Z).sum() * Z)


def test_zo_grad_B_on_converted_model(monkeypatch):
    g = torch.Generator().manual_seed(5)
    model, pop = linear_regression(5, 3, population=6, dtype=torch.float64, generator=g)
    convert(model, rank=2, generator=g)
    layer = model.fc
    with torch.no_grad():
        layer.B.copy_(torch.randn(3, 2, generator=g, dtype=torch.float64))
    seen = []
    orig = zo_mod._draw_direction
    monkeypatch.setattr(zo_mod, "_draw_direction", lambda *a: seen.append(orig(*a)) or seen[-1])
    out = zo_grad_B(model, squared_loss, pop.data, mu=1e-2, generator=g)
    (Z,) = seen
    X, Y = pop.data

    def f(B):
        return (0.5 * ((X @ (layer.weight + B @ layer.V.T).T - Y) ** 2).sum(1)).mean()

    expected = (f(layer.B + 1e-2 * Z) - f(layer.B - 1e-2 * Z)) / 2e-2 * Z
    torch.testing.assert_close(out["fc"], expected.detach())
