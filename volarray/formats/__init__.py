"""The field's file formats, each through the library its field uses (optional extras):
SEG-Y (segyio) and MDIO for seismic, NIfTI (nibabel) for medical scans, TIFF stacks
(tifffile) for micro-CT. Each opens lazily as an ``xarray.DataArray`` in the file's own
axis order, with the field's coordinates; `predict`, the accessor and the CLI take it
as it is, and tasks read their regions straight from the file."""
from __future__ import annotations

import os

from ..errors import InputError
from . import nifti, segy, tiff

READERS = {"segy": segy.open_segy, "nifti": nifti.open_nifti, "tiff": tiff.open_tiff}


def format_of(path) -> str | None:
    """'segy', 'nifti', 'tiff' or 'mdio' for a path of that kind (a folder of TIFF
    slices is 'tiff'), else None (zarr, .npy)."""
    path = os.fspath(path).rstrip("/")
    lower = path.lower()
    if lower.endswith(segy.SUFFIXES):
        return "segy"
    if lower.endswith(nifti.SUFFIXES):
        return "nifti"
    if lower.endswith(tiff.SUFFIXES):
        return "tiff"
    if lower.endswith(".mdio"):
        return "mdio"
    if os.path.isdir(path) and not any(os.path.exists(os.path.join(path, m)) for m in (
            "zarr.json", ".zarray", ".zgroup")) and any(
            n.lower().endswith(tiff.SUFFIXES) for n in os.listdir(path)):
        return "tiff"
    return None


def open_dataarray(path, **options):
    """A SEG-Y, MDIO, NIfTI or TIFF volume at ``path`` as a lazy ``xarray.DataArray``
    with the field's coordinates; ``options`` go to the format's reader
    (`segy.open_segy`, `open_mdio`, `nifti.open_nifti`, `tiff.open_tiff`)."""
    kind = format_of(path)
    if kind is None:
        raise InputError(f"{os.fspath(path)!r} is not a SEG-Y (.sgy, .segy), MDIO (.mdio), "
                         "NIfTI (.nii, .nii.gz) or TIFF (.tif, .tiff, a folder of them) volume; "
                         "zarr arrays and .npy files open with zarr and numpy")
    if kind == "mdio":
        return open_mdio(path, **options)
    return READERS[kind](path, **options)


def open_zarr_dataset(path):
    """The stored values of a zarr Dataset, through its consolidated metadata where it has
    them (one read), else array by array (MDIO v1 stores written by multidimio have none)."""
    import xarray as xr
    try:
        return xr.open_zarr(path, chunks={}, mask_and_scale=False, consolidated=True)
    except (KeyError, ValueError, FileNotFoundError):
        return xr.open_zarr(path, chunks={}, mask_and_scale=False, consolidated=False)


def open_mdio(path, *, var: str | None = None, chunks=None):
    """An MDIO v1 seismic store (a zarr store laid out as an xarray Dataset: ``amplitude``
    over inline, crossline and time or depth, with their coordinates) as a lazy
    ``xarray.DataArray``, through ``mdio.open_mdio`` when multidimio is installed, else
    through xarray's zarr reader, which reads the same layout."""
    import xarray as xr
    path = os.fspath(path)
    try:
        import mdio
        ds = mdio.open_mdio(path)
    except ImportError:
        try:
            ds = open_zarr_dataset(path)
        except Exception as e:
            raise InputError(f"{path!r} is not a readable MDIO v1 store ({e})") from None
    names = [n for n in ds.data_vars if ds[n].ndim == 3]
    var = var or ("amplitude" if "amplitude" in names else (names[0] if len(names) == 1
                                                            else None))
    if var not in names:
        raise InputError(f"{path!r}: pass var= one of its 3-D variables {names}",
                         parameter="var")
    arr = ds[var]
    if "trace_mask" in ds and ds["trace_mask"].dims == arr.dims[:2]:  # the live traces,
        arr = arr.assign_coords(trace_mask=ds["trace_mask"])  # predict's default mask
    if not hasattr(arr.data, "dask"):  # never the whole survey in memory
        arr = arr.chunk({})
    if chunks is not None:
        arr = arr.chunk(dict(zip(arr.dims, chunks)))
    return arr.assign_attrs(source=path, format="mdio")


def output_format(target, fmt: str | None = None) -> str:
    """The format of an output: ``fmt`` when given, else from the target's suffix
    (.nii/.nii.gz NIfTI, .sgy/.segy SEG-Y), else zarr."""
    if fmt is not None:
        return fmt
    lower = os.fspath(target).lower()
    if lower.endswith(nifti.SUFFIXES):
        return "nifti"
    if lower.endswith(segy.SUFFIXES):
        return "segy"
    return "zarr"


def export_prediction(result, target, fmt: str, *, like=None, overwrite: bool = False,
                      check_only: bool = False):
    """A prediction (a zarr array of (C, ...) scores or (...) labels) written as a NIfTI
    file with the input's affine, a SEG-Y file with the input's headers, or a folder
    of TIFF slices. ``check_only``: only refuse, before a run, a target that could not
    be written."""
    from .common import unused_target
    if fmt not in ("nifti", "segy", "tiff"):
        raise InputError(f"format={fmt!r} is not zarr, nifti, segy or tiff", parameter='format')
    if fmt == "segy" and (like is None or format_of(like) != "segy"):
        raise InputError(f"output {os.fspath(target)!r}: a SEG-Y output takes its geometry and "
                         "headers from a SEG-Y input; write zarr or NIfTI for this input")
    if check_only:
        if isinstance(like, (str, os.PathLike)):
            _not_the_input(target, like)
        if fmt == "tiff":
            tiff.check_folder(target, overwrite)
        else:
            unused_target(target, overwrite, lambda path: written_by_volarray(path, fmt))
            if fmt == "nifti" and not os.fspath(target).endswith(nifti.SUFFIXES):
                raise InputError(f"output {os.fspath(target)!r}: a NIfTI file name ends with "
                                 ".nii or .nii.gz")
        return None
    import dask.array as da
    data = _one_channel(result if isinstance(result, da.Array) else da.from_zarr(result), fmt)
    if fmt == "nifti":
        like = like if like is not None and format_of(like) == "nifti" else None
        return nifti.write_nifti(data, target, like=like, overwrite=overwrite)
    if fmt == "segy":
        return segy.write_segy(data, target, like=like, overwrite=overwrite)
    return tiff.write_tiff(data, target, overwrite=overwrite)


def written_by_volarray(target, fmt: str) -> bool:
    """Whether the export ``target`` of format ``fmt`` carries volarray's mark (a TIFF
    stack is a folder: `tiff.check_folder` replaces only its own slices)."""
    marked = {"nifti": nifti.written_by_volarray, "segy": segy.written_by_volarray}.get(fmt)
    return marked is None or marked(target)


def _not_the_input(target, source) -> None:
    """An export never replaces its input, nor a folder that holds it, whatever
    ``overwrite`` says."""
    t = os.path.realpath(os.fspath(target))
    s = os.path.realpath(os.fspath(source))
    if t == s or s.startswith(t.rstrip(os.sep) + os.sep):
        raise InputError(f"output {os.fspath(target)!r} is the input {os.fspath(source)!r} or "
                         "a folder that holds it; pass another path for the prediction")


def _one_channel(result, fmt: str):
    """Labels as they are; scores of one channel without their channel axis (SEG-Y and
    TIFF hold one value per voxel; NIfTI takes several channels as a 4th dim)."""
    if result.ndim == 3 or fmt == "nifti" and result.shape[0] > 1:
        return result
    if result.shape[0] != 1:
        raise InputError(f"the prediction has {result.shape[0]} channels; a {fmt} output holds "
                         "one: pass --channels C (or output argmax labels)")
    return result[0]
