"""Triton templates for 4-bit Shampoo: a batched matmul whose left operand is decoded from 4-bit row-block codes tile
by tile in registers, and the Björck orthonormalisation step built on it.

Every launch covers a whole batch of same-shape blocks with one 3-D grid ``(tiles_m, tiles_n, batch)``. Operands other
than the left one are addressed through *pointer tables*: an int64 ``(batch, 3)`` tensor of ``(address, row stride,
column stride)`` per block (strides in elements). A table can point into any parameter's gradient (a block of a
``(d0, rest)`` matrix is ``address + row * ld + col``), into a contiguous workspace, or at a transposed view, so the
per-step preconditioning reads gradients and writes directions in place with no gather or scatter copies.

The left operand ``L`` is a batch of stored matrices ``S`` (``lhs_transposed`` selects ``L = S`` or ``L = Sᵀ``), either
plain fp32 ``(batch, rows, cols)`` or ``QuantizedRows``: 4-bit codes of each row padded to whole 64-element blocks
(``formats.Q4(map="linear2")``: a block never crosses rows, odd orders included), one fp32 absmax per block, codes
packed two per byte with the even element in the low nibble (the layout ``formats.encode`` gives for the padded
``(rows, padded_cols)`` matrix). A decoded tile never leaves registers. A tile spans at most one quantization block
along the stored rows (``BLOCK_K`` for ``L = S``, ``BLOCK_M`` for ``L = Sᵀ``), so its scales are one vector.

``out = alpha * (L @ R + diag(d) @ R) + beta * C`` (``d`` and ``C`` optional; ``diag(d) @ R`` needs a square ``L``),
optionally with non-finite results replaced by 0 (``sanitize``).
"""
from __future__ import annotations

import dataclasses
import os

import torch
import triton
import triton.language as tl

from ..formats import Quantized
from .codecs import codec_tables, decode, unpack_nibbles

PRECISIONS = ("tf32", "ieee")
_OUT_DTYPES = {torch.float32: tl.float32, torch.bfloat16: tl.bfloat16, torch.float16: tl.float16}


@dataclasses.dataclass(frozen=True)
class QuantizedRows:
    """A batch of ``rows x cols`` matrices stored row by row in a 4-bit format: ``codes`` uint8
    ``(batch, rows, padded_cols // 2)`` and ``absmax`` fp32 ``(batch, rows, padded_cols // block)``, where
    ``padded_cols`` rounds ``cols`` up to whole blocks (the padding holds zeros)."""

    codes: torch.Tensor
    absmax: torch.Tensor
    fmt: Quantized
    cols: int

    def __post_init__(self):
        if self.fmt.bits != 4:
            raise ValueError(f"fmt: QuantizedRows holds 4-bit codes, got {self.fmt!r}")
        if self.codes.dtype != torch.uint8 or self.codes.dim() != 3:
            raise ValueError(f"codes: expected a uint8 (batch, rows, bytes) tensor, got {self.codes.dtype} "
                             f"{tuple(self.codes.shape)}")
        padded = padded_row_length(self.cols, self.fmt)
        expected_absmax = (*self.codes.shape[:2], padded // self.fmt.block)
        if self.codes.shape[2] != padded // 2 or tuple(self.absmax.shape) != expected_absmax:
            raise ValueError(f"codes/absmax: rows of {self.cols} columns need {padded // 2} bytes and "
                             f"{padded // self.fmt.block} scales, got codes {tuple(self.codes.shape)} and absmax "
                             f"{tuple(self.absmax.shape)}")
        if self.absmax.dtype != torch.float32:
            raise ValueError(f"absmax: expected float32, got {self.absmax.dtype}")
        if not (self.codes.is_contiguous() and self.absmax.is_contiguous()):
            raise ValueError("codes/absmax: expected contiguous tensors")

    @property
    def batch(self) -> int:
        return self.codes.shape[0]

    @property
    def rows(self) -> int:
        return self.codes.shape[1]


def padded_row_length(cols: int, fmt: Quantized) -> int:
    """Row length rounded up to whole quantization blocks."""
    return -(-cols // fmt.block) * fmt.block


# --------------------------------------------------------------------------------------------------------------
# Pointer tables
# --------------------------------------------------------------------------------------------------------------
def pointer_table(views: list[torch.Tensor], device: torch.device) -> torch.Tensor:
    """``(len(views), 3)`` int64 table of ``(address, row stride, column stride)`` of 2-D views (built on the host:
    one small host-to-device copy)."""
    rows = [(v.data_ptr(), v.stride(0), v.stride(1)) for v in views]
    return torch.tensor(rows, dtype=torch.int64).reshape(len(views), 3).to(device, non_blocking=True)


def batch_table(batch: torch.Tensor, transposed: bool = False) -> torch.Tensor:
    """Pointer table of every matrix of a 3-D tensor (or of their transposes), computed on the device: no
    host-to-device copy."""
    if batch.dim() != 3:
        raise ValueError(f"batch: expected a 3-D tensor, got shape {tuple(batch.shape)}")
    count = batch.shape[0]
    index = torch.arange(count, dtype=torch.int64, device=batch.device)
    addresses = index * (batch.stride(0) * batch.element_size()) + batch.data_ptr()
    strides = (batch.stride(2), batch.stride(1)) if transposed else (batch.stride(1), batch.stride(2))
    return torch.stack([addresses, torch.full_like(index, strides[0]), torch.full_like(index, strides[1])], dim=1)


# --------------------------------------------------------------------------------------------------------------
# Kernel
# --------------------------------------------------------------------------------------------------------------
@triton.jit
def _lhs_tile(lhs_ptr, absmax_ptr, codebook_ptr, row_stride, absmax_row_stride, m0, k0, M, K,
              BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, QUANT: tl.constexpr, TRANS: tl.constexpr,
              QBLOCK: tl.constexpr):
    """fp32 tile ``L[m0:m0+BLOCK_M, k0:k0+BLOCK_K]`` (zero outside ``M x K``); ``lhs_ptr``/``absmax_ptr`` point at
    this batch element's stored matrix."""
    offs_m = m0 + tl.arange(0, BLOCK_M)
    offs_k = k0 + tl.arange(0, BLOCK_K)
    if QUANT:
        if TRANS:
            # Stored tile: rows k, columns m (BLOCK_M <= QBLOCK and aligned: one scale per stored row).
            byte_cols = m0 // 2 + tl.arange(0, BLOCK_M // 2)
            packed = tl.load(lhs_ptr + offs_k.to(tl.int64)[:, None] * row_stride + byte_cols[None, :],
                             mask=(offs_k < K)[:, None], other=0)
            scale = tl.load(absmax_ptr + offs_k.to(tl.int64) * absmax_row_stride + m0 // QBLOCK,
                            mask=offs_k < K, other=0.0)
            tile = tl.trans(decode(unpack_nibbles(packed), scale, codebook_ptr))
        else:
            # Stored tile: rows m, columns k (BLOCK_K <= QBLOCK and aligned: one scale per stored row).
            byte_cols = k0 // 2 + tl.arange(0, BLOCK_K // 2)
            packed = tl.load(lhs_ptr + offs_m.to(tl.int64)[:, None] * row_stride + byte_cols[None, :],
                             mask=(offs_m < M)[:, None], other=0)
            scale = tl.load(absmax_ptr + offs_m.to(tl.int64) * absmax_row_stride + k0 // QBLOCK,
                            mask=offs_m < M, other=0.0)
            tile = decode(unpack_nibbles(packed), scale, codebook_ptr)
        # Padding columns of a stored row decode to 0 already; masked rows (scale 0) too, but as -0.0 * level.
        return tl.where((offs_m < M)[:, None] & (offs_k < K)[None, :], tile, 0.0)
    else:
        mask = (offs_m < M)[:, None] & (offs_k < K)[None, :]
        if TRANS:
            offsets = offs_k.to(tl.int64)[None, :] * row_stride + offs_m[:, None]
        else:
            offsets = offs_m.to(tl.int64)[:, None] * row_stride + offs_k[None, :]
        return tl.load(lhs_ptr + offsets, mask=mask, other=0.0)


@triton.jit
def _table_entry(table_ptr, b, DTYPE: tl.constexpr):
    entry = table_ptr + b * 3
    return tl.load(entry).to(tl.pointer_type(DTYPE)), tl.load(entry + 1), tl.load(entry + 2)


@triton.jit
def _batched_matmul_kernel(
        lhs_ptr, lhs_absmax_ptr, codebook_ptr, diag_ptr, lhs_index_ptr,
        lhs_batch_stride, lhs_row_stride, absmax_batch_stride, absmax_row_stride, diag_batch_stride,
        rhs_table_ptr, out_table_ptr, add_table_ptr,
        M, N, alpha, beta,
        K: tl.constexpr, QUANT: tl.constexpr, TRANS: tl.constexpr, QBLOCK: tl.constexpr, HAS_DIAG: tl.constexpr,
        HAS_ADD: tl.constexpr, HAS_INDEX: tl.constexpr, SANITIZE: tl.constexpr,
        RHS_DTYPE: tl.constexpr, OUT_DTYPE: tl.constexpr, PRECISION: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    # K is a compile-time constant: the loop bound must be one for Triton's interpreter under numpy 2.4 (a runtime
    # scalar there is a 1-element array that range() cannot take), and the few block orders make few variants.
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    b = tl.program_id(2)
    lhs_b = tl.load(lhs_index_ptr + b).to(tl.int64) if HAS_INDEX else b.to(tl.int64)
    lhs = lhs_ptr + lhs_b * lhs_batch_stride
    absmax = lhs_absmax_ptr + lhs_b * absmax_batch_stride
    rhs, rhs_rs, rhs_cs = _table_entry(rhs_table_ptr, b, RHS_DTYPE)

    m0 = pid_m * BLOCK_M
    n0 = pid_n * BLOCK_N
    offs_m = m0 + tl.arange(0, BLOCK_M)
    offs_n = n0 + tl.arange(0, BLOCK_N)
    n_ok = offs_n < N
    rhs_cols = offs_n.to(tl.int64)[None, :] * rhs_cs

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        a = _lhs_tile(lhs, absmax, codebook_ptr, lhs_row_stride, absmax_row_stride, m0, k0, M, K,
                      BLOCK_M, BLOCK_K, QUANT, TRANS, QBLOCK)
        r = tl.load(rhs + offs_k.to(tl.int64)[:, None] * rhs_rs + rhs_cols,
                    mask=(offs_k < K)[:, None] & n_ok[None, :], other=0.0).to(tl.float32)
        acc = tl.dot(a, r, acc, input_precision=PRECISION)

    m_ok = offs_m < M
    mask = m_ok[:, None] & n_ok[None, :]
    if HAS_DIAG:
        d = tl.load(diag_ptr + lhs_b * diag_batch_stride + offs_m, mask=m_ok, other=0.0)
        r_diag = tl.load(rhs + offs_m.to(tl.int64)[:, None] * rhs_rs + rhs_cols, mask=mask, other=0.0)
        acc += d[:, None] * r_diag.to(tl.float32)
    result = alpha * acc
    if HAS_ADD:
        add, add_rs, add_cs = _table_entry(add_table_ptr, b, tl.float32)
        c = tl.load(add + offs_m.to(tl.int64)[:, None] * add_rs + offs_n.to(tl.int64)[None, :] * add_cs,
                    mask=mask, other=0.0)
        result += beta * c
    if SANITIZE:
        result = tl.where(tl.abs(result) < float("inf"), result, 0.0)
    out, out_rs, out_cs = _table_entry(out_table_ptr, b, OUT_DTYPE)
    tl.store(out + offs_m.to(tl.int64)[:, None] * out_rs + offs_n.to(tl.int64)[None, :] * out_cs,
             result.to(OUT_DTYPE), mask=mask)


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


# (BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages) per left-operand kind: the fastest of benchmarks/shampoo.py's
# candidates on an H100 for 144 blocks of 1024 x 1024 when they were chosen (no autotuning, which the interpreter
# cannot run). Its latest run (benchmarks/results/shampoo.md) times these at 9.17 and 3.17 ms (34 and 98 TFLOP/s),
# with (64, 128, 32, 4, 3) ahead for the transposed kind (2.90 ms, in two runs; not switched yet: the GPU tests ran
# with these). A quantized operand's tile spans at most one 64-element block along its stored rows
# (BLOCK_K, or BLOCK_M when transposed).
TILES = {"quantized": (128, 256, 32, 8, 3), "quantized_transposed": (64, 256, 32, 8, 3), "plain": (128, 128, 32, 8, 3)}
_INTERPRETER_TILES = {"quantized": (128, 128, 64, 4, 1), "quantized_transposed": (64, 128, 64, 4, 1),
                      "plain": (128, 128, 64, 4, 1)}


def _tiles(quantized: bool, transposed: bool) -> tuple[int, int, int, int, int]:
    kind = ("quantized_transposed" if transposed else "quantized") if quantized else "plain"
    return (_INTERPRETER_TILES if _interpreting() else TILES)[kind]


def batched_matmul(lhs, rhs_table: torch.Tensor, out_table: torch.Tensor, m: int, n: int, k: int, *,
                   lhs_transposed: bool = False, diag: torch.Tensor | None = None,
                   lhs_index: torch.Tensor | None = None, add_table: torch.Tensor | None = None,
                   alpha: float = 1.0, beta: float = 0.0, sanitize: bool = False, precision: str = "tf32",
                   rhs_dtype: torch.dtype = torch.float32, out_dtype: torch.dtype = torch.float32) -> None:
    """For every entry ``b`` of the tables: ``out_b = alpha * (L_b @ R_b + diag(d_b) @ R_b) + beta * C_b``.

    Args:
        lhs: fp32 ``(batch, rows, cols)`` tensor or ``QuantizedRows``; ``L = S`` or ``Sᵀ`` (``lhs_transposed``) is
            ``m x k``.
        rhs_table, out_table, add_table: pointer tables (``pointer_table``/``batch_table``) of ``k x n`` right
            operands (dtype ``rhs_dtype``), ``m x n`` outputs (``out_dtype``) and fp32 ``m x n`` addends.
        diag: fp32 ``(batch, m)``: adds ``diag(d) @ R`` (needs ``m == k``).
        lhs_index: int32 ``(table rows,)``: table row ``b`` uses ``lhs[lhs_index[b]]`` (and ``diag[lhs_index[b]]``);
            by default row ``b`` uses ``lhs[b]``.
        sanitize: write 0 where the result is not finite.
        precision: "tf32" (tensor cores) or "ieee" (exact fp32 products).
    """
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    if rhs_dtype not in _OUT_DTYPES or out_dtype not in _OUT_DTYPES:
        raise ValueError(f"rhs_dtype/out_dtype must be one of {list(_OUT_DTYPES)}, got {rhs_dtype}/{out_dtype}")
    count = rhs_table.shape[0]
    for name, table in (("rhs_table", rhs_table), ("out_table", out_table), ("add_table", add_table)):
        if table is not None and (table.dtype != torch.int64 or tuple(table.shape) != (count, 3)):
            raise ValueError(f"{name}: expected an int64 ({count}, 3) pointer table, got {table.dtype} "
                             f"{tuple(table.shape)}")
    if diag is not None and m != k:
        raise ValueError(f"diag: diag(d) @ R needs a square left operand, got {m} x {k}")
    quantized = isinstance(lhs, QuantizedRows)
    stored = lhs.codes if quantized else lhs
    stored_rows, stored_cols = (lhs.rows, lhs.cols) if quantized else tuple(lhs.shape[1:])
    if (stored_cols, stored_rows) != (m, k) if lhs_transposed else (stored_rows, stored_cols) != (m, k):
        raise ValueError(f"lhs: stored {stored_rows} x {stored_cols} matrices do not give a {m} x {k} operand "
                         f"(lhs_transposed={lhs_transposed})")
    if not quantized and (lhs.dtype != torch.float32 or lhs.stride(2) != 1):
        raise ValueError(f"lhs: expected fp32 matrices with contiguous rows, got {lhs.dtype} strides {lhs.stride()}")
    if lhs_index is None and count > stored.shape[0]:
        raise ValueError(f"lhs_index: {count} table rows but only {stored.shape[0]} left operands")
    if count == 0 or m == 0 or n == 0:
        return
    block_m, block_n, block_k, warps, stages = _tiles(quantized, lhs_transposed)
    device = stored.device
    if quantized:
        qblock = lhs.fmt.block
        if (block_m if lhs_transposed else block_k) > qblock:
            raise ValueError(f"lhs: tiles of {max(block_m, block_k)} span more than one {qblock}-element block")
        codebook, _ = codec_tables(lhs.fmt, device)
        absmax = lhs.absmax
        absmax_strides = (absmax.stride(0), absmax.stride(1))
        lhs_strides = (lhs.codes.stride(0), lhs.codes.stride(1))
    else:
        qblock = 64
        codebook = absmax = stored  # unused
        absmax_strides = (0, 0)
        lhs_strides = (lhs.stride(0), lhs.stride(1))
    grid = (triton.cdiv(m, block_m), triton.cdiv(n, block_n), count)
    _batched_matmul_kernel[grid](
        stored, absmax, codebook, stored if diag is None else diag, stored if lhs_index is None else lhs_index,
        lhs_strides[0], lhs_strides[1], absmax_strides[0], absmax_strides[1], 0 if diag is None else diag.stride(0),
        rhs_table, out_table, rhs_table if add_table is None else add_table,
        m, n, float(alpha), float(beta),
        K=k, QUANT=quantized, TRANS=lhs_transposed, QBLOCK=qblock, HAS_DIAG=diag is not None,
        HAS_ADD=add_table is not None, HAS_INDEX=lhs_index is not None, SANITIZE=sanitize,
        RHS_DTYPE=_OUT_DTYPES[rhs_dtype], OUT_DTYPE=_OUT_DTYPES[out_dtype], PRECISION=precision,
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, num_warps=warps, num_stages=stages)


# --------------------------------------------------------------------------------------------------------------
# Björck
# --------------------------------------------------------------------------------------------------------------
def bjorck_step(v: torch.Tensor, precision: str = "tf32") -> torch.Tensor:
    """One Björck (cubic Newton–Schulz) orthonormalisation step ``1.5 V - 0.5 (V Vᵀ) V`` of every square matrix of an
    fp32 ``(batch, n, n)`` tensor, as two batched launches: the Gram matrix, then the product with the update fused
    into its epilogue. Returns a new tensor."""
    if v.dim() != 3 or v.shape[1] != v.shape[2] or v.dtype != torch.float32:
        raise ValueError(f"v: expected an fp32 (batch, n, n) tensor, got {v.dtype} {tuple(v.shape)}")
    v = v.contiguous()
    count, n, _ = v.shape
    gram = torch.empty_like(v)
    out = torch.empty_like(v)
    table = batch_table(v)
    batched_matmul(v, batch_table(v, transposed=True), batch_table(gram), n, n, n, precision=precision)
    batched_matmul(gram, table, batch_table(out), n, n, n, add_table=table, alpha=-0.5, beta=1.5,
                   precision=precision)
    return out


__all__ = ["QuantizedRows", "PRECISIONS", "TILES", "padded_row_length", "pointer_table", "batch_table",
           "batched_matmul", "bjorck_step"]
