"""Find the update regions of a functional post-grad graph and decide which of them can be fused.

A region is what one parameter's optimizer step computes elementwise. Its **stores** are where values leave it:

* ``requant_`` anchors, seen as ``auto_functionalized_v2(lowbit.requant_, x=...)`` whose two ``getitem`` results are
  copied back into the codes/scales graph inputs (quantized state);
* ``copy_(input, value)`` epilogues into non-0-d graph inputs (the parameter, plain state);
* full sums accumulated into a 0-d graph input: ``copy_(acc, acc + sum(e1) + sum(e2) ...)`` (the non-finite counter).

Walking back from each store's value through the allow-listed pointwise ops (``pointwise.py``) ends at **leaves**:
``dequant`` anchors, non-0-d graph inputs and whole tensors computed by other (non-pointwise) ops (tensors the kernel
loads) and 0-d values (scalars the kernel reads: hyperparameters, the step, scalar math on them, constants). Stores
whose walks share a tensor node form one region.

A region is fusable when every walk ends at leaves, nothing outside the region reads its values, the tensors it
writes are graph inputs written only by it and read by nothing after the fused op, the tensors it only reads are
never written, and no written tensor shares storage with another tensor of the region. A region that fails keeps
its anchors and runs correctly in eager form; the reason and the op that blocked it are recorded.
"""
from __future__ import annotations

import collections
import dataclasses
import operator

import torch
from torch.fx import Graph, Node
from torch.multiprocessing.reductions import StorageWeakRef

from .._compat import statically_true
from ..templates.fused_update import ACCUMULATOR_DTYPES, PLAIN_TENSOR_DTYPES, dtype_name, tl_dtype
from .pointwise import VIEWS, is_pointwise, op_name, operand_nodes

DEQUANT = "lowbit.dequant.default"
REQUANT = "lowbit.requant_.default"
COPY_ = "aten.copy_.default"
ADD = "aten.add.Tensor"
SUMS = ("aten.sum.default", "aten.sum.dim_IntList")


def value_of(node) -> torch.Tensor | None:
    val = node.meta.get("val") if isinstance(node, Node) else None
    return val if isinstance(val, torch.Tensor) else None


def is_scalar(node) -> bool:
    val = value_of(node)
    return val is not None and val.dim() == 0


def is_requant(node: Node) -> bool:
    return (node.op == "call_function" and node.target is torch.ops.higher_order.auto_functionalized_v2
            and op_name(node.args[0]) == REQUANT)


def is_dequant(node: Node) -> bool:
    return node.op == "call_function" and op_name(node.target) == DEQUANT


def is_input_copy(node: Node) -> bool:
    return (node.op == "call_function" and op_name(node.target) == COPY_ and isinstance(node.args[0], Node)
            and node.args[0].op == "placeholder")


@dataclasses.dataclass(eq=False)
class Store:
    """Where a value leaves a region. ``targets``: the graph input written ((codes, scales) for quantized state,
    the accumulator for a sum); ``owned``: the nodes that disappear when the region is fused."""

    kind: str  # "tensor" | "quantized" | "sum"
    value: Node
    targets: tuple[Node, ...]
    owned: list[Node]
    fmt: str | None = None
    problem: str | None = None
    accumulation: "Accumulation | None" = None  # a sum's chain of adds into its accumulator

    @property
    def label(self) -> str:
        names = "/".join(t.name for t in self.targets)
        return {"tensor": f"copy_ into {names}", "quantized": f"requant_ ({self.fmt}) into {names}",
                "sum": f"sum into {names}"}[self.kind]


@dataclasses.dataclass(eq=False)
class Accumulation:
    """``copy_(target, target + sum(...) + ...)``: the sums (``terms``) become stores of the regions they sum."""

    target: Node
    terms: list[Node]
    owned: list[Node]


@dataclasses.dataclass(eq=False)
class Region:
    stores: list[Store]
    interior: list[Node]  # allow-listed pointwise nodes, in graph order
    leaves: list[Node]    # graph inputs, dequant anchors and 0-d values the interior reads, in graph order
    numel: object = None
    device: torch.device | None = None
    blocked: str | None = None
    blocking_op: str | None = None

    @property
    def label(self) -> str:
        return ", ".join(s.label for s in self.stores)

    @property
    def targets(self) -> list[Node]:
        return [t for s in self.stores for t in s.targets]

    @property
    def owned(self) -> list[Node]:
        return [n for s in self.stores for n in s.owned]

    def block(self, reason: str, op: str | None = None) -> None:
        if self.blocked is None:
            self.blocked, self.blocking_op = reason, op


# --------------------------------------------------------------------------------------------------------------
# Stores
# --------------------------------------------------------------------------------------------------------------
def _requant_store(node: Node) -> Store:
    kwargs = node.kwargs
    bases = kwargs.get("_all_bases", [])
    targets, owned, problem = [], [node], None
    for arg in ("codes", "absmax"):
        index = kwargs.get(f"_{arg}_base_index")
        if index is None or any(f"_{arg}_{key}" in kwargs for key in ("size", "stride", "storage_offset", "slice_dim")):
            problem = f"requant_'s {arg} is a view, not a graph input"
            targets.append(bases[index] if index is not None else node)
            continue
        base = bases[index]
        targets.append(base)
        if base.op != "placeholder":
            problem = f"requant_'s {arg} ({base.name}) is not a graph input"
        written_back = [u for u in node.users if u.args[1] == index + 1]
        copies = [c for g in written_back for c in g.users]
        if (len(written_back) != 1 or len(copies) != 1 or not is_input_copy(copies[0])
                or copies[0].args[0] is not base):
            problem = problem or f"requant_'s new {arg} is not written straight back to {base.name}"
        owned += written_back + copies
    return Store("quantized", kwargs["x"], tuple(targets), owned, kwargs.get("fmt"), problem)


def _accumulation(copy: Node) -> Accumulation | None:
    """Parse ``copy_(acc, acc + sum(e1) + ... )``; None when the value is anything else."""
    target, chain_top = copy.args
    terms, chain, pending, seen_target = [], [], [chain_top], 0
    while pending:
        node = pending.pop()
        if node is target:
            seen_target += 1
        elif isinstance(node, Node) and op_name(node.target) == ADD and len(node.users) == 1 and is_scalar(node) \
                and not node.kwargs:
            chain.append(node)
            pending += list(node.args)
        elif isinstance(node, Node) and op_name(node.target) in SUMS and len(node.users) == 1 and _full_sum(node):
            terms.append(node)
        else:
            return None
    if seen_target != 1 or not terms:
        return None
    return Accumulation(target, terms, chain + [copy])


def _full_sum(node: Node) -> bool:
    source = value_of(node.args[0])
    if source is None or node.kwargs.get("dtype") is not None:
        return False
    if op_name(node.target) == "aten.sum.default":
        return True
    dims = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim")
    keepdim = node.args[2] if len(node.args) > 2 else node.kwargs.get("keepdim", False)
    if keepdim or dims is None:
        return False
    return sorted(d % max(source.dim(), 1) for d in dims) == list(range(source.dim()))


def find_stores(graph: Graph) -> tuple[list[Store], list[Accumulation]]:
    stores, accumulations = [], []
    for node in graph.nodes:
        if is_requant(node):
            stores.append(_requant_store(node))
        elif is_input_copy(node):
            target, value = node.args
            if not isinstance(value, Node):
                continue
            if value.target is operator.getitem and is_requant(value.args[0]):
                continue  # part of a requant_ store
            if is_scalar(target):
                accumulation = _accumulation(node)
                if accumulation is not None:
                    accumulations.append(accumulation)
                    stores += [Store("sum", term.args[0], (target,), [term], accumulation=accumulation)
                               for term in accumulation.terms]
            elif not is_scalar(value):
                stores.append(Store("tensor", value, (target,), [node]))
            # 0-d updates (a step counter, a 0-d parameter) and fills with a scalar stay with inductor.
    return stores, accumulations


# --------------------------------------------------------------------------------------------------------------
# Walks
# --------------------------------------------------------------------------------------------------------------
@dataclasses.dataclass
class Walk:
    interior: set
    leaves: set
    problem: tuple[str, str | None] | None = None


def _same_numel(node: Node, numel) -> bool:
    val = value_of(node)
    return val is not None and statically_true(val.numel() == numel)


def walk(store: Store) -> Walk:
    """Everything ``store.value`` is computed from, back to the leaves. The walk goes on past a node the kernel
    cannot compute (recording the first such problem), so that everything entangled with it ends up in one region."""
    numel = value_of(store.value).numel()
    result = Walk(set(), set())
    pending, seen = [store.value], set()

    def problem(reason: str, op: str | None) -> None:
        result.problem = result.problem or (reason, op)

    while pending:
        node = pending.pop()
        if node in seen:
            continue
        seen.add(node)
        if is_scalar(node):
            result.leaves.add(node)
            continue
        op = op_name(node.target) if node.op == "call_function" else node.op
        if value_of(node) is None:
            problem(f"{node.name} ({op}) is not a tensor the kernel can read", op)
            continue
        if node.op == "placeholder" or is_dequant(node):
            if not _same_numel(node, numel):
                problem(f"{node.name} has shape {tuple(value_of(node).shape)}, not the {numel} elements of the "
                        f"update", None)
            result.leaves.add(node)
            continue
        computable = node.op == "call_function" and is_pointwise(node.target)
        if not computable and node.op == "call_function" and _same_numel(node, numel):
            # A whole tensor computed by an op the kernel cannot run (a matmul, a foreach op) is loaded like a graph
            # input: an update whose input is computed in the same graph (Shampoo's grafted direction) still fuses.
            result.leaves.add(node)
            continue
        operands = operand_nodes(node)
        pending += operands
        if not computable:
            problem(f"{node.name} = {op} is not an elementwise op the fused kernel computes", op)
        elif not _same_numel(node, numel):
            val = value_of(node)
            problem(f"{node.name} = {op} has shape {tuple(val.shape) if val is not None else '?'}, not the {numel} "
                    f"elements of the update", op)
        elif op in VIEWS and not all(is_scalar(a) or value_of(a).is_contiguous() for a in operands):
            problem(f"{node.name} = {op} views a non-contiguous tensor", op)
        else:
            result.interior.add(node)
            continue
        result.interior.add(node)  # not computable, but part of the region for grouping and reporting
    return result


# --------------------------------------------------------------------------------------------------------------
# Regions and legality
# --------------------------------------------------------------------------------------------------------------
def _group_stores(stores: list[Store], walks: dict) -> list[list[Store]]:
    """Stores whose walks share a tensor node belong to the same region (union-find)."""
    parent = list(range(len(stores)))

    def find(i):
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    owner = {}
    for i, store in enumerate(stores):
        w = walks[store]
        for node in list(w.interior) + [n for n in w.leaves if not is_scalar(n)] + [store.value]:
            if node in owner:
                parent[find(i)] = find(owner[node])
            else:
                owner[node] = i
    groups = collections.defaultdict(list)
    for i, store in enumerate(stores):
        groups[find(i)].append(store)
    return list(groups.values())


@dataclasses.dataclass
class GraphFacts:
    """What legality needs to know about the whole graph."""

    position: dict
    writes: collections.Counter      # graph input -> number of stores/copies writing it
    insertion_point: Node | None     # where fused ops go: before the first epilogue copy_

    @classmethod
    def of(cls, graph: Graph) -> "GraphFacts":
        position = {node: i for i, node in enumerate(graph.nodes)}
        # Only the epilogue writes inputs: auto_functionalized_v2 computes new values for its bases and the copy_
        # that follows writes them.
        writes = collections.Counter(node.args[0] for node in graph.nodes if is_input_copy(node))
        return cls(position, writes, epilogue_start(graph))


def epilogue_start(graph: Graph) -> Node | None:
    """The first ``copy_`` into a graph input: fused ops go right before it, after everything they read is
    computed and before any input is written."""
    return next((node for node in graph.nodes if is_input_copy(node)), None)


def _storage(node: Node):
    val = value_of(node)
    try:
        return StorageWeakRef(val.untyped_storage()) if val is not None else None
    except (NotImplementedError, RuntimeError):
        return None


def _check(region: Region, walks: dict, facts: GraphFacts) -> None:
    for store in region.stores:
        if store.problem:
            return region.block(store.problem, REQUANT)
        if walks[store].problem:
            return region.block(*walks[store].problem)
    numels = [value_of(s.value).numel() for s in region.stores]  # maybe symbolic (unhashable)
    region.numel = numels[0]
    if not all(statically_true(n == region.numel) for n in numels):
        return region.block(f"its stores have different element counts {[str(n) for n in numels]}")
    tensors = [n for n in region.leaves if not is_scalar(n)] + region.targets
    devices = {value_of(n).device for n in tensors}
    if len(devices) != 1:
        return region.block(f"its tensors are on several devices {sorted(map(str, devices))}")
    region.device = devices.pop()

    members = set(region.interior) | {n for n in region.leaves if is_dequant(n)}
    allowed = members | set(region.owned)
    for node in sorted(members, key=facts.position.get):
        for user in node.users:
            if user not in allowed:
                reader = _consumer(user)
                op = op_name(reader.target) if reader.op == "call_function" else reader.op
                return region.block(f"{node.name} is also read by {reader.name} = {op} outside the update", op)

    targets = region.targets
    allowed |= {n for s in region.stores if s.accumulation for n in s.accumulation.owned}
    reads = {leaf for leaf in region.leaves if leaf.op == "placeholder"}
    quantized_reads = {a: leaf for leaf in region.leaves if is_dequant(leaf) for a in leaf.args[:2]}
    for target in targets:
        if facts.writes[target] != 1:
            return region.block(f"{target.name} is written {facts.writes[target]} times in the graph")
        if target in reads and is_scalar(target):
            return region.block(f"{target.name} is both read and accumulated into")
        for user in target.users:
            if user not in allowed and facts.position[user] >= facts.position[facts.insertion_point]:
                return region.block(f"{target.name} is read by {user.name} after the update")
    quantized_stores = {t: s for s in region.stores if s.kind == "quantized" for t in s.targets}
    for tensor, leaf in quantized_reads.items():
        if not (isinstance(tensor, Node) and tensor.op == "placeholder"):
            return region.block(f"dequant reads {tensor}, which is not a graph input", DEQUANT)
        store = quantized_stores.get(tensor)
        if store is None and facts.writes[tensor]:
            return region.block(f"{tensor.name} is read by dequant and written elsewhere in the graph")
        if store is not None and store.fmt != leaf.args[2]:
            return region.block(f"{tensor.name} is read as {leaf.args[2]} but written as {store.fmt}")
        if store is not None and (store.targets[0] is not leaf.args[0] or store.targets[1] is not leaf.args[1]):
            return region.block(f"dequant's codes and scales ({leaf.args[0]}, {leaf.args[1]}) are written as "
                                f"another pair")
    for leaf in reads:
        if leaf not in targets and facts.writes[leaf] and not is_scalar(leaf):
            return region.block(f"{leaf.name} is read by the update and written elsewhere in the graph")

    storages = collections.Counter(_storage(n) for n in set(tensors) | set(quantized_reads) | reads)
    for target in targets:
        if storages[_storage(target)] > 1:
            return region.block(f"{target.name} shares its storage with another tensor of the update")

    computed = {n for n in region.leaves if n.op == "call_function" and not is_scalar(n) and not is_dequant(n)}
    if computed and not region.interior:
        return region.block("it only copies tensors computed by other ops (nothing to fuse; inductor re-inplaces them)")
    plain = ({n for n in reads if not is_scalar(n)} | computed
             | {t for s in region.stores if s.kind == "tensor" for t in s.targets})
    if not plain:
        return region.block("it reads and writes no plain tensor (the parameter), which gives the element count")
    for node in sorted(plain, key=facts.position.get):
        if dtype_name(value_of(node).dtype) not in PLAIN_TENSOR_DTYPES:
            return region.block(f"{node.name} has dtype {value_of(node).dtype}; the fused kernel loads "
                                f"{', '.join(PLAIN_TENSOR_DTYPES)}")
        if not value_of(node).is_contiguous():
            return region.block(f"{node.name} is not contiguous")
    for leaf in region.leaves:
        if is_scalar(leaf):
            try:
                tl_dtype(dtype_name(value_of(leaf).dtype))
            except ValueError:
                return region.block(f"the scalar {leaf.name} has dtype {value_of(leaf).dtype}")
    for store in region.stores:
        if store.kind == "sum":
            acc, term = value_of(store.targets[0]), value_of(store.owned[0])
            if dtype_name(acc.dtype) not in ACCUMULATOR_DTYPES or acc.dtype != term.dtype:
                return region.block(f"sum of {term.dtype} into {store.targets[0].name} ({acc.dtype})")
    order = facts.position
    if facts.insertion_point is None or any(order[n] >= order[facts.insertion_point] for n in region.leaves):
        return region.block("its inputs are computed after the graph's write-back epilogue begins")


def _consumer(node: Node) -> Node:
    """The first op past ``node`` that is not pointwise (what really takes the value out of the region), for
    reports: ``m.abs().amax()`` is blocked by the ``amax``, not the ``abs``."""
    pending, seen = [node], set()
    while pending:
        current = pending.pop(0)
        if current in seen:
            continue
        seen.add(current)
        if current.op != "call_function" or not is_pointwise(current.target):
            return current
        pending += list(current.users)
    return node


def find_regions(graph: Graph) -> tuple[list[Region], list[Accumulation]]:
    """All update regions of ``graph``, each either fusable (``blocked is None``) or with the reason it is not."""
    stores, accumulations = find_stores(graph)
    walks = {s: walk(s) for s in stores}
    facts = GraphFacts.of(graph)
    regions = []
    for group in _group_stores(stores, walks):
        interior = set().union(*(walks[s].interior for s in group))
        leaves = set().union(*(walks[s].leaves for s in group)) - interior
        region = Region(group, sorted(interior, key=facts.position.get), sorted(leaves, key=facts.position.get))
        _check(region, walks, facts)
        regions.append(region)
    block_shared_accumulations(regions, accumulations)
    return regions, accumulations


def block_shared_accumulations(regions: list[Region], accumulations: list[Accumulation]) -> None:
    """An accumulator is absorbed into the fused kernels only if all its sums are: otherwise every region summing
    into it stays unfused too (its epilogue adds the sums up as before)."""
    region_of = {id(s.owned[0]): r for r in regions for s in r.stores if s.kind == "sum"}
    changed = True
    while changed:
        changed = False
        for acc in accumulations:
            owners = [region_of.get(id(term)) for term in acc.terms]
            if any(r is None or r.blocked for r in owners):
                for r in owners:
                    if r is not None and r.blocked is None:
                        r.block(f"it shares the accumulator {acc.target.name} with an update that is not fused")
                        changed = True


__all__ = ["Store", "Accumulation", "Region", "Walk", "GraphFacts", "find_stores", "find_regions", "walk",
           "epilogue_start", "block_shared_accumulations", "is_scalar", "is_dequant", "is_requant", "value_of"]
