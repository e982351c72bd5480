"""A launch's 0-d program: the hyperparameter math every program of the fused kernel computes before its part.

The fused regions read 0-d values: the learning rate, ``1 - beta1 ** step``, ``1 - lr * weight_decay``, the step
counter. Left to inductor, that math is one more kernel per step (and the step counter's ``copy_`` epilogue a write
after it); here the allow-listed pointwise ops among it move into the fused launch, where every program computes
them from the 0-d graph inputs (a few scalar instructions, exact forms: ``pointwise.py``), and a 0-d write-back such
as ``copy_(step, step + 1)`` becomes a store the launch's last program makes once every program has read the old
value (``templates/fused_update.py``).

What moves: a 0-d allow-listed pointwise node whose operands are 0-d, all of whose users move too or are nodes of
the launch's fused regions; a ``copy_`` (whose result nothing reads) into a 0-d graph input written nowhere else,
whose value moves and whose target is read only by moved nodes, fused regions and the copy itself. Anything else
the regions read stays a 0-d input of the launch, computed (if at all) by inductor as before.

Only for launches over small tensors (``MOVE_MAX_AVERAGE_NUMEL``). Every program then runs the 0-d program and
counts itself, microseconds of dependent latency before its tiles: on the H100 that made the fused kernel 2-5%
slower (8-bit AdamW on 16 x 4096^2 params: +4.7%, 4-bit +2.1%; benchmarks/results/launch_overhead.exploratory.md),
which on large tensors costs more GPU time than the separate one-element kernel saves (a few microseconds). Steps
over many small tensors are host-bound (the GPT-2-124M list: ~2 ms to enqueue, 0.8 ms of kernels, H100,
profile_steps.exploratory.md): there the GPU's extra time is hidden and one launch fewer saves host time.
"""
from __future__ import annotations

import dataclasses

import torch
from torch.fx import Graph, Node

from ..templates.fused_update import dtype_name, tl_dtype
from .pointwise import Value, emit_node, is_pointwise, operand_nodes
from .regions import GraphFacts, is_input_copy, is_scalar, value_of


@dataclasses.dataclass
class ScalarProgram:
    """``inputs`` (``x0`` ...) are loaded from the op's ``scalars``, ``stored`` (the next ``x`` names) from the tail of
    its ``mutated`` list and written with ``stores``; ``body`` lines define ``c0`` ...; ``names`` gives the launch
    value of every 0-d node the parts read; ``moved`` and ``copies`` are the graph nodes the launch replaces."""

    inputs: list[Node]
    stored: list[Node]
    body: list[str]
    stores: list[str]
    names: dict
    moved: set
    copies: list[Node]

    @property
    def dtypes(self) -> tuple[str, ...]:
        return tuple(dtype_name(value_of(n).dtype) for n in self.inputs + self.stored)


def _emittable_dtype(node: Node) -> bool:
    try:
        tl_dtype(dtype_name(value_of(node).dtype))
    except ValueError:
        return False
    return True


def _computable(node, device: torch.device) -> bool:
    """A 0-d pointwise node on ``device`` over 0-d operands of dtypes the kernel has."""
    if not (isinstance(node, Node) and node.op == "call_function" and is_pointwise(node.target)
            and is_scalar(node) and _emittable_dtype(node) and value_of(node).device == device):
        return False
    return all(is_scalar(a) and _emittable_dtype(a) for a in operand_nodes(node))


# A launch moves its 0-d math in when its tensors average at most this many elements: an 8-bit update moves 16 bytes
# an element, so 2M elements take the H100 ~11 us, about what the host spends per tensor of a compiled step
# (~14 us: GPT-2 list, 2.0 ms for 148 tensors). Above it the step is GPU-bound.
MOVE_MAX_AVERAGE_NUMEL = 2 ** 21


def build_scalar_program(graph: Graph, facts: GraphFacts, read: list[Node], fused: set, device: torch.device, *,
                         move: bool = True, stores: bool = True) -> ScalarProgram:
    """The 0-d program of the launch on ``device`` whose parts read the 0-d nodes ``read``; ``facts``: the graph's,
    from before the fusion; ``fused``: every node the fusion removes (regions' interiors and write-backs). ``move``: whether any 0-d math moves into the launch (without
    it, the parts' 0-d values are all inputs); ``stores``: whether 0-d write-backs may move. Only nodes and
    write-backs on ``device`` move (each device's launch claims its own, never another's)."""
    copies = [n for n in graph.nodes if move and stores and is_input_copy(n) and n not in fused and not n.users
              and is_scalar(n.args[0]) and value_of(n.args[0]).device == device and isinstance(n.args[1], Node)
              and facts.writes[n.args[0]] == 1]

    moved: set = set()
    pending = (list(read) if move else []) + [c.args[1] for c in copies]
    while pending:
        node = pending.pop()
        if node in moved or not _computable(node, device):
            continue
        moved.add(node)
        pending += operand_nodes(node)
    moving = [c for c in copies if c.args[1] in moved]
    changed = True
    while changed:
        changed = False
        allowed = moved | fused | set(moving)
        for node in [n for n in moved if any(u not in allowed for u in n.users)]:
            moved.discard(node)
            changed = True
        kept = [c for c in moving if c.args[1] in moved and all(u in allowed for u in c.args[0].users)]
        changed |= len(kept) != len(moving)
        moving = kept

    order = facts.position
    stored = [c.args[0] for c in moving]
    loaded = [n for n in read if n not in moved]
    loaded += [a for n in moved for a in operand_nodes(n) if a not in moved]
    inputs = sorted({n for n in loaded if n not in stored}, key=order.get)
    names = {n: f"x{i}" for i, n in enumerate(inputs + stored)}
    body = []
    for node in sorted(moved, key=order.get):
        expression = emit_node(node, lambda a: Value(names[a], value_of(a).dtype, scalar=True), scalar=True)
        names[node] = f"c{len(body)}"
        body.append(f"{names[node]} = {expression}")
    return ScalarProgram(inputs, stored, body, [names[c.args[1]] for c in moving], names, moved, moving)


__all__ = ["ScalarProgram", "build_scalar_program", "MOVE_MAX_AVERAGE_NUMEL"]
