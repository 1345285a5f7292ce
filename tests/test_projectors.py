"""estimators.projectors: exact invariants, reproducibility, input checks, and
distribution tests with power checks against named wrong samplers.

Statistical tests: per-test false-failure rate ALPHA = 1e-4 (tests/conftest.py);
each correct sampler must give p > ALPHA, each named mutant p < ALPHA at the
same sample size.
"""

import math

import numpy as np
import pytest
import torch

import theory
from estimators import Coordinate, Gaussian, HaarStiefel, Projector, Rademacher, make_projector
from theory.testing import haar_test, isotropy_test, second_moment_test

ALL = [
    ("haar", lambda n, r, c: HaarStiefel(n, r, c=c)),
    ("coordinate", lambda n, r, c: Coordinate(n, r, c=c)),
    ("coordinate_replace", lambda n, r, c: Coordinate(n, r, c=c, replace=True)),
    ("gaussian", lambda n, r, c: Gaussian(n, r, c=c)),
    ("rademacher", lambda n, r, c: Rademacher(n, r, c=c)),
]
IDS = [a for a, _ in ALL]
R_STAT = 20_000  # draws per distribution test
N_STAT, R_RANK = 6, 2


# ----------------------------------------------------------------- exact invariants
@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-12), (torch.float32, 2e-5)])
@pytest.mark.parametrize("batch_shape", [(), (7,), (2, 3)])
@pytest.mark.parametrize("cls", [HaarStiefel, Coordinate])
@pytest.mark.parametrize("n,r,c", [(16, 4, 1.0), (33, 33, 0.5), (100, 1, 2.0)])
def test_optimal_families_have_exact_gram(cls, n, r, c, batch_shape, dtype, tol):
    P = cls(n, r, c=c)
    V = P.sample(batch_shape=batch_shape, generator=torch.Generator().manual_seed(1), dtype=dtype)
    assert V.shape == (*batch_shape, n, r) and V.dtype == dtype
    gram = V.transpose(-1, -2) @ V
    target = c * n / r * torch.eye(r, dtype=dtype)
    assert torch.allclose(gram, target.expand_as(gram), atol=tol * c * n / r, rtol=0)


@pytest.mark.parametrize("batch_shape", [(), (3,)])
@pytest.mark.parametrize("n,r", [(64, 4), (40, 10), (12, 5), (256, 64)])
def test_both_qr_routes_give_householder_q_with_positive_r(n, r, batch_shape):
    """The sampled frame equals the Q of Householder QR after Mezzadri's sign fix, to rounding.

    Covers both routes: Cholesky QR (batches with n >= 4r; the single draw at r = 64)
    and Householder QR (single draws with r < 64; n < 4r)."""
    V = HaarStiefel(n, r).sample(batch_shape=batch_shape, generator=torch.Generator().manual_seed(7),
                                 dtype=torch.float64)
    G = torch.randn(*batch_shape, n, r, generator=torch.Generator().manual_seed(7), dtype=torch.float64)
    Q, R = torch.linalg.qr(G)
    Q = Q * torch.diagonal(R, dim1=-2, dim2=-1).sign().unsqueeze(-2)
    assert torch.allclose(V / math.sqrt(n / r), Q, atol=1e-12, rtol=0)


def test_rank_equal_n_gives_c_identity():
    for cls in (HaarStiefel, Coordinate):
        V = cls(5, 5, c=0.7).sample(generator=torch.Generator().manual_seed(0), dtype=torch.float64)
        assert torch.allclose(V @ V.T, 0.7 * torch.eye(5, dtype=torch.float64), atol=1e-12)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("name", IDS)
def test_half_precision_is_computed_in_float32_and_cast(name, dtype):
    P = make_projector(name, 64, 8) if name != "coordinate_replace" else Coordinate(64, 8, replace=True)
    g1, g2 = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
    V_half = P.sample(generator=g1, dtype=dtype)
    V_32 = P.sample(generator=g2, dtype=torch.float32)
    assert V_half.dtype == dtype
    assert torch.equal(V_half, V_32.to(dtype))


def test_coordinate_indices_are_distinct_and_match_sample():
    P = Coordinate(50, 20)
    idx = P.sample_indices(batch_shape=(200,), generator=torch.Generator().manual_seed(0))
    assert idx.shape == (200, 20)
    assert all(len(set(row.tolist())) == 20 for row in idx)
    V = P.sample(batch_shape=(200,), generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    x = torch.randn(3, 50, dtype=torch.float64, generator=torch.Generator().manual_seed(9))
    # gathering columns equals multiplying by the 0/1 matrix
    assert torch.allclose(x @ V[17], x[:, idx[17]] * P.scale)


def test_second_moment_comes_from_theory():
    for name, make in ALL:
        P = make(12, 3, 0.5)
        assert P.second_moment().shape == (12, 12)
        assert P.second_moment().dtype == torch.float64
        expect = theory.isotropic_second_moment(name, 12, 3, 0.5)
        assert torch.allclose(P.second_moment(), expect * torch.eye(12, dtype=torch.float64))


# ----------------------------------------------------------------- reproducibility
@pytest.mark.parametrize("name,make", ALL, ids=IDS)
def test_same_seed_same_draw_other_seed_other_draw(name, make):
    P = make(20, 4, 1.0)
    a = P.sample(batch_shape=(3,), generator=torch.Generator().manual_seed(42))
    b = P.sample(batch_shape=(3,), generator=torch.Generator().manual_seed(42))
    c = P.sample(batch_shape=(3,), generator=torch.Generator().manual_seed(43))
    assert torch.equal(a, b)
    assert not torch.equal(a, c)
    # successive draws from one generator differ
    g = torch.Generator().manual_seed(0)
    assert not torch.equal(P.sample(generator=g), P.sample(generator=g))


def test_no_generator_uses_fresh_entropy_not_global_rng():
    # the autouse fixture asserts the global RNG is untouched
    P = HaarStiefel(8, 2)
    assert not torch.equal(P.sample(), P.sample())


# ----------------------------------------------------------------- bad input
@pytest.mark.parametrize(
    "make, exc, match",
    [
        (lambda: HaarStiefel(4, 0), ValueError, r"`r` must satisfy 1 <= r <= n, got r=0, n=4"),
        (lambda: HaarStiefel(4, 9), ValueError, r"got r=9, n=4"),
        (lambda: Gaussian(4, 2, c=0), ValueError, r"`c` must be finite and > 0, got c=0.0"),
        (lambda: Gaussian(4, 2, c=-1.0), ValueError, r"c=-1.0"),
        (lambda: Rademacher(4.5, 2), TypeError, r"`n` must be an integer, got n=4.5"),
        (lambda: Coordinate(4, "2"), TypeError, r"`r` must be an integer, got r='2'"),
        (lambda: Coordinate(4, 2, replace=1), TypeError, r"`replace` must be a bool"),
        (lambda: make_projector("stiefel", 4, 2), ValueError, r"`projector` must be one of"),
    ],
)
def test_constructor_errors(make, exc, match):
    with pytest.raises(exc, match=match):
        make()


@pytest.mark.parametrize(
    "kwargs, exc, match",
    [
        (dict(dtype=torch.int32), ValueError, r"`dtype` must be one of float16, bfloat16, float32, float64, got dtype=torch.int32"),
        (dict(dtype="float32"), TypeError, r"`dtype` must be a torch.dtype"),
        (dict(batch_shape=(2, -1)), ValueError, r"`batch_shape` must hold non-negative ints"),
        (dict(generator=np.random.default_rng(0)), TypeError, r"`generator` must be a torch.Generator"),
        (dict(generator=torch.Generator(), device="meta"), ValueError, r"`generator` lives on cpu but `device` is meta"),
    ],
)
@pytest.mark.parametrize("name", ["haar", "coordinate", "gaussian"])
def test_sample_errors(name, kwargs, exc, match):
    with pytest.raises(exc, match=match):
        make_projector(name, 8, 2).sample(**kwargs)


# ----------------------------------------------------------------- distribution tests
def _draws(P, gen):
    return P.sample(batch_shape=(R_STAT,), generator=gen, dtype=torch.float64)


@pytest.mark.parametrize("c", [1.0, 0.5])
@pytest.mark.parametrize("name,make", ALL, ids=IDS)
def test_isotropy_and_second_moment(name, make, c, gen, alpha):
    """E[VVᵀ] = cI and E[(VVᵀ)²] = closed form, for every family (false-failure rate 2·ALPHA)."""
    P = make(N_STAT, R_RANK, c)
    V = _draws(P, gen)
    assert isotropy_test(V, c).pvalue > alpha
    assert second_moment_test(V, P.second_moment()).pvalue > alpha


def test_isotropy_test_at_larger_n_uses_random_functionals(gen, alpha):
    V = HaarStiefel(64, 8).sample(batch_shape=(4000,), generator=gen, dtype=torch.float64)
    res = isotropy_test(V)
    assert res.n_tests == 32 and res.pvalue > alpha


def test_haar_frames_are_haar(gen, alpha):
    # (6, 2), (12, 5): Householder route; (16, 2): Cholesky-QR route (n >= 4r)
    for n, r in [(N_STAT, R_RANK), (12, 5), (16, 2)]:
        assert haar_test(HaarStiefel(n, r, c=0.5).sample(batch_shape=(R_STAT,), generator=gen,
                                                         dtype=torch.float64), c=0.5).pvalue > alpha


# ----------------------------------------------------------------- power checks (mutants)
class _QRWithoutSignFix(Projector):
    """Mutant: Q factor of a Gaussian without Mezzadri's sign correction."""

    family = "haar"

    def _sample(self, batch_shape, generator, device, dtype):
        G = torch.randn(*batch_shape, self.n, self.r, generator=generator, device=device, dtype=dtype)
        return torch.linalg.qr(G)[0] * math.sqrt(self.c * self.n / self.r)


class _GaussianJLScale(Gaussian):
    """Mutant: entries N(0, 1/n) (the Johnson–Lindenstrauss scale) instead of N(0, c/r)."""

    def _sample(self, batch_shape, generator, device, dtype):
        return super()._sample(batch_shape, generator, device, dtype) * math.sqrt(self.r / self.n)


class _GaussianFivePercent(Gaussian):
    """Mutant: entry variance 5 % too large."""

    def _sample(self, batch_shape, generator, device, dtype):
        return super()._sample(batch_shape, generator, device, dtype) * math.sqrt(1.05)


def test_power_qr_without_sign_fix_is_not_haar(gen, alpha):
    V = _draws(_QRWithoutSignFix(N_STAT, R_RANK), gen)
    # its first moments are right, which is why a Haar test is needed
    assert haar_test(V, c=1.0).pvalue < alpha


@pytest.mark.parametrize("mutant", [_GaussianJLScale, _GaussianFivePercent])
def test_power_gaussian_with_wrong_scale(mutant, gen, alpha):
    V = _draws(mutant(N_STAT, R_RANK), gen)
    assert isotropy_test(V, 1.0).pvalue < alpha


def test_power_sampling_with_replacement_posing_as_without(gen, alpha):
    impostor = Coordinate(N_STAT, R_RANK, replace=True)
    honest = Coordinate(N_STAT, R_RANK, replace=False)
    V = _draws(impostor, gen)
    assert isotropy_test(V, 1.0).pvalue > alpha  # same first moment: isotropy cannot tell them apart
    assert second_moment_test(V, honest.second_moment()).pvalue < alpha


def test_power_gaussian_posing_as_optimal(gen, alpha):
    V = _draws(Gaussian(N_STAT, R_RANK), gen)
    assert second_moment_test(V, HaarStiefel(N_STAT, R_RANK).second_moment()).pvalue < alpha
