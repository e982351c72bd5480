"""Shampoo with 4-bit eigenvector state (Wang et al., "4-bit Shampoo for Memory-Efficient Network Training",
NeurIPS 2024, arXiv 2405.18144), batched over same-shape blocks (one batch per block shape across all parameters),
with an optional fused path whose matmuls decode the 4-bit operand in registers (``templates/shampoo.py``).

**Algorithm** (per matrix parameter, after squeezing size-1 dims and reshaping to ``(d0, rest)``, cut into blocks of
at most ``max_preconditioner_dim`` along each dim; every block ``G`` (m x n) has a left factor of order m and a right
factor of order n; step ``t`` counts from 1):

* statistics, every ``precondition_frequency`` (T1) steps, each factor: ``V = bjorck(D(codes), 1)`` (rows are
  eigenvectors), ``A = β Vᵀ diag(λ) V + (1-β) M`` with ``M = G Gᵀ`` (left) / ``Gᵀ G`` (right) of that step's gradient,
  one warm-started subspace iteration ``Q = qr((A + δ‖A‖_F I) Vᵀ).Q`` (δ = 1e-6 keeps the QR full rank, see
  ``warm_start``), ``λ = diag(Qᵀ A Q)``, eigenpairs sorted by decreasing ``λ``, ``codes = Q(Qᵀ)``. With
  ``ema_every_step=True`` (the Distributed-Shampoo regime) ``S = β S + (1-β) M`` is accumulated at every step in an
  fp32 buffer and the refresh uses ``A = β^T1 Vᵀ diag(λ) V + S``.
* inverse root, every ``inverse_root_frequency`` (T2) steps: ``V = bjorck(D(codes), 4)``,
  ``Â = Vᵀ diag((λ + ε λ_max)^-1/4) V`` stored as its fp32 diagonal plus its 4-bit off-diagonal (ε relative).
* every step: ``Ĝ = Â_L G Â_R`` per block, ``G̃ = Ĝ ‖G‖_F / ‖Ĝ‖_F`` over the whole parameter (grafting), then the
  first-order rule (AdamW or SGD with momentum) on ``G̃``. 1-D parameters and parameters under
  ``min_precondition_numel`` elements take the first-order rule on ``G`` alone. The products run either fused
  (``fused=True``: the Triton templates decode the 4-bit operand tile by tile in registers, one launch per product
  for the whole batch) or, by default, per chunk of blocks as decode-to-fp32 + cuBLAS batched matmuls, which is
  faster on an H100 today (see ``fused``).

Quantized matrices are stored row by row in ``Q4(map="linear2")`` (64-element blocks, fp32 absmax), each row padded
to whole blocks so a block never crosses rows (odd orders work). Eigenvector rows are stored block-rotated by default
(``eigenvector_rotation``): an orthogonal change of coordinates, not of the algorithm. Factors of order < 64 (fewer
than 4096 entries) keep fp32 matrices, as in the reference. ``bits=32`` runs the same code with every matrix in fp32.

**Stored inverse root, not ``U diag(λ^-1/4) Uᵀ`` on the fly.** Per factor of order n and per step, with G of n x k:

* stored Â (4-bit off-diagonal + fp32 diagonal): one n x n by n x k product, ``2 n² k`` FLOPs, reading
  ``n²/2 + n²/16 + 4n`` bytes of state.
* on the fly: two products (``Uᵀ G``, then ``U (diag · Uᵀ G)``), ``4 n² k`` FLOPs, reading the codes twice
  (``2 (n²/2 + n²/16) + 4n`` bytes). Its state is no smaller: the inverse root refreshes every T2 steps from the
  T1-refreshed statistics, so the per-step path needs its own snapshot of the eigenbasis (another ``9n²/16 + 4n``
  bytes, the same as the stored Â); and once that Björck-rectified snapshot is re-quantized to 4 bits the
  rectification is lost, so it is no more accurate than the stored Â (paper Table 1: rectified U + quantized B
  NRE 0.047 / 0.094 vs unrectified U 0.054 / 0.094).

The preconditioning matmuls are compute-bound (for the 151M-parameter benchmark stack 0.62 TFLOP per step stored vs
1.24 TFLOP on the fly, against ~170 MB of 4-bit state read), so the stored root halves the per-step cost at equal
memory and equal accuracy.

**Robustness, without host synchronisation.** A refreshed eigenbasis is accepted per block only if it is finite and
``max |QᵀQ - I| <= 1e-3``; the ``max_fallbacks`` worst blocks of each refresh chunk are recomputed in fp64 (and, with
``eigh_fallback=True``, by ``torch.linalg.eigh``, which checks its LAPACK status on the host: one synchronisation
per refresh). Rejected blocks keep their previous basis and eigenvalues; a non-finite inverse root keeps the previous
root. A parameter whose gradient is not finite (or whose ``‖G‖`` overflows fp32) takes a zero direction: its
first-order state decays as for a zero gradient, and it never becomes NaN. All selection is done with masks on the
device; the only Python branches are on the step counter.

**Under** ``torch.compile(opt.step, backend="lowbit")``. The step counter and the refreshes it makes due run outside
the traced graph (``Shampoo._begin_step``, excluded from tracing: the step's one graph break), each refresh chunk as
its own compiled region (``refresh_backend``, default inductor; QR, Cholesky and matmuls stay extern calls), compiled
once per chunk shape. The rest of the step (products, grafting, the first-order rule) is one graph: with quantized
first-order state the lowbit pass fuses each parameter's grafted update into its Triton kernel, with fp32 state it is
torch's fused AdamW/SGD. Matmul precisions travel with the products (``lowbit::shampoo_matmul``), not as global flags;
nothing in the per-step graph reads a value on the host. A compiled step runs the products unfused (decode +
batched matmul) and Björck in torch even with ``fused=True``: the templates' pointer tables are raw addresses, which
a traced graph cannot hold. With ``first_order_bits=8|4`` the hyperparameters are 0-d tensors filled from the param
groups before each step, so LR schedules cause no recompilation; with ``first_order_bits=32`` torch's functional
AdamW/SGD take them as Python floats (a changed value recompiles the per-step graph, as for torch.optim).
"""
from __future__ import annotations

import contextlib
import dataclasses
import math
import os
import types
from typing import Callable

import torch
from torch.optim.adamw import adamw as torch_adamw
from torch.optim.sgd import sgd as torch_sgd

from .. import ops  # noqa: F401  (registers torch.ops.lowbit.dequant / requant_)
from ..formats import Q4, Q8, Quantized, decode, encode, tables
from . import rules
from .core import evaluate_closure

GRAFTINGS = ("adamw", "sgd")
EIGENVECTOR_ROUNDINGS = ("nearest", "stochastic")
EIGENVECTOR_ROTATIONS = ("block_hadamard", "none")
ROTATION_SEED = 4242
SHAMPOO_BITS = (4, 32)
FIRST_ORDER_BITS = (32, 8, 4)
HYPERPARAMETER_KEYS = ("lr", "eps", "weight_decay", "momentum", "beta1", "beta2")
ORTHOGONALITY_TOLERANCE = 1e-3
RANK_SHIFT = 1e-6
_POINTWISE_STACK = 8  # inductor.config.max_pointwise_cat_inputs (see stack_scalars)
EIGENVECTOR_FORMAT = Q4(map="linear2")
_GRAFT_EPS = 1e-12


# --------------------------------------------------------------------------------------------------------------
# Blocking
# --------------------------------------------------------------------------------------------------------------
def matrix_shape(shape) -> tuple[int, int] | None:
    """``(d0, rest)`` of a parameter after dropping size-1 dims, or None when fewer than two dims remain."""
    dims = [s for s in shape if s != 1]
    if len(dims) < 2:
        return None
    return dims[0], math.prod(dims[1:])


def _cuts(size: int, max_dim: int) -> list[tuple[int, int]]:
    return [(start, min(max_dim, size - start)) for start in range(0, size, max_dim)]


@dataclasses.dataclass(frozen=True)
class Block:
    """One preconditioner block: rows ``row:row+rows`` and columns ``col:col+cols`` of parameter ``param``'s
    ``(d0, rest)`` matrix."""

    param: int
    row: int
    rows: int
    col: int
    cols: int

    def of(self, matrix: torch.Tensor) -> torch.Tensor:
        return matrix[self.row:self.row + self.rows, self.col:self.col + self.cols]


def partition(shape2d: tuple[int, int], max_dim: int, param: int = 0) -> list[Block]:
    """Blocks of at most ``max_dim`` along each dim, the last one along a dim taking the remainder."""
    return [Block(param, r, rs, c, cs) for r, rs in _cuts(shape2d[0], max_dim) for c, cs in _cuts(shape2d[1], max_dim)]


def _block_runs(blocks: list[Block]) -> list[tuple[int, int, Block, bool]]:
    """``(first, last, head, across)`` per run of adjacent same-shape blocks of one parameter: blocks ``first:last``
    follow ``head`` down one block column, or along one block row (``across``), so ``_run_view`` gives all of them
    as one ``(k, rows, cols)`` view."""
    runs, first = [], 0
    while first < len(blocks):
        head, last, across = blocks[first], first + 1, None
        while last < len(blocks):
            block, previous = blocks[last], blocks[last - 1]
            same = block.param == head.param and (block.rows, block.cols) == (head.rows, head.cols)
            down = same and block.col == head.col and block.row == previous.row + previous.rows
            along = same and block.row == head.row and block.col == previous.col + previous.cols
            if across is None and (down or along):
                across = along
            if not ((across is False and down) or (across is True and along)):
                break
            last += 1
        runs.append((first, last, head, bool(across)))
        first = last
    return runs


def _run_view(matrix: torch.Tensor, head: Block, count: int, across: bool) -> torch.Tensor:
    """The ``count`` blocks of a run starting at ``head`` as a ``(count, rows, cols)`` view of the parameter's
    ``(d0, rest)`` matrix."""
    if across:
        strip = matrix[head.row:head.row + head.rows, head.col:head.col + count * head.cols]
        return strip.unflatten(1, (count, head.cols)).transpose(0, 1)
    strip = matrix[head.row:head.row + count * head.rows, head.col:head.col + head.cols]
    return strip.unflatten(0, (count, head.rows))


# --------------------------------------------------------------------------------------------------------------
# Refresh math (pure torch, batched over the leading dim)
# --------------------------------------------------------------------------------------------------------------
@contextlib.contextmanager
def matmul_precision(precision: str):
    """fp32 matmuls of torch inside the block run with TF32 (``"tf32"``) or exact fp32 products (``"ieee"``)."""
    previous = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("high" if precision == "tf32" else "highest")
    try:
        yield
    finally:
        torch.set_float32_matmul_precision(previous)


# The precision of a product is part of the product: a flag set around a traced region is read when Dynamo traces (a
# graph break, ``torch.get_float32_matmul_precision`` returns a str) and baked into its guards, and one graph mixes
# precisions (TF32 per-step products, exact fp32 QR and Rayleigh quotients). Setting the flags in the un-traced part
# of the step would hold one precision for the whole per-step graph and need a second un-traced call to restore them
# (another graph break). An opaque op that sets the precision around its own matmul carries it into any graph, eager
# or compiled, without global state: inductor calls bmm as an extern kernel either way, so nothing is lost to fusion.
# Defined with the low-level Library API, as ``lowbit::fused_update_`` is (templates/fused_update.py): a
# torch.library.custom_op adds Python dispatch layers to every call, and an eager step makes a few per chunk on a
# host that is already the bound (benchmarks/results/profile_steps.exploratory.md).
_LIBRARY = torch.library.Library("lowbit", "FRAGMENT")
_LIBRARY.define("shampoo_matmul(Tensor a, Tensor b, str precision) -> Tensor")


def shampoo_matmul(a: torch.Tensor, b: torch.Tensor, precision: str) -> torch.Tensor:
    """``a @ b`` with fp32 products in TF32 (``"tf32"``) or exact fp32 (``"ieee"``), whatever the global setting."""
    with matmul_precision(precision):
        return torch.matmul(a, b)


for _dispatch_key in ("CPU", "CUDA"):
    _LIBRARY.impl("shampoo_matmul", shampoo_matmul, _dispatch_key)


@torch.library.register_fake("lowbit::shampoo_matmul", lib=_LIBRARY)
def _(a, b, precision):
    return torch.matmul(a, b)


def _matmul(a: torch.Tensor, b: torch.Tensor, precision: str | None) -> torch.Tensor:
    """``a @ b`` in ``precision``; None: in the caller's (global) setting. Eager steps call the product directly."""
    if precision is None:
        return a @ b
    if torch.compiler.is_compiling():
        return torch.ops.lowbit.shampoo_matmul(a, b, precision)
    return shampoo_matmul(a, b, precision)


def _use_triton(device: torch.device) -> bool:
    return device.type == "cuda" or os.environ.get("TRITON_INTERPRET", "0") == "1"


def bjorck(v: torch.Tensor, steps: int, precision: str = "ieee", kernel: bool = False) -> torch.Tensor:
    """``steps`` Björck steps ``V <- 1.5 V - 0.5 V Vᵀ V`` on every matrix of an fp32 ``(batch, n, n)`` tensor: torch
    matmuls in ``precision``, or with ``kernel`` (CUDA only, eager only: the template launch is not traceable) the
    Triton template ``bjorck_step``."""
    if kernel and v.device.type == "cuda" and not torch.compiler.is_compiling():
        from ..templates.shampoo import bjorck_step
        for _ in range(steps):
            v = bjorck_step(v, precision)
        return v
    for _ in range(steps):
        v = 1.5 * v - 0.5 * _matmul(_matmul(v, v.mT, precision), v, precision)
    return v


def rebuild_factor(rows: torch.Tensor, eigenvalues: torch.Tensor, precision: str | None = None) -> torch.Tensor:
    """``Vᵀ diag(λ) V`` for eigenvectors stored as the rows of ``V``."""
    return _matmul(rows.mT * eigenvalues[:, None, :], rows, precision)


def warm_start(factor: torch.Tensor, rows: torch.Tensor, precision: str | None = None) -> torch.Tensor:
    """``(A + δ ‖A‖_F I) Vᵀ``: one step of subspace iteration from the eigenvectors in the rows of V. The shift
    (δ = 1e-6, far below the inverse root's ridge) leaves the eigenvectors unchanged and keeps the result full rank, so
    the Cholesky-based QR never meets an exactly rank-deficient panel (a right factor GᵀG of a wide block, eigenvalues
    decayed to 0)."""
    shift = RANK_SHIFT * torch.linalg.matrix_norm(factor)
    return _matmul(factor, rows.mT, precision) + shift[:, None, None] * rows.mT


def orthonormal_basis(y: torch.Tensor, panel: int = 128) -> torch.Tensor:
    """Q of the QR decomposition ``Y = Q R`` with ``diag(R) > 0`` (the unique one), for a batch of square matrices.

    Block Gram-Schmidt over column panels, each projection done twice ("twice is enough"), each panel made
    orthonormal by two Cholesky-QR passes whose Gram matrix, Cholesky factor and triangular solve run in fp64 (exact
    for condition numbers up to ~1e7; ``warm_start`` keeps Y there).
    Everything is a batched matmul or a small batched factorisation (``panel`` columns), so it costs a few bmm of the
    whole batch instead of one Householder QR per block, and nothing checks a status on the host. Columns that are
    numerically dependent fail the orthogonality test of the refresh (which then keeps the previous basis). Columns
    are scaled to unit norm first (Q does not change; the Gram matrices stay well scaled)."""
    y = y / y.norm(dim=-2, keepdim=True).clamp_min(torch.finfo(y.dtype).tiny)
    q = torch.empty_like(y)
    n = y.shape[-1]
    for start in range(0, n, panel):
        block = y[..., start:start + panel]
        if start:
            previous = q[..., :start]
            for _ in range(2):
                block = block - previous @ (previous.mT @ block)
        block = block.double()
        for _ in range(2):
            gram = block.mT @ block
            shift = 1e-14 * gram.diagonal(dim1=-2, dim2=-1).sum(-1)
            gram = gram + shift[:, None, None] * torch.eye(gram.shape[-1], dtype=gram.dtype, device=gram.device)
            lower, _ = torch.linalg.cholesky_ex(gram)
            block = torch.linalg.solve_triangular(lower.mT, block, upper=True, left=False)
        q[..., start:start + panel] = block.to(q.dtype)
    return q


def rayleigh_sorted(a: torch.Tensor, q: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(Q', λ)``: ``λ = diag(Qᵀ A Q)`` clamped at 0 (A is positive semi-definite) and the columns of Q sorted by
    decreasing λ."""
    eigenvalues = (q * (a @ q)).sum(dim=-2)
    eigenvalues, order = eigenvalues.sort(dim=-1, descending=True)
    return q.gather(-1, order[:, None, :].expand_as(q)), eigenvalues.clamp_min(0)


def orthogonality_error(q: torch.Tensor) -> torch.Tensor:
    """``max |QᵀQ - I|`` per matrix."""
    eye = torch.eye(q.shape[-1], dtype=q.dtype, device=q.device)
    return (q.mT @ q - eye).abs().amax(dim=(-2, -1))


def inverse_fourth_root(rows: torch.Tensor, eigenvalues: torch.Tensor, epsilon: float,
                        precision: str | None = None) -> torch.Tensor:
    """``Vᵀ diag((λ + ε λ_max)^-1/4) V`` (eigenvectors as the rows of V; ε relative to the largest eigenvalue)."""
    eigenvalues = eigenvalues.clamp_min(0)
    floor = epsilon * eigenvalues.amax(dim=-1, keepdim=True)
    return rebuild_factor(rows, (eigenvalues + floor).pow(-0.25), precision)


def stack_scalars(values: list[torch.Tensor]) -> torch.Tensor:
    """``torch.stack`` of 0-d tensors. Traced, inductor writes a stack of more than 8 (``max_pointwise_cat_inputs``)
    tensors computed by extern kernels (``_foreach_norm``) with one copy kernel per input: 112 launches per step on
    the 151M-parameter benchmark stack, each a few microseconds of host time; stacks of at most 8 are one pointwise
    kernel, so larger ones are built as a tree of 8-wide stacks."""
    if not torch.compiler.is_compiling() or len(values) <= _POINTWISE_STACK:
        return torch.stack(values)
    parts = [torch.stack(values[i:i + _POINTWISE_STACK]) for i in range(0, len(values), _POINTWISE_STACK)]
    while len(parts) > 1:
        parts = [torch.cat(parts[i:i + _POINTWISE_STACK]) for i in range(0, len(parts), _POINTWISE_STACK)]
    return parts[0]


def _all_finite(x: torch.Tensor) -> torch.Tensor:
    return torch.isfinite(x).flatten(1).all(dim=1)


# --------------------------------------------------------------------------------------------------------------
# Factor storage
# --------------------------------------------------------------------------------------------------------------
def _encode_rows(x: torch.Tensor, fmt: Quantized, midpoints: torch.Tensor | None = None
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """4-bit codes and absmax of every row of ``(batch, rows, cols)`` fp32 matrices, rows padded to whole blocks: the
    Triton codec on CUDA in eager mode, else ``formats.encode`` (``midpoints``, the format's table on ``x``'s device,
    is then needed while tracing)."""
    from ..templates.shampoo import padded_row_length
    count, rows, cols = x.shape
    padded = padded_row_length(cols, fmt)
    full = torch.nn.functional.pad(x, (0, padded - cols))
    if x.device.type == "cuda" and not torch.compiler.is_compiling():
        from ..templates.codecs import quantize_into
        codes = torch.empty(count, rows, padded // 2, dtype=torch.uint8, device=x.device)
        absmax = torch.empty(count, rows, padded // fmt.block, dtype=torch.float32, device=x.device)
        quantize_into(full, codes, absmax, fmt)
        return codes, absmax
    codes, absmax = encode(full, fmt, midpoints)
    return codes.view(count, rows, padded // 2), absmax.view(count, rows, padded // fmt.block)


def _decode_codes(codes: torch.Tensor, absmax: torch.Tensor, fmt: Quantized, cols: int,
                  codebook: torch.Tensor | None = None) -> torch.Tensor:
    """fp32 ``(batch, rows, cols)`` values of row-padded 4-bit codes (``codebook`` as ``midpoints`` of
    ``_encode_rows``)."""
    count, rows, padded = codes.shape[0], codes.shape[1], codes.shape[2] * 2
    if codes.device.type == "cuda" and not torch.compiler.is_compiling():
        from ..templates.codecs import dequantize_into
        full = torch.empty(count, rows, padded, dtype=torch.float32, device=codes.device)
        dequantize_into(codes, absmax, fmt, full)
    else:
        if codebook is None:
            codebook = tables(fmt, codes.device)[0]
        full = decode(codes.reshape(-1), absmax.reshape(-1), fmt, count * rows * padded, codebook)
        full = full.view(count, rows, padded)
    return full[..., :cols]


def _decode_rows(q, codebook: torch.Tensor | None = None) -> torch.Tensor:
    """fp32 ``(batch, rows, cols)`` values of ``QuantizedRows``."""
    return _decode_codes(q.codes, q.absmax, q.fmt, q.cols, codebook)


def _rounding_noise(x_shape, fmt: Quantized, generator: torch.Generator) -> torch.Tensor:
    """The uniform draws ``stochastic_levels`` uses for matrices of ``x_shape``."""
    from ..templates.shampoo import padded_row_length
    count, rows, cols = x_shape
    width = padded_row_length(cols, fmt)
    return torch.rand((count, rows, width // fmt.block, fmt.block), generator=generator, device=generator.device)


def stochastic_levels(x: torch.Tensor, fmt: Quantized, generator: torch.Generator | None = None, *,
                      noise: torch.Tensor | None = None, levels: torch.Tensor | None = None) -> torch.Tensor:
    """``x`` (``(batch, rows, cols)`` fp32, rows in 64-blocks as stored) with every entry moved to one of the two levels
    of ``fmt`` (times its block's absmax) that bracket it, the upper one with probability proportional to the distance
    from the lower: an unbiased rounding (the block's absmax entry stays exact, so ``_encode_rows`` of the result gives
    the chosen codes). Device-agnostic torch ops; the uniform draws come from ``generator`` (on ``x``'s device) or,
    inside a compiled region, as ``noise`` (``_rounding_noise``), with ``levels`` the format's codebook on ``x``'s
    device."""
    from ..templates.shampoo import padded_row_length
    count, rows, cols = x.shape
    width = padded_row_length(cols, fmt)
    blocks = torch.nn.functional.pad(x, (0, width - cols)).view(count, rows, width // fmt.block, fmt.block)
    scale = blocks.abs().amax(-1, keepdim=True)
    y = (blocks / torch.where(scale > 0, scale, 1.0)).clamp(-1.0, 1.0)
    if levels is None:
        levels = tables(fmt, x.device)[0]
    if noise is None:
        noise = _rounding_noise(x.shape, fmt, generator)
    upper = torch.searchsorted(levels, y.contiguous()).clamp(1, levels.numel() - 1)
    low, high = levels[upper - 1], levels[upper]
    take_high = noise * (high - low) < (y - low)
    rounded = torch.where(take_high, high, low) * scale
    return rounded.view(count, rows, width)[..., :cols]


def block_rotation(block: int, device: torch.device) -> torch.Tensor:
    """The fixed orthogonal ``block x block`` matrix ``R = D H / sqrt(block)`` (H Sylvester's Hadamard matrix, D
    diagonal random signs from ``ROTATION_SEED``) in which 4-bit eigenvector rows are stored, block by block."""
    hadamard = torch.ones(1, 1, dtype=torch.float64)
    while hadamard.shape[0] < block:
        hadamard = torch.cat([torch.cat([hadamard, hadamard], 1), torch.cat([hadamard, -hadamard], 1)], 0)
    if hadamard.shape[0] != block:
        raise ValueError(f"block_rotation: block must be a power of two, got {block}")
    signs = torch.randint(0, 2, (block,), generator=torch.Generator().manual_seed(ROTATION_SEED)) * 2 - 1
    return (signs[:, None] * hadamard / math.sqrt(block)).to(torch.float32).to(device)


def rotate_blocks(x: torch.Tensor, rotation: torch.Tensor, inverse: bool = False) -> torch.Tensor:
    """``x`` (``(batch, rows, width)``, width a multiple of the rotation's order) with every ``order``-entry block of
    every row multiplied by ``rotation`` (``x_block @ R``), or by its inverse ``Rᵀ``; products in exact fp32."""
    count, rows, width = x.shape
    order = rotation.shape[0]
    blocks = x.reshape(count, rows * width // order, order)
    return _matmul(blocks, rotation.mT if inverse else rotation, "ieee").reshape(count, rows, width)


class FactorSide:
    """The left or right Kronecker factors of one batch of same-shape blocks (``count`` factors of order ``order``):
    eigenvectors as rows (sorted by decreasing eigenvalue) + fp32 eigenvalues, the inverse root as fp32 diagonal +
    off-diagonal matrix, and with ``ema`` the fp32 running statistics of the Distributed-Shampoo regime. Matrices are
    ``QuantizedRows`` when ``fmt`` is given, fp32 ``(count, order, order)`` tensors otherwise.

    With ``rotate`` (and ``fmt``), eigenvector rows are stored in rotated coordinates: each row, padded to whole
    format blocks, is multiplied block by block by ``block_rotation`` before it is quantized, and by its transpose after
    it is decoded. An orthogonal change of coordinates changes no eigenvector, but spreads the energy of localized rows
    (a few large entries, which per-block absmax scaling quantizes worst) evenly over the block
    (benchmarks/results/quality.shampoo_ablation.md). The inverse root's off-diagonal is stored unrotated."""

    def __init__(self, count: int, order: int, fmt: Quantized | None, epsilon: float, ema: bool,
                 device: torch.device, rotate: bool = False):
        from ..templates.shampoo import QuantizedRows
        self.count, self.order, self.fmt = count, order, fmt
        self.rotation = block_rotation(fmt.block, device) if rotate and fmt is not None else None
        eye = torch.eye(order, dtype=torch.float32, device=device).expand(count, order, order)
        zeros = torch.zeros(count, order, order, dtype=torch.float32, device=device)
        if fmt is None:
            self.eigenvectors = eye.contiguous()
            self.root_offdiagonal = zeros
        else:
            self.eigenvectors = QuantizedRows(*_encode_rows(self._stored_coordinates(eye), fmt), fmt, order)
            self.root_offdiagonal = QuantizedRows(*_encode_rows(zeros, fmt), fmt, order)
        self.eigenvalues = torch.full((count, order), float(epsilon), dtype=torch.float32, device=device)
        self.root_diagonal = torch.ones(count, order, dtype=torch.float32, device=device)
        self.ema = zeros.clone() if ema else None
        # The format's tables as tensors of this side: traced code reads them instead of the formats' cache.
        self.codebook, self.midpoints = tables(EIGENVECTOR_FORMAT, device)

    def blocks(self, start: int, end: int) -> "FactorSide":
        """The factors of blocks ``start:end``, sharing this side's storage (stores write through)."""
        return self.selected(lambda t: t[start:end])

    def selected(self, select: Callable[[torch.Tensor], torch.Tensor]) -> "FactorSide":
        """The factors picked by ``select`` along the block dim (a slice shares storage; an index copies)."""
        from ..templates.shampoo import QuantizedRows
        part = object.__new__(FactorSide)
        part.order, part.fmt = self.order, self.fmt
        part.codebook, part.midpoints, part.rotation = self.codebook, self.midpoints, self.rotation
        for name in ("eigenvectors", "root_offdiagonal"):
            stored = getattr(self, name)
            if isinstance(stored, torch.Tensor):
                setattr(part, name, select(stored))
            else:
                setattr(part, name, QuantizedRows(select(stored.codes).contiguous(),
                                                  select(stored.absmax).contiguous(), stored.fmt, stored.cols))
        part.eigenvalues = select(self.eigenvalues)
        part.root_diagonal = select(self.root_diagonal)
        part.ema = None if self.ema is None else select(self.ema)
        part.count = part.eigenvalues.shape[0]
        return part

    def root_matrices(self, select: Callable[[torch.Tensor], torch.Tensor] = lambda t: t) -> torch.Tensor:
        """The inverse roots ``O + diag(a)`` of the factors ``select`` picks (see ``selected``) as fp32 matrices (a
        new tensor). Creates no objects, so Dynamo traces it."""
        stored = self.root_offdiagonal
        if isinstance(stored, torch.Tensor):
            matrices = select(stored).clone()
        else:
            matrices = _decode_codes(select(stored.codes), select(stored.absmax), stored.fmt, stored.cols,
                                     self.codebook)
        matrices.diagonal(dim1=-2, dim2=-1).add_(select(self.root_diagonal))
        return matrices

    def tensors(self) -> dict[str, torch.Tensor]:
        """Every stored tensor by state name; the leading dim indexes the blocks."""
        out = {}
        for name, matrix in (("eigenvectors", self.eigenvectors), ("root_offdiagonal", self.root_offdiagonal)):
            if self.fmt is None:
                out[name] = matrix
            else:
                out[f"{name}.codes"], out[f"{name}.absmax"] = matrix.codes, matrix.absmax
        out["eigenvalues"] = self.eigenvalues
        out["root_diagonal"] = self.root_diagonal
        if self.ema is not None:
            out["factor_ema"] = self.ema
        return out

    def preconditioner_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for name, t in self.tensors().items() if name != "factor_ema")

    @staticmethod
    def _matrices(stored, codebook: torch.Tensor | None = None) -> torch.Tensor:
        return stored if isinstance(stored, torch.Tensor) else _decode_rows(stored, codebook)

    def _stored_coordinates(self, rows: torch.Tensor) -> torch.Tensor:
        """Eigenvector rows as they are quantized: padded to whole blocks and rotated (unchanged without rotation)."""
        if self.rotation is None:
            return rows
        from ..templates.shampoo import padded_row_length
        padded = torch.nn.functional.pad(rows, (0, padded_row_length(self.order, self.fmt) - self.order))
        return rotate_blocks(padded, self.rotation)

    def stored_rows(self) -> torch.Tensor:
        """The decoded eigenvector rows in their stored coordinates (padded and rotated when rotated)."""
        stored = self.eigenvectors
        if self.rotation is None:
            return self._matrices(stored, self.codebook).contiguous()
        return _decode_codes(stored.codes, stored.absmax, stored.fmt, stored.codes.shape[-1] * 2, self.codebook)

    def eigenvector_rows(self) -> torch.Tensor:
        rows = self.stored_rows()
        if self.rotation is None:
            return rows
        return rotate_blocks(rows, self.rotation, inverse=True)[..., :self.order].contiguous()

    def _store(self, stored, values: torch.Tensor, ok: torch.Tensor) -> None:
        keep = ok[:, None, None]
        if isinstance(stored, torch.Tensor):
            stored.copy_(torch.where(keep, values, stored))
            return
        codes, absmax = _encode_rows(values, stored.fmt, self.midpoints)
        stored.codes.copy_(torch.where(keep, codes, stored.codes))
        stored.absmax.copy_(torch.where(keep, absmax, stored.absmax))

    def store_eigenbasis(self, rows: torch.Tensor, eigenvalues: torch.Tensor, ok: torch.Tensor,
                         generator: torch.Generator | None = None, noise: torch.Tensor | None = None) -> None:
        """Keep the blocks ``ok`` selects; with ``generator`` (or its draws, ``noise``), 4-bit rows are rounded
        stochastically (``stochastic_levels``) instead of to the nearest level."""
        rows = self._stored_coordinates(rows)
        if (generator is not None or noise is not None) and self.fmt is not None:
            rows = stochastic_levels(rows, self.fmt, generator, noise=noise, levels=self.codebook)
        self._store(self.eigenvectors, rows, ok)
        self.eigenvalues.copy_(torch.where(ok[:, None], eigenvalues, self.eigenvalues))

    def store_root(self, root: torch.Tensor, ok: torch.Tensor) -> None:
        diagonal = root.diagonal(dim1=-2, dim2=-1)
        self._store(self.root_offdiagonal, root - torch.diag_embed(diagonal), ok)
        self.root_diagonal.copy_(torch.where(ok[:, None], diagonal, self.root_diagonal))


class BlockBatch:
    """All blocks of one shape ``rows x cols`` (and one gradient dtype) across the parameters, in parameter order (a
    parameter's blocks of this shape are consecutive), with their left and right factors."""

    def __init__(self, rows: int, cols: int, dtype: torch.dtype, blocks: list[Block], bits: int, epsilon: float,
                 ema: bool, device: torch.device, rotate: bool = False):
        self.rows, self.cols, self.dtype, self.blocks = rows, cols, dtype, blocks
        self.left = FactorSide(len(blocks), rows, self._format(rows, bits), epsilon, ema, device, rotate)
        self.right = FactorSide(len(blocks), cols, self._format(cols, bits), epsilon, ema, device, rotate)
        self._tables: tuple | None = None

    @staticmethod
    def _format(order: int, bits: int) -> Quantized | None:
        return EIGENVECTOR_FORMAT if bits == 4 and EIGENVECTOR_FORMAT.stores_quantized(order * order) else None

    @property
    def key(self) -> str:
        suffix = "" if self.dtype == torch.float32 else "_" + str(self.dtype).removeprefix("torch.")
        return f"blocks{self.rows}x{self.cols}{suffix}"

    def param_range(self, param: int) -> tuple[int, int] | None:
        indices = [i for i, block in enumerate(self.blocks) if block.param == param]
        return (indices[0], indices[-1] + 1) if indices else None

    def cached_tables(self, key: tuple, build: Callable[[], tuple]) -> tuple:
        """Pointer tables for this step's gradients and directions, rebuilt only when an address changed."""
        if self._tables is None or self._tables[0] != key:
            self._tables = (key, build())
        return self._tables[1]


# --------------------------------------------------------------------------------------------------------------
# Refresh regions: one chunk of one block batch, pure functions of tensors (eager, or each its own compiled region)
# --------------------------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class RefreshConfig:
    """The constants of a refresh (read from the optimizer at every refresh, so changed attributes take effect)."""

    beta: float
    ema_decay: float  # beta ** precondition_frequency: the decay of the old factor with ema_every_step
    epsilon: float
    statistics_bjorck_steps: int
    root_bjorck_steps: int
    precision: str  # refresh_precision
    qr_panel: int
    max_fallbacks: int
    eigh_fallback: bool
    kernel: bool  # Björck by the Triton template (fused=True; eager CUDA only)


def _finite_gradients(g: torch.Tensor, present: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """fp32 gradient blocks with the non-finite ones (and those of parameters without a gradient) zeroed, and the
    mask of the blocks kept."""
    g = g.to(torch.float32)
    ok = _all_finite(g) & present
    return torch.where(ok[:, None, None], g, 0.0), ok


def accumulate_chunk(cfg: RefreshConfig, left: FactorSide, right: FactorSide, g: torch.Tensor,
                     present: torch.Tensor) -> None:
    """``S = β S + (1-β) M`` for both factors of a chunk (``ema_every_step``); products in the caller's precision."""
    g, _ = _finite_gradients(g, present)
    left.ema.baddbmm_(g, g.mT, beta=cfg.beta, alpha=1 - cfg.beta)
    right.ema.baddbmm_(g.mT, g, beta=cfg.beta, alpha=1 - cfg.beta)


def statistics_chunk(cfg: RefreshConfig, left: FactorSide, right: FactorSide, g: torch.Tensor | None,
                     present: torch.Tensor | None, noise: tuple, counters: dict) -> None:
    """The statistics refresh of both factors of a chunk, from that step's gradient blocks ``g`` or (``g`` None)
    from the accumulated statistics; ``noise`` holds each side's stochastic-rounding draws or None."""
    if g is None:
        for side, draws in zip((left, right), noise):
            _refresh_side(cfg, side, side.ema, cfg.ema_decay, None, draws, counters)
            side.ema.zero_()
        return
    g, ok = _finite_gradients(g, present)
    left_update = (1 - cfg.beta) * _matmul(g, g.mT, cfg.precision)
    right_update = (1 - cfg.beta) * _matmul(g.mT, g, cfg.precision)
    _refresh_side(cfg, left, left_update, cfg.beta, ok, noise[0], counters)
    _refresh_side(cfg, right, right_update, cfg.beta, ok, noise[1], counters)


def _refresh_side(cfg: RefreshConfig, side: FactorSide, update: torch.Tensor, decay: float,
                  usable: torch.Tensor | None, noise: torch.Tensor | None, counters: dict) -> None:
    rows = bjorck(side.eigenvector_rows(), cfg.statistics_bjorck_steps, cfg.precision, cfg.kernel)
    factor = decay * rebuild_factor(rows, side.eigenvalues, cfg.precision) + update
    factor = 0.5 * (factor + factor.mT)
    warm = warm_start(factor, rows, cfg.precision)
    q, eigenvalues = rayleigh_sorted(factor, orthonormal_basis(warm, cfg.qr_panel))
    error = orthogonality_error(q)
    ok = _all_finite(q) & torch.isfinite(eigenvalues).all(dim=1) & (error <= ORTHOGONALITY_TOLERANCE)
    q, eigenvalues, ok = _fall_back(cfg, factor, rows, q, eigenvalues, ok, error, counters)
    if usable is not None:
        ok = ok & usable
    counters["rejected_blocks"] += (~ok).sum()
    side.store_eigenbasis(q.mT, eigenvalues, ok, noise=noise)


def _fall_back(cfg: RefreshConfig, factor, rows, q, eigenvalues, ok, error, counters):
    """Recompute the ``max_fallbacks`` worst blocks of the chunk in fp64 (and by eigh if enabled); blocks that
    pass replace rejected ones. Static shapes, no host sync (except inside eigh)."""
    count = min(cfg.max_fallbacks, q.shape[0])
    if count == 0:
        return q, eigenvalues, ok
    badness = torch.where(ok, -1.0, torch.nan_to_num(error, nan=math.inf))
    index = badness.topk(count).indices
    a = factor[index].double()
    y = warm_start(a, rows[index].double())
    finite = _all_finite(a) & _all_finite(y)
    eye = torch.eye(a.shape[-1], dtype=a.dtype, device=a.device)
    a = torch.where(finite[:, None, None], a, eye)
    y = torch.where(finite[:, None, None], y, eye)
    candidate, candidate_values = rayleigh_sorted(a, orthonormal_basis(y, cfg.qr_panel))
    candidate_ok = finite & _all_finite(candidate) & (orthogonality_error(candidate) <= ORTHOGONALITY_TOLERANCE)
    if cfg.eigh_fallback:
        values, vectors = torch.linalg.eigh(a)
        values, vectors = values.flip(-1).clamp_min(0), vectors.flip(-1)
        use_eigh = ~candidate_ok & finite & _all_finite(vectors)
        candidate = torch.where(use_eigh[:, None, None], vectors, candidate)
        candidate_values = torch.where(use_eigh[:, None], values, candidate_values)
        candidate_ok = candidate_ok | use_eigh
    take = ~ok[index] & candidate_ok
    q = q.index_copy(0, index, torch.where(take[:, None, None], candidate.to(q.dtype), q[index]))
    eigenvalues = eigenvalues.index_copy(
        0, index, torch.where(take[:, None], candidate_values.to(eigenvalues.dtype), eigenvalues[index]))
    ok = ok.index_copy(0, index, ok[index] | take)
    counters["fallback_blocks"] += take.sum()
    return q, eigenvalues, ok


def roots_chunk(cfg: RefreshConfig, left: FactorSide, right: FactorSide, counters: dict) -> None:
    """The inverse-root refresh of both factors of a chunk; a non-finite root keeps the previous one."""
    for side in (left, right):
        rows = bjorck(side.eigenvector_rows(), cfg.root_bjorck_steps, cfg.precision, cfg.kernel)
        root = inverse_fourth_root(rows, side.eigenvalues, cfg.epsilon, cfg.precision)
        ok = _all_finite(root)
        counters["rejected_roots"] += (~ok).sum()
        side.store_root(root, ok)


def _own_code(fn: Callable, name: str) -> Callable:
    """A copy of ``fn`` under its own code object. Dynamo keeps compiled variants per code object and recompiles when
    one is called with new shapes (``recompile_limit`` of them, then it runs eagerly): one copy per chunk shape makes
    each chunk shape a first compilation of its own."""
    code = fn.__code__.replace(co_name=name)
    if hasattr(code, "co_qualname"):
        code = code.replace(co_qualname=name)
    return types.FunctionType(code, fn.__globals__, name, fn.__defaults__, fn.__closure__)


# --------------------------------------------------------------------------------------------------------------
# The optimizer
# --------------------------------------------------------------------------------------------------------------
class Shampoo(torch.optim.Optimizer):
    """Shampoo with 4-bit (``bits=4``) or fp32 (``bits=32``) preconditioner state; see the module docstring.

    Args:
        params: parameters or param groups (groups may override the first-order hyperparameters).
        lr: learning rate of the grafted first-order rule.
        bits: 4 (eigenvectors and inverse-root off-diagonal in 4 bits) or 32.
        max_preconditioner_dim: largest block side.
        precondition_frequency: T1, steps between statistics refreshes.
        inverse_root_frequency: T2, steps between inverse-root refreshes.
        beta: decay of the factor statistics.
        epsilon: ridge of the inverse root, relative to the largest eigenvalue (also the initial eigenvalue).
        grafting: "adamw" (betas, eps, weight_decay decoupled) or "sgd" (momentum, nesterov, weight_decay as L2).
        first_order_bits: 32 (torch's fused kernels), 8 or 4 (``lbc.optim.rules`` over quantized state).
        ema_every_step: accumulate the factor statistics at every step (Distributed-Shampoo regime; an fp32
            ``order x order`` buffer per factor) instead of sampling one gradient every T1 steps.
        statistics_bjorck_steps, root_bjorck_steps: t1 and t2.
        min_precondition_numel: parameters with fewer elements take the first-order rule alone.
        max_fallbacks: blocks per factor side and refresh chunk recomputed in fp64 when rejected.
        eigh_fallback: also try ``torch.linalg.eigh`` on those blocks (costs one host sync per refresh).
        precision: "tf32" or "ieee" for the per-step preconditioning matmuls. The roots' fp32 diagonals are part of
            the multiplied matrices, so with "tf32" even an identity root rounds G to TF32 (~5e-4 relative); with
            "ieee" an identity root passes G through exactly.
        refresh_precision: "tf32" or "ieee" for the refresh's Björck steps, rebuilt factors, new statistics and warm
            start (default: "tf32" with 4-bit eigenvectors, whose quantization error swamps TF32's, "ieee" for bits=32).
        qr_panel: column panel of the batched QR (512: the fastest refresh of panels 128/512/1024 at 16-block chunks
            on the benchmark stack, H100: 258.6 / 322.5 / 294.9 ms, ``benchmarks/results/profile_steps.exploratory.md``
            run 3).
        chunk_blocks: blocks refreshed together; bounds the refresh's temporary memory (~1 GB at 16 blocks of 1024).
        precondition_chunk_blocks: blocks preconditioned together per step on the unfused path (five transient fp32
            matrices per block: ~1 GB at 48 blocks of 1024; fewer chunks, fewer host calls per step).
        eigenvector_rounding: "nearest" (the paper's) or "stochastic": a statistics refresh stores its 4-bit
            eigenvectors with unbiased stochastic rounding (``stochastic_levels``), drawn from a generator seeded by
            ``seed`` and the step, so a run and a resumed run draw the same. An experiment, not a default: on the
            CPU quality suite (benchmarks/results/quality.md, 10 seeds; char LM, digits MLP, digits CNN, MNIST-1D) it
            keeps 103/89/93/88% of 32-bit Shampoo's gain with the default rotation (nearest: 96/96/92/83%), and
            101/88/104/38% without it (nearest: 83/94/96/88%).
        eigenvector_rotation: "block_hadamard" (default) stores 4-bit eigenvector rows in rotated coordinates: every
            64-entry block of a row times a fixed randomized Hadamard matrix (``block_rotation``) before quantizing,
            and times its transpose after decoding; same bytes, no extra state (see ``FactorSide``). "none" is the
            paper's storage. On the CPU quality suite (benchmarks/results/quality.md, 10 seeds) it raises the share
            of 32-bit Shampoo's gain kept on the char LM from 83% to 96% (per seed: better on 10 of 10); on the
            digits MLP, digits CNN and MNIST-1D the change is within seed noise (96/92/83% against 94/96/88%).
        seed: see ``eigenvector_rounding``.
        fused: run the per-step products and Björck with the Triton templates, the 4-bit operand decoded in
            registers (one launch per product per batch, no fp32 copy of a root in memory). Off by default: on an
            H100 (benchmarks/results/shampoo.md) the two products take 9.17 and 2.90 ms (34 and 107 TFLOP/s) for 144
            blocks of 1024 x 1024, against 2.20 ms for both when decoding to a transient fp32 workspace and
            multiplying with cuBLAS in TF32.
    """

    # The torch.compile backend of the refresh regions of a compiled step ("aot_eager" compiles in a fraction of the
    # time, for debugging and CPU tests).
    refresh_backend = "inductor"

    def __init__(self, params, lr: float = 1e-3, *, bits: int = 4, max_preconditioner_dim: int = 1024,
                 precondition_frequency: int = 100, inverse_root_frequency: int = 500, beta: float = 0.95,
                 epsilon: float = 1e-4, grafting: str = "adamw", betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8, weight_decay: float = 0.0, momentum: float = 0.9, nesterov: bool = False,
                 first_order_bits: int = 32, ema_every_step: bool = False, statistics_bjorck_steps: int = 1,
                 root_bjorck_steps: int = 4, min_precondition_numel: int = 4096, max_fallbacks: int = 1,
                 eigh_fallback: bool = False, precision: str = "tf32", refresh_precision: str | None = None,
                 qr_panel: int = 512, chunk_blocks: int = 16, precondition_chunk_blocks: int = 48, fused: bool = False,
                 eigenvector_rounding: str = "nearest", eigenvector_rotation: str = "block_hadamard", seed: int = 0):
        checks = [
            ("bits", bits in SHAMPOO_BITS, f"one of {SHAMPOO_BITS}"),
            ("first_order_bits", first_order_bits in FIRST_ORDER_BITS, f"one of {FIRST_ORDER_BITS}"),
            ("grafting", grafting in GRAFTINGS, f"one of {GRAFTINGS}"),
            ("precision", precision in ("tf32", "ieee"), "'tf32' or 'ieee'"),
            ("refresh_precision", refresh_precision in (None, "tf32", "ieee"), "None, 'tf32' or 'ieee'"),
            ("eigenvector_rounding", eigenvector_rounding in EIGENVECTOR_ROUNDINGS, f"one of {EIGENVECTOR_ROUNDINGS}"),
            ("eigenvector_rotation", eigenvector_rotation in EIGENVECTOR_ROTATIONS, f"one of {EIGENVECTOR_ROTATIONS}"),
            ("seed", isinstance(seed, int) and not isinstance(seed, bool), "an int"),
            ("lr", lr >= 0, ">= 0"),
            ("max_preconditioner_dim", isinstance(max_preconditioner_dim, int) and max_preconditioner_dim >= 1,
             "an int >= 1"),
            ("precondition_frequency", isinstance(precondition_frequency, int) and precondition_frequency >= 1,
             "an int >= 1"),
            ("inverse_root_frequency", isinstance(inverse_root_frequency, int) and inverse_root_frequency >= 1,
             "an int >= 1"),
            ("beta", 0.0 <= beta < 1.0, "in [0, 1)"),
            ("epsilon", epsilon > 0, "> 0"),
            ("betas", len(betas) == 2 and all(0.0 <= b < 1.0 for b in betas), "two values in [0, 1)"),
            ("eps", eps >= 0, ">= 0"),
            ("weight_decay", weight_decay >= 0, ">= 0"),
            ("momentum", 0.0 <= momentum < 1.0, "in [0, 1)"),
            ("statistics_bjorck_steps", statistics_bjorck_steps >= 0, ">= 0"),
            ("root_bjorck_steps", root_bjorck_steps >= 0, ">= 0"),
            ("min_precondition_numel", min_precondition_numel >= 0, ">= 0"),
            ("max_fallbacks", max_fallbacks >= 0, ">= 0"),
            ("qr_panel", qr_panel >= 1, ">= 1"),
            ("chunk_blocks", chunk_blocks >= 1, ">= 1"),
            ("precondition_chunk_blocks", precondition_chunk_blocks >= 1, ">= 1"),
        ]
        for name, ok, expected in checks:
            if not ok:
                raise ValueError(f"Shampoo: {name} must be {expected}, got {locals()[name]!r}")
        if nesterov and momentum <= 0:
            raise ValueError("Shampoo: nesterov=True needs momentum > 0")
        defaults = dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay, momentum=momentum,
                        nesterov=nesterov)
        self.bits, self.grafting, self.first_order_bits = bits, grafting, first_order_bits
        self.max_preconditioner_dim = max_preconditioner_dim
        self.precondition_frequency, self.inverse_root_frequency = precondition_frequency, inverse_root_frequency
        self.beta, self.epsilon, self.ema_every_step = beta, epsilon, ema_every_step
        self.statistics_bjorck_steps, self.root_bjorck_steps = statistics_bjorck_steps, root_bjorck_steps
        self.min_precondition_numel, self.max_fallbacks = min_precondition_numel, max_fallbacks
        self.eigh_fallback, self.precision, self.qr_panel = eigh_fallback, precision, qr_panel
        self.chunk_blocks, self.precondition_chunk_blocks, self.fused = chunk_blocks, precondition_chunk_blocks, fused
        self.eigenvector_rounding, self.eigenvector_rotation = eigenvector_rounding, eigenvector_rotation
        self.seed = seed
        # Björck, the rebuilt factor, the new statistics and the warm start feed a factor whose 4-bit eigenvectors carry
        # ~5% entry error, which swamps TF32's 1e-3; the fp32 baseline keeps exact fp32 products. The QR's
        # projections, the Rayleigh quotients and the orthogonality test always multiply in exact fp32.
        self.refresh_precision = refresh_precision or ("tf32" if bits == 4 else "ieee")
        self._initialised = False
        super().__init__(params, defaults)
        self._params = [p for group in self.param_groups for p in group["params"]]
        self._check_params()
        self._step = 0
        self._build_batches()
        for index, param in enumerate(self._params):
            self.state[param] = self._initial_state(index, param)
        self.counters = {name: torch.zeros((), dtype=torch.int64, device=self._device)
                         for name in ("rejected_blocks", "fallback_blocks", "rejected_roots")}
        index_of = {id(p): i for i, p in enumerate(self._params)}
        self._members = [[index_of[id(p)] for p in group["params"]] for group in self.param_groups]
        self._hyperparameters = [{key: torch.zeros((), dtype=torch.float32, device=self._device)
                                  for key in HYPERPARAMETER_KEYS} for _ in self.param_groups]
        self._settings: list[dict] = [{} for _ in self.param_groups]
        self._compiled_regions: dict[tuple, Callable] = {}
        self._compile_regions = False
        self._present_masks: dict[tuple, torch.Tensor] = {}
        # Every state tensor keeps its address for the optimizer's life (stores and load_state_dict copy into it), so
        # the CUDA graphs of a step compiled with mode="reduce-overhead" read and write it in place instead of
        # copying it into the graph's buffers at every replay (and do not skip graphs for mutating it).
        for tensor in self._state_tensors():
            torch._dynamo.mark_static_address(tensor)
        self._initialised = True

    def _state_tensors(self) -> list[torch.Tensor]:
        """The parameters and every tensor the step reads or writes besides the gradients."""
        tensors = list(self._params) + list(self.counters.values())
        tensors += [t for held in self._hyperparameters for t in held.values()]
        tensors += [t for state in self.state.values() for t in state.values()]
        for batch in self.batches:
            for side in (batch.left, batch.right):
                tensors += list(side.tensors().values())
                tensors += [t for t in (side.codebook, side.midpoints, side.rotation) if t is not None]
        return tensors

    # ------------------------------------------------------------------ set-up
    def add_param_group(self, param_group: dict) -> None:
        if getattr(self, "_initialised", False):
            raise RuntimeError("Shampoo: parameter groups cannot be added after construction (blocks of every "
                               "parameter are batched together when the optimizer is built)")
        super().add_param_group(param_group)

    def _check_params(self) -> None:
        if not self._params:
            raise ValueError("Shampoo: got an empty parameter list")
        devices = {p.device for p in self._params}
        if len(devices) != 1:
            raise ValueError(f"Shampoo: all parameters must be on one device, got {sorted(map(str, devices))}")
        self._device = devices.pop()
        for i, p in enumerate(self._params):
            if p.dtype not in (torch.float32, torch.bfloat16, torch.float16):
                raise TypeError(f"Shampoo: parameter {i} has dtype {p.dtype}; expected float32, bfloat16 or float16")
            if not p.is_contiguous():
                raise ValueError(f"Shampoo: parameter {i} is not contiguous")

    def _is_preconditioned(self, param: torch.Tensor) -> bool:
        return matrix_shape(param.shape) is not None and param.numel() >= self.min_precondition_numel

    def _build_batches(self) -> None:
        self._shapes2d: list[tuple[int, int] | None] = []
        by_shape: dict[tuple, list[Block]] = {}
        for index, param in enumerate(self._params):
            shape2d = matrix_shape(param.shape) if self._is_preconditioned(param) else None
            self._shapes2d.append(shape2d)
            if shape2d is None:
                continue
            for block in partition(shape2d, self.max_preconditioner_dim, index):
                by_shape.setdefault((block.rows, block.cols, str(param.dtype)), []).append(block)
        self.batches = [BlockBatch(rows, cols, self._params[blocks[0].param].dtype, blocks, self.bits, self.epsilon,
                                   self.ema_every_step, self._device, self.eigenvector_rotation == "block_hadamard")
                        for (rows, cols, _), blocks in sorted(by_shape.items())]

    def _first_order_formats(self, numel: int) -> dict:
        names = {"adamw": {"exp_avg": True, "exp_avg_sq": False}, "sgd": {"momentum_buffer": True}}[self.grafting]
        if self.first_order_bits == 32:
            return {name: None for name in names}
        formats = {name: self._first_order_format(name) for name in names}
        return {name: (fmt if fmt.stores_quantized(numel) else None) for name, fmt in formats.items()}

    def _initial_state(self, index: int, param: torch.Tensor) -> dict:
        state: dict[str, torch.Tensor] = {"step": torch.zeros((), dtype=torch.float32, device=param.device)}
        for name, fmt in self._first_order_formats(param.numel()).items():
            if fmt is None:
                dtype = param.dtype if self.first_order_bits == 32 else torch.float32
                state[name] = torch.zeros_like(param, dtype=dtype, memory_format=torch.contiguous_format)
            else:
                codes, absmax = encode(torch.zeros(param.numel(), device=param.device), fmt)
                state[f"{name}.codes"], state[f"{name}.absmax"] = codes, absmax
        for batch in self.batches:
            span = batch.param_range(index)
            if span is None:
                continue
            for side_name, side in (("left", batch.left), ("right", batch.right)):
                for name, tensor in side.tensors().items():
                    state[f"{batch.key}.{side_name}.{name}"] = tensor[span[0]:span[1]]
        return state

    # ------------------------------------------------------------------ step
    # Under ``torch.compile(opt.step)`` the step is two parts. ``_begin_step`` is excluded from tracing: it checks the
    # gradients, advances the Python step counter and runs the refreshes that are due (a traced counter would be a
    # guarded constant, one recompilation per step; a traced ``step % T`` a different graph on refresh steps). When the
    # step is being compiled, each refresh chunk runs as its own compiled region (``_region``), created on first use.
    # ``_update`` is the per-step work, traced as one graph: products, grafting, the first-order rule (which the
    # lowbit pass fuses with quantized first-order state). Called eagerly, both parts run eagerly: the reference.
    @torch.no_grad()
    def step(self, closure: Callable | None = None):
        loss = evaluate_closure(closure)
        self._begin_step(torch.compiler.is_compiling())
        self._update()
        return loss

    def _gradients(self) -> list[torch.Tensor | None]:
        return [p.grad for p in self._params]

    def _gradients2d(self, grads) -> list[torch.Tensor | None]:
        return [None if g is None or shape is None else g.reshape(shape) for g, shape in zip(grads, self._shapes2d)]

    @torch.compiler.disable
    def _begin_step(self, compiling: bool) -> None:
        grads = self._gradients()
        for i, g in enumerate(grads):
            if g is not None and (g.is_sparse or g.shape != self._params[i].shape):
                raise ValueError(f"Shampoo: parameter {i} has a sparse gradient or one of shape "
                                 f"{tuple(g.shape)} != {tuple(self._params[i].shape)}")
        if all(g is None for g in grads):
            return
        self._step += 1
        self._compile_regions = compiling
        self._read_groups()
        grads2d = self._gradients2d(grads)
        if self.ema_every_step:
            self._accumulate_statistics(grads2d)
        if self._step % self.precondition_frequency == 0:
            self._refresh_statistics(grads2d)
        if self._step % self.inverse_root_frequency == 0:
            self._refresh_roots()

    def _update(self) -> None:
        grads = self._gradients()
        if all(g is None for g in grads):
            return
        directions = self._directions(grads, self._gradients2d(grads))
        self._first_order_step(directions)

    def _region(self, fn: Callable, kind: str, batch: "BlockBatch", count: int) -> Callable:
        """``fn`` for a chunk of ``count`` blocks of ``batch``: itself in an eager step; in a compiled step its own
        compiled region per chunk shape (inductor: the elementwise work around the matmuls and factorisations, which
        stay extern calls, is fused), kept for the optimizer's lifetime."""
        if not self._compile_regions:
            return fn
        key = (kind, batch.key, count)
        region = self._compiled_regions.get(key)
        if region is None:
            region = torch.compile(_own_code(fn, f"shampoo_{kind}_{batch.key}_x{count}"), fullgraph=True,
                                   dynamic=False, backend=self.refresh_backend)
            self._compiled_regions[key] = region
        return region

    def _refresh_config(self) -> RefreshConfig:
        return RefreshConfig(beta=self.beta, ema_decay=self.beta ** self.precondition_frequency,
                             epsilon=self.epsilon, statistics_bjorck_steps=self.statistics_bjorck_steps,
                             root_bjorck_steps=self.root_bjorck_steps, precision=self.refresh_precision,
                             qr_panel=self.qr_panel, max_fallbacks=self.max_fallbacks,
                             eigh_fallback=self.eigh_fallback, kernel=self.fused)

    def _read_groups(self) -> None:
        """Copy the groups' first-order settings into plain dicts the per-step graph reads (Dynamo guards every value
        of a param group the traced code touches, as for torch.optim) and the changed hyperparameters into the 0-d
        tensors the quantized first-order rule reads (an LR schedule then changes tensor values, not constants of
        the compiled graph). Dicts are updated in place, only where a value changed."""
        for group, settings, held in zip(self.param_groups, self._settings, self._hyperparameters):
            values = dict(lr=group["lr"], beta1=group["betas"][0], beta2=group["betas"][1], eps=group["eps"],
                          weight_decay=group["weight_decay"], momentum=group["momentum"], nesterov=group["nesterov"])
            for key, value in values.items():
                if settings.get(key) == value:
                    continue
                settings[key] = value
                if key in held and self.first_order_bits != 32:
                    held[key].fill_(float(value))

    # ------------------------------------------------------------------ statistics
    def _gradient_blocks(self, blocks: list[Block], grads2d) -> tuple[torch.Tensor, torch.Tensor]:
        """The chunk's gradient blocks stacked (zeros where a parameter has no gradient) and the mask of blocks with
        a gradient (made once per pattern: no host-to-device copy per refresh)."""
        present = tuple(grads2d[block.param] is not None for block in blocks)
        stacked = torch.stack([block.of(grads2d[block.param]) if here else
                               torch.zeros(block.rows, block.cols, device=self._device)
                               for block, here in zip(blocks, present)])
        mask = self._present_masks.get(present)
        if mask is None:
            mask = self._present_masks[present] = torch.tensor(present).to(self._device)
        return stacked, mask

    def _accumulate_statistics(self, grads2d) -> None:
        cfg = self._refresh_config()
        with matmul_precision("ieee"):
            for batch in self.batches:
                for start, end in self._chunks(len(batch.blocks)):
                    g, present = self._gradient_blocks(batch.blocks[start:end], grads2d)
                    region = self._region(accumulate_chunk, "accumulate", batch, end - start)
                    region(cfg, batch.left.blocks(start, end), batch.right.blocks(start, end), g, present)

    def _chunks(self, count: int, size: int | None = None):
        """Ranges of at most ``size`` blocks (default ``chunk_blocks``: a refresh holds ~10 fp32 matrices per block
        at once)."""
        size = size or self.chunk_blocks
        return [(start, min(start + size, count)) for start in range(0, count, size)]

    def _rounding_generator(self) -> torch.Generator | None:
        """The generator of this refresh's stochastic rounding (None for nearest rounding): seeded by ``seed`` and
        the step, so it needs no state of its own."""
        if self.eigenvector_rounding != "stochastic":
            return None
        generator = torch.Generator(device=self._device)
        generator.manual_seed((self.seed * 1_000_003 + self._step) % 2**63)
        return generator

    def _refresh_statistics(self, grads2d) -> None:
        """Products the QR, Rayleigh quotients and orthogonality test take in exact fp32 (the caller's precision
        inside the regions); Björck, the rebuilt factor, the new statistics and the warm start in
        ``refresh_precision`` (carried by their ops)."""
        generator, cfg = self._rounding_generator(), self._refresh_config()
        with matmul_precision("ieee"):
            for batch in self.batches:
                for start, end in self._chunks(len(batch.blocks)):
                    left, right = batch.left.blocks(start, end), batch.right.blocks(start, end)
                    noise = tuple(None if generator is None or side.fmt is None else
                                  _rounding_noise((end - start, side.order, side.order), side.fmt, generator)
                                  for side in (left, right))
                    g, present = (None, None) if self.ema_every_step else self._gradient_blocks(
                        batch.blocks[start:end], grads2d)
                    region = self._region(statistics_chunk, "statistics", batch, end - start)
                    region(cfg, left, right, g, present, noise, self.counters)

    def _refresh_roots(self) -> None:
        cfg = self._refresh_config()
        with matmul_precision("ieee"):
            for batch in self.batches:
                for start, end in self._chunks(len(batch.blocks)):
                    region = self._region(roots_chunk, "roots", batch, end - start)
                    region(cfg, batch.left.blocks(start, end), batch.right.blocks(start, end), self.counters)

    # ------------------------------------------------------------------ preconditioning and grafting
    def _directions(self, grads, grads2d) -> list[torch.Tensor | None]:
        """The grafted direction of every parameter with a gradient (zeros where the gradient is not finite)."""
        present = [i for i, g in enumerate(grads) if g is not None]
        norms = dict(zip(present, torch._foreach_norm([grads[i] for i in present], 2, dtype=torch.float32)))
        directions: list[torch.Tensor | None] = [None] * len(grads)
        preconditioned = [i for i in present if grads2d[i] is not None]
        for i in preconditioned:
            directions[i] = torch.empty(grads2d[i].shape, dtype=grads[i].dtype, device=grads[i].device)
        for batch in self.batches:
            self._precondition(batch, grads2d, directions)
        if preconditioned:
            pre_norms = torch._foreach_norm([directions[i] for i in preconditioned], 2, dtype=torch.float32)
            grad_norms = stack_scalars([norms[i] for i in preconditioned])
            scales = grad_norms / (stack_scalars(list(pre_norms)) + _GRAFT_EPS)
            scales = torch.where(torch.isfinite(grad_norms), scales, 0.0)
            torch._foreach_mul_([directions[i] for i in preconditioned], list(scales.unbind()))
        plain = [i for i in present if directions[i] is None]
        if plain:
            finite = torch.isfinite(stack_scalars([norms[i] for i in plain]))
            for k, i in enumerate(plain):
                directions[i] = torch.where(finite[k], grads[i], 0.0)
        for i in preconditioned:
            directions[i] = directions[i].view(grads[i].shape)
        return directions

    def _precondition(self, batch: BlockBatch, grads2d, directions) -> None:
        """``Ĝ = (diag(a_L) + O_L) G (diag(a_R) + O_R)`` for every block with a gradient, written into the
        parameter's direction buffer (non-finite results as 0)."""
        entries = [(i, block) for i, block in enumerate(batch.blocks) if grads2d[block.param] is not None]
        if not entries:
            return
        device = batch.left.eigenvalues.device
        # The templates address gradients and directions through pointer tables of raw addresses, which a traced
        # graph cannot hold: a compiled step takes the decode + batched-matmul path.
        if not (self.fused and _use_triton(device)) or torch.compiler.is_compiling():
            self._precondition_torch(batch, entries, grads2d, directions)
            return
        from ..templates.shampoo import batch_table, batched_matmul, pointer_table

        grad_views = [block.of(grads2d[block.param]) for _, block in entries]
        out_views = [block.of(directions[block.param]) for _, block in entries]
        everyone = len(entries) == len(batch.blocks)

        def build():
            index = None if everyone else torch.tensor([i for i, _ in entries], dtype=torch.int32).to(
                device, non_blocking=True)
            return (pointer_table(grad_views, device), pointer_table([v.mT for v in out_views], device), index)

        key = tuple(v.data_ptr() for v in grad_views + out_views) + tuple(i for i, _ in entries)
        rhs_table, out_table, index = batch.cached_tables(key, build)
        m, n = batch.rows, batch.cols
        left_product = torch.empty(len(entries), m, n, dtype=torch.float32, device=device)
        batched_matmul(batch.left.root_offdiagonal, rhs_table, batch_table(left_product), m, n, m,
                       diag=batch.left.root_diagonal, lhs_index=index, precision=self.precision,
                       rhs_dtype=grad_views[0].dtype)
        # (L G) R is written as its transpose Rᵀ (L G)ᵀ so the quantized operand stays on the left.
        batched_matmul(batch.right.root_offdiagonal, batch_table(left_product, transposed=True), out_table, n, m, n,
                       lhs_transposed=True, diag=batch.right.root_diagonal, lhs_index=index, sanitize=True,
                       precision=self.precision, out_dtype=out_views[0].dtype)

    def _precondition_torch(self, batch: BlockBatch, entries: list[tuple[int, Block]], grads2d, directions) -> None:
        """The unfused products, per chunk of ``precondition_chunk_blocks`` blocks: the chunk's gradient blocks
        gathered by one copy (a view per run of a parameter's adjacent blocks, see ``_block_runs``), each root as an
        fp32 matrix ``O + diag(a)`` (4-bit off-diagonals decoded into a transient workspace), ``Ĝ = L G R`` as two
        batched cuBLAS matmuls, and one copy per run into the directions, non-finite results zeroed. A
        fixed handful of torch calls per chunk: on an H100 host this path is bound by the host's time per call
        (benchmarks/results/profile_steps.exploratory.md), not by the GPU."""
        device = batch.left.eigenvalues.device
        compiling = torch.compiler.is_compiling()
        for start, end in self._chunks(len(entries), self.precondition_chunk_blocks):
            chunk = entries[start:end]
            indices = [i for i, _ in chunk]
            contiguous = indices == list(range(indices[0], indices[0] + len(indices)))
            select = (lambda t: t[indices[0]:indices[0] + len(indices)]) if contiguous else (
                lambda t: t[torch.tensor(indices).to(device, non_blocking=True)])
            left, right = batch.left.root_matrices(select), batch.right.root_matrices(select)
            runs = _block_runs([block for _, block in chunk])
            sources = [_run_view(grads2d[head.param], head, last - first, across)
                       for first, last, head, across in runs]
            g = (torch.cat(sources) if len(sources) > 1 else sources[0]).to(torch.float32)
            out = _matmul(_matmul(left, g, self.precision), right, self.precision)
            del g
            # Non-finite results become 0 on the way into the directions (one pass when they are fp32; a traced
            # graph has no out= form, inductor fuses the two).
            fp32 = directions[chunk[0][1].param].dtype == torch.float32 and not compiling
            if not fp32:
                out = out.nan_to_num(nan=0.0, posinf=0.0, neginf=0.0)
            for first, last, head, across in runs:
                target = _run_view(directions[head.param], head, last - first, across)
                if fp32:
                    torch.nan_to_num(out[first:last], nan=0.0, posinf=0.0, neginf=0.0, out=target)
                else:
                    target.copy_(out[first:last])

    # ------------------------------------------------------------------ first-order rule
    def _first_order_step(self, directions) -> None:
        for settings, members, hyperparameters in zip(self._settings, self._members, self._hyperparameters):
            members = [i for i in members if directions[i] is not None]
            if not members:
                continue
            params = [self._params[i] for i in members]
            dirs = [directions[i] for i in members]
            states = [self.state[p] for p in params]
            if self.first_order_bits == 32:
                self._fused_first_order(settings, params, dirs, states)
            else:
                self._quantized_first_order(settings, hyperparameters, params, dirs, states)

    def _fused_first_order(self, settings, params, dirs, states) -> None:
        steps = [s["step"] for s in states]
        # torch's fused kernels are excluded from tracing (torch.compiler.disable: a graph break); a compiled step
        # takes the foreach implementation, which inductor fuses, as torch.compile does for torch.optim.
        fused = params[0].device.type in ("cuda", "cpu") and not torch.compiler.is_compiling()
        # Step counters as tensors: torch.optim's functional AdamW runs un-traced (a graph break) on an accelerator
        # unless capturable, and its traced non-capturable foreach form feeds the counters to ops that want host
        # scalars; capturable computes the bias corrections on the counters' device. The fused kernel reads the
        # counters on the device either way, so eager numbers are the same.
        capturable = params[0].device.type != "cpu" or not fused
        if self.grafting == "adamw":
            torch_adamw(params, dirs, [s["exp_avg"] for s in states], [s["exp_avg_sq"] for s in states], [], steps,
                        foreach=None if fused else True, fused=fused or None, capturable=capturable, amsgrad=False,
                        beta1=settings["beta1"], beta2=settings["beta2"], lr=settings["lr"],
                        weight_decay=settings["weight_decay"], eps=settings["eps"], maximize=False)
        else:
            torch._foreach_add_(steps, 1)
            torch_sgd(params, dirs, [s["momentum_buffer"] for s in states], foreach=None if fused else True,
                      fused=fused or None, weight_decay=settings["weight_decay"], momentum=settings["momentum"],
                      lr=settings["lr"], dampening=0.0, nesterov=settings["nesterov"], maximize=False)

    def _quantized_first_order(self, settings, hyperparameters, params, dirs, states) -> None:
        """lbc's rules over dequantized state, hyperparameters as 0-d fp32 tensors (lbc.optim's convention, so the
        arithmetic is the same as lbc.optim.AdamW / SGD with quantized state)."""
        names = ("exp_avg", "exp_avg_sq") if self.grafting == "adamw" else ("momentum_buffer",)
        hp = hyperparameters
        betas = (hp["beta1"], hp["beta2"])
        for p, d, state in zip(params, dirs, states):
            state["step"] += 1
            shape = list(p.shape)
            values = []
            for name in names:
                if name in state:
                    values.append(state[name])
                else:
                    values.append(torch.ops.lowbit.dequant(state[f"{name}.codes"], state[f"{name}.absmax"],
                                                           self._first_order_spec(name), shape))
            p32, d32 = p.to(torch.float32), d.to(torch.float32)
            if self.grafting == "adamw":
                new_p, *new_states = rules.adamw(p32, d32, *values, lr=hp["lr"], betas=betas, eps=hp["eps"],
                                                 weight_decay=hp["weight_decay"], step=state["step"])
            else:
                new_p, *new_states = rules.sgd_momentum(p32, d32, *values, lr=hp["lr"], momentum=hp["momentum"],
                                                        weight_decay=hp["weight_decay"], nesterov=settings["nesterov"],
                                                        step=state["step"])
            for name, value in zip(names, new_states):
                if name in state:
                    state[name].copy_(value)
                else:
                    torch.ops.lowbit.requant_(state[f"{name}.codes"], state[f"{name}.absmax"], value,
                                              self._first_order_spec(name))
            p.copy_(new_p)

    def _first_order_format(self, name: str) -> Quantized:
        """Signed moments in the dynamic map, Adam's non-negative second moment unsigned (4-bit: linear map without
        zero), as lbc.optim's drop-in classes."""
        signed = name != "exp_avg_sq"
        return Q8(signed) if self.first_order_bits == 8 else Q4(signed)

    def _first_order_spec(self, name: str) -> str:
        return self._first_order_format(name).spec

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict:
        state_dict = super().state_dict()
        for group in state_dict["param_groups"]:
            group["shampoo_step"] = self._step
            group["eigenvector_rotation"] = self.eigenvector_rotation
        return state_dict

    def load_state_dict(self, state_dict: dict) -> None:
        """Loads into the existing state tensors (the batched storage the step reads), keeping their dtypes: torch's
        default would cast fp32 scales and eigenvalues to a low-precision parameter dtype."""
        saved_groups = state_dict["param_groups"]
        if len(saved_groups) != len(self.param_groups):
            raise ValueError(f"Shampoo.load_state_dict: {len(saved_groups)} parameter groups saved, "
                             f"{len(self.param_groups)} in this optimizer")
        steps = {group.get("shampoo_step") for group in saved_groups}
        if len(steps) != 1 or not isinstance(next(iter(steps)), int):
            raise ValueError("Shampoo.load_state_dict: param_groups carry no consistent 'shampoo_step'")
        # Codes of rotated eigenvectors read as unrotated ones (or the reverse) are a different basis: refuse them.
        # A state_dict written before the option existed holds unrotated codes.
        rotations = {group.get("eigenvector_rotation", "none") for group in saved_groups}
        if rotations != {self.eigenvector_rotation}:
            raise ValueError(f"Shampoo.load_state_dict: eigenvector_rotation {sorted(rotations)} saved, "
                             f"{self.eigenvector_rotation!r} in this optimizer")
        saved_ids = [pid for group in saved_groups for pid in group["params"]]
        if len(saved_ids) != len(self._params):
            raise ValueError(f"Shampoo.load_state_dict: {len(saved_ids)} parameters saved, {len(self._params)} here")
        raw = {pid: dict(state_dict["state"].get(pid, {})) for pid in saved_ids}
        current = {id(p): self.state[p] for p in self._params}
        for index, (pid, param) in enumerate(zip(saved_ids, self._params)):
            target, saved = current[id(param)], raw[pid]
            if set(saved) != set(target):
                raise ValueError(f"Shampoo.load_state_dict: parameter {index} saved state keys {sorted(saved)} do "
                                 f"not match this optimizer's {sorted(target)} (same bits, grafting, blocking?)")
            for key, tensor in target.items():
                if not isinstance(saved[key], torch.Tensor) or saved[key].shape != tensor.shape:
                    shown = tuple(saved[key].shape) if isinstance(saved[key], torch.Tensor) else saved[key]
                    raise ValueError(f"Shampoo.load_state_dict: parameter {index} state {key!r} has shape {shown}, "
                                     f"expected {tuple(tensor.shape)}")
        super().load_state_dict(state_dict)
        for pid, param in zip(saved_ids, self._params):
            target = current[id(param)]
            for key, tensor in target.items():
                tensor.copy_(raw[pid][key])
            self.state[param] = target
        self._step = next(iter(steps))
        for group in self.param_groups:
            group.pop("shampoo_step", None)
            group.pop("eigenvector_rotation", None)

    def state_bytes(self, preconditioner_only: bool = False) -> int:
        """Bytes of optimizer state (each storage counted once); with ``preconditioner_only`` just the Shampoo
        factors (eigenvectors, eigenvalues, inverse roots)."""
        total = sum(side.preconditioner_bytes() for batch in self.batches for side in (batch.left, batch.right))
        if preconditioner_only:
            return total
        total += sum(side.ema.numel() * 4 for batch in self.batches for side in (batch.left, batch.right)
                     if side.ema is not None)
        for param in self._params:
            total += sum(t.numel() * t.element_size() for key, t in self.state[param].items() if "." not in key
                         or key.split(".")[0] in ("exp_avg", "exp_avg_sq", "momentum_buffer"))
        return total

    def refresh_counts(self) -> dict[str, int]:
        """Blocks rejected by statistics refreshes, blocks rescued by the fallback, inverse roots rejected (reads the
        device counters: synchronises)."""
        return {name: int(value) for name, value in self.counters.items()}


__all__ = ["Shampoo", "stochastic_levels", "EIGENVECTOR_ROUNDINGS", "EIGENVECTOR_ROTATIONS", "block_rotation",
           "rotate_blocks", "Block", "BlockBatch", "FactorSide",
           "matrix_shape", "partition", "matmul_precision", "bjorck", "rebuild_factor", "warm_start", "orthonormal_basis",
           "rayleigh_sorted", "orthogonality_error", "inverse_fourth_root", "EIGENVECTOR_FORMAT",
           "ORTHOGONALITY_TOLERANCE", "RANK_SHIFT", "GRAFTINGS"]
