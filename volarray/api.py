"""The public entry points: `predict` and `plan`."""
from __future__ import annotations

import itertools

import dask.array as da
import numpy as np
import torch

from .errors import InputError
from .execute import build_graph
from .geometry import chunk_bounds, coerce_chunks
from .io import as_dask_volume, map_volume, rechunk_to, region_reader
from .plan import Plan, make_plan
from .ops.local import ArgmaxConv
from .trace import fuse_argmax_head, trace

MODES = ("exact", "window")


def _device(device) -> str:
    if device is None or device == "auto":
        return "cuda" if device == "auto" and torch.cuda.is_available() else "cpu"
    device = str(device)
    if not (device == "cpu" or device.startswith("cuda")):
        raise InputError(f"device={device!r} is not 'cpu', 'cuda', 'cuda:N' or 'auto'")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise InputError(f"device={device!r} but torch sees no CUDA device; pass device='cpu'")
    return device


def _plan(model, arr: da.Array, chunks, mode, device: str, memory_limit,
          argmax: bool = False, select=None, keep=None, spill: bool = False) -> Plan:
    if mode not in MODES:
        raise InputError(f"mode={mode!r} is not one of {MODES}")
    if mode != "exact":
        raise InputError("volarray.plan describes exact mode; mode='window' runs one task "
                         "per window and one per output chunk, with nothing to plan")
    graph = trace(model, (1,) + tuple(arr.shape), select)
    if argmax:  # where the head allows it; otherwise scores are reduced per chunk
        fuse_argmax_head(graph)
    return make_plan(graph, coerce_chunks(chunks, arr.shape[1:]), memory_limit,
                     "cpu" if device == "cpu" else "cuda", keep=keep, spill=spill)


def plan(model, volume, *, chunks=None, mode: str = "exact", device=None,
         memory_limit=None, output: str = "probabilities", pad: str | None = None,
         select=None, keep=None, scratch: bool = False) -> Plan:
    """What `predict` will run: stages, halos, chunks, tasks and projected memory.
    ``scratch=True``: what `predict_to_zarr` runs (and the CLI), whose kept tensors may
    go to a scratch store, so that its default keep budget is the input's bytes
    (a lazy `predict` keeps at most an eighth of the memory it runs in)."""
    check_options(mode=mode, output=output, threshold=None, tta=None, ensemble=None, pad=pad)
    check_model(model)
    arr = as_dask_volume(volume)
    if pad is not None:
        from .padding import pad_volume, required_multiple
        multiple = required_multiple(model, arr.shape[0], arr.shape[1:])
        if multiple is not None:
            arr = pad_volume(arr, multiple, pad)
    return _plan(model, arr, chunks, mode, _device(device), memory_limit,
                 argmax=output == "argmax", select=select, keep=keep, spill=scratch)


def predict(model, volume, *, chunks=None, mode: str = "exact", device=None,
            memory_limit=None, window=None, overlap: float = 0.25, blend="gaussian",
            sigma_scale=0.125, tta=None, output: str = "probabilities",
            threshold: float | None = None, coords: bool = False,
            ensemble: int | None = None, seed: int = 0, dtype: str | None = None,
            pad: str | None = None, select=None, output_dtype: str | None = None, keep=None,
            channels=None, normalize=None):
    """Lazy ``model(volume[None])[0]`` as a dask array of shape (C_out, Z', Y', X').

    ``volume`` is a numpy, dask, zarr or torch array shaped (Z, Y, X) or (C, Z, Y, X).
    ``chunks`` is the spatial chunk shape (int or (z, y, x)); None lets the planner
    choose from ``memory_limit`` (bytes or '4GB', per task; a limit no task can fit is
    refused, naming the smallest that works). ``device`` is 'cpu' (default), 'cuda',
    'cuda:N' or 'auto'. Nothing runs until the result is computed or stored. The model
    must be in ``eval()`` mode (only dropout may be left active, for ``ensemble=``).

    ``mode="window"``: classic sliding-window inference, equal to MONAI's
    ``sliding_window_inference`` with the same ``window`` (the patch size),
    ``overlap``, ``blend`` ("gaussian", "constant" or a callable shape -> weights)
    and ``sigma_scale``, aggregated per output chunk; the model is not traced.

    ``pad="reflect"|"zeros"`` (exact mode): a volume whose sides are not multiples of
    the network's downsampling is padded at the far end of each axis to the next
    multiple, and the prediction cropped back, as users of torch's own whole-volume
    call do.

    ``select``: for a model returning several outputs, which one is the prediction: an
    index of a list or tuple (default 0, the full-resolution head of nnU-Net's deep
    supervision) or a key of a dict.

    ``tta="flips"``: the mean over the 8 mirrorings of the three spatial axes
    (nnU-Net's test-time mirroring), in either mode.

    ``output="argmax"``: integer labels (Z', Y', X') per voxel (uint8, or uint16 past
    256 classes), reduced chunk by chunk; it needs two or more classes. For a
    one-channel head, ``threshold=t`` gives labels ``y > t`` (uint8, (Z', Y', X')):
    0.5 for a sigmoid output, 0.0 for logits. ``coords=True`` appends normalized
    global coordinate channels (z, y, x in [-1, 1] over the whole volume) to the input.

    ``channels``: only these output channels (an int or a list, e.g. ``[1]`` for the
    fault class of a two-class head), so that a stored result holds no more.

    ``keep``: the budget of tensors kept between stages, whole volume: bytes ('40GB'),
    a multiple of the input ('2x') or 0 (recompute everything from the input); the
    default is the input's bytes, at most an eighth of the memory the lazy result will
    run in (this machine's, or the default distributed client's workers'):
    `predict_to_zarr` keeps the input's bytes, on disk past 256 MB.

    ``normalize``: scale the input as the model was trained, with statistics of the
    whole volume (per-chunk statistics would change the answer chunk by chunk):
    "zscore" (mean and population std), "percentile" (clip to the 0.5 and 99.5
    percentiles, then z-score; ``{"percentiles": (lo, hi)}`` for others), given
    statistics ``{"mean": m, "std": s, "clip": (lo, hi)}`` (a training set's, as
    nnU-Net's CT scheme), or a pointwise callable. The statistics are computed here,
    once, by dask reductions over the volume (`volarray.normalization` returns them).
    Integer volumes are cast to float32 region by region, normalized or not.

    ``dtype="float16"|"bfloat16"``: exact mode runs its tiles under ``torch.autocast``
    (results stay float32 arrays).

    ``output_dtype``: the stored type of the scores, float32 by default. "float16" halves
    the output (3 significant digits); "uint8" quarters it, for probabilities in [0, 1]:
    ``round(p * 255)``, so ``p = q / 255`` within 0.002 (`predict_to_zarr` records
    ``scale_factor = 1/255`` in the array's attributes, which xarray applies on reading).
    A uint8 output of values outside [0, 1] (logits) is refused when computed.

    ``ensemble=N`` for stochastic models (dropout left active, or noise drawn in
    ``forward`` in window mode): returns ``(mean, std)`` per voxel over N samples
    seeded from ``seed``, the same for any chunking; no sample of the whole volume is
    ever stored. In exact mode active dropout draws its masks from a hash of the
    seed and the voxel's global position.
    """
    return _predict(model, volume, chunks=chunks, mode=mode, device=device,
                    memory_limit=memory_limit, window=window, overlap=overlap, blend=blend,
                    sigma_scale=sigma_scale, tta=tta, output=output, threshold=threshold,
                    coords=coords, ensemble=ensemble, seed=seed, dtype=dtype, pad=pad,
                    select=select, output_dtype=output_dtype, keep=keep, channels=channels,
                    normalize=normalize)


def normalization(volume, normalize="zscore", *, var: str | None = None,
                  storage_options: dict | None = None):
    """The transform ``predict(..., normalize=normalize)`` applies to ``volume`` (a
    path, URL or array), with its whole-volume statistics: a `Normalization` (its
    ``mean``, ``std``, ``clip`` and ``attrs``), computed once and reusable as
    ``normalize=`` for other runs over the same survey."""
    from .io import open_volume
    from .normalize import resolve
    if normalize is None:
        raise InputError("normalization(volume, None) has nothing to compute; pass 'zscore', "
                         "'percentile' or statistics")
    return resolve(normalize, as_dask_volume(open_volume(volume, var, storage_options),
                                             integers=True))


OUTPUT_DTYPES = ("float32", "float16", "uint8")
# CF conventions (read by xarray): the stored uint8 q stands for q * scale_factor
QUANTIZED_ATTRS = {"scale_factor": 1 / 255, "add_offset": 0.0}


def _predict(model, volume, *, output_dtype=None, channels=None, normalize=None, **options):
    """`_predict_scores` of the normalized volume, only ``channels`` of it, stored as
    ``output_dtype``."""
    output_dtype = check_output_dtype(output_dtype, options)
    y = _predict_scores(model, volume, normalize=normalize, **options)
    return cast_output(select_channels(y, channels, options), output_dtype)


def select_channels(y, channels, options):
    """Only the output channels ``channels`` (an int or a list of ints) of the scores
    (or of an ensemble's mean and std), so that the stored result holds no more."""
    if channels is None:
        return y
    if makes_labels(options):
        raise InputError(f"channels={channels!r} selects score channels; labels (output="
                         "'argmax', threshold=) have none")
    n = (y[0] if isinstance(y, tuple) else y).shape[0]
    picked = [channels] if not isinstance(channels, (list, tuple)) else list(channels)
    valid = [isinstance(c, (int, np.integer)) and not isinstance(c, bool) and 0 <= c < n
             for c in picked]
    if not picked or not all(valid) or len(set(picked)) != len(picked):
        raise InputError(f"channels={channels!r} is not a list of distinct output channels; "
                         f"this model has {n} (0 to {n - 1})")
    picked = [int(c) for c in picked]
    return type(y)(a[picked] for a in y) if isinstance(y, tuple) else y[picked]


def makes_labels(options) -> bool:
    """Whether ``predict``'s options ask for labels rather than scores."""
    return options.get("output", "probabilities") != "probabilities" or \
        options.get("threshold") is not None


def check_output_dtype(output_dtype, options) -> str | None:
    if output_dtype is None:
        return None
    name = np.dtype(output_dtype).name if isinstance(output_dtype, type) else output_dtype
    if name not in OUTPUT_DTYPES:
        raise InputError(f"output_dtype={output_dtype!r} is not one of {OUTPUT_DTYPES} "
                         "(uint8 for probabilities in [0, 1])")
    if makes_labels(options):
        raise InputError(f"output_dtype={output_dtype!r} applies to scores; labels "
                         "(output='argmax', threshold=) are already uint8 or uint16")
    return name


def cast_output(y, output_dtype):
    """``y`` (or each array of an ensemble's (mean, std)) stored as ``output_dtype``."""
    if output_dtype in (None, "float32"):
        return y
    if isinstance(y, tuple):
        return type(y)(cast_output(a, output_dtype) for a in y)
    if output_dtype == "float16":
        return y.astype(np.float16)
    return y.map_blocks(quantize_probabilities, dtype=np.uint8)


def quantize_probabilities(block: np.ndarray) -> np.ndarray:
    """Probabilities in [0, 1] as uint8 ``round(p * 255)``."""
    lo, hi = float(block.min(initial=0.0)), float(block.max(initial=0.0))
    if lo < -1e-6 or hi > 1 + 1e-6:
        raise InputError(f"output_dtype='uint8' stores probabilities in [0, 1]; the model's "
                         f"output reaches {lo if lo < 0 else hi:.4g} (logits?). Add a sigmoid "
                         "or softmax, or pass output_dtype='float16'")
    return np.rint(np.clip(block, 0.0, 1.0) * 255).astype(np.uint8)


def _predict_scores(model, volume, *, chunks=None, mode="exact", device=None, memory_limit=None,
             window=None, overlap=0.25, blend="gaussian", sigma_scale=0.125, tta=None,
             output="probabilities", threshold=None, coords=False, ensemble=None, seed=0,
             dtype=None, pad=None, select=None, scratch=None, stochastic=False, keep=None,
             normalize=None):
    """`predict`, plus what `predict_to_zarr` needs: ``scratch`` (a ScratchSpace that
    holds exact mode's kept tensors on disk) and ``stochastic`` (one sample of a model
    with active dropout, as the members of an ensemble are)."""
    check_options(mode=mode, output=output, threshold=threshold, tta=tta, ensemble=ensemble,
                  pad=pad)
    if mode == "window" and dtype not in (None, "float32", torch.float32):
        raise InputError(f"dtype={dtype!r} applies to mode='exact' (its tiles run under "
                         "autocast); window mode calls the model as it is, so cast the model "
                         "itself or pass dtype=None")
    check_model(model, stochastic=stochastic or ensemble is not None)
    arr = as_dask_volume(volume, integers=normalize is not None)
    if normalize is not None:  # statistics of the whole volume (integers as they are), once
        from .normalize import resolve
        arr = map_volume(arr, resolve(normalize, arr))
    kw = dict(chunks=chunks, mode=mode, device=device, memory_limit=memory_limit,
              window=window, overlap=overlap, blend=blend, sigma_scale=sigma_scale, seed=seed,
              dtype=dtype, scratch=scratch, select=select, keep=keep)
    if coords:
        arr = with_coordinates(arr)
    if pad is not None:
        return _padded(model, arr, pad, dict(kw, tta=tta, output=output, threshold=threshold,
                                             ensemble=ensemble, stochastic=stochastic))
    if ensemble is not None:
        if mode == "window":
            return _window(model, arr, chunks, device, window, overlap, blend, sigma_scale,
                           select, ensemble, seed)
        samples = da.stack([_predict(model, arr, stochastic=True, **dict(kw, seed=seed + s))
                            for s in range(ensemble)])
        return samples.mean(axis=0), samples.std(axis=0)
    if output == "argmax" and mode == "exact" and tta is None:
        labels = _fused_argmax(model, arr, kw)
        if labels is not None:
            return labels
    if output == "argmax" or threshold is not None:
        scores = _predict(model, arr, tta=tta, stochastic=stochastic, **kw)
        return to_labels(scores, output, threshold)
    if tta is not None:
        return mirrored_mean(model, arr, stochastic=stochastic, **kw)
    if mode == "window":
        return _window(model, arr, chunks, device, window, overlap, blend, sigma_scale, select)
    dev = _device(device)
    p = _plan(model, arr, chunks, "exact", dev, memory_limit, select=select, keep=keep,
              spill=scratch is not None and scratch.may_spill)
    return _build(p, arr, dev, memory_limit, seed, dtype, scratch)


def _build(p: Plan, arr, dev, memory_limit, seed, dtype, scratch) -> da.Array:
    """The dask graph of plan ``p`` over ``arr``."""
    if memory_limit is not None:
        p.validate()  # a budget the user stated is one no task may exceed
    reader = region_reader(arr)  # tasks read their regions straight from a zarr or numpy input
    if reader is None:
        arr = rechunk_to(arr, [chunk_bounds(n, c) for n, c in zip(arr.shape[1:], p.chunks)])
    paths = scratch.arrays_for(p) if scratch is not None else None
    return build_graph(p, arr, dev, scratch=paths, seed=seed, autocast=_autocast(dtype),
                       reader=reader)


def _fused_argmax(model, arr, kw):
    """Labels from a classifier conv fused with the argmax (run in blocks of classes),
    or None where the head is not of that form."""
    dev = _device(kw["device"])
    p = _plan(model, arr, kw["chunks"], "exact", dev, kw["memory_limit"], argmax=True,
              select=kw["select"], keep=kw["keep"],
              spill=kw["scratch"] is not None and kw["scratch"].may_spill)
    head = p.graph.nodes[p.graph.output].op
    if not isinstance(head, ArgmaxConv):
        return None
    if head.classes < 2:
        raise InputError(ONE_CHANNEL_ARGMAX)
    labels = _build(p, arr, dev, kw["memory_limit"], kw["seed"], kw["dtype"], kw["scratch"])
    dt = label_dtype(head.classes)
    return labels.map_blocks(lambda b: b[0].astype(dt), dtype=dt, drop_axis=0)


ONE_CHANNEL_ARGMAX = ("output='argmax' over a model with one output channel labels every voxel "
                      "0; pass threshold=0.5 for a sigmoid head (or threshold=0.0 for logits) "
                      "to get labels y > threshold")


def to_labels(scores: da.Array, output: str, threshold) -> da.Array:
    """Per-voxel labels from class scores, chunk by chunk: the argmax over classes, or
    ``scores > threshold`` for a one-channel head."""
    classes = scores.shape[0]
    if threshold is not None:
        if classes != 1:
            raise InputError(f"threshold={threshold!r} needs a one-channel model; this one "
                             f"has {classes} output channels: pass output='argmax' for labels")
        return scores.map_blocks(lambda b: (b[0] > threshold).astype(np.uint8),
                                 dtype=np.uint8, drop_axis=0)
    if classes < 2:
        raise InputError(ONE_CHANNEL_ARGMAX)
    return scores.map_blocks(_argmax, dtype=label_dtype(classes), drop_axis=0)


def _padded(model, arr: da.Array, pad: str, kw: dict):
    """Pad to the next multiple the network needs, predict, crop back."""
    from .padding import crop_output, pad_volume, padded_shape, required_multiple
    if kw["mode"] != "exact":
        raise InputError(f"pad={pad!r} applies to mode='exact'; window mode pads its windows "
                         "itself (pass pad=None)")
    shape = tuple(arr.shape[1:])
    multiple = required_multiple(model, arr.shape[0], shape)
    if multiple is None:  # the shape already suits the network
        return _predict(model, arr, **kw)
    padded = pad_volume(arr, multiple, pad)
    y = _predict(model, padded, **kw)
    crop = (lambda a: crop_output(a, shape, padded_shape(shape, multiple)))
    if isinstance(y, tuple):
        return tuple(crop(a) for a in y)
    if y.ndim == 3:  # labels
        return crop(y[None])[0]
    return crop(y)


TRAINING_SAFE = (torch.nn.Dropout, torch.nn.Dropout1d, torch.nn.Dropout2d, torch.nn.Dropout3d,
                 torch.nn.AlphaDropout, torch.nn.FeatureAlphaDropout)


def check_model(model, stochastic: bool = False) -> None:
    """Refuse, before anything runs, a model that would not give its eval() answer:
    modules in training mode (batch statistics, active dropout) or weights on the meta
    device. With ``stochastic`` (an ensemble), active dropout is what is sampled."""
    if not isinstance(model, torch.nn.Module):
        raise InputError(f"model is a {type(model).__name__}; pass a torch.nn.Module")
    meta = [n for n, p in itertools.chain(model.named_parameters(), model.named_buffers())
            if p.is_meta]
    if meta:
        raise InputError(f"the model's weights are on the meta device (e.g. {meta[0]!r}): they "
                         "hold no values; load real weights (model.to_empty(device='cpu') and "
                         "load_state_dict) before predicting")
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
                         f"model.eval() before predicting{hint}")


def check_options(*, mode, output, threshold, tta, ensemble, pad) -> None:
    """The option values and combinations, refused before anything is traced."""
    if mode not in MODES:
        raise InputError(f"mode={mode!r} is not one of {MODES}")
    if output not in ("probabilities", "argmax"):
        raise InputError(f"output={output!r} is not 'probabilities' or 'argmax'")
    if threshold is not None:
        if isinstance(threshold, bool) or not isinstance(threshold, (int, float)) or \
                not np.isfinite(threshold):
            raise InputError(f"threshold={threshold!r} is not a number; pass e.g. 0.5 for a "
                             "sigmoid head or 0.0 for logits")
        if output == "argmax":
            raise InputError("output='argmax' and threshold= are two ways to make labels; pass "
                             "one (threshold for a one-channel head, argmax for classes)")
    if tta not in (None, "flips"):
        raise InputError(f"tta={tta!r} is not None or 'flips'")
    if ensemble is not None:
        if isinstance(ensemble, bool) or not isinstance(ensemble, int) or ensemble < 2:
            raise InputError(f"ensemble={ensemble!r} must be an int >= 2 (samples per voxel)")
        if tta is not None or output != "probabilities" or threshold is not None:
            raise InputError("ensemble= combines with neither tta=, output='argmax' nor "
                             "threshold=; reduce the returned mean yourself")
    if pad not in (None, "reflect", "zeros"):
        raise InputError(f"pad={pad!r} is not None, 'reflect' or 'zeros'")


def _window(model, arr: da.Array, chunks, device, window, overlap, blend, sigma_scale,
            select=None, ensemble: int = 0, seed: int = 0):
    from .window import predict_window
    return predict_window(model, arr.astype("float32").rechunk({0: -1}), window=window,
                          overlap=overlap, blend=blend, sigma_scale=sigma_scale,
                          chunks=coerce_chunks(chunks, arr.shape[1:]), device=_device(device),
                          select=select, ensemble=ensemble, seed=seed)


def _autocast(dtype):
    if dtype in (None, "float32", torch.float32):
        return None
    table = {"float16": torch.float16, "bfloat16": torch.bfloat16,
             torch.float16: torch.float16, torch.bfloat16: torch.bfloat16}
    if dtype not in table:
        raise InputError(f"dtype={dtype!r} is not 'float32', 'float16' or 'bfloat16'")
    return table[dtype]


def mirrored_mean(model, arr: da.Array, **kwargs) -> da.Array:
    """Mean of ``predict`` over the 8 flips of (z, y, x), each flipped back."""
    total = None
    for flips in itertools.product((False, True), repeat=3):
        axes = tuple(1 + i for i, f in enumerate(flips) if f)
        y = _predict(model, da.flip(arr, axes) if axes else arr, **kwargs)
        y = da.flip(y, axes) if axes else y
        total = y if total is None else total + y.rechunk(total.chunks)
    return total / 8


def label_dtype(classes: int):
    return np.uint8 if classes <= 256 else np.uint16


def _argmax(block: np.ndarray) -> np.ndarray:
    return np.argmax(block, axis=0).astype(label_dtype(block.shape[0]))


def with_coordinates(arr: da.Array) -> da.Array:
    """``arr`` (C, Z, Y, X) with three more channels: z, y, x in [-1, 1] over the
    whole volume (np.linspace), chunked like the volume."""
    n = arr.shape[1:]
    grids = []
    for axis in range(3):
        line = da.from_array(np.linspace(-1, 1, n[axis], dtype=np.float32),
                             chunks=(arr.chunks[1 + axis],))
        shape = [1, 1, 1]
        shape[axis] = n[axis]
        grids.append(da.broadcast_to(line.reshape(shape), n, chunks=arr.chunks[1:])[None])
    return da.concatenate([arr.astype(np.float32)] + grids, axis=0).rechunk({0: -1})
