"""Bad input raises a VolarrayError naming the value and the fix."""
import numpy as np
import pytest
import torch
import torch.nn as nn

import volarray
from volarray.models import FaultSeg3D, seeded

from conftest import random_volume


@pytest.fixture(scope="module")
def model():
    return seeded(FaultSeg3D, width=4)


VOL = random_volume((16, 16, 16))


@pytest.mark.parametrize("chunks,needle", [(0, "non-positive"), ((8, -2, 8), "non-positive"),
                                           ((8, 8), "three ints"), ("big", "three ints")])
def test_bad_chunks(model, chunks, needle):
    with pytest.raises(volarray.InputError, match=needle):
        volarray.predict(model, VOL, chunks=chunks)


@pytest.mark.parametrize("shape", [(16, 16), (1, 1, 16, 16, 16)])
def test_wrong_ndim(model, shape):
    with pytest.raises(volarray.InputError, match=r"\(Z, Y, X\)"):
        volarray.predict(model, np.zeros(shape, np.float32))


def test_non_numeric_volume_is_refused_and_integers_are_cast(model):
    """Booleans are not a volume; integer volumes (CT stacks, int16 scans) are cast to
    float32 region by region and predicted as their float32 values would be."""
    with pytest.raises(volarray.InputError, match="dtype bool.*astype"):
        volarray.predict(model, np.zeros((16, 16, 16), bool))
    ints = np.random.default_rng(0).integers(-300, 300, (16, 16, 16)).astype(np.int16)
    got = volarray.predict(model, ints).compute()
    assert got.dtype == np.float32
    assert np.array_equal(got, volarray.predict(model, ints.astype(np.float32)).compute())


def test_not_an_array(model):
    with pytest.raises(volarray.InputError, match="list"):
        volarray.predict(model, [[1.0]])


@pytest.mark.parametrize("volume", [np.zeros((16, 16), np.float32), np.zeros((16,) * 3, bool),
                                    [[1.0]], np.zeros((0, 16, 16), np.float32),
                                    "no/such/survey.zarr", torch.zeros((16,) * 3, device="meta")],
                         ids=["2d", "bool", "list", "empty", "missing", "meta"])
def test_a_bad_volume_is_named_as_the_parameter_at_fault(model, volume):
    with pytest.raises(volarray.InputError) as e:
        volarray.predict(model, volume)
    assert e.value.parameter == "volume", e.value


def test_non_finite_values_are_named_as_the_volume(model):
    vol = np.zeros((16, 16, 16), np.float32)
    vol[3, 4, 5] = np.nan
    with pytest.raises(volarray.InputError, match=r"NaN at channel 0, voxel \(z, y, x\) = "
                                                  r"\(3, 4, 5\)") as e:
        volarray.predict(model, vol).compute()
    assert e.value.parameter == "volume"


def test_not_a_model():
    with pytest.raises(volarray.InputError, match="torch.nn.Module"):
        volarray.predict(lambda x: x, VOL)


def test_bad_mode_and_device(model):
    with pytest.raises(volarray.InputError, match="method='magic'"):
        volarray.predict(model, VOL, method="magic")
    with pytest.raises(volarray.InputError, match="blend: pass method='window', blend_mode="):
        volarray.predict(model, VOL, method="gaussian")  # MONAI's mode= is a blend
    with pytest.raises(volarray.InputError, match="device='tpu'"):
        volarray.predict(model, VOL, device="tpu")


def test_wrong_channel_count(model):
    with pytest.raises(volarray.TraceError, match=r"takes 1 input channel\(s\); the volume "
                                                  r"has 2 \(shape \(2, 16, 16, 16\)\)") as e:
        volarray.predict(model, random_volume((2, 16, 16, 16)))
    assert "\n" not in str(e.value)


class CumSum(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv3d(1, 2, 3, padding=1)

    def forward(self, x):
        return self.conv(x).cumsum(dim=2)


class Flatten(nn.Module):
    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Conv3d(1, 2, 3), nn.Flatten())

    def forward(self, x):
        return self.body(x)


class Branchy(nn.Module):
    def forward(self, x):
        if x.sum() > 0:  # data-dependent control flow: not traceable
            return x
        return -x


def test_unsupported_op_names_op_and_way_out():
    with pytest.raises(volarray.UnsupportedOpError, match=r"cumsum.*sliding window"):
        volarray.predict(CumSum().eval(), VOL)
    with pytest.raises(volarray.UnsupportedOpError, match=r"adaptive pooling to 2"):
        volarray.predict(nn.Sequential(nn.Conv3d(1, 2, 1), nn.AdaptiveAvgPool3d(2)).eval(), VOL)
    with pytest.raises(volarray.UnsupportedOpError, match=r"body\.1.*Flatten"):
        volarray.predict(Flatten().eval(), VOL)


def test_untraceable_model():
    with pytest.raises(volarray.TraceError, match="Branchy"):
        volarray.predict(Branchy().eval(), VOL)


def test_training_mode_batchnorm():
    m = nn.Sequential(nn.Conv3d(1, 2, 3), nn.BatchNorm3d(2))
    with pytest.raises(volarray.InputError, match=r"training mode.*'1'.*model.eval\(\)"):
        volarray.predict(m, VOL)


def test_memory_budget_validation(model):
    plan = volarray.plan(model, VOL, chunks=16)
    assert plan.validate("1GB") is plan
    with pytest.raises(volarray.MemoryBudgetError, match="memory_limit=.*smaller chunks"):
        plan.validate("100kB")
    with pytest.raises(volarray.MemoryBudgetError, match=r"smallest chunks.*memory_limit >="):
        volarray.plan(model, VOL, memory_limit="1kB").validate()
    with pytest.raises(volarray.InputError, match="memory_limit='lots'"):
        volarray.plan(model, VOL, memory_limit="lots")


def test_errors_are_volarray_errors():
    for cls in (volarray.InputError, volarray.UnsupportedOpError, volarray.TraceError,
                volarray.MemoryBudgetError):
        assert issubclass(cls, volarray.VolarrayError)


def test_a_float64_model_is_refused_naming_its_dtype():
    """A double model: the message names the model's dtype and model.float(), not a
    compute_dtype= the user never passed."""
    import torch
    model = torch.nn.Conv3d(1, 1, 3, padding=1).double().eval()
    with pytest.raises(volarray.InputError, match=r"weights are torch.float64.*model.float\(\)") \
            as e:
        volarray.predict(model, np.zeros((8, 8, 8), np.float32))
    assert e.value.parameter == "model"
