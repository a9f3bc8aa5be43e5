"""Devices: which devices a run uses, how much memory a task may take on each, how many
tasks run on each at once, the model's copy on each, and float32 precision in tasks.

``device="cuda"`` means every GPU the process sees (``CUDA_VISIBLE_DEVICES``, as a
dask-cuda worker is given its own), ``"cuda:0,2"`` some of them, ``"cuda:1"`` one. The
names are resolved where the tasks run, so a graph built on a laptop uses the GPUs of
the node it runs on. At most `IN_FLIGHT` tasks run on one GPU at a time in a process
(one computes while the other moves its data); each task takes the least loaded device.
"""
from __future__ import annotations

import contextlib
import copy
import threading

import numpy as np
import torch

from .errors import InputError

IN_FLIGHT = 2  # tasks running at once on one GPU, per process
# device memory a task may not take: the CUDA context, cuDNN's workspaces, the
# allocator's fragmentation; a fraction of the device's total, at least this many bytes
DEVICE_MARGIN = 0.1
DEVICE_MARGIN_MIN = 1.5e9
STRATEGIES = ("slab", "whole")
COMPUTE_DTYPES = ("float32", "tf32", "float16", "bfloat16")


def _refuse(device, why: str) -> InputError:
    return InputError(f"device={device!r} {why}; pass 'cpu', 'cuda' (every visible GPU), "
                      "'cuda:N', 'cuda:0,2' (some of them) or 'auto'", parameter="device")


def resolve_device(device, remote: bool = False) -> str:
    """The canonical device spec: 'cpu', 'cuda', 'cuda:N' or 'cuda:N,M,...' (None:
    'cpu'; 'auto': 'cuda' where torch sees a GPU). A GPU torch cannot see is refused,
    unless ``remote``: a cluster's workers, not this machine, will run the tasks."""
    if device is None or device == "auto":
        return "cuda" if device == "auto" and torch.cuda.is_available() else "cpu"
    if isinstance(device, torch.device):
        device = str(device)
    if not isinstance(device, str):
        raise _refuse(device, "is not a device name")
    spec = device.strip().lower()
    if spec == "cpu":
        return "cpu"
    if not spec.startswith("cuda"):
        raise _refuse(device, "is not a CPU or CUDA device")
    if not torch.cuda.is_available() and not remote:
        raise InputError(f"device={device!r} but torch sees no CUDA device; pass device='cpu'"
                         " (or build the graph under the distributed Client of a GPU "
                         "cluster)", parameter="device")
    if spec == "cuda":
        return spec
    rest = spec[4:]
    parts = rest[1:].split(",") if rest.startswith(":") else []
    if not parts or not all(p.strip().isdigit() for p in parts):
        raise _refuse(device, "names no GPU index")
    idx = [int(p) for p in parts]
    count = torch.cuda.device_count()
    bad = [] if remote else [i for i in idx if i >= count]
    if bad or len(set(idx)) != len(idx):
        raise _refuse(device, f"names {'GPU ' + str(bad[0]) if bad else 'a GPU twice'} of "
                              f"the {count} torch sees")
    return "cuda:" + ",".join(str(i) for i in idx)


def device_names(spec: str) -> tuple[str, ...]:
    """The devices a spec names in this process: 'cuda' -> every visible GPU."""
    if spec == "cuda":
        return tuple(f"cuda:{i}" for i in range(max(1, torch.cuda.device_count())))
    if spec.startswith("cuda:") and "," in spec:
        return tuple(f"cuda:{i}" for i in spec[5:].split(","))
    return (spec,)


def kind(spec: str) -> str:
    """'cpu' or 'cuda'."""
    return "cpu" if spec == "cpu" else "cuda"


def torch_device(name: str) -> str:
    """The torch device a named device runs on (a seam: tests map fake GPUs to 'cpu')."""
    return name


# ------------------------------------------------------------------ strategy, precision
def resolve_strategy(strategy, device: str) -> str:
    """How a task runs its stage: 'slab' (a sweep along z in cache-sized slabs, the CPU's
    default) or 'whole' (each layer over the whole tile, few large launches: a GPU's)."""
    if strategy is None:
        return "slab" if kind(device) == "cpu" else "whole"
    if strategy not in STRATEGIES:
        raise InputError(f"strategy={strategy!r} is not one of {STRATEGIES} ('slab' sweeps a "
                         "task in cache-sized slabs, 'whole' runs each layer over the whole "
                         "tile)", parameter="strategy")
    return strategy


def compute_name(compute_dtype) -> str:
    """'float32', 'tf32', 'float16' or 'bfloat16' from a name or torch dtype."""
    if compute_dtype is None or compute_dtype is torch.float32:
        return "float32"
    for name in COMPUTE_DTYPES:
        if compute_dtype == name or compute_dtype is getattr(torch, name, None):
            return name
    raise InputError(f"compute_dtype={compute_dtype!r} is not 'float32', 'tf32', 'float16' or "
                     "'bfloat16'", parameter="compute_dtype")


def storage_dtype(compute: str, model_dtype: torch.dtype = torch.float32) -> torch.dtype:
    """The dtype kept tensors and scratch hold: the compute dtype's (half precision
    keeps half the bytes), else the model's."""
    return {"float16": torch.float16, "bfloat16": torch.bfloat16}.get(compute, model_dtype)


class _Precision:
    """TF32 on or off for float32 matmuls and convolutions while tasks run, the flags
    put back when the last task ends (they are process-wide; tasks overlap)."""

    def __init__(self):
        self.lock, self.depth, self.saved = threading.Lock(), 0, None

    @contextlib.contextmanager
    def __call__(self, allow_tf32: bool):
        with self.lock:
            if self.depth == 0:
                self.saved = (torch.backends.cuda.matmul.allow_tf32,
                              torch.backends.cudnn.allow_tf32)
            self.depth += 1
            torch.backends.cuda.matmul.allow_tf32 = allow_tf32
            torch.backends.cudnn.allow_tf32 = allow_tf32
        try:
            yield
        finally:
            with self.lock:
                self.depth -= 1
                if self.depth == 0:
                    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = \
                        self.saved


float32_precision = _Precision()


# ------------------------------------------------------------------ memory
def module_bytes(module: torch.nn.Module) -> int:
    return sum(t.numel() * t.element_size()
               for t in list(module.parameters()) + list(module.buffers()))


def device_budget(spec: str, model_bytes: int, in_flight: int = IN_FLIGHT) -> dict:
    """The default memory per task on a GPU: its free memory less the model's copy and
    a margin, shared by the tasks in flight on it; the smallest over the spec's GPUs.
    A dict: ``limit``, and ``device``, ``free``, ``margin``, ``in_flight`` for the plan."""
    best = None
    for name in device_names(spec):
        free, total = torch.cuda.mem_get_info(torch.device(name))
        margin = max(DEVICE_MARGIN * total, DEVICE_MARGIN_MIN)
        limit = int((free - model_bytes - margin) // in_flight)
        if best is None or limit < best["limit"]:
            best = {"limit": limit, "device": name, "free": int(free), "margin": int(margin),
                    "model": int(model_bytes), "in_flight": in_flight}
    if best["limit"] <= 0:
        raise InputError(f"{best['device']} has {best['free'] / 1e9:.1f} GB free, too little "
                         f"for the model ({model_bytes / 1e9:.2f} GB) and a margin of "
                         f"{best['margin'] / 1e9:.1f} GB; free device memory or pass "
                         "memory_limit (per task)", parameter="memory_limit")
    return best


# ------------------------------------------------------------------ the model's copies
def module_device(module: torch.nn.Module) -> torch.device | None:
    """The device of the module's first parameter or buffer (None when it has none)."""
    for t in module.parameters():
        return t.device
    for t in module.buffers():
        return t.device
    return None


def same_device(a, b) -> bool:
    """Whether two devices are one ('cuda' is the current GPU, 'cpu:0' the CPU)."""
    a, b = torch.device(a), torch.device(b)
    if a.type != b.type:
        return False
    if a.type != "cuda" or a.index == b.index:
        return True
    current = torch.cuda.current_device()
    return (current if a.index is None else a.index) == (current if b.index is None else b.index)


def input_device(module: torch.nn.Module) -> torch.device:
    """Where inputs for ``module`` are made (capture's fake input, the self-check's
    probe): on the module's own device, the CPU for a module without weights."""
    return module_device(module) or torch.device("cpu")


def default_device(module: torch.nn.Module) -> str | None:
    """The device a run defaults to: the GPU a model is on ('cuda:N'), else None (the CPU)."""
    where = module_device(module)
    if where is None or where.type != "cuda":
        return None
    return f"cuda:{where.index if where.index is not None else torch.cuda.current_device()}"


def module_dtype(module: torch.nn.Module) -> torch.dtype | None:
    """The dtype of the module's first floating-point parameter or buffer."""
    for t in list(module.parameters()) + list(module.buffers()):
        if t.is_floating_point():
            return t.dtype
    return None


def model_on(module: torch.nn.Module, device: str, dtype: torch.dtype | None = None
             ) -> torch.nn.Module:
    """``module`` on ``device`` (and with its floating-point weights in ``dtype``, a
    half-precision run's): itself where it is so already, else a copy moved and cast
    there once (``.to`` would move the caller's model)."""
    where, held = module_device(module), module_dtype(module)
    moved = where is not None and not same_device(where, device)
    cast = dtype is not None and held is not None and held != dtype
    if not (moved or cast):
        return module
    return copy.deepcopy(module).to(device=device, dtype=dtype if cast else None)


# ------------------------------------------------------------------ data to the device
# integer types whose cast torch runs on every device; wider unsigned ones are cast
# on the host
DEVICE_CAST = (np.bool_, np.int8, np.uint8, np.int16, np.int32, np.int64)


def to_device(a, device) -> torch.Tensor:
    """(C, z, y, x) numpy array (or an array with ``__dlpack__``: a CuPy array on the
    GPU) -> (1, C, z, y, x) channels-last tensor on ``device``, in its own dtype: an
    integer volume crosses in its own bytes and is cast on the device. To a GPU the
    host array is staged in pinned memory (torch's caching host allocator, reused
    across tasks) and copied without blocking; a CPU tensor is the array itself where
    it is laid out channels-last already (kept tensors are)."""
    device = torch.device(device)
    if not isinstance(a, np.ndarray):  # DLPack: no host round trip for a device array
        t = torch.from_dlpack(a)[None]
        return t.to(device).contiguous(memory_format=torch.channels_last_3d)
    if np.issubdtype(a.dtype, np.integer) and a.dtype.type not in DEVICE_CAST:
        a = a.astype(np.float32)
    last = a.transpose(1, 2, 3, 0)
    if device.type == "cuda":
        dtype = torch.from_numpy(np.empty(0, a.dtype)).dtype
        host = torch.empty(last.shape, dtype=dtype, pin_memory=True)
        host.numpy()[...] = last
        t = host.to(device, non_blocking=True)
    else:
        if not (last.flags.c_contiguous and last.flags.writeable):
            last = np.ascontiguousarray(last)
            if not last.flags.writeable:
                last = last.copy()
        t = torch.from_numpy(last).to(device)
    # from the (z, y, x, C) view, so that the batch stride is a true channels-last one
    return t[None].permute(0, 4, 1, 2, 3)


OUTPUT_ARRAYS = ("numpy", "cupy")


def check_output_array(output_array, device: str | None = None) -> None:
    """``output_array`` is 'numpy' (host chunks) or 'cupy' (chunks on the run's GPU:
    CuPy installed, the device a CUDA one); ``device`` None checks the name only."""
    if output_array not in OUTPUT_ARRAYS:
        raise InputError(f"output_array={output_array!r} is not one of {OUTPUT_ARRAYS}",
                         parameter="output_array")
    if output_array == "numpy" or device is None:
        return
    if kind(device) != "cuda":
        raise InputError(f"output_array='cupy' returns chunks on a GPU, but the run is on "
                         f"device={device!r}; pass device='cuda' (or a model on the GPU), or "
                         "output_array='numpy'", parameter="output_array")
    cupy_module()


def cupy_module():
    """CuPy, imported where it is asked for (volarray does not need it otherwise)."""
    try:
        import cupy
    except ImportError:
        raise InputError("output_array='cupy' needs CuPy, which is not installed here; "
                         "pip install cupy-cuda12x (or the build for your CUDA), or pass "
                         "output_array='numpy'", parameter="output_array") from None
    return cupy


def array_module(a):
    """numpy for host arrays (and packed chunks), CuPy for a CuPy array: the module whose
    ``empty`` and ``full`` make an array beside ``a``."""
    if type(a).__module__.split(".")[0] == "cupy":
        import cupy
        return cupy
    return np


def check_finite(t: torch.Tensor, origin=(0, 0, 0)) -> None:
    """NaN or Inf in the volume would spread through every layer: refuse it, saying at
    which voxel of the whole volume. ``t`` is a (1, C, z, y, x) tensor on its device,
    checked there: one reduction and one bool back (its sum is finite only if every
    value is; a sum that overflows is checked value by value), the voxel looked for only
    when one is bad. On a CPU numpy's one pass over the tensor's memory
    (``torch.isfinite(t).all()`` is four, 40x numpy's time there)."""
    if not t.is_floating_point():
        return
    if t.device.type == "cpu" and t.dtype in (torch.float32, torch.float64, torch.float16):
        if np.isfinite(t.numpy()).all():  # the tensor's own memory, numpy's one pass
            return
    elif bool(torch.isfinite(t.sum(dtype=torch.float32))) or bool(torch.isfinite(t).all()):
        return
    c, z, y, x = (int(i) for i in (~torch.isfinite(t[0])).nonzero()[0])
    v = float(t[0, c, z, y, x])
    value = "NaN" if v != v else ("Inf" if v > 0 else "-Inf")
    pos = tuple(int(o) + d for o, d in zip(origin, (z, y, x)))
    raise InputError(f"the volume holds {value} at channel {c}, voxel (z, y, x) = {pos}; fill "
                     "or mask non-finite values (np.nan_to_num) before predicting",
                     parameter="volume")


# ------------------------------------------------------------------ tasks in flight
class DeviceSlots:
    """At most ``per_device`` tasks in flight on each GPU of a process: a task takes the
    least loaded of its devices (ties: the one that has run fewest tasks), waiting while
    all are full. The CPU is not limited (dask's threads are)."""

    def __init__(self, per_device: int = IN_FLIGHT):
        self.per_device = per_device
        self.cond = threading.Condition()
        self.busy: dict[str, int] = {}
        self.started: dict[str, int] = {}
        self.peak: dict[str, int] = {}

    def limited(self, name: str) -> bool:
        return name != "cpu"

    def take(self, names) -> str:
        names = tuple(names)
        with self.cond:
            while True:
                free = [d for d in names if not self.limited(d)
                        or self.busy.get(d, 0) < self.per_device]
                if free:
                    break
                self.cond.wait()
            d = min(free, key=lambda d: (self.busy.get(d, 0), self.started.get(d, 0)))
            self.busy[d] = self.busy.get(d, 0) + 1
            self.started[d] = self.started.get(d, 0) + 1
            self.peak[d] = max(self.peak.get(d, 0), self.busy[d])
            return d

    def give(self, name: str) -> None:
        with self.cond:
            self.busy[name] -= 1
            self.cond.notify_all()

    @contextlib.contextmanager
    def use(self, names):
        d = self.take(names)
        try:
            yield d
        finally:
            self.give(d)


SLOTS = DeviceSlots()


def token_array(t: torch.Tensor):
    """A tensor's values on the host, for hashing: a numpy array, or for a dtype numpy
    lacks (bfloat16) its name and its bits."""
    t = t.detach().cpu()
    if t.dtype == torch.bfloat16:
        return "bfloat16", t.view(torch.int16).numpy()
    return t.numpy()


def task_budget(memory_limit, device: str, model: torch.nn.Module) -> tuple[int | None, str]:
    """The default per-task limit on a GPU (`device_budget`) and how it was chosen, for
    the plan's table; (None, '') where the user gave one or the run is on the CPU."""
    if memory_limit is not None or kind(device) == "cpu":
        return None, ""
    if not torch.cuda.is_available():  # planned here (a login node), run on a cluster's GPUs
        return None, "the default: no GPU here to ask (the cluster's workers hold them)"
    b = device_budget(device, module_bytes(model))
    return b["limit"], (f"from {b['device']}: {b['free'] / 1e9:.1f} GB free less the model "
                        f"({b['model'] / 1e9:.2f} GB) and a {b['margin'] / 1e9:.1f} GB margin, "
                        f"over {b['in_flight']} tasks in flight")


def kept_dtype(compute: str, model_dtype: torch.dtype = torch.float32) -> str:
    """The numpy dtype kept tensors and scratch hold between stages: float16 for a
    float16 run or model (half the bytes), else float32 (numpy has no bfloat16)."""
    return "float16" if torch.float16 in (storage_dtype(compute), model_dtype) else "float32"
