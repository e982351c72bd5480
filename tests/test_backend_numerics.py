"""Compiled (backend="lowbit" / "lowbit_aot_eager") == eager reference for optimizer steps written exactly as the
step-graph contract says, over random shapes, formats, dtypes, hyperparameters and 1-5 steps.

The eager reference is the same step function run uncompiled: the anchors' pure-torch codecs around plain torch math.
Every compiled run also asserts the pass fused what it should (a test that passes because nothing was fused would
prove nothing: the unfused graph is correct by construction).

The helpers here (``Problem``, ``contract_step``, the rules) are imported by the other backend/pass tests.
"""
from __future__ import annotations

import copy
import dataclasses

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import lowbit_compile.backend  # noqa: F401  (registers the backends)
from lowbit_compile import formats as F
from lowbit_compile.report import clear_compile_reports, compile_report, compile_reports


# --------------------------------------------------------------------------------------------------------------
# Rules: plain functional Python over fp32 tensors, as users write them
# --------------------------------------------------------------------------------------------------------------
def adamw(p, g, m, v, *, lr, beta1, beta2, eps, weight_decay, step):
    m = beta1 * m + (1 - beta1) * g
    v = beta2 * v + (1 - beta2) * g * g
    m_hat = m / (1 - beta1 ** step)
    v_hat = v / (1 - beta2 ** step)
    p = p * (1 - lr * weight_decay) - lr * m_hat / (v_hat.sqrt() + eps)
    return p, m, v


def sgd_nesterov(p, g, buf, *, lr, momentum, dampening, weight_decay, step):
    g = g + weight_decay * p
    buf = momentum * buf + (1 - dampening) * g
    p = p - lr * (g + momentum * buf)
    return p, buf


def lion(p, g, m, *, lr, beta1, beta2, weight_decay, step):
    update = torch.sign(torch.lerp(g, m, beta1))
    p = p * (1 - lr * weight_decay) - lr * update
    m = torch.lerp(g, m, beta2)
    return p, m


def clipped_log_rule(p, g, s, *, lr, step):
    """Only here: where / clamp / exp / log / pow (scalar and tensor exponents) / maximum / rsqrt."""
    s = torch.maximum(0.9 * s, g.abs())
    damp = torch.exp(-0.5 * torch.log(1 + s))
    update = torch.where(g > 0, g, 0.5 * g) * damp
    update = torch.clamp(update, -1.0, 1.0) * torch.pow(s + 1, -0.25) * (s + 2).rsqrt()
    p = p - lr * update / step ** 0.5 + 1e-3 * torch.pow(s + 0.5, g.sign())
    return p, s


RULES = {
    # name: (rule, signedness of each state, hyperparameters)
    "adamw": (adamw, (True, False), dict(lr=1e-2, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.01)),
    "sgd_nesterov": (sgd_nesterov, (True,), dict(lr=0.1, momentum=0.9, dampening=0.1, weight_decay=1e-3)),
    "lion": (lion, (True,), dict(lr=1e-3, beta1=0.9, beta2=0.99, weight_decay=0.1)),
    "clipped_log": (clipped_log_rule, (False,), dict(lr=0.05)),
}

# The fused kernel runs on CUDA, or on the CPU under the Triton interpreter (set by conftest when there is no GPU).
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"

SIGNED_FORMATS = (F.Q8(min_quant_numel=0), F.Q4(min_quant_numel=0), F.F32(), F.BF16())
UNSIGNED_FORMATS = (F.Q8(signed=False, min_quant_numel=0), F.Q4(signed=False, min_quant_numel=0), F.F32(), F.BF16())


# --------------------------------------------------------------------------------------------------------------
# The step-graph contract
# --------------------------------------------------------------------------------------------------------------
def contract_step(rule, formats):
    """The per-group step function the Optimizer produces (THE STEP-GRAPH CONTRACT), over lists of tensors.
    ``formats[k][i]`` is the storage of parameter ``k``'s state ``i``; quantized state is ``(codes, absmax)``."""

    # Spec strings (None: plain state) are fixed before tracing: the step reads no format objects.
    specs = [[fmt.spec if fmt.quantized else None for fmt in param_formats] for param_formats in formats]

    def step_fn(params, grads, states, hp, step_t, nonfinite):
        step_t.add_(1)
        for p, g, state, param_specs in zip(params, grads, states, specs):
            p32 = p.to(torch.float32)
            g32 = g.to(torch.float32)
            xs = []
            for spec, s in zip(param_specs, state):
                if spec is not None:
                    xs.append(torch.ops.lowbit.dequant(s[0], s[1], spec, list(p.shape)))
                else:
                    xs.append(s.to(torch.float32))
            outs = rule(p32, g32, *xs, step=step_t, **hp)
            ok = torch.isfinite(g32)
            new_p = torch.where(ok, outs[0], p32)
            for i, (spec, s) in enumerate(zip(param_specs, state)):
                new_x = torch.where(ok, outs[i + 1], xs[i])
                if spec is not None:
                    torch.ops.lowbit.requant_(s[0], s[1], new_x, spec)
                else:
                    s.copy_(new_x)
            p.copy_(new_p)
            nonfinite.add_((~ok).sum())

    return step_fn


@dataclasses.dataclass
class Problem:
    params: list
    grads: list
    states: list          # per parameter, per state: a plain buffer or (codes, absmax)
    hp: dict
    step_t: torch.Tensor
    nonfinite: torch.Tensor
    formats: list         # per parameter, per state: its storage format

    def args(self):
        return self.params, self.grads, self.states, self.hp, self.step_t, self.nonfinite

    def clone(self) -> "Problem":
        return copy.deepcopy(self)


def _poisoned_padding(codes: torch.Tensor, fmt: F.Quantized, numel: int, gen: torch.Generator) -> torch.Tensor:
    """Garbage in the padding lanes of the last block: requantization must rewrite them as formats.encode does."""
    codes = F.unpack(codes, fmt).clone()
    pad = codes.numel() - numel
    if pad:
        codes[numel:] = torch.randint(0, 2 ** fmt.bits, (pad,), generator=gen, dtype=torch.uint8)
    return F.pack(codes, fmt).contiguous()


def make_problem(shapes, formats, *, param_dtype=torch.float32, hp=None, seed=0, device=DEVICE,
                 start_step=0, nonfinite=0.0) -> Problem:
    """``formats``: the state formats of every parameter, or a function of a parameter's element count that gives
    them (the optimizer keeps small tensors' state in fp32)."""
    gen = torch.Generator().manual_seed(seed)
    params, grads, states, all_formats = [], [], [], []
    for shape in shapes:
        param_formats = formats(torch.Size(shape).numel()) if callable(formats) else tuple(formats)
        all_formats.append(param_formats)
        p = torch.randn(shape, generator=gen)
        g = torch.randn(shape, generator=gen) * 0.1
        if nonfinite and g.numel():
            bad = torch.rand(g.shape, generator=gen) < nonfinite
            g[bad] = torch.tensor([float("nan"), float("inf"), -float("inf")])[
                torch.randint(0, 3, (int(bad.sum()),), generator=gen)]
        params.append(p.to(param_dtype).to(device))
        grads.append(g.to(param_dtype).to(device))
        state = []
        for fmt in param_formats:
            x = torch.randn(shape, generator=gen) * 0.01
            if not getattr(fmt, "signed", True):
                x = x.abs()
            if fmt.quantized:
                codes, absmax = F.encode(x, fmt)
                codes = _poisoned_padding(codes, fmt, x.numel(), gen)
                state.append((codes.to(device), absmax.to(device)))
            else:
                state.append(x.to(fmt.dtype).to(device))
        states.append(state)
    hp = {k: torch.tensor(float(v), device=device) for k, v in (hp or {}).items()}
    return Problem(params, grads, states, hp, torch.tensor(float(start_step), device=device),
                   torch.zeros((), dtype=torch.int64, device=device), all_formats)


def new_gradients(problem: Problem, seed: int, nonfinite: float = 0.0) -> None:
    gen = torch.Generator().manual_seed(seed)
    for g in problem.grads:
        fresh = torch.randn(g.shape, generator=gen) * 0.1
        if nonfinite and fresh.numel():
            fresh[torch.rand(g.shape, generator=gen) < nonfinite] = float("nan")
        g.copy_(fresh.to(g.dtype))


def compile_step(step_fn, backend: str, **kwargs):
    """``torch.compile`` from a clean slate whose calls always run the pass: no Dynamo cache, no inductor FX-graph or
    AOT cache hit (a hit skips the pass and leaves no report; the warm-cache test checks that path on purpose)."""
    torch._dynamo.reset()
    clear_compile_reports()
    compiled = torch.compile(step_fn, backend=backend, **kwargs)

    def run(*args):
        with torch._inductor.config.patch(fx_graph_cache=False), \
                torch._functorch.config.patch(enable_autograd_cache=False):
            return compiled(*args)

    return run


# --------------------------------------------------------------------------------------------------------------
# Comparisons
# --------------------------------------------------------------------------------------------------------------
def assert_params_close(got: torch.Tensor, want: torch.Tensor, what: str = "param", steps: int = 1) -> None:
    """fp32: within a few fp32 roundings of the result; bf16/fp16: one unit in the last place per step (an fp32
    difference of an ulp can round the other way, and later steps start from that value)."""
    assert got.dtype == want.dtype and got.shape == want.shape, what
    if got.dtype == torch.float32:
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6, equal_nan=True, msg=what)
    else:
        eps = torch.finfo(got.dtype).eps * steps
        torch.testing.assert_close(got.float(), want.float(), rtol=eps, atol=0.0, equal_nan=True, msg=what)


def assert_codes_close(got, want, fmt: F.Quantized, numel: int, what: str = "state") -> None:
    """Codes equal or one code apart (a value on a midpoint may round either way after an ulp of difference),
    and rarely apart; scales within fp32 rounding."""
    got_codes, want_codes = F.unpack(got[0], fmt).int(), F.unpack(want[0], fmt).int()
    diff = (got_codes - want_codes).abs()
    assert diff.max().item() <= 1 if diff.numel() else True, f"{what}: codes differ by {diff.max().item()}"
    assert (diff > 0).sum().item() <= 0.01 * diff.numel(), f"{what}: {(diff > 0).sum().item()} codes differ"
    torch.testing.assert_close(got[1], want[1], rtol=1e-5, atol=0.0, msg=what)
    zero_code = F.unpack(F.encode(torch.zeros(1), fmt)[0], fmt)[0].int()
    assert bool((got_codes[numel:] == zero_code).all()), f"{what}: padding codes are not the code of 0.0"


def assert_problems_close(got: Problem, want: Problem, steps: int = 1) -> None:
    for i, (p, q) in enumerate(zip(got.params, want.params)):
        assert_params_close(p, q, f"param {i}", steps)
        for j, (fmt, s, t) in enumerate(zip(got.formats[i], got.states[i], want.states[i])):
            if fmt.quantized:
                assert_codes_close(s, t, fmt, p.numel(), f"param {i} state {j} ({fmt.spec})")
            else:
                assert_params_close(s, t, f"param {i} state {j} ({fmt.spec})", steps)
    assert torch.equal(got.nonfinite, want.nonfinite), (got.nonfinite, want.nonfinite)
    assert torch.equal(got.step_t, want.step_t)


def run_both(problem: Problem, rule, backend: str, steps: int, *, grad_seed: int = 0, nonfinite: float = 0.0,
             **compile_kwargs):
    """Run ``steps`` steps compiled and eagerly from the same start; return both problems."""
    step_fn = contract_step(rule, problem.formats)
    compiled = compile_step(step_fn, backend, **compile_kwargs)
    eager = problem.clone()
    for k in range(steps):
        if k:
            new_gradients(problem, grad_seed + k, nonfinite)
            new_gradients(eager, grad_seed + k, nonfinite)
        compiled(*problem.args())
        step_fn(*eager.args())
    return problem, eager


def assert_all_fused(num_params: int, parts: int = 1) -> None:
    """Every region fused, into ``parts`` kernel specs run by one launch that also computes the 0-d math and writes
    the step counter: the graph keeps nothing but that launch."""
    assert compile_reports(), "the lowbit pass did not run"
    report = compile_report()
    assert not report.unfused, str(report)
    assert report.launches == 1 and len(report.fused) == parts, str(report)
    assert sum(g.num_tensors for g in report.fused) == num_params, str(report)
    assert len(report.scalar_writes) == 1, str(report)  # the step counter
    computing = [line for line in report.graph.splitlines() if "call_function" in line and "fused_update_" not in line]
    assert not computing, report.graph
    for leftover in ("lowbit.dequant", "lowbit.requant_", "auto_functionalized"):
        assert leftover not in report.graph, report.graph


# --------------------------------------------------------------------------------------------------------------
# Tests
# --------------------------------------------------------------------------------------------------------------
NUMELS = [1, 2, 127, 128, 129, 255, 256, 257, 300, 1000, 4097]


@st.composite
def shapes(draw, max_params=3):
    out = []
    for _ in range(draw(st.integers(1, max_params))):
        if draw(st.booleans()):
            out.append((draw(st.sampled_from(NUMELS)),))
        else:
            out.append((draw(st.integers(1, 40)), draw(st.integers(1, 90))))
    return out


@st.composite
def state_formats(draw, signedness):
    return tuple(draw(st.sampled_from(SIGNED_FORMATS if s else UNSIGNED_FORMATS)) for s in signedness)


@pytest.mark.parametrize("rule_name", sorted(RULES))
@settings(max_examples=6)
@given(data=st.data())
def test_aot_eager_matches_eager(rule_name, data):
    rule, signedness, hp = RULES[rule_name]
    formats = data.draw(state_formats(signedness), "formats")
    problem = make_problem(
        data.draw(shapes(), "shapes"), formats,
        param_dtype=data.draw(st.sampled_from([torch.float32, torch.bfloat16, torch.float16]), "param dtype"),
        hp={k: v * data.draw(st.sampled_from([0.5, 1.0, 2.0]), f"scale {k}") if k.startswith(("lr", "weight"))
            else v for k, v in hp.items()},
        seed=data.draw(st.integers(0, 2**20), "seed"), start_step=data.draw(st.integers(0, 10), "start step"))
    steps = data.draw(st.integers(1, 5), "steps")
    grad_seed = data.draw(st.integers(0, 2**20), "grad seed")
    got, want = run_both(problem, rule, "lowbit_aot_eager", steps, grad_seed=grad_seed)
    assert_all_fused(len(problem.params))
    assert_problems_close(got, want, steps)


INDUCTOR_CASES = [
    # rule, shapes, formats, param dtype
    ("adamw", [(300,), (17, 20), (4097,)], (F.Q8(min_quant_numel=0), F.Q8(signed=False, min_quant_numel=0)),
     torch.float32),
    ("adamw", [(129,), (1,)], (F.Q4(min_quant_numel=0), F.Q4(signed=False, min_quant_numel=0)), torch.bfloat16),
    ("adamw", [(256, 3)], (F.Q8(min_quant_numel=0), F.Q4(signed=False, min_quant_numel=0)), torch.float32),
    ("sgd_nesterov", [(1000,), (7, 9)], (F.BF16(),), torch.float16),
    ("lion", [(513,), (2, 2)], (F.Q8(min_quant_numel=0),), torch.bfloat16),
    ("clipped_log", [(300,), (64, 5)], (F.Q8(signed=False, min_quant_numel=0),), torch.float32),
    ("clipped_log", [(255,)], (F.F32(),), torch.float32),
]


@pytest.mark.parametrize("case", range(len(INDUCTOR_CASES)))
def test_lowbit_inductor_matches_eager(case):
    rule_name, shape_list, formats, dtype = INDUCTOR_CASES[case]
    rule, _, hp = RULES[rule_name]
    problem = make_problem(shape_list, formats, param_dtype=dtype, hp=hp, seed=case, start_step=case)
    got, want = run_both(problem, rule, "lowbit", steps=3, grad_seed=100 + case)
    assert_all_fused(len(shape_list))
    assert_problems_close(got, want, steps=3)


def test_programs_walking_several_tiles(monkeypatch):
    """The GPU launch shape (several tiles per program, the last ones past a tensor's end) under the interpreter:
    512-element tiles, 3 per program, over tensors ending inside a tile, on a tile edge and inside a program."""
    from lowbit_compile.templates import fused_update
    monkeypatch.setattr(fused_update, "INTERPRETER_TILE_ELEMENTS", 512)
    monkeypatch.setattr(fused_update, "INTERPRETER_TILES_PER_PROGRAM", 3)
    monkeypatch.setattr(fused_update, "_KERNELS", {})
    formats = (F.Q8(min_quant_numel=0), F.Q4(signed=False, min_quant_numel=0))
    problem = make_problem([(1536,), (2000,), (7, 73), (1,)], formats, hp=RULES["adamw"][2], seed=8, nonfinite=0.02)
    got, want = run_both(problem, adamw, "lowbit_aot_eager", steps=2, grad_seed=9, nonfinite=0.02)
    assert_all_fused(4)
    assert_problems_close(got, want, steps=2)
    assert got.nonfinite.item() == want.nonfinite.item() > 0


@pytest.mark.parametrize("backend", ["lowbit", "lowbit_aot_eager"])
def test_nonfinite_gradients_leave_state_untouched_and_are_counted(backend):
    formats = (F.Q8(min_quant_numel=0), F.Q4(signed=False, min_quant_numel=0))
    problem = make_problem([(300,), (40, 7)], formats, hp=RULES["adamw"][2], seed=3, nonfinite=0.05)
    before = problem.clone()
    bad = [~torch.isfinite(g) for g in problem.grads]
    assert sum(int(b.sum()) for b in bad) > 10
    got, want = run_both(problem, adamw, backend, steps=1)
    assert_all_fused(2)
    assert_problems_close(got, want)
    assert got.nonfinite.item() == sum(int(b.sum()) for b in bad)
    for i, b in enumerate(bad):
        assert torch.equal(got.params[i][b], before.params[i][b])
        for fmt, s, s0 in zip(got.formats[i], got.states[i], before.states[i]):
            now = F.decode(s[0], s[1], fmt, b.numel())[b.reshape(-1)]
            then = F.decode(s0[0], s0[1], fmt, b.numel())[b.reshape(-1)]
            # The block scale may move (other elements changed); the value stays within one code of its old self.
            assert torch.allclose(now, then, rtol=0.2, atol=float(s[1].max()) * fmt.max_roundtrip_error * 2)


def test_counter_accumulates_over_steps():
    problem = make_problem([(300,), (50,)], (F.F32(),), hp=RULES["sgd_nesterov"][2], nonfinite=0.1, seed=5)
    got, want = run_both(problem, sgd_nesterov, "lowbit", steps=3, nonfinite=0.1)
    assert_problems_close(got, want, steps=3)
    assert got.nonfinite.item() > 0


def nudge(p, g, *, lr, step):
    """Moves every parameter by less than half a bf16 step: nearest rounding keeps it, stochastic rounding moves it
    down with probability (update / step)."""
    return (p - lr * g.abs(),)


@pytest.mark.parametrize("stochastic", [False, True])
def test_bf16_parameter_rounding(stochastic):
    n = 8192
    problem = make_problem([(n,)], (), param_dtype=torch.bfloat16, hp=dict(lr=1e-3))
    for p, g in zip(problem.params, problem.grads):
        p.fill_(1.0)
        g.fill_(1.0)
    eager = problem.clone()
    step_fn = contract_step(nudge, problem.formats)
    compiled = compile_step(step_fn, "lowbit", options={"lowbit.stochastic_rounding": stochastic})
    compiled(*problem.args())
    step_fn(*eager.args())
    assert_all_fused(1)
    assert compile_report().fused[0].spec.count('"stochastic_rounding":true') == int(stochastic)
    got = problem.params[0].float()
    below = 1.0 - 2.0 ** -8  # the bf16 neighbour below 1.0
    if not stochastic:
        assert torch.equal(problem.params[0], eager.params[0]) and bool((got == 1.0).all())
        return
    assert bool(((got == 1.0) | (got == below)).all())
    # P(down) = 1e-3 / 2**-8 = 0.256: the mean is unbiased (4 sigma of a binomial over n draws).
    p_down = 1e-3 / 2.0 ** -8
    assert abs(float((got == below).float().mean()) - p_down) < 4 * (p_down * (1 - p_down) / n) ** 0.5
    first = problem.params[0].clone()
    problem.params[0].fill_(1.0)
    compiled(*problem.args())
    assert not torch.equal(problem.params[0], first), "the seed must advance between steps"


@pytest.mark.parametrize("backend", ["lowbit", "lowbit_aot_eager"])
def test_one_compiled_step_serves_other_shapes(backend):
    """A second set of shapes recompiles with symbolic sizes (automatic dynamic): the pass fuses the symbolic graph
    and the kernel takes its sizes from the tensors."""
    formats = (F.Q8(min_quant_numel=0), F.Q8(signed=False, min_quant_numel=0))
    first = make_problem([(300,), (17, 20)], formats, hp=RULES["adamw"][2])
    second = make_problem([(1000,), (40, 9)], formats, hp=RULES["adamw"][2], seed=1)
    step_fn = contract_step(adamw, first.formats)
    compiled = compile_step(step_fn, backend)
    for problem in (first, second, first):
        eager = problem.clone()
        compiled(*problem.args())
        step_fn(*eager.args())
        assert_all_fused(2)
        assert_problems_close(problem, eager)
    assert len(compile_reports()) == 2  # the static graph, then the symbolic one
