"""Triton block codecs: quantize / dequantize kernels for every quantized format, bit-identical to ``formats``.

The ``@triton.jit`` building blocks below work on a tile of ``R`` whole blocks (an ``[R, BLOCK]`` fp32 tile whose
padding lanes hold 0.0) and are what generated fused kernels call:

    block_scale(x, SIGNED, LOWEST)                      -> fp32 [R]        (formats.block_scale)
    encode(x, scale, lower_ptr, BITS, MAP, SIGNED)      -> int32 [R, BLOCK] (formats.encode's codes)
    decode(codes, scale, codebook_ptr)                  -> fp32 [R, BLOCK]
    pack_nibbles(codes) -> uint8 [R, BLOCK // 2]        unpack_nibbles(bytes) -> int32 [R, BLOCK]

``codec_constants(fmt)`` gives their constexpr arguments, ``codec_tables(fmt, device)`` the codebook and the lower
decision boundary of every code (one cached pair per format and device, so every kernel sees the same pointers).

How the 8-bit dynamic encoder avoids a search: the dynamic map's positive levels are, decade by decade, evenly
spaced cell centres (formats.dynamic_map). Numbering the positive levels 0, 1, 2, ... the function "continuous level
index of a magnitude a" is linear inside each decade and continuous across decade edges, and its slope drops by 5x
from one decade to the next (10x wider, 2x more levels), so it is concave and equals the MINIMUM of its per-decade
lines: ``est(a) = min_i(a * SLOPE_i + INTERCEPT_i)``, no log, no branch. Inside a decade the midpoints sit at
``est = k + 0.5``; the midpoint across a decade edge sits at ``est = O_i - 0.3`` (O_i = first level of decade i),
the one between 0 and the smallest level at ``-0.306`` (signed) / ``-0.361`` (unsigned), and the one below 1.0 at
``P_TOP - 0.75``. Rounding ``est + 0.5 + EPS`` down (positive y; ties go to the lower code) or ``est + 0.3 - EPS``
(negative y, whose ties go to the larger magnitude) therefore gives a code that is the exact one or one above it,
for every y, as long as the fp32 error of est stays below EPS (it is ~1e-5; EPS = 1/64). The level 1.0 breaks the
pattern (it sits half a step above the last decade's grid); one comparison with the second-highest level sends
everything above it to the top code, which again is exact or one above. One gather of the exact midpoint table then
settles it: ``code -= y <= lower[code]`` (``lower[c] = midpoints[c - 1]``, ``lower[0] = -inf``). Tests check every
midpoint and its fp32 neighbours (CPU) and every fp32 in [-1, 1] (GPU). Other maps: the 4-bit linear map has a closed form, the other 4-bit maps a 4-step
binary search of their 15 midpoints (fewer instructions than the analytic route at 16 levels).

Cost notes (a fused optimizer kernel moves ~16 bytes per element and runs two encodes and two decodes, so every
instruction per element counts on an H100): table reads (codebook, boundaries) go through ``table_lookup``, an
elementwise load written as inline PTX, because a ``tl.load`` gather, or a ``tl.gather`` from a register copy of
the table, makes Triton pick a one-element-per-thread layout and convert every vectorized load and store through
shared memory; the block maxima are integer reductions of the fp32 bits; ``y = x / scale`` uses one reciprocal
per row (see ``_divide_rows``).
"""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from ..formats import Quantized, QTensor, as_format, check_quantizable, tables

MAP_DYNAMIC = 0
MAP_LINEAR = 1
MAP_LINEAR2 = 2
_MAP_IDS = {"dynamic": MAP_DYNAMIC, "linear": MAP_LINEAR, "linear2": MAP_LINEAR2}

# The same ids as constexprs, for use inside @triton.jit code (Triton only reads constexpr globals).
_DYNAMIC = tl.constexpr(MAP_DYNAMIC)
_LINEAR = tl.constexpr(MAP_LINEAR)

# Slack added to the analytic level estimate: must exceed its fp32 error (~1e-5) and stay below 0.3 (from the
# midpoint positions in the module docstring; the tests fail at 0 and at 0.32).
_EPS = tl.constexpr(1.0 / 64.0)

# Compiled code, as opposed to Triton's interpreter (where tl.fma rounds twice and inline PTX does not run).
COMPILED = tl.constexpr(os.environ.get("TRITON_INTERPRET", "0") != "1")


# --------------------------------------------------------------------------------------------------------------
# Host-side constants and tables
# --------------------------------------------------------------------------------------------------------------
def _quantized(fmt) -> Quantized:
    fmt = as_format(fmt)
    if not isinstance(fmt, Quantized):
        raise TypeError(f"fmt: the Triton codecs need a quantized format such as lbc.Q8(), got {fmt!r}")
    return fmt


def codec_constants(fmt) -> dict:
    """The constexpr arguments of ``block_scale`` / ``encode`` / ``decode`` for ``fmt``: BLOCK, BITS, MAP, SIGNED,
    LOWEST (the codebook's most negative level, as a Python float holding the exact fp32 value)."""
    fmt = _quantized(fmt)
    if fmt.map == "linear":
        # The closed-form linear encoder relies on levels k / 2**bits exactly (midpoints (2k+1) / 2**(bits+1)).
        levels = 1 << fmt.bits
        expected = torch.arange(1, levels + 1, dtype=torch.float32) / levels
        if not torch.equal(fmt.codebook, expected):
            raise ValueError(f"fmt: {fmt!r} has a linear codebook that is not k / {levels}")
    return {"BLOCK": fmt.block, "BITS": fmt.bits, "MAP": _MAP_IDS[fmt.map], "SIGNED": fmt.signed,
            "LOWEST": float(fmt.codebook[0])}


def codec_tables(fmt, device) -> tuple[torch.Tensor, torch.Tensor]:
    """``(codebook, lower)`` of ``fmt`` as fp32 tensors on ``device``: ``lower[c]`` is the decision boundary below
    code ``c`` (``midpoints[c - 1]``, and -inf for code 0), so that an encoder compares with ``lower[code]`` without
    an index shift or a bounds test. The same tensor objects on every call (stable pointers for CUDA graphs and
    pointer tables). Do not modify them."""
    fmt = _quantized(fmt)
    codebook, midpoints = tables(fmt, device)
    key = (fmt.map, fmt.bits, fmt.signed, codebook.device)
    lower = _LOWER_BOUNDS.get(key)
    if lower is None:
        lower = torch.cat([midpoints.new_full((1,), float("-inf")), midpoints]).contiguous()
        _LOWER_BOUNDS[key] = lower
    return codebook, lower


_LOWER_BOUNDS: dict[tuple, torch.Tensor] = {}


# --------------------------------------------------------------------------------------------------------------
# @triton.jit building blocks (stable interface for generated kernels)
# --------------------------------------------------------------------------------------------------------------
@triton.jit
def block_scale(x, SIGNED: tl.constexpr, LOWEST: tl.constexpr):
    """Per-row scale of an fp32 ``[R, BLOCK]`` tile (padding lanes must hold 0.0): the absolute maximum, or, for
    signed maps whose lowest level is above -1, ``(-min) / (-LOWEST)`` (IEEE division) where the most negative value's
    magnitude is >= the maximum, so that extreme lands exactly on the lowest level."""
    # Reduced as integers (a single warp-reduce instruction on the GPU instead of a shuffle tree): the bits of |x|
    # are ordered like |x|.
    bits = x.to(tl.uint32, bitcast=True)
    if SIGNED and LOWEST > -1.0:
        # One max for both extremes: rotating the bits left by one gives |x|'s bits times two plus the sign bit, so
        # the largest key is the largest magnitude, the negative one on ties.
        key = tl.max((bits << 1) | (bits >> 31), axis=1)
        absmax = (key >> 1).to(tl.float32, bitcast=True)
        # Clamped so a block whose extreme is within |LOWEST| of the fp32 maximum gets a finite scale (formats too).
        stretched = tl.minimum(tl.math.div_rn(absmax, tl.full(absmax.shape, -LOWEST, tl.float32)),
                               3.4028234663852886e38)
        scale = tl.where((key & 1) != 0, stretched, absmax)
    else:
        scale = tl.max(bits & 0x7FFFFFFF, axis=1).to(tl.float32, bitcast=True)
    return scale


@triton.jit
def _decade_line(a, DECADE: tl.constexpr, DECADES: tl.constexpr, SIGNED: tl.constexpr):
    """Continuous positive-level index of ``a`` on the line through decade ``DECADE``'s levels
    ``10**(DECADE - DECADES + 1) * (0.1 + (k + 0.5) * 0.9 / LEVELS)``, k = 0 .. LEVELS - 1."""
    FIRST_DECADE_LEVELS: tl.constexpr = 1 if SIGNED else 2
    LEVELS: tl.constexpr = FIRST_DECADE_LEVELS * (1 << DECADE)
    FIRST_INDEX: tl.constexpr = FIRST_DECADE_LEVELS * ((1 << DECADE) - 1)
    SLOPE: tl.constexpr = 10.0 ** (DECADES - 1 - DECADE) * LEVELS / 0.9
    INTERCEPT: tl.constexpr = FIRST_INDEX - LEVELS / 9.0 - 0.5
    return a * SLOPE + INTERCEPT


@triton.jit
def _dynamic_level_estimate(a, DECADES: tl.constexpr, SIGNED: tl.constexpr):
    """Continuous index of magnitude ``a`` among the positive levels of a dynamic map (0 = smallest positive level):
    the minimum of the per-decade lines (the function is concave, see the module docstring)."""
    est = _decade_line(a, 0, DECADES, SIGNED)
    for decade in tl.static_range(1, DECADES):
        est = tl.minimum(est, _decade_line(a, decade, DECADES, SIGNED))
    return est


@triton.jit
def _encode_dynamic(y, lower_ptr, BITS: tl.constexpr, SIGNED: tl.constexpr):
    code = dynamic_candidate(y, BITS, SIGNED)
    return code - (y <= table_lookup(lower_ptr, code)).to(tl.int32)


@triton.jit
def dynamic_candidate(y, BITS: tl.constexpr, SIGNED: tl.constexpr):
    """The dynamic map's code of ``y`` (|y| <= 1) or the code one above it, from the level estimate alone."""
    DECADES: tl.constexpr = BITS - 1  # max_exponent_bits of formats._MAPS' dynamic maps
    FIRST_DECADE_LEVELS: tl.constexpr = 1 if SIGNED else 2
    TOP_DECADE_LEVELS: tl.constexpr = FIRST_DECADE_LEVELS * (1 << (DECADES - 1))
    # Positive-level index of 1.0, and the code of 0.
    P_TOP: tl.constexpr = FIRST_DECADE_LEVELS * ((1 << DECADES) - 1)
    ZERO_CODE: tl.constexpr = (1 << (BITS - 1)) - 1 if SIGNED else 0
    # The second-highest level; it lies strictly between the two highest midpoints.
    BELOW_TOP: tl.constexpr = 1.0 - 0.45 / TOP_DECADE_LEVELS
    MAX_CODE: tl.constexpr = (1 << BITS) - 1

    a = tl.abs(y)
    negative = y < 0
    est = _dynamic_level_estimate(a, DECADES, SIGNED)
    level = tl.floor(est + tl.where(negative, 0.3 - _EPS, 0.5 + _EPS)).to(tl.int32)
    level = tl.where(a > BELOW_TOP, P_TOP, level)
    code = tl.where(negative, ZERO_CODE - 1 - level, ZERO_CODE + 1 + level)
    # In range for |y| <= 1 except -1 for negative y above the lowest level; the upper clamp only keeps non-finite
    # input (unspecified codes) inside the table.
    return tl.minimum(tl.maximum(code, 0), MAX_CODE)


@triton.jit
def table_lookup(table_ptr, index):
    """``table_ptr[index]`` elementwise for a small fp32 table, in ``index``'s own register layout.

    Compiled, this is one read-only-cache load per element written as inline PTX: as a ``tl.load`` the gather would
    get a one-element-per-thread layout from Triton's coalescing pass, which then spreads to the whole kernel and
    costs shared-memory layout conversions on every vectorized load and store. The interpreter runs ``tl.load``."""
    if COMPILED:
        address = table_ptr.to(tl.int64, bitcast=True) + index.to(tl.int64) * 4
        return tl.inline_asm_elementwise("ld.global.nc.f32 $0, [$1];", "=r,l", [address], dtype=tl.float32,
                                         is_pure=True, pack=1)
    else:
        return tl.load(table_ptr + index)


@triton.jit
def _encode_linear(y, BITS: tl.constexpr):
    # Levels k / L (k = 1..L), midpoint j = (2j + 3) / (2L): y is above midpoint j iff j < L*y - 1.5, and both
    # L*y (power-of-two scaling) and L*y - 1.5 (where it matters) are exact in fp32.
    LEVELS: tl.constexpr = 1 << BITS
    code = tl.math.ceil(y * LEVELS - 1.5).to(tl.int32)
    return tl.minimum(tl.maximum(code, 0), LEVELS - 1)


@triton.jit
def _encode_by_search(y, lower_ptr, BITS: tl.constexpr):
    """Branchless binary search of the sorted midpoints (exact by construction): BITS comparisons per element."""
    HALF: tl.constexpr = 1 << (BITS - 1)
    code = tl.where(y > tl.load(lower_ptr + HALF), HALF, 0)
    for level in tl.static_range(1, BITS):
        step = HALF >> level
        code += tl.where(y > table_lookup(lower_ptr, code + step), step, 0)
    return code


@triton.jit
def _divide_rows(x, scale):
    """``x / scale[:, None]`` rounded to nearest (IEEE); ``scale`` is ``block_scale(x)``, so a row with scale 0
    holds only zeros, and its y is 0.

    One correctly rounded reciprocal per row and three operations per element instead of a full division each
    (Markstein: with r = RN(1/s) and q0 = RN(x*r) within an ulp of x/s, the remainder x - s*q0 is exact in an fma
    and RN(q0 + r*remainder) = RN(x/s)). Both operands are first scaled by the same power of two, which brings s
    into [1, 4) (subnormal s: [2**-22, 2)) and keeps r and the remainder away from subnormals. Where the quotient
    is below 2**-60 in magnitude its last bits may differ from IEEE division, its sign never does: such a y is far
    below every midpoint (> 1e-7), so the code is the same. Triton's interpreter rounds fma twice, so under it
    the plain IEEE division is used."""
    positive = scale > 0
    if COMPILED:
        exponent = (scale.to(tl.int32, bitcast=True) >> 23) & 0xFF
        shift = tl.minimum(tl.maximum(127 - exponent, -126), 127)
        factor = ((shift + 127) << 23).to(tl.float32, bitcast=True)
        s = tl.where(positive, scale * factor, 1.0)
        r = tl.math.div_rn(tl.full(s.shape, 1.0, tl.float32), s)
        x_scaled = x * factor[:, None]
        q0 = x_scaled * r[:, None]
        remainder = tl.fma(-s[:, None], q0, x_scaled)
        y = tl.fma(remainder, r[:, None], q0)
    else:
        y = tl.math.div_rn(x, tl.where(positive, scale, 1.0)[:, None])
    return y


@triton.jit
def encode(x, scale, lower_ptr, BITS: tl.constexpr, MAP: tl.constexpr, SIGNED: tl.constexpr):
    """int32 codes of an fp32 ``[R, BLOCK]`` tile given its per-row ``scale = block_scale(x)`` [R]: ``y = x / scale``
    (IEEE round-to-nearest division; 0 in all-zero rows), code = number of midpoints strictly below y
    (``lower_ptr``: the boundaries table of ``codec_tables``)."""
    y = _divide_rows(x, scale)
    # The cheapest exact encoder per map, by instruction count of the compiled sm_90 kernels: analytic for the
    # 8-bit dynamic maps, closed form for the linear map, a 4-step search for the other 4-bit maps. (The analytic
    # candidate plus one lookup is exact for the 4-bit dynamic maps too, but timed no faster on the H100 in any launch
    # shape and slower in register-capped ones: benchmarks/results/fused_ablation.run2.md, variant analytic4.)
    if MAP == _DYNAMIC and BITS == 8:
        code = _encode_dynamic(y, lower_ptr, BITS, SIGNED)
    elif MAP == _LINEAR:
        code = _encode_linear(y, BITS)
    else:
        code = _encode_by_search(y, lower_ptr, BITS)
    return code


@triton.jit
def decode(codes, scale, codebook_ptr):
    """fp32 values ``codebook[codes] * scale`` of an int32 ``[R, BLOCK]`` code tile with per-row ``scale`` [R]."""
    return table_lookup(codebook_ptr, codes) * scale[:, None]


@triton.jit
def pack_nibbles(codes):
    """int32 ``[R, BLOCK]`` 4-bit codes -> uint8 ``[R, BLOCK // 2]``, the even element in the low nibble."""
    ROWS: tl.constexpr = codes.shape[0]
    HALF: tl.constexpr = codes.shape[1] // 2
    low, high = tl.split(tl.reshape(codes, (ROWS, HALF, 2)))
    return (low | (high << 4)).to(tl.uint8)


@triton.jit
def unpack_nibbles(packed):
    """uint8 ``[R, HALF]`` -> int32 ``[R, 2 * HALF]`` 4-bit codes (inverse of ``pack_nibbles``)."""
    ROWS: tl.constexpr = packed.shape[0]
    HALF: tl.constexpr = packed.shape[1]
    wide = packed.to(tl.int32)
    return tl.reshape(tl.join(wide & 15, wide >> 4), (ROWS, 2 * HALF))


# --------------------------------------------------------------------------------------------------------------
# Standalone kernels
# --------------------------------------------------------------------------------------------------------------
@triton.jit
def _quantize_kernel(x_ptr, codes_ptr, absmax_ptr, lower_ptr, numel, num_blocks,
                     BLOCK: tl.constexpr, ROWS: tl.constexpr, BITS: tl.constexpr, MAP: tl.constexpr,
                     SIGNED: tl.constexpr, LOWEST: tl.constexpr):
    first_block = tl.program_id(0).to(tl.int64) * ROWS
    rows = tl.arange(0, ROWS)
    local = rows[:, None] * BLOCK + tl.arange(0, BLOCK)[None, :]
    elements_left = numel - first_block * BLOCK  # keeps numel's divisibility, so masked accesses vectorize
    row_ok = rows < tl.minimum(num_blocks - first_block, ROWS).to(tl.int32)

    x = tl.load(x_ptr + first_block * BLOCK + local, mask=local < elements_left, other=0.0).to(tl.float32)
    scale = block_scale(x, SIGNED, LOWEST)
    codes = encode(x, scale, lower_ptr, BITS, MAP, SIGNED)
    tl.store(absmax_ptr + first_block + rows, scale, mask=row_ok)
    if BITS == 8:
        tl.store(codes_ptr + first_block * BLOCK + local, codes.to(tl.uint8), mask=row_ok[:, None])
    else:
        HALF: tl.constexpr = BLOCK // 2
        local_half = rows[:, None] * HALF + tl.arange(0, HALF)[None, :]
        tl.store(codes_ptr + first_block * HALF + local_half, pack_nibbles(codes), mask=row_ok[:, None])


@triton.jit
def _dequantize_kernel(codes_ptr, absmax_ptr, codebook_ptr, out_ptr, numel, num_blocks,
                       BLOCK: tl.constexpr, ROWS: tl.constexpr, BITS: tl.constexpr):
    first_block = tl.program_id(0).to(tl.int64) * ROWS
    rows = tl.arange(0, ROWS)
    local = rows[:, None] * BLOCK + tl.arange(0, BLOCK)[None, :]
    elements_left = numel - first_block * BLOCK  # keeps numel's divisibility, so masked accesses vectorize
    row_ok = rows < tl.minimum(num_blocks - first_block, ROWS).to(tl.int32)

    scale = tl.load(absmax_ptr + first_block + rows, mask=row_ok, other=0.0)
    if BITS == 8:
        codes = tl.load(codes_ptr + first_block * BLOCK + local, mask=row_ok[:, None], other=0).to(tl.int32)
    else:
        HALF: tl.constexpr = BLOCK // 2
        local_half = rows[:, None] * HALF + tl.arange(0, HALF)[None, :]
        codes = unpack_nibbles(tl.load(codes_ptr + first_block * HALF + local_half, mask=row_ok[:, None], other=0))
    values = decode(codes, scale, codebook_ptr)
    tl.store(out_ptr + first_block * BLOCK + local, values.to(out_ptr.dtype.element_ty), mask=local < elements_left)


@triton.jit
def _encode_normalized_kernel(y_ptr, codes_ptr, lower_ptr, numel, BLOCK: tl.constexpr, ROWS: tl.constexpr,
                              BITS: tl.constexpr, MAP: tl.constexpr, SIGNED: tl.constexpr):
    offsets = tl.program_id(0).to(tl.int64) * ROWS * BLOCK + (
        tl.arange(0, ROWS)[:, None] * BLOCK + tl.arange(0, BLOCK)[None, :])
    y = tl.load(y_ptr + offsets, mask=offsets < numel, other=0.0)
    codes = encode(y, tl.full((ROWS,), 1.0, tl.float32), lower_ptr, BITS, MAP, SIGNED)
    tl.store(codes_ptr + offsets, codes.to(tl.uint8), mask=offsets < numel)


# --------------------------------------------------------------------------------------------------------------
# Launchers
# --------------------------------------------------------------------------------------------------------------
# Elements per program and warps by (kernel, code width), chosen from benchmarks/codecs.py's sweep on an H100.
_LAUNCH = {("quantize", 8): (8192, 8), ("quantize", 4): (4096, 4),
           ("dequantize", 8): (4096, 8), ("dequantize", 4): (4096, 8)}
_FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def _launch_shape(kernel: str, fmt: Quantized, num_blocks: int, elements_per_program: int | None,
                  num_warps: int | None):
    default_elements, default_warps = _LAUNCH[(kernel, fmt.bits)]
    elements = default_elements if elements_per_program is None else elements_per_program
    rows = max(1, elements // fmt.block)
    if rows & (rows - 1):
        raise ValueError(f"elements_per_program: must give a power-of-two number of blocks, got {elements}")
    return rows, (num_warps or default_warps), (triton.cdiv(num_blocks, rows),)


def _check_device(name: str, tensor: torch.Tensor, device: torch.device) -> None:
    if tensor.device != device:
        raise ValueError(f"{name}: expected a tensor on {device}, got one on {tensor.device}")
    if device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
        raise ValueError(f"{name}: the Triton codecs need CUDA tensors (or TRITON_INTERPRET=1 on the CPU), "
                         f"got one on {device}")


def _check_storage(codes: torch.Tensor, absmax: torch.Tensor, fmt: Quantized, numel: int) -> None:
    if codes.dtype != torch.uint8 or not codes.is_contiguous() or codes.numel() != fmt.num_code_bytes(numel):
        raise ValueError(f"codes: expected a contiguous uint8 tensor of {fmt.num_code_bytes(numel)} bytes for "
                         f"{numel} elements in {fmt!r}, got {codes.dtype} {tuple(codes.shape)}")
    if absmax.dtype != torch.float32 or not absmax.is_contiguous() or absmax.numel() != fmt.num_blocks(numel):
        raise ValueError(f"absmax: expected a contiguous float32 tensor of {fmt.num_blocks(numel)} block scales, "
                         f"got {absmax.dtype} {tuple(absmax.shape)}")


def _checked_numel(name: str, values: torch.Tensor, codes: torch.Tensor, absmax: torch.Tensor,
                   fmt: Quantized) -> int:
    """Element count of a codec call on ``values`` (named ``name``), after checking that ``codes`` and ``absmax``
    are on its device and are the storage of that many elements in ``fmt``."""
    for label, tensor in ((name, values), ("codes", codes), ("absmax", absmax)):
        _check_device(label, tensor, values.device)
    numel = values.numel()
    _check_storage(codes, absmax, fmt, numel)
    return numel


def quantize_into(x: torch.Tensor, codes: torch.Tensor, absmax: torch.Tensor, fmt, *,
                  elements_per_program: int | None = None, num_warps: int | None = None) -> None:
    """Quantize ``x`` (any shape, fp32/bf16/fp16, any strides) into preallocated ``codes`` (uint8,
    ``fmt.num_code_bytes(x.numel())``) and ``absmax`` (fp32, ``fmt.num_blocks(x.numel())``). No value checks
    (non-finite input gives unspecified codes, as formats.encode) and no host synchronisation."""
    fmt = _quantized(fmt)
    if x.dtype not in _FLOAT_DTYPES:
        raise TypeError(f"x: expected float32, bfloat16 or float16, got {x.dtype}")
    numel = _checked_numel("x", x, codes, absmax, fmt)
    if numel == 0:
        return
    flat = x.reshape(-1)  # copies only when x's strides do not allow a flat view
    constants = codec_constants(fmt)
    _, lower = codec_tables(fmt, x.device)
    num_blocks = fmt.num_blocks(numel)
    rows, warps, grid = _launch_shape("quantize", fmt, num_blocks, elements_per_program, num_warps)
    _quantize_kernel[grid](flat, codes, absmax, lower, numel, num_blocks, ROWS=rows, num_warps=warps,
                           **constants)


def quantize(x: torch.Tensor, fmt) -> QTensor:
    """Block-wise quantize ``x`` with the Triton kernel; the same codes and absmax as ``formats.quantize``."""
    fmt = _quantized(fmt)
    check_quantizable(x, fmt, "x")
    codes = torch.empty(fmt.num_code_bytes(x.numel()), dtype=torch.uint8, device=x.device)
    absmax = torch.empty(fmt.num_blocks(x.numel()), dtype=torch.float32, device=x.device)
    quantize_into(x, codes, absmax, fmt)
    return QTensor(codes, absmax, fmt, x.shape)


def dequantize_into(codes: torch.Tensor, absmax: torch.Tensor, fmt, out: torch.Tensor, *,
                    elements_per_program: int | None = None, num_warps: int | None = None) -> None:
    """Decode ``codes``/``absmax`` into the contiguous ``out`` (fp32/bf16/fp16; its numel is the element count)."""
    fmt = _quantized(fmt)
    if out.dtype not in _FLOAT_DTYPES or not out.is_contiguous():
        raise ValueError(f"out: expected a contiguous float32, bfloat16 or float16 tensor, got {out.dtype} "
                         f"(contiguous={out.is_contiguous()})")
    numel = _checked_numel("out", out, codes, absmax, fmt)
    if numel == 0:
        return
    codebook, _ = codec_tables(fmt, out.device)
    num_blocks = fmt.num_blocks(numel)
    rows, warps, grid = _launch_shape("dequantize", fmt, num_blocks, elements_per_program, num_warps)
    _dequantize_kernel[grid](codes, absmax, codebook, out, numel, num_blocks, BLOCK=fmt.block, ROWS=rows,
                             BITS=fmt.bits, num_warps=warps)


def dequantize(q: QTensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Values of ``q`` as a tensor of ``q.shape`` and ``dtype``; the same values as ``formats.dequantize``."""
    out = torch.empty(q.shape, dtype=dtype, device=q.codes.device)
    dequantize_into(q.codes, q.absmax, q.fmt, out)
    return out


def encode_normalized(y: torch.Tensor, fmt) -> torch.Tensor:
    """One uint8 code per element (4-bit codes not packed) of values already divided by their scale: the jit
    ``encode`` with every scale 1, i.e. ``searchsorted(fmt.midpoints, y)``. For checking the encoders."""
    fmt = _quantized(fmt)
    if y.dtype != torch.float32:
        raise TypeError(f"y: expected float32, got {y.dtype}")
    _check_device("y", y, y.device)
    flat = y.reshape(-1)
    codes = torch.empty(flat.numel(), dtype=torch.uint8, device=y.device)
    if flat.numel() == 0:
        return codes.view(y.shape)
    constants = codec_constants(fmt)
    _, lower = codec_tables(fmt, y.device)
    rows, warps, grid = _launch_shape("quantize", fmt, fmt.num_blocks(flat.numel()), None, None)
    _encode_normalized_kernel[grid](flat, codes, lower, flat.numel(), BLOCK=fmt.block, ROWS=rows,
                                    BITS=fmt.bits, MAP=constants["MAP"], SIGNED=fmt.signed, num_warps=warps)
    return codes.view(y.shape)


__all__ = [
    "MAP_DYNAMIC", "MAP_LINEAR", "MAP_LINEAR2", "codec_constants", "codec_tables",
    "block_scale", "encode", "decode", "pack_nibbles", "unpack_nibbles",
    "quantize", "quantize_into", "dequantize", "dequantize_into", "encode_normalized",
]
