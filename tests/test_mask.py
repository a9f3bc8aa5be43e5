"""mask=: output chunks wholly outside the mask are never computed and hold the fill value;
inside the mask the result is bitwise the unmasked one (exact and window mode, barriers,
labels, the accessor, SEG-Y footprints, the command line)."""
import subprocess
import sys

import dask
import numpy as np
import pytest
import torch
import xarray as xr
from torch import nn

import volarray
from volarray.worker import ModelRunner
from volarray.window import WindowRunner


def tiny(norm: bool = False, classes: int = 1) -> nn.Module:
    torch.manual_seed(0)
    layers = [nn.Conv3d(1, 4, 3, padding=1)]
    layers += [nn.InstanceNorm3d(4, affine=True)] if norm else []
    layers += [nn.ReLU(), nn.MaxPool3d(2), nn.Conv3d(4, 4, 3, padding=1), nn.ReLU(),
               nn.Upsample(scale_factor=2), nn.Conv3d(4, classes, 3, padding=1)]
    return nn.Sequential(*layers).eval()


def volume(shape=(34, 40, 46), seed=0):
    return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


def irregular_mask(shape):
    """A survey-like footprint: the far y-x corner dead on every z, and a live island."""
    m = np.ones(shape, bool)
    y, x = np.ogrid[:shape[1], :shape[2]]
    m[:, (y + x) > (shape[1] + shape[2]) * 0.55] = False
    m[:, shape[1] - 6:, 3:9] = True
    return m


@pytest.fixture
def counted(monkeypatch):
    """Boxes of the tile tasks and windows that ran."""
    boxes = []
    run, window = ModelRunner.run, WindowRunner.run
    monkeypatch.setattr(ModelRunner, "run", lambda self, stage, box, *a, **k: (
        boxes.append(("tile", stage, box)) or run(self, stage, box, *a, **k)))
    monkeypatch.setattr(WindowRunner, "run", lambda self, x, *a, **k: (
        boxes.append(("window",) + tuple(a)) or window(self, x, *a, **k)))
    return boxes


@pytest.mark.parametrize("scheduler", ["threads", "sync"])
def test_exact_bitwise_inside_fill_outside_dead_chunks_never_run(scheduler, counted):
    model, vol = tiny(), volume()
    mask = irregular_mask(vol.shape)
    chunks = (16, 12, 20)  # uneven against the odd shape
    full = volarray.predict(model, vol, chunks=chunks, pad="zeros").compute(
        scheduler=scheduler)
    ran_full = len(counted)
    counted.clear()
    y = volarray.predict(model, vol, chunks=chunks, pad="zeros", mask=mask, mask_fill=-1.0)
    got = y.compute(scheduler=scheduler)
    assert np.array_equal(got[:, mask], full[:, mask])
    assert (got[:, ~mask] == -1).all()
    out = [b for kind, stage, b in counted if stage == max(s for _, s, _ in counted)]
    assert len(counted) < ran_full
    for box in out:  # every output tile that ran touches the mask (padded to 48)
        assert mask[tuple(slice(a, min(b, n)) for a, b, n in
                          zip(box.lo, box.hi, vol.shape))].any()


def test_plan_counts_the_skipped_tasks():
    model, vol = tiny(), volume((32, 40, 48))
    mask = np.zeros(vol.shape, bool)
    mask[:, :16] = True
    p = volarray.plan(model, vol, chunks=(16, 8, 16), mask=mask)
    assert p.skipped_tasks > 0 and "skipped by the mask" in str(p)
    assert "of 30 output chunks lie wholly outside" in str(p)
    assert volarray.plan(model, vol, chunks=(16, 8, 16)).skipped_tasks == 0


def test_barrier_statistics_stay_the_whole_volumes(counted):
    """InstanceNorm: the statistics read every chunk, so the result inside the mask is
    the unmasked one; only the last stage's dead tiles are skipped."""
    model, vol = tiny(norm=True), volume((32, 32, 40), seed=1)
    mask = np.zeros(vol.shape, bool)
    mask[:, :, :12] = True
    full = volarray.predict(model, vol, chunks=16).compute()
    got = volarray.predict(model, vol, chunks=16, mask=mask).compute()
    assert np.array_equal(got[:, mask], full[:, mask]) and (got[:, ~mask] == 0).all()
    with torch.no_grad():
        whole = model(torch.from_numpy(vol)[None, None])[0].numpy()
    assert np.abs(got[:, mask] - whole[:, mask]).max() < 1e-5
    p = volarray.plan(model, vol, chunks=16, mask=mask)
    assert p.skipped_tasks > 0 and "stats" not in p.notes[-1].split("(")[-1]


def test_labels_nonzero_and_dask_mask():
    """mask='nonzero' on a CT-like volume with an air border; labels filled with the
    background; a dask mask works the same as a numpy one."""
    model, vol = tiny(classes=3), volume((36, 36, 36), seed=2)
    vol[:, :, :10] = 0
    vol[:, :8] = 0
    air = (vol == 0)
    full = volarray.predict(model, vol, chunks=12, output="argmax").compute()
    got = volarray.predict(model, vol, chunks=12, output="argmax", mask="nonzero",
                           mask_fill=7).compute()
    assert got.dtype == np.uint8
    assert np.array_equal(got[~air], full[~air]) and (got[air] == 7).all()
    m = dask.array.from_array(~air, chunks=(10, 20, 36))
    again = volarray.predict(model, vol, chunks=12, output="argmax", mask=m).compute()
    assert np.array_equal(again[~air], full[~air]) and (again[air] == 0).all()


def test_window_mode_skips_windows_outside(counted):
    model, vol = tiny(), volume((32, 40, 40), seed=3)
    mask = np.zeros(vol.shape, bool)
    mask[:, :12, :14] = True
    kw = dict(method="window", roi_size=16, overlap=0.25, chunks=16)
    full = volarray.predict(model, vol, **kw).compute()
    windows = len(counted)
    counted.clear()
    got = volarray.predict(model, vol, mask=mask, **kw).compute()
    assert np.array_equal(got[:, mask], full[:, mask]) and (got[:, ~mask] == 0).all()
    assert 0 < len(counted) < windows / 2


def test_bad_masks_refused():
    model, vol = tiny(), volume((16, 16, 16))
    with pytest.raises(volarray.InputError, match=r"\(16, 16, 8\).*\(16, 16, 16\)"):
        volarray.predict(model, vol, mask=np.ones((16, 16, 8), bool))
    with pytest.raises(volarray.InputError, match="dtype float32"):
        volarray.predict(model, vol, mask=np.ones((16, 16, 16), np.float32))
    with pytest.raises(volarray.InputError, match="mask=True"):
        volarray.predict(model, vol, mask=True)
    with pytest.raises(volarray.InputError, match="footprint"):
        volarray.predict(model, vol, mask="footprint")
    with pytest.raises(volarray.InputError, match="mask_fill"):
        volarray.predict(model, vol, mask="nonzero", output="argmax", mask_fill=0.5)
    with pytest.raises(volarray.InputError, match="mask_fill"):
        volarray.predict(model, vol, mask="nonzero", mask_fill="x")


def test_accessor_takes_a_variable_name():
    model, vol = tiny(), volume((16, 24, 24), seed=4)
    mask = irregular_mask(vol.shape)
    ds = xr.Dataset({"amp": (("x", "y", "z"), vol), "live": (("x", "y", "z"), mask)})
    out = ds.volinfer.predict(model, var="amp", name="p", mask="live", chunks=8)
    full = volarray.predict(model, vol, chunks=8).compute()[0]
    assert np.array_equal(out.p.values[mask], full[mask]) and (out.p.values[~mask] == 0).all()


def write_survey(path, cube, live):
    """An inline-sorted SEG-Y whose dead (inline, crossline) positions have no trace."""
    segyio = pytest.importorskip("segyio")
    spec = segyio.spec()
    spec.sorting, spec.format, spec.tracecount = 2, 5, int(live.sum())
    spec.samples = np.arange(cube.shape[2]) * 4.0
    with segyio.create(str(path), spec) as f:
        tr = 0
        for i, j in zip(*np.nonzero(live)):
            f.header[tr] = {segyio.su.iline: 100 + 2 * i, segyio.su.xline: 300 + j,
                            segyio.su.offset: 1}
            f.trace[tr] = cube[i, j]
            tr += 1
        f.bin.update(hns=cube.shape[2], format=5, hdt=4000)


def test_segy_with_missing_traces_masked_by_its_footprint(tmp_path):
    cube = volume((24, 20, 16), seed=5)
    live = irregular_mask((1,) + cube.shape[:2])[0]  # over (inline, crossline)
    write_survey(tmp_path / "s.sgy", cube, live)
    cube[~live] = 0
    amp = volarray.formats.open_dataarray(tmp_path / "s.sgy", chunks=(8, 10, 16))
    assert amp.shape == cube.shape and np.array_equal(amp.values, cube)
    assert np.array_equal(amp.trace_mask.values, live)
    model = tiny()
    got = amp.volinfer.predict(model, chunks=8).values  # the footprint by default
    full = volarray.predict(model, cube, chunks=8).compute()[0]
    assert np.array_equal(got[live], full[live]) and (got[~live] == 0).all() and \
        (full[~live] != 0).any()
    off = amp.volinfer.predict(model, chunks=8, mask=None).values
    assert np.array_equal(off, full)


def test_cli_mask(tmp_path, capsys):
    """volarray predict --mask PATH and volarray plan --mask in a subprocess."""
    vol = volume((16, 24, 24), seed=6)
    mask = irregular_mask(vol.shape)
    np.save(tmp_path / "v.npy", vol)
    np.save(tmp_path / "m.npy", mask)
    (tmp_path / "tinymodel.py").write_text(
        "import sys\nsys.path.insert(0, %r)\nfrom test_mask import tiny\n" %
        str(__import__("os").path.dirname(__file__)))
    run = [sys.executable, "-m", "volarray.cli"]
    res = subprocess.run(run + ["predict", "v.npy", "o.zarr", "--model", "tinymodel:tiny",
                                "--chunks", "8", "--mask", "m.npy", "--mask-fill", "-2",
                                "--quiet"], cwd=tmp_path, capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    got = xr.open_zarr(tmp_path / "o.zarr", consolidated=False)["prediction"].values[0]
    full = volarray.predict(tiny(), vol, chunks=8).compute()[0]
    assert np.array_equal(got[mask], full[mask]) and (got[~mask] == -2).all()
    sys.path.insert(0, str(tmp_path))  # volarray plan, in this process
    try:
        from volarray.cli import main
        assert main(["plan", str(tmp_path / "v.npy"), "--model", "tinymodel:tiny", "--chunks",
                     "8", "--mask", str(tmp_path / "m.npy")]) == 0
    finally:
        sys.path.remove(str(tmp_path))
    assert "skipped by the mask" in capsys.readouterr().out


def test_mdio_trace_mask_is_the_default_mask(tmp_path):
    """An MDIO store's own trace_mask (here with traces marked dead) masks by default."""
    import os
    import shutil
    import zarr
    store = tmp_path / "survey.mdio"
    shutil.copytree(os.path.join(os.path.dirname(__file__), "data", "survey.mdio"), store)
    live = irregular_mask((1, 24, 16))[0]
    zarr.open_array(str(store / "trace_mask"), mode="r+")[...] = live
    amp = volarray.formats.open_dataarray(store)
    assert np.array_equal(amp.trace_mask.values, live)
    model = tiny()
    got = amp.volinfer.predict(model, chunks=8).values
    full = amp.volinfer.predict(model, chunks=8, mask=None).values
    assert np.array_equal(got[live], full[live]) and (got[~live] == 0).all()
