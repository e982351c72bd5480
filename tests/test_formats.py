"""Formats and the pure-torch reference codecs: codebooks, layout, and the properties every codec must keep."""
import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import lowbit_compile as lbc
from lowbit_compile import formats as F
from lowbit_compile.testing import ALL_QUANTIZED, formats, sizes, tensors


# ------------------------------------------------------------------------------------------------ codebooks
def test_q8_maps_match_bitsandbytes_layout():
    signed, unsigned = lbc.Q8().codebook, lbc.Q8(signed=False).codebook
    assert signed.shape == unsigned.shape == (256,)
    assert (signed[1:] > signed[:-1]).all() and (unsigned[1:] > unsigned[:-1]).all()
    # 127 negatives, the zero at index 127, 128 positives ending in 1.0; the most negative level is -0.99296875.
    assert signed[127] == 0 and (signed[:127] < 0).all() and (signed[128:] > 0).all()
    assert signed[0].item() == pytest.approx(-0.99296875, abs=1e-7) and signed[-1] == 1.0
    assert signed[128].item() == pytest.approx(5.5e-7, rel=1e-5)
    assert unsigned[0] == 0 and unsigned[-1] == 1.0
    assert unsigned[1].item() == pytest.approx(3.25e-7, rel=1e-5)


def test_q4_maps():
    dynamic = [-0.8875, -0.6625, -0.4375, -0.2125, -0.0775, -0.0325, -0.0055, 0, 0.0055, 0.0325, 0.0775, 0.2125,
               0.4375, 0.6625, 0.8875, 1.0]
    torch.testing.assert_close(lbc.Q4().codebook, torch.tensor(dynamic), rtol=0, atol=1e-7)
    linear = lbc.Q4(signed=False).codebook
    torch.testing.assert_close(linear, torch.arange(1, 17) / 16.0, rtol=0, atol=0)
    assert (linear > 0).all(), "the unsigned 4-bit map must have no zero level"
    linear2 = [-1.0, -0.7511, -0.5378, -0.36, -0.2178, -0.1111, -0.04, 0.0, 0.0044, 0.04, 0.1111, 0.2178, 0.36,
               0.5378, 0.7511, 1.0]
    torch.testing.assert_close(lbc.Q4(map="linear2").codebook, torch.tensor(linear2), rtol=0, atol=1e-4)


@pytest.mark.parametrize("fmt", ALL_QUANTIZED, ids=lambda f: f.spec)
def test_midpoints_sit_between_levels(fmt):
    levels, mid = fmt.codebook, fmt.midpoints
    assert mid.shape[0] == levels.shape[0] - 1
    assert (levels[:-1] < mid).all() and (mid < levels[1:]).all()


# ------------------------------------------------------------------------------------------------ layout and specs
def test_bytes_and_layout():
    assert lbc.Q8().bytes_per_element() == pytest.approx(1 + 4 / 256)
    assert lbc.Q4().bytes_per_element() == pytest.approx(0.5 + 4 / 128)
    assert lbc.Q4(map="linear2").block == 64
    q4 = lbc.Q4()
    assert q4.num_blocks(129) == 2 and q4.num_code_bytes(129) == 128
    assert q4.state_bytes(8192) == 8192 // 2 + 4 * 64
    assert lbc.F32().state_bytes(10) == 40 and lbc.BF16().state_bytes(10) == 20
    assert not lbc.Q8().stores_quantized(4095) and lbc.Q8().stores_quantized(4096)
    assert lbc.Q8(min_quant_numel=0).stores_quantized(1)
    assert lbc.Q8().state_bytes(100) == 400, "tensors under min_quant_numel keep fp32 state"


@pytest.mark.parametrize("fmt", ALL_QUANTIZED + (lbc.F32(), lbc.BF16()), ids=lambda f: f.spec)
def test_spec_round_trip(fmt):
    assert lbc.parse_spec(fmt.spec) == fmt
    assert lbc.as_format(fmt.spec) == fmt and lbc.as_format(fmt) is fmt


def test_as_format_accepts_constructors_and_rejects_junk():
    assert lbc.as_format(lbc.Q8) == lbc.Q8() and lbc.as_format(lbc.F32) == lbc.F32()
    with pytest.raises(TypeError, match="storage format"):
        lbc.as_format(3)
    with pytest.raises(ValueError, match="not a format spec"):
        lbc.parse_spec("Q8:dynamic:x")


@pytest.mark.parametrize("kwargs, match", [
    (dict(bits=4, signed=True, block=128, map="linear"), "unsigned"),
    (dict(bits=4, signed=False, block=64, map="linear2"), "signed"),
    (dict(bits=8, signed=True, block=100, map="dynamic"), "power of two"),
    (dict(bits=8, signed=True, block=256, map="linear2"), "codebook"),
])
def test_invalid_formats_raise(kwargs, match):
    with pytest.raises(ValueError, match=match):
        F.Quantized(**kwargs)


# ------------------------------------------------------------------------------------------------ codec properties
def _scales_per_element(q: F.QTensor) -> torch.Tensor:
    return q.absmax.repeat_interleave(q.fmt.block)[: q.numel]


@given(data=st.data(), fmt=formats())
def test_round_trip_error_is_bounded(data, fmt):
    x = data.draw(tensors(data.draw(sizes(fmt)), signed=fmt.signed))
    q = lbc.quantize(x, fmt)
    assert q.codes.dtype == torch.uint8 and q.codes.numel() == fmt.num_code_bytes(x.numel())
    assert q.absmax.dtype == torch.float32 and q.absmax.numel() == fmt.num_blocks(x.numel())
    y = lbc.dequantize(q)
    assert y.shape == x.shape and y.dtype == torch.float32
    err = (y.double() - x.double()).abs()
    bound = fmt.max_roundtrip_error * _scales_per_element(q).double() * (1 + 1e-6)
    assert (err <= bound + 1e-45).all(), float((err - bound).max())


@given(data=st.data(), fmt=formats())
def test_requantizing_is_idempotent_on_codes(data, fmt):
    x = data.draw(tensors(data.draw(sizes(fmt)), signed=fmt.signed))
    q = lbc.quantize(x, fmt)
    again = lbc.quantize(lbc.dequantize(q), fmt)
    assert torch.equal(again.codes, q.codes)
    torch.testing.assert_close(again.absmax, q.absmax, rtol=2e-7, atol=0)


@given(data=st.data(), fmt=formats())
def test_zeros_and_signs_are_preserved(data, fmt):
    x = data.draw(tensors(data.draw(sizes(fmt)), signed=fmt.signed))
    q = lbc.quantize(x, fmt)
    y = lbc.dequantize(q)
    assert not ((y.sign() * x.sign()) < 0).any(), "a sign flipped"
    scale = _scales_per_element(q)
    assert (y[scale == 0] == 0).all(), "an all-zero block must decode to exact zeros"
    if (fmt.codebook == 0).any():
        assert (y[x == 0] == 0).all()
    else:  # the no-zero map: every element of a non-zero block decodes strictly positive
        assert (y[scale > 0] > 0).all()


@given(data=st.data(), fmt=formats(), dtype=st.sampled_from([torch.bfloat16, torch.float16]))
def test_low_precision_input_equals_its_fp32_upcast(data, fmt, dtype):
    x = data.draw(tensors(data.draw(sizes(fmt)), signed=fmt.signed, dtype=dtype))
    a, b = lbc.quantize(x, fmt), lbc.quantize(x.float(), fmt)
    assert torch.equal(a.codes, b.codes) and torch.equal(a.absmax, b.absmax)


@pytest.mark.parametrize("fmt", ALL_QUANTIZED, ids=lambda f: f.spec)
def test_each_level_encodes_to_itself(fmt):
    """A block holding every level (scaled by a power of two, so scaling is exact) round-trips exactly."""
    levels = fmt.codebook
    x = torch.cat([levels, torch.zeros(fmt.block - levels.numel() % fmt.block)]) * 2.0**-10
    if not fmt.signed:
        x = x.clamp_min(0)
    q = lbc.quantize(x, fmt)
    assert torch.equal(lbc.dequantize(q)[: levels.numel()], (levels * 2.0**-10).clamp_min(0 if not fmt.signed
                                                                                             else -math.inf))


def test_negative_extreme_lands_on_the_lowest_level():
    x = torch.tensor([-2.0, 1.0, 0.5] + [0.0] * 253)
    q = lbc.quantize(x, lbc.Q8())
    assert q.absmax.item() == pytest.approx(2.0 / 0.99296875)
    assert lbc.dequantize(q)[0].item() == pytest.approx(-2.0, rel=1e-7)


def test_empty_and_shapes():
    q = lbc.quantize(torch.zeros(0, 3), lbc.Q4())
    assert q.codes.numel() == 0 and q.absmax.numel() == 0
    assert lbc.dequantize(q).shape == (0, 3)
    x = torch.randn(3, 5, 7)
    assert lbc.dequantize(lbc.quantize(x, lbc.Q4(map="linear2"))).shape == (3, 5, 7)


def test_ties_go_to_the_lower_code():
    fmt = lbc.Q4(signed=False)
    mid = fmt.midpoints[3]
    codes, _ = F.encode(torch.tensor([mid, 1.0]), fmt)
    assert (F.unpack(codes, fmt)[:2] == torch.tensor([3, 15], dtype=torch.uint8)).all()


# ------------------------------------------------------------------------------------------------ bad input
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_non_finite_input_raises(bad):
    x = torch.ones(300)
    x[17] = bad
    with pytest.raises(ValueError, match="non-finite"):
        lbc.quantize(x, lbc.Q8())


def test_bad_inputs_raise_clear_errors():
    with pytest.raises(ValueError, match="non-negative"):
        lbc.quantize(-torch.ones(4), lbc.Q8(signed=False))
    with pytest.raises(TypeError, match="floating-point"):
        lbc.quantize(torch.ones(4, dtype=torch.int32), lbc.Q8())
    with pytest.raises(TypeError, match="quantized format"):
        lbc.quantize(torch.ones(4), lbc.F32())


@pytest.mark.parametrize("fmt", [lbc.Q8(), lbc.Q4()], ids=lambda f: f.spec)
def test_negative_extreme_near_float32_max_stays_finite(fmt):
    big = torch.finfo(torch.float32).max
    x = torch.tensor([-big, big * 0.5, 1.0, 0.0])
    y = lbc.dequantize(lbc.quantize(x, fmt))
    assert torch.isfinite(y).all() and y[0] < 0 and y[1] > 0


@given(data=st.data(), fmt=formats())
def test_count_below_equals_searchsorted(data, fmt):
    """The reference encoder's branchless search against torch's own, at random values, every midpoint and their
    float32 neighbours."""
    mid = fmt.midpoints
    y = torch.cat([data.draw(tensors(64, signed=fmt.signed)).clamp(-1, 1), mid, torch.nextafter(mid, mid + 1),
                   torch.nextafter(mid, mid - 1), torch.tensor([-1.0, 0.0, 1.0])])
    assert torch.equal(F.count_below(y, mid, fmt.bits), torch.searchsorted(mid, y))
