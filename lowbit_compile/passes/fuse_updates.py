"""Replace every fusable update region by one ``lowbit::fused_update_`` call per device: the regions that generate
the same kernel spec are a part of it, every part runs in the same launch.

Pattern (per parameter, functional post-grad ATen)::

    x = lowbit.dequant(codes, scales, fmt, shape)          # leaves: dequant anchors, graph inputs, 0-d scalars
    ... allow-listed pointwise ops ...                     # interior
    afv2 = auto_functionalized_v2(lowbit.requant_, x=new_x, _all_bases=[codes, scales])
    copy_(codes, afv2[1]); copy_(scales, afv2[2]); copy_(param, new_p)
    copy_(counter, counter + sum(~isfinite(g)) + ...)      # accumulated full sums
    copy_(step, step + 1)                                  # 0-d write-backs

Rewrite (before the first epilogue ``copy_``)::

    lowbit.fused_update_([part 0's params..., codes..., scales..., part 1's ..., counter, step],
                         [part 0's grads..., part 1's ...], [0-d inputs...], [tensors per part], launch spec)

The regions' interiors, anchors, ``auto_functionalized_v2``/``getitem``/``copy_`` nodes and absorbed sums are
deleted, and, for launches over small tensors, the 0-d math and write-backs the launch computes itself
(``scalar_program.py``). Regions that cannot be fused are left untouched and reported (``lbc.compile_report()``).
"""
from __future__ import annotations

import dataclasses
import hashlib

import torch
from torch.fx import Graph, Node

from .._compat import triton_interpreting
from ..report import CompileReport, FusedGroup, UnfusedRegion, record
from ..templates.fused_update import KernelSpec, LaunchSpec, dtype_name, render_source
from .pointwise import Value, emit_node, op_name
from .regions import (GraphFacts, Region, block_shared_accumulations, find_regions, is_dequant, is_scalar,
                      value_of)
from .scalar_program import MOVE_MAX_AVERAGE_NUMEL, build_scalar_program

_STORE_ORDER = {"tensor": 0, "quantized": 1, "sum": 2}
_CASTS = ("prims.convert_element_type.default", "aten._to_copy.default", "aten.copy.default")


@dataclasses.dataclass
class FusedRegion:
    """A region turned into a kernel spec, with the graph nodes that fill the spec's roles."""

    region: Region
    spec: KernelSpec
    mutated: list      # per mutated role: a node, or (codes, scales) for a quantized role
    inputs: list       # per input role: the same
    scalars: list[Node]
    accumulators: list[Node]


def _structure(node: Node, region: Region, memo: dict) -> str:
    """A digest of how ``node`` is computed, blind to which parameter it belongs to: equal for the same update of
    different parameters, so their stores sort into the same order."""
    if node in memo:
        return memo[node]
    if node not in region.interior:
        val = value_of(node)
        if is_scalar(node):
            text = f"scalar:{val.dtype}"
        elif is_dequant(node):
            text = f"dequant:{node.args[2]}"
        else:
            text = f"tensor:{val.dtype}:{'written' if node in region.targets else 'read'}"
    else:
        parts = [_structure(a, region, memo) if isinstance(a, Node) else repr(a) for a in node.args]
        parts += [f"{k}={_structure(v, region, memo) if isinstance(v, Node) else repr(v)}"
                  for k, v in sorted(node.kwargs.items())]
        text = f"{op_name(node.target)}({','.join(parts)})"
    memo[node] = hashlib.sha1(text.encode()).hexdigest()
    return memo[node]


def _final_cast_source(node: Node, region: Region, dtype: torch.dtype) -> Node:
    """The store rounds to the target dtype itself (bf16: nearest-even or stochastic), so a last cast to that dtype
    is skipped and the fp32 value stored."""
    if (node in region.interior and op_name(node.target) in _CASTS and len(node.users) == 1
            and value_of(node).dtype == dtype):
        source = node.args[1] if op_name(node.target) == "aten.copy.default" else node.args[0]
        if isinstance(source, Node) and not is_scalar(source) and value_of(source).dtype == torch.float32:
            return source
    return node


def build_spec(region: Region, stochastic_rounding: bool) -> FusedRegion:
    """Generate the kernel spec of a fusable region."""
    memo: dict = {}
    stores = sorted(region.stores, key=lambda s: (_STORE_ORDER[s.kind], _structure(s.value, region, memo)))
    names: dict[Node, Value] = {}
    mutated_roles, mutated, inputs_roles, inputs, scalars, scalar_dtypes = [], [], [], [], [], []
    accumulators: list[Node] = []
    quantized_names: dict[Node, Value] = {}
    for store in stores:
        if store.kind == "tensor":
            target = store.targets[0]
            names[target] = Value(f"mut{len(mutated)}", value_of(target).dtype)
            mutated_roles.append(dtype_name(value_of(target).dtype))
            mutated.append(target)
        elif store.kind == "quantized":
            quantized_names[store.targets[0]] = Value(f"mut{len(mutated)}", torch.float32)
            mutated_roles.append(store.fmt)
            mutated.append(store.targets)
        elif store.targets[0] not in accumulators:
            accumulators.append(store.targets[0])
    body: list[str] = []

    def visit(node: Node) -> Value:
        if node in names:
            return names[node]
        val = value_of(node)
        if node not in region.interior:
            if is_scalar(node):
                value = Value(f"s{len(scalars)}", val.dtype, scalar=True)
                scalars.append(node)
                scalar_dtypes.append(dtype_name(val.dtype))
            elif is_dequant(node):
                value = quantized_names.get(node.args[0])
                if value is None:
                    value = Value(f"in{len(inputs)}", torch.float32)
                    inputs_roles.append(node.args[2])
                    inputs.append((node.args[0], node.args[1]))
            else:
                value = Value(f"in{len(inputs)}", val.dtype)
                inputs_roles.append(dtype_name(val.dtype))
                inputs.append(node)
        else:
            expression = emit_node(node, visit)
            value = Value(f"v{len(body)}", val.dtype)
            body.append(f"{value.text} = {expression}")
        names[node] = value
        return value

    outputs, sums = [], []
    for store in stores:
        if store.kind == "sum":
            sums.append((accumulators.index(store.targets[0]), visit(store.value).text))
        else:
            dtype = value_of(store.targets[0]).dtype if store.kind == "tensor" else torch.float32
            outputs.append(visit(_final_cast_source(store.value, region, dtype)).text)
    spec = KernelSpec(tuple(inputs_roles), tuple(mutated_roles), tuple(scalar_dtypes),
                      tuple(dtype_name(value_of(a).dtype) for a in accumulators), tuple(body), tuple(outputs),
                      tuple(sums), stochastic_rounding)
    return FusedRegion(region, spec, mutated, inputs, scalars, accumulators)


def _flatten(roles: list, members: list[FusedRegion], attribute: str) -> list[Node]:
    """Role by role, every member's tensor (quantized roles: all codes, then all scales)."""
    flat = []
    for index in range(len(roles)):
        first = getattr(members[0], attribute)[index]
        if isinstance(first, tuple):
            flat += [getattr(m, attribute)[index][0] for m in members]
            flat += [getattr(m, attribute)[index][1] for m in members]
        else:
            flat += [getattr(m, attribute)[index] for m in members]
    return flat


def _erase(graph: Graph, nodes: set) -> None:
    """Erase ``nodes``, users before what they use."""
    nodes = set(nodes)
    while nodes:
        free = [n for n in nodes if not n.users]
        if not free:
            raise RuntimeError(f"lowbit pass: nodes still in use after fusion: {sorted(n.name for n in nodes)}")
        for node in free:
            graph.erase_node(node)
            nodes.discard(node)


def _erase_dead(graph: Graph, candidates: set) -> None:
    """Erase the region nodes nothing reads any more (interior values, dequant anchors), users first."""
    for node in reversed(list(graph.nodes)):
        if node in candidates and not node.users:
            graph.erase_node(node)


def _fusable_on(device: torch.device) -> str | None:
    """Why regions on ``device`` are not fused, or None. The fused kernel runs where Triton runs: on CUDA tensors,
    or, under TRITON_INTERPRET=1, on CPU tensors (the interpreter cannot follow pointer tables into GPU memory)."""
    interpreting = triton_interpreting()
    if device.type == "cuda" and not interpreting or device.type == "cpu" and interpreting:
        return None
    if device.type == "cuda":
        return "TRITON_INTERPRET=1 is set: the interpreter runs only CPU tensors, so CUDA regions keep their anchors"
    return (f"regions on {device.type} keep their anchors: the fused Triton kernel runs on CUDA, or on the CPU under "
            "TRITON_INTERPRET=1 (backend='lowbit' hands plain-CPU graphs to inductor's C++ with the anchors decomposed)")


def fuse_updates(graph: Graph, *, stochastic_rounding: bool = False) -> CompileReport:
    """The rewrite; returns (and records) what it did."""
    regions, accumulations = find_regions(graph)
    candidates: list[FusedRegion] = []
    for region in regions:
        if region.blocked is None:
            why_not = _fusable_on(region.device)
            if why_not is not None:
                region.block(why_not)
                continue
            try:
                candidates.append(build_spec(region, stochastic_rounding))
            except (ValueError, KeyError, TypeError) as err:
                region.block(f"code generation failed: {err}")
    block_shared_accumulations(regions, accumulations)
    fused = [m for m in candidates if m.region.blocked is None]
    unfused = [UnfusedRegion(r.label, r.blocked, r.blocking_op) for r in regions if r.blocked is not None]

    groups: dict[tuple, list[FusedRegion]] = {}
    for member in fused:
        key = (member.spec.to_string(), member.region.device, tuple(member.scalars), tuple(member.accumulators))
        groups.setdefault(key, []).append(member)
    launches: dict[torch.device, list[list[FusedRegion]]] = {}
    for members in groups.values():
        launches.setdefault(members[0].region.device, []).append(members)

    facts = GraphFacts.of(graph)
    fused_stores = {id(s.owned[0]) for m in fused for s in m.region.stores if s.kind == "sum"}
    doomed = {n for m in fused for n in m.region.owned}
    for acc in accumulations:
        if all(id(term) in fused_stores for term in acc.terms):
            doomed |= set(acc.owned)
    removed = doomed | {n for m in fused for n in m.region.interior}
    reports, moved, written_scalars = [], set(), []
    for index, (device, parts) in enumerate(launches.items()):
        read = list(dict.fromkeys(n for members in parts for n in members[0].scalars))
        numels = [m.region.numel for members in parts for m in members]
        move = sum(n if isinstance(n, int) else 0 for n in numels) <= MOVE_MAX_AVERAGE_NUMEL * len(numels)
        program = build_scalar_program(graph, facts, read, removed, device, move=move)
        if any(facts.position[n] >= facts.position[facts.insertion_point] for n in program.inputs):
            program = build_scalar_program(graph, facts, read, removed, device, move=move, stores=False)
        accumulators = list(dict.fromkeys(a for members in parts for a in members[0].accumulators))
        launch = LaunchSpec(
            parts=tuple(members[0].spec for members in parts),
            bindings=tuple(tuple(program.names[n] for n in members[0].scalars) for members in parts),
            part_accumulators=tuple(tuple(accumulators.index(a) for a in members[0].accumulators)
                                    for members in parts),
            scalars=program.dtypes, scalar_body=tuple(program.body), stores=tuple(program.stores),
            accumulators=tuple(dtype_name(value_of(a).dtype) for a in accumulators))
        mutated, inputs = [], []
        for members in parts:
            mutated += _flatten(members[0].spec.mutated, members, "mutated")
            inputs += _flatten(members[0].spec.inputs, members, "inputs")
        mutated += accumulators + program.stored
        spec_text = launch.to_string()
        with graph.inserting_before(facts.insertion_point):
            call = graph.call_function(torch.ops.lowbit.fused_update_.default,
                                       (mutated, inputs, program.inputs, [len(m) for m in parts], spec_text))
        call.meta["val"] = None
        source = render_source(launch)
        reports += [FusedGroup(members[0].spec.to_string(), len(members), source,
                               tuple(m.region.label for m in members), str(device), index, spec_text)
                    for members in parts]
        doomed |= set(program.copies)
        moved |= program.moved
        written_scalars += [n.name for n in program.stored]

    _erase(graph, doomed)
    _erase_dead(graph, {n for m in fused for n in m.region.interior + [x for x in m.region.leaves if is_dequant(x)]}
                | moved)
    if fused:
        graph.eliminate_dead_code()  # what only the fused regions read (inductor would drop it later; the report shows the graph)

    report = CompileReport(tuple(reports), tuple(unfused), str(graph), scalar_writes=tuple(written_scalars))
    record(report)
    return report


__all__ = ["fuse_updates", "build_spec", "FusedRegion"]
