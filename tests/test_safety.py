"""Nothing lost, nothing silently wrong: every front door (CLI, predict_to_zarr,
predict, accessors) on real zarr stores in folders that hold other files."""
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn as nn
import xarray as xr
import zarr

import volarray
from volarray.models import FaultSeg3D, MultiScaleNet, seeded
from volarray.outputs import DONE
from volarray.testing import assert_volume_close

from conftest import random_volume, slow_writes, whole_volume

MODEL = "volarray.models:FaultSeg3D"


def cli(*args, cwd, timeout=300):
    return subprocess.run([sys.executable, "-m", "volarray.cli", *map(str, args)], cwd=cwd,
                          capture_output=True, text=True, timeout=timeout)


def one_line(stderr: str) -> str:
    """What a terminal shows: progress bars overwrite themselves with \\r."""
    lines = [line.split("\r")[-1].strip() for line in stderr.splitlines()]
    lines = [line for line in lines if line]
    assert len(lines) == 1 and "Traceback" not in stderr, stderr
    return lines[0]


def tree(folder: Path) -> dict:
    """Every file under ``folder`` with its bytes, to prove nothing was touched."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*"))
            if p.is_file()}


@pytest.fixture
def project(tmp_path):
    """A user's project folder: an input store beside notes of their own."""
    proj = tmp_path / "proj"
    proj.mkdir()
    vol = random_volume((16, 16, 24), seed=1)
    zarr.create_array(str(proj / "in.zarr"), data=vol, chunks=(8, 8, 8))
    (proj / "notes.txt").write_text("three weeks of picking")
    torch.save(seeded(FaultSeg3D).state_dict(), proj / "fault.pt")
    torch.save(seeded(MultiScaleNet).state_dict(), proj / "facies.pt")
    return proj, vol


# -- overwrite can only ever remove a volarray output -----------------------------------

@pytest.mark.parametrize("target", ["proj", "proj/in.zarr", ".", "proj/in.zarr/sub", "",
                                    "proj/notes.txt"])
def test_cli_overwrite_refuses_inputs_their_folders_and_cwd(project, target):
    proj, _ = project
    before = tree(proj.parent)
    r = cli("predict", "proj/in.zarr", target, "--model", MODEL, "--overwrite", "--quiet",
            cwd=proj.parent)
    assert r.returncode == 2, r.stdout + r.stderr
    assert "volarray: error: output" in one_line(r.stderr)
    assert tree(proj.parent) == before


def test_api_overwrite_refuses_cwd_and_foreign_folders(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "mine.txt").write_text("keep")
    foreign = tmp_path / "results"
    foreign.mkdir()
    (foreign / "table.csv").write_text("a,b")
    model, vol = seeded(FaultSeg3D, width=4), random_volume((8, 8, 8))
    for store, needle in (("", "empty"), (".", "folder"), (str(tmp_path), "folder"),
                          (foreign, "did not write")):
        with pytest.raises(volarray.InputError, match=needle):
            volarray.predict_to_zarr(model, vol, store, overwrite=True)
    assert (tmp_path / "mine.txt").read_text() == "keep"
    assert (foreign / "table.csv").read_text() == "a,b"
    # resume into a folder volarray did not write is refused too
    with pytest.raises(volarray.InputError, match="did not write; volarray neither replaces it"):
        volarray.predict_to_zarr(model, vol, foreign, resume=True)
    assert (foreign / "table.csv").read_text() == "a,b"


def test_overwrite_replaces_only_what_volarray_wrote(tmp_path):
    model, vol = seeded(FaultSeg3D, width=4), random_volume((8, 16, 8))
    out = tmp_path / "o.zarr"
    volarray.predict_to_zarr(model, vol, out, chunks=8)
    (out / "README.txt").write_text("a note the user keeps with the result")
    other = seeded(MultiScaleNet)
    y = volarray.predict_to_zarr(other, vol, out, chunks=8, overwrite=True, output="argmax")
    assert y.dtype == np.uint8 and y.shape == (8, 16, 8)
    np.testing.assert_array_equal(y[...], whole_volume(other, vol).argmax(0))
    assert (out / "README.txt").read_text().startswith("a note")
    assert sorted(p.name for p in out.iterdir()) == ["README.txt", "prediction", DONE,
                                                     "volarray_input_hashes", "zarr.json"]


def test_output_cannot_be_the_input_zarr_array(tmp_path):
    vol = random_volume((8, 8, 8))
    z = zarr.create_array(str(tmp_path / "v.zarr"), data=vol, chunks=(8, 8, 8))
    with pytest.raises(volarray.InputError, match="is the input"):
        volarray.predict_to_zarr(seeded(FaultSeg3D, width=4), z, tmp_path / "v.zarr",
                                 overwrite=True)
    np.testing.assert_array_equal(zarr.open_array(str(tmp_path / "v.zarr"))[...], vol)


# -- a preview that cannot be written costs nothing ------------------------------------

def test_cli_unwritable_preview_is_refused_before_computing(project):
    proj, _ = project
    r = cli("predict", "in.zarr", "out.zarr", "--model", MODEL, "--preview", "nodir/p.png",
            cwd=proj)
    assert r.returncode == 2 and "nodir" in one_line(r.stderr)
    assert not (proj / "out.zarr").exists()
    r = cli("predict", "in.zarr", "out.zarr", "--model", MODEL, "--preview", "p.xyz", cwd=proj)
    assert r.returncode == 2 and ".png" in one_line(r.stderr)


FAILING_PREVIEW = """
import sys
import volarray.cli
def broken(*a):
    raise OSError("disk quota exceeded")
volarray.cli.preview = broken
sys.exit(volarray.cli.main(sys.argv[1:]))
"""


def test_cli_preview_failure_keeps_the_finished_output(project):
    proj, vol = project
    r = subprocess.run([sys.executable, "-c", FAILING_PREVIEW, "predict", "in.zarr", "out.zarr",
                        "--model", MODEL, "--weights", "fault.pt", "--preview", "p.png", "--quiet",
                        "--chunks", "8"],
                       cwd=proj, capture_output=True, text=True, timeout=300)
    assert r.returncode == 1 and "is complete" in one_line(r.stderr)
    out = zarr.open_group(str(proj / "out.zarr"), mode="r")
    assert out[DONE][...].all()
    assert_volume_close(out["prediction"][...], whole_volume(seeded(FaultSeg3D), vol))


# -- Ctrl-C and SIGTERM keep finished chunks, remove scratch, say how to resume ---------

SLOW_RUN = slow_writes(0.3) + """
import sys
import volarray.cli
sys.exit(volarray.cli.main(sys.argv[1:]))
"""


@pytest.mark.parametrize("sig,code", [(signal.SIGINT, 130), pytest.param(
    signal.SIGTERM, 143, marks=pytest.mark.slow)])  # the same path; SIGTERM in -m slow
def test_cli_signal_keeps_finished_chunks_and_resumes_bitwise(tmp_path, sig, code):
    vol = random_volume((24, 24, 32), seed=4)
    np.save(tmp_path / "v.npy", vol)
    (tmp_path / "notes.txt").write_text("mine")
    torch.save(seeded(FaultSeg3D).state_dict(), tmp_path / "w.pt")
    args = ["predict", "v.npy", "o.zarr", "--model", MODEL, "--weights", "w.pt", "--chunks", "8",
            "--scratch", "disk", "--scheduler", "threads", "--quiet"]
    # a shell's background jobs ignore SIGINT, and children inherit that: restore it
    proc = subprocess.Popen([sys.executable, "-c", SLOW_RUN, *args], cwd=tmp_path,
                            stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    deadline, marked, saw_scratch = time.time() + 240, 0, False
    while time.time() < deadline and proc.poll() is None:
        saw_scratch |= any(p.name.startswith(".o.zarr.scratch-") for p in tmp_path.iterdir())
        try:
            marked = int(zarr.open_group(str(tmp_path / "o.zarr"), mode="r")[DONE][...].sum())
        except Exception:
            pass
        if marked >= 3:
            break
        time.sleep(0.05)
    assert proc.poll() is None, "the run ended before it could be stopped"
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == code, err
    line = one_line(err)
    assert "--resume" in line and "chunks are finished" in line and "same arguments" in line
    assert saw_scratch
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt", "o.zarr", "v.npy", "w.pt"]
    marks = zarr.open_group(str(tmp_path / "o.zarr"), mode="r")[DONE][...]
    assert 3 <= marks.sum() < marks.size
    r = cli(*args, "--resume", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    fresh = volarray.predict_to_zarr(seeded(FaultSeg3D), vol, tmp_path / "fresh.zarr", chunks=8)
    resumed = zarr.open_group(str(tmp_path / "o.zarr"), mode="r")["prediction"][...]
    np.testing.assert_array_equal(resumed, fresh[...])


# -- bad values in the input ------------------------------------------------------------

@pytest.mark.parametrize("value", [np.inf, -np.inf, np.nan])
def test_non_finite_input_is_refused_naming_the_voxel(value):
    vol = random_volume((16, 16, 16))
    vol[3, 4, 5] = value
    for mode, kw in (("exact", {}), ("window", {"roi_size": 8})):
        with pytest.raises(volarray.InputError, match=r"voxel \(z, y, x\) = \(3, 4, 5\)"):
            volarray.predict(seeded(FaultSeg3D, width=4), vol, method=mode, chunks=8,
                             **kw).compute(scheduler="sync")


def test_bad_input_mid_run_keeps_finished_chunks(tmp_path):
    vol = random_volume((8, 8, 80), seed=2)
    vol[4, 4, 56] = np.inf  # mid-volume: chunks on either side finish first
    np.save(tmp_path / "v.npy", vol)
    torch.manual_seed(0)  # a network without downsampling: chunks finish one by one
    model = nn.Sequential(nn.Conv3d(1, 4, 3, padding=1), nn.ReLU(), nn.Conv3d(4, 1, 3, padding=1))
    model.eval()
    with pytest.raises(volarray.InputError, match=r"Inf at .*\(4, 4, 56\).*resume=True") as e:
        volarray.predict_to_zarr(model, tmp_path / "v.npy", tmp_path / "o.zarr", chunks=8,
                                 scheduler="sync")
    assert "chunks are finished and kept" in str(e.value)
    marks = zarr.open_group(str(tmp_path / "o.zarr"), mode="r")[DONE][...]
    assert 0 < marks.sum() < marks.size
    # fixed in place, the same run finishes: only the missing chunks are computed
    vol[4, 4, 56] = 0.0
    np.save(tmp_path / "v.npy", vol)
    with pytest.raises(volarray.InputError, match="seed=5 seeds the samples of ensemble="):
        volarray.predict_to_zarr(model, tmp_path / "v.npy", tmp_path / "o.zarr", chunks=8,
                                 resume=True, scheduler="sync", seed=5)  # draws nothing here
    out = volarray.predict_to_zarr(model, tmp_path / "v.npy", tmp_path / "o.zarr", chunks=8,
                                   resume=True, scheduler="sync")
    assert_volume_close(out[...], whole_volume(model, vol))
    # another volume saved at the same path is another input: no silent mix of the two
    np.save(tmp_path / "v.npy", vol * 3 + 1)
    with pytest.raises(volarray.InputError, match=r"a run with other settings \(its input differs\)"):
        volarray.predict_to_zarr(model, tmp_path / "v.npy", tmp_path / "o.zarr", chunks=8,
                                 resume=True)
    with pytest.raises(volarray.InputError, match=r"pass chunks=\(8, 8, 8\)"):
        volarray.predict_to_zarr(model, vol, tmp_path / "o.zarr", chunks=4, resume=True)


def test_cli_inf_input(tmp_path):
    vol = random_volume((16, 16, 16))
    vol[1, 2, 3] = np.inf
    np.save(tmp_path / "v.npy", vol)
    r = cli("predict", "v.npy", "o.zarr", "--model", MODEL, "--quiet", cwd=tmp_path)
    assert r.returncode == 2 and "holds Inf" in one_line(r.stderr)


def test_corrupt_chunk_names_the_store_and_chunk(project):
    proj, _ = project
    chunk = proj / "in.zarr" / "c" / "1" / "0" / "2"
    assert chunk.is_file()
    chunk.write_bytes(chunk.read_bytes()[:20])  # truncated by a failed copy
    r = cli("predict", "in.zarr", "out.zarr", "--model", MODEL, "--quiet", cwd=proj)
    line = one_line(r.stderr)
    assert r.returncode == 2 and "in.zarr" in line and "chunk (1, 0, 2)" in line, line
    assert not (proj / "out.zarr").exists()
    with pytest.raises(volarray.InputError, match=r"chunk \(1, 0, 2\)"):
        volarray.predict(seeded(FaultSeg3D, width=4),
                         zarr.open_array(str(proj / "in.zarr"))).compute()


# -- budgets, labels, training mode, inputs ---------------------------------------------

@pytest.mark.parametrize("limit,needle", [("-1GB", "not a budget"), (-5, "not a budget"),
                                          (0, "not a budget"), ("lots", "not a size"),
                                          ("1KB", r"memory_limit >= \d")])
def test_impossible_memory_limits_are_refused(limit, needle):
    with pytest.raises(volarray.VolarrayError, match=needle):
        volarray.predict(seeded(FaultSeg3D, width=4), random_volume((32, 32, 32)),
                         memory_limit=limit)


def test_argmax_of_one_channel_is_refused_and_threshold_offered(tmp_path):
    model, vol = seeded(FaultSeg3D, width=4), random_volume((16, 16, 24), seed=5)
    with pytest.raises(volarray.InputError, match="threshold=0.5"):
        volarray.predict(model, vol, output="argmax")
    with pytest.raises(volarray.InputError, match="threshold=0.5"):
        volarray.predict(model, vol, output="argmax", method="window", roi_size=8)
    ref = whole_volume(model, vol)[0] > 0.5
    labels = volarray.predict(model, vol, threshold=0.5, chunks=8)
    assert labels.dtype == np.uint8 and labels.shape == vol.shape
    np.testing.assert_array_equal(labels.compute(), ref)
    z = volarray.predict_to_zarr(model, vol, tmp_path / "l.zarr", threshold=0.5, chunks=8)
    np.testing.assert_array_equal(z[...], ref)
    da_out = xr.DataArray(vol, dims=("z", "y", "x")).volinfer.predict(model, threshold=0.5)
    assert da_out.dims == ("z", "y", "x")
    np.testing.assert_array_equal(da_out.values, ref)
    with pytest.raises(volarray.InputError, match="output='argmax'"):
        volarray.predict(seeded(MultiScaleNet), vol, threshold=0.5)


def test_cli_threshold_and_argmax_refusal(project):
    proj, vol = project
    r = cli("predict", "in.zarr", "o.zarr", "--model", MODEL, "--output", "argmax", cwd=proj)
    assert r.returncode == 2 and "--threshold 0.5" in one_line(r.stderr)
    r = cli("predict", "in.zarr", "o.zarr", "--model", MODEL, "--weights", "fault.pt",
            "--threshold", "0.5", "--quiet", cwd=proj)
    assert r.returncode == 0, r.stderr
    labels = zarr.open_group(str(proj / "o.zarr"), mode="r")["prediction"][...]
    np.testing.assert_array_equal(labels, whole_volume(seeded(FaultSeg3D), vol)[0] > 0.5)


class BatchNormNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv3d(1, 4, 3, padding=1)
        self.bn = nn.BatchNorm3d(4)
        self.drop = nn.Dropout(0.2)
        self.head = nn.Conv3d(4, 2, 1)

    def forward(self, x):
        return self.head(self.drop(torch.relu(self.bn(self.conv(x)))))


def test_training_mode_is_refused_in_every_mode():
    model, vol = BatchNormNet().train(), random_volume((8, 8, 8))
    for kw in ({}, {"method": "window", "roi_size": 8}, {"ensemble": 2},
               {"method": "window", "roi_size": 8, "ensemble": 2}):
        with pytest.raises(volarray.InputError, match=r"training mode.*'bn'.*model\.eval\(\)"):
            volarray.predict(model, vol, **kw)
    model.eval()
    model.drop.train()  # MC dropout: what ensemble= samples, and only there
    with pytest.raises(volarray.InputError, match="'drop'"):
        volarray.predict(model, vol)
    mean, std = volarray.predict(model, vol, ensemble=3, chunks=4)
    assert float(std.mean().compute()) > 0


def test_torch_tensor_input_and_meta_model():
    model, vol = seeded(FaultSeg3D, width=4), random_volume((8, 16, 8))
    y = volarray.predict(model, torch.from_numpy(vol).requires_grad_(), chunks=8).compute()
    assert_volume_close(y, whole_volume(model, vol))
    with torch.device("meta"):
        meta = FaultSeg3D(width=4).eval()
    with pytest.raises(volarray.InputError, match="meta device"):
        volarray.predict(meta, vol)  # at build time, not when computed


# -- every option through every front door ---------------------------------------------

def test_dataarray_spatial_dims_keep_their_order():
    model = seeded(FaultSeg3D, width=4)
    vol = random_volume((8, 16, 24), seed=6)
    arr = xr.DataArray(vol, dims=("x", "y", "z"))
    out = arr.volinfer.predict(model, chunks=8)
    assert out.dims == ("x", "y", "z")
    assert_volume_close(out.values, whole_volume(model, vol)[0])
    out = arr.volinfer.predict(model, dims=("z", "y", "x"), chunks=8)
    assert out.dims == ("z", "y", "x")
    assert_volume_close(out.values, whole_volume(model, vol.transpose(2, 1, 0).copy())[0])


def test_accessors_take_labels_and_ensembles():
    vol = random_volume((8, 16, 8), seed=3)
    ds = xr.Dataset({"amp": (("z", "y", "x"), vol)})
    model = seeded(MultiScaleNet)
    out = ds.volinfer.predict(model, var="amp", name="facies", output="argmax", chunks=8)
    assert out.facies.dims == ("z", "y", "x") and out.facies.dtype == np.uint8
    np.testing.assert_array_equal(out.facies.values, whole_volume(model, vol).argmax(0))
    out = ds.volinfer.predict(model, var="amp", name="p", method="window", roi_size=8, ensemble=2)
    assert set(out.data_vars) == {"amp", "p_mean", "p_std"}
    assert out.p_mean.dims == ("p_class", "z", "y", "x")
    mean, std = ds.amp.volinfer.predict(model, method="window", roi_size=8, ensemble=2)
    assert mean.shape == (3, 8, 16, 8) and std.dims == ("class", "z", "y", "x")


def test_predict_to_zarr_takes_every_predict_option(tmp_path):
    model, vol = seeded(MultiScaleNet), random_volume((8, 16, 12), seed=8)
    kw = dict(method="window", roi_size=8, overlap=0.5, blend_mode="constant", tta="flips")
    z = volarray.predict_to_zarr(model, vol, tmp_path / "w.zarr", chunks=8, **kw)
    np.testing.assert_array_equal(z[...], volarray.predict(model, vol, chunks=8, **kw).compute())
    mean, std = volarray.predict_to_zarr(model, vol, tmp_path / "e.zarr", method="window",
                                         roi_size=8, ensemble=2, name="facies")
    assert (mean.basename, std.basename) == ("facies_mean", "facies_std")
    with pytest.raises(volarray.InputError, match="unknown option"):
        volarray.predict_to_zarr(model, vol, tmp_path / "x.zarr", windw=8)
    assert not (tmp_path / "x.zarr").exists()


def test_cli_window_mode(project):
    proj, vol = project
    r = cli("predict", "in.zarr", "w.zarr", "--model", "volarray.models:MultiScaleNet",
            "--weights", "facies.pt", "--method", "window", "--roi-size", "8,8,16", "--overlap", "0.5", "--quiet", cwd=proj)
    assert r.returncode == 0, r.stderr
    got = zarr.open_group(str(proj / "w.zarr"), mode="r")["prediction"][...]
    ref = volarray.predict(seeded(MultiScaleNet), vol, method="window", roi_size=(8, 8, 16),
                           overlap=0.5).compute()
    np.testing.assert_array_equal(got, ref)


# -- shapes the network cannot take, weights that do not fit ------------------------------

@pytest.mark.slow  # a CLI subprocess (10 s); the default run stays under 15 minutes
def test_cli_side_not_a_multiple_says_so_and_pads(tmp_path):
    vol = random_volume((12, 20, 16), seed=9)
    np.save(tmp_path / "v.npy", vol)
    torch.save(seeded(FaultSeg3D).state_dict(), tmp_path / "w.pt")
    base = ["predict", "v.npy", "o.zarr", "--model", MODEL, "--weights", "w.pt", "--quiet"]
    r = cli(*base, cwd=tmp_path)
    line = one_line(r.stderr)
    assert r.returncode == 2 and "not multiples of 8" in line and "--pad reflect" in line, line
    r = cli(*base, "--pad", "zeros", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    got = zarr.open_group(str(tmp_path / "o.zarr"), mode="r")["prediction"][...]
    padded = np.pad(vol, [(0, 4), (0, 4), (0, 0)])
    assert_volume_close(got, whole_volume(seeded(FaultSeg3D), padded)[:, :12, :20, :16])


def test_cli_weights_layouts_and_mistakes(tmp_path):
    np.save(tmp_path / "v.npy", random_volume((8, 8, 8)))
    model = seeded(FaultSeg3D)
    sd = model.state_dict()
    torch.save({"state_dict": {"model." + k: v for k, v in sd.items()}, "epoch": 3},
               tmp_path / "lightning.ckpt")
    torch.save({"module." + k: v for k, v in sd.items()}, tmp_path / "ddp.pt")
    torch.save(model, tmp_path / "whole.pt")
    renamed = dict(sd)
    renamed["head.w"] = renamed.pop("head.weight")
    torch.save(renamed, tmp_path / "renamed.pt")
    base = ["predict", "v.npy", "--model", MODEL, "--quiet", "--weights"]
    for name in ("lightning.ckpt", "ddp.pt"):
        r = cli(*base, name, f"{name}.zarr", cwd=tmp_path)
        assert r.returncode == 0, r.stderr
    r = cli(*base, "whole.pt", "o.zarr", cwd=tmp_path)
    line = one_line(r.stderr)
    assert r.returncode == 2 and "state_dict()" in line and "\x1b" not in r.stderr, line
    r = cli(*base, "renamed.pt", "o.zarr", cwd=tmp_path)
    line = one_line(r.stderr)
    assert r.returncode == 2 and "head.weight" in line and "head.w" in line, line
    assert not (tmp_path / "o.zarr").exists()


# -- the caller's model is never changed ------------------------------------------------

class AliasedNet(nn.Module):
    """One submodule under two names, as MONAI's DynUNet and nnU-Net's networks have."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv3d(1, 4, 3, padding=1)
        self.first = self.conv
        self.norm = nn.BatchNorm3d(4)
        self.head = nn.Conv3d(4, 2, 1)

    def forward(self, x):
        return self.head(torch.relu(self.norm(self.first(x))))


def snapshot(model):
    return {name: (t.device, t.dtype, t.requires_grad, t.detach().clone())
            for name, t in list(model.named_parameters(remove_duplicate=False)) +
            list(model.named_buffers(remove_duplicate=False))}


@pytest.mark.parametrize("kw", [{}, {"method": "window", "roi_size": 8}, {"tta": "flips"},
                                {"output": "argmax"}, {"pad": "zeros"}])
def test_no_mode_changes_the_callers_model(kw):
    torch.manual_seed(0)
    model = AliasedNet().eval()
    before = snapshot(model)
    vol = random_volume((8, 12, 8), seed=1)
    ref = whole_volume(model, vol)
    volarray.predict(model, vol, chunks=8, **kw).compute()
    after = snapshot(model)
    assert not model.training and after.keys() == before.keys()
    for name, (device, dtype, grad, value) in before.items():
        assert after[name][:3] == (device, dtype, grad), name
        assert torch.equal(after[name][3], value), name
    np.testing.assert_array_equal(whole_volume(model, vol), ref)


# -- found by a review as a new user -------------------------------------------------------

def test_overwrite_refuses_an_input_read_lazily_from_the_output(tmp_path):
    import dask.array as da
    model, vol = seeded(FaultSeg3D, width=4), random_volume((16, 16, 16))
    out = tmp_path / "pred.zarr"
    first = volarray.predict_to_zarr(model, vol, out, chunks=8)[...]
    lazy = [da.from_zarr(str(out), component="prediction")[0],
            xr.open_zarr(str(out), consolidated=False)["prediction"][0]]
    for source in lazy:
        with pytest.raises(volarray.InputError, match="is the input"):
            volarray.predict_to_zarr(model, source, out, overwrite=True)
    np.testing.assert_array_equal(zarr.open_group(str(out))["prediction"][...], first)


def test_a_failed_overwrite_leaves_the_old_output_whole(tmp_path):
    model, vol = seeded(FaultSeg3D, width=4), random_volume((16, 16, 16))
    out = tmp_path / "good.zarr"
    good = volarray.predict_to_zarr(model, vol, out, chunks=8)[...]
    (out / "notes.txt").write_text("mine")
    bad = vol.copy()
    bad[3, 3, 3] = np.nan
    with pytest.raises(volarray.InputError, match="existing output .* was left as it was"):
        volarray.predict_to_zarr(model, bad, out, overwrite=True, chunks=8)
    np.testing.assert_array_equal(zarr.open_group(str(out))["prediction"][...], good)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["good.zarr"]  # no staging left
    new = volarray.predict_to_zarr(model, vol * 2, out, overwrite=True, chunks=8)
    assert_volume_close(new[...], whole_volume(model, vol * 2))
    assert (out / "notes.txt").read_text() == "mine"
    with pytest.raises(volarray.InputError, match="did not write"):
        volarray.predict_to_zarr(model, vol, out, overwrite=True, name="notes.txt")


def test_output_inside_the_store_of_an_array_path_input(tmp_path):
    g = zarr.open_group(str(tmp_path / "survey.zarr"), mode="w")
    g.create_array("amplitude", data=random_volume((8, 8, 8)), chunks=(8, 8, 8))
    with pytest.raises(volarray.InputError, match="lies inside the input"):
        volarray.predict_to_zarr(seeded(FaultSeg3D, width=4), tmp_path / "survey.zarr/amplitude",
                                 tmp_path / "survey.zarr/pred.zarr")
    assert sorted(zarr.open_group(str(tmp_path / "survey.zarr")).array_keys()) == ["amplitude"]


@pytest.mark.parametrize("name", [DONE, "", ".", "../x", "a/b"])
def test_bad_array_names_are_refused_before_writing(tmp_path, name):
    with pytest.raises(volarray.InputError, match="not an array name"):
        volarray.predict_to_zarr(seeded(FaultSeg3D, width=4), random_volume((8, 8, 8)),
                                 tmp_path / "o.zarr", name=name)
    assert list(tmp_path.iterdir()) == []


def test_options_that_would_be_silently_wrong_are_refused():
    model, vol = seeded(FaultSeg3D, width=4), random_volume((16, 16, 16))
    with pytest.raises(volarray.InputError, match="sigma_scale=0 must be positive"):
        volarray.predict(model, vol, method="window", roi_size=8, sigma_scale=0)
    with pytest.raises(volarray.InputError, match="compute_dtype='float16' applies to method='exact'"):
        volarray.predict(model, vol, method="window", roi_size=8, compute_dtype="float16")
    ds = xr.Dataset({"amp": (("z", "y", "x"), vol)})
    with pytest.raises(volarray.InputError, match="already has"):
        ds.volinfer.predict(model, var="amp", name="amp")
    with pytest.raises(volarray.InputError, match="not multiples of 8"):
        volarray.predict(model, random_volume((30, 31, 29)))


def test_big_endian_input():
    model, vol = seeded(FaultSeg3D, width=4), random_volume((16, 16, 16))
    y = volarray.predict(model, vol.astype(">f4"), chunks=8).compute()
    assert_volume_close(y, whole_volume(model, vol))
