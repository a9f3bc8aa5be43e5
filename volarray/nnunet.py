"""nnU-Net v2 models: a trained model folder, run out of core as nnU-Net's predictor runs it.

The folder (``plans.json``, ``dataset.json``, ``fold_N/checkpoint_final.pth``) is read
with nnunetv2's own code (PlansManager, the label manager, the trainer's network
builder). Prediction is volarray's window mode with nnU-Net's pieces: tile starts from
``compute_steps_for_sliding_window``, weights from ``compute_gaussian`` (sigma 1/8 of the
patch, scaled by 10, in float16 as nnU-Net makes it), the mean over the flips of the
checkpoint's ``inference_allowed_mirroring_axes`` and over the folds (one module that
runs every fold and flip per window: the same sums nnU-Net makes, in float32), images
smaller than the patch padded with zeros and cropped back. nnU-Net's preprocessing
comes first: ``transpose_forward``, the crop to the bounding box of nonzero voxels, the
plans' intensity normalization with whole-image statistics (computed once with dask,
applied chunk by chunk) and, given the scan's ``spacing``, nnU-Net's resampling to the
configuration's (`volarray.resample`, region by region); after it, the logits back to the
scan's grid, probabilities or labels by nnU-Net's label manager (softmax and argmax, or
sigmoid and its region order), put back into the uncropped, untransposed frame as
nnU-Net does. nnU-Net accumulates the case's logits in float16 and holds the whole case
in memory; here the sums are float32 and each output chunk is its own task.
"""
from __future__ import annotations

import itertools
import json
import pickle
from pathlib import Path

import dask
import dask.array as da
import numpy as np
import torch
from dask.base import tokenize

from .errors import InputError
from .geometry import coerce_chunks
from .io import canonical, check_finite
from .resample import Resampling, raw_scan

OUTPUTS = ("probabilities", "labels", "logits")
NORMALIZATIONS = ("CTNormalization", "ZScoreNormalization", "NoNormalization",
                  "RescaleTo01Normalization", "RGBTo01Normalization")
INSTALL = "pip install 'volarray[nnunet]' (nnunetv2; keep the CPU torch with a constraints file)"


def _require_nnunetv2():
    try:
        import nnunetv2  # noqa: F401
    except ImportError as e:
        raise InputError(f"nnU-Net models need the nnunetv2 package ({e}); {INSTALL}") from None


class NnUNetEnsemble(torch.nn.Module):
    """The folds' networks and nnU-Net's test-time mirroring in one module: for each
    fold the mean of ``net(x)`` and ``flip(net(flip(x, axes)), axes)`` over every
    non-empty combination of the mirror axes (nnU-Net's
    ``_internal_maybe_mirror_and_predict``), then the mean over the folds."""

    def __init__(self, networks, mirror_axes=()):
        super().__init__()
        self.folds = torch.nn.ModuleList(networks)
        self.mirror_axes = tuple(int(a) for a in (mirror_axes or ()))

    def forward(self, x):
        axes = [a + 2 for a in self.mirror_axes]
        combos = [c for i in range(len(axes)) for c in itertools.combinations(axes, i + 1)]
        total = None
        for net in self.folds:
            y = net(x)
            for c in combos:
                y = y + torch.flip(net(torch.flip(x, c)), c)
            if combos:
                y = y / (len(combos) + 1)
            total = y if total is None else total + y
        return total / len(self.folds) if len(self.folds) > 1 else total


class NnUNetModel:
    """A trained nnU-Net v2 model folder, loaded with nnunetv2's own code.

    ``folds``: fold numbers (or "all") whose ``fold_N/<checkpoint>`` are averaged.
    ``configuration``: checked against the checkpoints' own (a model folder holds one
    configuration; None takes it). Checkpoints load with ``torch.load(weights_only=True)``
    plus numpy's scalars and arrays; ``trust_checkpoint=True`` unpickles anything, as
    nnU-Net itself does (only for files you trust).
    """

    def __init__(self, folder, folds=(0,), configuration: str | None = None,
                 checkpoint: str = "checkpoint_final.pth", trust_checkpoint: bool = False):
        _require_nnunetv2()
        from nnunetv2.utilities.label_handling.label_handling import \
            determine_num_input_channels
        from nnunetv2.utilities.plans_handling.plans_handler import PlansManager
        self.folder = Path(folder)
        self.folds = _coerce_folds(folds)
        self.checkpoint = checkpoint
        for name in ("plans.json", "dataset.json"):
            if not (self.folder / name).is_file():
                raise InputError(f"model folder {str(folder)!r} has no {name}; pass a trained "
                                 "nnU-Net v2 model folder (plans.json, dataset.json, fold_N/)")
        self.plans = json.loads((self.folder / "plans.json").read_text())
        self.dataset_json = json.loads((self.folder / "dataset.json").read_text())
        checkpoints = [_load_checkpoint(self._checkpoint_path(f), trust_checkpoint)
                       for f in self.folds]
        first = checkpoints[0]
        self.trainer_name = first["trainer_name"]
        self.configuration = first["init_args"]["configuration"]
        if configuration is not None and configuration != self.configuration:
            raise InputError(f"configuration={configuration!r}, but the checkpoints in "
                             f"{str(folder)!r} were trained as {self.configuration!r}; pass "
                             "that configuration's own model folder", parameter='configuration')
        self.mirror_axes = tuple(first.get("inference_allowed_mirroring_axes") or ())
        self.plans_manager = PlansManager(self.plans)
        self.configuration_manager = cm = self.plans_manager.get_configuration(self.configuration)
        if len(cm.patch_size) != 3:
            raise InputError(f"configuration {self.configuration!r} is 2-D (patch "
                             f"{list(cm.patch_size)}); volarray runs 3-D nnU-Net models "
                             "(3d_fullres, 3d_lowres)")
        if cm.previous_stage_name is not None:
            raise InputError(f"configuration {self.configuration!r} is a cascade stage: it "
                             f"needs {cm.previous_stage_name!r}'s segmentation as input, "
                             "which volarray does not chain; use a 3d_fullres model")
        self.label_manager = self.plans_manager.get_label_manager(self.dataset_json)
        self.patch_size = tuple(int(p) for p in cm.patch_size)
        self.input_channels = determine_num_input_channels(self.plans_manager, cm,
                                                           self.dataset_json)
        self.heads = self.label_manager.num_segmentation_heads
        self.transpose_forward = tuple(self.plans_manager.transpose_forward)
        self.transpose_backward = tuple(self.plans_manager.transpose_backward)
        networks = []
        for f, ck in zip(self.folds, checkpoints):
            net = self._build_network()
            try:
                net.load_state_dict(ck["network_weights"])
            except RuntimeError as e:
                raise InputError(f"fold {f}'s weights do not fit the network that plans.json "
                                 f"describes ({' '.join(str(e).split())[:300]})") from None
            networks.append(net.eval())
        self.networks = networks

    def _checkpoint_path(self, fold) -> Path:
        path = self.folder / f"fold_{fold}" / self.checkpoint
        if not path.is_file():
            found = sorted(p.parent.name[5:] for p in
                           self.folder.glob(f"fold_*/{self.checkpoint}"))
            found = tuple(int(f) if f.isdigit() else f for f in found)
            hint = (f"pass folds={found} or some of them, or " if found else "pass ")
            raise InputError(f"{str(path)!r} does not exist; the folds with {self.checkpoint} "
                             f"are {found or 'none'}: {hint}checkpoint='checkpoint_best.pth' "
                             "if that is the file the folds hold", parameter="folds")
        return path

    def _build_network(self) -> torch.nn.Module:
        """The trainer's network, as nnU-Net's initialize_from_trained_model_folder
        builds it (deep supervision off). The plain nnUNetTrainer's builder is
        get_network_from_plans, called here directly (importing every trainer to find
        it costs seconds); other trainers are looked up by name."""
        cm = self.configuration_manager
        args = (self.input_channels, self.heads)
        if self.trainer_name == "nnUNetTrainer":
            from nnunetv2.utilities.get_network_from_plans import get_network_from_plans
            return get_network_from_plans(cm.network_arch_class_name,
                                          cm.network_arch_init_kwargs,
                                          cm.network_arch_init_kwargs_req_import, *args,
                                          allow_init=False, deep_supervision=False)
        import inspect
        build = _find_trainer(self.trainer_name).build_network_architecture
        if "plans_manager" in inspect.signature(build).parameters:
            return build(self.plans_manager, cm, *args, enable_deep_supervision=False)
        return build(cm.network_arch_class_name, cm.network_arch_init_kwargs,
                     cm.network_arch_init_kwargs_req_import, *args,
                     enable_deep_supervision=False)

    def ensemble(self, mirror: bool = True) -> NnUNetEnsemble:
        """One module: every fold, and the mirrorings when ``mirror``."""
        return NnUNetEnsemble(self.networks, self.mirror_axes if mirror else ()).eval()

    def gaussian(self, patch) -> np.ndarray:
        """nnU-Net's importance weights for one tile, float16 values as float32."""
        from nnunetv2.inference.sliding_window_prediction import compute_gaussian
        w = compute_gaussian(tuple(int(p) for p in patch), sigma_scale=1. / 8,
                             value_scaling_factor=10, device=torch.device("cpu"))
        return w.float().numpy()

    def __repr__(self):
        return (f"NnUNetModel({str(self.folder)!r}, configuration={self.configuration!r}, "
                f"folds={list(self.folds)}, trainer={self.trainer_name!r}, "
                f"patch={self.patch_size}, mirror_axes={self.mirror_axes}, "
                f"inputs={self.input_channels}, heads={self.heads}, "
                f"regions={self.label_manager.has_regions})")

    # -- the pipeline -------------------------------------------------------------------

    def predict(self, volume, *, output: str = "probabilities", tile_step_size: float = 0.5,
                mirror: bool = True, normalize: bool = True, crop_nonzero: bool = True,
                spacing=None, reverse_axes: bool | None = None, chunks=None,
                device="cpu") -> da.Array:
        """See `predict_nnunet`."""
        from .predictors import check_model, resolve_device
        from .window import predict_window
        _check_options(output, tile_step_size)
        volume, spacing, reverse = raw_scan(volume, spacing, reverse_axes,
                                            self.plans.get("image_reader_writer"))
        arr = canonical(volume, integers=True)
        if arr.shape[0] != self.input_channels:
            raise InputError(f"the volume has {arr.shape[0]} channel(s); this model takes "
                             f"{self.input_channels} ({_channel_names(self.dataset_json)}): "
                             "pass (C, Z, Y, X) with the channels in dataset.json's order")
        if reverse:  # nnU-Net's axis order inside, the volume's outside
            c = coerce_chunks(chunks, arr.shape[1:])
            y = self.predict(arr.transpose(0, 3, 2, 1), output=output, mirror=mirror,
                             tile_step_size=tile_step_size, normalize=normalize,
                             crop_nonzero=crop_nonzero, reverse_axes=False, device=device,
                             spacing=None if spacing is None else spacing[::-1],
                             chunks=None if c is None else c[::-1])
            return y.transpose(tuple(range(y.ndim - 3)) + (y.ndim - 1, y.ndim - 2, y.ndim - 3))
        arr = arr.astype(np.float32)
        shape = tuple(arr.shape[1:])
        chunks_in = coerce_chunks(chunks, shape)
        box = nonzero_box(arr) if crop_nonzero else tuple((0, n) for n in shape)
        crop = arr[(slice(None),) + tuple(slice(a, b) for a, b in box)]
        if normalize:
            crop = self.normalize(crop, box_lo=tuple(a for a, _ in box))
        else:  # NaN / Inf refused as everywhere in volarray, naming the voxel
            crop = crop.map_blocks(_checked, box_lo=tuple(a for a, _ in box), dtype=np.float32)
        grid = None if spacing is None else Resampling.for_configuration(
            self.configuration_manager.configuration, self.transpose_forward, spacing,
            crop.shape[1:])
        if grid is not None:  # nnU-Net resamples after normalizing
            crop = grid.forward(crop)
        tf, tb = self.transpose_forward, self.transpose_backward
        net_in = crop.transpose((0,) + tuple(t + 1 for t in tf)) if tf != (0, 1, 2) else crop
        window_chunks = (self.patch_size if chunks_in is None  # None per axis: the patch's
                         else tuple(p if chunks_in[t] is None else chunks_in[t]
                                    for t, p in zip(tf, self.patch_size)))
        model = self.ensemble(mirror)
        check_model(model)
        logits = predict_window(
            model, net_in.rechunk({0: -1}), roi_size=self.patch_size, overlap=0.0,
            blend_mode=self.gaussian, placement=_NnUNetSteps(float(tile_step_size)),
            chunks=coerce_chunks(window_chunks, net_in.shape[1:]), device=resolve_device(device))
        if tb != (0, 1, 2):
            logits = logits.transpose((0,) + tuple(t + 1 for t in tb))
        if grid is not None:  # the logits back to the scan's grid (order 1), then labels
            logits = grid.backward(logits)
        y = _uncrop(self._convert(logits, output), box, shape, output,
                    self.label_manager.has_regions)
        final = tuple(p if c is None else c for c, p in
                      zip(chunks_in or (None,) * 3, (self.patch_size[t] for t in tb)))
        return y.rechunk(y.chunks[:-3] + tuple(min(c, n) for c, n in zip(final, shape)))

    def normalize(self, arr: da.Array, box_lo=(0, 0, 0)) -> da.Array:
        """The plans' intensity normalization of ``arr`` (C, Z, Y, X) float32, per
        channel: statistics over the whole (cropped) image computed once with dask
        (mean and std with ddof=0 for ZScoreNormalization, min and max for
        RescaleTo01Normalization), applied chunk by chunk as nnU-Net's classes apply
        them, in float32. ``box_lo``: where ``arr`` starts in the volume (for the voxel
        that NaN or Inf messages name)."""
        cm = self.configuration_manager
        props = self.plans_manager.foreground_intensity_properties_per_channel
        schemes = list(cm.normalization_schemes)
        masks = list(cm.use_mask_for_norm)
        params, lazy = [], {}
        for c in range(arr.shape[0]):
            scheme = schemes[c]
            if scheme not in NORMALIZATIONS:
                raise InputError(f"channel {c} uses the normalization {scheme!r}, which volarray "
                                 f"does not compute (it knows {', '.join(NORMALIZATIONS)}); "
                                 "normalize the volume yourself and pass normalize=False")
            if scheme == "ZScoreNormalization" and masks[c]:
                raise InputError(
                    f"channel {c}: the plans normalize with use_mask_for_norm (z-score over the "
                    "nonzero region with its holes filled, zeros kept outside), which volarray "
                    "does not compute out of core; normalize the volume as nnU-Net does and "
                    "pass normalize=False")
            if scheme == "CTNormalization":
                p = props[str(c)]
                params.append(("ct", (p["percentile_00_5"], p["percentile_99_5"], p["mean"],
                                      max(p["std"], 1e-8))))
                continue
            x = arr[c].astype(np.float64)
            if scheme == "ZScoreNormalization":
                lazy[c] = (x.mean(), x.std())
            elif scheme in ("RescaleTo01Normalization", "RGBTo01Normalization"):
                lazy[c] = (x.min(), x.max())
            params.append((scheme, None))
        stats = dict(zip(lazy, dask.compute(*lazy.values()))) if lazy else {}
        for c, (a, b) in stats.items():
            if not (np.isfinite(a) and np.isfinite(b)):  # find and name the voxel
                arr[c:c + 1].map_blocks(_checked, box_lo=box_lo).compute()
                raise InputError(f"channel {c}'s statistics are not finite ({a}, {b})")
            scheme = params[c][0]
            if scheme == "ZScoreNormalization":
                params[c] = ("zscore", (np.float32(a), np.float32(max(np.float32(b), 1e-8))))
            elif scheme == "RescaleTo01Normalization":
                params[c] = ("rescale", (np.float32(a), max(np.float32(b) - np.float32(a), 1e-8)))
            else:
                if a < 0 or b > 255:
                    raise InputError(f"channel {c} uses RGBTo01Normalization but holds values "
                                     f"from {a} to {b}, outside 0..255")
                params[c] = ("rgb", None)
        params = [("none", None) if p[0] == "NoNormalization" else p for p in params]
        return arr.map_blocks(_normalize_block, params=params, box_lo=tuple(box_lo),
                              dtype=np.float32)

    def _convert(self, logits: da.Array, output: str) -> da.Array:
        if output == "logits":
            return logits
        lm = self.label_manager
        if output == "probabilities":
            return logits.map_blocks(_probabilities, lm, dtype=np.float32)
        return logits.map_blocks(_labels, lm, self.label_dtype, dtype=self.label_dtype,
                                 drop_axis=0)

    @property
    def label_dtype(self):
        """nnU-Net's: uint8 below 255 foreground labels, else uint16."""
        return np.uint8 if len(self.label_manager.foreground_labels) < 255 else np.uint16

    def token(self) -> str:
        """What identifies the model's numbers besides its weights: plans and labels."""
        return tokenize(self.plans, self.dataset_json, self.configuration, self.folds,
                        self.trainer_name, self.mirror_axes)


class _NnUNetSteps:
    """nnU-Net's compute_steps_for_sliding_window for one axis (picklable)."""

    def __init__(self, step: float):
        self.step = step

    def __call__(self, size: int, roi: int) -> list[int]:
        from nnunetv2.inference.sliding_window_prediction import \
            compute_steps_for_sliding_window
        return compute_steps_for_sliding_window((size,), (roi,), self.step)[0]


class NnUNetPipeline:
    """`predict_to_zarr`'s predictor for an nnU-Net model: the volume in, the lazy
    result out; ``token`` and ``attrs`` describe the run."""

    def __init__(self, model: NnUNetModel, **options):
        self.model, self.options = model, options
        self.token = tokenize(model.token(), sorted(
            (k, v) for k, v in options.items() if k not in ("chunks", "device")))
        self.attrs = {"model": f"nnU-Net {model.trainer_name} {model.configuration}",
                      "method": "nnunet", "nnunet_folds": [str(f) for f in model.folds],
                      "nnunet_output": options.get("output", "probabilities")}

    def __call__(self, source):
        return self.model.predict(source, **self.options)


def load_nnunet(model_folder, *, folds=(0,), configuration: str | None = None,
                checkpoint: str = "checkpoint_final.pth",
                trust_checkpoint: bool = False) -> NnUNetModel:
    """A trained nnU-Net v2 model folder, loaded with nnunetv2's code (see NnUNetModel)."""
    return NnUNetModel(model_folder, folds=folds, configuration=configuration,
                       checkpoint=checkpoint, trust_checkpoint=trust_checkpoint)


def predict_nnunet(model_folder, volume, *, folds=(0,), configuration: str | None = None,
                   checkpoint: str = "checkpoint_final.pth", output: str = "probabilities",
                   tile_step_size: float = 0.5, mirror: bool = True, normalize: bool = True,
                   crop_nonzero: bool = True, spacing=None, reverse_axes: bool | None = None,
                   chunks=None, device="cpu", trust_checkpoint: bool = False) -> da.Array:
    """nnU-Net v2's prediction of ``volume`` as a lazy dask array, out of core.

    ``model_folder``: a trained model folder (plans.json, dataset.json, fold_N/) or a
    loaded `NnUNetModel`. ``volume``: numpy, dask, zarr or torch, (Z, Y, X) or
    (C, Z, Y, X) with dataset.json's channels, in the axis order nnU-Net's reader gives
    (the plans' ``transpose_forward`` is applied here); or a NIfTI scan (a path, or
    `volarray.open_nifti`'s DataArray), whose (i, j, k) axes are reversed as nnU-Net's
    readers reverse them (``reverse_axes``) and whose header gives ``spacing``. Integer
    volumes are cast to float32 as nnU-Net casts them.

    ``spacing``: the volume's voxel size per axis (in its own order). Given, the volume
    is resampled to the configuration's spacing as nnU-Net's preprocessor does it (after
    the crop and the normalization; its ``resample_data_or_seg_to_shape``: order 3, the
    low-resolution axis alone with order 0 when a spacing is anisotropic), lazily, region
    by region (`volarray.resample`), and the logits back to the volume's grid (order 1)
    before probabilities or labels, as nnU-Net's predictor does. None: the volume is
    taken as at the configuration's spacing already, and not resampled.

    ``output``: "probabilities" (softmax, or sigmoid for region-based label sets;
    (C, Z, Y, X) float32), "labels" (argmax, or nnU-Net's region-to-label order;
    (Z, Y, X) uint8 or uint16), or "logits" (the mean over folds and mirrorings).
    ``tile_step_size``, ``mirror`` (the checkpoint's mirror axes) and ``folds`` as
    nnU-Net's predictor takes them. ``normalize``: the plans' intensity normalization
    with whole-image statistics (False when the volume is normalized already).
    ``crop_nonzero``: nnU-Net's crop to the bounding box of nonzero voxels, with
    background outside it (0 logits there). ``chunks``: output chunk shape (default:
    the patch). Statistics and the crop's box are computed when this is called (one
    pass over the volume each); the prediction runs when the result is computed.
    """
    model = model_folder if isinstance(model_folder, NnUNetModel) else load_nnunet(
        model_folder, folds=folds, configuration=configuration, checkpoint=checkpoint,
        trust_checkpoint=trust_checkpoint)
    return model.predict(volume, output=output, tile_step_size=tile_step_size, mirror=mirror,
                         normalize=normalize, crop_nonzero=crop_nonzero, spacing=spacing,
                         reverse_axes=reverse_axes, chunks=chunks, device=device)


def predict_nnunet_to_zarr(model_folder, volume, store, *, name: str = "prediction",
                           var: str | None = None, overwrite: bool = False,
                           resume: bool = False, scheduler=None, folds=(0,),
                           configuration: str | None = None,
                           checkpoint: str = "checkpoint_final.pth",
                           trust_checkpoint: bool = False,
                           storage_options: dict | None = None, **options):
    """`predict_nnunet` written by `volarray.predict_to_zarr` (the same rules: never
    overwrites without ``overwrite=True``, resumable, finished chunks kept). ``volume``
    may be a path or URL (zarr array, zarr group with ``var``, .npy), ``store`` a URL
    (``storage_options`` for fsspec, as `predict_to_zarr`); ``options`` are
    `predict_nnunet`'s (output, tile_step_size, mirror, normalize, crop_nonzero, spacing,
    reverse_axes, chunks, device); a NIfTI scan is resampled from its header's spacing."""
    from .store import predict_to_zarr
    allowed = {"output", "tile_step_size", "mirror", "normalize", "crop_nonzero", "chunks",
               "device", "spacing", "reverse_axes"}
    unknown = sorted(set(options) - allowed)
    if unknown:
        raise InputError(f"predict_nnunet_to_zarr got unknown option(s) {unknown}; it takes "
                         f"{sorted(allowed)}")
    _check_options(options.get("output", "probabilities"), options.get("tile_step_size", 0.5))
    model = model_folder if isinstance(model_folder, NnUNetModel) else load_nnunet(
        model_folder, folds=folds, configuration=configuration, checkpoint=checkpoint,
        trust_checkpoint=trust_checkpoint)
    _, spacing, reverse = raw_scan(volume, options.get("spacing"), options.get("reverse_axes"),
                                   model.plans.get("image_reader_writer"), open_path=False)
    options.update(spacing=spacing, reverse_axes=reverse)  # predict_to_zarr passes dask
    pipeline = NnUNetPipeline(model, **options)
    return predict_to_zarr(model.ensemble(options.get("mirror", True)), volume, store,
                           name=name, var=var, overwrite=overwrite, resume=resume,
                           scheduler=scheduler, predictor=pipeline,
                           storage_options=storage_options)


# -- helpers ---------------------------------------------------------------------------

def _check_options(output, tile_step_size):
    if output not in OUTPUTS:
        raise InputError(f"output={output!r} is not one of {OUTPUTS}", parameter='output')
    if isinstance(tile_step_size, bool) or not isinstance(tile_step_size, (int, float)) or \
            not 0 < tile_step_size <= 1:
        raise InputError(f"tile_step_size={tile_step_size!r} must be in (0, 1]: the step "
                         "between tiles as a fraction of the patch (nnU-Net's default 0.5)", parameter='tile_step_size')


def _coerce_folds(folds):
    if isinstance(folds, (int, str)):
        folds = (folds,)
    out = []
    for f in folds:
        if f == "all":
            out.append("all")
            continue
        try:
            out.append(int(f))
        except (TypeError, ValueError):
            raise InputError(f"folds={folds!r}: each fold is an int or 'all'", parameter='folds') from None
    if not out:
        raise InputError("folds=() names no fold; pass e.g. folds=(0,) or (0, 1, 2, 3, 4)", parameter='folds')
    return tuple(out)


def _numpy_globals():
    """What nnU-Net checkpoints hold besides tensors: numpy scalars and arrays in the
    training log. Safe to rebuild (no code runs)."""
    core = getattr(np, "_core", None) or np.core
    names = [core.multiarray.scalar, core.multiarray._reconstruct, np.ndarray, np.dtype]
    names += [getattr(np.dtypes, n) for n in dir(np.dtypes) if n.endswith("DType")
              and n not in ("ObjectDType", "StringDType")]
    return names


def _load_checkpoint(path: Path, trust: bool) -> dict:
    if trust:
        ck = torch.load(path, map_location="cpu", weights_only=False)
    else:
        try:
            with torch.serialization.safe_globals(_numpy_globals()):
                ck = torch.load(path, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as e:
            detail = next((ln.strip() for ln in str(e).splitlines()
                           if "Unsupported global" in ln), str(e).splitlines()[0])[:200]
            raise InputError(f"checkpoint {str(path)!r} holds objects other than tensors, "
                             f"numbers and numpy arrays ({detail}); volarray does not unpickle "
                             "arbitrary objects: if you trust the file, pass "
                             "trust_checkpoint=True, as nnU-Net itself loads it") from None
        except Exception as e:
            raise InputError(f"checkpoint {str(path)!r} cannot be read ({type(e).__name__}: "
                             f"{' '.join(str(e).split())[:200]})") from None
    missing = [k for k in ("network_weights", "trainer_name", "init_args")
               if not isinstance(ck, dict) or k not in ck]
    if missing:
        raise InputError(f"{str(path)!r} is not an nnU-Net v2 checkpoint (no {missing})")
    return ck


def _find_trainer(name: str):
    """The trainer class, by nnunetv2's own search; where that fails on one of its
    modules (the Primus trainers import timm), by importing the trainer modules one by
    one and skipping those that do not import."""
    import importlib
    import pkgutil

    from nnunetv2.utilities.find_objects import recursive_find_trainer_class_by_name
    try:
        return recursive_find_trainer_class_by_name(name)
    except Exception as e:
        first = e
    import nnunetv2.training.nnUNetTrainer as package
    for info in pkgutil.walk_packages(package.__path__, package.__name__ + "."):
        try:
            module = importlib.import_module(info.name)
        except Exception:
            continue
        if isinstance(getattr(module, name, None), type):
            return getattr(module, name)
    raise InputError(f"the checkpoints were trained with {name!r}, which no module of "
                     f"nnunetv2.training.nnUNetTrainer defines (nnunetv2's own search: "
                     f"{type(first).__name__}: {first}); install the package that defines "
                     "it") from None


def _channel_names(dataset_json) -> str:
    names = dataset_json.get("channel_names") or dataset_json.get("modality") or {}
    return ", ".join(f"{k}: {v}" for k, v in names.items()) or "see dataset.json"


def nonzero_box(arr: da.Array):
    """nnU-Net's crop_to_nonzero box of ``arr`` (C, Z, Y, X): per axis [first, last + 1)
    of the voxels nonzero in any channel (filling the mask's holes, as nnU-Net does,
    does not change its box). One dask pass; the whole volume when every voxel is 0."""
    nonzero = (arr != 0).any(axis=0)
    profiles = dask.compute(*[nonzero.any(axis=tuple(a for a in range(3) if a != k))
                              for k in range(3)])
    box = []
    for k, p in enumerate(profiles):
        hits = np.flatnonzero(p)
        box.append((int(hits[0]), int(hits[-1]) + 1) if hits.size else (0, arr.shape[1 + k]))
    return tuple(box)


def _checked(block, box_lo, block_info=None):
    lo = (0, 0, 0)
    if block_info is not None:
        lo = tuple(int(r[0]) + b for r, b in zip(block_info[0]["array-location"][1:], box_lo))
    check_finite(block, lo)
    return block


def _normalize_block(block, params, box_lo, block_info=None):
    """nnU-Net's normalizations of one chunk, in float32, channel by channel. The chunk
    may hold some of the channels only (a volume chunked along channels,
    ``da.stack([ct, pet])``): its first channel's number comes from ``block_info``."""
    out = _checked(np.array(block, dtype=np.float32), box_lo, block_info)
    first = 0 if block_info is None else int(block_info[0]["array-location"][0][0])
    for c, (kind, p) in enumerate(params[first:first + out.shape[0]]):
        x = out[c]
        if kind == "ct":
            lo, hi, mean, std = p
            np.clip(x, lo, hi, out=x)
            x -= mean
            x /= std
        elif kind == "zscore":
            x -= p[0]
            x /= p[1]
        elif kind == "rescale":
            x -= p[0]
            x /= p[1]
        elif kind == "rgb":
            x /= 255.
    return out


def _uncrop(y: da.Array, box, shape, output: str, regions: bool) -> da.Array:
    """The cropped prediction put back in the whole image: outside the box labels
    are 0, probabilities 1 for the background class (0 for every region), as
    nnU-Net's revert_cropping_on_probabilities; logits 0 (nnU-Net has none)."""
    pads = [(a, n - b) for (a, b), n in zip(box, shape)]
    if not any(p for pad in pads for p in pad):
        return y
    if y.ndim == 3:
        return da.pad(y, pads, mode="constant", constant_values=0)
    pads = [(0, 0)] + pads
    if output == "probabilities" and not regions:
        return da.concatenate([da.pad(y[:1], pads, mode="constant", constant_values=1),
                               da.pad(y[1:], pads, mode="constant", constant_values=0)])
    return da.pad(y, pads, mode="constant", constant_values=0)


def _probabilities(block, label_manager):
    return label_manager.apply_inference_nonlin(torch.from_numpy(block)).numpy()


def _labels(block, label_manager, dtype):
    seg = label_manager.convert_logits_to_segmentation(block)
    return np.asarray(seg.numpy() if isinstance(seg, torch.Tensor) else seg).astype(dtype)
