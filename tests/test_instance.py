"""estimators.InstanceDependent: exact invariants, distribution tests with power checks, MSE."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import theory
from estimators import HaarStiefel, InstanceDependent
from theory.testing import inclusion_test, isotropy_test, mean_test, second_moment_test

N, R_RANK, DRAWS = 6, 2, 20000


def _S(seed=0, n=N, sigma=None):
    g = np.random.default_rng(seed)
    Q, _ = np.linalg.qr(g.standard_normal((n, n)))
    if sigma is None:
        sigma = np.array([6.0, 3.0, 1.0, 0.5, 0.2, 0.05])[:n]
    return (Q * np.asarray(sigma, dtype=float)) @ Q.T


# ----------------------------------------------------------------------- exact invariants
def test_exactly_r_distinct_indices_every_draw(gen):
    P = InstanceDependent(_S(), 3)
    idx = P.sample_indices(batch_shape=(50000,), generator=gen)
    assert idx.shape == (50000, 3) and idx.dtype == torch.int64
    srt = idx.sort(-1).values
    assert not bool((srt[:, 1:] == srt[:, :-1]).any())
    assert int(idx.min()) >= 0 and int(idx.max()) < N


def test_attributes_and_second_moment_from_theory():
    S = _S()
    P = InstanceDependent(S, R_RANK, c=0.7)
    sigma, Q = theory.psd_eigh(S)
    np.testing.assert_allclose(P.pi.numpy(), theory.inclusion_probabilities(sigma, R_RANK))
    assert P.pi.sum().item() == pytest.approx(R_RANK)
    np.testing.assert_allclose(P.Q.numpy() @ np.diag(sigma) @ P.Q.numpy().T, S, atol=1e-12)
    M = P.second_moment()
    assert M.dtype == torch.float64 and M.shape == (N, N)
    np.testing.assert_allclose(M.numpy(), 0.49 * (Q / P.pi.numpy()) @ Q.T, atol=1e-12)
    assert P.value() == pytest.approx(np.trace(S @ M.numpy()))
    assert P.value() == pytest.approx(theory.instance_dependent_value(sigma, R_RANK, c=0.7))
    assert (P.n, P.r, P.c) == (N, R_RANK, 0.7)
    with pytest.raises(ValueError, match="isotropic"):
        P.second_moment_factor()


def test_columns_are_scaled_eigenvectors(gen):
    P = InstanceDependent(_S(), R_RANK, c=2.0)
    idx = P.sample_indices(batch_shape=(7,), generator=gen)
    V = P.sample_from_indices(idx, dtype=torch.float64)
    expect = P.Q.mT[idx].mT * torch.sqrt(2.0 / P.pi[idx]).unsqueeze(-2)
    torch.testing.assert_close(V, expect)
    # VᵀV is diagonal with entries c/π_j
    VtV = V.mT @ V
    torch.testing.assert_close(VtV, torch.diag_embed(2.0 / P.pi[idx]))


def test_sample_matches_indices_and_is_reproducible():
    P = InstanceDependent(_S(), R_RANK)
    V1 = P.sample(batch_shape=(4, 3), generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    V2 = P.sample(batch_shape=(4, 3), generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    idx = P.sample_indices(batch_shape=(4, 3), generator=torch.Generator().manual_seed(5))
    assert V1.shape == (4, 3, N, R_RANK)
    torch.testing.assert_close(V1, V2)
    torch.testing.assert_close(V1, P.sample_from_indices(idx, dtype=torch.float64))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16])
def test_dtypes(dtype, gen):
    P = InstanceDependent(torch.as_tensor(_S(), dtype=torch.float32), R_RANK)
    V = P.sample(batch_shape=(3,), generator=gen, dtype=dtype)
    assert V.dtype == dtype and V.shape == (3, N, R_RANK)
    V64 = P.sample(generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    assert V64.shape == (N, R_RANK)


def test_r_equals_n_is_deterministic_cI(gen):
    P = InstanceDependent(_S(), N, c=0.5)
    V = P.sample(batch_shape=(10,), generator=gen, dtype=torch.float64)
    torch.testing.assert_close(V @ V.mT, 0.5 * torch.eye(N, dtype=torch.float64).expand(10, N, N))


def test_capped_and_zero_directions(gen):
    # σ = (100, 1, 1, 1, 0, 0), r = 2: direction 0 capped (always drawn), null directions never
    P = InstanceDependent(np.diag([100.0, 1.0, 1.0, 1.0, 0.0, 0.0]), 2)
    np.testing.assert_allclose(P.pi.numpy(), [1, 1 / 3, 1 / 3, 1 / 3, 0, 0])
    idx = P.sample_indices(batch_shape=(2000,), generator=gen)
    assert bool((idx == 0).any(-1).all()) and not bool((idx >= 4).any())
    # with a floor every direction is drawn and E[VVᵀ] = cI holds on the whole space
    Pf = InstanceDependent(np.diag([100.0, 1.0, 1.0, 1.0, 0.0, 0.0]), 2, floor=0.2)
    assert float(Pf.pi.min()) == pytest.approx(0.2 * 2 / 6)
    np.testing.assert_allclose(
        Pf.pi.numpy(), theory.mixed_inclusion_probabilities([100.0, 1, 1, 1, 0, 0], 2, floor=0.2))
    # fewer positive eigenvalues than r: the null space shares the spare budget uniformly
    P3 = InstanceDependent(np.diag([5.0, 0.0, 0.0, 0.0]), 3)
    np.testing.assert_allclose(P3.pi.numpy(), [1, 2 / 3, 2 / 3, 2 / 3])


# ----------------------------------------------------------------------- from_gradients
def test_from_gradients_matches_explicit_S():
    g = torch.Generator().manual_seed(0)
    G = torch.randn(40, 3, N, generator=g, dtype=torch.float64) * torch.tensor([3.0, 2, 1, 0.5, 0.3, 0.1])
    S = torch.einsum("kmi,kmj->ij", G, G) / 40
    for floor in (0.0, 0.1):
        a = InstanceDependent.from_gradients(G, R_RANK, floor=floor)
        b = InstanceDependent(S, R_RANK, floor=floor)
        torch.testing.assert_close(a.pi, b.pi)
        torch.testing.assert_close(a.second_moment(), b.second_moment())


def test_from_gradients_rank_deficient_completes_basis():
    n = 12
    G = torch.randn(2, 3, n, generator=torch.Generator().manual_seed(1), dtype=torch.float64)  # rank 6 < 12
    P = InstanceDependent.from_gradients(G, 3)
    Q = P.Q
    torch.testing.assert_close(Q.mT @ Q, torch.eye(n, dtype=torch.float64))
    S = torch.einsum("kmi,kmj->ij", G, G) / 2
    torch.testing.assert_close(Q @ torch.diag(torch.as_tensor(P.sigma)) @ Q.mT, S)
    assert int((P.sigma > 0).sum()) == 6
    assert float(P.pi.min()) >= 0.1 * 3 / n - 1e-15  # default floor 0.1
    P1 = InstanceDependent.from_gradients(G[0], 2, floor=0.0)  # a single (m, n) gradient works
    assert P1.pi.sum().item() == pytest.approx(2)


# ----------------------------------------------------------------------- distribution tests
def test_inclusion_frequencies(gen, alpha):
    S = _S()
    P = InstanceDependent(S, 3)
    idx = P.sample_indices(batch_shape=(DRAWS,), generator=gen)
    assert inclusion_test(idx, P.pi).pvalue > alpha
    # power check, mutant "π ∝ σ" (water-filling on σ² instead of σ: no square root)
    sigma, Q = theory.psd_eigh(S)
    wrong = InstanceDependent((Q * sigma**2) @ Q.T, 3)
    idx_wrong = wrong.sample_indices(batch_shape=(DRAWS,), generator=gen)
    assert inclusion_test(idx_wrong, P.pi).pvalue < alpha


def test_isotropy(gen, alpha, rng):
    P = InstanceDependent(_S(), R_RANK, c=0.8, floor=0.05)
    idx = P.sample_indices(batch_shape=(DRAWS,), generator=gen)
    V = P.sample_from_indices(idx, dtype=torch.float64)
    assert isotropy_test(V, 0.8, rng=rng).pvalue > alpha
    # power check, mutant "uniform scale": same indices, columns scaled by √(cn/r) instead of √(c/π_j)
    Vm = P.Q.mT[idx].mT * (0.8 * N / R_RANK) ** 0.5
    assert isotropy_test(Vm, 0.8, rng=rng).pvalue < alpha


def test_second_moment(gen, alpha, rng):
    P = InstanceDependent(_S(), R_RANK, c=0.8)
    V = P.sample(batch_shape=(DRAWS,), generator=gen, dtype=torch.float64)
    assert second_moment_test(V, P.second_moment(), rng=rng).pvalue > alpha
    # power check, mutant "Haar second moment": the isotropic c²(n/r)I is wrong here
    assert second_moment_test(V, HaarStiefel(N, R_RANK, c=0.8).second_moment(), rng=rng).pvalue < alpha


def _gradient_sample(S, grad, K, g):
    """K draws G = ∇ + Z with rows of Z ~ N(0, (S − ∇ᵀ∇)/m): E[GᵀG] = S."""
    m = grad.shape[0]
    C = np.linalg.cholesky(S - grad.T @ grad + 1e-12 * np.eye(S.shape[0]))
    Z = torch.randn(K, m, S.shape[0], generator=g, dtype=torch.float64) @ torch.as_tensor(C.T) / m**0.5
    return torch.as_tensor(grad) + Z


@pytest.mark.parametrize("anisotropic", [True, False])
def test_mse_below_haar(anisotropic, gen, alpha):
    """Monte Carlo MSE of ĝ = G V Vᵀ equals theory.mse; instance < Haar iff S is anisotropic."""
    n, r, m, K = N, R_RANK, 2, DRAWS
    grad = np.full((m, n), 0.1)
    sigma = np.array([6.0, 3.0, 1.0, 0.5, 0.2, 0.05]) if anisotropic else np.full(n, 2.0)
    S = _S(3, sigma=sigma)
    inst, haar = InstanceDependent(S, r), HaarStiefel(n, r)
    mse_i = theory.mse(S, grad, inst.second_moment().numpy())
    mse_h = theory.mse(S, grad, haar.second_moment().numpy())
    if anisotropic:
        assert mse_i < mse_h
    else:
        assert mse_i == pytest.approx(mse_h, rel=1e-12)
    G = _gradient_sample(S, grad, K, gen)
    for P, expected in ((inst, mse_i), (haar, mse_h)):
        V = P.sample(batch_shape=(K,), generator=gen, dtype=torch.float64)
        err = ((G @ V @ V.mT - torch.as_tensor(grad)) ** 2).sum((-1, -2))
        assert mean_test(err, np.array(expected)).pvalue > alpha
    if anisotropic:  # power check: the instance design's errors do not have Haar's mean
        V = inst.sample(batch_shape=(K,), generator=gen, dtype=torch.float64)
        err = ((G @ V @ V.mT - torch.as_tensor(grad)) ** 2).sum((-1, -2))
        assert mean_test(err, np.array(mse_h)).pvalue < alpha


# ----------------------------------------------------------------------- errors
@pytest.mark.parametrize("S,r,exc,match", [
    ([[1.0, 0.5], [0.0, 1.0]], 1, ValueError, "symmetric"),
    ([[1.0, 0.0], [0.0, -1.0]], 1, ValueError, "positive semi-definite"),
    ([[1.0, np.nan], [np.nan, 1.0]], 1, ValueError, "NaN"),
    (np.ones((2, 3)), 1, ValueError, "square"),
    (np.eye(3), 4, ValueError, "r"),
    (np.eye(3), 0, ValueError, "r"),
    (np.eye(3), 1.0, TypeError, "r"),
    ("abc", 1, TypeError, "S"),
])
def test_bad_S(S, r, exc, match):
    with pytest.raises(exc, match=match):
        InstanceDependent(S, r)


def test_bad_options():
    with pytest.raises(ValueError, match="floor"):
        InstanceDependent(np.eye(3), 1, floor=2.0)
    with pytest.raises(ValueError, match="c"):
        InstanceDependent(np.eye(3), 1, c=-1.0)
    with pytest.raises(ValueError, match="NaN"):
        InstanceDependent.from_gradients(torch.tensor([[1.0, float("nan")]]), 1)
    with pytest.raises(ValueError, match="G"):
        InstanceDependent.from_gradients(torch.ones(2, 2, 2, 2), 1)
    P = InstanceDependent(np.eye(3), 1)
    with pytest.raises(ValueError, match="idx"):
        P.sample_from_indices(torch.zeros(4, 2, dtype=torch.int64))
