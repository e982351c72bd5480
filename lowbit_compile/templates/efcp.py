"""EFCP kernels: error feedback + block top-k into a compressed sparse ring, and the two passes over the ring.

One step of an error-feedback compressed full-matrix preconditioner (M-FAC, GGT) over a flat vector of ``numel``
parameters, split into blocks of ``block`` elements (the last one zero-padded):

1. ``ef_compress_``: per block, ``a = e + g``; keep the ``k`` entries of largest ``|a|`` (ties: lowest index);
   quantize them to 8 bits with one scale per (block, ring slot); ``c`` = their dequantized values; ``e = a - c``
   (so the quantization error is fed back too, and the ring holds exactly ``c``); write ``c`` densely over the
   gradient workspace and ``(index, code)`` into ring slot ``head``.
2. ``ring_dots``: ``s_j = <row_j, c>`` for every ring slot j (a gather from the dense ``c``), in float64.
3. ``ring_combine_update_``: ``workspace += sum_j alpha_j row_j`` (scatter-add) and, in the same program, the
   parameter update ``u = u_scale * workspace``, optional momentum ``v = mu v + u``, ``p = p (1 - lr wd) - lr u``.

Ring layout, block-major so that both passes are per-block programs: for ring row ``(b, j)`` (block b, slot j),
``k`` entries sorted by position, each a 12-bit index relative to the block (low 8 bits in ``index_low[b, j, i]``,
high 4 bits packed two per byte in ``index_high[b, j, i // 2]``, even entry in the low nibble) and an 8-bit code of
``RING_VALUE_FORMAT``'s codebook (``codes[b, j, i]``), plus one fp32 ``scale[b, j]``: 2.5 bytes per stored entry.
Unused slots hold zeros (scale 0: every value 0).

Every function has a pure-torch twin (``*_reference``) with the same signature: the numerical reference for the
tests (identical codes, indices and error feedback, bit for bit) and the implementation on CPU tensors when Triton is
not interpreting.
"""
from __future__ import annotations

import dataclasses
from typing import NamedTuple

import torch
import triton
import triton.language as tl

from .._compat import triton_interpreting
from ..formats import Plain, Q8, as_format, block_scale as block_scale_reference, decode as decode_reference
from ..formats import encode as encode_reference
from .codecs import block_scale, codec_constants, codec_tables, decode, encode, pack_nibbles, unpack_nibbles

INDEX_BITS = 12
MAX_BLOCK = 1 << INDEX_BITS
# Ring values: the signed 8-bit dynamic codebook; the scale is per (block, slot) row, not RING_VALUE_FORMAT.block.
RING_VALUE_FORMAT = Q8()

# How the error feedback is stored (the EF_KIND constexpr); the tl.constexpr twins are what @triton.jit code reads.
EF_F32, EF_BF16, EF_QUANTIZED = 0, 1, 2
_EF_F32, _EF_BF16 = tl.constexpr(EF_F32), tl.constexpr(EF_BF16)


# --------------------------------------------------------------------------------------------------------------
# Layout and storage
# --------------------------------------------------------------------------------------------------------------
def entries_per_block(density: float, block: int) -> int:
    """Entries kept per block: ``density * block`` rounded to nearest; it must leave at least one entry kept and
    one dropped."""
    if not 0.0 < density < 1.0:
        raise ValueError(f"density must be in (0, 1), got {density}")
    k = int(density * block + 0.5)
    if k < 1 or k >= block:
        raise ValueError(f"density={density} with block={block} keeps k={k} of {block} entries per block; top-k needs "
                         f"1 <= k <= {block - 1} (choose a density in [{0.5 / block:.3g}, {(block - 0.5) / block:.6g}) "
                         f"or another block)")
    return k


@dataclasses.dataclass(frozen=True)
class RingLayout:
    """Static shape of one compressed ring: ``numel`` flat elements in blocks of ``block``, ``k`` entries per block
    and ring slot, ``m`` slots."""

    numel: int
    block: int
    k: int
    m: int

    def __post_init__(self):
        if self.numel < 1:
            raise ValueError(f"numel must be >= 1, got {self.numel}")
        if self.block < 2 or self.block > MAX_BLOCK or self.block & (self.block - 1):
            raise ValueError(f"block must be a power of two in [2, {MAX_BLOCK}] ({INDEX_BITS}-bit ring indices), "
                             f"got {self.block}")
        if not 1 <= self.k < self.block:
            raise ValueError(f"k must be in [1, block - 1] = [1, {self.block - 1}], got {self.k}")
        if self.m < 1:
            raise ValueError(f"m (the window) must be >= 1, got {self.m}")

    @property
    def num_blocks(self) -> int:
        return -(-self.numel // self.block)

    @property
    def padded_numel(self) -> int:
        return self.num_blocks * self.block

    @property
    def high_bytes(self) -> int:
        return (self.k + 1) // 2

    @property
    def k_pow2(self) -> int:
        return max(2, triton.next_power_of_2(self.k))

    def ring_bytes(self) -> int:
        return self.num_blocks * self.m * (2 * self.k + self.high_bytes + 4)


class SparseRing(NamedTuple):
    index_low: torch.Tensor   # uint8 [num_blocks, m, k]
    index_high: torch.Tensor  # uint8 [num_blocks, m, (k + 1) // 2]
    codes: torch.Tensor       # uint8 [num_blocks, m, k]
    scale: torch.Tensor       # fp32  [num_blocks, m]


def empty_ring(layout: RingLayout, device) -> SparseRing:
    shape = (layout.num_blocks, layout.m)
    return SparseRing(torch.zeros(*shape, layout.k, dtype=torch.uint8, device=device),
                      torch.zeros(*shape, layout.high_bytes, dtype=torch.uint8, device=device),
                      torch.zeros(*shape, layout.k, dtype=torch.uint8, device=device),
                      torch.zeros(shape, dtype=torch.float32, device=device))


class ErrorFeedback(NamedTuple):
    """The error-feedback vector over ``layout.padded_numel`` elements: fp32 or bf16 ``values`` (``absmax`` empty),
    or quantized codes in ``values`` (uint8) with fp32 block scales in ``absmax``."""

    values: torch.Tensor
    absmax: torch.Tensor
    spec: str


def error_feedback_format(fmt, numel: int):
    """The format the error feedback of ``numel`` elements is stored in: F32, BF16 or a signed quantized format
    (quantized formats keep fp32 under their ``min_quant_numel``)."""
    fmt = as_format(fmt)
    if isinstance(fmt, Plain):
        return fmt
    if not fmt.signed:
        raise ValueError(f"ef_format: the error feedback is signed; {fmt!r} stores non-negative values")
    return fmt if fmt.stores_quantized(numel) else Plain(torch.float32)


def empty_error_feedback(fmt, layout: RingLayout, device) -> ErrorFeedback:
    fmt = error_feedback_format(fmt, layout.numel)
    n = layout.padded_numel
    if isinstance(fmt, Plain):
        return ErrorFeedback(torch.zeros(n, dtype=fmt.dtype, device=device),
                             torch.zeros(0, dtype=torch.float32, device=device), fmt.spec)
    if layout.block % fmt.block:
        raise ValueError(f"ef_format: its block ({fmt.block}) must divide the top-k block ({layout.block})")
    codes, absmax = encode_reference(torch.zeros(n, device=device), fmt)
    return ErrorFeedback(codes, absmax, fmt.spec)


def uses_triton(device: torch.device) -> bool:
    """Whether the kernels run as Triton (CUDA, or the CPU interpreter) or as their pure-torch references."""
    return device.type == "cuda" or triton_interpreting()


def implementations(device: torch.device):
    """``(ef_compress_, ring_dots, ring_combine_update_)`` for tensors on ``device``: the Triton kernels, or their
    pure-torch references where Triton cannot run."""
    if uses_triton(device):
        return ef_compress_, ring_dots, ring_combine_update_
    return ef_compress_reference_, ring_dots_reference, ring_combine_update_reference_


# --------------------------------------------------------------------------------------------------------------
# Triton building blocks
# --------------------------------------------------------------------------------------------------------------
@triton.jit
def _is_finite(x):
    return tl.abs(x) < float("inf")


@triton.jit
def _top_k_mask(key, K: tl.constexpr):
    """Mask of the ``K`` largest int32 keys of a 1-D tile (ties: lowest positions first). Binary search for the
    K-th largest key T over the key range [-1, +inf bits): count(key >= lo) >= K > count(key >= hi) throughout."""
    lo = tl.full((), -1, tl.int32)
    hi = tl.full((), 0x7F800000, tl.int32)
    for _ in range(31):
        mid = lo + ((hi - lo) >> 1)
        enough = tl.sum((key >= mid).to(tl.int32), axis=0) >= K
        lo = tl.where(enough, mid, lo)
        hi = tl.where(enough, hi, mid)
    above = key > lo
    tied = key == lo
    room = K - tl.sum(above.to(tl.int32), axis=0)
    return above | (tied & (tl.cumsum(tied.to(tl.int32), axis=0) <= room))


@triton.jit
def _load_error_feedback(ef_ptr, absmax_ptr, codebook_ptr, block_index, BLOCK: tl.constexpr, EF_KIND: tl.constexpr,
                         EF_BLOCK: tl.constexpr, EF_BITS: tl.constexpr):
    lane = tl.arange(0, BLOCK)
    if EF_KIND == _EF_F32:
        e = tl.load(ef_ptr + block_index * BLOCK + lane)
    elif EF_KIND == _EF_BF16:
        # bf16 bits (stored as int16) are the high half of the fp32 bits.
        bits = tl.load(ef_ptr + block_index * BLOCK + lane).to(tl.int32) & 0xFFFF
        e = (bits << 16).to(tl.float32, bitcast=True)
    else:
        ROWS: tl.constexpr = BLOCK // EF_BLOCK
        rows = tl.arange(0, ROWS)
        scale = tl.load(absmax_ptr + block_index * ROWS + rows)
        if EF_BITS == 8:
            codes = tl.load(ef_ptr + block_index * BLOCK + rows[:, None] * EF_BLOCK
                            + tl.arange(0, EF_BLOCK)[None, :]).to(tl.int32)
        else:
            HALF: tl.constexpr = EF_BLOCK // 2
            codes = unpack_nibbles(tl.load(ef_ptr + block_index * (BLOCK // 2) + rows[:, None] * HALF
                                           + tl.arange(0, HALF)[None, :]))
        e = tl.reshape(decode(codes, scale, codebook_ptr), (BLOCK,))
    return e


@triton.jit
def _store_error_feedback(e, ef_ptr, absmax_ptr, lower_ptr, block_index, BLOCK: tl.constexpr, EF_KIND: tl.constexpr,
                          EF_BLOCK: tl.constexpr, EF_BITS: tl.constexpr, EF_MAP: tl.constexpr,
                          EF_LOWEST: tl.constexpr):
    lane = tl.arange(0, BLOCK)
    if EF_KIND == _EF_F32:
        tl.store(ef_ptr + block_index * BLOCK + lane, e)
    elif EF_KIND == _EF_BF16:
        # Round to nearest even with integer math (the interpreter's float cast truncates).
        bits = e.to(tl.uint32, bitcast=True)
        bits = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
        tl.store(ef_ptr + block_index * BLOCK + lane, bits.to(tl.int16))
    else:
        ROWS: tl.constexpr = BLOCK // EF_BLOCK
        rows = tl.arange(0, ROWS)
        tile = tl.reshape(e, (ROWS, EF_BLOCK))
        scale = block_scale(tile, True, EF_LOWEST)
        codes = encode(tile, scale, lower_ptr, EF_BITS, EF_MAP, True)
        tl.store(absmax_ptr + block_index * ROWS + rows, scale)
        if EF_BITS == 8:
            tl.store(ef_ptr + block_index * BLOCK + rows[:, None] * EF_BLOCK + tl.arange(0, EF_BLOCK)[None, :],
                     codes.to(tl.uint8))
        else:
            HALF: tl.constexpr = EF_BLOCK // 2
            tl.store(ef_ptr + block_index * (BLOCK // 2) + rows[:, None] * HALF + tl.arange(0, HALF)[None, :],
                     pack_nibbles(codes))


@triton.jit
def _ring_rows(index_low_ptr, index_high_ptr, codes_ptr, scale_ptr, codebook_ptr, row, row_ok,
               K: tl.constexpr, K_POW2: tl.constexpr, HIGH_BYTES: tl.constexpr):
    """Entries of ring rows ``row`` (int64 [R], = block * m + slot): (block-relative index, fp32 value, mask),
    each [R, K_POW2]; masked lanes hold index 0 and value 0."""
    i = tl.arange(0, K_POW2)
    mask = row_ok[:, None] & (i < K)[None, :]
    entry = row[:, None] * K + i[None, :]
    low = tl.load(index_low_ptr + entry, mask=mask, other=0).to(tl.int32)
    packed = tl.load(index_high_ptr + row[:, None] * HIGH_BYTES + (i // 2)[None, :], mask=mask, other=0).to(tl.int32)
    high = (packed >> ((i % 2) * 4)[None, :]) & 15
    codes = tl.load(codes_ptr + entry, mask=mask, other=0).to(tl.int32)
    scale = tl.load(scale_ptr + row, mask=row_ok, other=0.0)
    value = tl.where(mask, decode(codes, scale, codebook_ptr), 0.0)
    return low | (high << 8), value, mask


# --------------------------------------------------------------------------------------------------------------
# Kernels
# --------------------------------------------------------------------------------------------------------------
@triton.jit
def _ef_compress_kernel(workspace_ptr, ef_ptr, ef_absmax_ptr, head_ptr,
                        index_low_ptr, index_high_ptr, codes_ptr, scale_ptr,
                        ring_lower_ptr, ring_codebook_ptr, ef_lower_ptr, ef_codebook_ptr, numel, m,
                        BLOCK: tl.constexpr, K: tl.constexpr, K_POW2: tl.constexpr, HIGH_BYTES: tl.constexpr,
                        RING_BITS: tl.constexpr, RING_MAP: tl.constexpr, RING_LOWEST: tl.constexpr,
                        EF_KIND: tl.constexpr, EF_BLOCK: tl.constexpr, EF_BITS: tl.constexpr, EF_MAP: tl.constexpr,
                        EF_LOWEST: tl.constexpr):
    b = tl.program_id(0).to(tl.int64)
    lane = tl.arange(0, BLOCK)
    offsets = b * BLOCK + lane
    valid = offsets < numel

    g = tl.load(workspace_ptr + offsets, mask=valid, other=0.0)
    g = tl.where(_is_finite(g), g, 0.0)  # a NaN/Inf gradient element counts as 0 and never reaches the state
    e = _load_error_feedback(ef_ptr, ef_absmax_ptr, ef_codebook_ptr, b, BLOCK, EF_KIND, EF_BLOCK, EF_BITS)
    a = e + g
    a = tl.where(_is_finite(a), a, e)  # e + g overflowed: drop g
    # |a| as int32 bits orders like |a|; padding lanes rank below every element.
    key = tl.where(valid, tl.abs(a).to(tl.int32, bitcast=True), -1)
    keep = _top_k_mask(key, K)

    # Zero lanes do not change the scale of the kept values (formats.block_scale over exactly those values).
    kept = tl.reshape(tl.where(keep, a, 0.0), (1, BLOCK))
    scale = block_scale(kept, True, RING_LOWEST)
    codes = encode(kept, scale, ring_lower_ptr, RING_BITS, RING_MAP, True)
    c = tl.where(keep, tl.reshape(decode(codes, scale, ring_codebook_ptr), (BLOCK,)), 0.0)
    _store_error_feedback(a - c, ef_ptr, ef_absmax_ptr, ef_lower_ptr, b, BLOCK, EF_KIND, EF_BLOCK, EF_BITS, EF_MAP,
                          EF_LOWEST)
    tl.store(workspace_ptr + offsets, c)

    row = b * m + tl.load(head_ptr)
    entry = row * K + tl.cumsum(keep.to(tl.int32), axis=0) - 1
    tl.store(index_low_ptr + entry, (lane & 255).to(tl.uint8), mask=keep)
    # The high index nibbles are packed in pairs of entries: park them in the codes row, read them back compacted.
    tl.store(codes_ptr + entry, (lane >> 8).to(tl.uint8), mask=keep)
    tl.debug_barrier()
    i = tl.arange(0, K_POW2)
    high = tl.load(codes_ptr + row * K + i, mask=i < K, other=0).to(tl.int32)
    packed = tl.reshape(pack_nibbles(tl.reshape(high, (1, K_POW2))), (K_POW2 // 2,))
    h = tl.arange(0, K_POW2 // 2)
    tl.store(index_high_ptr + row * HIGH_BYTES + h, packed, mask=h < HIGH_BYTES)
    tl.debug_barrier()
    tl.store(codes_ptr + entry, tl.reshape(codes, (BLOCK,)).to(tl.uint8), mask=keep)
    tl.store(scale_ptr + row, tl.sum(scale, axis=0))


@triton.jit
def _ring_dots_kernel(workspace_ptr, index_low_ptr, index_high_ptr, codes_ptr, scale_ptr, codebook_ptr, partial_ptr,
                      num_blocks, M: tl.constexpr, BLOCKS_PER_PROGRAM: tl.constexpr,
                      BLOCK: tl.constexpr, K: tl.constexpr, K_POW2: tl.constexpr, HIGH_BYTES: tl.constexpr,
                      ROWS: tl.constexpr):
    # Loop bounds are constexprs: Triton's interpreter cannot loop over a runtime scalar.
    chunk = tl.program_id(0).to(tl.int64)
    slots = tl.program_id(1) * ROWS + tl.arange(0, ROWS)
    slot_ok = slots < M
    total = tl.zeros([ROWS], tl.float64)
    for i in range(BLOCKS_PER_PROGRAM):
        b = chunk * BLOCKS_PER_PROGRAM + i
        index, value, mask = _ring_rows(index_low_ptr, index_high_ptr, codes_ptr, scale_ptr, codebook_ptr,
                                        b * M + slots, slot_ok & (b < num_blocks), K, K_POW2, HIGH_BYTES)
        x = tl.load(workspace_ptr + b * BLOCK + index, mask=mask, other=0.0)
        # fp32 x fp32 is exact in fp64: the only rounding is the fp64 sum.
        total += tl.sum(value.to(tl.float64) * x.to(tl.float64), axis=1)
    tl.store(partial_ptr + chunk * M + slots, total, mask=slot_ok)


@triton.jit
def _ring_combine_update_kernel(workspace_ptr, param_ptr, momentum_ptr, index_low_ptr, index_high_ptr, codes_ptr,
                                scale_ptr, codebook_ptr, alpha_ptr, lr_ptr, u_scale_ptr, weight_decay_ptr,
                                momentum_coefficient_ptr, numel, M: tl.constexpr,
                                BLOCK: tl.constexpr, K: tl.constexpr, K_POW2: tl.constexpr,
                                HIGH_BYTES: tl.constexpr, ROWS: tl.constexpr, HAS_MOMENTUM: tl.constexpr):
    b = tl.program_id(0).to(tl.int64)
    # Only this program touches this block of the workspace: the atomics resolve collisions between ring rows.
    for first in range(0, M, ROWS):
        slots = first + tl.arange(0, ROWS)
        slot_ok = slots < M
        index, value, mask = _ring_rows(index_low_ptr, index_high_ptr, codes_ptr, scale_ptr, codebook_ptr,
                                        b * M + slots, slot_ok, K, K_POW2, HIGH_BYTES)
        alpha = tl.load(alpha_ptr + slots, mask=slot_ok, other=0.0)
        tl.atomic_add(workspace_ptr + b * BLOCK + index, value * alpha[:, None], mask=mask, sem="relaxed")
    tl.debug_barrier()

    offsets = b * BLOCK + tl.arange(0, BLOCK)
    valid = offsets < numel
    u = tl.load(workspace_ptr + offsets, mask=valid, other=0.0, cache_modifier=".cg") * tl.load(u_scale_ptr)
    if HAS_MOMENTUM:
        u = tl.load(momentum_coefficient_ptr) * tl.load(momentum_ptr + offsets, mask=valid, other=0.0) + u
        tl.store(momentum_ptr + offsets, u, mask=valid)
    lr = tl.load(lr_ptr)
    p = tl.load(param_ptr + offsets, mask=valid, other=0.0).to(tl.float32)
    p = p * (1.0 - lr * tl.load(weight_decay_ptr)) - lr * u
    tl.store(param_ptr + offsets, p.to(param_ptr.dtype.element_ty), mask=valid)


# --------------------------------------------------------------------------------------------------------------
# Launchers
# --------------------------------------------------------------------------------------------------------------
_TILE = 4096            # ring entries per [ROWS, K_POW2] tile of the two ring passes
_TARGET_PROGRAMS = 2048  # ring_dots: block chunks x slot tiles


def _rows_per_tile(layout: RingLayout) -> int:
    return max(1, min(triton.next_power_of_2(layout.m), _TILE // layout.k_pow2))


def _ef_constants(ef: ErrorFeedback) -> dict:
    fmt = as_format(ef.spec)
    if isinstance(fmt, Plain):
        kind = EF_F32 if fmt.dtype == torch.float32 else EF_BF16
        return {"EF_KIND": kind, "EF_BLOCK": 1, "EF_BITS": 32, "EF_MAP": 0, "EF_LOWEST": -1.0}
    constants = codec_constants(fmt)
    return {"EF_KIND": EF_QUANTIZED, "EF_BLOCK": constants["BLOCK"], "EF_BITS": constants["BITS"],
            "EF_MAP": constants["MAP"], "EF_LOWEST": constants["LOWEST"]}


def _ef_tables(ef: ErrorFeedback, device) -> tuple[torch.Tensor, torch.Tensor]:
    fmt = as_format(ef.spec)
    if isinstance(fmt, Plain):
        return codec_tables(RING_VALUE_FORMAT, device)  # unused; any valid pointers
    return codec_tables(fmt, device)


def ef_compress_(workspace: torch.Tensor, ef: ErrorFeedback, ring: SparseRing, head: torch.Tensor,
                 layout: RingLayout) -> None:
    """Step 1 (see the module docstring). ``workspace``: fp32 [padded_numel] holding the gradient in its first
    ``numel`` elements, overwritten with the dense compressed vector c. ``head``: int64 0-d, the slot written."""
    ring_codebook, ring_lower = codec_tables(RING_VALUE_FORMAT, workspace.device)
    ring_constants = codec_constants(RING_VALUE_FORMAT)
    ef_codebook, ef_lower = _ef_tables(ef, workspace.device)
    ef_values = ef.values.view(torch.int16) if ef.values.dtype == torch.bfloat16 else ef.values
    _ef_compress_kernel[(layout.num_blocks,)](
        workspace, ef_values, ef.absmax, head, *ring, ring_lower, ring_codebook, ef_lower, ef_codebook,
        layout.numel, layout.m, BLOCK=layout.block, K=layout.k, K_POW2=layout.k_pow2,
        HIGH_BYTES=layout.high_bytes, RING_BITS=ring_constants["BITS"], RING_MAP=ring_constants["MAP"],
        RING_LOWEST=ring_constants["LOWEST"], **_ef_constants(ef),
        num_warps=8 if layout.block >= 2048 else 4,
        # No FMA contraction, so a - c and e + g round exactly as in the reference.
        enable_fp_fusion=False)


def ring_dots(workspace: torch.Tensor, ring: SparseRing, layout: RingLayout) -> torch.Tensor:
    """Step 2: float64 [m], ``s_j = <row_j, workspace>`` over the ring entries."""
    rows = _rows_per_tile(layout)
    slot_tiles = triton.cdiv(layout.m, rows)
    chunks = max(1, min(layout.num_blocks, _TARGET_PROGRAMS // slot_tiles))
    blocks_per_program = triton.cdiv(layout.num_blocks, chunks)
    chunks = triton.cdiv(layout.num_blocks, blocks_per_program)
    partial = torch.empty(chunks, layout.m, dtype=torch.float64, device=workspace.device)
    codebook, _ = codec_tables(RING_VALUE_FORMAT, workspace.device)
    _ring_dots_kernel[(chunks, slot_tiles)](
        workspace, *ring, codebook, partial, layout.num_blocks, M=layout.m, BLOCKS_PER_PROGRAM=blocks_per_program,
        BLOCK=layout.block, K=layout.k, K_POW2=layout.k_pow2, HIGH_BYTES=layout.high_bytes, ROWS=rows, num_warps=4)
    return partial.sum(dim=0)


def ring_combine_update_(workspace: torch.Tensor, params: torch.Tensor, momentum_buffer: torch.Tensor | None,
                         ring: SparseRing, alpha: torch.Tensor, layout: RingLayout, *, lr: torch.Tensor,
                         u_scale: torch.Tensor, weight_decay: torch.Tensor, momentum: torch.Tensor) -> None:
    """Step 3: ``workspace += G^T alpha`` (``alpha``: fp32 [m]); ``u = u_scale * workspace``; with a
    ``momentum_buffer``, ``v = momentum * v + u`` and u = v; ``params = params * (1 - lr * weight_decay) - lr * u``.
    ``params``: the flat parameters (fp32/bf16/fp16, ``numel`` elements); hyperparameters are 0-d fp32 tensors."""
    has_momentum = momentum_buffer is not None
    codebook, _ = codec_tables(RING_VALUE_FORMAT, workspace.device)
    _ring_combine_update_kernel[(layout.num_blocks,)](
        workspace, params, momentum_buffer if has_momentum else workspace, *ring, codebook, alpha, lr, u_scale,
        weight_decay, momentum, layout.numel, M=layout.m, BLOCK=layout.block, K=layout.k, K_POW2=layout.k_pow2,
        HIGH_BYTES=layout.high_bytes, ROWS=_rows_per_tile(layout), HAS_MOMENTUM=has_momentum,
        num_warps=8 if layout.block >= 2048 else 4)


# --------------------------------------------------------------------------------------------------------------
# Pure-torch references
# --------------------------------------------------------------------------------------------------------------
def _decode_error_feedback(ef: ErrorFeedback, n: int) -> torch.Tensor:
    fmt = as_format(ef.spec)
    if isinstance(fmt, Plain):
        return ef.values.to(torch.float32)
    return decode_reference(ef.values, ef.absmax, fmt, n)


def _encode_error_feedback_(ef: ErrorFeedback, e: torch.Tensor) -> None:
    fmt = as_format(ef.spec)
    if isinstance(fmt, Plain):
        ef.values.copy_(e)
        return
    codes, absmax = encode_reference(e, fmt)
    ef.values.copy_(codes)
    ef.absmax.copy_(absmax)


def ring_entries(ring: SparseRing, layout: RingLayout) -> tuple[torch.Tensor, torch.Tensor]:
    """(global int64 index, fp32 value), each [num_blocks, m, k], of every ring entry."""
    packed = ring.index_high.long()
    high = torch.stack((packed & 15, packed >> 4), dim=-1).flatten(-2)[..., : layout.k]
    starts = torch.arange(layout.num_blocks, device=packed.device)[:, None, None] * layout.block
    index = starts + (ring.index_low.long() | (high << 8))
    codebook = RING_VALUE_FORMAT.codebook.to(ring.scale.device)
    return index, codebook[ring.codes.long()] * ring.scale[..., None]


def ring_matrix(ring: SparseRing, layout: RingLayout) -> torch.Tensor:
    """The ring as a dense fp32 [m, padded_numel] matrix (row j = slot j): for tests on small sizes."""
    index, value = ring_entries(ring, layout)
    dense = torch.zeros(layout.m, layout.padded_numel, dtype=torch.float32, device=value.device)
    dense.scatter_(1, index.transpose(0, 1).reshape(layout.m, -1), value.transpose(0, 1).reshape(layout.m, -1))
    return dense


def ef_compress_reference_(workspace: torch.Tensor, ef: ErrorFeedback, ring: SparseRing, head: torch.Tensor,
                           layout: RingLayout) -> None:
    """Pure-torch ``ef_compress_``."""
    n, nb, block, k = layout.numel, layout.num_blocks, layout.block, layout.k
    g = torch.zeros(layout.padded_numel, dtype=torch.float32, device=workspace.device)
    g[:n] = workspace[:n]
    g = torch.where(torch.isfinite(g), g, 0.0)
    e = _decode_error_feedback(ef, layout.padded_numel)
    a = e + g
    a = torch.where(torch.isfinite(a), a, e).view(nb, block)
    key = a.abs().view(torch.int32).clone()
    key.view(-1)[n:] = -1
    chosen = torch.sort(key, dim=1, descending=True, stable=True).indices[:, :k]
    position = torch.sort(chosen, dim=1).values
    kept = torch.gather(a, 1, position)
    scale = block_scale_reference(kept, RING_VALUE_FORMAT)
    safe = torch.where(scale > 0, scale, torch.ones_like(scale))
    y = torch.where(scale[:, None] > 0, kept / safe[:, None], torch.zeros_like(kept))
    codes = torch.searchsorted(RING_VALUE_FORMAT.midpoints.to(a.device), y)
    c = torch.zeros_like(a).scatter_(1, position, RING_VALUE_FORMAT.codebook.to(a.device)[codes] * scale[:, None])
    _encode_error_feedback_(ef, (a - c).view(-1))
    workspace.copy_(c.view(-1))

    high = position >> 8
    if k % 2:
        high = torch.cat((high, torch.zeros_like(high[:, :1])), dim=1)
    slot = head.view(1)
    ring.index_low.index_copy_(1, slot, (position & 255).to(torch.uint8)[:, None])
    ring.index_high.index_copy_(1, slot, (high[:, 0::2] | (high[:, 1::2] << 4)).to(torch.uint8)[:, None])
    ring.codes.index_copy_(1, slot, codes.to(torch.uint8)[:, None])
    ring.scale.index_copy_(1, slot, scale[:, None])


def ring_dots_reference(workspace: torch.Tensor, ring: SparseRing, layout: RingLayout) -> torch.Tensor:
    """Pure-torch ``ring_dots``."""
    index, value = ring_entries(ring, layout)
    x = workspace[index]
    return (value.double() * x.double()).sum(dim=(0, 2))


def ring_combine_update_reference_(workspace: torch.Tensor, params: torch.Tensor,
                                   momentum_buffer: torch.Tensor | None, ring: SparseRing, alpha: torch.Tensor,
                                   layout: RingLayout, *, lr: torch.Tensor, u_scale: torch.Tensor,
                                   weight_decay: torch.Tensor, momentum: torch.Tensor) -> None:
    """Pure-torch ``ring_combine_update_``."""
    index, value = ring_entries(ring, layout)
    workspace.index_add_(0, index.reshape(-1), (value * alpha[None, :, None]).reshape(-1))
    u = workspace[: layout.numel] * u_scale
    if momentum_buffer is not None:
        momentum_buffer.mul_(momentum).add_(u)
        u = momentum_buffer
    params.copy_(params.float() * (1.0 - lr * weight_decay) - lr * u)


__all__ = [
    "INDEX_BITS", "MAX_BLOCK", "RING_VALUE_FORMAT", "RingLayout", "SparseRing", "ErrorFeedback", "entries_per_block",
    "empty_ring", "empty_error_feedback", "error_feedback_format", "uses_triton", "implementations", "ef_compress_",
    "ring_dots", "ring_combine_update_", "ef_compress_reference_", "ring_dots_reference", "ring_combine_update_reference_",
    "ring_entries", "ring_matrix",
]
