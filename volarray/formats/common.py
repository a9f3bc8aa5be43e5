"""What the readers and writers of the field's formats share."""
from __future__ import annotations

import importlib
import os

import numpy as np

from ..errors import InputError
from ..readers import lazy_array

# target bytes of one dask chunk of a lazily read file (whole lines or slices per chunk)
CHUNK_BYTES = 64 * 2**20


def require(module: str, extra: str):
    """The optional library ``module``, or an error naming the extra that installs it."""
    try:
        return importlib.import_module(module)
    except ImportError:
        raise InputError(f"reading this format needs {module}: pip install "
                         f"'volarray[{extra}]'") from None


def default_chunks(shape, itemsize: int, whole_axes=()):
    """Chunks of about CHUNK_BYTES, whole along ``whole_axes`` (a file's fast axes),
    split evenly along the others, slowest first."""
    chunks = list(shape)
    for axis in range(len(shape)):
        if axis in whole_axes:
            continue
        rest = int(np.prod([c for i, c in enumerate(chunks) if i != axis])) * itemsize
        chunks[axis] = max(1, min(shape[axis], CHUNK_BYTES // max(rest, 1)))
        if chunks[axis] < shape[axis]:
            break
    return tuple(chunks)


def lazy_dataarray(source, dims, coords, attrs, name, chunks=None):
    """An ``xarray.DataArray`` over the array-like ``source`` (shape, dtype,
    ``__getitem__`` of slices), read lazily by dask; tasks of `volarray.predict` read
    their regions straight from ``source``."""
    import xarray as xr
    chunks = chunks or default_chunks(source.shape, source.dtype.itemsize)
    return xr.DataArray(lazy_array(source, chunks), dims=dims, coords=coords, attrs=attrs,
                        name=name)


def stream_blocks(data, axis: int = 0, block_bytes: int = CHUNK_BYTES):
    """``(start, numpy block)`` along ``axis`` of a numpy or dask array, one block of
    about ``block_bytes`` at a time, computed in order (a writer's sequential pass)."""
    shape = data.shape
    per = int(np.prod([n for i, n in enumerate(shape) if i != axis])) * 4
    step = max(1, block_bytes // max(per, 1))
    for lo in range(0, shape[axis], step):
        index = [slice(None)] * len(shape)
        index[axis] = slice(lo, min(lo + step, shape[axis]))
        block = data[tuple(index)]
        yield lo, np.asarray(block.compute() if hasattr(block, "compute") else block)


def unused_target(path, overwrite: bool, ours) -> str:
    """``path`` as a string, refused when a file or folder is there already unless
    ``overwrite``, and then only a file volarray wrote (``ours(path)``: its mark is in
    the file) is replaced, never a folder or a file of the user's."""
    path = os.fspath(path)
    if os.path.isdir(path):
        raise InputError(f"output {path!r} is a folder; pass a file name")
    if os.path.exists(path) and not ours(path):  # one answer, whichever flag was given
        raise InputError(f"output {path!r} is a file without volarray's mark (one it did not "
                         "write, or wrote before it marked its files); volarray does not "
                         "replace it with overwrite=True (--overwrite): pass another path, or "
                         "remove it yourself", parameter="store")
    if os.path.exists(path) and not overwrite:
        raise InputError(f"output {path!r} exists; pass overwrite=True (--overwrite) to "
                         "replace it")
    parent = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(parent):
        raise InputError(f"output {path!r}: folder {parent!r} does not exist")
    return path


def unused_folder(folder, overwrite: bool, suffixes, prefix: str = "slice",
                  dry_run: bool = False) -> str:
    """A folder for a stack of slice files: made if absent; an existing one must be
    empty, or, with ``overwrite``, hold only slice files of an earlier stack
    (``<prefix>_<n><suffix>``), which are removed (not with ``dry_run``). Nothing else is
    ever deleted."""
    import re
    folder = os.fspath(folder)
    if os.path.exists(folder) and not os.path.isdir(folder):
        raise InputError(f"output {folder!r} is a file; a stack is written to a folder")
    if not dry_run:
        os.makedirs(folder, exist_ok=True)
    names = os.listdir(folder) if os.path.isdir(folder) else []
    if not names:
        return folder
    if not overwrite:
        raise InputError(f"output folder {folder!r} is not empty ({len(names)} entries); pass "
                         "an empty or new folder, or overwrite=True (--overwrite) to replace "
                         "an earlier stack")
    pattern = re.compile(rf"{re.escape(prefix)}_\d+({'|'.join(map(re.escape, suffixes))})$")
    others = [n for n in names if not pattern.match(n)]
    if others:
        raise InputError(f"output folder {folder!r} holds other files than an earlier stack "
                         f"(e.g. {others[0]!r}); volarray replaces only its own slices: pass "
                         "another folder")
    for n in names if not dry_run else ():
        os.remove(os.path.join(folder, n))
    return folder


def array_data(array):
    """What a writer streams from ``array``: a DataArray's ``.data``, a numpy or dask
    array itself (a numpy array's ``.data`` is a memoryview)."""
    return array if isinstance(array, np.ndarray) else getattr(array, "data", array)


def staging_file(path: str) -> str:
    """A new file beside ``path`` to write into and then move onto it: no user file is
    ever written over, and a stopped write leaves no half file under ``path``. Its mode
    is a new file's under the process's umask (mkstemp's is 0600), so that the output
    moved into place is as readable as any other file the process writes."""
    import tempfile
    fd, tmp = tempfile.mkstemp(prefix=".volarray-", suffix=".partial",
                               dir=os.path.dirname(os.path.abspath(path)))
    try:
        os.fchmod(fd, 0o666 & ~process_umask())
    finally:
        os.close(fd)
    return tmp


def process_umask() -> int:
    """The process's umask, read without changing it where Linux shows it (changing it
    and back, as os.umask must, races with threads creating files)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask
