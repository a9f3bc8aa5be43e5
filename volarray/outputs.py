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
import signal
import threading
from pathlib import Path

from .errors import InputError
from .location import Location, is_url

MARKER = "volarray"  # group attribute that identifies a volarray output
DONE = "volarray_done"  # the completion marks, one per output chunk
HASHES = "volarray_input_hashes"  # a digest of each input chunk the output was computed from
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

def input_paths(source, storage_options: dict | None = None) -> list[Location]:
    """The stores, folders or files an input reads: a path or URL; a zarr array or group
    on a local or fsspec store; a memory-mapped .npy; an xarray object opened from a
    file; or any of these inside a dask array's graph. A zarr path is widened to the
    root of the store that holds it, so that an output can be placed neither in it nor
    around it."""
    found = []
    for obj in _sources(source):
        loc = _location_of(obj, storage_options)
        if loc is not None:
            root = _store_root(loc)
            if root not in found:
                found.append(root)
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


def _location_of(obj, storage_options=None) -> Location | None:
    if isinstance(obj, Location):
        return obj
    if isinstance(obj, (str, os.PathLike)):
        text = str(obj)
        if not text.strip():
            return None
        try:
            return Location.of(text, storage_options)
        except InputError:
            return None
    store = getattr(obj, "store", None)
    sub = getattr(obj, "path", "") or ""
    root = getattr(store, "root", None)
    if isinstance(root, (str, os.PathLike)) and not is_url(str(root)):  # zarr's LocalStore
        return Location.of(os.path.join(str(root), sub))
    fs = getattr(store, "fs", None)
    if fs is not None and isinstance(getattr(store, "path", None), str):  # FsspecStore
        return Location(_sync(fs), "/".join(p for p in (store.path.rstrip("/"), sub) if p))
    filename = getattr(obj, "filename", None)  # np.memmap
    return Location.of(str(filename)) if isinstance(filename, (str, os.PathLike)) else None


def _sync(fs):
    """A blocking twin of zarr's asynchronous file system (s3fs, or a wrapped one)."""
    if hasattr(fs, "sync_fs"):
        return fs.sync_fs
    if getattr(fs, "asynchronous", False):
        options = {k: v for k, v in fs.storage_options.items() if k not in ("asynchronous",
                                                                             "loop")}
        return type(fs)(**options, asynchronous=False)
    return fs


def _store_root(loc: Location) -> Location:
    """The outermost zarr group above ``loc`` (``loc`` when it is in none)."""
    while not loc.is_root and any(loc.parent.child(meta).is_file()
                                  for meta in ("zarr.json", ".zgroup")):
        loc = loc.parent
    return loc


def is_volarray_output(loc: Location) -> bool:
    """True when ``loc`` is a zarr group that volarray created."""
    return read_marker(loc) is not None


def read_marker(loc: Location) -> dict | None:
    for meta_file, key in (("zarr.json", "attributes"), (".zattrs", None)):
        f = loc.child(meta_file)
        if f.is_file():
            meta = f.read_json()
            if not isinstance(meta, dict):
                return None
            attrs = meta.get(key, {}) if key else meta
            marker = attrs.get(MARKER) if isinstance(attrs, dict) else None
            return marker if isinstance(marker, dict) else None
    return None


def check_target(store, inputs=(), *, overwrite: bool = False, resume: bool = False,
                 storage_options: dict | None = None) -> tuple[str, Location]:
    """Decide, before anything is written, what happens to ``store`` (a path or URL):
    "create", "replace" (a volarray output, overwrite=True) or "resume"; returns that
    and the store's location. Raises InputError for any target that could cost the
    user data. `check_place` then `check_action`, which a run calls apart, holding the
    output's claim (`volarray.claim`) between the two."""
    out = check_place(store, inputs, overwrite=overwrite, resume=resume,
                      storage_options=storage_options)
    return check_action(out, str(store), overwrite=overwrite, resume=resume), out


def check_place(store, inputs=(), *, overwrite: bool = False, resume: bool = False,
                storage_options: dict | None = None) -> Location:
    """Where ``store`` is, refused if it is no place for an output (empty, the input or
    around or inside it, the current or home folder, a root, in a missing folder)."""
    if overwrite and resume:
        raise InputError("overwrite=True and resume=True contradict each other; pass one", parameter='overwrite')
    if store is None or str(store).strip() == "":
        raise InputError(f"output {store!r} is empty; pass the path of a zarr store to "
                         "create, e.g. 'prediction.zarr'")
    if not isinstance(store, (str, os.PathLike)):
        raise InputError(f"output {store!r} is not a path or URL; pass e.g. 'prediction.zarr' "
                         "or 's3://bucket/prediction.zarr'")
    out = Location.of(str(store), storage_options).refresh()
    if out.is_root or (out.is_local and Path(out.path) in (Path.cwd().resolve(),
                                                            Path.home().resolve())):
        raise InputError(f"output {str(store)!r} is the folder or bucket {out.url!r} itself; "
                         "pass the path of a new zarr store inside it, e.g. 'prediction.zarr'")
    for inp in inputs:
        if out == inp:
            raise InputError(f"output {str(store)!r} is the input; pass another path for the "
                             "prediction")
        if out.contains(inp):
            raise InputError(f"output {str(store)!r} is a folder that holds the input "
                             f"{inp.url!r}; pass a path of its own for the prediction")
        if inp.contains(out):
            raise InputError(f"output {str(store)!r} lies inside the input {inp.url!r}; pass "
                             "a path outside it")
    # an object store has no folders to check: only a local parent must exist
    if out.is_local and not out.exists() and not out.parent.is_dir():
        raise InputError(f"output {str(store)!r}: the folder {out.parent.url!r} does not "
                         "exist; create it first")
    return out


def check_action(out: Location, store: str, *, overwrite: bool = False,
                 resume: bool = False) -> str:
    """"create", "replace" or "resume" for the output ``out`` as it is now."""
    if not out.refresh().exists():
        return "create"
    if not is_volarray_output(out):  # one answer, whichever flag was given
        kind = "file" if out.is_file() else "folder"
        raise InputError(f"output {store!r} is a {kind} that volarray did not write; "
                         "volarray neither replaces it with overwrite=True (--overwrite) "
                         "nor resumes into it with resume=True (--resume): pass another "
                         "path, or remove it yourself", parameter="store")
    if resume:
        return "resume"
    if not overwrite:
        raise InputError(f"output {store!r} exists; pass overwrite=True (--overwrite) "
                         "to replace it or resume=True (--resume) to finish an interrupted run "
                         "into it", parameter="store")
    return "replace"


def remove_output(loc: Location, missing_ok: bool = False) -> None:
    """Remove what volarray wrote in its output ``loc``: the arrays its marker lists,
    the completion marks and the group metadata; the folder goes only if that leaves
    it empty (anything else a user put there stays)."""
    loc.refresh()
    if missing_ok and not loc.exists():
        return
    marker = read_marker(loc)
    if marker is None:
        if missing_ok and loc.is_dir() and not loc.names():
            loc.remove_if_empty()
            return
        raise InputError(f"{loc.url!r} is not a volarray output; it was left as it is")
    for name in (list(marker.get("arrays", [])) + list(marker.get("coordinates", []))
                 + [DONE, HASHES]):
        entry = loc.child(name) if isinstance(name, str) and name.strip(".") \
            and "/" not in name else None
        if entry is not None and entry.is_dir():
            entry.remove_tree()
    for meta in ("zarr.json", ".zattrs", ".zgroup", ".zmetadata"):
        loc.child(meta).remove_file()
    loc.refresh().remove_if_empty()


def chunk_counts(loc: Location) -> tuple[int, int]:
    """(finished, total) chunks of the output by its completion marks; (0, 0) when they
    cannot be read."""
    try:
        marks = loc.child(DONE).open_array("r")[...]
    except Exception:
        return 0, 0
    return int(marks.sum()), int(marks.size)


def is_complete(store, storage_options: dict | None = None) -> bool:
    """``store`` (a path or URL) is a volarray output with every completion mark set."""
    finished, total = chunk_counts(Location.of(str(store), storage_options))
    return total > 0 and finished == total


def check_replaceable(out: Location, names) -> None:
    """Before a replacing run: its arrays must not take the names of a user's own
    entries in the output folder."""
    ours = set((read_marker(out) or {}).get("arrays", [])) | {DONE, HASHES}
    present = set(out.names())
    taken = [n for n in names if n in present and n not in ours]
    if taken:
        raise InputError(f"output {out.url!r} holds {taken} that volarray did not write; "
                         "pass another name= for the prediction")


def make_staging(out: Location) -> Location:
    """Where a replacing run writes until it is complete: beside the output."""
    return out.new_sibling(f".{out.name}.replacing-")


def swap_in(staging: Location, out: Location) -> None:
    """The complete new output takes the old one's place: volarray's entries of the
    old one are removed, the user's stay, the new entries move in."""
    remove_output(out, missing_ok=True)
    if not out.refresh().exists():
        staging.move_to(out)
        return
    for name in staging.names():
        staging.child(name).move_to(out.child(name))
    staging.refresh().remove_if_empty()


# -- scratch ---------------------------------------------------------------------------

def make_scratch(out: Location) -> Location:
    """A fresh scratch folder beside the output, marked as volarray's."""
    d = out.new_sibling(f".{out.name}.scratch-")
    d.child(SCRATCH_MARKER).write_text(json.dumps({"output": out.url, "pid": os.getpid()}))
    return d


def remove_scratch(d: Location | None) -> None:
    if d is not None and d.child(SCRATCH_MARKER).refresh().is_file():
        try:
            d.remove_tree()
        except OSError:
            pass  # best effort, as shutil.rmtree(ignore_errors=True)


def remove_leftovers(out: Location) -> None:
    """Scratch and half-made replacements left by runs killed with SIGKILL (nothing can
    catch that), found when the same output is resumed or replaced."""
    for d in out.refresh().siblings(f".{out.name}.scratch-"):
        owner = (d.child(SCRATCH_MARKER).read_json() or {}).get("output")
        if owner == out.url:
            remove_scratch(d)
    for d in out.siblings(f".{out.name}.replacing-"):  # a killed replacing run's store
        if is_volarray_output(d) or (d.is_dir() and not d.names()):
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
