"""Test-time augmentation beyond flips: torchseis's rotations (multi_angle) and
decimations (multi_resolution), merged by mean or max, composed with flips, out of core.
The reference is a plain-torch reimplementation of torchseis's FaultPipeline on the
whole array in memory; `test_equals_torchseis_fault_pipeline` compares to torchseis
itself where it is present (TORCHSEIS_PATH, as benchmarks/bench_gpu.py finds it)."""
import itertools
import os
import subprocess
import sys

import dask.array as da
import numpy as np
import pytest
import torch
import torch.nn.functional as F

import volarray
import volarray.cli
import volarray.predictors
from volarray.models import FaultSeg3D, seeded
from volarray.tta import passes, resample_linear

from conftest import random_volume


def small_model(seed=0):
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Conv3d(1, 4, 3, padding=1), torch.nn.ReLU(),
                               torch.nn.Conv3d(4, 2, 3, padding=1), torch.nn.Sigmoid()).eval()


def reference(model, vol, tta, merge="mean", multiple=None):
    """torchseis's definition on the whole array: each pass decimated by [::2] along one
    axis (multires; torchseis's seis[::2], seis[:, ::2], seis[:, :, ::2]), mirrored,
    turned by torch.rot90 in the last two axes, predicted, turned and mirrored back,
    interpolated back with F.interpolate(size=..., mode='trilinear'); merged by the
    mean or the maximum (np.maximum.reduce). ``multiple``: volarray's pad='zeros' (each
    resolution padded once at the far end to the multiple, then mirrored and turned, as
    `flips` pads; the prediction cropped back)."""
    x = torch.from_numpy(vol)[None, None]
    names = tta.split("+")
    outs = []
    for d in ([None, 2, 3, 4] if "multires" in names else [None]):
        xd = x if d is None else x[(slice(None),) * d + (slice(None, None, 2),)]
        shape = xd.shape[2:]
        if multiple is not None:
            pads = [(-n) % multiple for n in shape]
            xd = F.pad(xd, (0, pads[2], 0, pads[1], 0, pads[0]))
        for flips in (itertools.product((0, 1), repeat=3) if "flips" in names else [(0,) * 3]):
            dims = [2 + i for i, f in enumerate(flips) if f]
            for k in (range(4) if "rot90" in names else [0]):
                with torch.inference_mode():
                    y = model(torch.rot90(torch.flip(xd, dims), k, (3, 4)))
                y = torch.flip(torch.rot90(y, -k, (3, 4)), dims)
                y = y[..., :shape[0], :shape[1], :shape[2]]
                if d is not None:
                    y = F.interpolate(y, size=tuple(x.shape[2:]), mode="trilinear")
                outs.append(y[0].numpy())
    return np.maximum.reduce(outs) if merge == "max" else np.mean(outs, axis=0)


@pytest.mark.parametrize("size", [1, 2, 15, 16, 17])
def test_lazy_interpolation_back_equals_torch_interpolate(size):
    """Each decimated side ceil(n / 2) back to n, per axis, over uneven chunks; and the
    three axes in turn equal one trilinear F.interpolate (it is separable)."""
    rng = np.random.default_rng(size)
    small = (size + 1) // 2
    for axis in (1, 2, 3):
        shape = [2, 6, 7, 5]
        shape[axis] = small
        y = rng.standard_normal(shape).astype(np.float32)
        full = list(shape[1:])
        full[axis - 1] = size
        want = F.interpolate(torch.from_numpy(y)[None], size=tuple(full), mode="trilinear")[0]
        chunks = tuple(np.diff(np.unique(np.r_[0:size:3, size])))
        got = resample_linear(da.from_array(y, chunks=(1, 4, 3, 2)), axis, size, chunks)
        assert got.chunks[axis] == chunks
        np.testing.assert_allclose(got.compute(), want.numpy(), rtol=0, atol=2e-6)
    y = rng.standard_normal((1, small, 3, small + 1)).astype(np.float32)
    out = (size, 5, 2 * small + 1)
    got = da.from_array(y, chunks=(1, 2, 2, 3))
    for axis, n in zip((1, 2, 3), out):
        got = resample_linear(got, axis, n, (n,))
    want = F.interpolate(torch.from_numpy(y)[None], size=out, mode="trilinear")[0].numpy()
    np.testing.assert_allclose(got.compute(), want, rtol=0, atol=2e-6)


@pytest.mark.parametrize("tta,merge", [
    ("rot90", "max"), ("multires", "max"), ("multires", None), ("flips+multires", "mean")])
def test_equals_the_whole_array_reference_on_odd_shapes_and_uneven_chunks(tta, merge):
    model, vol = small_model(), random_volume((9, 6, 7), seed=4)
    y = volarray.predict(model, vol, tta=tta, merge=merge, chunks=(4, 4, 5))
    assert isinstance(y, da.Array) and y.shape == (2, 9, 6, 7)
    got = y.compute()
    np.testing.assert_allclose(got, reference(model, vol, tta, merge), rtol=0, atol=1e-5)


def test_multires_with_padding_and_a_unet():
    """A U-Net needing multiples of 8 on an odd volume: each resolution padded with
    zeros at the far end and cropped back (pad='zeros'), interpolated back, maximum."""
    model, vol = seeded(FaultSeg3D, width=2), random_volume((13, 10, 11), seed=5)
    got = volarray.predict(model, vol, tta="multires", merge="max", pad="zeros",
                           chunks=(8, 8, 16)).compute()
    want = reference(model, vol, "multires", "max", multiple=8)
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-5)


def test_window_mode_composes_too():
    model, vol = small_model(1), random_volume((9, 8, 8), seed=6)
    kw = dict(method="window", roi_size=(9, 8, 8), overlap=0.0, blend_mode="constant")
    got = volarray.predict(model, vol, tta="rot90", merge="max", **kw).compute()
    np.testing.assert_allclose(got, reference(model, vol, "rot90", "max"), rtol=0, atol=1e-5)


@pytest.fixture
def traces(monkeypatch):
    counts = []
    trace = volarray.predictors.trace

    def counted(model, shape, *a, **k):
        counts.append(tuple(shape))
        return trace(model, shape, *a, **k)
    monkeypatch.setattr(volarray.predictors, "trace", counted)
    return counts


@pytest.mark.parametrize("tta,shape,shapes", [
    ("flips+rot90", (6, 8, 8), 1),  # a square lateral plane: every pass has one shape
    ("rot90", (6, 8, 10), 2),       # turned by 90 degrees: (Z, X, Y)
    ("multires", (6, 8, 10), 4)])   # the volume and three decimations
def test_the_model_is_traced_once_per_input_shape(traces, tta, shape, shapes):
    y = volarray.predict(small_model(), random_volume(shape), tta=tta, chunks=4)
    assert len(traces) == len(set(traces)) == shapes
    y.compute()
    assert len(traces) == shapes


def test_passes_are_the_distinct_combinations():
    assert len(passes("rot90")) == 4 and len(passes("multires")) == 4
    assert len(passes("flips+rot90")) == 16  # a mirroring times a turn: 16 distinct maps
    assert len(passes("rot90+multires")) == 16 and len(passes("flips+multires")) == 32
    assert passes("rot90+flips") == passes("flips+rot90")
    assert passes("multires")[0] == (None, (), 0)  # the volume itself first


@pytest.mark.parametrize("kw,match", [
    ({"tta": "rot45"}, "tta='rot45'"), ({"tta": "rot90+rot90"}, "tta='rot90\\+rot90'"),
    ({"tta": ["flips"]}, "tta=\\['flips'\\]"), ({"tta": "rot90", "merge": "median"},
                                                "merge='median'"),
    ({"merge": "max"}, "no tta= is given")])
def test_bad_tta_or_merge_is_refused_naming_it(kw, match):
    with pytest.raises(volarray.InputError, match=match) as e:
        volarray.predict(small_model(), random_volume((6, 6, 6)), **kw)
    assert e.value.parameter in ("tta", "merge")


def test_accessor_and_predict_to_zarr_take_tta_and_merge(tmp_path):
    xr = pytest.importorskip("xarray")
    model, vol = small_model(), random_volume((7, 9, 8), seed=7)
    want = volarray.predict(model, vol, tta="multires", merge="max", chunks=4).compute()
    da_ = xr.DataArray(vol, dims=("z", "y", "x"))
    got = da_.volinfer.predict(model, tta="multires", merge="max", chunks=4)
    np.testing.assert_array_equal(got.values, want)
    out = volarray.predict_to_zarr(model, vol, str(tmp_path / "o.zarr"), tta="multires",
                                   merge="max", chunks=4)
    np.testing.assert_array_equal(out[...], want)


@pytest.mark.parametrize("in_process", [True, pytest.param(False, marks=pytest.mark.slow)],
                         ids=["in-process", "subprocess"])
def test_cli_runs_rot90_and_flips_with_max(tmp_path, monkeypatch, capsys, in_process):
    """The command line's --tta and --merge (in process by default; as users run it, in a
    subprocess, in the slow run)."""
    vol = random_volume((7, 6, 9), seed=8)
    np.save(tmp_path / "in.npy", vol)
    torch.save(small_model().state_dict(), tmp_path / "w.pt")
    (tmp_path / "tiny_tta_model.py").write_text(
        "import torch\n"
        "def make():\n"
        "    return torch.nn.Sequential(torch.nn.Conv3d(1, 4, 3, padding=1), torch.nn.ReLU(),\n"
        "        torch.nn.Conv3d(4, 2, 3, padding=1), torch.nn.Sigmoid())\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    run = ["predict", str(tmp_path / "in.npy"), str(tmp_path / "out.zarr"), "--model",
           "tiny_tta_model:make", "--weights", str(tmp_path / "w.pt"), "--quiet"]

    def cli(*flags):
        if in_process:
            try:
                return volarray.cli.main(run + list(flags)), capsys.readouterr().err
            except SystemExit as e:
                return e.code, capsys.readouterr().err
        root = os.path.dirname(os.path.dirname(volarray.__file__))
        env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path), root])}
        done = subprocess.run([sys.executable, "-m", "volarray.cli", *run, *flags], env=env,
                              capture_output=True, text=True, timeout=300)
        return done.returncode, done.stderr
    code, err = cli("--tta", "rot90+flips", "--merge", "max")
    assert code == 0, err
    import zarr
    got = zarr.open_group(str(tmp_path / "out.zarr"), mode="r")["prediction"][...]
    np.testing.assert_allclose(got, reference(small_model(), vol, "flips+rot90", "max"),
                               rtol=0, atol=1e-5)
    code, err = cli("--tta", "rot45", "--overwrite")
    assert code != 0 and "--tta" in err and "rot45" in err


# ---------------------------------------------------------------- torchseis itself
def torchseis():
    """torchseis's package from TORCHSEIS_PATH (or the path), skipped when absent; an
    import-only stand-in for triton while it imports, where there is none (its GPU
    kernels are not run; torch's compiler imports triton for real when it is present)."""
    if os.environ.get("TORCHSEIS_PATH"):
        sys.path.insert(0, os.environ["TORCHSEIS_PATH"])
    try:
        import triton  # noqa: F401
        stubbed = False
    except ImportError:
        import types
        stub, lang = types.ModuleType("triton"), types.ModuleType("triton.language")
        stub.jit = lambda f=None, **k: f if f else (lambda g: g)
        lang.constexpr, stub.language = int, lang
        sys.modules["triton"], sys.modules["triton.language"] = stub, lang
        stubbed = True
    try:
        return pytest.importorskip("torchseis")
    finally:
        if stubbed:
            del sys.modules["triton"], sys.modules["triton.language"]


@pytest.mark.slow
@pytest.mark.parametrize("mode,tta", [("multi_angle", "rot90"),
                                      ("multi_resolution", "multires")])
def test_equals_torchseis_fault_pipeline(mode, tta, capsys):
    """FaultPipeline(model)(x, infer_method=...) on its FaultSeg3d with seeded weights at
    64^3. torchseis takes (inline, crossline, time), z-scores each pass's input with its
    own mean and std, and gives its model (time, crossline, inline): volarray gets that
    volume, z-scored. The volume repeats each value of a 32^3 field 2x2x2, so that its
    decimations have its statistics (up to the n - 1 of torch's std) and torchseis's
    per-pass z-score is the one volarray applies; 64^3 needs no padding."""
    ts = torchseis()
    torch.manual_seed(0)
    model = ts.FaultSeg3d().eval()
    field = np.random.default_rng(0).standard_normal((32, 32, 32)).astype(np.float32)
    seis = field.repeat(2, 0).repeat(2, 1).repeat(2, 2)
    t = torch.from_numpy(seis)
    seis = ((t - t.mean()) / t.std()).numpy()
    want = ts.FaultPipeline(model)(seis, infer_method=mode)
    got = volarray.predict(model, seis.transpose(2, 1, 0), tta=tta, merge="max",
                           chunks=(24, 40, 64)).compute()[0].transpose(2, 1, 0)
    diff = float(np.abs(got - want).max())
    with capsys.disabled():
        print(f"\nvolarray tta={tta!r} merge='max' vs torchseis {mode}: max |diff| {diff:.2e}")
    assert diff <= 1e-5
