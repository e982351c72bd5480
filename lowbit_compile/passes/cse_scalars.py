"""Merge identical 0-d computations (scalar common-subexpression elimination).

Every parameter's step recomputes the same scalar expressions (``1 - beta1 ** step``, ``lr * weight_decay``) as
separate nodes, and inductor's post-grad graph keeps them apart. The fused regions read such 0-d values as kernel
scalars, and regions can only share one launch when they read the *same* scalar nodes: merging them first is what
lets N parameters become one group. Only pure, deterministic ops on 0-d values are merged; the graph is functional
at this point (mutations are in the trailing epilogue), so equal inputs give equal values.
"""
from __future__ import annotations

import torch
from torch.fx import Graph, Node

from .regions import is_scalar


def _mergeable(node: Node) -> bool:
    if node.op != "call_function" or not isinstance(node.target, torch._ops.OpOverload) or not is_scalar(node):
        return False
    schema = node.target._schema
    return not schema.is_mutable and torch.Tag.nondeterministic_seeded not in node.target.tags


def _key(value):
    if isinstance(value, (list, tuple)):
        return (type(value).__name__, tuple(_key(v) for v in value))
    if isinstance(value, dict):
        return tuple(sorted((k, _key(v)) for k, v in value.items()))
    if isinstance(value, float):
        return ("float", repr(value))  # keeps -0.0 apart from 0.0 and makes nan equal to itself
    if isinstance(value, (Node, str, int, float, bool, type(None), torch.dtype, torch.device, torch.layout,
                          torch.memory_format)):
        return (type(value).__name__, value)
    return ("id", id(value))


def cse_scalars(graph: Graph) -> int:
    """Replace each 0-d node by the first identical one; returns how many were merged."""
    first: dict = {}
    merged = 0
    for node in list(graph.nodes):
        if not _mergeable(node):
            continue
        key = (node.target, _key(node.args), _key(node.kwargs))
        kept = first.setdefault(key, node)
        if kept is not node:
            node.replace_all_uses_with(kept)
            graph.erase_node(node)
            merged += 1
    return merged


__all__ = ["cse_scalars"]
