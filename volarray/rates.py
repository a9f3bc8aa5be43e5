"""The rates a plan's projected time is costed at: MACs per second on the device, bytes
per second on the storage that holds scratch, seconds of overhead per task, and bytes
per second of the memory-bound work every op's output costs beyond its arithmetic.

They come, in this order, from the environment variable ``VOLARRAY_RATES``
(``"macs=2e10,bytes=1.5e9,task=0.003"``, each of the three, and optionally
``mem=8e9``), from a small JSON cache per machine and device (under the user cache
dir, or ``VOLARRAY_CACHE_DIR``), or from a calibration of a few seconds on first use,
which is cached (``volarray calibrate`` runs it again): a channels-last conv3d as tiles
run it for MAC/s, a write and read of a temporary file where scratch lives for bytes/s,
volarray's own tasks for the overhead (`volarray.taskprobe`, registered with
`use_task_probe` when volarray is imported; trivial dask tasks without it), and an
out-of-place ReLU plus one copy of a channels-last tile for the memory rate.

Why a memory rate: a tile's convolutions are not all its time. Norms, ReLUs after
them, concatenations, up- and downsampling, and the copies of a sweep (rows into row
buffers, padded borders) each pass over their output's bytes; an InstanceNorm network
spends most of its time there (FaultSSL: its convolutions were a fifth), and a plan
costed on MACs alone was projected at a third of its measured time.
"""
from __future__ import annotations

import contextvars
import json
import os
import platform
import tempfile
import time
import warnings
from dataclasses import asdict, dataclass, replace
from pathlib import Path

from .errors import InputError

ENV_RATES = "VOLARRAY_RATES"
ENV_CACHE = "VOLARRAY_CACHE_DIR"
FIELDS = {"macs": "macs_per_s", "bytes": "bytes_per_s", "task": "task_s"}
# cache entries measured before the per-task rate came from volarray's own tasks (a
# trivial dask task's, 15x too low) are measured again
CALIBRATION = 2
OPTIONAL = {"mem": "memory_bytes_per_s"}


@dataclass(frozen=True)
class Rates:
    """How fast this machine computes, moves bytes, and schedules a task."""

    macs_per_s: float
    bytes_per_s: float
    task_s: float
    source: str = "given"  # 'given', 'VOLARRAY_RATES', 'cache <path>' or 'calibrated'
    # bytes of op output per second (None: memory-bound work is not costed apart)
    memory_bytes_per_s: float | None = None

    def __post_init__(self):
        for name in ("macs_per_s", "bytes_per_s", "task_s", "memory_bytes_per_s"):
            value = getattr(self, name)
            if value is None and name == "memory_bytes_per_s":
                continue
            if not (isinstance(value, (int, float)) and value == value and value > 0
                    and value != float("inf")):
                raise InputError(f"rates: {name}={value!r} is not a positive number; "
                                 f"pass e.g. {ENV_RATES}='macs=2e10,bytes=1e9,task=0.003'",
                                 parameter=ENV_RATES)

    def text(self) -> str:
        mem = "" if self.memory_bytes_per_s is None else \
            f", memory-bound ops {self.memory_bytes_per_s / 1e9:.3g} GB/s"
        return (f"{self.macs_per_s / 1e9:.3g} GMAC/s, {self.bytes_per_s / 1e9:.3g} GB/s, "
                f"{self.task_s * 1e3:.3g} ms/task{mem} ({self.source})")


def parse_rates(text: str) -> Rates:
    """``"macs=2e10,bytes=1.5e9,task=0.003"`` (and optionally ``mem=8e9``) as `Rates`;
    anything else is refused."""
    values = {}
    for part in text.split(","):
        key, _, value = part.partition("=")
        try:
            values[{**FIELDS, **OPTIONAL}[key.strip()]] = float(value)
        except (KeyError, ValueError):
            raise InputError(f"{ENV_RATES}={text!r}: {part.strip()!r} is not one of "
                             "macs=, bytes=, task=, mem= with a number; pass e.g. "
                             f"{ENV_RATES}='macs=2e10,bytes=1e9,task=0.003'",
                             parameter=ENV_RATES) from None
    if not set(FIELDS.values()) <= set(values):
        raise InputError(f"{ENV_RATES}={text!r} lacks one of macs=, bytes=, task=; pass all "
                         f"three, e.g. {ENV_RATES}='macs=2e10,bytes=1e9,task=0.003'",
                         parameter=ENV_RATES)
    return Rates(**values, source=ENV_RATES)


def cache_dir() -> Path:
    """``VOLARRAY_CACHE_DIR``, else the user cache dir (platformdirs), else
    ~/.cache/volarray."""
    if os.environ.get(ENV_CACHE):
        return Path(os.environ[ENV_CACHE])
    try:
        import platformdirs
        return Path(platformdirs.user_cache_dir("volarray"))
    except ImportError:
        return Path.home() / ".cache" / "volarray"


def cache_file() -> Path:
    return cache_dir() / "rates.json"


def machine_key(device: str) -> str:
    """The cache's key: this machine, the device kind and torch's CPU threads."""
    import torch
    kind = "cpu" if device == "cpu" else "cuda"
    if kind == "cuda" and torch.cuda.is_available():
        kind += ":" + torch.cuda.get_device_name(0)
    return f"{platform.node()}|{kind}|threads={torch.get_num_threads()}"


def _read_cache() -> dict:
    try:
        return json.loads(cache_file().read_text())
    except (OSError, ValueError):
        return {}


def cached(device: str) -> Rates | None:
    entry = _read_cache().get(machine_key(device))
    if not isinstance(entry, dict) or entry.get("calibration") != CALIBRATION:
        return None
    try:  # an entry from before the memory rate is measured again
        return Rates(**{k: float(entry[k]) for k in (*FIELDS.values(), *OPTIONAL.values())},
                     source=f"cache {cache_file()}")
    except (KeyError, TypeError, ValueError, InputError):
        return None  # a damaged entry is measured again


def save(device: str, rates: Rates) -> Path:
    data = _read_cache()
    data[machine_key(device)] = {**{k: v for k, v in asdict(rates).items() if k != "source"},
                                 "measured": time.strftime("%Y-%m-%dT%H:%M:%S"),
                                 "calibration": CALIBRATION}
    path = cache_file()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".{os.getpid()}.tmp")
    tmp.write_text(json.dumps(data, indent=1))
    os.replace(tmp, path)  # whole or not at all, if two processes calibrate at once
    return path


def rates_for(device: str = "cpu", given: Rates | None = None) -> Rates:
    """The rates of ``device``: ``given``, else ``VOLARRAY_RATES``, else the cache, else a
    calibration (cached)."""
    if given is not None:
        return given
    provisional = _provisional.get()
    if provisional is not None and provisional[0] == device:  # the task probe's own runs
        return provisional[1]
    if os.environ.get(ENV_RATES):
        return parse_rates(os.environ[ENV_RATES])
    found = cached(device)
    if found is None:
        found = calibrate(device)
        try:
            save(device, found)
        except OSError:  # a read-only home (an HPC node): measured again next time
            pass
    return found


def steady_seconds(fn, repeats: int = 5, min_s: float = 1.0, min_calls: int = 30,
                 max_s: float = 6.0) -> float:
    """Seconds per call of ``fn`` as a running process sees it: the median of the
    ``repeats`` fastest of at least ``min_calls`` calls and ``min_s`` seconds (at most
    ``max_s``). A fresh process's first 15 or so 2 GMAC convolutions ran at 15-20
    GMAC/s here, steadily, and at 86 from then on: its first half GB of pages cost a VM
    far more than the ones it frees and takes again (touching 512 MB first took 1.3-5 s
    and removed the slow calls), and a run's tasks see the latter."""
    times = []
    start = time.perf_counter()
    while True:
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
        took = time.perf_counter() - start
        if (len(times) >= min_calls and took >= min_s) or took >= max_s:
            break
    fastest = sorted(times)[:repeats]
    return fastest[len(fastest) // 2]


def _median_time(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return sorted(times)[len(times) // 2]


def _tiles(device: str, side: int, channels: int):
    """A channels-last tile (1, ``channels``, side/3, side, side) on the device, as a
    swept task's slabs are (a CUDA device's three times the side: 1 GB at 32
    channels), and a synchronizer."""
    import torch
    dev = "cuda" if device.startswith("cuda") else "cpu"
    if dev == "cuda":
        side = side * 3
    x = torch.randn(1, channels, side // 3, side, side, device=dev)
    sync = torch.cuda.synchronize if dev == "cuda" else (lambda: None)
    return x.contiguous(memory_format=torch.channels_last_3d), sync


def measure_macs(device: str = "cpu", side: int = 96, channels: int = 16) -> float:
    """MAC/s of a 3x3x3 conv3d with its ReLU (``channels`` in and out, padding 1) on a
    channels-last slab, through the call tiles make (`volarray.ops.conv.Conv`): the
    layer most dense 3D networks spend their time in. A contiguous NCDHW input, as
    this was measured before, ran at half the rate tiles reach (44 against 80
    GMAC/s here)."""
    import torch
    from .ops.conv import Conv
    if device.startswith("cuda"):
        channels *= 2  # a GPU's convolutions fill it only with more channels
    x, sync = _tiles(device, side, channels)
    conv = Conv(kernel=(3, 3, 3), pad_lo=(1, 1, 1))
    w = torch.randn(channels, channels, 3, 3, 3, device=x.device)
    b = torch.zeros(channels, device=x.device)

    def run():
        with torch.inference_mode():
            conv.convolve(x, w, b, (1, 1, 1), relu=True)
        sync()
    return channels * channels * 27 * x[0, 0].numel() / steady_seconds(run)


def measure_memory(device: str = "cpu", side: int = 96, channels: int = 16) -> float:
    """Bytes of output per second of the memory-bound work an op's tile costs: an
    out-of-place ReLU of a channels-last slab and one copy of the result (into a row
    buffer, a padded tile)."""
    import torch
    x, sync = _tiles(device, side, channels)
    buf = torch.empty_like(x)

    def run():
        buf.copy_(torch.relu(x))
        sync()
    return x.numel() * x.element_size() / steady_seconds(run)


def measure_bytes(where: str | None = None, size: int = 64 * 2**20) -> float:
    """Bytes/s of writing and reading back a temporary file of ``size`` bytes in
    ``where`` (by default the temporary directory), as scratch is written and read."""
    import numpy as np
    data = np.ones(size // 4, np.float32)
    with tempfile.TemporaryDirectory(dir=where, prefix="volarray-rates-") as d:
        path = os.path.join(d, "probe.bin")

        def write_read():
            data.tofile(path)
            np.fromfile(path, np.float32)
        write_read()
        return 2 * size / _median_time(write_read, 3)


def measure_task(n: int = 400) -> float:
    """Seconds per trivial task on dask's threaded scheduler."""
    import dask
    import dask.threaded
    graph = {("t", i): (abs, i) for i in range(n)}
    keys = list(graph)
    dask.get(graph, keys[:1])
    return _median_time(lambda: dask.threaded.get(graph, keys), 3) / n


_task_probe = None  # probe(device) -> seconds per task, set by `use_task_probe`
# (device, the rates a calibration in this thread has measured so far)
_provisional = contextvars.ContextVar("volarray_provisional_rates", default=None)


def use_task_probe(probe) -> None:
    """Measure the per-task rate with ``probe(device)`` (seconds per task of volarray's
    own engine, `volarray.taskprobe`) instead of trivial dask tasks."""
    global _task_probe
    _task_probe = probe


def calibrate(device: str = "cpu", where: str | None = None) -> Rates:
    """Measure the four rates (a few seconds). The task probe runs volarray's engine,
    whose plans ask for rates: they get these, with a trivial dask task's overhead."""
    rates = Rates(measure_macs(device), measure_bytes(where), measure_task(), "calibrated",
                  measure_memory(device))
    if _task_probe is None:
        return rates
    token = _provisional.set((device, rates))
    try:
        task_s = _task_probe(device)
    except Exception as e:  # the user's run goes on, costed with a trivial task's rate
        warnings.warn(f"volarray's task probe failed on {device!r} ({type(e).__name__}: {e}); "
                      "the per-task rate is a trivial dask task's", RuntimeWarning, stacklevel=2)
        task_s = rates.task_s
    finally:
        _provisional.reset(token)
    return replace(rates, task_s=max(task_s, rates.task_s))
