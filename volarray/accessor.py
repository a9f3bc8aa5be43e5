"""xarray accessors: ``Dataset.volinfer`` and ``DataArray.volinfer`` (thin forwarders)."""
from __future__ import annotations

import xarray as xr

from .errors import InputError


def predict_dataarray(arr: xr.DataArray, model, *, dims=None, name=None,
                      channel_dim: str = "class", squeeze: bool = True, **kwargs) -> xr.DataArray:
    """``volarray.predict`` on a DataArray: spatial coordinates and attributes carry
    over; the result records the model, the mode and the volarray version."""
    from . import __version__
    from .api import predict
    if dims is None:
        if arr.ndim not in (3, 4):
            raise InputError(f"DataArray {arr.name!r} has dims {arr.dims}; pass dims= the three "
                             "spatial dims (a fourth is the channel)")
        dims = arr.dims[-3:]
    dims = tuple(dims)
    missing = [d for d in dims if d not in arr.dims]
    if len(dims) != 3 or missing:
        raise InputError(f"dims={dims!r} must name three dims of {arr.dims}")
    rest = [d for d in arr.dims if d not in dims]
    if len(rest) > 1:
        raise InputError(f"DataArray {arr.name!r} has dims {arr.dims}: besides the spatial "
                         f"{dims}, only one channel dim may remain, not {rest}")
    arr = arr.transpose(*(rest + list(dims)))
    y = predict(model, arr.data, **kwargs)
    coords = {d: arr.coords[d] for d in dims
              if d in arr.coords and arr.sizes[d] == y.shape[1 + dims.index(d)]}
    attrs = dict(arr.attrs, volarray_model=type(model).__name__,
                 volarray_mode=kwargs.get("mode", "exact"), volarray_version=__version__)
    if squeeze and y.shape[0] == 1:
        return xr.DataArray(y[0], dims=dims, coords=coords, attrs=attrs, name=name)
    return xr.DataArray(y, dims=(channel_dim,) + dims, coords=coords, attrs=attrs, name=name)


@xr.register_dataarray_accessor("volinfer")
class DataArrayAccessor:
    def __init__(self, obj: xr.DataArray):
        self._obj = obj

    def predict(self, model, **kwargs) -> xr.DataArray:
        """Lazy prediction as a DataArray; see `volarray.predict` for the arguments,
        plus ``dims=`` (the three spatial dims when there are more)."""
        return predict_dataarray(self._obj, model, **kwargs)


@xr.register_dataset_accessor("volinfer")
class DatasetAccessor:
    def __init__(self, obj: xr.Dataset):
        self._obj = obj

    def predict(self, model, *, var: str, name: str = "prediction", **kwargs) -> xr.Dataset:
        """The Dataset with a new lazy variable ``name``: the prediction of ``var``."""
        if var not in self._obj.data_vars:
            raise InputError(f"var={var!r} is not a variable of the Dataset; it has "
                             f"{list(self._obj.data_vars)}")
        kwargs.setdefault("channel_dim", f"{name}_class")
        out = predict_dataarray(self._obj[var], model, name=name, **kwargs)
        return self._obj.assign({name: out})
