"""The rules for what volarray writes and removes, in one place.

- A store is volarray's when its group metadata carries the ``volarray`` attribute
  that `create_output` writes. Only such a store is ever removed or replaced, and then
  only the entries volarray made in it.
- The output can never be the input, a folder holding the input, a folder inside the
  input, the current directory or a file system root.
- A run that stops early (an error, Ctrl-C, SIGTERM) keeps every finished chunk with its
  completion mark, removes its scratch store, and says how to resume. A fresh output in
  which no chunk was finished holds nothing, so it is removed.
"""
from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import tempfile
import threading
from pathlib import Path

from .errors import InputError

MARKER = "volarray"  # group attribute that identifies a volarray output
DONE = "volarray_done"  # the completion marks, one per output chunk
SCRATCH_MARKER = "volarray-scratch.json"


class RunInterrupted(KeyboardInterrupt):
    """A run stopped by SIGINT or SIGTERM; finished chunks are kept. ``exit_code`` is
    the shell's convention (130 for SIGINT, 143 for SIGTERM)."""

    def __init__(self, message: str, exit_code: int = 130):
        super().__init__(message)
        self.exit_code = exit_code


class _Terminated(KeyboardInterrupt):
    """SIGTERM, raised in the main thread so that the run stops as for Ctrl-C."""


# -- where an output may go ---------------------------------------------------------------

def input_paths(source) -> list[Path]:
    """The local folders or files an input reads: a path; a zarr array or group on a
    local store; a memory-mapped .npy; an xarray object opened from a file; or any of
    these inside a dask array's graph. A zarr path is widened to the root of the store
    that holds it, so that an output can be placed neither in it nor around it."""
    found = []
    for obj in _sources(source):
        p = _path_of(obj)
        if p is not None:
            found.append(_store_root(p))
    return found


def _sources(source):
    yield source
    encoding = getattr(source, "encoding", None)  # xarray: the file it was opened from
    if isinstance(encoding, dict) and encoding.get("source"):
        yield encoding["source"]
    data = getattr(source, "data", None) if type(source).__name__ == "DataArray" else source
    graph = getattr(data, "__dask_graph__", None)
    if graph is not None:  # what the tasks read (from_zarr, from_array of a memmap, ...)
        for task in dict(graph()).values():
            yield from _objects_in(task)


def _objects_in(task, depth=0):
    if depth > 8:
        return
    if isinstance(task, (tuple, list)):
        for t in task:
            yield from _objects_in(t, depth + 1)
    elif isinstance(task, dict):
        for t in task.values():
            yield from _objects_in(t, depth + 1)
    else:
        yield task
        # wrappers (xarray's lazy indexing adapters hold the zarr array), dask Task objects
        for attr in ("array", "_array", "args", "kwargs"):
            inner = getattr(task, attr, None)
            if inner is not None and inner is not task and not isinstance(inner, str):
                yield from _objects_in(inner, depth + 1)


def _path_of(obj) -> Path | None:
    if isinstance(obj, (str, os.PathLike)):
        text = str(obj)
        return None if "://" in text or not text.strip() else Path(text).resolve()
    store = getattr(obj, "store", None)
    root = getattr(store, "root", None) or getattr(store, "path", None)
    if isinstance(root, (str, os.PathLike)) and "://" not in str(root):
        return (Path(str(root)) / (getattr(obj, "path", "") or "")).resolve()
    filename = getattr(obj, "filename", None)  # np.memmap
    return Path(filename).resolve() if isinstance(filename, (str, os.PathLike)) else None


def _store_root(p: Path) -> Path:
    """The outermost zarr group folder above ``p`` (``p`` when it is in none)."""
    while any((p.parent / meta).is_file() for meta in ("zarr.json", ".zgroup")):
        p = p.parent
    return p


def is_volarray_output(path: Path) -> bool:
    """True when ``path`` is a zarr group that volarray created."""
    return read_marker(path) is not None


def read_marker(path: Path) -> dict | None:
    for meta_file, key in (("zarr.json", "attributes"), (".zattrs", None)):
        f = Path(path) / meta_file
        if f.is_file():
            try:
                meta = json.loads(f.read_text())
            except (OSError, ValueError):
                return None
            attrs = meta.get(key, {}) if key else meta
            marker = attrs.get(MARKER) if isinstance(attrs, dict) else None
            return marker if isinstance(marker, dict) else None
    return None


def check_target(store, inputs=(), *, overwrite: bool = False, resume: bool = False) -> str:
    """Decide, before anything is written, what happens to ``store``: "create",
    "replace" (a volarray output, overwrite=True) or "resume". Raises InputError
    for any target that could cost the user data."""
    if overwrite and resume:
        raise InputError("overwrite=True and resume=True contradict each other; pass one")
    if store is None or str(store).strip() == "":
        raise InputError(f"output {store!r} is empty; pass the path of a zarr store to "
                         "create, e.g. 'prediction.zarr'")
    out = Path(store).resolve()
    if out == Path.cwd().resolve() or out == Path(out.anchor) or out == Path.home().resolve():
        raise InputError(f"output {str(store)!r} is the folder {str(out)!r} itself; pass the "
                         "path of a new zarr store inside it, e.g. 'prediction.zarr'")
    for inp in inputs:
        if out == inp:
            raise InputError(f"output {str(store)!r} is the input; pass another path for the "
                             "prediction")
        if out in inp.parents:
            raise InputError(f"output {str(store)!r} is a folder that holds the input "
                             f"{str(inp)!r}; pass a path of its own for the prediction")
        if inp in out.parents:
            raise InputError(f"output {str(store)!r} lies inside the input {str(inp)!r}; pass "
                             "a path outside it")
    if not out.exists():
        if not out.parent.is_dir():
            raise InputError(f"output {str(store)!r}: the folder {str(out.parent)!r} does not "
                             "exist; create it first")
        return "create"
    ours = is_volarray_output(out)
    if resume:
        if not ours:
            raise InputError(f"output {str(store)!r} exists and is not a volarray output; "
                             "resume=True only finishes a store volarray started")
        return "resume"
    if not overwrite:
        raise InputError(f"output {str(store)!r} exists; pass overwrite=True to replace it "
                         "or resume=True to finish an interrupted run into it")
    if not ours:
        kind = "file" if out.is_file() else "folder"
        raise InputError(f"output {str(store)!r} is a {kind} that volarray did not write; "
                         "overwrite=True only replaces volarray outputs, so pass another path "
                         "or remove it yourself")
    return "replace"


def remove_output(path: Path, missing_ok: bool = False) -> None:
    """Remove what volarray wrote in its output ``path``: the arrays its marker lists,
    the completion marks and the group metadata; the folder goes only if that leaves
    it empty (anything else a user put there stays)."""
    path = Path(path)
    if missing_ok and not path.exists():
        return
    marker = read_marker(path)
    if marker is None:
        if missing_ok and path.is_dir() and not any(path.iterdir()):
            path.rmdir()
            return
        raise InputError(f"{str(path)!r} is not a volarray output; it was left as it is")
    for name in list(marker.get("arrays", [])) + [DONE]:
        entry = path / name
        if entry.is_dir() and entry.parent == path:
            shutil.rmtree(entry)
    for meta in ("zarr.json", ".zattrs", ".zgroup", ".zmetadata"):
        with contextlib.suppress(FileNotFoundError):
            (path / meta).unlink()
    with contextlib.suppress(OSError):
        path.rmdir()


def chunk_counts(path: Path) -> tuple[int, int]:
    """(finished, total) chunks of the output by its completion marks; (0, 0) when they
    cannot be read."""
    try:
        import zarr
        marks = zarr.open_array(str(Path(path) / DONE), mode="r")[...]
    except Exception:
        return 0, 0
    return int(marks.sum()), int(marks.size)


def check_replaceable(out: Path, names) -> None:
    """Before a replacing run: its arrays must not take the names of a user's own
    entries in the output folder."""
    ours = set((read_marker(out) or {}).get("arrays", [])) | {DONE}
    taken = [n for n in names if (Path(out) / n).exists() and n not in ours]
    if taken:
        raise InputError(f"output {str(out)!r} holds {taken} that volarray did not write; "
                         "pass another name= for the prediction")


def make_staging(out: Path) -> Path:
    """Where a replacing run writes until it is complete: beside the output."""
    out = Path(out).resolve()
    return Path(tempfile.mkdtemp(prefix=f".{out.name}.replacing-", dir=out.parent))


def swap_in(staging: Path, out: Path) -> None:
    """The complete new output takes the old one's place: volarray's entries of the
    old one are removed, the user's stay, the new entries move in."""
    remove_output(out, missing_ok=True)
    if not Path(out).exists():
        os.replace(staging, out)
        return
    for entry in Path(staging).iterdir():
        os.replace(entry, Path(out) / entry.name)
    Path(staging).rmdir()


# -- scratch ---------------------------------------------------------------------------

def make_scratch(out: Path) -> Path:
    """A fresh scratch folder beside the output, marked as volarray's."""
    out = Path(out).resolve()
    d = Path(tempfile.mkdtemp(prefix=f".{out.name}.scratch-", dir=out.parent))
    (d / SCRATCH_MARKER).write_text(json.dumps({"output": str(out), "pid": os.getpid()}))
    return d


def remove_scratch(d: Path | None) -> None:
    if d is not None and (Path(d) / SCRATCH_MARKER).exists():
        shutil.rmtree(d, ignore_errors=True)


def remove_leftovers(out: Path) -> None:
    """Scratch and half-made replacements left by runs killed with SIGKILL (nothing can
    catch that), found when the same output is resumed or replaced."""
    out = Path(out).resolve()
    for d in out.parent.glob(f".{out.name}.scratch-*"):
        try:
            owner = json.loads((d / SCRATCH_MARKER).read_text()).get("output")
        except (OSError, ValueError):
            continue
        if owner == str(out):
            remove_scratch(d)
    for d in out.parent.glob(f".{out.name}.replacing-*"):  # a killed replacing run's store
        if is_volarray_output(d) or (d.is_dir() and not any(d.iterdir())):
            remove_output(d, missing_ok=True)


# -- signals ---------------------------------------------------------------------------

@contextlib.contextmanager
def sigterm_stops_run():
    """While a run writes, SIGTERM (what SLURM and Kubernetes send before killing)
    stops it as Ctrl-C does, so that its cleanup runs. Later SIGTERMs, during the
    cleanup, are ignored. Only the main thread can own signal handlers."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    fired = []

    def handler(signum, frame):
        if not fired:
            fired.append(signum)
            raise _Terminated("SIGTERM")

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def signal_name(exc: BaseException) -> tuple[str, int]:
    return ("SIGTERM", 143) if isinstance(exc, _Terminated) else ("SIGINT (Ctrl-C)", 130)
