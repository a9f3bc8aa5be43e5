"""nnU-Net's resampling of a (C, Z, Y, X) volume to another spacing, lazily, region by region.

nnU-Net (``nnunetv2.preprocessing.resampling.default_resampling``) resamples a case with
``resample_data_or_seg_to_shape``: skimage's ``resize`` (scipy's ``zoom`` with
``grid_mode=True``, mode "nearest", no anti-aliasing, the output clipped to the input's
range) of order 3 for the data and order 1 for the logits; where one spacing is
anisotropic (max / min > 3) the in-plane axes are resized slice by slice and the
low-resolution axis is then interpolated alone with ``map_coordinates`` of ``order_z``
(0 in every default plan: the nearest slice).

Every one of these is a tensor product of one-dimensional linear maps, one per axis (the
spline prefilter, the edge padding, the evaluation and the coordinates are all separable),
so the result is the same 1-D resampling applied along each axis in turn, then the clip.
The 1-D map along an axis of ``n_in`` voxels to ``n_out`` is the matrix whose column ``j``
is scipy's own 1-D resampling of the unit vector ``e_j``. An order-3 spline prefilter
is global along its axis, but its weights fall by 2 - sqrt(3) = 0.268 per voxel: the
columns more than about 35 voxels past the kernel weigh less than 1e-20 and are left
out. So each output region of an axis reads only the input region it needs (its
kernel, plus that margin for order 3), and a pass along an axis runs chunk by chunk
through dask, in float64 as nnU-Net computes, the result cast back to the input's dtype.
Agreement with nnU-Net's own function: float64 rounding, within one float32 unit.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass

import dask
import dask.array as da
import numpy as np

from .errors import InputError

ANISO_THRESHOLD = 3  # nnunetv2.configuration.ANISO_THRESHOLD
NEGLIGIBLE = 1e-20   # weights below this are left out of a region's read
SUPPORTED = "resample_data_or_seg_to_shape"


@dataclass(frozen=True)
class Scheme:
    """The plans' ``resampling_fn_*_kwargs``: interpolation order in the plane (or in 3-D),
    ``order_z`` along a separate low-resolution axis, ``force_separate_z`` (None: by the
    anisotropy threshold) and that threshold."""
    order: int = 3
    order_z: int = 0
    force_separate_z: bool | None = None
    threshold: float = ANISO_THRESHOLD

    @classmethod
    def from_plans(cls, function: str, kwargs: dict, what: str) -> "Scheme":
        if function != SUPPORTED:
            raise InputError(f"the plans resample {what} with {function!r}; volarray computes "
                             f"nnU-Net's {SUPPORTED!r} only: resample the scan to the "
                             "configuration's spacing yourself and leave spacing= out",
                             parameter="spacing")
        kwargs = dict(kwargs or {})
        if kwargs.get("is_seg"):
            raise InputError(f"the plans resample {what} as a segmentation (is_seg=True), "
                             "which volarray does not compute", parameter="spacing")
        return cls(order=int(kwargs.get("order", 3)), order_z=int(kwargs.get("order_z", 0)),
                   force_separate_z=kwargs.get("force_separate_z"),
                   threshold=float(kwargs.get("separate_z_anisotropy_threshold",
                                              ANISO_THRESHOLD)))


def compute_new_shape(shape, spacing, new_spacing) -> tuple:
    """nnU-Net's ``compute_new_shape``: round(old spacing / new spacing * old shape)."""
    return tuple(int(round(s / t * n)) for n, s, t in zip(shape, spacing, new_spacing))


def _lowres_axes(spacing) -> list:
    s = np.asarray(spacing, dtype=float)
    return [int(a) for a in np.where(max(s) / s == 1)[0]]


def separate_axis(spacing, new_spacing, force_separate_z=None,
                  threshold: float = ANISO_THRESHOLD) -> int | None:
    """nnU-Net's ``determine_do_sep_z_and_axis``: the axis interpolated on its own (with
    ``order_z``) after the others, or None for one 3-D resize."""
    def anisotropic(s):
        return max(s) / min(s) > threshold
    if force_separate_z is not None:
        axes = _lowres_axes(spacing) if force_separate_z else None
    elif anisotropic(spacing):
        axes = _lowres_axes(spacing)
    elif anisotropic(new_spacing):
        axes = _lowres_axes(new_spacing)
    else:
        axes = None
    return axes[0] if axes is not None and len(axes) == 1 else None


def check_spacing(spacing, what: str = "spacing") -> tuple:
    """Three positive finite voxel sizes, as floats."""
    try:
        values = tuple(float(s) for s in spacing)
    except (TypeError, ValueError):
        values = ()
    if len(values) != 3 or not all(np.isfinite(v) and v > 0 for v in values):
        raise InputError(f"{what}={spacing!r}: pass three positive voxel sizes (mm), one per "
                         "spatial axis in the volume's order", parameter=what)
    return values


@functools.lru_cache(maxsize=16)
def axis_matrix(n_in: int, n_out: int, order: int, separate: bool) -> np.ndarray:
    """The (n_out, n_in) float64 matrix of nnU-Net's 1-D resampling: column j is the
    resampling of the unit vector e_j by skimage's resize (scipy's zoom, grid_mode,
    mode "nearest": ``separate=False``) or by the separate axis's map_coordinates
    (``separate=True``), as nnU-Net calls them."""
    from scipy import ndimage
    eye = np.eye(n_in)
    if separate:
        scale = float(n_in) / n_out
        coords = (scale * (np.arange(n_out) + 0.5) - 0.5)[None]
        cols = [ndimage.map_coordinates(e, coords, order=order, mode="nearest") for e in eye]
    else:
        factor = 1 / np.divide(n_in, n_out)  # skimage.transform.resize's zoom factor
        cols = [ndimage.zoom(e, factor, order=order, mode="nearest", cval=0.0, grid_mode=True)
                for e in eye]
    m = np.stack(cols, axis=1)
    if m.shape != (n_out, n_in):
        raise InputError(f"resampling {n_in} voxels to {n_out} gave {m.shape[0]}")
    m.setflags(write=False)
    return m


def _rows(block: np.ndarray, weights: np.ndarray, axis: int) -> np.ndarray:
    """``weights`` (out, in) applied along ``axis`` of ``block``, in float64."""
    y = np.tensordot(weights, block.astype(np.float64, copy=False), axes=([1], [axis]))
    return np.ascontiguousarray(np.moveaxis(y, 0, axis))


def along_axis(x: da.Array, axis: int, out_chunks, reads, fn, kwargs, dtype) -> da.Array:
    """``x`` mapped along ``axis`` one output chunk at a time (sides ``out_chunks``):
    the chunk [o0, o1) is ``fn(block, **kwargs(o0, o1, j0, j1))`` of the input rows
    [j0, j1) = ``reads(o0, o1)`` it needs, gathered into one block along the axis. The
    lazy skeleton of a separable resampling (nnU-Net's here, `volarray.tta`'s linear
    one)."""
    pieces, o0 = [], 0
    for side in out_chunks:
        o1 = o0 + side
        j0, j1 = reads(o0, o1)
        part = x[(slice(None),) * axis + (slice(j0, j1),)].rechunk({axis: j1 - j0})
        chunks = part.chunks[:axis] + ((side,),) + part.chunks[axis + 1:]
        pieces.append(part.map_blocks(fn, chunks=chunks, dtype=dtype,
                                      **kwargs(o0, o1, j0, j1)))
        o0 = o1
    return da.concatenate(pieces, axis=axis)


def resample_axis(x: da.Array, axis: int, n_out: int, order: int, separate: bool = False,
                  chunk: int = 64) -> da.Array:
    """``x`` (any dimensions) resampled along ``axis`` to ``n_out`` voxels, float64, one
    dask piece per output chunk of ``chunk`` voxels along the axis; each piece reads the
    input voxels whose weights are not negligible (its kernel)."""
    m = axis_matrix(x.shape[axis], n_out, order, separate)

    def reads(o0, o1):
        used = np.flatnonzero((np.abs(m[o0:o1]) > NEGLIGIBLE).any(axis=0))
        return (int(used[0]), int(used[-1]) + 1) if used.size else (0, 1)
    sides = [min(chunk, n_out - o) for o in range(0, n_out, chunk)]
    return along_axis(x, axis, sides, reads, _rows,
                      lambda o0, o1, j0, j1: {"weights": m[o0:o1, j0:j1], "axis": axis},
                      np.float64)


def resample(x: da.Array, shape, spacing, new_spacing, scheme: Scheme = Scheme(),
             chunk: int = 64, eager: bool = True) -> da.Array:
    """``x`` (C, Z, Y, X) as nnU-Net's ``resample_data_or_seg_to_shape(x, shape, spacing,
    new_spacing, **scheme)`` makes it, lazily: a dask array of ``shape`` (spatial) and
    ``x``'s dtype, chunked ``chunk`` per spatial axis. ``x`` unchanged when its shape is
    ``shape`` (nnU-Net does not touch it then). For order > 1 the clip to the input's
    range needs its minimum and maximum per channel (per slice of the separate axis):
    computed here, one pass over ``x`` (``eager=False``: when the result is, which
    holds ``x`` until every output chunk is done; for a network's logits, which are not
    computed twice)."""
    shape = tuple(int(n) for n in shape)
    old = tuple(x.shape[1:])
    if old == shape:
        return x
    if min(shape) < 1:
        raise InputError(f"resampling {old} from spacing {tuple(spacing)} to "
                         f"{tuple(new_spacing)} gives the empty shape {shape}; check spacing=",
                         parameter="spacing")
    sep = separate_axis(spacing, new_spacing, scheme.force_separate_z, scheme.threshold)
    plane = [a for a in range(3) if a != sep]
    y = x.rechunk((-1,) + (chunk,) * 3)
    limits = None
    if scheme.order > 1 and any(shape[a] != old[a] for a in plane):
        # resize clips to the range of what it resized (order <= 1 cannot leave it)
        lo, hi = (f(y, axis=tuple(a + 1 for a in plane), keepdims=True)
                  for f in (da.min, da.max))
        limits = dask.compute(lo, hi) if eager else (lo, hi)
    # the passes that shrink the volume first: fewer voxels for the next ones
    for a in sorted(plane, key=lambda a: shape[a] / old[a]):
        if shape[a] != old[a]:
            y = resample_axis(y, a + 1, shape[a], scheme.order, chunk=chunk)
    if limits is not None:
        y = da.minimum(da.maximum(y, limits[0]), limits[1])
    if sep is not None and shape[sep] != old[sep]:
        y = resample_axis(y, sep + 1, shape[sep], scheme.order_z, separate=True, chunk=chunk)
    return y.astype(x.dtype)


@dataclass(frozen=True)
class Resampling:
    """A scan's way to an nnU-Net configuration's spacing and back, in the scan's axis
    order (the plans' ``transpose_forward`` undone): ``shape`` at ``spacing`` (the
    cropped scan) to ``new_shape`` at ``target`` with the plans' data scheme, and the
    logits back with their probabilities scheme, as nnU-Net's preprocessor and
    ``convert_predicted_logits_to_segmentation_with_correct_shape`` do."""
    shape: tuple
    spacing: tuple
    new_shape: tuple
    target: tuple
    data: Scheme
    back: Scheme

    @classmethod
    def for_configuration(cls, configuration: dict, transpose_forward, spacing,
                          shape) -> "Resampling":
        """``configuration``: the plans' configuration (its spacing in nnU-Net's
        transposed order); ``spacing`` and ``shape``: the scan's, in its own order."""
        spacing = check_spacing(spacing)
        backward = [int(i) for i in np.argsort(transpose_forward)]
        target = tuple(float(configuration["spacing"][backward[a]]) for a in range(3))
        data = Scheme.from_plans(configuration.get("resampling_fn_data", SUPPORTED),
                                 configuration.get("resampling_fn_data_kwargs"), "the data")
        back = Scheme.from_plans(
            configuration.get("resampling_fn_probabilities", SUPPORTED),
            configuration.get("resampling_fn_probabilities_kwargs", {"order": 1}),
            "the probabilities")
        shape = tuple(int(n) for n in shape)
        return cls(shape, spacing, compute_new_shape(shape, spacing, target), target, data,
                   back)

    def forward(self, x: da.Array, chunk: int = 64) -> da.Array:
        return resample(x, self.new_shape, self.spacing, self.target, self.data, chunk)

    def backward(self, logits: da.Array, chunk: int = 64) -> da.Array:
        return resample(logits, self.shape, self.target, self.spacing, self.back, chunk,
                        eager=False)


def raw_scan(volume, spacing=None, reverse_axes: bool | None = None, reader: str | None = None,
             open_path: bool = True):
    """``(volume, spacing, reverse)`` for `predict_nnunet`: a path opened
    (`volarray.io.open_volume`), ``spacing`` checked (None: not resampled), and whether
    the volume's axes are to be reversed to nnU-Net's order. A NIfTI scan (a path, or the
    DataArray `volarray.open_nifti` makes) is in the file's (i, j, k) voxel order, which
    nnU-Net's readers (SimpleITKIO, NibabelIO) see reversed, (k, j, i): by default its
    axes are reversed and its spacing is the header's voxel size. ``reader``: the plans'
    ``image_reader_writer`` (NibabelIOWithReorient reorients to RAS first: a scan in
    another orientation is refused). ``open_path=False``: a path is returned as it is."""
    import os

    from .formats.nifti import scan_header
    from .io import open_volume
    header = scan_header(volume)
    if open_path and isinstance(volume, (str, os.PathLike)):
        volume = open_volume(volume)
    if header is not None:
        spacing = header["spacing"] if spacing is None else spacing
        reverse_axes = True if reverse_axes is None else reverse_axes
        if reader == "NibabelIOWithReorient" and header["axcodes"] != ("R", "A", "S"):
            raise InputError(f"the plans read scans with {reader} (reoriented to RAS); this "
                             f"scan is {''.join(header['axcodes'])}: reorient it to RAS "
                             "(nibabel.as_closest_canonical) first", parameter="volume")
    spacing = None if spacing is None else check_spacing(spacing)
    return volume, spacing, bool(reverse_axes)
