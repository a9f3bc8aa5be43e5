"""torch.flip: on a flipped spatial axis of size N, output [a, b) reads input
[N - b, N - a), reversed. A reflecting map, not a shift: regions are exact for any
chunking (a task may read its input from the far side of the volume); a sweep along a
flipped z recomputes its input's rows per slab instead of keeping them."""
from __future__ import annotations

from dataclasses import dataclass

from ..geometry import Interval
from .base import LocalOp
from .fill import INSIDE


@dataclass
class Flip(LocalOp):
    """Reverse the tile along ``dims`` (of (1, C, Z, Y, X)); ``size``: the input's
    whole-volume extent per spatial axis."""

    dims: tuple = ()
    size: tuple = (0, 0, 0)

    def __post_init__(self):
        self.fills = (INSIDE,)

    def need(self, axis, out):
        if axis + 2 not in self.dims or out.empty:
            return (out,)
        n = self.size[axis]
        return (Interval(n - out.hi, n - out.lo),)

    def run(self, ctx, inputs, out):
        return inputs[0].flip(self.dims)


def flip(ctx) -> Flip:
    """torch.flip(x, dims), x.flip(*dims), aten.flip(self, dims); any dims of the five
    (channels and the batch of one are per voxel)."""
    rest = ctx.node.args[1:]
    dims = rest[0] if len(rest) == 1 else rest or ctx.node.kwargs.get("dims")
    dims = ctx.static(dims, "dims")
    dims = (dims,) if isinstance(dims, int) else tuple(dims)
    ctx.template()
    return Flip(dims=tuple(sorted({d % 5 for d in dims})), size=ctx.in_shape, macs=0.0)
