"""FX passes of the lowbit backend, run on inductor's functional post-grad graph (or the aot-eager graph).

``LowbitPass`` is the ``post_grad_custom_pre_pass`` the backend installs: ``cse_scalars`` (so every parameter's
region reads the same scalar nodes), then ``fuse_updates`` (regions -> one ``lowbit::fused_update_`` per device, a
part per kernel spec), then any pass the user had configured. Its ``uuid`` hashes the sources of everything that decides the
rewrite and the generated kernels, so inductor's FX-graph cache stays valid and is invalidated by any change.
"""
from __future__ import annotations

import hashlib
import os

import torch
from torch._inductor.custom_graph_pass import CustomGraphPass
from torch.fx import Graph

from .._compat import triton_interpreting
from . import cse_scalars, fuse_updates

_PACKAGE = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_SOURCES = ("_compat.py", "formats.py", "ops.py", "report.py", "passes/__init__.py", "passes/cse_scalars.py",
            "passes/pointwise.py", "passes/regions.py", "passes/scalar_program.py", "passes/fuse_updates.py",
            "templates/codecs.py", "templates/fused_update.py")


def _sources_digest() -> str:
    digest = hashlib.sha256()
    for name in _SOURCES:
        with open(os.path.join(_PACKAGE, name), "rb") as f:
            digest.update(name.encode() + b"\0" + f.read())
    return digest.hexdigest()


class LowbitPass(CustomGraphPass):
    """Fuse dequant -> pointwise update -> requant regions into multi-tensor Triton launches.

    ``stochastic_rounding``: bf16 parameters and states are written with stochastic instead of nearest rounding.
    ``then``: passes to run after ours (the user's own ``post_grad_custom_pre_pass``)."""

    def __init__(self, *, stochastic_rounding: bool = False, then: tuple = ()):
        self.stochastic_rounding = stochastic_rounding
        self.then = tuple(then)

    def __call__(self, graph: Graph) -> None:
        cse_scalars.cse_scalars(graph)
        fuse_updates.fuse_updates(graph, stochastic_rounding=self.stochastic_rounding)
        for user_pass in self.then:
            user_pass(graph)

    def uuid(self):
        chained = []
        for user_pass in self.then:
            user_uuid = user_pass.uuid() if isinstance(user_pass, CustomGraphPass) else None
            if user_uuid is None:
                return None  # a pass inductor cannot identify: no caching, as inductor does for it alone
            chained.append(repr(user_uuid))
        import triton
        key = [_sources_digest(), torch.__version__, triton.__version__, f"sr={self.stochastic_rounding}",
               f"interpret={triton_interpreting()}", *chained]
        return hashlib.sha256("\n".join(key).encode()).hexdigest()


__all__ = ["LowbitPass"]
