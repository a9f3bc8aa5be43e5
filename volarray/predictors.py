"""The composable pieces `predict` is made of.

A predictor maps a volume to lazy class scores, (C_out, Z', Y', X'):

- `Exact`: the model traced once per input shape and planned once, its layers run as a
  graph of halo-overlapped tiles; the result equals one whole-volume forward.
- `Window`: MONAI's sliding-window inference, out of core (the model is called as is).

Each is a frozen object, called as ``predictor(volume)``; the same predictor serves
many calls on volumes of one shape (the 8 flips of `flips`, the samples of `ensemble`)
without tracing or hashing the model again. `flips`, `ensemble` and `labels` compose
them, and each returns one type.
"""
from __future__ import annotations

import itertools
import sys
import threading
import weakref
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import dask.array as da
import numpy as np
import torch

from .errors import InputError
from .execute import build_graph, weights_token as graph_token
from .geometry import chunk_bounds, coerce_chunks
from .io import canonical, rechunk_to
from .ops.conv import ArgmaxConv, fuse_argmax_head
from .ops.dropout import PositionalDropout
from .planner import Plan, make_plan
from .readers import VolumeSource, source_of
from .capture import phase
from .trace import trace


class MeanStd(NamedTuple):
    """Per-voxel mean and population standard deviation over an ensemble's samples."""

    mean: da.Array
    std: da.Array


def resolve_device(device, model=None) -> str:
    """'cpu', 'cuda' (every visible GPU), 'cuda:N' or 'cuda:N,M' from ``device``
    (None: the GPU ``model`` is on, else 'cpu'; 'auto': CUDA if present)."""
    from .devices import default_device, resolve_device as resolve
    if device is None and model is not None:
        device = default_device(model)
    return resolve(device, remote=str(device).startswith("cuda") and on_a_cluster())


def on_a_cluster() -> bool:
    """Whether a default distributed client will run the graph: then its workers, not
    this machine (a notebook on a login node without GPUs), need CUDA."""
    try:
        if "distributed" not in sys.modules:  # no client without it (0.2 s to import)
            return False
        from distributed import default_client
        default_client()
    except (ImportError, ValueError):
        return False
    return True


AUTOCAST_TYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16,
                  torch.float16: torch.float16, torch.bfloat16: torch.bfloat16}


def autocast_type(compute_dtype) -> torch.dtype | None:
    """The torch.autocast type of ``compute_dtype``, None for float32 and 'tf32' (no
    autocast; 'tf32' lets float32 convolutions and matmuls use TF32 on GPUs)."""
    from .devices import compute_name
    return AUTOCAST_TYPES.get(compute_name(compute_dtype))


# Tracing swaps a model's weights for meta tensors while it runs (and puts them back):
# one trace at a time, whichever predictor asks, and nothing reads the weights meanwhile.
TRACE_LOCK = threading.RLock()

TRAINING_SAFE = (torch.nn.Dropout, torch.nn.Dropout1d, torch.nn.Dropout2d, torch.nn.Dropout3d,
                 torch.nn.AlphaDropout, torch.nn.FeatureAlphaDropout)


def check_model(model, stochastic: bool = False) -> None:
    """Refuse, before anything runs, a model that would not give its eval() answer:
    modules in training mode (batch statistics, active dropout) or weights on the meta
    device. With ``stochastic`` (an ensemble), active dropout is what is sampled."""
    if not isinstance(model, torch.nn.Module):
        raise InputError(f"model is a {type(model).__name__}; pass a torch.nn.Module",
                         parameter="model")
    with TRACE_LOCK:
        meta = [n for n, p in itertools.chain(model.named_parameters(), model.named_buffers())
                if p.is_meta]
    if meta:
        raise InputError(f"the model's weights are on the meta device (e.g. {meta[0]!r}): they "
                         "hold no values; load real weights (model.to_empty(device='cpu') and "
                         "load_state_dict) before predicting", parameter="model")
    training = [name or type(model).__name__ for name, m in model.named_modules()
                if m.training and not (stochastic and isinstance(m, TRAINING_SAFE))]
    if training:
        listed = ", ".join(repr(n) for n in training[:5])
        more = f" and {len(training) - 5} more" if len(training) > 5 else ""
        hint = ("; for an ensemble of samples leave only the dropout modules in train()"
                if not stochastic else "")
        count = f"{len(training)} module{'s' if len(training) > 1 else ''}"
        raise InputError(f"the model is in training mode ({count}: {listed}"
                         f"{more}), which uses batch statistics and active dropout; call "
                         f"model.eval() before predicting{hint}", parameter="model")


def weights_version(model: torch.nn.Module) -> tuple:
    """Changes whenever a module, its mode or a weight of ``model`` changes: a tensor's
    version counter moves with every in-place write (load_state_dict included), its
    storage, type or device with ``.data =``, ``model.double()`` or ``.to()``. (A write
    through ``p.data.mul_()`` moves none of them: the new weights reach results built
    after `Exact` or `Window` is made anew.)"""
    with TRACE_LOCK:
        return (tuple((id(m), m.training, module_state(m)) for m in model.modules()),
                tuple((id(t), t._version, t.data_ptr(), t.dtype, t.device)
                      for t in itertools.chain(model.parameters(), model.buffers())))


PLAIN = (bool, int, float, str, type(None))


def module_state(m: torch.nn.Module) -> tuple:
    """What else of a module its forward may read: plain attributes (numbers, strings,
    tuples of them: a conv's padding, a temperature, a flag), tensors that are neither
    parameters nor buffers, and its hooks. A change re-traces (a trace cached on the
    weights alone ran a model whose ``m.scale`` had been reassigned with the old one)."""
    state = []
    for name, value in vars(m).items():
        if isinstance(value, torch.Tensor):  # an inference tensor has no version counter
            version = None if value.is_inference() else value._version
            state.append((name, id(value), version, value.data_ptr()))
        elif isinstance(value, PLAIN) or (isinstance(value, tuple) and
                                          all(isinstance(v, PLAIN) for v in value)):
            state.append((name, value))
        elif name.endswith("hooks") and isinstance(value, dict):
            state.append((name, tuple(value)))
    return tuple(state)


SHAPES_KEPT = 4  # traced shapes a predictor keeps (flips and ensembles use one)


class Cache:
    """Values computed once per key, thread-safe, the oldest dropped past ``size``; not
    pickled (a copy in another process computes its own)."""

    def __init__(self, size: int = SHAPES_KEPT * 2):
        self.size, self.values, self.lock = size, {}, threading.RLock()

    def get(self, key, compute):
        with self.lock:
            if key not in self.values:
                if len(self.values) >= self.size:
                    self.values.pop(next(iter(self.values)))
                self.values[key] = compute()
            return self.values[key]

    def __getstate__(self):
        return {"size": self.size}

    def __setstate__(self, state):
        self.__init__(state["size"])


_graphs: "weakref.WeakKeyDictionary[torch.nn.Module, Cache]" = weakref.WeakKeyDictionary()


def traced_graph(model: torch.nn.Module, input_shape, select=None, version=None):
    """``trace(model, input_shape, select)``, kept in the process per model, input shape,
    ``select`` and `weights_version` (modules, modes, weights, their dtype and device):
    every predictor of one model (each `volarray.plan` or `predict` call makes one)
    shares it, and a change of the weights traces anew."""
    with TRACE_LOCK:
        version = weights_version(model) if version is None else version
        kept = _graphs.setdefault(model, Cache(SHAPES_KEPT * 2))
        return kept.get((tuple(input_shape), repr(select), version),
                        lambda: trace(model, tuple(input_shape), select))


@dataclass(frozen=True, eq=False)
class Exact:
    """Exact mode: ``Exact(model, chunks=..., keep=...)(volume)`` equals
    ``model(volume[None])[0]``, lazily, tile by tile. The model is traced and planned
    once per input shape; `plan` shows what will run. See `volarray.predict` for the
    meaning of each argument. ``spill``: kept tensors may go to a scratch store, so the
    default keep budget is the input's bytes (what `predict_to_zarr` runs, with its
    ``scratch`` store)."""

    model: torch.nn.Module = field(repr=False)
    chunks: Any = None
    device: Any = None
    memory_limit: Any = None
    keep: Any = None
    select: Any = None
    pad: str | None = None
    compute_dtype: Any = None
    scratch: Any = field(default=None, repr=False)
    spill: bool = False
    strategy: Any = None  # 'slab' or 'whole' (`volarray.devices.resolve_strategy`)
    traced: Cache = field(default_factory=Cache, init=False, repr=False, compare=False)

    def __post_init__(self):
        check_model(self.model, stochastic=True)  # dropout is checked per call
        if self.pad not in (None, "reflect", "zeros"):
            raise InputError(f"pad={self.pad!r} is not None, 'reflect' or 'zeros'",
                             parameter="pad")
        object.__setattr__(self, "device", resolve_device(self.device, self.model))
        autocast_type(self.compute_dtype)
        from .devices import resolve_strategy
        resolve_strategy(self.strategy, self.device)

    def __call__(self, volume, seed: int = 0) -> da.Array:
        """The scores of ``volume`` (C, Z, Y, X) or (Z, Y, X)."""
        check_model(self.model)
        arr, crop = self.padded(canonical(volume, integers=True))
        return crop(self.scores(arr, seed))

    def sample(self, volume, seed: int) -> da.Array:
        """One sample of a stochastic model (dropout left active), seeded by ``seed``
        and each voxel's global position."""
        check_model(self.model, stochastic=True)
        arr, crop = self.padded(canonical(volume, integers=True))
        return crop(self.scores(arr, seed))

    def plan(self, volume, *, argmax: bool = False) -> Plan:
        """The plan of a run over ``volume`` (only its shape matters); with ``argmax``,
        of labels with the classifier fused where the head allows."""
        return self.plan_for(self.padded(canonical(volume, integers=True))[0], argmax)

    def argmax(self, volume) -> da.Array:
        """Labels (Z', Y', X'): the classifier conv fused with the argmax and computed in
        blocks of classes, where the head allows; else the argmax of the scores."""
        check_model(self.model)
        arr, crop = self.padded(canonical(volume, integers=True))
        p = self.plan_for(arr, argmax=True)
        head = p.graph.nodes[p.graph.output].op
        if not isinstance(head, ArgmaxConv):
            return labels(crop(self.scores(arr, 0)))
        if head.classes < 2:
            raise InputError(ONE_CHANNEL_ARGMAX, parameter="output")
        dt = label_dtype(head.classes)
        fused = self.build(p, arr, 0).map_blocks(lambda b: b[0].astype(dt), dtype=dt,
                                                 drop_axis=0)
        return crop(fused[None])[0]

    def scores(self, arr: da.Array, seed: int = 0) -> da.Array:
        """The scores of ``arr`` (C, Z, Y, X), already padded as `padded` pads it."""
        return self.build(self.plan_for(arr), arr, seed)

    def padded(self, arr: da.Array):
        """``arr`` padded to the network's multiple (``pad=``), and how to crop back."""
        if self.pad is None:
            return arr, (lambda y: y)
        from .padding import crop_output, pad_volume, padded_shape, required_multiple
        shape = tuple(arr.shape[1:])
        multiple = required_multiple(self.model, arr.shape[0], shape)
        if multiple is None:  # the shape already suits the network
            return arr, (lambda y: y)
        return (pad_volume(arr, multiple, self.pad),
                lambda y: crop_output(y, shape, padded_shape(shape, multiple)))

    def graph(self, shape):
        """The traced graph for an input of ``shape`` (C, Z, Y, X), and the token of its
        weights: traced once per model, shape and weights in the process (`traced_graph`),
        hashed once per predictor (so that weights written through ``.data`` reach a new
        predictor's task keys)."""
        version = weights_version(self.model)

        def hashed():
            graph = traced_graph(self.model, (1,) + tuple(shape), self.select, version)
            return graph, graph_token(graph.gm)
        return self.traced.get(("graph", tuple(shape), version), hashed)

    def plan_for(self, arr: da.Array, argmax: bool = False) -> Plan:
        graph = self.graph(arr.shape)[0]

        def planned():
            g = graph
            if argmax:  # a new graph: the scores' plan keeps the whole head
                g = fuse_argmax_head(graph) or graph
            with phase("planning", f"{type(self.model).__name__} over {tuple(arr.shape)}"):
                return make_plan(g, self.chunks, self.memory_limit,  # the output's chunks
                                 self.device, keep=self.keep, spill=self.spill,
                                 strategy=self.strategy, compute_dtype=self.compute_dtype,
                                 scratch_at=getattr(self.scratch, "out", None))
        return self.traced.get(("plan", tuple(arr.shape), argmax,
                                weights_version(self.model)), planned)

    def build(self, p: Plan, arr: da.Array, seed: int) -> da.Array:
        """The dask graph of plan ``p`` over ``arr``."""
        p.validate()  # no task may exceed the budget (memory_limit=, or the default)
        reader = source_of(arr)  # tasks read their regions straight from zarr or numpy
        if not isinstance(reader, VolumeSource):
            reader = None
            arr = rechunk_to(arr, [chunk_bounds(n, c) for n, c in zip(arr.shape[1:], p.chunks)])
        paths = self.scratch.arrays_for(p) if self.scratch is not None else None
        return build_graph(p, arr, self.device, scratch=paths, seed=seed,
                           autocast=autocast_type(self.compute_dtype), reader=reader,
                           model_token=self.graph(tuple(arr.shape))[1])

    def ensemble(self, volume, n: int, seed: int = 0) -> MeanStd:
        """Mean and std over ``n`` samples, seeded from ``seed``; a model that draws
        nothing (no dropout left active) is refused: its samples would all be equal."""
        check_model(self.model, stochastic=True)
        arr, crop = self.padded(canonical(volume, integers=True))  # once, not once per sample
        graph = self.plan_for(arr).graph
        if not any(isinstance(node.op, PositionalDropout) for node in graph.nodes.values()):
            raise InputError(f"ensemble={n} samples a stochastic model, but no dropout of "
                             f"{type(self.model).__name__} is active, so every sample would "
                             "be the same; leave the dropout modules in train() (model.eval(),"
                             " then e.g. model.drop.train())", parameter="ensemble")
        samples = da.stack([crop(self.scores(arr, seed + s)) for s in range(n)])
        return MeanStd(samples.mean(axis=0), samples.std(axis=0))


@dataclass(frozen=True, eq=False)
class Window:
    """Sliding-window inference equal to MONAI's ``sliding_window_inference`` with the
    same ``roi_size``, ``overlap``, ``blend_mode`` ("gaussian", "constant" or a callable
    roi shape -> weights) and ``sigma_scale``, aggregated per output chunk (``chunks``,
    default the roi). The model is called as it is, never traced."""

    model: torch.nn.Module = field(repr=False)
    roi_size: Any = None
    overlap: float = 0.25
    blend_mode: Any = "gaussian"
    sigma_scale: float = 0.125
    chunks: Any = None
    device: Any = None
    select: Any = None
    mask: Any = field(default=None, repr=False)  # a masking.Mask: windows outside skipped
    tokens: Cache = field(default_factory=lambda: Cache(1), init=False, repr=False,
                          compare=False)

    def __post_init__(self):
        from .window import check_window
        check_model(self.model, stochastic=True)
        check_window(self.roi_size, self.overlap, self.blend_mode, self.sigma_scale)
        from .devices import device_names  # windows run on one device: the first named
        object.__setattr__(self, "device",
                           device_names(resolve_device(self.device, self.model))[0])

    def __call__(self, volume, seed: int = 0) -> da.Array:
        """The scores of ``volume`` (C, Z, Y, X) or (Z, Y, X)."""
        check_model(self.model)
        return self.run(volume, 0, seed)

    def padded(self, arr: da.Array):
        """Window mode pads its windows itself: ``arr`` as it is."""
        return arr, (lambda y: y)

    def scores(self, arr: da.Array, seed: int = 0) -> da.Array:
        return self.run(arr, 0, seed)

    def argmax(self, volume) -> da.Array:
        return labels(self(volume))

    def ensemble(self, volume, n: int, seed: int = 0) -> MeanStd:
        """Mean and std over ``n`` samples, each window's draws seeded by its position."""
        check_model(self.model, stochastic=True)
        return MeanStd(*self.run(volume, n, seed))

    def run(self, volume, samples: int, seed: int):
        from .window import predict_window
        arr = canonical(volume)
        return predict_window(self.model, arr.astype("float32").rechunk({0: -1}),
                              roi_size=self.roi_size, overlap=self.overlap,
                              blend_mode=self.blend_mode, sigma_scale=self.sigma_scale,
                              chunks=coerce_chunks(self.chunks, arr.shape[1:]),
                              device=self.device, select=self.select, ensemble=samples,
                              seed=seed, model_token=self.weights_token(), mask=self.mask)

    def weights_token(self) -> str:
        """The model's weights hashed once while they stay the same."""
        from .window import weights_token
        def hashed():
            with TRACE_LOCK:  # not while a trace holds the weights on the meta device
                return weights_token(self.model)
        return self.tokens.get(weights_version(self.model), hashed)


def ensemble(predictor, volume, n: int, seed: int = 0) -> MeanStd:
    """Per-voxel ``(mean, std)`` over ``n`` seeded samples of a stochastic model (dropout
    left active; in window mode noise drawn in ``forward`` too), the same for any
    chunking; no sample of the whole volume is stored."""
    check_samples(n)
    return predictor.ensemble(volume, n, seed)


def check_samples(n) -> None:
    """An ensemble's sample count: an int of at least 2."""
    if isinstance(n, bool) or not isinstance(n, int) or n < 2:
        raise InputError(f"ensemble={n!r} must be an int >= 2 (samples per voxel)",
                         parameter="ensemble")


ONE_CHANNEL_ARGMAX = ("output='argmax' over a model with one output channel labels every voxel "
                      "0; pass threshold=0.5 for a sigmoid head (or threshold=0.0 "
                      "for logits) "
                      "to get labels y > threshold")


def labels(scores: da.Array, threshold: float | None = None) -> da.Array:
    """Per-voxel labels (Z', Y', X') from class scores, chunk by chunk: the argmax over
    classes (uint8, uint16 past 256 classes), or ``scores > threshold`` (uint8) for a
    one-channel head."""
    classes = scores.shape[0]
    if threshold is not None:
        if classes != 1:
            raise InputError(f"threshold={threshold!r} needs a one-channel model; this one "
                             f"has {classes} output channels: pass output='argmax' for labels",
                             parameter="threshold")
        return scores.map_blocks(lambda b: (b[0] > threshold).astype(np.uint8),
                                 dtype=np.uint8, drop_axis=0)
    if classes < 2:
        raise InputError(ONE_CHANNEL_ARGMAX, parameter="output")
    return scores.map_blocks(argmax_block, dtype=label_dtype(classes), drop_axis=0)


def label_dtype(classes: int):
    return np.uint8 if classes <= 256 else np.uint16


def argmax_block(block: np.ndarray) -> np.ndarray:
    return np.argmax(block, axis=0).astype(label_dtype(block.shape[0]))
