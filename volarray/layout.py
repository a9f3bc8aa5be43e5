"""Channels moved last and back around per-voxel ops, as one per-voxel op.

ConvNeXt and MedNeXt blocks (and many others) write
``x.permute(0, 2, 3, 4, 1) -> LayerNorm(C) / Linear(C, C') / GELU -> permute(0, 4, 1, 2, 3)``.
Each op in between acts on one voxel's channel vector, so the whole chain is local with
no halo. This pass replaces such a chain in the captured graph by one module,
`ChannelsLastBlock`, that the tile program runs like any pointwise op. Which ops are
per voxel is the op registry's to say (``per_voxel`` in `volarray.ops.table`).
"""
from __future__ import annotations

import torch
import torch.fx as fx

from .ops.channels import ChannelsLastBlock
from .ops.table import OPS

TO_LAST = (0, 2, 3, 4, 1)
TO_FIRST = (0, 4, 1, 2, 3)


def _dims(node: fx.Node):
    args = node.args[1:]
    if len(args) == 1 and isinstance(args[0], (list, tuple)):
        args = args[0]
    return tuple(args) if all(isinstance(a, int) for a in args) else None


def _is_permute(node: fx.Node, dims) -> bool:
    return (node.op == "call_method" and node.target == "permute" and _dims(node) == dims) or (
        node.op == "call_function" and node.target is torch.permute and
        tuple(node.args[1]) == dims)


def _per_voxel(node: fx.Node, prev: fx.Node, modules) -> bool:
    """``node`` reads ``prev`` and otherwise only parameters and numbers."""
    others = [a for a in node.all_input_nodes if a is not prev]
    if any(a.op != "get_attr" for a in others) or prev not in node.all_input_nodes:
        return False
    return OPS.is_per_voxel(node, modules.get(node.target) if node.op == "call_module" else None)


def fuse_channels_last(gm: fx.GraphModule) -> fx.GraphModule:
    """Replace every permute -> per-voxel ops -> inverse permute chain by one
    `ChannelsLastBlock` call."""
    modules = dict(gm.named_modules())
    count = 0
    for start in list(gm.graph.nodes):
        if start.graph is not gm.graph or not _is_permute(start, TO_LAST):
            continue
        chain, node = [], start
        while len(node.users) == 1:
            nxt = next(iter(node.users))
            if _is_permute(nxt, TO_FIRST):
                chain.append(nxt)
                break
            if not _per_voxel(nxt, node, modules):
                break
            chain.append(nxt)
            node = nxt
        if not chain or not _is_permute(chain[-1], TO_FIRST):
            continue
        block = _extract(gm, [start] + chain)
        name = f"volarray_channels_last_{count}"
        count += 1
        gm.add_submodule(name, block)
        with gm.graph.inserting_before(start):
            call = gm.graph.call_module(name, (start.args[0],))
        chain[-1].replace_all_uses_with(call)
        for n in reversed([start] + chain):
            gm.graph.erase_node(n)
    if count:
        gm.graph.eliminate_dead_code()
        gm.recompile()
    return gm


def _extract(gm: fx.GraphModule, nodes: list[fx.Node]) -> ChannelsLastBlock:
    graph = fx.Graph()
    x = graph.placeholder("x")
    env = {nodes[0].args[0]: x}
    for n in nodes:
        for a in n.all_input_nodes:
            if a not in env and a.op == "get_attr":
                env[a] = graph.get_attr(a.target)
        env[n] = graph.node_copy(n, lambda a: env[a])
    graph.output(env[nodes[-1]])
    return ChannelsLastBlock(gm, graph, "ChannelsLastBlock")
