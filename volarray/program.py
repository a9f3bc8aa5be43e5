"""A fused stage as a tile program: which region of every node a tile needs,
how to run it, and how much memory it takes.

Requirements propagate backwards one axis at a time (all local ops are
separable per axis); a node's region is the bounding box of what its consumers
read from it, clipped to the volume. Forward, each node computes exactly that
region from inputs extended by the layer's padding semantics.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .geometry import EMPTY, Box, Interval
from .ops.fill import extend, source_interval
from .graph import Graph


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


def _conv_border(want: Box, shape, stride: int) -> tuple[tuple[int, ...], int | None]:
    """The zero padding a conv reading ``want`` applies itself: per axis the part of
    the border it pads evenly; along z, where ``want`` reaches out on one side more
    than on the other, the larger of the two on both sides, and then how many output
    rows to skip (the rows the extra padding added; None: z padded evenly as asked).
    A one-sided z border is the first and last slab of every sweep: padded by the
    conv, the input is read in place (an output row crop is a view), not copied
    into a padded tensor. Not across (a crop there would copy the output)."""
    pad = _even_border(want, shape)
    z = want.axes[0]
    lo, hi = max(0, -z.lo), max(0, z.hi - shape[0])
    if lo == hi or z.hi <= 0 or z.lo >= shape[0] or (max(lo, hi) - lo) % stride:
        return pad, None  # even, or the extra rows would shift the stride's grid
    p = max(lo, hi)
    return (p,) + pad[1:], (p - lo) // stride


def stage_nodes(graph: Graph, output: str, sources) -> set[str]:
    """``output`` and its ancestors, stopping at ``sources`` (which are included)."""
    wanted, stack = set(), [output]
    while stack:
        n = stack.pop()
        if n in wanted:
            continue
        wanted.add(n)
        if n not in sources:
            stack.extend(graph.nodes[n].inputs)
    return wanted


class TileProgram:
    """The ops that turn a stage's source tensors into its output node, per tile."""

    def __init__(self, graph: Graph, output: str, sources: tuple[str, ...]):
        self.output = output
        self.sources = tuple(sources)
        self.value_bytes = graph.value_bytes  # of one value of the graph's dtype
        nodes = graph.nodes
        wanted = stage_nodes(graph, output, self.sources)
        missing = [n for n in wanted if nodes[n].op is None and n not in self.sources]
        if missing:
            raise ValueError(f"stage {output} reaches the input without it as a source")
        self.order = [n for n in nodes if n in wanted and n not in self.sources]
        self.nodes = {n: nodes[n] for n in wanted}
        # whole-volume values (norm statistics, pooled vectors) the stage reads
        self.globals = tuple(sorted({g for n in self.order for g in nodes[n].op.globals}))
        last, readers = {}, {}
        for i, n in enumerate(self.order):
            for p in nodes[n].inputs:
                last[p] = i
                readers.setdefault(p, []).append(n)
        self.last_use = last
        # a conv whose only reader here is a ReLU runs it in its kernel; the ReLU
        # then passes the conv's tile on
        self.relu_fused = {n for n in self.order if nodes[n].op.takes_relu
                           and n != output and len(readers.get(n, ())) == 1
                           and nodes[readers[n][0]].op.is_relu}
        self.passed_on = {readers[n][0] for n in self.relu_fused}
        self._memo = {}

    # Geometry is computed once per program: a task's requirements are composed from
    # those of its intervals along each axis, and tasks share them (a grid of n^3
    # tasks has n intervals per axis); a sweep's rows depend on its z intervals only.
    # The results are shared: read them, never change them.
    def __getstate__(self):
        state = self.__dict__.copy()
        state["_memo"] = {}  # filled where the tasks run
        return state

    def _memoized(self, key, compute):
        memo = self.__dict__.setdefault("_memo", {})
        got = memo.get(key)
        if got is None:
            got = memo.setdefault(key, compute())
        return got

    # ------------------------------------------------------------ geometry
    def requirements_1d(self, axis: int, out: Interval) -> tuple[dict, dict]:
        """Per node the interval it computes along ``axis`` for output ``out``, and per
        edge the interval it reads (memoized)."""
        return self._memoized(("1d", axis, out), lambda: self._requirements_1d(axis, out))

    def _requirements_1d(self, axis: int, out: Interval) -> tuple[dict, dict]:
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
    def sweep_rows(self, slabs: list[Interval]) -> list[dict[str, Interval]]:
        """`_sweep_rows`, memoized per sequence of slabs."""
        slabs = tuple(slabs)
        return self._memoized(("rows", slabs), lambda: self._sweep_rows(slabs))

    def _sweep_rows(self, slabs) -> list[dict[str, Interval]]:
        """Per slab (its output rows along z, in order): the rows of each node the slab
        reads. A node's consumers hold the rows they computed in earlier slabs, so a
        node is read only where its consumers' new rows read it (the bounding box of
        the whole slab would hold, at every node before a U-Net's skip, as many rows as
        the decoder lags behind). Mirrors `sweep`: a node continues its rows when the
        slab starts within them, else computes them afresh."""
        rows: dict[str, Interval] = {}  # what each node holds after the last slab
        out = []
        for s in slabs:
            need = {self.output: s}
            for name in reversed(self.order):
                iv = need.get(name, EMPTY)
                if iv.empty:
                    rows.pop(name, None)  # its buffer is let go
                    continue
                prev = rows.get(name)
                if prev is not None and prev.lo <= iv.lo <= prev.hi:
                    new = Interval(min(max(prev.hi, iv.lo), iv.hi), iv.hi)
                    rows[name] = Interval(iv.lo, max(prev.hi, iv.hi))
                else:
                    new = rows[name] = iv
                if new.empty:
                    continue
                node = self.nodes[name]
                for p, want, fill in zip(node.inputs, node.op.need(0, new), node.op.fills):
                    src = source_interval(want, self.nodes[p].shape[0], fill)
                    need[p] = need.get(p, EMPTY).union(src)
            out.append(need)
        return out

    def sweep_requirements(self, full: Requirements, slabs: list[Box]) -> list[Requirements]:
        """`requirements` of each slab of a sweep over the region ``full`` was made for,
        along z only what the slab reads (`sweep_rows`)."""
        if len(slabs) == 1:
            return [full]
        per_slab = self.sweep_rows([s.axes[0] for s in slabs])
        reqs = []
        for need in per_slab:
            node = {n: (z,) + full.node[n][1:] for n, z in need.items()
                    if not z.empty and n in full.node}
            reqs.append(Requirements(node, full.edge))
        return reqs

    def sweep(self, ctx, sources: dict[str, torch.Tensor], full: Requirements,
              slabs: list[Box]):
        """Yield ``(slab, output over slab)`` for consecutive slabs along z of the
        region ``full`` was made for. Each node keeps the rows the next slab also
        reads, so a halo inside the region is computed once, not once per slab (a
        streaming sweep: memory is one slab's tensors plus these rows)."""
        reqs = self.sweep_requirements(full, slabs)
        env = {n: (t, full.box(n)) for n, t in sources.items()}
        held: dict[str, RowBuffer] = {}
        for j, req in enumerate(reqs):
            nxt = reqs[j + 1] if j + 1 < len(reqs) else None
            for i, name in enumerate(self.order):
                box = Box(req.node.get(name, (EMPTY,) * 3))
                if not box.empty:
                    env[name] = (self._advance(ctx, name, env, held, box, req), box)
                for p in self.nodes[name].inputs:
                    if self.last_use.get(p) == i and p not in self.sources:
                        _keep_rows_for(env, held, p, nxt)
            yield slabs[j], env[self.output][0]
            _keep_rows_for(env, held, self.output, nxt)

    def _advance(self, ctx, name: str, env: dict, held: dict, box: Box, req: Requirements):
        """Node ``name`` over ``box``: the rows it holds from the last slab are reused,
        only the rows below them are computed."""
        buf, z = held.get(name), box.axes[0]
        if buf is not None and not (buf.yx == box.axes[1:] and buf.rows.lo <= z.lo <= buf.rows.hi):
            del held[name]  # not a continuation: start afresh
            buf = None
        # held rows may reach past z (a circular or wide reflect border): nothing new
        new = Interval(min(max(buf.rows.hi, z.lo), z.hi), z.hi) if buf is not None else z
        if not new.empty:
            node = self.nodes[name]
            # the new rows' edges along z; across, the region's
            edges = [(w,) + req.edge[(name, j)][1:]
                     for j, w in enumerate(node.op.need(0, new))]
            y = self._compute(ctx, name, env, Box((new,) + box.axes[1:]), edges)
            if buf is None:
                buf = held[name] = RowBuffer(y, new.lo, box.axes[1:])
            else:
                buf.append(y)
        buf.drop_below(z.lo)
        return buf.view(z)

    def _compute(self, ctx, name: str, env: dict, box: Box, edges) -> torch.Tensor:
        node = self.nodes[name]
        ins, extra, skip = [], {}, None  # a node may have no tensor input (a global value)
        for j, p in enumerate(node.inputs):
            t, have = env.get(p, (None, None))
            src = self.nodes[p]
            want = Box(edges[j])
            if getattr(node.op, "native_padding", False):
                # Let the conv zero-pad the part of the border it can pad evenly, and
                # along z a one-sided border too (a sweep's first and last slabs)
                pad, skip = _conv_border(want, src.shape, node.op.stride[0])
                z = want.axes[0].clip(src.shape[0]) if skip is not None else None
                want = Box.from_bounds([lo + q for lo, q in zip(want.lo, pad)],
                                       [hi - q for hi, q in zip(want.hi, pad)])
                if z is not None:  # the rows inside the volume, the conv pads the rest
                    want = Box((z,) + want.axes[1:])
                extra = {"padding": pad}
            x = extend(t, have, want, src.shape, node.op.fills[j], src.channels, ctx.dtype,
                       ctx.device)
            # Keep every tile channels-last: crops are views and 1-channel tensors
            # are ambiguous, and a conv given NCDHW would answer in NCDHW.
            ins.append(x.contiguous(memory_format=torch.channels_last_3d))
        if name in self.passed_on:
            return ins[0]  # the conv before it applied the ReLU
        if name in self.relu_fused:
            extra["relu"] = True
        y = node.op.run(ctx, ins, box, **extra)
        if skip is not None:  # the rows the even z padding added at either end
            y = y.narrow(2, skip, len(box.axes[0]))
        if tuple(y.shape[2:]) != box.shape:
            raise RuntimeError(f"volarray internal error: {node.where} produced a tile of "
                               f"shape {tuple(y.shape[2:])} for region {box}")
        return y

    # ------------------------------------------------------------ cost
    def peak_bytes(self, node_shapes: dict[str, tuple[int, ...]],
                   stores: dict[str, int] | None = None) -> int:
        """Projected peak of live tensors for a tile whose nodes have the given region
        shapes: sources, each op's padded input copies and its output. ``stores``: for
        a slab of a sweep (``node_shapes`` then the rows each node computes in it), the
        bytes of each node's row buffer (`RowBuffer`), held for the whole sweep; a
        node's new rows are copied into it once computed."""
        def nbytes(name, shape=None):
            shape = node_shapes.get(name) if shape is None else shape
            if not shape:
                return 0
            return self.nodes[name].channels * self.value_bytes * math.prod(shape)
        stores = stores or {}
        resting = sum(stores.values())
        live = {s: nbytes(s) for s in self.sources}
        peak = sum(live.values()) + resting
        for i, name in enumerate(self.order):
            node = self.nodes[name]
            padded = node.op.fills and node.op.fills[0].mode != "inside"
            temps = sum(nbytes(p) for p in node.inputs) if padded else 0
            out = nbytes(name)
            if node.op.scratch_channels:
                out += out // max(node.channels, 1) * node.op.scratch_channels
            peak = max(peak, sum(live.values()) + temps + out + resting)
            live[name] = 0 if name in stores else out  # else a view of its store
            for p in node.inputs:
                if self.last_use.get(p) == i:
                    live.pop(p, None)
        return peak


def _keep_rows_for(env: dict, held: dict, name: str, nxt: Requirements | None) -> None:
    """After its last reader in this slab: keep only the rows of ``name`` that the
    next slab reads, or drop it."""
    env.pop(name, None)
    buf = held.get(name)
    if buf is None:
        return
    want = nxt.node.get(name) if nxt is not None else None
    if want is None or want[0].empty or want[0].lo >= buf.rows.hi or want[1:] != buf.yx:
        held.pop(name)
    else:
        buf.drop_below(want[0].lo)
        room = max(0, want[0].hi - buf.rows.hi)  # for the rows it will compute
        # and as many again as the slab reads, for the ring to slide into
        buf.compact(room=room, spare=len(buf.rows) + room)


class RowBuffer:
    """A node's rows along z across the slabs of a sweep. Between slabs it holds only
    the rows the next slab reads (copied out of the slab's tensor, so that the slab's
    rows are freed); a slab's new rows are written after them.

    Its store is a ring that does not wrap: the held rows and the next slab's slide
    down it, always one contiguous view, and are moved back to its front only when
    they reach its end. With ``spare`` rows more than the held and the new ones, a
    row is moved at most once per ``spare`` rows the sweep advances (a U-Net's skip
    tensor holds many more rows than a slab adds: moved every slab, they cost more
    than the convolutions), and no store is allocated after the first slab."""

    def __init__(self, first: torch.Tensor, row: int, yx):
        self.store, self.start, self.end, self.row0, self.yx = first, 0, first.shape[2], row, yx
        self.owned = False  # the store is a slab's tensor, not one made to hold rows
        # the first row of the store handed out since the rows last moved: another
        # node may hold a view of it for the rest of the slab (a ReLU passed on)
        self.viewed = self.end

    @property
    def rows(self) -> Interval:
        return Interval(self.row0, self.row0 + self.end - self.start)

    def view(self, rows: Interval) -> torch.Tensor:
        if not (self.row0 <= rows.lo and rows.hi <= self.rows.hi):
            raise RuntimeError(f"volarray internal error: rows {rows} asked of a buffer "
                               f"holding {self.rows}")
        first = self.start + rows.lo - self.row0
        self.viewed = min(self.viewed, first)
        return self.store.narrow(2, first, len(rows))

    def drop_below(self, row: int) -> None:
        k = min(max(0, row - self.row0), self.end - self.start)
        self.start, self.row0 = self.start + k, self.row0 + k

    def compact(self, room: int = 0, spare: int = 0) -> None:
        """Leave ``room`` rows after the held ones for the next slab's new rows, so
        that `append` copies only those: in place where the store has them left;
        else the held rows move back to the store's front where that leaves them (the
        ring slides back); else (the first slab's tensor, or a store too small) into
        a new store of the held rows, the room and ``spare`` rows more. On CPU a new
        store's unwritten rows are not resident until written (`heap`)."""
        kept, size = self.end - self.start, self.store.shape[2]
        if self.owned and size - self.end >= room:
            self.viewed = size  # the slab's views are let go before the next slab
            return  # nothing moves
        if self.owned and min(self.start, self.viewed) >= kept and size >= kept + room:
            # to the front, over no row they are moving from nor any handed out
            if kept:
                self.store[:, :, :kept] = self.store.narrow(2, self.start, kept)
            self.start, self.end, self.viewed = 0, kept, size
            return
        store = torch.empty(self.store.shape[:2] + (kept + room + spare,) + self.store.shape[3:],
                            dtype=self.store.dtype, device=self.store.device,
                            memory_format=torch.channels_last_3d)
        store[:, :, :kept] = self.store.narrow(2, self.start, kept)
        self.store, self.start, self.end, self.owned = store, 0, kept, True
        self.viewed = store.shape[2]

    def append(self, y: torch.Tensor) -> None:
        """The held rows followed by ``y``'s, in one tensor: written into the room
        `compact` left, or copied into a new one of exactly those rows."""
        n, kept = y.shape[2], self.end - self.start
        if kept == 0:  # nothing held: the slab's tensor itself
            self.store, self.start, self.end, self.owned = y, 0, n, False
            self.viewed = n
            return
        if (self.store.shape[2] - self.end >= n and y.dtype == self.store.dtype
                and y.device == self.store.device):  # the room `compact` left
            self.store[:, :, self.end:self.end + n] = y
            self.end += n
            return
        store = torch.empty(y.shape[:2] + (kept + n,) + y.shape[3:], dtype=y.dtype,
                            device=y.device, memory_format=torch.channels_last_3d)
        store[:, :, :kept] = self.store.narrow(2, self.start, kept)
        store[:, :, kept:] = y
        self.store, self.start, self.end, self.owned = store, 0, kept + n, True
        self.viewed = kept + n
