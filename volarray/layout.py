"""Channels moved last and back around per-voxel ops, as one per-voxel op.

ConvNeXt and MedNeXt blocks (and many others) write
``x.permute(0, 2, 3, 4, 1) -> LayerNorm(C) / Linear(C, C') / GELU -> permute(0, 4, 1, 2, 3)``.
Each op in between acts on one voxel's channel vector, so the whole chain is local with
no halo. This pass replaces such a chain in the captured graph by one module,
`ChannelsLastBlock`, that the tile program runs like any pointwise op.
"""
from __future__ import annotations

import operator

import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F

TO_LAST = (0, 2, 3, 4, 1)
TO_FIRST = (0, 4, 1, 2, 3)
_PER_VOXEL_MODULES = (nn.LayerNorm, nn.Linear, nn.Identity, nn.Dropout, nn.ReLU, nn.GELU,
                      nn.SiLU, nn.LeakyReLU, nn.Sigmoid, nn.Tanh, nn.PReLU, nn.ELU)
_PER_VOXEL_FUNCTIONS = {F.layer_norm, F.linear, F.gelu, F.relu, F.silu, torch.sigmoid,
                        torch.tanh, operator.mul, operator.add, operator.sub,
                        operator.truediv, torch.mul, torch.add}
_PER_VOXEL_METHODS = {"mul", "add", "sub", "div", "contiguous"}


class ChannelsLastBlock(fx.GraphModule):
    """A chain of per-voxel ops that runs with channels last: (1, C, z, y, x) in,
    (1, C', z, y, x) out."""


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
    if node.op == "call_module":
        return isinstance(modules[node.target], _PER_VOXEL_MODULES)
    if node.op == "call_function":
        return node.target in _PER_VOXEL_FUNCTIONS
    return node.op == "call_method" and node.target in _PER_VOXEL_METHODS


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
