"""xarray accessors: ``Dataset.volinfer`` and ``DataArray.volinfer`` (thin forwarders)."""
from __future__ import annotations

import xarray as xr

from .api import prediction
from .errors import InputError
from .options import PredictOptions, output_attrs
from .predictors import MeanStd

# attributes that describe the input's quantity or its packing, not a prediction of it:
# not carried over (an amplitude's units on fault probabilities, an int16 survey's
# scale_factor on float32 scores would be wrong)
QUANTITY_ATTRS = ("units", "long_name", "standard_name", "valid_range", "valid_min",
                  "valid_max", "_FillValue", "missing_value", "scale_factor", "add_offset",
                  "_Unsigned", "actual_range", "flag_values", "flag_meanings", "flag_masks",
                  "cell_methods", "ancillary_variables", "segy_sample_format")


def carried_attrs(arr: xr.DataArray, model, options) -> dict:
    """The input's attributes but those of its quantity and an earlier prediction's own
    (``volarray_*``: its options are not this run's), then volarray's own."""
    kept = {k: v for k, v in arr.attrs.items()
            if k not in QUANTITY_ATTRS and not k.startswith("volarray_")}
    return dict(kept, **output_attrs(model, options, prefix="volarray_"))


def spatial_coords(arr: xr.DataArray, dims, shape) -> dict:
    """The coordinates of ``arr`` along the spatial ``dims`` only (index coordinates and
    others, like a two-way time beside depth) whose sizes the output ``shape`` keeps,
    and its scalar ones (an offset selected by ``.sel``)."""
    size = dict(zip(dims, shape))
    return {c: v for c, v in arr.coords.items()
            if set(v.dims) <= set(dims) and all(arr.sizes[d] == size[d] for d in v.dims)}


def predict_dataarray(arr: xr.DataArray, model, *, dims=None, name=None,
                      channel_dim: str = "class", squeeze: bool = True, **kwargs):
    """``volarray.predict`` on a DataArray: spatial coordinates and the attributes that
    do not describe the input's quantity (`QUANTITY_ATTRS`) carry over; the result
    records the model, the method and the volarray version, and is named ``name``
    (by default ``prediction``).

    The model sees the spatial dims in the DataArray's own order, or in the order
    ``dims=`` names them; nothing else reorders them. A fourth dim is the channel
    (the first dim when ``dims=`` is not given). Labels (``output="argmax"`` or
    ``threshold=``) come back with the spatial dims only; ``ensemble=`` gives a
    ``(mean, std)`` pair of DataArrays, as `predict` does."""
    if dims is None:
        if arr.ndim not in (3, 4):
            raise InputError(f"DataArray {arr.name!r} has dims {arr.dims}; pass dims= the three "
                             "spatial dims (a fourth is the channel)")
        dims = arr.dims[-3:]
    dims = tuple(dims)
    missing = [d for d in dims if d not in arr.dims]
    if len(dims) != 3 or missing or len(set(dims)) != 3:
        raise InputError(f"dims={dims!r} must name three different dims of {arr.dims}")
    rest = [d for d in arr.dims if d not in dims]
    if len(rest) > 1:
        raise InputError(f"DataArray {arr.name!r} has dims {arr.dims}: besides the spatial "
                         f"{dims}, only one channel dim may remain, not {rest}")
    arr = arr.transpose(*(rest + list(dims)))
    mask = kwargs.get("mask")
    if type(mask).__name__ == "DataArray":  # in the volume's dims order
        kwargs["mask"] = mask.transpose(*dims) if set(mask.dims) == set(dims) else mask
    options = PredictOptions(**kwargs)  # once: the run's and the attributes'
    y, options = prediction(model, arr, options)  # normalization resolved once
    attrs = carried_attrs(arr, model, options)

    def wrap(a, suffix=""):
        coords = spatial_coords(arr, dims, a.shape[-3:])
        label = f"{name or 'prediction'}{suffix}"
        if a.ndim == 3:  # labels
            return xr.DataArray(a, dims=dims, coords=coords, attrs=attrs, name=label)
        if squeeze and a.shape[0] == 1:
            return xr.DataArray(a[0], dims=dims, coords=coords, attrs=attrs, name=label)
        return xr.DataArray(a, dims=(channel_dim,) + dims, coords=coords, attrs=attrs,
                            name=label)
    if isinstance(y, tuple):  # ensemble
        return MeanStd(wrap(y.mean, "_mean"), wrap(y.std, "_std"))
    return wrap(y)


@xr.register_dataarray_accessor("volinfer")
class DataArrayAccessor:
    def __init__(self, obj: xr.DataArray):
        self._obj = obj

    def predict(self, model, **kwargs):
        """Lazy prediction as a DataArray (a ``(mean, std)`` pair with ``ensemble=``);
        see `volarray.predict` for the arguments, plus ``dims=`` (the three spatial
        dims, in the order the model expects them)."""
        return predict_dataarray(self._obj, model, **kwargs)


@xr.register_dataset_accessor("volinfer")
class DatasetAccessor:
    def __init__(self, obj: xr.Dataset):
        self._obj = obj

    def predict(self, model, *, var: str | None = None, name: str = "prediction",
                **kwargs) -> xr.Dataset:
        """The Dataset with a new lazy variable ``name``: the prediction of ``var``
        (two variables ``<name>_mean`` and ``<name>_std`` with ``ensemble=``).
        ``mask=`` may name a boolean variable of the Dataset."""
        if var is None:
            volumes = [n for n, v in self._obj.data_vars.items() if v.ndim in (3, 4)]
            raise InputError(f"Dataset.volinfer.predict needs var=, the name of the variable "
                             f"to predict: the Dataset has {list(self._obj.data_vars)}"
                             + (f", e.g. var={volumes[0]!r}" if volumes else ""),
                             parameter="var")
        if var not in self._obj.data_vars:
            raise InputError(f"var={var!r} is not a variable of the Dataset; it has "
                             f"{list(self._obj.data_vars)}")
        kwargs.setdefault("channel_dim", f"{name}_class")
        mask = kwargs.get("mask")
        if isinstance(mask, str) and mask in self._obj.data_vars:  # a variable's name
            kwargs["mask"] = self._obj[mask]
        taken = [n for n in (name, f"{name}_mean", f"{name}_std") if n in self._obj.variables]
        if taken:
            raise InputError(f"name={name!r}: the Dataset already has {taken}; pass a new name "
                             "for the prediction (the input stays as it is)")
        out = predict_dataarray(self._obj[var], model, name=name, **kwargs)
        if isinstance(out, tuple):
            return self._obj.assign({a.name: a for a in out})
        return self._obj.assign({name: out})
