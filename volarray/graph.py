"""The captured IR: what every layer below the front doors reads.

A `Graph` is a model traced for one input shape (`volarray.trace`): its spatial nodes in
topological order, each with the whole-volume shape of its output, its channels, its
grid ratio to the input and its tile op (`volarray.ops`), and the whole-volume values
(norm statistics, pooled vectors) the ops read. A graph is frozen once built: a plan
holds it, workers read it, and a rewrite (`volarray.ops.conv.fuse_argmax_head`) makes a
new one. Sizes in bytes come from the graph's dtype.

This module imports nothing else of volarray: it is the bottom of the planning layers.
"""
from __future__ import annotations

import functools
import math
from dataclasses import dataclass, field
from fractions import Fraction
from types import MappingProxyType
from typing import Mapping

import torch
import torch.fx as fx


@dataclass(frozen=True)
class Node:
    name: str
    op: object | None  # the node's LocalOp (volarray.ops.base); None for the input
    inputs: tuple[str, ...]  # spatial producers, in the op's argument order
    shape: tuple[int, int, int]  # whole-volume spatial shape of this node's output
    channels: int
    scale: tuple[Fraction, Fraction, Fraction]  # grid ratio to the model input
    where: str  # module path / call, for messages


@dataclass(frozen=True, eq=False)
class Graph:
    gm: fx.GraphModule
    nodes: Mapping[str, Node]  # spatial nodes, topological order; the first is the input
    input: str
    output: str
    dtype: torch.dtype
    # whole-volume values (GlobalNode of volarray.ops.reduce), topological order
    globals: Mapping[str, object] = field(default_factory=dict)

    def __post_init__(self):
        object.__setattr__(self, "nodes", MappingProxyType(dict(self.nodes)))
        object.__setattr__(self, "globals", MappingProxyType(dict(self.globals or {})))

    @functools.cached_property
    def order(self) -> dict[str, int]:
        """Each spatial node's position in topological order (to sort a stage's sources);
        a dict, so that a graph that has computed it still pickles."""
        return {n: i for i, n in enumerate(self.nodes)}

    @functools.cached_property
    def float_scales(self) -> dict[str, tuple[float, ...]]:
        """Each spatial node's scale as floats (cost estimates run through thousands of
        them; a Fraction's float() is slow)."""
        return {n: tuple(float(v) for v in node.scale) for n, node in self.nodes.items()
                if node.scale is not None}

    @property
    def value_bytes(self) -> int:
        """Bytes of one value of the graph's tensors (4 for float32, 2 for float16)."""
        return self.dtype.itemsize

    def consumers(self) -> dict[str, list[str]]:
        out = {n: [] for n in self.nodes}
        for node in self.nodes.values():
            for p in node.inputs:
                out[p].append(node.name)
        return out


def tensor_bytes(graph: Graph, name: str) -> int:
    """The whole-volume bytes of node ``name``'s output."""
    node = graph.nodes[name]
    return node.channels * graph.value_bytes * math.prod(node.shape)


def alignment(graph: Graph) -> tuple[int, ...]:
    """Chunk sides that map to whole voxels on every level (cumulative stride)."""
    out = []
    for axis in range(3):
        den = 1
        for node in graph.nodes.values():
            s = node.scale[axis]
            if s < 1:
                den = math.lcm(den, Fraction(s).denominator)
        out.append(den)
    return tuple(out)
