"""The built-in optimizers (``lbc.optim``) through backend="lowbit": every update region of their step graphs fuses,
and the compiled steps match the eager optimizer."""
from __future__ import annotations

import copy

import pytest
import torch

import lowbit_compile as lbc
import lowbit_compile.backend  # noqa: F401  (registers the backends)
from lowbit_compile.report import clear_compile_reports, compile_reports
from test_backend_numerics import DEVICE

OPTIMIZERS = {
    "Adam": dict(lr=1e-2),
    "AdamW": dict(lr=1e-2, weight_decay=0.1),
    "SGD": dict(lr=0.1, momentum=0.9, nesterov=True),
    "Lion": dict(lr=1e-3, weight_decay=0.1),
    "RMSprop": dict(lr=1e-2, momentum=0.5, centered=True),
    "Adagrad": dict(lr=0.1, lr_decay=0.01),
    "AdEMAMix": dict(lr=1e-2),
}


def _model(seed):
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(64, 80), torch.nn.Tanh(), torch.nn.Linear(80, 3)).to(DEVICE)


@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
def test_builtin_optimizer_fuses_and_matches_eager(name, bits):
    compiled_model = _model(0)
    eager_model = copy.deepcopy(compiled_model)

    def make(model):
        return getattr(lbc.optim, name)(model.parameters(), bits=bits, min_quant_numel=0, **OPTIMIZERS[name])

    compiled_opt, eager_opt = make(compiled_model), make(eager_model)
    torch._dynamo.reset()
    clear_compile_reports()
    step = torch.compile(compiled_opt.step, backend="lowbit")
    for k in range(3):
        data = torch.randn(16, 64, generator=torch.Generator().manual_seed(k)).to(DEVICE)
        for model in (compiled_model, eager_model):
            model.zero_grad()
            model(data).square().mean().backward()
        with torch._inductor.config.patch(fx_graph_cache=False):
            step()
        eager_opt.step()
    reports = compile_reports()
    assert reports and all(not r.unfused for r in reports), "\n".join(map(str, reports))
    assert sum(g.num_tensors for r in reports for g in r.fused) >= 4, "\n".join(map(str, reports))
    # Looser than test_backend_numerics: eager torch.sqrt on the CPU is not correctly rounded (~20% of values are an
    # ulp off; the interpreter's is exact), and centered RMSprop's sqrt(E[g^2] - E[g]^2) amplifies such ulps.
    for p, q in zip(compiled_model.parameters(), eager_model.parameters()):
        torch.testing.assert_close(p.detach(), q.detach(), rtol=1e-4, atol=1e-5, msg=name)
