"""Fresh processes: a warm inductor FX-graph cache (our pass does not run, the fused op rebuilds its kernel from its
spec) and the CPU path without the Triton interpreter (anchors decomposed to ATen for inductor's C++)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest

import lowbit_compile.backend
from lowbit_compile._compat import custom_passes
from test_backend_numerics import DEVICE

TESTS = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(TESTS)

SCRIPT = textwrap.dedent("""
    import json, sys
    import torch
    sys.path[:0] = [{root!r}, {tests!r}]
    import lowbit_compile.backend
    from lowbit_compile import formats as F
    from lowbit_compile.report import compile_report
    from test_backend_numerics import RULES, adamw, assert_problems_close, contract_step, make_problem

    problem = make_problem([(300,), (17, 20)], (F.Q8(min_quant_numel=0), F.Q4(signed=False, min_quant_numel=0)),
                           hp=RULES["adamw"][2], nonfinite=0.01, device={device!r})
    step_fn = contract_step(adamw, problem.formats)
    eager = problem.clone()
    compiled = torch.compile(step_fn, backend="lowbit")  # with inductor's caches, unlike the in-process tests
    for _ in range(2):
        compiled(*problem.args())
        step_fn(*eager.args())
    assert_problems_close(problem, eager, steps=2)
    counters = torch._dynamo.utils.counters["inductor"]
    report = compile_report()
    print(json.dumps({{"hits": counters["fxgraph_cache_hit"], "misses": counters["fxgraph_cache_miss"],
                      "launches": report.launches, "unfused": [u.reason for u in report.unfused], "note": report.note,
                      "nonfinite": int(problem.nonfinite)}}))
""")


def _run(cache_dir, device: str) -> dict:
    """The script in a fresh process on ``device``: CUDA, or the CPU with the Triton interpreter when there is no GPU
    ("cpu"), or the CPU without it ("cpu-native")."""
    env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": str(cache_dir), "TRITON_INTERPRET": "1" if device == "cpu" else "0"}
    script = SCRIPT.format(root=ROOT, tests=TESTS, device=device.removesuffix("-native"))
    done = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-4000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_warm_fx_graph_cache_runs_the_fused_op_without_the_pass(tmp_path):
    cold = _run(tmp_path, DEVICE)
    assert cold["misses"] >= 1 and cold["launches"] == 1 and cold["nonfinite"] > 0
    warm = _run(tmp_path, DEVICE)
    # The pass did not run (no report), yet the step matched eager inside the script.
    assert warm["hits"] >= 1 and warm["misses"] == 0 and warm["launches"] == 0 and not warm["unfused"], (cold, warm)
    assert warm["nonfinite"] == cold["nonfinite"]


def test_cpu_without_interpreter_decomposes_anchors_for_inductor(tmp_path):
    """No Triton on a plain CPU: the anchors become ATen before AOTAutograd, so our pass finds no region (nothing
    left unfused either) and inductor's C++ compiles the whole update; the script checked it equals eager."""
    result = _run(tmp_path, "cpu-native")
    assert result["launches"] == 0 and result["unfused"] == [] and "decomposed to ATen" in result["note"]


def test_mode_and_options_reach_inductor_and_our_pass():
    patches = lowbit_compile.backend.inductor_config_patches(
        "reduce-overhead", {"lowbit.stochastic_rounding": True, "max_autotune": False})
    assert patches["triton.cudagraphs"] is True and patches["max_autotune"] is False
    lowbit_pass = patches["post_grad_custom_pre_pass"]
    assert lowbit_pass.stochastic_rounding is True and lowbit_pass.uuid()
    assert lowbit_pass.uuid() != lowbit_compile.backend.inductor_config_patches()["post_grad_custom_pre_pass"].uuid()
    assert custom_passes(None) == () and custom_passes(lowbit_pass) == (lowbit_pass,)


@pytest.mark.parametrize("options, error", [
    ({"lowbit.stochastic": True}, "unknown lowbit option 'lowbit.stochastic'"),
    ({"lowbit.stochastic_rounding": 1}, "must be a bool"),
])
def test_bad_options_name_the_option(options, error):
    with pytest.raises((ValueError, TypeError), match=error):
        lowbit_compile.backend.inductor_config_patches(None, options)


def test_bad_mode_names_the_mode():
    with pytest.raises(ValueError, match="unknown mode 'fastest'"):
        lowbit_compile.backend.inductor_config_patches("fastest")


def test_backends_are_registered():
    from torch._dynamo.backends.registry import lookup_backend
    assert lookup_backend("lowbit") is lowbit_compile.backend.lowbit_backend
    assert lookup_backend("lowbit_aot_eager") is lowbit_compile.backend.lowbit_aot_eager_backend
