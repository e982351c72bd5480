"""Every torch/Triton version difference the compiler side depends on, in one place.

Supported: torch 2.11 (GPU machine) and 2.13+ (CPU CI), Triton 3.6.
"""
from __future__ import annotations

import os

import torch

TORCH_VERSION = tuple(int(part) for part in torch.__version__.split("+")[0].split(".")[:2])

# torch 2.13 made inductor's post-grad hooks accept a list of passes; 2.11 takes exactly one.
CUSTOM_PASS_LISTS = TORCH_VERSION >= (2, 13)


def custom_passes(configured) -> tuple:
    """The passes held by an inductor ``post_grad_custom_*_pass`` setting: None, one pass, or (2.13+) a list."""
    if configured is None:
        return ()
    if isinstance(configured, (list, tuple)):
        if not CUSTOM_PASS_LISTS:
            raise TypeError(f"torch {torch.__version__} takes one post-grad custom pass, not a list")
        return tuple(configured)
    return (configured,)


def triton_interpreting() -> bool:
    """Whether Triton kernels run under the CPU interpreter (read when ``@triton.jit`` is applied, so this must
    agree with the environment Triton was imported in)."""
    return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on", "yes")


def statically_true(condition) -> bool:
    """True when a (possibly symbolic) boolean is known to hold without adding a guard."""
    from torch.fx.experimental.symbolic_shapes import statically_known_true
    return bool(statically_known_true(condition))


def register_dynamo_backend(name: str, compiler_fn) -> None:
    """Register ``compiler_fn`` as ``torch.compile(backend=name)`` unless torch will do it itself: when torch has
    already discovered our ``torch_dynamo_backends`` entry point, it is loading this module right now and registers
    the function after the import (registering it here too would raise "duplicate name")."""
    from torch._dynamo.backends import registry
    if name in registry._COMPILER_FNS or registry._BACKENDS.get(name) is not None:
        return
    registry.register_backend(compiler_fn=compiler_fn, name=name)


__all__ = ["TORCH_VERSION", "CUSTOM_PASS_LISTS", "custom_passes", "triton_interpreting", "statically_true",
           "register_dynamo_backend"]
