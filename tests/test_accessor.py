import dask.array as da
import numpy as np
import pytest
import xarray as xr

import volarray
from volarray.models import FaultSeg3D, MultiScaleNet, seeded
from volarray.testing import assert_volume_close

from conftest import random_volume, whole_volume


@pytest.fixture(scope="module")
def survey():
    vol = random_volume((16, 24, 32), seed=2)
    coords = {"depth": np.arange(16) * 4.0, "inline": np.arange(100, 124),
              "crossline": np.arange(32) * 2, "twt": ("depth", np.arange(16) * 3.0)}
    amp = xr.DataArray(da.from_array(vol, chunks=8), dims=("depth", "inline", "crossline"),
                       coords=coords, attrs={"units": "counts", "survey": "F3"},
                       name="amplitude")
    return xr.Dataset({"amplitude": amp, "other": ("inline", np.zeros(24))}), vol


def test_dataset_accessor(survey):
    ds, vol = survey
    model = seeded(FaultSeg3D, width=4)
    out = ds.volinfer.predict(model, var="amplitude", name="fault", chunks=8)
    assert isinstance(out.fault.data, da.Array)  # lazy
    assert out.fault.dims == ("depth", "inline", "crossline")  # one channel: squeezed
    np.testing.assert_array_equal(out.fault.inline, ds.inline)
    assert out.fault.attrs["survey"] == "F3" and "units" not in out.fault.attrs  # a quantity's
    assert out.fault.attrs["volarray_model"] == "FaultSeg3D"
    assert out.fault.attrs["volarray_version"] == volarray.__version__
    assert_volume_close(out.fault.values, whole_volume(model, vol)[0])
    direct = volarray.predict(model, vol, chunks=8).compute()[0]
    np.testing.assert_array_equal(out.fault.values, direct)
    assert "amplitude" in out and "other" in out


def test_dataarray_accessor_multiclass_and_dims(survey):
    ds, vol = survey
    model = seeded(MultiScaleNet)
    stacked = ds.amplitude.expand_dims(band=1).transpose("depth", "band", "inline", "crossline")
    out = stacked.volinfer.predict(model, dims=("depth", "inline", "crossline"), chunks=9)
    assert out.dims == ("class", "depth", "inline", "crossline") and out.sizes["class"] == 3
    assert isinstance(out.data, da.Array)
    assert_volume_close(out.values, whole_volume(model, vol))


def test_dataarray_result_is_named_with_its_coords_and_options(survey):
    """From a DataArray: named 'prediction' (or name=), every coordinate along the
    spatial dims kept (a two-way time beside depth), the input's units not (they are
    an amplitude's), and the options that make its values recorded."""
    ds, vol = survey
    model = seeded(FaultSeg3D, width=4)
    labels = ds.amplitude.volinfer.predict(model, chunks=8, threshold=0.5, tta="flips")
    assert labels.name == "prediction" and labels.dtype == np.uint8
    np.testing.assert_array_equal(labels.twt, ds.twt)
    assert "units" not in labels.attrs and labels.attrs["survey"] == "F3"
    assert labels.attrs["volarray_threshold"] == 0.5 and labels.attrs["volarray_tta"] == "flips"
    assert "volarray_ensemble" not in labels.attrs
    probs = ds.amplitude.volinfer.predict(model, chunks=8, name="fault")
    assert probs.name == "fault" and "volarray_threshold" not in probs.attrs
    assert_volume_close(probs.values, whole_volume(model, vol)[0])
    # of an earlier prediction: its own options are not carried over, nor its flags,
    # and a scalar coordinate is
    again = labels.assign_attrs(flag_values=[0, 1]).assign_coords(offset=250.0) \
        .astype(np.float32).volinfer.predict(model, chunks=8)
    assert not {"volarray_threshold", "volarray_tta", "flag_values"} & set(again.attrs)
    assert float(again.offset) == 250.0


def test_accessor_errors(survey):
    ds, _ = survey
    model = seeded(FaultSeg3D, width=4)
    with pytest.raises(volarray.InputError, match="var='nope'"):
        ds.volinfer.predict(model, var="nope")
    with pytest.raises(volarray.InputError, match="dims="):
        ds.amplitude.volinfer.predict(model, dims=("depth", "inline", "time"))
