"""The Shampoo Triton templates against dequantize-then-matmul in float64 (interpreter on the CPU, compiled on CUDA)."""
import pytest
import torch
from hypothesis import given, settings, strategies as st

from lowbit_compile.formats import Q4, decode, encode
from lowbit_compile.templates.shampoo import (QuantizedRows, batch_table, batched_matmul, bjorck_step,
                                              padded_row_length, pointer_table)

FMT = Q4(map="linear2")
# Hypothesis tests cannot take the function-scoped `device` fixture.
DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
ORDERS = st.sampled_from([1, 2, 7, 63, 64, 65, 100, 129])


def quantized_rows(matrices: torch.Tensor) -> tuple[QuantizedRows, torch.Tensor]:
    """Rows of ``matrices`` (batch, rows, cols) quantized with the reference codec, and their decoded values."""
    count, rows, cols = matrices.shape
    padded = padded_row_length(cols, FMT)
    full = torch.zeros(count, rows, padded, dtype=torch.float32, device=matrices.device)
    full[..., :cols] = matrices
    codes, absmax = encode(full, FMT)
    decoded = decode(codes, absmax, FMT, full.numel()).view(count, rows, padded)[..., :cols]
    return QuantizedRows(codes.view(count, rows, padded // 2), absmax.view(count, rows, padded // FMT.block), FMT,
                         cols), decoded


def relative_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    assert torch.isfinite(out).all(), "output holds NaN/Inf (an element was not written?)"
    return float((out.double() - ref).norm() / ref.norm().clamp_min(1e-30))


def tolerance(device) -> float:
    # fp32 products on the CPU; TF32 (10-bit mantissa) on CUDA.
    return 2e-5 if device.type == "cpu" else 3e-3


@settings(deadline=None, max_examples=25)  # on CUDA every new order compiles a kernel (K is a constexpr)
@given(order=ORDERS, cols=st.integers(1, 150), count=st.integers(1, 3), quantized=st.booleans(),
       transposed=st.booleans(), with_diag=st.booleans(), with_add=st.booleans(), scale_exp=st.integers(-20, 20),
       seed=st.integers(0, 2**31 - 1))
def test_batched_matmul_matches_dequantize_then_matmul(order, cols, count, quantized, transposed, with_diag,
                                                       with_add, scale_exp, seed):
    device = DEVICE
    gen = torch.Generator().manual_seed(seed)
    stored = (torch.randn(count, order, order, generator=gen) * 2.0**scale_exp).to(device)
    rhs = torch.randn(count, order, cols, generator=gen).to(device)
    if quantized:
        lhs, values = quantized_rows(stored)
    else:
        lhs, values = stored, stored
    logical = values.mT if transposed else values
    diag = torch.randn(count, order, generator=gen).to(device) if with_diag else None
    addend = torch.randn(count, order, cols, generator=gen).to(device) if with_add else None
    out = torch.full((count, order, cols), float("nan"), device=device)
    alpha, beta = 0.75, -1.25
    batched_matmul(lhs, batch_table(rhs), batch_table(out), order, cols, order, lhs_transposed=transposed, diag=diag,
                   add_table=None if addend is None else batch_table(addend), alpha=alpha, beta=beta,
                   precision="ieee" if device.type == "cpu" else "tf32")
    ref = logical.double() @ rhs.double()
    if diag is not None:
        ref = ref + diag.double()[..., None] * rhs.double()
    ref = alpha * ref
    if addend is not None:
        ref = ref + beta * addend.double()
    assert relative_error(out, ref) <= tolerance(device)


@settings(deadline=None, max_examples=10)
@given(rows=st.integers(1, 130), cols=st.integers(1, 130), seed=st.integers(0, 2**31 - 1),
       dtype=st.sampled_from([torch.float32, torch.bfloat16]))
def test_pointer_tables_read_and_write_strided_blocks(rows, cols, seed, dtype):
    """Blocks of a wider matrix in, transposed blocks of another matrix out, a subset of the left operands selected by
    index: the per-step preconditioning layout."""
    device = DEVICE
    gen = torch.Generator().manual_seed(seed)
    order = rows
    stored = torch.randn(3, order, order, generator=gen).to(device)
    lhs, values = quantized_rows(stored)
    grad = torch.randn(rows, 2 * cols, generator=gen).to(device=device, dtype=dtype)
    out = torch.full((2 * cols, rows), float("nan"), device=device, dtype=dtype)
    blocks_in = [grad[:, :cols], grad[:, cols:]]
    blocks_out = [out[:cols, :].mT, out[cols:, :].mT]
    index = torch.tensor([2, 0], dtype=torch.int32, device=device)
    batched_matmul(lhs, pointer_table(blocks_in, device), pointer_table(blocks_out, device), order, cols, order,
                   lhs_index=index, precision="ieee" if device.type == "cpu" else "tf32", rhs_dtype=dtype,
                   out_dtype=dtype)
    for b, which in enumerate((2, 0)):
        ref = values[which].double() @ blocks_in[b].double()
        bound = tolerance(device) if dtype == torch.float32 else 1e-2
        assert relative_error(blocks_out[b].float(), ref) <= bound


def test_sanitize_replaces_non_finite_results(device):
    """A non-finite input spreads along its column through the product (0 * inf is NaN): those outputs become 0,
    the others keep their exact value."""
    lhs = torch.tensor([[2.0, 0.0, 0.0], [0.0, 3.0, 0.0], [1.0, 1.0, 1.0]], device=device)[None]
    rhs = torch.tensor([[1.0, float("nan"), 5.0], [4.0, 2.0, 6.0], [-1.0, 1.0, float("inf")]], device=device)
    out = torch.full((1, 3, 3), 7.0, device=device)
    batched_matmul(lhs, batch_table(rhs[None]), batch_table(out), 3, 3, 3, sanitize=True, precision="ieee")
    expected = torch.tensor([[2.0, 0.0, 0.0], [12.0, 0.0, 0.0], [4.0, 0.0, 0.0]], device=device)
    assert torch.equal(out[0], expected)


@settings(deadline=None, max_examples=10)
@given(order=st.sampled_from([1, 5, 64, 65, 100]), count=st.integers(1, 3), noise=st.floats(0.0, 0.2),
       seed=st.integers(0, 2**31 - 1))
def test_bjorck_step_matches_formula(order, count, noise, seed):
    device = DEVICE
    gen = torch.Generator().manual_seed(seed)
    v = torch.linalg.qr(torch.randn(count, order, order, generator=gen, dtype=torch.float64))[0]
    v = (v + noise * torch.randn(v.shape, generator=gen, dtype=torch.float64) / order**0.5).float().to(device)
    out = bjorck_step(v, "ieee")
    vd = v.double()
    ref = 1.5 * vd - 0.5 * (vd @ vd.mT) @ vd
    assert relative_error(out, ref) <= tolerance(device)


def test_batched_matmul_rejects_bad_arguments(device):
    lhs = torch.zeros(1, 4, 4, device=device)
    table = batch_table(torch.zeros(1, 4, 4, device=device))
    with pytest.raises(ValueError, match="precision"):
        batched_matmul(lhs, table, table, 4, 4, 4, precision="fp16")
    with pytest.raises(ValueError, match="lhs"):
        batched_matmul(lhs, table, table, 4, 4, 5)
    with pytest.raises(ValueError, match="diag"):
        batched_matmul(torch.zeros(1, 4, 5, device=device), table, table, 4, 4, 5,
                       diag=torch.zeros(1, 4, device=device))
    with pytest.raises(ValueError, match="out_table"):
        batched_matmul(lhs, table, table[:, :2], 4, 4, 4)
    with pytest.raises(ValueError, match="v"):
        bjorck_step(torch.zeros(2, 3, 4, device=device))
    with pytest.raises(ValueError, match="codes/absmax"):
        QuantizedRows(torch.zeros(1, 4, 3, dtype=torch.uint8), torch.zeros(1, 4, 1), FMT, 4)


@pytest.mark.cuda
def test_fused_matmul_on_benchmark_shape():
    """A 1024-order block batch (the benchmark's shape) against cuBLAS on the decoded operand."""
    device = torch.device("cuda")
    gen = torch.Generator(device=device).manual_seed(0)
    stored = torch.randn(4, 1024, 1024, device=device, generator=gen) / 32
    lhs, values = quantized_rows(stored)
    rhs = torch.randn(4, 1024, 1024, device=device, generator=gen)
    for transposed in (False, True):
        out = torch.full_like(rhs, float("nan"))
        batched_matmul(lhs, batch_table(rhs), batch_table(out), 1024, 1024, 1024, lhs_transposed=transposed,
                       diag=torch.ones(4, 1024, device=device))
        logical = values.mT if transposed else values
        ref = logical.double() @ rhs.double() + rhs.double()
        assert relative_error(out, ref) <= 3e-3
