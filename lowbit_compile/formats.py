"""State storage formats and their pure-torch reference codecs.

A format says how one optimizer-state tensor is stored: plain (``F32``, ``BF16``) or block-wise quantized
(``Q8``, ``Q4``). Quantized tensors are flattened, padded with zeros to whole blocks (so no block ever spans
two tensors), normalised per block by the block's absolute maximum (fp32), and each element is replaced by the
index of the nearest entry of a sorted codebook. 4-bit codes are packed two per byte, the even element in the
low nibble.

``quantize`` / ``dequantize`` here are the numerical reference: every Triton kernel must produce the same
integer codes and the same absmax, bit for bit.
"""
from __future__ import annotations

import dataclasses
import functools
import math
import torch

MIN_QUANT_NUMEL = 4096


# --------------------------------------------------------------------------------------------------------------
# Codebooks
# --------------------------------------------------------------------------------------------------------------
def dynamic_map(signed: bool, max_exponent_bits: int, total_bits: int) -> torch.Tensor:
    """The bitsandbytes "dynamic" codebook: decade ``i`` holds the cell centres of ``linspace(0.1, 1)`` scaled
    by ``10**(i - max_exponent_bits + 1)``; ``0`` and ``1`` are appended. Decade ``i`` has ``2**i`` entries per
    sign (signed) or ``2**(i + 1)`` (unsigned). The arithmetic (fp32 linspace and means, fp32 scaling) follows
    bitsandbytes so the 8-bit maps are bit-identical to its ``create_dynamic_map``."""
    non_sign_bits = total_bits - 1
    values: list[float] = []
    for decade in range(max_exponent_bits):
        per_decade = 2 ** (decade + non_sign_bits - max_exponent_bits + (0 if signed else 1))
        edges = torch.linspace(0.1, 1, per_decade + 1, dtype=torch.float32)
        centres = (edges[:-1] + edges[1:]) / 2.0
        scale = 10 ** (-(max_exponent_bits - 1) + decade)
        values += (scale * centres).tolist()
        if signed:
            values += (-scale * centres).tolist()
    values += [0.0, 1.0]
    assert len(values) == 2**total_bits, (signed, max_exponent_bits, total_bits, len(values))
    return torch.tensor(sorted(values), dtype=torch.float32)


def linear_map_without_zero(bits: int) -> torch.Tensor:
    """Uniform levels ``k / 2**bits`` for ``k = 1 .. 2**bits``: no zero level, so a second moment never decodes
    to 0 and ``m / sqrt(v)`` cannot explode (lpmm's power-1 map)."""
    return torch.linspace(0, 1, 2**bits + 1, dtype=torch.float32)[1:].contiguous()


def linear2_map(bits: int) -> torch.Tensor:
    """``sign(x) * x**2`` over ``linspace(-1, 1, 2**bits)`` with the level just below zero set to 0 (4-bit
    Shampoo's eigenvector codebook; note the asymmetric smallest positive level)."""
    x = torch.linspace(-1, 1, 2**bits, dtype=torch.float32)
    x[2 ** (bits - 1) - 1] = 0.0
    return (x.sign() * x * x).contiguous()


# --------------------------------------------------------------------------------------------------------------
# Formats
# --------------------------------------------------------------------------------------------------------------
class Format:
    """Base of all storage formats. Formats are immutable values; ``spec`` is a string that names one exactly
    and is what custom ops and generated kernels receive."""

    quantized: bool = False
    spec: str

    def state_bytes(self, numel: int) -> int:
        raise NotImplementedError

    def stores_quantized(self, numel: int) -> bool:
        return False


@dataclasses.dataclass(frozen=True)
class Plain(Format):
    """Unquantized storage in ``dtype``; the update rule still sees fp32."""

    dtype: torch.dtype = torch.float32

    @property
    def spec(self) -> str:  # type: ignore[override]
        return {torch.float32: "F32", torch.bfloat16: "BF16"}[self.dtype]

    @property
    def bits(self) -> int:
        return torch.finfo(self.dtype).bits

    def state_bytes(self, numel: int) -> int:
        return numel * self.bits // 8

    def __repr__(self) -> str:
        return f"{self.spec}()"


def F32() -> Plain:
    """fp32 state."""
    return Plain(torch.float32)


def BF16() -> Plain:
    """bf16 state (decoded to fp32 for the update, rounded to nearest even when stored)."""
    return Plain(torch.bfloat16)


_MAPS = {
    ("dynamic", 8): lambda signed: dynamic_map(signed, 7, 8),
    ("dynamic", 4): lambda signed: dynamic_map(signed, 3, 4),
    ("linear", 4): lambda signed: linear_map_without_zero(4),
    ("linear2", 4): lambda signed: linear2_map(4),
}


@dataclasses.dataclass(frozen=True)
class Quantized(Format):
    """Block-wise quantized storage: ``bits``-bit indices into ``codebook`` and one fp32 absmax per block."""

    bits: int
    signed: bool
    block: int
    map: str
    min_quant_numel: int = MIN_QUANT_NUMEL

    quantized = True

    def __post_init__(self):
        if (self.map, self.bits) not in _MAPS:
            raise ValueError(f"no {self.bits}-bit codebook named {self.map!r}; known: {sorted(_MAPS)}")
        if self.map == "linear" and self.signed:
            raise ValueError("the linear map without zero is unsigned: use Q4(signed=False)")
        if self.map == "linear2" and not self.signed:
            raise ValueError("the linear2 map is signed: use Q4(map='linear2')")
        if self.block < 2 or self.block & (self.block - 1):
            raise ValueError(f"block must be a power of two >= 2, got {self.block}")
        if self.min_quant_numel < 0:
            raise ValueError(f"min_quant_numel must be >= 0, got {self.min_quant_numel}")

    @property
    def spec(self) -> str:  # type: ignore[override]
        return f"Q{self.bits}:{self.map}:{'s' if self.signed else 'u'}:{self.block}"

    @property
    def codebook(self) -> torch.Tensor:
        """Sorted fp32 levels in [-1, 1]; a code is an index into this table."""
        return _codebook(self.map, self.bits, self.signed)

    @property
    def midpoints(self) -> torch.Tensor:
        """``(codebook[k] + codebook[k+1]) / 2`` in fp32: the code of a normalised value ``y`` is the number of
        midpoints strictly below ``y`` (ties go to the lower code)."""
        return _midpoints(self.map, self.bits, self.signed)

    @property
    def lowest_level(self) -> float:
        """The most negative level as a Python float (usable while tracing, unlike the table tensor)."""
        return _lowest_level(self.map, self.bits, self.signed)

    @property
    def max_roundtrip_error(self) -> float:
        """Largest distance from any value of the normalised range ([-1, 1] signed, [0, 1] unsigned) to its
        nearest level: half the widest gap between adjacent levels, or the distance from a range end to the
        outermost level when that is larger (the no-zero map leaves [0, 1/16) uncovered by design)."""
        levels = self.codebook.double()
        low = -1.0 if self.signed else 0.0
        half_gap = float((levels[1:] - levels[:-1]).max()) / 2
        return max(half_gap, float(levels[0]) - low, 1.0 - float(levels[-1]))

    @property
    def codes_per_byte(self) -> int:
        return 8 // self.bits

    def num_blocks(self, numel: int) -> int:
        return -(-numel // self.block)

    def num_code_bytes(self, numel: int) -> int:
        return self.num_blocks(numel) * self.block // self.codes_per_byte

    def stores_quantized(self, numel: int) -> bool:
        """Small tensors keep fp32 state; decide on the *global* numel, so every shard of a sharded parameter
        agrees."""
        return numel >= self.min_quant_numel

    def state_bytes(self, numel: int) -> int:
        if not self.stores_quantized(numel):
            return 4 * numel
        return self.num_code_bytes(numel) + 4 * self.num_blocks(numel)

    def bytes_per_element(self) -> float:
        return self.bits / 8 + 4 / self.block

    def __repr__(self) -> str:
        args = [f"signed={self.signed}", f"block={self.block}"]
        if self.map not in ("dynamic", "linear"):
            args.insert(0, f"map={self.map!r}")
        if self.min_quant_numel != MIN_QUANT_NUMEL:
            args.append(f"min_quant_numel={self.min_quant_numel}")
        return f"Q{self.bits}({', '.join(args)})"


def Q8(signed: bool = True, block: int = 256, *, min_quant_numel: int = MIN_QUANT_NUMEL) -> Quantized:
    """8-bit block-wise dynamic map (bitsandbytes-compatible): signed for first moments, unsigned
    (``signed=False``) for non-negative state such as second moments."""
    return Quantized(8, signed, block, "dynamic", min_quant_numel)


def Q4(signed: bool = True, block: int | None = None, *, map: str | None = None,
       min_quant_numel: int = MIN_QUANT_NUMEL) -> Quantized:
    """4-bit block-wise: signed → dynamic map with 3 exponent bits (block 128); unsigned → linear map without a
    zero level (block 128); ``map="linear2"`` → sign(x)·x² levels for Shampoo eigenvectors (block 64)."""
    if map is None:
        map = "dynamic" if signed else "linear"
    if block is None:
        block = 64 if map == "linear2" else 128
    return Quantized(4, signed, block, map, min_quant_numel)


@functools.lru_cache(maxsize=None)
def _codebook(map: str, bits: int, signed: bool) -> torch.Tensor:
    return _MAPS[(map, bits)](signed)


@functools.lru_cache(maxsize=None)
def _midpoints(map: str, bits: int, signed: bool) -> torch.Tensor:
    levels = _codebook(map, bits, signed)
    return ((levels[:-1] + levels[1:]) / 2).contiguous()


def tables(fmt: Quantized, device) -> tuple[torch.Tensor, torch.Tensor]:
    """``(codebook, midpoints)`` of ``fmt`` on ``device``: the same tensor objects on every call, so codecs never
    copy a table host-to-device inside a step (CUDA-graph safe) and kernels see stable pointers. Do not modify."""
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    return _tables_on(fmt.map, fmt.bits, fmt.signed, device)


# Dynamo evaluates this at trace time and keeps the result as a constant: tracing into the cached table lookup (its
# .tolist()) would be a graph break in any traced encode.
@torch.compiler.assume_constant_result
def _lowest_level(map: str, bits: int, signed: bool) -> float:
    return _level_values(map, bits, signed)[0][0]


@functools.lru_cache(maxsize=None)
def _level_values(map: str, bits: int, signed: bool) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Codebook and midpoints as Python floats (exact fp32 values), for tracers that must build constants."""
    return tuple(_codebook(map, bits, signed).tolist()), tuple(_midpoints(map, bits, signed).tolist())


@functools.lru_cache(maxsize=None)
def _tables_on(map: str, bits: int, signed: bool, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    return (_codebook(map, bits, signed).to(device).contiguous(),
            _midpoints(map, bits, signed).to(device).contiguous())


def level_values(fmt: Quantized) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """``(codebook, midpoints)`` as tuples of Python floats holding the exact fp32 values."""
    return _level_values(fmt.map, fmt.bits, fmt.signed)


def parse_spec(spec: str) -> Format:
    """Inverse of ``Format.spec``."""
    if spec == "F32":
        return F32()
    if spec == "BF16":
        return BF16()
    try:
        kind, map, sign, block = spec.split(":")
        return Quantized(int(kind[1:]), {"s": True, "u": False}[sign], int(block), map)
    except (ValueError, KeyError) as err:
        raise ValueError(f"not a format spec: {spec!r}") from err


def as_format(fmt) -> Format:
    """Accept a format value, a format constructor (``lbc.Q8``), or a spec string."""
    if isinstance(fmt, Format):
        return fmt
    if isinstance(fmt, str):
        return parse_spec(fmt)
    if callable(fmt):
        made = fmt()
        if isinstance(made, Format):
            return made
    raise TypeError(f"expected a storage format such as lbc.Q8() or lbc.F32(), got {fmt!r}")


# --------------------------------------------------------------------------------------------------------------
# Reference codecs
# --------------------------------------------------------------------------------------------------------------
@dataclasses.dataclass
class QTensor:
    """A quantized tensor: flat ``codes`` (uint8; 4-bit packed two per byte) and one fp32 scale per block in
    ``absmax`` (the block's absolute maximum, see ``block_scale``); value = codebook[code] * absmax."""

    codes: torch.Tensor
    absmax: torch.Tensor
    fmt: Quantized
    shape: torch.Size

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


def encode(x: torch.Tensor, fmt: Quantized, midpoints: torch.Tensor | None = None
           ) -> tuple[torch.Tensor, torch.Tensor]:
    """Reference encoder without input validation: returns ``(codes, absmax)`` for the flattened ``x``.
    Non-finite input gives unspecified codes; callers that may see it use ``quantize``. ``midpoints`` defaults to
    the cached table on ``x``'s device (tracers pass a fresh constant)."""
    flat = x.detach().reshape(-1).to(torch.float32)
    n_blocks = fmt.num_blocks(flat.numel())
    padded = torch.zeros(n_blocks * fmt.block, dtype=torch.float32, device=flat.device)
    padded[: flat.numel()] = flat
    blocks = padded.view(n_blocks, fmt.block)
    absmax = block_scale(blocks, fmt)
    safe = torch.where(absmax > 0, absmax, torch.ones_like(absmax))
    normalised = torch.where(absmax[:, None] > 0, blocks / safe[:, None], torch.zeros_like(blocks))
    if midpoints is None:
        midpoints = tables(fmt, flat.device)[1]
    codes = count_below(normalised, midpoints, fmt.bits).to(torch.uint8)
    return pack(codes.view(-1), fmt), absmax


def count_below(y: torch.Tensor, midpoints: torch.Tensor, bits: int) -> torch.Tensor:
    """Number of ``midpoints`` (sorted, ``2**bits - 1`` of them) strictly below each ``y``: the code of ``y``. A
    branchless binary search of ``bits`` halvings, each one gather, so inductor fuses it into one loop (it has no
    CPU lowering for searchsorted/bucketize); equal to ``torch.searchsorted(midpoints, y)`` (tested)."""
    code = torch.zeros_like(y, dtype=torch.int64)
    for level in reversed(range(bits)):
        step = 1 << level
        code = code + torch.where(y > midpoints[code + (step - 1)], step, 0)
    return code


def block_scale(blocks: torch.Tensor, fmt: Quantized) -> torch.Tensor:
    """Per-block scale: the block's absolute maximum, except where the extreme is negative and the codebook's
    most negative level is above -1 (the dynamic maps end at -0.993 / -0.8875): then (ties included) the scale is
    stretched to ``|min| / |lowest level|`` so the extreme lands exactly on the lowest level. That keeps re-quantizing an
    unchanged block idempotent on codes; with the plain absmax, such blocks shrink by 0.7% (8-bit) or 11%
    (4-bit) on every requantization, a bias bitsandbytes' and torchao's quantizers have."""
    if blocks.shape[0] == 0:
        return torch.zeros(0, dtype=torch.float32, device=blocks.device)
    hi = blocks.amax(dim=1)
    neg = -blocks.amin(dim=1)
    absmax = torch.maximum(hi, neg)
    lowest = fmt.lowest_level
    if fmt.signed and lowest > -1.0:
        stretched = neg / torch.tensor(-lowest, dtype=torch.float32, device=blocks.device)
        stretched = stretched.clamp_max(torch.finfo(torch.float32).max)  # extremes near fp32 max stay finite
        absmax = torch.where(neg >= hi, stretched, absmax)
    return absmax


def decode(codes: torch.Tensor, absmax: torch.Tensor, fmt: Quantized, numel: int,
           codebook: torch.Tensor | None = None) -> torch.Tensor:
    """Reference decoder: fp32 values of the first ``numel`` elements (``codebook`` as for ``encode``)."""
    if codebook is None:
        codebook = tables(fmt, codes.device)[0]
    indices = unpack(codes, fmt).long()
    levels = codebook[indices].view(-1, fmt.block)
    return (levels * absmax[:, None]).view(-1)[:numel]


def pack(codes: torch.Tensor, fmt: Quantized) -> torch.Tensor:
    """uint8 code per element → storage bytes (4-bit: even element in the low nibble)."""
    if fmt.bits == 8:
        return codes
    pairs = codes.view(-1, 2)
    return (pairs[:, 0] | (pairs[:, 1] << 4)).contiguous()


def unpack(stored: torch.Tensor, fmt: Quantized) -> torch.Tensor:
    if fmt.bits == 8:
        return stored
    return torch.stack([stored & 0xF, stored >> 4], dim=1).view(-1)


def check_quantizable(x: torch.Tensor, fmt: Quantized, name: str = "input") -> None:
    """Raise a ValueError naming the problem when ``x`` cannot be quantized to ``fmt``."""
    if not (x.is_floating_point()):
        raise TypeError(f"{name}: quantize needs a floating-point tensor, got dtype {x.dtype}")
    if x.is_complex() or x.is_sparse:
        raise TypeError(f"{name}: quantize needs a dense real tensor")
    if x.numel() and not bool(torch.isfinite(x).all()):
        bad = int((~torch.isfinite(x)).sum())
        raise ValueError(f"{name}: {bad} non-finite value(s) (NaN/Inf) cannot be quantized to {fmt!r}")
    if not fmt.signed and x.numel() and bool((x < 0).any()):
        raise ValueError(f"{name}: {fmt!r} stores non-negative values, got minimum {float(x.min())}")


def quantize(x: torch.Tensor, fmt: Quantized) -> QTensor:
    """Block-wise quantize ``x`` (any shape, fp32/bf16/fp16) with nearest-code rounding."""
    if not isinstance(fmt, Quantized):
        raise TypeError(f"quantize needs a quantized format such as lbc.Q8(), got {fmt!r}")
    check_quantizable(x, fmt)
    codes, absmax = encode(x, fmt)
    return QTensor(codes, absmax, fmt, x.shape)


def dequantize(q: QTensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return decode(q.codes, q.absmax, q.fmt, q.numel).view(q.shape).to(dtype)


def empty_state(numel: int, fmt: Quantized, device) -> tuple[torch.Tensor, torch.Tensor]:
    """Storage for a zero tensor of ``numel`` elements: the codes of 0 and zero absmax."""
    codes, absmax = encode(torch.zeros(numel, device=device), fmt)
    return codes, absmax


__all__ = [
    "Format", "Plain", "Quantized", "QTensor", "F32", "BF16", "Q8", "Q4", "MIN_QUANT_NUMEL",
    "dynamic_map", "linear_map_without_zero", "linear2_map", "parse_spec", "as_format",
    "encode", "decode", "count_below", "block_scale", "tables", "level_values", "pack", "unpack", "quantize", "dequantize", "check_quantizable", "empty_state",
]

