"""The ``torch.compile`` backends: ``backend="lowbit"`` and ``backend="lowbit_aot_eager"``.

``lowbit`` is inductor with the lowbit pass installed as its ``post_grad_custom_pre_pass``: every optimizer-update
region (dequant -> pointwise math -> requant) becomes part of one multi-tensor launch of a generated Triton kernel
per device (one part per kernel spec), and inductor compiles the rest. ``mode`` and ``options`` are passed to inductor (``mode="reduce-overhead"``
gives CUDA graphs); options named ``lowbit.*`` configure the pass:

* ``lowbit.stochastic_rounding`` (bool, default False): bf16 parameters/states written with stochastic rounding.

Inductor's options default to ``DEFAULT_INDUCTOR_OPTIONS`` here (size asserts off, side-by-side fusion of nodes that
share no input on); ``options={"size_asserts": True}`` and the like override them.

On a CPU without ``TRITON_INTERPRET=1`` (no Triton backend there) the anchors are decomposed into ATen before
inductor sees the graph, so inductor's C++ fuses dequantize -> rule -> requantize itself; under the interpreter the
regions run our Triton kernel (tests).

``lowbit_aot_eager`` runs the same pass on the aot-autograd graph and executes it eagerly, without inductor: quick to
compile and easy to debug.
"""
from __future__ import annotations

import torch
from torch._dynamo.backends.common import aot_autograd

from . import ops
from ._compat import custom_passes, register_dynamo_backend, triton_interpreting
from .passes import LowbitPass
from .report import CompileReport, record
from .templates import fused_update  # noqa: F401  (registers lowbit::fused_update_ for cached graphs too)

PASS_OPTIONS = {"stochastic_rounding": bool}
# An optimizer step's graph takes every parameter, gradient and state tensor as an input; inductor's per-input size and
# stride asserts then cost more host time per step than the launches (~0.6 µs a tensor, ~0.4 ms for the GPT-2 list,
# H100, benchmarks/results/profile_steps.exploratory.md run 2). Dynamo's guards already check each input's sizes and
# strides before the graph runs.
# aggressive_fusion and score_fusion_memory_threshold 0: a step's 0-d hyperparameter math (step counter, bias
# corrections, 1 - beta, 1 - lr * wd) is a handful of nodes that share no input, and inductor's Triton scheduler
# fuses nodes side by side only when they share reads: an AdamW step ran 4 one-element kernels besides its fused
# updates on the H100, with these settings 1 (the C++ backend fused them already). Shampoo's compiled step timed the
# same with and without (H100 A/B: benchmarks/results/inductor_fusion.exploratory.md).
DEFAULT_INDUCTOR_OPTIONS = {"size_asserts": False, "aggressive_fusion": True, "score_fusion_memory_threshold": 0}


def _split_options(options: dict | None) -> tuple[dict, dict]:
    """``lowbit.*`` options for our pass, the rest for inductor."""
    ours, theirs = {}, {}
    for key, value in (options or {}).items():
        if key.startswith("lowbit."):
            name = key[len("lowbit."):]
            if name not in PASS_OPTIONS:
                raise ValueError(f"options: unknown lowbit option {key!r}; known: "
                                 f"{sorted('lowbit.' + k for k in PASS_OPTIONS)}")
            if not isinstance(value, PASS_OPTIONS[name]):
                raise TypeError(f"options: {key!r} must be a {PASS_OPTIONS[name].__name__}, got {value!r}")
            ours[name] = value
        else:
            theirs[key] = value
    return ours, theirs


def _mode_options(mode: str | None) -> dict:
    if mode is None:
        return {}
    from torch._inductor import list_mode_options
    modes = list_mode_options()
    if mode not in modes:
        raise ValueError(f"mode: unknown mode {mode!r}; known: {sorted(modes)}")
    return dict(modes[mode])


def inductor_config_patches(mode: str | None = None, options: dict | None = None, *, fuse: bool = True) -> dict:
    """The inductor configuration ``lowbit_backend`` compiles with: the mode's presets, the user's options, and (with
    ``fuse``) our pass in front of any ``post_grad_custom_pre_pass`` already configured."""
    ours, theirs = _split_options(options)
    patches = {**DEFAULT_INDUCTOR_OPTIONS, **_mode_options(mode), **theirs}
    if fuse:
        configured = patches.pop("post_grad_custom_pre_pass", torch._inductor.config.post_grad_custom_pre_pass)
        patches["post_grad_custom_pre_pass"] = LowbitPass(**ours, then=custom_passes(configured))
    return patches


def _runs_on_cpu_without_triton(example_inputs) -> bool:
    tensors = [t for t in example_inputs if isinstance(t, torch.Tensor)]
    return not triton_interpreting() and all(t.device.type == "cpu" for t in tensors)


def lowbit_backend(gm: torch.fx.GraphModule, example_inputs, mode: str | None = None, options: dict | None = None):
    """``torch.compile(fn, backend="lowbit", mode=..., options=...)``."""
    from torch._inductor.compile_fx import compile_fx
    fuse = not _runs_on_cpu_without_triton(example_inputs)
    if not fuse:
        _decompose_anchors(gm)
        record(CompileReport(note="CPU without Triton: anchors decomposed to ATen, inductor's C++ compiles the update"))
    return compile_fx(gm, example_inputs, config_patches=inductor_config_patches(mode, options, fuse=fuse))


def _decompose_anchors(gm: torch.fx.GraphModule) -> None:
    """Point the Dynamo graph's anchor calls at their ATen bodies, so AOTAutograd traces plain ATen that inductor
    fuses (an inductor decomposition table cannot do this: inductor refuses a decomposition for an op it also
    falls back to)."""
    aten_body = {**ops.ATEN_DECOMPOSITIONS, torch.ops.lowbit.dequant: ops.dequant_as_aten,
                 torch.ops.lowbit.requant_: ops.requant_as_aten}
    for node in gm.graph.nodes:
        if node.op == "call_function" and node.target in aten_body:
            node.target = aten_body[node.target]
    gm.recompile()


def lowbit_aot_eager_backend(gm: torch.fx.GraphModule, example_inputs, mode: str | None = None,
                             options: dict | None = None):
    """``torch.compile(fn, backend="lowbit_aot_eager")``: our pass on the aot-autograd graph, run eagerly."""
    if mode not in (None, "default"):
        raise ValueError(f"mode: lowbit_aot_eager runs without inductor and has no modes, got {mode!r}")
    ours, theirs = _split_options(options)
    if theirs:
        raise ValueError(f"options: lowbit_aot_eager takes only lowbit.* options, got {sorted(theirs)}")
    lowbit_pass = LowbitPass(**ours)
    from functorch.compile import make_boxed_func

    def compile_with_pass(graph_module: torch.fx.GraphModule, inputs):
        lowbit_pass(graph_module.graph)
        graph_module.recompile()
        return make_boxed_func(graph_module.forward)

    def compile_backward(graph_module: torch.fx.GraphModule, inputs):
        return make_boxed_func(graph_module.forward)

    return aot_autograd(fw_compiler=compile_with_pass, inference_compiler=compile_with_pass,
                        bw_compiler=compile_backward, keep_inference_input_mutations=True)(gm, example_inputs)


register_dynamo_backend("lowbit", lowbit_backend)
register_dynamo_backend("lowbit_aot_eager", lowbit_aot_eager_backend)

__all__ = ["lowbit_backend", "lowbit_aot_eager_backend", "inductor_config_patches", "LowbitPass"]
