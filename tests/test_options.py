"""`predict`'s options in one object: every option known to it, the method-only table
consulted from one place, and the volume canonicalised once per call."""
import inspect
import sys

import numpy as np
import pytest
import zarr

import volarray
import volarray.io
from volarray.errors import InputError
from volarray.models import FaultSeg3D, seeded
from volarray.options import METHOD_ONLY, OPTION_NAMES, PredictOptions

from conftest import random_volume


@pytest.fixture(scope="module")
def model():
    return seeded(FaultSeg3D, width=4)


def test_every_option_of_predict_is_a_field_of_the_options_object():
    params = [p for p in inspect.signature(volarray.predict).parameters.values()
              if p.kind is p.KEYWORD_ONLY]
    assert tuple(p.name for p in params) == OPTION_NAMES
    defaults = PredictOptions()
    assert {p.name: p.default for p in params} == defaults.as_dict()
    # plan's options are predict's (scratch aside)
    plan_names = set(inspect.signature(volarray.plan).parameters) - {"model", "volume", "scratch"}
    assert plan_names <= set(OPTION_NAMES)


def test_exact_only_options_in_window_mode_are_refused_by_the_one_table(model, monkeypatch):
    volume = random_volume((16, 16, 16))
    values = {"memory_limit": "1GB", "keep": 0, "pad": "reflect", "compute_dtype": "float16",
              "strategy": "slab"}
    assert set(METHOD_ONLY["exact"]) == set(values)
    for name, value in values.items():
        with pytest.raises(InputError, match=f"^{name}=.* applies to method='exact'") as e:
            volarray.predict(model, volume, method="window", roi_size=16, **{name: value})
        assert e.value.parameter == name
    # the refusal reads the table: an option declared exact-only there is refused
    monkeypatch.setitem(METHOD_ONLY["exact"], "coords", "a reason given in the table")
    with pytest.raises(InputError, match=r"coords=True applies to method='exact' \(a reason "
                                         r"given in the table\)"):
        volarray.predict(model, volume, method="window", roi_size=16, coords=True)


@pytest.fixture
def canonicalisations(monkeypatch):
    """Every call of `as_dask_volume`, through whichever module's name for it."""
    calls = []
    real = volarray.io.as_dask_volume

    def counted(*args, **kwargs):
        calls.append(args[0])
        return real(*args, **kwargs)
    for mod in list(sys.modules.values()):
        if getattr(mod, "__name__", "").startswith("volarray") and \
                getattr(mod, "as_dask_volume", None) is real:
            monkeypatch.setattr(mod, "as_dask_volume", counted)
    return calls


@pytest.mark.parametrize("options", [{}, {"normalize": "zscore", "tta": "flips"},
                                     {"threshold": 0.5}])
def test_predict_to_zarr_canonicalises_the_volume_once(model, tmp_path, canonicalisations,
                                                       options):
    path = tmp_path / "in.zarr"
    zarr.create_array(str(path), shape=(16, 16, 16), chunks=(8, 8, 8), dtype="i2")[:] = \
        (random_volume((16, 16, 16)) * 100).astype(np.int16)
    volarray.predict_to_zarr(model, str(path), tmp_path / "out.zarr", scheduler="sync",
                             **options)
    assert len(canonicalisations) == 1


def test_predict_canonicalises_the_volume_once(model, canonicalisations):
    volarray.predict(model, random_volume((16, 16, 16)), tta="flips")
    assert len(canonicalisations) == 1


def test_a_four_dimensional_reader_is_seen_through_its_volume_source(model):
    """A 4-D float array straight from a field format's reader looks canonical, but its
    tasks read their regions only through a `VolumeSource`: `canonical` wraps it."""
    from volarray.readers import VolumeSource, lazy_array, source_of
    data = random_volume((2, 12, 14, 10))
    bare = lazy_array(data, ((2,), (6, 6), (7, 7), (10,)))
    assert not isinstance(source_of(bare), VolumeSource)
    made = volarray.io.canonical(bare)
    assert isinstance(source_of(made), VolumeSource)
    assert volarray.io.canonical(made) is made  # made once
    np.testing.assert_array_equal(made.compute(), data)
