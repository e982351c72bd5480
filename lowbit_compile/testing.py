"""Hypothesis strategies shared by our tests and usable on your own rules and formats.

Arrays are drawn as (values, scale) pairs so one block can mix magnitudes from 1e-30 to 1e30, hold exact zeros and
runs of equal values: the cases where block-wise codecs break.
"""
from __future__ import annotations

import torch
from hypothesis import strategies as st

from .formats import Q4, Q8, Quantized

ALL_QUANTIZED = (Q8(), Q8(signed=False), Q4(), Q4(signed=False), Q4(map="linear2"))


def formats() -> st.SearchStrategy[Quantized]:
    return st.sampled_from(ALL_QUANTIZED)


def sizes(fmt: Quantized, max_blocks: int = 8) -> st.SearchStrategy[int]:
    """Empty, one element, around a block boundary, odd, and several blocks with a tail."""
    b = fmt.block
    return st.one_of(
        st.sampled_from([0, 1, 2, b - 1, b, b + 1, 2 * b - 1, 3]),
        st.integers(min_value=1, max_value=max_blocks * b),
    )


MAGNITUDES = (1e-30, 1e-12, 1e-6, 1e-3, 1.0, 1e3, 1e12, 1e30)


@st.composite
def tensors(draw, numel: int, signed: bool = True, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """A flat tensor of ``numel`` finite values in ``dtype``: normal noise times one or several magnitudes (mixed
    inside a block), with random exact zeros and repeated values."""
    seed = draw(st.integers(0, 2**31 - 1))
    gen = torch.Generator().manual_seed(seed)
    kind = draw(st.sampled_from(["one_scale", "mixed_scales", "sparse", "constant", "zeros"]))
    values = torch.randn(numel, generator=gen, dtype=torch.float64)
    if kind == "one_scale":
        values *= draw(st.sampled_from(MAGNITUDES))
    elif kind == "mixed_scales":
        mags = torch.tensor(MAGNITUDES, dtype=torch.float64)
        values *= mags[torch.randint(len(MAGNITUDES), (numel,), generator=gen)]
    elif kind == "sparse":
        values *= torch.rand(numel, generator=gen, dtype=torch.float64) < 0.1
    elif kind == "constant":
        values = torch.full((numel,), draw(st.sampled_from(MAGNITUDES)), dtype=torch.float64)
        if signed and draw(st.booleans()):
            values = -values
    else:
        values = torch.zeros(numel, dtype=torch.float64)
    if not signed:
        values = values.abs()
    limit = torch.finfo(dtype).max / 2
    return values.clamp(-limit, limit).to(dtype)



def synchronises(step) -> str | None:
    """The error torch raises if ``step()`` synchronises the host with the GPU (sync-debug mode "error"), else None:
    a compiled optimizer step should enqueue its work and return."""
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        step()
    except RuntimeError as error:
        return str(error)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    return None


__all__ = ["synchronises", "ALL_QUANTIZED", "MAGNITUDES", "formats", "sizes", "tensors"]
