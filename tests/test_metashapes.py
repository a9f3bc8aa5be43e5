"""`volarray.metashapes`: the shapes and dtypes torch's own meta kernels give, without
them (their first call imports torch._dynamo); None for forms it does not know."""
import operator

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from volarray.metashapes import shaped_call, shaped_method, shaped_module


def meta(*shape, dtype=torch.float32):
    return torch.empty(shape, dtype=dtype, device="meta")


x, col = meta(1, 4, 5, 6, 7), meta(1, 4, 1, 1, 1)
CALLS = [
    (operator.add, (x, x), {}), (operator.mul, (x, col), {}), (operator.mul, (col, x), {}),
    (operator.sub, (x, 2.5), {}), (operator.truediv, (x, 3), {}), (torch.add, (x, col), {}),
    (operator.add, (meta(1, 4, 5, 6, 7, dtype=torch.float16), x), {}),
    (torch.sigmoid, (x,), {}), (F.relu, (x,), {"inplace": False}),
    (F.leaky_relu, (x,), {"negative_slope": 0.2}), (torch.clamp, (x,), {"min": 0.0}),
    (F.interpolate, (x,), {"scale_factor": 2, "mode": "trilinear"}),
    (F.interpolate, (x,), {"scale_factor": 1.5}),
    (F.interpolate, (x, (9, 10, 11)), {}),
    (F.interpolate, (x,), {"size": torch.Size((3, 4, 5)), "mode": "trilinear",
                           "align_corners": False, "antialias": False}),
    (torch.mean, (x, (2, 3, 4)), {}), (torch.sum, (x,), {"dim": 1, "keepdim": True}),
    (torch.amax, (x, -1), {}),
]


@pytest.mark.parametrize("fn,args,kwargs", CALLS)
def test_calls_shape_as_torch_does(fn, args, kwargs):
    got, want = shaped_call(fn, args, kwargs), fn(*args, **kwargs)
    assert got is not None and got.is_meta
    assert (got.shape, got.dtype) == (want.shape, want.dtype)


@pytest.mark.parametrize("name,args,kwargs", [
    ("add", (x, col), {}), ("__rmul__", (x, 2), {}), ("sigmoid", (x,), {}),
    ("mean", (x,), {"dim": (2, 3, 4)}), ("mean", (x, (2, 3, 4), True), {}),
    ("sum", (x,), {}),
])
def test_methods_shape_as_torch_do(name, args, kwargs):
    got = shaped_method(name, args, kwargs)
    want = getattr(args[0], name)(*args[1:], **kwargs)
    assert got is not None and (got.shape, got.dtype) == (want.shape, want.dtype)


@pytest.mark.parametrize("module", [nn.ReLU(), nn.GELU(), nn.Sigmoid(), nn.Identity(),
                                    nn.Upsample(scale_factor=2), nn.Upsample(size=(6, 7, 8)),
                                    nn.Linear(7, 3)])
def test_modules_shape_as_torch_do(module):
    got, want = shaped_module(module, (x,), {}), module.to("meta")(x)
    assert got is not None and (got.shape, got.dtype) == (want.shape, want.dtype)


@pytest.mark.parametrize("fn,args,kwargs", [
    (operator.add, (x, torch.empty(())), {}),  # a 0-d tensor promotes as a number
    (operator.add, (meta(2, 3, dtype=torch.int64), 1), {}),  # integers: torch's rules
    (operator.add, (x, torch.zeros(1, 4, 5, 6, 7)), {}),  # a CPU constant: torch says so
    (operator.add, (x, meta(1, 3, 5, 6, 7)), {}),  # not broadcastable
    (operator.add, (x, "a"), {}),
    (F.interpolate, (x,), {}),  # neither size nor scale_factor
    (F.interpolate, (x,), {"size": 4, "scale_factor": 2}),  # both
    (torch.mean, (x,), {"dtype": torch.float64}),
    (torch.sum, (x, ()), {}), (torch.amax, (x,), {"dim": []}),  # torch: every dim
    (torch.add, (x, x), {"out": meta(2, 4, 5, 6, 7)}),  # torch resizes and casts to out
    (F.interpolate, (x,), {"scale_factor": object()}),
])
def test_other_forms_are_left_to_torch(fn, args, kwargs):
    assert shaped_call(fn, args, kwargs) is None


def test_in_place_methods_and_subclasses_are_left_to_torch():
    assert shaped_method("add_", (x, col), {}) is None

    class Scaled(nn.ReLU):  # a subclass may compute anything
        def forward(self, v):
            return super().forward(v)[..., :2]
    assert shaped_module(Scaled(), (x,), {}) is None
    assert shaped_module(nn.Linear(5, 3), (x,), {}) is None  # 7 features, not 5
    replaced = nn.ReLU()
    replaced.forward = lambda v: v[..., :2]
    assert shaped_module(replaced, (x,), {}) is None


def test_a_linear_is_shaped_by_its_weights():
    lin = nn.Linear(7, 3)
    lin.weight = nn.Parameter(torch.randn(5, 7))  # reassigned: out_features still says 3
    lin.bias = nn.Parameter(torch.randn(5))
    assert shaped_module(lin, (x,), {}).shape == (1, 4, 5, 6, 5)


def test_numpy_scales_and_sizes():
    import numpy as np
    for kwargs in ({"scale_factor": np.float32(1.5)}, {"scale_factor": np.int64(2)},
                   {"size": np.int64(9)}):
        got, want = shaped_call(F.interpolate, (x,), kwargs), F.interpolate(x, **kwargs)
        assert got.shape == want.shape, kwargs
