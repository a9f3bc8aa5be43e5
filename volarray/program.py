"""A fused stage as a tile program: which region of every node a tile needs,
how to run it, and how much memory it takes.

Requirements propagate backwards one axis at a time (all local ops are
separable per axis); a node's region is the bounding box of what its consumers
read from it, clipped to the volume. Forward, each node computes exactly that
region from inputs extended by the layer's padding semantics.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .geometry import EMPTY, Box, Interval
from .ops.fill import extend, source_interval
from .trace import Graph


@dataclass
class Requirements:
    """Per axis: the interval each node computes and each edge reads."""

    node: dict[str, tuple[Interval, ...]]
    edge: dict[tuple[str, int], tuple[Interval, ...]]

    def box(self, name: str) -> Box:
        return Box(self.node[name])

    def edge_box(self, name: str, i: int) -> Box:
        return Box(self.edge[(name, i)])


def _even_border(want: Box, shape) -> tuple[int, ...]:
    """Per axis, how far ``want`` reaches outside the volume on both sides alike."""
    return tuple(max(0, min(-iv.lo, iv.hi - n)) for iv, n in zip(want.axes, shape))


class TileProgram:
    """The ops that turn a stage's source tensors into its output node, per tile."""

    def __init__(self, graph: Graph, output: str, sources: tuple[str, ...]):
        self.output = output
        self.sources = tuple(sources)
        nodes = graph.nodes
        wanted, stack = set(), [output]
        while stack:  # ancestors of the output, stopping at the sources
            n = stack.pop()
            if n in wanted:
                continue
            wanted.add(n)
            if n not in self.sources:
                stack.extend(nodes[n].inputs)
        missing = [n for n in wanted if nodes[n].op is None and n not in self.sources]
        if missing:
            raise ValueError(f"stage {output} reaches the input without it as a source")
        self.order = [n for n in nodes if n in wanted and n not in self.sources]
        self.nodes = {n: nodes[n] for n in wanted}
        # whole-volume values (norm statistics, pooled vectors) the stage reads
        self.globals = tuple(sorted({g for n in self.order for g in nodes[n].op.globals}))
        last = {}
        for i, n in enumerate(self.order):
            for p in nodes[n].inputs:
                last[p] = i
        self.last_use = last

    # ------------------------------------------------------------ geometry
    def requirements_1d(self, axis: int, out: Interval) -> tuple[dict, dict]:
        node_iv = {self.output: out}
        edge_iv = {}
        for name in reversed(self.order):
            iv = node_iv.get(name, EMPTY)
            if iv.empty:
                continue
            node = self.nodes[name]
            for i, (p, want, fill) in enumerate(zip(node.inputs, node.op.need(axis, iv),
                                                    node.op.fills)):
                edge_iv[(name, i)] = want
                src = source_interval(want, self.nodes[p].shape[axis], fill)
                node_iv[p] = node_iv.get(p, EMPTY).union(src)
        return node_iv, edge_iv

    def requirements(self, out: Box) -> Requirements:
        per_axis = [self.requirements_1d(a, iv) for a, iv in enumerate(out.axes)]
        names = set().union(*(p[0] for p in per_axis))
        edges = set().union(*(p[1] for p in per_axis))
        # a source may be read by none of the tile's voxels (a tile of padding)
        node = {n: tuple(p[0].get(n, EMPTY) for p in per_axis)
                for n in names | set(self.sources)}
        edge = {e: tuple(p[1].get(e, EMPTY) for p in per_axis) for e in edges}
        return Requirements(node, edge)

    # ------------------------------------------------------------ execution
    def run(self, ctx, sources: dict[str, torch.Tensor], req: Requirements) -> torch.Tensor:
        """``sources[name]`` covers ``req.box(name)``; returns the output region."""
        env = {n: (t, req.box(n)) for n, t in sources.items()}
        for i, name in enumerate(self.order):
            box = Box(req.node.get(name, (EMPTY,) * 3))
            if box.empty:
                continue
            node = self.nodes[name]
            ins, extra = [], {}
            for j, p in enumerate(node.inputs):
                t, have = env.get(p, (None, None))
                src = self.nodes[p]
                want = req.edge_box(name, j)
                if getattr(node.op, "native_padding", False):
                    # Let the conv zero-pad the part of the border it can pad evenly.
                    pad = _even_border(want, src.shape)
                    want = Box.from_bounds([lo + q for lo, q in zip(want.lo, pad)],
                                           [hi - q for hi, q in zip(want.hi, pad)])
                    extra = {"padding": pad}
                else:
                    extra = {}
                x = extend(t, have, want, src.shape, node.op.fills[j], src.channels, ctx.dtype,
                           ctx.device)
                # Keep every tile channels-last: crops are views and 1-channel tensors
                # are ambiguous, and a conv given NCDHW would answer in NCDHW.
                ins.append(x.contiguous(memory_format=torch.channels_last_3d))
            y = node.op.run(ctx, ins, box, **extra)
            if tuple(y.shape[2:]) != box.shape:
                raise RuntimeError(f"volarray internal error: {node.where} produced a tile of "
                                   f"shape {tuple(y.shape[2:])} for region {box}")
            env[name] = (y, box)
            for p in node.inputs:
                if self.last_use.get(p) == i:
                    env.pop(p, None)
        return env[self.output][0]

    # ------------------------------------------------------------ cost
    def peak_bytes(self, node_shapes: dict[str, tuple[int, ...]], itemsize: int = 4) -> int:
        """Projected peak of live tensors for a tile whose nodes have the given region
        shapes: sources, each op's padded input copies and its output."""
        def nbytes(name, shape=None):
            shape = node_shapes.get(name) if shape is None else shape
            if not shape:
                return 0
            return self.nodes[name].channels * itemsize * int(torch.tensor(shape).prod())
        live = {s: nbytes(s) for s in self.sources}
        peak = sum(live.values())
        for i, name in enumerate(self.order):
            node = self.nodes[name]
            padded = node.op.fills and node.op.fills[0].mode != "inside"
            temps = sum(nbytes(p) for p in node.inputs) if padded else 0
            out = nbytes(name)
            if node.op.scratch_channels:
                out += out // max(node.channels, 1) * node.op.scratch_channels
            peak = max(peak, sum(live.values()) + temps + out)
            live[name] = out
            for p in node.inputs:
                if self.last_use.get(p) == i:
                    live.pop(p, None)
        return peak
