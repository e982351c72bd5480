"""Triton block codecs (lowbit_compile.templates.codecs) against the reference codecs in formats.

Codes and absmax must be bit-identical to formats.encode, decoded values bit-identical to formats.decode. Outputs
are poisoned before every kernel run (codes with a byte that differs from the right one everywhere, scales and
values with NaN), so an element the kernel never wrote fails the comparison. On the CPU the kernels run under
Triton's interpreter; TestOnGPU repeats the comparisons at larger sizes on a CUDA device, adds bf16 exactness,
and checks the encoders on every float32 in [-1, 1].
"""
import os

import pytest
import torch
import triton
import triton.language as tl
from hypothesis import assume, given, strategies as st

from lowbit_compile import formats as F
from lowbit_compile.templates import codecs as C

FORMATS = [F.Q8(True), F.Q8(False), F.Q4(True), F.Q4(False), F.Q4(map="linear2"),
           F.Quantized(4, False, 128, "dynamic")]
FORMAT_IDS = [fmt.spec for fmt in FORMATS]
# Hypothesis tests cannot take the function-scoped `device` fixture.
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
VALUE_KINDS = ["normal", "tiny", "huge", "mixed", "zero_blocks", "negative_extreme", "subnormal", "near_max"]


# --------------------------------------------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------------------------------------------
def make_values(numel: int, fmt: F.Quantized, kind: str, dtype: torch.dtype, seed: int, device) -> torch.Tensor:
    """Finite test values of one kind, non-negative for unsigned formats, representable in ``dtype``."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(numel, generator=gen, dtype=torch.float64)
    if kind == "tiny":
        x *= 1e-30
    elif kind == "huge":
        x *= 1e30
    elif kind == "mixed":  # many decades inside each block
        x *= 10.0 ** (torch.rand(numel, generator=gen, dtype=torch.float64) * 60 - 30)
    elif kind == "zero_blocks":
        blocks = x[: numel - numel % fmt.block].view(-1, fmt.block)
        blocks[torch.rand(blocks.shape[0], generator=gen) < 0.5] = 0.0
        x[(torch.rand(numel, generator=gen) < 0.3)] = 0.0
    elif kind == "negative_extreme":  # the most negative value dominates; some blocks tie exactly
        x = x.abs() * 0.5
        if numel:
            starts = torch.arange(0, numel, fmt.block)
            x[starts] = -1.5
            ties = starts[torch.rand(starts.numel(), generator=gen) < 0.5] + 1
            x[ties[ties < numel]] = 1.5
    elif kind == "subnormal":
        x *= 1e-40
    elif kind == "near_max":
        x *= 1e38
    if not fmt.signed:
        x = x.abs()
    # Up to the float32 maximum: the stretched scale (|min| / 0.8875 for 4-bit dynamic) is clamped to stay finite.
    largest = torch.finfo(dtype).max
    x = x.clamp(-largest, largest)
    return x.to(torch.float32).to(dtype).to(device)


def poisoned_like(reference: torch.Tensor) -> torch.Tensor:
    """A tensor of reference's shape that differs from it in every element."""
    if reference.dtype == torch.uint8:
        shift = torch.randint(1, 256, reference.shape, dtype=torch.int32, device=reference.device)
        return ((reference.int() + shift) % 256).to(torch.uint8)
    return torch.full_like(reference, float("nan"))


def first_mismatch(got: torch.Tensor, want: torch.Tensor) -> str:
    bad = (got != want).nonzero()
    if bad.numel() == 0:
        return "none"
    i = int(bad[0, 0])
    return f"{bad.shape[0]} mismatches, first at {i}: got {got[i].item()!r}, want {want[i].item()!r}"


def check_quantize(x: torch.Tensor, fmt: F.Quantized, **launch) -> tuple[torch.Tensor, torch.Tensor]:
    want_codes, want_absmax = F.encode(x, fmt)
    codes, absmax = poisoned_like(want_codes), poisoned_like(want_absmax)
    C.quantize_into(x, codes, absmax, fmt, **launch)
    assert torch.equal(absmax, want_absmax), f"absmax of {fmt!r}: {first_mismatch(absmax, want_absmax)}"
    assert torch.equal(codes, want_codes), f"codes of {fmt!r}: {first_mismatch(codes, want_codes)}"
    return codes, absmax


def check_dequantize(codes: torch.Tensor, absmax: torch.Tensor, fmt: F.Quantized, numel: int,
                     dtype: torch.dtype, **launch) -> None:
    want = F.decode(codes, absmax, fmt, numel).to(dtype)
    out = poisoned_like(want)
    C.dequantize_into(codes, absmax, fmt, out, **launch)
    assert torch.equal(out, want), f"decoded {fmt!r} as {dtype}: {first_mismatch(out, want)}"


def midpoint_probe_values(fmt: F.Quantized, scale: float) -> torch.Tensor:
    """Every midpoint and its two float32 neighbours (times ``scale``), in blocks that each start with ``scale`` so
    the block scale is exactly ``scale`` (no stretching: every other value is above -scale)."""
    mids = fmt.midpoints
    probes = torch.cat([mids, torch.nextafter(mids, torch.tensor(-2.0)), torch.nextafter(mids, torch.tensor(2.0)),
                        fmt.codebook])
    probes = probes[probes.abs() < 1.0] if fmt.signed else probes[(probes >= 0) & (probes < 1.0)]
    per_block = fmt.block - 1
    pad = (-probes.numel()) % per_block
    probes = torch.cat([probes, torch.zeros(pad)]).view(-1, per_block)
    blocks = torch.cat([torch.ones(probes.shape[0], 1), probes], dim=1)
    return (blocks * scale).reshape(-1)


# --------------------------------------------------------------------------------------------------------------
# CPU (interpreter) tests
# --------------------------------------------------------------------------------------------------------------
@st.composite
def quantize_cases(draw, max_numel=16384):
    fmt = draw(st.sampled_from(FORMATS))
    b = fmt.block
    numel = draw(st.one_of(st.sampled_from([0, 1, b - 1, b, b + 1, 3 * b + 7, 2 * b - 3]),
                           st.integers(0, max_numel)))
    kind = draw(st.sampled_from(VALUE_KINDS))
    dtype = draw(st.sampled_from([torch.float32, torch.bfloat16, torch.float16]))
    layout = draw(st.sampled_from(["flat", "matrix", "transposed"]))
    seed = draw(st.integers(0, 2**31 - 1))
    return fmt, numel, kind, dtype, layout, seed


def shaped(x: torch.Tensor, layout: str) -> torch.Tensor:
    """``x`` as a matrix or a transposed (non-contiguous) view where its size allows; both codecs flatten the
    result in the same (logical) order."""
    numel = x.numel()
    cols = next((c for c in (7, 5, 3, 2) if numel % c == 0 and numel > c), None)
    if layout == "flat" or cols is None:
        return x
    if layout == "matrix":
        return x.view(-1, cols)
    return x.view(cols, -1).t()


@given(quantize_cases())
def test_quantize_matches_reference(case):
    fmt, numel, kind, dtype, layout, seed = case
    # The interpreter converts bf16 subnormals to fp32 wrongly (1.01e-39 -> 4.41e-39); TestOnGPU covers them.
    assume(not (INTERPRETED and dtype == torch.bfloat16 and kind == "subnormal"))
    x = shaped(make_values(numel, fmt, kind, dtype, seed, DEVICE), layout)
    check_quantize(x, fmt)


@given(quantize_cases(max_numel=8192), st.sampled_from([torch.float32, torch.float16]))
def test_dequantize_matches_reference(case, out_dtype):
    fmt, numel, kind, dtype, _, seed = case
    x = make_values(numel, fmt, kind, dtype, seed, DEVICE)
    codes, absmax = F.encode(x, fmt)
    check_dequantize(codes, absmax, fmt, numel, out_dtype)


@pytest.mark.parametrize("fmt", FORMATS, ids=FORMAT_IDS)
@pytest.mark.parametrize("scale", [1.0, 2.0**-20, 2.0**40, 0.37])
def test_midpoints_and_neighbours(fmt, scale, device):
    """Values exactly on every midpoint (ties go to the lower code) and one float32 step either side."""
    x = midpoint_probe_values(fmt, scale).to(device)
    codes, absmax = check_quantize(x, fmt)
    check_dequantize(codes, absmax, fmt, x.numel(), torch.float32)


@pytest.mark.parametrize("fmt", FORMATS, ids=FORMAT_IDS)
def test_encode_building_block_on_midpoints(fmt, device):
    """The jit ``encode`` (through ``encode_normalized``) on normalised values: searchsorted on the midpoints."""
    mids = fmt.midpoints
    low = -1.0 if fmt.signed else 0.0
    y = torch.cat([mids, torch.nextafter(mids, torch.tensor(-2.0)), torch.nextafter(mids, torch.tensor(2.0)),
                   fmt.codebook, torch.tensor([low, 1.0, 0.0, -0.0, 1e-45, -1e-45, 1e-30, -1e-30])])
    y = y[(y >= low) & (y <= 1.0)].contiguous().to(device)
    want = torch.searchsorted(fmt.midpoints.to(device), y).to(torch.uint8)
    got = C.encode_normalized(y, fmt)
    assert torch.equal(got, want), first_mismatch(got, want)


@pytest.mark.parametrize("fmt", [F.Q8(True), F.Q4(False)], ids=["Q8s", "Q4u"])
@pytest.mark.parametrize("elements_per_program,num_warps", [(256, 1), (1024, 4), (8192, 8)])
def test_launch_configurations(fmt, elements_per_program, num_warps, device):
    x = make_values(5 * 1024 + 13, fmt, "mixed", torch.float32, 7, device)
    codes, absmax = check_quantize(x, fmt, elements_per_program=elements_per_program, num_warps=num_warps)
    check_dequantize(codes, absmax, fmt, x.numel(), torch.float32, elements_per_program=elements_per_program,
                     num_warps=num_warps)


def test_quantize_and_dequantize_round_trip_api(device):
    x = torch.randn(33, 65, device=device).t()
    q = C.quantize(x, F.Q4())
    assert q.shape == x.shape and q.fmt == F.Q4()
    assert torch.equal(q.codes, F.quantize(x, F.Q4()).codes)
    out = C.dequantize(q, torch.float16)
    assert out.shape == x.shape and out.dtype == torch.float16
    assert torch.equal(out, F.dequantize(q, torch.float16))
    empty = C.quantize(torch.empty(0, 3, device=device), "Q8:dynamic:s:256")
    assert empty.codes.numel() == 0 and empty.absmax.numel() == 0
    assert C.dequantize(empty).shape == (0, 3)


def test_codec_constants_and_tables(device):
    constants = C.codec_constants(F.Q8(False))
    assert constants == {"BLOCK": 256, "BITS": 8, "MAP": C.MAP_DYNAMIC, "SIGNED": False, "LOWEST": 0.0}
    assert C.codec_constants(F.Q4(False))["MAP"] == C.MAP_LINEAR
    assert C.codec_constants(F.Q4(map="linear2"))["MAP"] == C.MAP_LINEAR2
    assert C.codec_constants(F.Q8())["LOWEST"] == float(F.Q8().codebook[0])
    codebook, lower = C.codec_tables(F.Q8(), device)
    again = C.codec_tables("Q8:dynamic:s:256", device)
    assert codebook is again[0] and lower is again[1]
    assert torch.equal(codebook.cpu(), F.Q8().codebook)
    assert lower[0] == float("-inf") and torch.equal(lower[1:].cpu(), F.Q8().midpoints)


def test_bad_input_names_the_parameter(device):
    fmt = F.Q8()
    x = torch.randn(300, device=device)
    codes, absmax = F.encode(x, fmt)
    with pytest.raises(TypeError, match="x"):
        C.quantize(torch.arange(10, device=device), fmt)
    with pytest.raises(ValueError, match="x: 1 non-finite"):
        C.quantize(torch.tensor([1.0, float("nan")], device=device), fmt)
    with pytest.raises(ValueError, match="x: .*non-negative"):
        C.quantize(-x.abs(), F.Q8(False))
    with pytest.raises(TypeError, match="fmt"):
        C.quantize(x, F.F32())
    with pytest.raises(ValueError, match="codes"):
        C.quantize_into(x, codes[:-1], absmax, fmt)
    with pytest.raises(ValueError, match="absmax"):
        C.quantize_into(x, codes, absmax.double(), fmt)
    with pytest.raises(TypeError, match="x"):
        C.quantize_into(x.double(), codes, absmax, fmt)
    with pytest.raises(ValueError, match="out"):
        C.dequantize_into(codes, absmax, fmt, torch.empty(2, 300, device=device).t())
    with pytest.raises(ValueError, match="elements_per_program"):
        C.quantize_into(x, codes, absmax, fmt, elements_per_program=3 * 256)


# --------------------------------------------------------------------------------------------------------------
# GPU
# --------------------------------------------------------------------------------------------------------------
@triton.jit
def _divide_rows_kernel(x_ptr, scale_ptr, y_ptr, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    offsets = row * BLOCK + tl.arange(0, BLOCK)[None, :]
    scale = tl.load(scale_ptr + row + tl.arange(0, 1))
    tl.store(y_ptr + offsets, C._divide_rows(tl.load(x_ptr + offsets), scale))


@pytest.mark.cuda
class TestOnGPU:
    @given(quantize_cases(max_numel=1 << 20))
    def test_quantize_matches_reference(self, case):
        fmt, numel, kind, dtype, layout, seed = case
        check_quantize(shaped(make_values(numel, fmt, kind, dtype, seed, "cuda"), layout), fmt)

    @given(quantize_cases(max_numel=1 << 20), st.sampled_from([torch.float32, torch.bfloat16, torch.float16]))
    def test_dequantize_matches_reference(self, case, out_dtype):
        fmt, numel, kind, dtype, _, seed = case
        x = make_values(numel, fmt, kind, dtype, seed, "cuda")
        codes, absmax = F.encode(x, fmt)
        check_dequantize(codes, absmax, fmt, numel, out_dtype)

    @pytest.mark.parametrize("fmt", FORMATS, ids=FORMAT_IDS)
    def test_large_bf16_and_fp16_inputs(self, fmt):
        for dtype in (torch.bfloat16, torch.float16):
            x = make_values(4_000_037, fmt, "mixed" if dtype == torch.bfloat16 else "normal", dtype, 11, "cuda")
            codes, absmax = check_quantize(x, fmt)
            check_dequantize(codes, absmax, fmt, x.numel(), torch.bfloat16)

    @pytest.mark.parametrize("fmt", FORMATS, ids=FORMAT_IDS)
    @pytest.mark.parametrize("scale", [1.0, 2.0**-120, 2.0**100, 0.37, 3e38])
    def test_midpoints_and_neighbours(self, fmt, scale):
        check_quantize(midpoint_probe_values(fmt, scale).cuda(), fmt)

    def test_row_division_is_ieee(self):
        """The reciprocal-and-remainder division equals torch's (IEEE) division bit for bit, scales from
        subnormal to near the float32 maximum, quotients in [-1, 1]."""
        gen = torch.Generator(device="cuda").manual_seed(3)
        rows, width = 1 << 14, 1024
        exponents = torch.randint(-149, 128, (rows,), generator=gen, device="cuda").double()
        scale = (torch.rand(rows, generator=gen, device="cuda", dtype=torch.float64) + 1) * 2.0**exponents
        scale = scale.clamp(max=torch.finfo(torch.float32).max).float().clamp(min=1e-45)
        ratio = torch.rand(rows, width, generator=gen, device="cuda") * 2 - 1
        ratio *= 10.0 ** -(torch.rand(rows, width, generator=gen, device="cuda") * 8)
        x = (ratio * scale[:, None]).clamp(-scale[:, None], scale[:, None])
        y = torch.empty_like(x)
        _divide_rows_kernel[(rows,)](x, scale, y, BLOCK=width)
        want = x / scale[:, None]
        # Below 2**-60 only the sign can matter (every midpoint is above 1e-7 in magnitude).
        tiny = want.abs() < 2.0**-60
        assert torch.equal(y[~tiny], want[~tiny]), first_mismatch(y[~tiny], want[~tiny])
        assert bool(((y[tiny].sign() * want[tiny].sign()) >= 0).all() and (y[tiny].abs() < 2.0**-50).all())

    @pytest.mark.parametrize("fmt", FORMATS, ids=FORMAT_IDS)
    def test_encoder_on_every_float32_in_unit_interval(self, fmt):
        """Every float32 in [-1, 1] (2 * 0x3F800001 bit patterns, both zeros): code == searchsorted(midpoints, y)."""
        midpoints = fmt.midpoints.to("cuda")
        one = 0x3F800000  # bit pattern of 1.0
        chunk = 1 << 27
        for sign in (0, -(2**31)):
            for start in range(0, one + 1, chunk):
                bits = torch.arange(start, min(start + chunk, one + 1), dtype=torch.int32, device="cuda")
                y = (bits + sign).view(torch.float32) if sign else bits.view(torch.float32)
                got = C.encode_normalized(y, fmt)
                want = torch.searchsorted(midpoints, y).to(torch.uint8)
                where = f"{fmt!r} from bit pattern {start + sign:#x}"
                assert torch.equal(got, want), f"{where}: {first_mismatch(got, want)}"
