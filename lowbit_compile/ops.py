"""Anchor ops (namespace ``lowbit``): the quantization boundaries of an optimizer step.

They are opaque ``torch.library`` custom ops so that Dynamo, AOTAutograd and functionalization keep each one as a
single node: the compiler pass finds the regions between ``dequant`` and ``requant_`` reliably, whatever the
arithmetic between them decomposes into. Their eager implementations are the pure-torch reference codecs, so an
uncompiled step and any region the pass leaves unfused are still exactly right.
"""
from __future__ import annotations

import math

import torch

from .formats import Quantized, decode, encode, level_values, parse_spec


def _quantized(spec: str) -> Quantized:
    fmt = parse_spec(spec)
    if not isinstance(fmt, Quantized):
        raise ValueError(f"lowbit anchor ops take a quantized format, got {spec!r}")
    return fmt


@torch.library.custom_op("lowbit::dequant", mutates_args=())
def dequant(codes: torch.Tensor, absmax: torch.Tensor, fmt: str, shape: list[int]) -> torch.Tensor:
    """fp32 values of a block-quantized tensor of ``shape`` stored as ``codes``/``absmax`` in format ``fmt``."""
    return decode(codes, absmax, _quantized(fmt), math.prod(shape)).view(shape).clone()


@dequant.register_fake
def _(codes, absmax, fmt, shape):
    return codes.new_empty(shape, dtype=torch.float32)


@torch.library.custom_op("lowbit::requant_", mutates_args=("codes", "absmax"))
def requant_(codes: torch.Tensor, absmax: torch.Tensor, x: torch.Tensor, fmt: str) -> None:
    """Quantize ``x`` into ``codes``/``absmax`` in place (new block scales, nearest codes)."""
    new_codes, new_absmax = encode(x, _quantized(fmt))
    codes.copy_(new_codes)
    absmax.copy_(new_absmax)


@requant_.register_fake
def _(codes, absmax, x, fmt):
    return None


def dequant_as_aten(codes, absmax, fmt, shape):
    """``dequant`` written in traceable ATen (the codebook becomes a graph constant): the decomposition inductor
    fuses into its own C++ kernels on the CPU."""
    spec = _quantized(fmt)
    codebook = absmax.new_tensor(level_values(spec)[0])
    return decode(codes, absmax, spec, math.prod(shape), codebook).view(shape)


def requant_as_aten(codes, absmax, x, fmt):
    """``requant_`` written in traceable ATen; see ``dequant_as_aten``."""
    spec = _quantized(fmt)
    new_codes, new_absmax = encode(x, spec, x.new_tensor(level_values(spec)[1], dtype=torch.float32))
    codes.copy_(new_codes)
    absmax.copy_(new_absmax)


ATEN_DECOMPOSITIONS = {torch.ops.lowbit.dequant.default: dequant_as_aten,
                       torch.ops.lowbit.requant_.default: requant_as_aten}

__all__ = ["dequant", "requant_", "ATEN_DECOMPOSITIONS"]
