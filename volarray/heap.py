"""Heap memory: large tensors on huge pages, mapped straight from the OS, and freed heap
memory given back after each task.

Every tile allocates its tensors afresh, and the kernel faults their pages in 4 kB at a
time, zeroing each: with torch's defaults that cost a 16-channel conv of a 16 x 240^2 slab
60 ms against 45 ms, and a copy of its output 13 ms against 6 ms. torch allocates large
CPU tensors on transparent huge pages when ``THP_MEM_ALLOC_ENABLE=1`` is set before its
first allocation; `request_huge_pages` has it read when volarray is imported (unless the
user set it, to ``0`` say, or the kernel's huge pages are not in ``madvise`` mode).
FaultSeg3D over a 256^3 zarr ran in 21.6 s against 28.0 s (medians of 3), at the same
peak memory. A new process pays a warm-up, more than a short run saves: such a run
keeps them off while its tasks run (`huge_pages_off`). A process that allocated tensors
before importing volarray keeps torch's default (`huge_pages_requested` tells).

glibc's malloc serves a request below its mmap threshold from a heap arena, and raises
that threshold (up to 32 MB) each time a larger mapped block is freed. A task allocates
and frees hundreds of megabytes of tensors of many sizes: once the threshold has risen,
each slab's few-megabyte tensors land in the arenas between others, and the fragments
keep the task's resident memory far above its live tensors. Measured here, FaultSeg3D's
256^3 stage-1 task (projected 403 MB) grew the resident set by 655 MB with glibc's
defaults and by 412 MB with a fixed 1 MB threshold; ``predict(...).to_zarr`` over a
256^3 zarr peaked at 2.20 GB and 1.33 GB. `use_mapped_tensors` fixes the threshold
(which also stops it rising) unless ``MALLOC_MMAP_THRESHOLD_`` is set (glibc applied
the user's value). What small blocks remain, ``malloc_trim(0)`` returns after each task:
without it, a long run's resident memory crept up with the number of tasks (FaultSeg3D
over a 512^3 zarr: 3.16 GB against 2.75 GB). Elsewhere than glibc both do nothing.

That returns every freed tensor's pages to the OS, and a VM whose host reclaims freed
pages (free page reporting) makes the next task fault them in again at the host's
pace: FaultSeg3D in memory at 256^3 spent 20.6 s of CPU in the kernel against 37.4 s in
user code (29.9 s wall), plain torch's warm second forward a tenth of that.
``VOLARRAY_HEAP=reuse`` keeps freed memory in the process for the next task instead
(glibc's threshold fixed at its 32 MB ceiling, no trim): 24.4 s, 10.4 s in the kernel,
peak 1.62 GB against 1.39 GB; InstanceNormUNet 128^3 3.1-3.5 s against 4.5-5.4 s,
1.25 GB against 0.98 GB; a 512^3 zarr to zarr 230 s against 274 s, 2.10 GB against
1.40 GB. Each task stays within its projected memory, but the process holds what its
tasks freed beside what they use (1.0-1.9x the default's peak, `benchmarks/results/
cost.md`), so it is the user's choice, not the default.
"""
from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import mmap
import os
import sys
import threading

HUGE_PAGES_ENV = "THP_MEM_ALLOC_ENABLE"  # read by torch's CPU allocator, once
HUGE_PAGE_MIN = 2 << 20  # bytes: torch advises huge pages from this size up
MMAP_THRESHOLD = 1 << 20  # bytes: tensors from 1 MB up get pages of their own
HEAP_ENV = "VOLARRAY_HEAP"  # 'return' (the default) or 'reuse'
REUSE_MMAP_THRESHOLD = 32 << 20  # glibc's own ceiling for its rising threshold
_M_MMAP_THRESHOLD = -3  # mallopt's parameter numbers (malloc.h)
_M_TRIM_THRESHOLD = -1
REUSE_TRIM_THRESHOLD = 1 << 30  # fixing the mmap threshold fixes this one at 128 kB too:
# free() would then hand an arena's free top back at once


def _libc():
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        prctl = getattr(libc, "prctl", None) if sys.platform == "linux" else None
        return libc.malloc_trim, libc.mallopt, prctl
    except (OSError, AttributeError):  # not glibc (macOS, musl, Windows)
        return None, None, None


_TRIM, _MALLOPT, _PRCTL = _libc()
_fixed = threading.Lock()
_done = []  # rebound to [whether it was set] by the first call


def request_huge_pages() -> bool:
    """Ask torch for huge pages where the kernel gives them on request (transparent
    huge pages in ``madvise`` mode, on Linux), unless the user set the variable. torch
    reads it once, at its first allocation: a one-element tensor makes it read it
    now, and the variable is then removed again, so that child processes (a user's
    other programs, spawned workers) are not changed; volarray's own worker processes
    ask again when they import volarray. True if this call offered it to torch
    (`huge_pages_requested` tells whether torch took it)."""
    if HUGE_PAGES_ENV in os.environ or _THP_MODE.get("mode") != "madvise":
        return False
    import torch
    os.environ[HUGE_PAGES_ENV] = "1"
    try:
        torch.empty(1)  # torch reads the variable now (if it has not allocated yet)
    finally:
        del os.environ[HUGE_PAGES_ENV]
    return True


# Planned work below which a run keeps huge pages off: on a VM whose balloon reports freed
# 2 MB blocks to the host, a process's first huge-page faults cost about a second per GB,
# more than a short run saves (FaultSeg3D at 128^3, 137 GMAC: 2.3 s with huge pages, 1.5 s
# without; at 256^3, 1,480 GMAC planned, 21.6 s against 28.0 s).
SMALL_RUN_MACS = 500e9


def worth_huge_pages(planned_macs: float) -> bool:
    """Whether a run of this much work gains more from huge pages than it pays."""
    return planned_macs >= SMALL_RUN_MACS


_PR_SET_THP_DISABLE = 41  # prctl's option numbers (linux/prctl.h)
_PR_GET_THP_DISABLE = 42


@contextlib.contextmanager
def huge_pages_off(off: bool = True):
    """While the body runs (a short run's task), this process's new page faults do not
    use huge pages: prctl's THP_DISABLE flag, checked at each fault (Linux only). The
    flag is set while any such task runs and put back as it was after the last, so
    that processes started in between do not inherit it."""
    if not off or _PRCTL is None:
        yield
        return
    with _thp_lock:
        if _thp.running == 0:
            _thp.was = _PRCTL(_PR_GET_THP_DISABLE, 0, 0, 0, 0)
            _PRCTL(_PR_SET_THP_DISABLE, 1, 0, 0, 0)
        _thp.running += 1
    try:
        yield
    finally:
        with _thp_lock:
            _thp.running -= 1
            if _thp.running == 0:
                _PRCTL(_PR_SET_THP_DISABLE, _thp.was, 0, 0, 0)


_thp_lock = threading.Lock()


class _HugePagesOff:
    """Tasks running with huge pages off, and the flag as it was before the first."""
    running, was = 0, 0


_thp = _HugePagesOff()


def kernel_thp_mode() -> dict:
    """The kernel's transparent-huge-page mode ("always", "madvise", "never"), if any."""
    try:
        with open("/sys/kernel/mm/transparent_hugepage/enabled") as f:
            text = f.read()
    except OSError:
        return {}
    return {"mode": text.split("[", 1)[1].split("]", 1)[0]} if "[" in text else {}


_THP_MODE = kernel_thp_mode()


def huge_pages_requested() -> bool:
    """Whether torch asks the kernel for huge pages for this process's large CPU
    tensors, on Linux with glibc's malloc: torch aligns those to a page when it does,
    and glibc's large blocks otherwise start just past one."""
    if sys.platform != "linux" or _MALLOPT is None:
        return False
    import torch
    probes = [torch.empty(HUGE_PAGE_MIN + 4096, dtype=torch.uint8) for _ in range(3)]
    return all(t.data_ptr() % mmap.PAGESIZE == 0 for t in probes)


def heap_policy_given() -> str:
    """``VOLARRAY_HEAP`` as the user set it, lower-cased; '' where unset or blank."""
    return os.environ.get(HEAP_ENV, "").strip().lower()


def heap_policy() -> str:
    """``VOLARRAY_HEAP``: 'return' (freed tensor memory goes back to the OS after each
    task; the default) or 'reuse' (it stays in the process for the next task)."""
    value = heap_policy_given() or "return"
    if value not in ("return", "reuse"):
        from .errors import InputError
        raise InputError(f"{HEAP_ENV}={os.environ[HEAP_ENV]!r} is neither 'return' nor "
                         f"'reuse': unset it (freed memory goes back to the OS after each "
                         f"task), or set {HEAP_ENV}=reuse to keep it for the next task",
                         parameter=HEAP_ENV)
    return value


VIRTIO_DEVICES = "/sys/bus/virtio/devices"
_BALLOON_DEVICE = "0x0005"  # the virtio spec's device ID of a memory balloon
_BALLOON_F_REPORTING = 5  # its feature bit: free page reporting


def host_takes_freed_memory() -> bool:
    """Whether this is a VM whose host takes back the memory the guest frees (a virtio
    balloon with free page reporting, as Firecracker offers).
    There, memory a task gives back to the OS is faulted in again by a later task at the
    host's pace (`benchmarks/results/cost.md`). Read from sysfs (Hyper-V's balloon is
    not seen); False where it cannot tell."""
    try:
        devices = os.listdir(VIRTIO_DEVICES)
    except OSError:
        return False
    for d in devices:
        try:
            with open(os.path.join(VIRTIO_DEVICES, d, "device")) as f:
                if f.read().strip() != _BALLOON_DEVICE:
                    continue
            with open(os.path.join(VIRTIO_DEVICES, d, "features")) as f:
                bits = f.read().strip()  # one '0' or '1' per feature bit, bit 0 first
        except OSError:
            continue
        if bits[_BALLOON_F_REPORTING:_BALLOON_F_REPORTING + 1] == "1":
            return True
    return False


def use_mapped_tensors() -> bool:
    """Fix glibc's mmap threshold for this process, once (the first task of a process
    calls it): at MMAP_THRESHOLD, or at REUSE_MMAP_THRESHOLD (and the trim threshold
    at REUSE_TRIM_THRESHOLD) where `heap_policy` is 'reuse'; True if this call set it."""
    global _done
    if _done or _MALLOPT is None or "MALLOC_MMAP_THRESHOLD_" in os.environ:
        return False
    reuse = heap_policy() == "reuse"
    with _fixed:
        if _done:
            return False
        _done = [bool(_MALLOPT(_M_MMAP_THRESHOLD,
                               REUSE_MMAP_THRESHOLD if reuse else MMAP_THRESHOLD))]
        if reuse and _done[0]:
            _MALLOPT(_M_TRIM_THRESHOLD, REUSE_TRIM_THRESHOLD)
        return _done[0]


def release_freed_memory() -> bool:
    """Return the heap's free pages to the OS (not where `heap_policy` is 'reuse');
    True if any were returned."""
    if _TRIM is None or heap_policy() == "reuse":
        return False
    return bool(_TRIM(0))
