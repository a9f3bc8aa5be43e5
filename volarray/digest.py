"""What a resumed run checks of its input: a digest of every input chunk.

A run records, before it marks any chunk finished, a 16-byte blake2b digest of each chunk
of its input (the (C, Z, Y, X) dask array it reads, chunk by chunk; tasks of the run's own
graph, which run beside the model's, not a pass before it) in the output's array
``volarray_input_hashes``, shaped (*the input's numblocks, 2) uint64. Every completion
mark of the output was made from that input. A resumed run with unfinished chunks
computes the digests again and refuses an input whose chunk changed, naming the chunk's
box, unless that input chunk held the NaN or Inf that stopped the run (its digest is
then cleared, all zero: the finished chunks never read that value, and fixing it in
place is the way on). Reading and hashing the input once costs far less than the model.
"""
from __future__ import annotations

import hashlib
import re

import dask
import dask.array as da
import numpy as np
from dask.base import tokenize

from .errors import InputError
from .location import Location
from .outputs import HASHES

# the voxel check_finite names in its message
BAD_VOXEL = re.compile(r"voxel \(z, y, x\) = \((\d+, \d+, \d+)\)")


def _digest(block: np.ndarray) -> np.ndarray:
    data = np.ascontiguousarray(block)
    digest = hashlib.blake2b(data.view(np.uint8).reshape(-1), digest_size=16).digest()
    return np.frombuffer(digest, np.uint64).reshape((1,) * block.ndim + (2,))


def digests_of(source: da.Array) -> da.Array:
    """The lazy (*source.numblocks, 2) uint64 digests, one task per chunk of ``source``."""
    return source.map_blocks(
        _digest, dtype=np.uint64, new_axis=source.ndim,
        chunks=tuple((1,) * n for n in source.numblocks) + ((2,),),
        name="volarray-input-digest-" + tokenize(source.name))


def record_task(out: Location, grid: tuple, digests: list) -> int:
    """A task of the run's own graph: the input's digests (one (…, 2) block per input
    chunk, in C order of ``grid``) recorded in the output ``out`` before any completion
    mark is (the write tasks wait for it), so the input is hashed in the same pass that
    computes, never in a pass of its own before it."""
    hashes = np.concatenate([np.asarray(d).reshape(-1, 2) for d in digests]).reshape(
        tuple(grid) + (2,))
    record_hashes(out.open_group("r+"), hashes)
    return 0


def input_hashes(source: da.Array, scheduler=None) -> np.ndarray:
    """(*source.numblocks, 2) uint64: the digest of each chunk of ``source``."""
    digests = digests_of(source)
    from .cluster import client_of
    client = client_of(scheduler)
    if client is not None:
        return np.asarray(client.compute(digests).result())
    # callbacks=[]: a read of the input, not the run: no progress bar shows it
    return np.asarray(dask.compute(digests, scheduler=scheduler, callbacks=[])[0])


def record_hashes(group, hashes: np.ndarray) -> None:
    """The input's digests, in the output group (replacing any recorded before)."""
    chunks = tuple(min(n, 32) for n in hashes.shape[:-1]) + (2,)
    if HASHES in group:
        group[HASHES][...] = hashes
        return
    group.create_array(HASHES, shape=hashes.shape, chunks=chunks, dtype="u8", fill_value=0,
                       dimension_names=("input_c_chunk", "input_z_chunk", "input_y_chunk",
                                        "input_x_chunk", "input_digest"))
    group[HASHES][...] = hashes


def check_input_unchanged(out: Location, group, source: da.Array, scheduler=None) -> None:
    """Before a resumed run writes: every input chunk its finished chunks may have read
    is as it was. Refused naming the first changed chunk's box; an output made before
    digests were recorded gets them now."""
    now = input_hashes(source, scheduler)
    if HASHES not in group:
        record_hashes(group, now)
        return
    was = group[HASHES][...]
    if was.shape != now.shape:
        raise InputError(f"the input of output {out.url!r} is now read in chunks "
                         f"{_grid(source)}, not the grid its digests were recorded on "
                         f"({was.shape[:-1]} chunks), so its finished chunks cannot be checked "
                         "against it; pass overwrite=True (--overwrite) to compute the output "
                         "again", parameter="overwrite")
    known = was.any(axis=-1)
    changed = np.argwhere(known & (was != now).any(axis=-1))
    if len(changed):
        c, z, y, x = (int(i) for i in changed[0])
        box = ", ".join(f"{lo}:{hi}" for lo, hi in _box(source, (c, z, y, x)))
        raise InputError(
            f"the input changed since output {out.url!r} was started: its values in the box "
            f"[{box}] (channel, z, y, x; {len(changed)} of {known.sum()} chunks changed) "
            "differ from those the finished chunks were computed from, and resuming would mix "
            "old and new; pass overwrite=True (--overwrite) to compute the output from the "
            "input as it is now", parameter="overwrite")
    if not known.all():  # a fixed bad value: the finished chunks hold for the new input too
        record_hashes(group, now)


def forget_input_chunk(out: Location, source: da.Array, voxel) -> None:
    """Clear the digests of the input chunks holding ``voxel`` (z, y, x), where a run
    stopped on a NaN or Inf, so that fixing it in place and resuming is not refused."""
    try:
        group = out.open_group("r+")
        hashes = group[HASHES]
    except Exception:  # nothing was kept (the store is gone) or nothing recorded
        return
    index = tuple(int(np.searchsorted(np.cumsum(c), v, side="right"))
                  for c, v in zip(source.chunks[1:], voxel))
    if all(i < n for i, n in zip(index, source.numblocks[1:])):
        hashes[(slice(None),) + index] = 0


def _box(source: da.Array, block) -> list[tuple[int, int]]:
    bounds = []
    for c, i in zip(source.chunks, block):
        lo = int(sum(c[:i]))
        bounds.append((lo, lo + int(c[i])))
    return bounds


def _grid(source: da.Array) -> tuple:
    return tuple(source.numblocks)
