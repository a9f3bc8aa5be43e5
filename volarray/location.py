"""Where stores live: a local path or a URL (``s3://``, ``gs://``, ``file://``,
``memory://``), read and written through fsspec, with the few file-system operations
that volarray's output rules (`outputs`) need.

An object store has no folders, no atomic rename and no empty directories: a prefix
"exists" while it holds a key, "removing an empty folder" is nothing to do, and a move
is a copy then a delete. The rules in `outputs` are written so that this is enough:
nothing is ever removed that volarray's marker does not name.
"""
from __future__ import annotations

import json
import posixpath
import threading
import uuid
from pathlib import Path

from .errors import InputError


def is_url(target) -> bool:
    return isinstance(target, str) and "://" in target


class Location:
    """A path on a file system: ``fs`` (fsspec), ``path`` (fsspec's form, no protocol;
    local paths resolved) and the ``options`` that opened it (credentials, endpoint)."""

    def __init__(self, fs, path: str, options: dict | None = None):
        self.fs, self.path, self.options = fs, path.rstrip("/") or "/", dict(options or {})

    @classmethod
    def of(cls, target, storage_options: dict | None = None) -> Location:
        """The location of a path or URL; ``storage_options`` go to fsspec (remote only)."""
        import fsspec
        if not is_url(target):
            return cls(fsspec.filesystem("file"), str(Path(target).resolve()))
        try:
            fs, path = fsspec.core.url_to_fs(target, **(storage_options or {}))
        except (ImportError, ValueError) as e:
            raise InputError(f"cannot open {target!r}: {e}. URLs need fsspec's package for "
                             "their protocol (s3:// needs s3fs, gs:// needs gcsfs)") from None
        if cls._local(fs):
            return cls(fs, str(Path(path).resolve()))
        return cls(fs, path, storage_options)

    @staticmethod
    def _local(fs) -> bool:
        from fsspec.implementations.local import LocalFileSystem
        return isinstance(fs, LocalFileSystem)

    @property
    def is_local(self) -> bool:
        return self._local(self.fs)

    @property
    def protocol(self) -> str:
        p = self.fs.protocol
        return "file" if self.is_local else (p[0] if isinstance(p, (tuple, list)) else p)

    @property
    def url(self) -> str:
        """What zarr and the user see: the local path, or protocol://path."""
        return self.path if self.is_local else self.fs.unstrip_protocol(self.path)

    def __str__(self) -> str:
        return self.url

    def __repr__(self) -> str:
        return f"Location({self.url!r})"

    def __eq__(self, other) -> bool:
        return isinstance(other, Location) and self.key == other.key

    def __hash__(self) -> int:
        return hash(self.key)

    @property
    def key(self) -> tuple[str, str]:
        return self.protocol, self.path

    # -- names -------------------------------------------------------------------------

    @property
    def name(self) -> str:
        return posixpath.basename(self.path)

    @property
    def parent(self) -> Location:
        return Location(self.fs, posixpath.dirname(self.path) or "/", self.options)

    def child(self, name: str) -> Location:
        return Location(self.fs, posixpath.join(self.path, name), self.options)

    def contains(self, other: Location) -> bool:
        """``other`` lies strictly inside this location (same file system)."""
        return (self.protocol == other.protocol and other.path != self.path
                and other.path.startswith(self.path.rstrip("/") + "/"))

    @property
    def is_root(self) -> bool:
        """A file system root, or a bucket's top (the user's whole bucket)."""
        if self.is_local:
            return Path(self.path) == Path(Path(self.path).anchor)
        return "/" not in self.path.strip("/")

    # -- what is there -----------------------------------------------------------------

    def refresh(self) -> Location:
        """Forget listings cached by the file system (s3fs caches them)."""
        invalidate = getattr(self.fs, "invalidate_cache", None)
        if invalidate is not None:
            invalidate()
        return self

    def exists(self) -> bool:
        return self.fs.exists(self.path)

    def is_dir(self) -> bool:
        return self.fs.isdir(self.path)

    def is_file(self) -> bool:
        return self.fs.isfile(self.path)

    def names(self) -> list[str]:
        """The entries directly inside (none when it does not exist)."""
        try:
            return sorted(posixpath.basename(p.rstrip("/"))
                          for p in self.fs.ls(self.path, detail=False))
        except FileNotFoundError:
            return []

    def siblings(self, prefix: str) -> list[Location]:
        """Entries beside this one whose names start with ``prefix``."""
        return [self.parent.child(n) for n in self.parent.names() if n.startswith(prefix)]

    def read_json(self):
        """The JSON in this file, or None when it is missing or unreadable."""
        try:
            return json.loads(self.fs.cat_file(self.path))
        except (OSError, ValueError):
            return None

    # -- changes -----------------------------------------------------------------------

    def write_text(self, text: str) -> None:
        self.fs.pipe_file(self.path, text.encode())

    def remove_tree(self) -> None:
        if self.exists():
            self.fs.rm(self.path, recursive=True)

    def remove_file(self) -> None:
        if self.fs.isfile(self.path):
            self.fs.rm_file(self.path)

    def remove_if_empty(self) -> None:
        """A local folder that holds nothing goes; an object-store prefix with no keys
        does not exist anyway."""
        if self.is_local and self.is_dir() and not self.names():
            Path(self.path).rmdir()

    def new_sibling(self, prefix: str) -> Location:
        """A fresh, empty entry beside this one, named ``prefix`` + a unique suffix."""
        loc = self.parent.child(f"{prefix}{uuid.uuid4().hex[:10]}")
        if loc.is_local:
            Path(loc.path).mkdir()
        return loc

    def move_to(self, dest: Location) -> None:
        """Rename (local: atomic) or copy then delete (object stores)."""
        if self.is_local:
            Path(self.path).replace(dest.path)
        else:
            self.fs.mv(self.path, dest.path, recursive=True)
        self.refresh()

    # -- zarr ----------------------------------------------------------------------------

    def zarr_kwargs(self) -> dict:
        """``store=`` (and ``storage_options=`` for URLs) for zarr's open functions."""
        if self.is_local:
            return {"store": self.path}
        return {"store": self.url, "storage_options": self.options}

    def open_group(self, mode: str):
        import zarr
        return zarr.open_group(mode=mode, **self.zarr_kwargs())

    def open_array(self, mode: str = "r"):
        import zarr
        return zarr.open_array(mode=mode, **self.zarr_kwargs())


class OpenedArrays:
    """The zarr arrays at a `Location` (its own array, or its group's members by name),
    each opened once and shared by one run's tasks in this process's threads, as
    `dask.array.to_zarr` shares its array: opening the output group and its arrays for
    every chunk cost 2 ms of a 4 ms task at 8^3 chunks, and on an object store each
    open is a request. Pickled (to a cluster's workers, per task) it is the location
    alone, which opens them again there, as every task did before; a new run makes a
    new one, so no run reads or writes through another's metadata."""

    def __init__(self, where: Location):
        self.where = where
        self._group = None
        self._arrays: dict = {}
        self._lock = threading.Lock()

    @property
    def path(self) -> str:
        return self.where.path

    def array(self):
        """The location's own array, opened for reading and writing."""
        return self._opened(None)

    def __getitem__(self, name: str):
        """The group member ``name``, opened for reading and writing."""
        return self._opened(name)

    def _opened(self, name):
        array = self._arrays.get(name)
        if array is None:
            with self._lock:
                if name not in self._arrays:
                    if name is None:
                        self._arrays[None] = self.where.open_array("r+")
                    else:
                        if self._group is None:
                            self._group = self.where.open_group("r+")
                        self._arrays[name] = self._group[name]
                array = self._arrays[name]
        return array

    def __getstate__(self):
        return {"where": self.where}

    def __setstate__(self, state):
        self.__init__(state["where"])
