"""IPA estimator: exact identities, unbiasedness on Example 1 (ReLU network), MSE against theory.md §3, memory.

Statistical tests run at ALPHA (conftest) with a power check against a named mutant.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

import theory
from conftest import ALPHA
from estimators import HaarStiefel, Projector, make_projector
from estimators.estimate import estimate
from estimators.ipa import ipa_grad_B, ipa_replications
from estimators.lowrank import convert
from estimators.models import MLP, example1, squared_loss
from _estimator_helpers import FixedSubspace
from theory.testing import mean_test, unbiasedness_test

FAMILIES = ["haar", "coordinate", "coordinate_replace", "gaussian", "rademacher"]
N_BATCH = 4
RANK = 2


class Recording(Projector):
    """Test double: draws from ``inner`` and records every draw."""

    def __init__(self, inner):
        super().__init__(inner.n, inner.r, c=inner.c)
        self.inner, self.draws = inner, []

    def _sample(self, batch_shape, generator, device, dtype):
        V = self.inner._sample(batch_shape, generator, device, dtype)
        self.draws.append(V.clone())
        return V


@pytest.fixture(scope="module")
def ex1():
    model, pop = example1(8, 4, population=32, dtype=torch.float64, generator=torch.Generator().manual_seed(11))
    truth = pop.exact_gradient(model, squared_loss)["fc.weight"]
    return model, pop, truth


# ----------------------------------------------------------------------------- exact identities
def test_example1_closed_form_gradient(ex1):
    model, pop, truth = ex1
    G = pop.per_example_gradients(model, squared_loss)["fc.weight"]
    torch.testing.assert_close(G, model.per_example_grad(*pop.data))
    torch.testing.assert_close(G.mean(0), truth)


@pytest.mark.parametrize("share", [True, False])
@pytest.mark.parametrize("family", ["haar", "gaussian"])
def test_lowrank_ipa_is_dense_gradient_lifted(share, family):
    g = torch.Generator().manual_seed(3)
    net = MLP([6, 5, 3], dtype=torch.float64, generator=g)
    X, Y = torch.randn(7, 6, generator=g, dtype=torch.float64), torch.randn(7, 3, generator=g, dtype=torch.float64)
    recs = {}

    def factory(n):
        recs[n] = Recording(make_projector(family, n, RANK))
        return recs[n]

    est = estimate(net, squared_loss, (X, Y), projector=factory, share_projection=share, generator=g)
    for key, n in (("net.0.weight", 6), ("net.2.weight", 5)):
        (V,) = recs[n].draws
        W = dict(net.named_parameters())[key]
        if share:
            (G,) = torch.autograd.grad(squared_loss(net, (X, Y)).mean(), W)
            torch.testing.assert_close(est[key], G @ V @ V.T, rtol=1e-12, atol=1e-12)
        else:
            lifted = []
            for i in range(7):
                (Gi,) = torch.autograd.grad(squared_loss(net, (X[i:i + 1], Y[i:i + 1])).sum(), W)
                lifted.append(Gi @ V[i] @ V[i].T)
            torch.testing.assert_close(est[key], torch.stack(lifted).mean(0), rtol=1e-12, atol=1e-12)
    assert all(p.requires_grad for p in net.parameters()) and all(p.grad is None for p in net.parameters())


@pytest.mark.parametrize("share", [True, False])
def test_replications_equal_estimate_with_same_draws(ex1, share):
    model, pop, _ = ex1
    g = torch.Generator().manual_seed(4)
    batches = pop.sample_batches(3, N_BATCH, generator=g)
    rec = Recording(HaarStiefel(8, RANK))
    reps = ipa_replications(model, squared_loss, batches, projector=lambda n: rec, share_projection=share, generator=g)
    (Vs,) = rec.draws  # (R, n, r) or (R, N, n, r)
    for k in range(3):
        fixed = Recording(HaarStiefel(8, RANK))
        fixed._sample = lambda *a, V=Vs[k]: V  # replay replication k's draw
        one = estimate(model, squared_loss, (batches[0][k], batches[1][k]), projector=lambda n: fixed,
                       share_projection=share, generator=g)
        torch.testing.assert_close(reps["fc.weight"][k], one["fc.weight"], rtol=1e-12, atol=1e-12)
    full = ipa_replications(model, squared_loss, batches)
    one = estimate(model, squared_loss, (batches[0][1], batches[1][1]))
    torch.testing.assert_close(full["fc.weight"][1], one["fc.weight"])


def test_grad_B_on_converted_model_equals_dense_grad_times_V():
    g = torch.Generator().manual_seed(5)
    net = MLP([6, 5, 3], dtype=torch.float64, generator=g)
    X, Y = torch.randn(7, 6, generator=g, dtype=torch.float64), torch.randn(7, 3, generator=g, dtype=torch.float64)
    dense = estimate(net, squared_loss, (X, Y))
    convert(net, rank=2, generator=g)
    gB = ipa_grad_B(net, squared_loss, (X, Y))
    torch.testing.assert_close(gB["net.0"], dense["net.0.weight"] @ net.net[0].V)
    torch.testing.assert_close(gB["net.2"], dense["net.2.weight"] @ net.net[2].V)


def test_estimate_lowrank_ipa_saves_only_compressed_input():
    g = torch.Generator().manual_seed(6)
    n, m, r, N, T = 256, 16, 8, 4, 8
    net = nn.Sequential(nn.Linear(n, m, device="meta").to_empty(device="cpu"))
    with torch.no_grad():
        for p in net.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    X = torch.randn(N, T, n, generator=g)
    own = {p.untyped_storage().data_ptr() for p in net.parameters()}
    sizes = []

    def pack(t):
        if t.untyped_storage().data_ptr() not in own:
            sizes.append(t.numel())
        return t

    loss_fn = lambda model, b: model(b).pow(2).sum(dim=(1, 2))  # noqa: E731
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        estimate(net, loss_fn, X)
    full = sum(sizes)
    sizes.clear()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        estimate(net, loss_fn, X, projector="haar", rank=r, generator=g)
    low_layer = sizes[0]  # xV, saved first by the layer's low-rank term
    assert full >= N * T * n  # the dense IPA keeps x
    assert low_layer == N * T * r and N * T * n not in sizes  # x itself is never saved


# ----------------------------------------------------------------------------- unbiasedness (Example 1)
R_UNB = 4000


def _reps(model, pop, gen, R, batch_size=N_BATCH, **kw):
    batches = pop.sample_batches(R, batch_size, generator=gen)
    return ipa_replications(model, squared_loss, batches, generator=gen, **kw)["fc.weight"]


@pytest.mark.parametrize("share", [True, False], ids=["shared", "independent"])
@pytest.mark.parametrize("family", FAMILIES)
def test_lowrank_ipa_unbiased_example1(ex1, family, share, gen):
    model, pop, truth = ex1
    est = _reps(model, pop, gen, R_UNB, projector=family, rank=RANK, share_projection=share)
    res = unbiasedness_test(est, truth)
    assert res.pvalue > ALPHA, res
    # power: a frozen subspace (E[VVᵀ] ≠ I) at the same sample size is rejected
    mut = _reps(model, pop, gen, R_UNB, projector=lambda n: FixedSubspace(n, RANK), share_projection=share)
    assert unbiasedness_test(mut, truth).pvalue < ALPHA


def test_full_rank_ipa_unbiased_example1(ex1, gen):
    model, pop, truth = ex1
    est = _reps(model, pop, gen, R_UNB)
    assert unbiasedness_test(est, truth).pvalue > ALPHA
    # power: MUTANT "gradient of the sum instead of the mean of the per-example losses" (N x)
    batches = pop.sample_batches(R_UNB, N_BATCH, generator=gen)
    mut = ipa_replications(model, lambda m, b: N_BATCH * squared_loss(m, b), batches)["fc.weight"]
    assert unbiasedness_test(mut, truth).pvalue < ALPHA


def test_scale_c_gives_mean_c_times_gradient(ex1, gen):
    model, pop, truth = ex1
    est = _reps(model, pop, gen, R_UNB, projector="haar", rank=RANK, c=0.5)
    assert unbiasedness_test(est, 0.5 * truth).pvalue > ALPHA
    # power: the c-scaled estimator is not unbiased for ∇ itself
    assert unbiasedness_test(est, truth).pvalue < ALPHA


# ----------------------------------------------------------------------------- MSE against theory.md §3
N_MSE = 16  # large enough for the dependent and independent MSEs to differ clearly (1.89 vs 1.17 here)

@pytest.mark.parametrize("mode", ["dependent", "independent"])
@pytest.mark.parametrize("family", ["haar", "gaussian"])
def test_mse_matches_theory(ex1, family, mode, gen):
    model, pop, truth = ex1
    S = pop.second_moment(model, squared_loss, "fc.weight").numpy()
    grad = truth.numpy()
    P = make_projector(family, 8, RANK)
    M = P.second_moment().numpy()
    expected = theory.mse(S, grad, M, c=1.0, n_samples=N_MSE, mode=mode)
    share = mode == "dependent"
    est = _reps(model, pop, gen, R_UNB, N_MSE, projector=family, rank=RANK, share_projection=share)
    err = ((est - truth) ** 2).sum(dim=(1, 2))
    res = mean_test(err, np.asarray(expected))
    assert res.pvalue > ALPHA, (res, expected, float(err.mean()))
    # power: MUTANT that ignores `share_projection` (the other mode's estimator) against this mode's theory
    mut = _reps(model, pop, gen, R_UNB, N_MSE, projector=family, rank=RANK, share_projection=not share)
    assert mean_test(((mut - truth) ** 2).sum(dim=(1, 2)), np.asarray(expected)).pvalue < ALPHA


# ----------------------------------------------------------------------------- the instance-dependent projector plugs in
def test_instance_dependent_projector_plugs_in(ex1, gen):
    from estimators import InstanceDependent

    model, pop, truth = ex1
    S = pop.second_moment(model, squared_loss, "fc.weight")
    P = InstanceDependent(S, RANK)
    est = _reps(model, pop, gen, R_UNB, N_MSE, projector=lambda n: P, share_projection=False)
    assert unbiasedness_test(est, truth).pvalue > ALPHA
    expected = theory.mse(S.numpy(), truth.numpy(), P.second_moment().numpy(), n_samples=N_MSE, mode="independent")
    err = ((est - truth) ** 2).sum(dim=(1, 2))
    assert mean_test(err, np.asarray(expected)).pvalue > ALPHA
    # power: a frozen subspace is biased
    mut = _reps(model, pop, gen, R_UNB, N_MSE, projector=lambda n: FixedSubspace(n, RANK), share_projection=False)
    assert unbiasedness_test(mut, truth).pvalue < ALPHA
    # power: MUTANT ignoring share_projection=False, against the independent-mode MSE
    mut = _reps(model, pop, gen, R_UNB, N_MSE, projector=lambda n: P, share_projection=True)
    assert mean_test(((mut - truth) ** 2).sum(dim=(1, 2)), np.asarray(expected)).pvalue < ALPHA


@pytest.mark.parametrize("method", ["ipa", "lr", "zo"])
def test_float32_estimates(method):
    g = torch.Generator().manual_seed(9)
    net = MLP([6, 5, 3], dtype=torch.float32, generator=g)
    X, Y = torch.randn(7, 6, generator=g), torch.randn(7, 3, generator=g)
    for share in (True, False):
        est = estimate(net, squared_loss, (X, Y), method=method, projector="haar", rank=2, share_projection=share,
                       generator=g)
        assert all(v.dtype == torch.float32 and v.shape == p.shape
                   for (k, v), p in zip(sorted(est.items()), (net.net[0].weight, net.net[2].weight)))
