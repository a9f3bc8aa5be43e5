"""One run per output at a time: a claim file beside the output.

A run that writes an output first creates ``.NAME.volarray-claim`` beside it, atomically
(``O_CREAT | O_EXCL`` on a file system; fsspec's exclusive mode ``"xb"`` on an object
store), holding its process id, host and start time; it removes the claim however it
ends. A second run on the same output finds the claim and is refused in one line that
names the first. A claim is stale, and taken over, when its run is gone: on the same
host, its process no longer exists (or the id now belongs to a later process); from
another host, it was not refreshed for FOREIGN_STALE_S (a running run touches it every
HEARTBEAT_S). Limits: an object store without exclusive creation gets a check then a
write, which two runs started within the same request's time can both pass; taking over
a stale claim is exclusive where the file system has ``flock`` (local disks, NFS, Lustre
mounted with ``-o flock``).
"""
from __future__ import annotations

import contextlib
import datetime
import json
import os
import socket
import threading
import time
import uuid

from .errors import OutputBusyError
from .location import Location

SUFFIX = ".volarray-claim"
HEARTBEAT_S = 60.0
FOREIGN_STALE_S = 600.0  # another host's claim not refreshed for 10 minutes: its run died
EMPTY_STALE_S = 10.0  # a claim still empty after this: its run died while creating it


def claim_of(out: Location) -> Location:
    """Where the claim of the output ``out`` lives: beside it."""
    return out.parent.child(f".{out.name}{SUFFIX}")


@contextlib.contextmanager
def claimed(out: Location):
    """Hold the claim of ``out`` while the block runs (OutputBusyError if another run
    holds it); released on every exit path."""
    claim = Claim(out).acquire()
    try:
        yield claim
    finally:
        claim.release()


def _start_time(pid: int) -> str | None:
    """The process's start (clock ticks since boot, Linux), which tells a reused id."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


def _alive(pid, start) -> bool:
    if not isinstance(pid, int) or pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # another user's process: alive
    now = _start_time(pid)
    return start is None or now is None or now == start


class Claim:
    """The claim of one output by this run (see the module's docstring)."""

    def __init__(self, out: Location):
        self.out, self.loc = out, claim_of(out)
        pid = os.getpid()
        self.info = {"pid": pid, "host": socket.gethostname(), "start": _start_time(pid),
                     "since": time.time(), "output": out.url, "token": uuid.uuid4().hex}
        self._stop = threading.Event()
        self._beat = None

    # -- taking and giving back ------------------------------------------------------

    def acquire(self) -> Claim:
        for _ in range(50):
            if self._create():
                self._beat = threading.Thread(target=self._heartbeat, daemon=True,
                                              name="volarray-claim-heartbeat")
                self._beat.start()
                return self
            held = self._read()
            if held is None:
                continue  # released meanwhile: try again
            if not self._stale(held):
                raise OutputBusyError(busy_message(self.out, self.loc, held),
                                      parameter="store")
            self._take_over(held)
        raise OutputBusyError(f"output {self.out.url!r}: its claim {self.loc.url!r} keeps "
                              "changing hands; another run is starting on it, wait for it",
                              parameter="store")

    def release(self) -> None:
        self._stop.set()
        if self._beat is not None:
            self._beat.join(timeout=5)
        held = self._read_once()
        if held is not None and held.get("token") == self.info["token"]:
            with contextlib.suppress(OSError):
                self.loc.fs.rm_file(self.loc.path)

    def _create(self) -> bool:
        data = json.dumps(self.info).encode()
        if self.loc.is_local:
            try:
                fd = os.open(self.loc.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            except FileExistsError:
                return False
            try:
                os.write(fd, data)
                os.fsync(fd)
            finally:
                os.close(fd)
            return True
        fs = self.loc.refresh().fs
        try:
            with fs.open(self.loc.path, "xb") as f:
                f.write(data)
            return True
        except FileExistsError:
            return False
        except (ValueError, NotImplementedError, TypeError):  # no exclusive mode here
            if fs.exists(self.loc.path):
                return False
            fs.pipe_file(self.loc.path, data)
            return True

    def _heartbeat(self) -> None:
        while not self._stop.wait(HEARTBEAT_S):
            with contextlib.suppress(Exception):
                if self.loc.is_local:
                    os.utime(self.loc.path)
                elif (self._read_once() or {}).get("token") == self.info["token"]:
                    self.loc.fs.pipe_file(self.loc.path, json.dumps(
                        dict(self.info, beat=time.time())).encode())

    # -- another run's claim ---------------------------------------------------------

    def _read_once(self) -> dict | None:
        """The claim's content; {} while its run is writing it; None when missing."""
        try:
            raw = self.loc.refresh().fs.cat_file(self.loc.path)
        except (FileNotFoundError, OSError):
            return None
        try:
            held = json.loads(raw)
        except ValueError:
            return {}
        return held if isinstance(held, dict) else {}

    def _read(self) -> dict | None:
        deadline = time.monotonic() + 2.0
        held = self._read_once()
        while held == {} and time.monotonic() < deadline:  # being written: a moment
            time.sleep(0.05)
            held = self._read_once()
        return held

    def _age(self, held: dict) -> float:
        """Seconds since the claim was last refreshed."""
        try:
            if self.loc.is_local:
                return time.time() - os.stat(self.loc.path).st_mtime
            modified = self.loc.fs.modified(self.loc.path)
            return time.time() - modified.timestamp()
        except (OSError, NotImplementedError, AttributeError):
            return time.time() - float(held.get("beat", held.get("since", time.time())))

    def _stale(self, held: dict) -> bool:
        if not held:
            return self._age(held) > EMPTY_STALE_S
        if held.get("host") == self.info["host"]:
            return not _alive(held.get("pid"), held.get("start"))
        return self._age(held) > FOREIGN_STALE_S

    def _take_over(self, held: dict) -> None:
        """Remove the stale claim ``held``, if it is still the one there; only one run
        does (flock on it where the file system has flock)."""
        if not self.loc.is_local:
            if self._read_once() == held:
                with contextlib.suppress(FileNotFoundError):
                    self.loc.fs.rm_file(self.loc.path)
            return
        try:
            fd = os.open(self.loc.path, os.O_RDONLY)
        except FileNotFoundError:
            return
        try:
            if not _lock(fd):
                return  # another run is taking it over: look again
            with contextlib.suppress(FileNotFoundError):
                same = os.fstat(fd).st_ino == os.stat(self.loc.path).st_ino
                if same and _parse(os.pread(fd, 1 << 16, 0)) == held:
                    os.unlink(self.loc.path)
        finally:
            os.close(fd)


def _lock(fd: int) -> bool:
    """An exclusive flock on ``fd`` without waiting: False when another process holds
    one; True when taken, or when the file system has no flock (best effort then)."""
    try:
        import fcntl
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    except (ImportError, OSError):
        pass
    return True


def _parse(raw: bytes) -> dict:
    try:
        held = json.loads(raw)
    except ValueError:
        return {}
    return held if isinstance(held, dict) else {}


def busy_message(out: Location, loc: Location, held: dict) -> str:
    if not held:
        who = "another run that is creating its claim right now"
    else:
        since = datetime.datetime.fromtimestamp(float(held.get("since", 0))).strftime(
            "%Y-%m-%d %H:%M:%S")
        me = held.get("pid") == os.getpid() and held.get("host") == socket.gethostname()
        who = (f"{'this process' if me else 'process'} {held.get('pid')} on host "
               f"{held.get('host')!r} since {since}")
    foreign = held and held.get("host") != socket.gethostname()
    return (f"output {out.url!r} is being written by another run ({who}); wait for it to "
            f"finish, or stop it and run again with resume=True (--resume), which keeps its "
            f"finished chunks. Its claim is {loc.url!r}" + (
                f", taken over once its host has not refreshed it for "
                f"{FOREIGN_STALE_S / 60:.0f} minutes" if foreign else ""))
