"""`predict`'s options, in one place: the frozen `PredictOptions`, built once per call
(by `predict`, `predict_to_zarr`, the xarray accessor and the command line) with one
canonicalising function per option, as dask's ``normalize_chunks``; which options
belong to one method only is declared here, on the fields, and nowhere else."""
from __future__ import annotations

from dataclasses import dataclass, field, fields, replace
from typing import Any

import numpy as np

from .errors import InputError
from .masking import check_mask
from .predictors import check_samples
from .tta import canonical_tta, check_merge

METHODS = ("exact", "window")
OUTPUT_DTYPES = ("float32", "float16", "uint8")
WINDOW_DEFAULTS = {"overlap": 0.25, "blend_mode": "gaussian", "sigma_scale": 0.125}


def _only(method: str, why: str):
    """A field that means something for ``method`` only: given for the other, refused."""
    return field(default=None, metadata={"only": method, "why": why})


@dataclass(frozen=True)
class PredictOptions:
    """The keyword arguments of `volarray.predict`, in its signature's order, each
    canonical once built (``output_dtype`` a name; the method's combinations checked).
    ``normalize`` becomes the resolved `Normalization` with `with_normalization`."""

    method: str = "exact"
    chunks: Any = None
    device: Any = None
    memory_limit: Any = _only("exact", "the memory of a tile task")
    keep: Any = _only("exact", "tensors kept between stages")
    pad: str | None = _only("exact", "window mode pads its windows itself")
    compute_dtype: Any = _only("exact",
                               "window mode calls the model as it is: cast the model itself")
    roi_size: Any = _only("window", "the window's size")
    overlap: float | None = _only("window", "the windows' overlap")
    blend_mode: Any = _only("window", "how windows are blended")
    sigma_scale: float | None = _only("window", "the gaussian's width")
    tta: str | None = None
    merge: str | None = None
    output: str = "probabilities"
    threshold: float | None = None
    ensemble: int | None = None
    seed: int = 0
    coords: bool = False
    normalize: Any = None
    select: Any = None
    output_dtype: str | None = None
    channels: Any = None
    strategy: Any = _only("exact", "how a tile task runs its stage")
    output_array: str = "numpy"  # 'cupy': the result's chunks on the GPU (predict only)
    mask: Any = "auto"
    mask_fill: Any = None

    def __post_init__(self):
        check_method(self.method)
        check_output(self.output, self.threshold)
        object.__setattr__(self, "tta", canonical_tta(self.tta))
        check_merge(self.merge, self.tta)
        check_ensemble(self.ensemble, self.seed, self)
        object.__setattr__(self, "output_dtype", canonical_output_dtype(self.output_dtype,
                                                                        self))
        check_method_options(self)
        from .devices import check_output_array
        check_output_array(self.output_array)
        check_mask(self.mask, self.mask_fill, self.makes_labels)

    @classmethod
    def given(cls, options: dict, caller: str) -> PredictOptions:
        """The options of ``caller`` (e.g. predict_to_zarr), whose unknown names are
        refused, naming the ones it takes."""
        unknown = sorted(set(options) - set(OPTION_NAMES))
        if unknown:
            raise InputError(f"{caller} got unknown option(s) {unknown}; it takes "
                             f"predict's options {list(OPTION_NAMES)}")
        if options.get("output_array", "numpy") != "numpy":
            raise InputError(f"{caller} got output_array={options['output_array']!r}; it "
                             "writes its result, so only volarray.predict returns CuPy "
                             "chunks", parameter="output_array")
        return cls(**options)

    def as_dict(self) -> dict:
        """Every option by name (values as they are, not copied)."""
        return {name: getattr(self, name) for name in OPTION_NAMES}

    def settings(self) -> dict:
        """The given options (not None) of this options' method only."""
        return {name: getattr(self, name) for name in METHOD_ONLY[self.method]
                if getattr(self, name) is not None}

    @property
    def makes_labels(self) -> bool:
        """Whether the options ask for labels rather than scores."""
        return self.output != "probabilities" or self.threshold is not None

    def with_normalization(self, resolved) -> PredictOptions:
        return replace(self, normalize=resolved)

    def with_mask(self, resolved) -> PredictOptions:
        """The options with ``mask=`` resolved to a `volarray.masking.Mask` or None."""
        return replace(self, mask=resolved)


OPTION_NAMES = tuple(f.name for f in fields(PredictOptions))
# the one table of options that belong to one method: name -> why, per method
METHOD_ONLY = {m: {f.name: f.metadata["why"] for f in fields(PredictOptions)
                   if f.metadata.get("only") == m} for m in METHODS}


def check_method(method) -> None:
    if method not in METHODS:
        hint = (f"; {method!r} is a blend: pass method='window', blend_mode={method!r}"
                if method in ("gaussian", "constant") else "")
        raise InputError(f"method={method!r} is not one of {METHODS}{hint}", parameter="method")


def check_output(output, threshold) -> None:
    if output not in ("probabilities", "argmax"):
        raise InputError(f"output={output!r} is not 'probabilities' or 'argmax'",
                         parameter="output")
    if threshold is None:
        return
    if isinstance(threshold, bool) or not isinstance(threshold, (int, float)) or \
            not np.isfinite(threshold):
        raise InputError(f"threshold={threshold!r} is not a number; pass e.g. 0.5 for a "
                         "sigmoid head or 0.0 for logits", parameter="threshold")
    if output == "argmax":
        raise InputError("output='argmax' and threshold= are two ways to make labels; pass "
                         "one (threshold for a one-channel head, argmax for classes)",
                         parameter="threshold")


def check_ensemble(ensemble, seed, options) -> None:
    if ensemble is not None:
        check_samples(ensemble)
        if options.tta is not None or options.makes_labels:
            raise InputError("ensemble= combines with neither tta=, output='argmax' nor "
                             "threshold=; reduce the returned mean yourself",
                             parameter="ensemble")
    elif seed not in (0, None):
        raise InputError(f"seed={seed!r} seeds the samples of ensemble=; without it the "
                         "prediction draws nothing: leave it out or pass ensemble=N",
                         parameter="seed")


def canonical_output_dtype(output_dtype, options) -> str | None:
    """``output_dtype`` as one of OUTPUT_DTYPES' names (a numpy type given is named)."""
    if output_dtype is None:
        return None
    name = np.dtype(output_dtype).name if isinstance(output_dtype, type) else output_dtype
    if name not in OUTPUT_DTYPES:
        raise InputError(f"output_dtype={output_dtype!r} is not one of {OUTPUT_DTYPES} "
                         "(uint8 for probabilities in [0, 1])", parameter="output_dtype")
    if options.makes_labels:
        raise InputError(f"output_dtype={output_dtype!r} applies to scores; labels "
                         "(output='argmax', threshold=) are already uint8 or uint16",
                         parameter="output_dtype")
    return name


def check_method_options(options: PredictOptions) -> None:
    """Options of the other method are refused, not ignored (the one table, METHOD_ONLY)."""
    mine = options.method
    other = "window" if mine == "exact" else "exact"
    for name, why in METHOD_ONLY[other].items():
        value = getattr(options, name)
        if value is not None:
            raise InputError(f"{name}={value!r} applies to method='{other}' ({why}); leave it "
                             f"out with method='{mine}'", parameter=name)
    if mine == "window" and options.sigma_scale is not None and \
            options.blend_mode not in (None, "gaussian"):
        raise InputError(f"sigma_scale={options.sigma_scale!r} shapes the gaussian blend; "
                         f"blend_mode={options.blend_mode!r} has none: leave it out",
                         parameter="sigma_scale")


def output_attrs(model, options: PredictOptions, predictor=None, prefix: str = "") -> dict:
    """The attributes of every output array (the zarr writer's, prefix ""; the xarray
    accessor's, prefix "volarray_"): model, method, version, the normalization's
    statistics, the predictor's own, and the uint8 scale xarray decodes on reading."""
    from .version import __version__
    return {f"{prefix}model": type(model).__name__, f"{prefix}method": options.method,
            "volarray_version": __version__, **recorded_options(options, prefix),
            **(QUANTIZED_ATTRS if options.output_dtype == "uint8" else {}),
            **getattr(options.normalize, "attrs", {}), **getattr(predictor, "attrs", {})}


def recorded_options(options: PredictOptions, prefix: str = "") -> dict:
    """The options a reader of the output needs to know what its values are (labels
    by a threshold, a mean of flips, ensemble samples), where they were given."""
    given = {"output": options.output if options.output != "probabilities" else None,
             "threshold": options.threshold, "tta": options.tta, "merge": options.merge,
             "ensemble": options.ensemble,
             "seed": options.seed if options.ensemble else None,
             "coords": True if options.coords else None}
    return {f"{prefix}{k}": v for k, v in given.items() if v is not None}


# CF conventions (read by xarray): the stored uint8 q stands for q * scale_factor
QUANTIZED_ATTRS = {"scale_factor": 1 / 255, "add_offset": 0.0}
