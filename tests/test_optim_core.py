"""lbc.Optimizer: the eager step contract, param groups, checkpoints, describe(), non-finite gradients, bad input."""
import copy
import io
import math

import pytest
import torch
from hypothesis import given, strategies as st

import lowbit_compile as lbc  # noqa: F401  (registers the anchor ops)
from lowbit_compile.formats import BF16, F32, Q4, Q8, Quantized, decode, encode
from lowbit_compile.optim import AdamW, Optimizer, ParamGroup
from lowbit_compile.optim import rules


def made_up_rule(p, g, m, v, *, lr, beta=0.9, floor=1e-3, step):
    """A rule no library ships: two states with different signs, a step-dependent scale and a clamp."""
    m = beta * m + (1 - beta) * g
    v = torch.maximum(v * beta, g.abs())
    p = p - lr * m / (v + floor) * torch.clamp(1 / step, min=0.25)
    return p, m, v


FORMATS = {
    "Q8s": Q8(min_quant_numel=0), "Q8u": Q8(signed=False, min_quant_numel=0), "Q4s": Q4(min_quant_numel=0),
    "Q4u": Q4(signed=False, min_quant_numel=0), "Q8s-block64": Q8(block=64, min_quant_numel=0),
    "Q8-fallback": Q8(), "F32": F32(), "BF16": BF16(),
}
SIGNED_FORMATS = ["Q8s", "Q4s", "Q8s-block64", "Q8-fallback", "F32", "BF16"]
UNSIGNED_FORMATS = ["Q8u", "Q4u", "Q8-fallback", "F32", "BF16"]
SHAPES = [(0,), (1,), (7,), (128,), (257,), (3, 100), (2, 3, 65)]


def contract_step(p, g, storage, formats, rule, hp, step):
    """The step-graph contract written out with the reference codecs: returns new (p, storage)."""
    p32, g32 = p.float(), g.float()
    xs = []
    for fmt, stored in zip(formats, storage):
        if isinstance(stored, tuple):
            xs.append(decode(stored[0], stored[1], fmt, p.numel()).view(p.shape))
        else:
            xs.append(stored.float())
    outs = rule(p32, g32, *xs, step=step, **hp)
    ok = torch.isfinite(g32)
    new_storage = []
    for fmt, stored, x, out in zip(formats, storage, xs, outs[1:]):
        new_x = torch.where(ok, out, x)
        new_storage.append(encode(new_x, fmt) if isinstance(stored, tuple) else new_x.to(stored.dtype))
    return torch.where(ok, outs[0], p32).to(p.dtype), new_storage


@given(shape=st.sampled_from(SHAPES), dtype=st.sampled_from([torch.float32, torch.bfloat16, torch.float16]),
       m_fmt=st.sampled_from(SIGNED_FORMATS), v_fmt=st.sampled_from(UNSIGNED_FORMATS), steps=st.integers(1, 3),
       lr=st.floats(1e-4, 1.0), beta=st.floats(0.0, 0.999), nonfinite=st.booleans(), seed=st.integers(0, 2**31 - 1))
def test_eager_step_is_the_contract(shape, dtype, m_fmt, v_fmt, steps, lr, beta, nonfinite, seed):
    gen = torch.Generator().manual_seed(seed)
    formats = [FORMATS[m_fmt], FORMATS[v_fmt]]
    param = torch.nn.Parameter(torch.randn(shape, generator=gen).to(dtype))
    opt = Optimizer([param], made_up_rule, {"m": formats[0], "v": formats[1]}, lr=lr, beta=beta)
    hp = {"lr": torch.tensor(lr), "beta": torch.tensor(beta), "floor": torch.tensor(1e-3)}
    p = param.detach().clone()
    storage = []
    for fmt in formats:
        if isinstance(fmt, Quantized) and fmt.stores_quantized(p.numel()):
            storage.append(encode(torch.zeros(shape), fmt))
        else:
            storage.append(torch.zeros(shape, dtype=fmt.dtype if fmt in (F32(), BF16()) else torch.float32))
    expected_nonfinite = 0
    for step in range(1, steps + 1):
        g = torch.randn(shape, generator=gen).to(dtype) * 10 ** torch.randint(-3, 3, (), generator=gen).item()
        if nonfinite and g.numel():
            g.view(-1)[torch.randint(0, g.numel(), (3,), generator=gen)] = torch.tensor(
                [float("nan"), float("inf"), -float("inf")], dtype=dtype)
        expected_nonfinite += int((~torch.isfinite(g)).sum())
        param.grad = g.clone()
        opt.step()
        p, storage = contract_step(p, g, storage, formats, made_up_rule, hp, torch.tensor(float(step)))
    assert torch.equal(param.detach(), p)
    state = opt.state[param]
    for name, stored in zip("mv", storage):
        if isinstance(stored, tuple):
            assert torch.equal(state[f"{name}.codes"], stored[0]), name
            assert torch.equal(state[f"{name}.absmax"], stored[1]), name
        else:
            assert torch.equal(state[name], stored), name
    assert opt.param_groups[0]["step"].item() == steps
    assert opt.nonfinite_count.item() == expected_nonfinite


def test_nonfinite_gradients_leave_param_and_state_unchanged():
    torch.manual_seed(0)
    w = torch.nn.Parameter(torch.randn(2048))  # 8 blocks of 256 with Q8
    b = torch.nn.Parameter(torch.randn(50))  # fp32 fallback
    opt = AdamW([w, b], lr=0.1, bits=8, min_quant_numel=1024)
    for _ in range(2):
        w.grad, b.grad = torch.randn(2048), torch.randn(50)
        opt.step()
    before = {k: v.clone() for k, v in opt.state[w].items()}
    b_state_before = opt.state[b]["m"].clone()
    w_before, b_before = w.detach().clone(), b.detach().clone()
    grad_w = torch.randn(2048)
    grad_w[256:512] = float("nan")  # the whole second block
    grad_w[1000] = float("inf")
    grad_b = torch.randn(50)
    grad_b[[3, 7]] = torch.tensor([float("-inf"), float("nan")])
    w.grad, b.grad = grad_w, grad_b
    opt.step()
    bad_w, bad_b = ~torch.isfinite(grad_w), ~torch.isfinite(grad_b)
    assert torch.equal(w.detach()[bad_w], w_before[bad_w])
    assert torch.equal(b.detach()[bad_b], b_before[bad_b])
    assert not torch.equal(w.detach()[~bad_w], w_before[~bad_w])
    # an all-skipped block requantizes to itself
    assert torch.equal(opt.state[w]["m.codes"][256:512], before["m.codes"][256:512])
    assert torch.equal(opt.state[w]["v.codes"][256:512], before["v.codes"][256:512])
    torch.testing.assert_close(opt.state[w]["m.absmax"][1], before["m.absmax"][1], rtol=2**-23, atol=0)
    assert torch.equal(opt.state[w]["v.absmax"][1], before["v.absmax"][1])
    assert torch.equal(opt.state[b]["m"][bad_b], b_state_before[bad_b])
    assert opt.nonfinite_count.item() == 256 + 1 + 2
    assert torch.isfinite(w).all() and torch.isfinite(b).all()


# ------------------------------------------------------------------------------------------------ param groups
def test_param_group_assignments_fill_hyperparameters_in_place():
    w = torch.nn.Parameter(torch.randn(10))
    opt = Optimizer([w], rules.sgd_momentum, {"momentum_buffer": F32()}, lr=0.1, nesterov=True)
    group = opt.param_groups[0]
    assert isinstance(group, ParamGroup)
    lr, momentum = group["lr"], group["momentum"]
    assert lr.dtype == torch.float32 and lr.shape == () and lr.device == w.device
    group["lr"] = 0.25
    group["momentum"] = torch.tensor(0.5, dtype=torch.float64)
    assert group["lr"] is lr and lr.item() == 0.25
    assert group["momentum"] is momentum and momentum.item() == 0.5
    group.update(lr=0.125)
    assert lr.item() == 0.125
    group["initial_lr"] = 0.3  # keys the optimizer does not use behave like a dict's
    assert group["initial_lr"] == 0.3
    group["nesterov"] = True  # unchanged value of a fixed key
    with pytest.raises(ValueError, match="'nesterov' is fixed"):
        group["nesterov"] = False
    with pytest.raises(ValueError, match="'rule' is fixed"):
        group["rule"] = rules.sgd
    with pytest.raises(TypeError, match="'lr' holds a tensor"):
        group["lr"] = "fast"
    with pytest.raises(ValueError, match="'lr' holds one real value"):
        group["lr"] = torch.ones(2)
    with pytest.raises(KeyError, match="'lr' cannot be removed"):
        del group["lr"]
    assert lr.item() == 0.125


def test_tuple_hyperparameters_fill_each_tensor():
    w = torch.nn.Parameter(torch.randn(10))
    opt = AdamW([w], bits=32)
    group = opt.param_groups[0]
    beta1, beta2 = group["betas"]
    group["betas"] = (0.8, group["betas"][1])  # what OneCycleLR writes
    assert group["betas"][0] is beta1 and beta1.item() == pytest.approx(0.8)
    assert beta2.item() == pytest.approx(0.999)
    with pytest.raises(ValueError, match="'betas' holds 2 values"):
        group["betas"] = (0.9, 0.99, 0.9)


def test_assigned_hyperparameters_take_effect():
    gen = torch.Generator().manual_seed(0)
    start, grads = torch.randn(300, generator=gen), [torch.randn(300, generator=gen) for _ in range(2)]
    changed, direct = torch.nn.Parameter(start.clone()), torch.nn.Parameter(start.clone())
    opt = AdamW([changed], lr=0.1, betas=(0.9, 0.999), weight_decay=0.0, bits=8, min_quant_numel=0)
    group = opt.param_groups[0]
    group["lr"], group["betas"], group["weight_decay"] = 0.02, (0.5, group["betas"][1]), torch.tensor(0.3)
    reference = AdamW([direct], lr=0.02, betas=(0.5, 0.999), weight_decay=0.3, bits=8, min_quant_numel=0)
    for g in grads:
        changed.grad, direct.grad = g.clone(), g.clone()
        opt.step()
        reference.step()
    assert torch.equal(changed, direct)


def test_groups_override_rule_state_and_hyperparameters():
    a = torch.nn.Parameter(torch.randn(5000))
    b = torch.nn.Parameter(torch.randn(30))
    c = torch.nn.Parameter(torch.randn(30))
    opt = Optimizer([{"params": [a]}, {"params": [b], "rule": rules.lion, "state": {"m": BF16()}},
                     {"params": [c], "lr": 0.5}],
                    rules.adamw, {"m": Q8(), "v": Q8(signed=False)}, lr=0.01)
    g0, g1, g2 = opt.param_groups
    assert g0["lr"].item() == pytest.approx(0.01) and g0["weight_decay"].item() == pytest.approx(1e-2)
    # an optimizer-level hyperparameter reaches groups whose rule takes it; the rule's own defaults fill the rest
    assert g1["lr"].item() == pytest.approx(0.01)
    assert [t.item() for t in g1["betas"]] == pytest.approx([0.9, 0.99]) and "eps" not in g1
    assert g2["lr"].item() == 0.5
    assert set(opt.state[a]) == {"m.codes", "m.absmax", "v.codes", "v.absmax"}
    assert opt.state[b]["m"].dtype == torch.bfloat16 and set(opt.state[b]) == {"m"}
    opt.add_param_group({"params": [torch.nn.Parameter(torch.randn(3))], "rule": rules.sgd, "state": {}})
    assert set(opt.param_groups[3]) >= {"lr", "weight_decay", "maximize", "step", "nonfinite"}
    for p in (a, b, c):
        p.grad = torch.randn_like(p)
    opt.step()
    assert [g["step"].item() for g in opt.param_groups] == [1, 1, 1, 0]  # a group without grads does not count


def test_init_sets_initial_state():
    w = torch.nn.Parameter(torch.randn(5000))
    opt = lbc.optim.Adagrad([w], initial_accumulator_value=0.5, bits=8)
    torch.testing.assert_close(decode(opt.state[w]["state_sum.codes"], opt.state[w]["state_sum.absmax"],
                                      Q8(signed=False), w.numel()), torch.full((5000,), 0.5))

    def wrong_init(p, *, initial_accumulator_value=0.0):
        return torch.zeros_like(p), torch.zeros_like(p)

    with pytest.raises(ValueError, match="init wrong_init must return one tensor per state"):
        Optimizer([torch.nn.Parameter(torch.randn(4))], rules.adagrad, {"state_sum": F32()}, init=wrong_init)


def test_step_runs_closure_with_grad_and_hooks():
    w = torch.nn.Parameter(torch.ones(4))
    opt = Optimizer([w], rules.sgd, lr=0.5)
    calls = []
    opt.register_step_pre_hook(lambda o, args, kwargs: calls.append(("pre", w.detach().clone())))
    opt.register_step_post_hook(lambda o, args, kwargs: calls.append(("post", w.detach().clone())))

    def closure():
        opt.zero_grad()
        loss = (w * w).sum()
        loss.backward()
        return loss

    with torch.no_grad():
        loss = opt.step(closure)
    assert loss.item() == 4.0
    assert torch.equal(w.detach(), torch.zeros(4))  # 1 - 0.5 * 2
    assert [c[0] for c in calls] == ["pre", "post"] and torch.equal(calls[0][1], torch.ones(4))
    opt.zero_grad()
    assert w.grad is None


def test_deepcopy_keeps_a_working_optimizer():
    w = torch.nn.Parameter(torch.randn(4096))
    opt = AdamW([w], bits=8)
    w.grad = torch.randn(4096)
    opt.step()
    clone = copy.deepcopy(opt)
    w2 = clone.param_groups[0]["params"][0]
    assert w2 is not w and torch.equal(w2, w)
    w2.grad = w.grad.clone()
    opt.step()
    clone.step()
    assert torch.equal(w2, w)
    io_buffer = io.BytesIO()
    torch.save(clone.state_dict(), io_buffer)


# ------------------------------------------------------------------------------------------------ state_dict
def _mixed_model(seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [torch.nn.Parameter(torch.randn(64, 80, generator=gen)),  # quantized
            torch.nn.Parameter(torch.randn(70, 70, generator=gen).bfloat16()),  # quantized, bf16 param
            torch.nn.Parameter(torch.randn(33, generator=gen).bfloat16())]  # fp32 fallback on a bf16 param


def _mixed_optimizer(params, m_fmt=Q8(), v_fmt=Q4(signed=False)):
    return Optimizer([{"params": params[:2]}, {"params": params[2:], "lr": 0.01, "state": {"m": BF16(), "v": v_fmt}}],
                     rules.adamw, {"m": m_fmt, "v": v_fmt}, lr=0.05, weight_decay=0.1)


def _steps(opt, params, seed, n):
    gen = torch.Generator().manual_seed(seed)
    for _ in range(n):
        for p in params:
            p.grad = torch.randn(p.shape, generator=gen).to(p.dtype)
        opt.step()


def _snapshot(opt):
    return ([{k: v.clone() for k, v in opt.state[p].items()} for g in opt.param_groups for p in g["params"]],
            [{k: (v.clone() if isinstance(v, torch.Tensor) else v) for k, v in g.items() if k != "params"}
             for g in opt.param_groups])


def _assert_same(a, b):
    for x, y in zip(a[0], b[0]):
        assert x.keys() == y.keys()
        for k in x:
            assert torch.equal(x[k], y[k]) and x[k].dtype == y[k].dtype, k
    for x, y in zip(a[1], b[1]):
        for k in x:
            if isinstance(x[k], torch.Tensor):
                assert torch.equal(x[k], y[k]), k


def test_state_dict_round_trip_is_bit_exact_and_weights_only_loadable():
    params = _mixed_model()
    opt = _mixed_optimizer(params)
    _steps(opt, params, seed=1, n=3)
    buffer = io.BytesIO()
    torch.save(opt.state_dict(), buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=True)
    assert loaded["param_groups"][0]["state"] == {"m": "Q8:dynamic:s:256", "v": "Q4:linear:u:128"}
    assert loaded["param_groups"][0]["rule"] == "adamw"

    twins = [torch.nn.Parameter(p.detach().clone()) for p in params]
    twin = _mixed_optimizer(twins)
    twin.param_groups[0]["lr"] = 0.9  # overwritten by the load
    addresses = {k: v.data_ptr() for k, v in twin.state[twins[0]].items()}
    lr = twin.param_groups[0]["lr"]
    twin.load_state_dict(loaded)
    assert twin.param_groups[0]["lr"] is lr and lr.item() == pytest.approx(0.05)
    assert {k: v.data_ptr() for k, v in twin.state[twins[0]].items()} == addresses
    assert twin.state[twins[1]]["m.absmax"].dtype == torch.float32  # scales of a bf16 param stay fp32
    assert twin.state[twins[2]]["v"].dtype == torch.float32  # fp32 fallback state of a bf16 param stays fp32
    assert twin.state[twins[2]]["m"].dtype == torch.bfloat16
    _assert_same(_snapshot(opt), _snapshot(twin))
    _steps(opt, params, seed=2, n=2)
    _steps(twin, twins, seed=2, n=2)
    for p, q in zip(params, twins):
        assert torch.equal(p, q)
    _assert_same(_snapshot(opt), _snapshot(twin))


@pytest.mark.parametrize("change, message", [
    ("bits", r"param_groups\[0\], state 'v': the loaded state dict stores it as Q8:dynamic:u:256"),
    ("shape", r"parameter param_groups\[0\]\['params'\]\[1\], state 'm.codes'"),
    ("fallback", r"parameter param_groups\[0\]\['params'\]\[0\]: the loaded state has entries"),
    ("groups", "1 param groups, this optimizer has 2"),
    ("count", r"param_groups\[0\]: the loaded state dict has 1 parameters"),
    ("fixed", r"param_groups\[0\]\['maximize'\]"),
])
def test_loading_another_configuration_raises_and_changes_nothing(change, message):
    params = _mixed_model()
    source_params = [torch.nn.Parameter(p.detach().clone()) for p in params]
    if change == "shape":
        source_params[1] = torch.nn.Parameter(torch.randn(60, 80).bfloat16())
    source = {"bits": lambda: _mixed_optimizer(source_params, v_fmt=Q8(signed=False)),
              "fallback": lambda: _mixed_optimizer(source_params, m_fmt=Q8(min_quant_numel=10**6)),
              "groups": lambda: Optimizer(source_params, rules.adamw, {"m": Q8(), "v": Q4(signed=False)}),
              "fixed": lambda: Optimizer([{"params": source_params[:2], "maximize": True},
                                          {"params": source_params[2:], "state": {"m": BF16(), "v": Q4(signed=False)}}],
                                         rules.adamw, {"m": Q8(), "v": Q4(signed=False)}),
              }.get(change, lambda: _mixed_optimizer(source_params))()
    _steps(source, source_params, seed=3, n=1)
    saved = source.state_dict()
    if change == "count":
        saved["param_groups"][0]["params"] = saved["param_groups"][0]["params"][:1]
    opt = _mixed_optimizer(params)
    _steps(opt, params, seed=4, n=2)
    before = _snapshot(opt)
    with pytest.raises(ValueError, match=message):
        opt.load_state_dict(saved)
    _assert_same(before, _snapshot(opt))


# ------------------------------------------------------------------------------------------------ describe
def test_describe_reports_formats_bytes_and_fallbacks():
    big = torch.nn.Parameter(torch.randn(64, 128))
    small = torch.nn.Parameter(torch.randn(100).bfloat16())
    opt = AdamW([("encoder.weight", big), ("encoder.bias", small)], bits=4)
    report = opt.describe()
    rows = {(r.param, r.state): r for r in report}
    assert len(report) == 4
    m = rows[("encoder.weight", "m")]
    assert (m.format, m.block, m.shape, m.fallback) == ("Q4:dynamic:s:128", 128, (64, 128), None)
    assert m.bytes == 8192 // 2 + 4 * 64
    v_small = rows[("encoder.bias", "v")]
    assert (v_small.format, v_small.block, v_small.bytes) == ("F32", None, 400)
    assert "100 elements < min_quant_numel=4096" in v_small.fallback
    assert report.total_bytes == 2 * (4096 + 256) + 2 * 400
    assert report.bytes_per_param == pytest.approx(report.total_bytes / (8192 + 100))
    assert "bytes/param" in str(report) and "encoder.bias" in str(report)


def test_eight_bit_adamw_state_is_about_two_bytes_per_param():
    w = torch.nn.Parameter(torch.randn(256, 256))
    assert AdamW([w], bits=8).describe().bytes_per_param == pytest.approx(2 + 8 / 256)
    assert AdamW([w], bits=32).describe().bytes_per_param == 8


# ------------------------------------------------------------------------------------------------ bad input
def test_bad_construction_errors_name_the_culprit():
    w = torch.nn.Parameter(torch.randn(3))
    state = {"m": Q8(), "v": Q8(signed=False)}
    with pytest.raises(TypeError, match=r"unknown hyperparameter\(s\) \['betas1'\] for rule adamw"):
        Optimizer([w], rules.adamw, state, betas1=0.9)
    with pytest.raises(TypeError, match=r"param_groups\[0\]: unknown hyperparameter\(s\) \['momentum'\]"):
        Optimizer([{"params": [w], "momentum": 0.9}], rules.adamw, state)
    with pytest.raises(TypeError, match="rule made_up_rule needs hyperparameter 'lr'"):
        Optimizer([w], made_up_rule, state)
    with pytest.raises(TypeError, match=r"rule adamw takes positional arguments \(p, g, m, v\) but is called with 3"):
        Optimizer([w], rules.adamw, {"m": Q8()})
    with pytest.raises(TypeError, match="parameter param_groups\\[0\\]\\['params'\\]\\[1\\] has dtype torch.int64"):
        Optimizer([w, torch.zeros(3, dtype=torch.int64)], rules.sgd)
    with pytest.raises(TypeError, match="parameter z is complex"):
        Optimizer([("w", w), ("z", torch.nn.Parameter(torch.randn(3, dtype=torch.complex64)))], rules.sgd)
    with pytest.raises(TypeError, match="has dtype torch.float64"):
        Optimizer([torch.nn.Parameter(torch.randn(3, dtype=torch.float64))], rules.sgd)
    with pytest.raises(ValueError, match=r"\['params'\]\[1\] is on meta but the group's first parameter is on cpu"):
        Optimizer([w, torch.nn.Parameter(torch.empty(3, device="meta"))], rules.sgd)
    with pytest.raises(ValueError, match="already belongs to another param group"):
        Optimizer([{"params": [w]}, {"params": [w]}], rules.sgd)
    with pytest.raises(ValueError, match="not a leaf"):
        Optimizer([w * 2], rules.sgd)
    with pytest.raises(ValueError, match="state name 'm.x' must be a Python identifier"):
        Optimizer([w], rules.sgd_momentum, {"m.x": Q8()})
    with pytest.raises(TypeError, match="state 'm': expected a storage format"):
        Optimizer([w], rules.sgd_momentum, {"m": 8})
    with pytest.raises(TypeError, match="hyperparameter 'lr' must be a number"):
        Optimizer([w], rules.sgd, lr=[])
    with pytest.raises(ValueError, match="bits must be one of"):
        AdamW([w], bits=16)
    with pytest.raises(ValueError, match="amsgrad=True is not supported"):
        AdamW([w], amsgrad=True)


def test_sparse_gradient_is_refused():
    emb = torch.nn.Embedding(10, 4, sparse=True)
    opt = Optimizer([("emb.weight", emb.weight)], rules.sgd, lr=0.1)
    emb(torch.tensor([1, 2])).sum().backward()
    with pytest.raises(TypeError, match="parameter emb.weight has a sparse gradient"):
        opt.step()


@pytest.mark.parametrize("rule, message", [
    (lambda p, g, m, *, lr: (p - lr * g,), r"rule <lambda> returned 1 values for parameter .*; it must return 2 "
                                           r"tensors \(p, m\)"),
    (lambda p, g, m, *, lr: p - lr * g, "it must return 2 tensors"),
    (lambda p, g, m, *, lr: (p - lr * g, m.sum()), r"returned \(\) as the new 'm'"),
])
def test_rule_with_wrong_outputs_is_refused_by_name(rule, message):
    w = torch.nn.Parameter(torch.randn(5))
    opt = Optimizer([w], rule, {"m": F32()}, lr=0.1)
    w.grad = torch.randn(5)
    before = w.detach().clone()
    with pytest.raises(ValueError, match=message):
        opt.step()
    assert torch.equal(w.detach(), before)


def test_nonfinite_count_sums_groups_without_a_sync():
    a, b = torch.nn.Parameter(torch.randn(4)), torch.nn.Parameter(torch.randn(4))
    opt = Optimizer([{"params": [a]}, {"params": [b]}], rules.sgd, lr=0.1)
    a.grad = torch.tensor([float("nan"), 1.0, 1.0, 1.0])
    b.grad = torch.tensor([float("inf"), float("nan"), 1.0, 1.0])
    opt.step()
    opt.step()
    count = opt.nonfinite_count
    assert isinstance(count, torch.Tensor) and count.dtype == torch.int64 and count.item() == 6
    assert not math.isnan(a.detach()[0].item())
