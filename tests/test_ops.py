"""Anchor ops: eager == reference codecs, registrations pass opcheck, and each op survives torch.compile (inductor
on CPU) as a single node of the post-grad graph."""
import pytest
import torch
from torch._inductor.custom_graph_pass import CustomGraphPass, get_hash_for_files

import lowbit_compile as lbc
from lowbit_compile import formats as F
from lowbit_compile.testing import ALL_QUANTIZED

SHAPE = (3, 300)


def _state(fmt, shape=SHAPE, seed=0):
    x = torch.randn(shape, generator=torch.Generator().manual_seed(seed))
    if not fmt.signed:
        x = x.abs()
    q = lbc.quantize(x, fmt)
    return q.codes.clone(), q.absmax.clone(), x


@pytest.mark.parametrize("fmt", ALL_QUANTIZED, ids=lambda f: f.spec)
def test_eager_ops_equal_reference(fmt):
    codes, absmax, x = _state(fmt)
    out = torch.ops.lowbit.dequant(codes, absmax, fmt.spec, list(SHAPE))
    assert torch.equal(out, lbc.dequantize(F.QTensor(codes, absmax, fmt, torch.Size(SHAPE))))
    new = x * 0.5 + 0.25 if fmt.signed else x * 0.5
    torch.ops.lowbit.requant_(codes, absmax, new, fmt.spec)
    want = lbc.quantize(new, fmt)
    assert torch.equal(codes, want.codes) and torch.equal(absmax, want.absmax)


@pytest.mark.parametrize("fmt", ALL_QUANTIZED, ids=lambda f: f.spec)
def test_opcheck(fmt):
    codes, absmax, x = _state(fmt)
    torch.library.opcheck(torch.ops.lowbit.dequant.default, (codes, absmax, fmt.spec, list(SHAPE)))
    torch.library.opcheck(torch.ops.lowbit.requant_.default, (codes, absmax, x.abs(), fmt.spec))


def test_ops_reject_plain_formats():
    with pytest.raises(ValueError, match="quantized format"):
        torch.ops.lowbit.dequant(torch.zeros(4, dtype=torch.uint8), torch.zeros(1), "F32", [4])


class _RecordGraph(CustomGraphPass):
    """Post-grad hook that keeps the text of the graph inductor is about to lower."""

    def __init__(self):
        self.graphs = []

    def __call__(self, graph):
        self.graphs.append(str(graph))

    def uuid(self):
        return get_hash_for_files((__file__,))


def _momentum_step(codes, absmax, g, p, spec):
    m = torch.ops.lowbit.dequant(codes, absmax, spec, list(p.shape))
    m = 0.9 * m + 0.1 * g
    torch.ops.lowbit.requant_(codes, absmax, m, spec)
    p.sub_(0.01 * m)


@pytest.mark.parametrize("fmt", [lbc.Q8(), lbc.Q4()], ids=lambda f: f.spec)
def test_anchors_survive_inductor_and_match_eager(fmt):
    codes, absmax, _ = _state(fmt)
    g = torch.randn(SHAPE)
    p = torch.randn(SHAPE)
    eager = [t.clone() for t in (codes, absmax, p)]
    _momentum_step(eager[0], eager[1], g, eager[2], fmt.spec)

    recorder = _RecordGraph()
    torch._dynamo.reset()
    compiled = torch.compile(_momentum_step, backend="inductor", fullgraph=True,
                             options={"post_grad_custom_post_pass": recorder})
    compiled(codes, absmax, g, p, fmt.spec)

    assert torch.equal(codes, eager[0]) and torch.equal(absmax, eager[1])
    torch.testing.assert_close(p, eager[2], rtol=1e-6, atol=1e-7)
    (graph,) = recorder.graphs
    assert graph.count("lowbit.dequant.default") == 1
    assert "auto_functionalized" in graph and "lowbit.requant_.default" in graph
