"""The front doors: `predict`, which composes the pieces of `volarray.predictors` from
keyword arguments, and `plan`, which shows what exact mode will run."""
from __future__ import annotations

import dask.array as da
import numpy as np

from .errors import InputError
from .devices import check_output_array, cupy_module
from .io import as_dask_volume, canonical, map_volume
from .masking import Mask, masked, resolve_mask, tasks_run
from .options import WINDOW_DEFAULTS, PredictOptions
from .planner import Plan
from .predictors import Exact, MeanStd, Window, ensemble as ensemble_of, labels
from .tta import augmented


def plan(model, volume, *, chunks=None, device=None, memory_limit=None, keep=None,
         pad: str | None = None, select=None, output: str = "probabilities",
         scratch: bool = False, compute_dtype=None, strategy=None, mask="auto",
         mask_fill=None) -> Plan:
    """What exact mode will run over ``volume``: stages, halos, chunks, tasks and
    projected memory, as a frozen `Plan` (``print(plan)`` for the table). The arguments
    are `predict`'s; ``output="argmax"`` plans the labels (the classifier fused with the
    argmax where the head allows). ``scratch=True``: what `predict_to_zarr` runs (and
    the CLI), whose kept tensors may go to a scratch store, so that its default keep
    budget is the input's bytes (a lazy `predict` keeps at most an eighth of the memory
    it runs in). Equal to ``volarray.Exact(model, ...).plan(volume)``. With ``mask=``
    (as `predict` takes it; 'auto' for a survey's footprint), the plan counts the tasks
    the mask skips (``plan.skipped_tasks``, and a note per stage)."""
    PredictOptions(output=output, mask=mask, mask_fill=mask_fill)  # refuses bad values
    exact = Exact(model, chunks=chunks, device=device, memory_limit=memory_limit, keep=keep,
                  pad=pad, select=select, spill=scratch, compute_dtype=compute_dtype,
                  strategy=strategy)
    p = exact.plan(volume, argmax=output == "argmax")
    if mask is None or mask is False:
        return p
    arr = canonical(volume)
    found = resolve_mask(mask, volume, arr)
    return p if found is None else masked_plan(exact, p, arr, found, output == "argmax")


def masked_plan(exact: Exact, p: Plan, arr, mask: Mask, argmax: bool) -> Plan:
    """``p`` with the tile tasks ``mask`` skips counted: the graph built, masked and
    culled as dask culls it before running (nothing runs)."""
    from dataclasses import replace
    y = exact.argmax(arr) if argmax else exact(arr)
    y = masked(y, mask, 0)
    run = tasks_run(y)
    edges = [np.cumsum((0,) + c) for c in y.chunks[-3:]]
    dead, total = mask.liveness(edges).count(edges)
    per = {f"stage {s.index}": s.n_tasks for s in p.stages}
    per.update({f"stats {i}": b.n_tasks for i, b in enumerate(p.barriers)})
    skipped = {k: n - run.get(k, 0) for k, n in per.items()}
    listed = ", ".join(f"{k}: {n} of {per[k]}" for k, n in skipped.items() if n)
    note = (f"mask ({mask.kind}): {dead} of {total} output chunks lie wholly outside it and "
            f"hold the fill value; {sum(skipped.values())} of {p.n_tasks} tile tasks are "
            f"skipped" + (f" ({listed})" if listed else "")
            + ("; a barrier's statistics read every chunk" if p.barriers else ""))
    return replace(p, skipped_tasks=sum(skipped.values()), notes=p.notes + (note,))


def predict(model, volume, *, method: str = "exact", chunks=None, device=None,
            memory_limit=None, keep=None, pad: str | None = None, compute_dtype=None,
            roi_size=None, overlap: float | None = None, blend_mode=None,
            sigma_scale: float | None = None, tta: str | None = None, merge: str | None = None,
            output: str = "probabilities", threshold: float | None = None,
            ensemble: int | None = None, seed: int = 0, coords: bool = False, normalize=None,
            select=None, output_dtype: str | None = None, channels=None, strategy=None,
            output_array: str = "numpy", mask="auto", mask_fill=None):
    """Lazy ``model(volume[None])[0]`` as a dask array of shape (C_out, Z', Y', X').

    ``volume`` is a numpy, dask, zarr or torch array shaped (Z, Y, X) or (C, Z, Y, X).
    ``chunks`` is the spatial chunk shape of the result: an int, (z, y, x), -1 for a
    whole axis, a dict {axis: size} (spatial axes: 0 is z), or None / "auto" to let the
    planner choose from
    ``memory_limit`` (bytes or '4GB', per task; a limit no task can fit is refused,
    naming the smallest that works; on a GPU the device's share). ``device``: 'cpu',
    'cuda' (every GPU), 'cuda:N', 'cuda:0,2', 'auto'; by default the model's. Nothing runs until the result is computed or stored. The model must be in
    ``eval()`` mode (only dropout may be left active, for ``ensemble=``).

    ``method="exact"`` (default) traces the model and runs its layers tile by tile: the
    result equals one whole-volume forward. Its own arguments: ``memory_limit``,
    ``keep`` (the budget of tensors kept between stages, whole volume: bytes ('40GB'), a
    multiple of the input ('2x') or 0 (recompute everything from the input); the default
    is the input's bytes, at most an eighth of the memory the lazy result will run in:
    this machine's, or the default distributed client's workers'; `predict_to_zarr`
    keeps the input's bytes, on disk past 256 MB), ``pad="reflect"|"zeros"`` (a volume
    whose sides are not multiples of the network's downsampling is padded at the far end
    of each axis to the next multiple, and the prediction cropped back) and
    ``compute_dtype="float16"|"bfloat16"|"tf32"`` (model cast once; else TF32 is off),
    ``strategy="slab"|"whole"`` (a CPU's cache-sized slabs, a GPU's whole tiles).

    ``method="window"``: classic sliding-window inference, equal to MONAI's
    ``sliding_window_inference`` with the same ``roi_size`` (the patch size),
    ``overlap`` (0.25), ``blend_mode`` ("gaussian" (default), "constant" or a callable
    roi shape -> weights) and ``sigma_scale`` (0.125), aggregated per output chunk; the
    model is not traced. Arguments of the other method are refused, not ignored.

    ``select``: for a model returning several outputs, which one is the prediction: an
    index of a list or tuple (default 0, the full-resolution head of nnU-Net's deep
    supervision) or a key of a dict.

    ``tta``: test-time augmentation, "flips", "rot90", "multires" or several joined by "+",
    merged by ``merge="mean"|"max"``, in either method, traced once (see `volarray.tta`).

    ``output="argmax"``: integer labels (Z', Y', X') per voxel (uint8, or uint16 past
    256 classes), reduced chunk by chunk; it needs two or more classes. For a
    one-channel head, ``threshold=t`` gives labels ``y > t`` (uint8, (Z', Y', X')):
    0.5 for a sigmoid output, 0.0 for logits. ``coords=True`` appends normalized
    global coordinate channels (z, y, x in [-1, 1] over the whole volume) to the input.

    ``channels``: only these output channels (an int or a list, e.g. ``[1]`` for the
    fault class of a two-class head), so that a stored result holds no more.

    ``normalize``: scale the input with statistics of the whole volume, computed once
    by dask reductions (see `volarray.normalization`): "zscore", "percentile" (clip to
    the 0.5 and 99.5 percentiles, then z-score), given statistics ``{"mean": m, "std":
    s, "clip": (lo, hi)}`` (nnU-Net's CT scheme), or a pointwise callable. Integer
    volumes are cast to float32 region by region, normalized or not.

    ``output_dtype``: the stored type of the scores, float32 by default. "float16" halves
    the output (3 significant digits); "uint8" quarters it, for probabilities in [0, 1]:
    ``round(p * 255)``, so ``p = q / 255`` within 0.002 (`predict_to_zarr` records
    ``scale_factor = 1/255`` in the array's attributes, which xarray applies on reading).
    A uint8 output of values outside [0, 1] (logits) is refused when computed.

    ``ensemble=N`` for stochastic models (dropout left active, or noise drawn in
    ``forward`` in window mode): returns a `MeanStd` named tuple ``(mean, std)`` per
    voxel over N samples seeded from ``seed``, the same for any chunking; no sample of
    the whole volume is ever stored. In exact mode active dropout draws its masks from a
    hash of the seed and the voxel's global position.

    ``output_array="cupy"``: CuPy chunks on the run's GPU (CuPy chunks in are read through
    DLPack). ``mask``, ``mask_fill``: compute only inside a mask (see `volarray.masking`).

    The pieces composed here are public: `volarray.Exact`, `volarray.Window` (their
    ``predictor(volume)`` gives scores), `flips`, `ensemble` and `labels`.
    """
    given = dict(locals())  # predict's options: every argument but the model and volume
    options = PredictOptions(**{k: v for k, v in given.items() if k not in ("model", "volume")})
    return prediction(model, volume, options)[0]


def prediction(model, volume, options: PredictOptions, scratch=None):
    """`predict` with its options built, and the options with the normalization
    resolved (for the attributes that record it). ``scratch``: the ScratchSpace of
    `predict_to_zarr`, which holds exact mode's kept tensors on disk."""
    predictor = make_predictor(model, options, scratch)  # refusals before any statistics
    check_output_array(options.output_array, getattr(predictor, "device", None) or "cpu")
    arr, options = prepared(volume, options)
    return predicted(predictor, arr, options), options


def prepared(volume, options: PredictOptions, integers: bool = False):
    """The volume as a (C, Z, Y, X) dask array, once per call (integers kept when
    ``integers`` or when normalized: statistics of the values as they are), and the
    options with ``normalize=`` resolved to its whole-volume statistics, once."""
    # exact mode's tasks move integers to the device as they are and cast them there
    keep = options.normalize is not None or (options.method == "exact" and not options.coords)
    arr = as_dask_volume(volume, integers=integers or keep)
    options = options.with_mask(resolve_mask(options.mask, volume, arr))
    if options.normalize is None:
        return arr, options
    from .normalize import resolve
    return arr, options.with_normalization(resolve(options.normalize, arr))


def predicted(predictor, arr: da.Array, options: PredictOptions):
    """The lazy result of ``predictor`` over the volume `prepared` made."""
    if options.normalize is not None:
        arr = map_volume(arr, options.normalize)
    if options.coords:
        arr = with_coordinates(arr)
    mask = options.mask if isinstance(options.mask, Mask) else None
    if mask is not None and isinstance(predictor, Window) and options.tta is None:
        from dataclasses import replace
        predictor = replace(predictor, mask=mask)  # windows wholly outside it are skipped
    y = compose(predictor, arr, tta=options.tta, merge=options.merge, output=options.output,
                threshold=options.threshold, ensemble=options.ensemble, seed=options.seed)
    y = select_channels(y, options)
    if mask is not None:
        fill = options.mask_fill or 0
        y = MeanStd(masked(y.mean, mask, fill), masked(y.std, mask, 0)) \
            if isinstance(y, tuple) else masked(y, mask, fill)
    y = cast_output(y, options.output_dtype)
    return y if options.output_array == "numpy" else cupy_chunks(y)


def cupy_chunks(y):
    """``y`` (a dask array, or a tuple of them) with CuPy chunks: each chunk copied to
    the current GPU as it is computed."""
    if isinstance(y, tuple):
        return type(y)(*(cupy_chunks(a) for a in y))
    cupy = cupy_module()
    return y.map_blocks(cupy.asarray, dtype=y.dtype,
                        meta=cupy.empty((0,) * y.ndim, dtype=y.dtype))


def make_predictor(model, options: PredictOptions, scratch=None):
    """The `Exact` or `Window` predictor ``options.method`` names, with its own settings
    (those of the other method were refused when the options were built)."""
    common = dict(chunks=options.chunks, device=options.device, select=options.select)
    if options.method == "window":
        return Window(model, **common, **{**WINDOW_DEFAULTS, **options.settings()})
    return Exact(model, **common, scratch=scratch,
                 spill=scratch is not None and scratch.may_spill, **options.settings())


def compose(predictor, arr: da.Array, *, tta=None, merge=None, output="probabilities",
            threshold=None, ensemble=None, seed=0):
    """Scores, labels or an ensemble's (mean, std) of ``arr``, from ``predictor``."""
    if ensemble is not None:
        return ensemble_of(predictor, arr, ensemble, seed or 0)
    if output == "argmax" and tta is None:
        return predictor.argmax(arr)
    scores = augmented(predictor, arr, tta, merge) if tta is not None else predictor(arr)
    if output == "argmax" or threshold is not None:
        return labels(scores, threshold)
    return scores


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
                         "'percentile' or statistics", parameter="normalize")
    return resolve(normalize, as_dask_volume(open_volume(volume, var, storage_options),
                                             integers=True))


def select_channels(y, options: PredictOptions):
    """Only the output channels ``channels`` (an int or a list of ints) of the scores
    (or of an ensemble's mean and std), so that the stored result holds no more."""
    channels = options.channels
    if channels is None:
        return y
    if options.makes_labels:
        raise InputError(f"channels={channels!r} selects score channels; labels (output="
                         "'argmax', threshold=) have none", parameter="channels")
    n = (y[0] if isinstance(y, tuple) else y).shape[0]
    picked = [channels] if not isinstance(channels, (list, tuple)) else list(channels)
    valid = [isinstance(c, (int, np.integer)) and not isinstance(c, bool) and 0 <= c < n
             for c in picked]
    if not picked or not all(valid) or len(set(picked)) != len(picked):
        raise InputError(f"channels={channels!r} is not a list of distinct output channels; "
                         f"this model has {n} (0 to {n - 1})", parameter="channels")
    picked = [int(c) for c in picked]
    return each(y, lambda a: a[picked])


def each(y, fn):
    """``fn`` of the array ``y``, or of each array of an ensemble's `MeanStd`."""
    return MeanStd(*map(fn, y)) if isinstance(y, tuple) else fn(y)


def cast_output(y, output_dtype):
    """``y`` (or each array of an ensemble's (mean, std)) stored as ``output_dtype``."""
    if output_dtype in (None, "float32"):
        return y
    if isinstance(y, tuple):
        return each(y, lambda a: cast_output(a, output_dtype))
    if output_dtype == "float16":
        return y.astype(np.float16)
    return y.map_blocks(quantize_probabilities, dtype=np.uint8)


def quantize_probabilities(block: np.ndarray) -> np.ndarray:
    """Probabilities in [0, 1] as uint8 ``round(p * 255)``."""
    lo, hi = float(block.min(initial=0.0)), float(block.max(initial=0.0))
    if lo < -1e-6 or hi > 1 + 1e-6:
        raise InputError(f"output_dtype='uint8' stores probabilities in [0, 1]; the model's "
                         f"output reaches {lo if lo < 0 else hi:.4g} (logits?). Add a sigmoid "
                         "or softmax, or pass output_dtype='float16'", parameter="output_dtype")
    return np.rint(np.clip(block, 0.0, 1.0) * 255).astype(np.uint8)


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
