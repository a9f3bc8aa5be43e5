"""The field's formats: SEG-Y, MDIO, NIfTI and TIFF volumes written with the field's own
libraries, opened lazily with their coordinates, predicted exactly, written back."""
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import xarray as xr

import volarray
from volarray.formats import open_dataarray
from volarray.readers import source_of
from volarray.models import FaultSeg3D, seeded

MODEL = "fieldmodel:faultseg"


def cli(cwd, *args):
    """``volarray ...`` in ``cwd``, where a module gives FaultSeg3D with seeded weights."""
    (cwd / "fieldmodel.py").write_text("from volarray.models import FaultSeg3D, seeded\n"
                                       "def faultseg():\n    return seeded(FaultSeg3D)\n")
    return subprocess.run([sys.executable, "-m", "volarray.cli", *map(str, args)], cwd=cwd,
                          capture_output=True, text=True)


def reference(model, vol):
    with torch.no_grad():
        return model(torch.from_numpy(np.ascontiguousarray(vol, np.float32))[None, None])[0] \
            .numpy()


def write_segy(path, cube, ilines, xlines, inline_sorted=True, dt_us=4000):
    segyio = pytest.importorskip("segyio")
    spec = segyio.spec()
    spec.sorting = 2 if inline_sorted else 1
    spec.format = 5
    spec.samples = np.arange(cube.shape[2]) * dt_us / 1000
    spec.ilines, spec.xlines, spec.offsets = ilines, xlines, [1]
    slow, fast = (ilines, xlines) if inline_sorted else (xlines, ilines)
    with segyio.create(str(path), spec) as f:
        tr = 0
        for i, s in enumerate(slow):
            for j, q in enumerate(fast):
                il, xl = (s, q) if inline_sorted else (q, s)
                f.header[tr] = {segyio.su.iline: il, segyio.su.xline: xl, segyio.su.offset: 1,
                                segyio.su.cdpx: 1000 + il * 25, segyio.su.cdpy: 5000 + xl * 25}
                f.trace[tr] = cube[i, j]
                tr += 1
        f.bin.update(hns=cube.shape[2], format=5, hdt=dt_us)


@pytest.fixture
def survey(tmp_path):
    """An inline-sorted SEG-Y with irregular inline numbering (gaps, step 2)."""
    cube = np.random.default_rng(0).standard_normal((24, 16, 24)).astype(np.float32)
    ilines = [100, 102, 104, 110, 112] + list(range(120, 160, 2))[:19]
    xlines = list(range(300, 316))
    path = tmp_path / "survey.sgy"
    write_segy(path, cube, ilines, xlines)
    return path, cube, ilines, xlines


def test_segy_opens_lazily_with_headers_geometry(survey):
    path, cube, ilines, xlines = survey
    amp = open_dataarray(path, chunks=(8, 16, 24))
    assert amp.dims == ("inline", "crossline", "sample")
    assert list(amp.inline.values) == ilines and list(amp.crossline.values) == xlines
    assert amp.sample.values[1] == pytest.approx(4.0) and amp.attrs["format"] == "segy"
    source = source_of(amp.data)
    assert source.traces_read == 0  # nothing read on opening
    block = amp[:8].values
    assert np.array_equal(block, cube[:8]) and source.traces_read == 8 * 16  # one chunk
    assert np.array_equal(amp.values, cube)


def test_segy_crossline_sorted_keeps_the_files_order(tmp_path):
    cube = np.random.default_rng(1).standard_normal((9, 6, 10)).astype(np.float32)
    write_segy(tmp_path / "xl.sgy", cube, list(range(1, 7)), list(range(50, 59)),
               inline_sorted=False)
    amp = open_dataarray(tmp_path / "xl.sgy")
    assert amp.dims == ("crossline", "inline", "sample") and amp.shape == (9, 6, 10)
    assert np.array_equal(amp.values, cube)


def test_segy_predicted_exactly_and_written_back_with_its_headers(survey, tmp_path):
    segyio = pytest.importorskip("segyio")
    path, cube, ilines, xlines = survey
    model = seeded(FaultSeg3D)
    amp = open_dataarray(path, chunks=(8, 16, 24))
    faults = amp.volinfer.predict(model, chunks=(12, 9, 16))
    assert faults.dims == ("inline", "crossline", "sample")
    assert list(faults.inline.values) == ilines  # coordinates carried over
    got = faults.values
    assert np.abs(got - reference(model, cube)[0]).max() < 1e-5
    out = volarray.formats.segy.write_segy(faults, tmp_path / "faults.sgy", like=path)
    with segyio.open(out) as f, segyio.open(path) as g:
        assert list(f.ilines) == ilines and list(f.xlines) == xlines
        assert f.header[37][segyio.su.cdpx] == g.header[37][segyio.su.cdpx]
        assert np.allclose(segyio.tools.cube(f), got)
    with pytest.raises(volarray.InputError, match="exists"):
        volarray.formats.segy.write_segy(faults, out, like=path)
    volarray.formats.segy.write_segy(faults, out, like=path, overwrite=True)  # its own
    # a survey of the user's is never replaced, whatever overwrite says
    mine, survey_bytes = tmp_path / "mine.sgy", Path(path).read_bytes()
    mine.write_bytes(survey_bytes)
    with pytest.raises(volarray.InputError, match="a file without volarray's mark"):
        volarray.formats.segy.write_segy(faults, mine, like=path, overwrite=True)
    assert mine.read_bytes() == survey_bytes


def test_segy_from_the_command_line_to_zarr_and_to_segy(survey, tmp_path):
    path, cube, ilines, xlines = survey
    res = cli(tmp_path, "predict", path, "f.zarr", "--model", MODEL, "--chunks", "16",
              "--normalize", "zscore", "--quiet")
    assert res.returncode == 0, res.stderr
    ds = xr.open_zarr(tmp_path / "f.zarr", consolidated=False)
    assert list(ds.inline.values) == ilines  # the survey's numbering in the output
    assert ds["prediction"].attrs["normalize"] == "zscore"
    res = cli(tmp_path, "predict", path, "f.sgy", "--model", MODEL, "--chunks", "16", "--quiet")
    assert res.returncode == 0, res.stderr
    back = open_dataarray(tmp_path / "f.sgy")
    assert list(back.inline.values) == ilines
    assert np.abs(back.values - reference(seeded(FaultSeg3D), cube)[0]).max() < 1e-5
    assert not [n for n in os.listdir(tmp_path) if "volarray" in n]  # no work store left


MDIO_SURVEY = os.path.join(os.path.dirname(__file__), "data", "survey.mdio")


def test_mdio_store_written_by_multidimio(tmp_path):
    """A real MDIO v1 store (tests/data/survey.mdio, written by multidimio 1.1.3's
    segy_to_mdio from the irregular SEG-Y of the `survey` fixture: the script beside it):
    read lazily with its inline / crossline / time geometry, predicted exactly through the
    accessor and the command line, the numbering carried into the output."""
    import shutil
    store = tmp_path / "survey.mdio"
    shutil.copytree(MDIO_SURVEY, store)
    cube = np.random.default_rng(0).standard_normal((24, 16, 24)).astype(np.float32)
    ilines = [100, 102, 104, 110, 112] + list(range(120, 160, 2))[:19]
    amp = open_dataarray(store)
    assert amp.dims == ("inline", "crossline", "time") and hasattr(amp.data, "dask")
    assert list(amp.inline.values) == ilines and list(amp.time.values) == list(range(0, 96, 4))
    assert np.array_equal(amp.values, cube)
    faults = amp.volinfer.predict(seeded(FaultSeg3D), chunks=(8, 16, 8))
    assert list(faults.inline.values) == ilines
    assert np.abs(faults.values - reference(seeded(FaultSeg3D), cube)[0]).max() < 1e-5
    res = cli(tmp_path, "predict", store, "f.zarr", "--model", MODEL, "--chunks", "12",
              "--quiet")
    assert res.returncode == 0, res.stderr
    ds = xr.open_zarr(tmp_path / "f.zarr", consolidated=False)
    assert list(ds.inline.values) == ilines
    assert ds["prediction"].dims == ("channel", "inline", "crossline", "time")


def nifti_affine():
    """Oblique, anisotropic, off-origin: nothing an identity would pass for."""
    c, s = np.cos(0.3), np.sin(0.3)
    a = np.array([[0.8 * c, -0.8 * s, 0, -90], [0.8 * s, 0.8 * c, 0, 12],
                  [0, 0, 2.5, 40], [0, 0, 0, 1]])
    return a


@pytest.mark.parametrize("suffix", [".nii", ".nii.gz"])
def test_nifti_opens_lazily_with_its_affine(tmp_path, suffix):
    nib = pytest.importorskip("nibabel")
    vol = (np.random.default_rng(2).standard_normal((21, 18, 13)) * 300).astype(np.int16)
    path = tmp_path / f"scan{suffix}"
    nib.save(nib.Nifti1Image(vol, nifti_affine()), str(path))
    img = open_dataarray(path, chunks=(8, 18, 13), **(
        {"cache": str(tmp_path / "cache.zarr")} if suffix == ".nii.gz" else {}))
    assert img.dims == ("i", "j", "k") and img.dtype == np.int16
    assert np.allclose(img.attrs["affine"], nifti_affine())
    assert img.k.values[1] == pytest.approx(2.5)  # mm from the voxel size
    if suffix == ".nii":
        source = source_of(img.data)
        seen = []
        get = type(source).__getitem__
        type(source).__getitem__ = lambda self, ix: seen.append(ix) or get(self, ix)
        try:
            assert np.array_equal(img[:8].values, vol[:8])
        finally:
            type(source).__getitem__ = get
        assert seen and all(ix[0].stop <= 8 for ix in seen)  # only that chunk was read
    else:
        mark = json.loads((tmp_path / "cache.zarr" / "volarray-nifti-cache.json").read_text())
        assert mark["complete"] and mark["identity"]["shape"] == [21, 18, 13]
    assert np.array_equal(img.values, vol)


def test_nifti_labels_written_back_with_the_affine(tmp_path):
    nib = pytest.importorskip("nibabel")
    vol = np.random.default_rng(3).standard_normal((16, 16, 8)).astype(np.float32)
    nib.save(nib.Nifti1Image(vol, nifti_affine()), str(tmp_path / "scan.nii.gz"))
    res = cli(tmp_path, "predict", "scan.nii.gz", "seg.nii.gz", "--model", MODEL,
              "--threshold", "0.5", "--chunks", "8", "--quiet")
    assert res.returncode == 0, res.stderr
    seg = nib.load(str(tmp_path / "seg.nii.gz"))
    assert np.allclose(seg.affine, nifti_affine()) and seg.get_data_dtype() == np.uint8
    p = reference(seeded(FaultSeg3D), vol)[0]
    differ = np.asarray(seg.dataobj) != (p > 0.5)  # only where p is 0.5 within rounding
    assert np.all(np.abs(p[differ] - 0.5) < 1e-5)
    # --overwrite replaces volarray's own output, never a file of the user's
    (tmp_path / "notes.nii.gz").write_text("my notes")
    (tmp_path / "copy.nii.gz").write_bytes((tmp_path / "scan.nii.gz").read_bytes())
    for name in ("notes.nii.gz", "copy.nii.gz"):
        before = (tmp_path / name).read_bytes()
        res = cli(tmp_path, "predict", "scan.nii.gz", name, "--model", MODEL, "--threshold",
                  "0.5", "--overwrite", "--quiet")
        assert res.returncode == 2 and "a file without volarray's mark" in res.stderr
        assert "(--overwrite, --overwrite)" not in res.stderr, res.stderr
        assert (tmp_path / name).read_bytes() == before
    res = cli(tmp_path, "predict", "scan.nii.gz", "seg.nii.gz", "--model", MODEL,
              "--threshold", "0.5", "--quiet")
    assert res.returncode == 2 and "--overwrite" in res.stderr  # its own, not asked
    res = cli(tmp_path, "predict", "scan.nii.gz", "seg.nii.gz", "--model", MODEL,
              "--threshold", "0.5", "--overwrite", "--quiet")
    assert res.returncode == 0, res.stderr


def test_nifti_class_scores_are_not_labelled_as_time_points(tmp_path):
    """(C, i, j, k) scores go to a 4-D file whose fourth axis carries no time units or
    step of the scan's (a 4-D scan with 1.5 s frames), with volarray's mark."""
    nib = pytest.importorskip("nibabel")
    scan = nib.Nifti1Image(np.zeros((16, 16, 8, 2), np.float32), nifti_affine())
    scan.header.set_xyzt_units("mm", "sec")
    scan.header["pixdim"][4] = 1.5
    scan.header.set_intent("t test", (12.0,))  # a statistic map's header, a CT's window
    scan.header["cal_min"], scan.header["cal_max"] = -1024.0, 3071.0
    scan.header["descrip"] = b"CT scan"
    nib.save(scan, str(tmp_path / "scan.nii.gz"))
    scores = np.random.default_rng(4).random((3, 16, 16, 8)).astype(np.float32)
    out = volarray.formats.nifti.write_nifti(scores, tmp_path / "p.nii.gz",
                                             like=tmp_path / "scan.nii.gz")
    img = nib.load(out)
    assert img.header.get_xyzt_units() == ("mm", "unknown") and img.header["pixdim"][4] == 1
    assert img.header.get_intent() == ("none", (), "volarray")
    assert img.header["cal_min"] == img.header["cal_max"] == 0
    assert bytes(img.header["descrip"]).rstrip(b"\0") == b"volarray prediction"
    assert volarray.formats.nifti.written_by_volarray(out)
    assert np.allclose(img.affine, nifti_affine())
    np.testing.assert_array_equal(np.moveaxis(np.asarray(img.dataobj), 3, 0), scores)


def test_tiff_stack_of_uint16_slices(tmp_path):
    tifffile = pytest.importorskip("tifffile")
    vol = np.random.default_rng(4).integers(0, 60000, (24, 16, 16)).astype(np.uint16)
    (tmp_path / "stack").mkdir()
    for i, s in enumerate(vol):
        tifffile.imwrite(tmp_path / "stack" / f"ct_{i}.tif", s)  # ct_10 after ct_9
    (tmp_path / "stack" / "notes.txt").write_text("scan log")
    ct = open_dataarray(tmp_path / "stack", chunks=(6, 16, 16))
    assert ct.dims == ("slice", "row", "column") and ct.dtype == np.uint16
    source = source_of(ct.data)
    assert np.array_equal(ct[6:12].values, vol[6:12]) and source.slices_read == 6
    model = seeded(FaultSeg3D)
    x = vol.astype(np.float64)
    want = reference(model, ((x - x.mean()) / x.std()).astype(np.float32))[0]
    got = volarray.predict(model, ct, chunks=(9, 10, 7), normalize="zscore").compute()[0]
    assert np.abs(got - want).max() < 1e-5
    out = volarray.formats.tiff.write_tiff(
        xr.DataArray((got > 0.5).astype(np.uint8)), tmp_path / "labels")
    back = open_dataarray(out)
    assert np.array_equal(back.values, (got > 0.5).astype(np.uint8))
    with pytest.raises(volarray.InputError, match="other files"):
        volarray.formats.tiff.write_tiff(vol, tmp_path / "stack", overwrite=True)
    assert len(os.listdir(tmp_path / "stack")) == 25  # nothing of the user's removed


def test_multipage_tiff(tmp_path):
    tifffile = pytest.importorskip("tifffile")
    vol = np.random.default_rng(5).integers(0, 255, (7, 9, 11)).astype(np.uint8)
    tifffile.imwrite(tmp_path / "ct.tif", vol)
    ct = open_dataarray(tmp_path / "ct.tif")
    assert ct.shape == (7, 9, 11) and np.array_equal(ct.values, vol)


def test_batch_of_scans_one_output_each_resumable(tmp_path):
    nib = pytest.importorskip("nibabel")
    (tmp_path / "scans").mkdir()
    for i in range(2):
        vol = np.random.default_rng(i).standard_normal((16, 16, 8)).astype(np.float32)
        nib.save(nib.Nifti1Image(vol, nifti_affine()), str(tmp_path / "scans" / f"p{i}.nii.gz"))
    cmd = ["predict", "scans/*.nii.gz", "out", "--model", MODEL, "--chunks", "8", "--quiet"]
    res = cli(tmp_path, *cmd)
    assert res.returncode == 0, res.stderr
    assert sorted(os.listdir(tmp_path / "out")) == ["p0.zarr", "p1.zarr"]
    res = cli(tmp_path, *cmd)
    assert res.returncode == 2 and "--resume" in res.stderr
    chunks = sorted((tmp_path / "out").rglob("prediction/c/*/*/*/*"))
    stamps = [c.stat().st_mtime_ns for c in chunks]
    res = cli(tmp_path, *cmd, "--resume")
    assert res.returncode == 0, res.stderr
    assert chunks and [c.stat().st_mtime_ns for c in chunks] == stamps  # nothing recomputed
    marker = json.loads((tmp_path / "out" / "p0.zarr" / "zarr.json").read_text())
    assert marker["attributes"]["volarray"]["coordinates"] == ["i", "j", "k"]
    # to NIfTI: --resume skips and --overwrite replaces volarray's own files only, and a
    # file of the user's among them stops the batch before any job runs
    nii = cmd[:2] + ["segs"] + cmd[3:] + ["--format", "nifti", "--threshold", "0.5"]
    assert cli(tmp_path, *nii).returncode == 0
    (tmp_path / "segs" / "p1.nii.gz").write_bytes((tmp_path / "scans" / "p1.nii.gz")
                                                  .read_bytes())  # the user's own copy
    before = {p.name: p.read_bytes() for p in (tmp_path / "segs").iterdir()}
    for flag in ("--resume", "--overwrite"):
        res = cli(tmp_path, *nii, flag)
        assert res.returncode == 2 and "without volarray's mark (e.g. 'segs/p1.nii.gz')" \
            in res.stderr, res.stderr
        assert {p.name: p.read_bytes() for p in (tmp_path / "segs").iterdir()} == before


def test_nifti_cache_never_empties_a_folder_it_did_not_make(tmp_path):
    nib = pytest.importorskip("nibabel")
    vol = np.arange(8 * 8 * 8, dtype=np.int16).reshape(8, 8, 8)
    nib.save(nib.Nifti1Image(vol, np.eye(4)), str(tmp_path / "a.nii.gz"))
    nib.save(nib.Nifti1Image(vol * 2, np.eye(4)), str(tmp_path / "b.nii.gz"))
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "results.csv").write_text("keep me")
    with pytest.raises(volarray.InputError, match="not a volarray NIfTI cache"):
        open_dataarray(tmp_path / "a.nii.gz", cache=tmp_path / "mine")
    assert (tmp_path / "mine" / "results.csv").read_text() == "keep me"
    cache = tmp_path / "cache.zarr"
    assert np.array_equal(open_dataarray(tmp_path / "a.nii.gz", cache=cache).values, vol)
    # the same cache for another scan is rebuilt, not read back as the first scan
    assert np.array_equal(open_dataarray(tmp_path / "b.nii.gz", cache=cache).values, vol * 2)


def test_an_export_never_replaces_its_input(tmp_path):
    nib = pytest.importorskip("nibabel")
    vol = np.random.default_rng(6).standard_normal((16, 16, 8)).astype(np.float32)
    nib.save(nib.Nifti1Image(vol, nifti_affine()), str(tmp_path / "scan.nii.gz"))
    before = (tmp_path / "scan.nii.gz").read_bytes()
    res = cli(tmp_path, "predict", "scan.nii.gz", "scan.nii.gz", "--model", MODEL,
              "--overwrite", "--quiet")
    assert res.returncode == 2 and "is the input" in res.stderr
    assert (tmp_path / "scan.nii.gz").read_bytes() == before
    res = cli(tmp_path, "predict", "scan.nii.gz", "p.nii.gz", "--model", MODEL,
              "--ensemble", "2", "--quiet")
    assert res.returncode == 2 and "--ensemble" in res.stderr
    assert not (tmp_path / "p.nii.gz").exists()


@pytest.mark.slow  # TIFF is tested through the API above, the CLI's formats through SEG-Y
def test_tiff_stack_from_the_command_line_to_a_stack(tmp_path):
    tifffile = pytest.importorskip("tifffile")
    vol = np.random.default_rng(9).integers(0, 4000, (16, 16, 8)).astype(np.uint16)
    (tmp_path / "stack").mkdir()
    for i, s in enumerate(vol):
        tifffile.imwrite(tmp_path / "stack" / f"img{i:03d}.tiff", s)
    res = cli(tmp_path, "predict", "stack", "pores", "--format", "tiff", "--model", MODEL,
              "--threshold", "0.5", "--normalize", "percentile", "--quiet")
    assert res.returncode == 0, res.stderr
    names = sorted(os.listdir(tmp_path / "pores"))
    assert len(names) == 16 and names[0] == "slice_00000.tif"
    back = open_dataarray(tmp_path / "pores")
    stats = volarray.normalization(vol, "percentile")
    p = reference(seeded(FaultSeg3D), stats(vol[None])[0])[0]
    differ = back.values != (p > 0.5)
    assert back.dtype == np.uint8 and np.all(np.abs(p[differ] - 0.5) < 1e-5)
    res = cli(tmp_path, "predict", "stack", "pores", "--format", "tiff", "--model", MODEL,
              "--threshold", "0.5", "--quiet")
    assert res.returncode == 2 and "--overwrite" in res.stderr  # an earlier stack is kept


@pytest.fixture(params=[0o022, 0o002], ids=["umask022", "umask002"])
def umask(request):
    """The process's umask set for one test and put back after it."""
    old = os.umask(request.param)
    try:
        yield request.param
    finally:
        os.umask(old)


def test_outputs_take_the_process_umask_as_zarr_does(survey, tmp_path, umask):
    """SEG-Y, NIfTI and TIFF outputs (written beside their target, then moved onto it)
    get the modes any new file or folder gets under the umask, as a zarr output does:
    0644 / 0755 under 022, 0664 / 0775 under 002 (not mkstemp's 0600 / mkdtemp's 0700)."""
    pytest.importorskip("nibabel")
    pytest.importorskip("tifffile")
    path, cube, _, _ = survey
    file_mode, dir_mode = 0o666 & ~umask, 0o777 & ~umask
    segy = volarray.formats.segy.write_segy(cube, tmp_path / "f.sgy", like=path)
    nifti = volarray.formats.nifti.write_nifti(cube, tmp_path / "f.nii.gz", affine=np.eye(4))
    tiff = volarray.formats.tiff.write_tiff(cube, tmp_path / "stack")
    volarray.predict_to_zarr(torch.nn.Conv3d(1, 1, 1).eval(), cube, str(tmp_path / "f.zarr"),
                             chunks=8)
    zarr_file = next(os.path.join(d, n) for d, _, names in os.walk(tmp_path / "f.zarr")
                     for n in names)
    for p in (segy, nifti, os.path.join(tiff, "slice_00000.tif"), zarr_file):
        assert oct(os.stat(p).st_mode & 0o777) == oct(file_mode), p
    for p in (tiff, tmp_path / "f.zarr"):
        assert oct(os.stat(p).st_mode & 0o777) == oct(dir_mode), p


def test_cli_nifti_output_is_group_readable_under_umask_002(tmp_path):
    nib = pytest.importorskip("nibabel")
    vol = np.random.default_rng(3).standard_normal((8, 8, 8)).astype(np.float32)
    nib.save(nib.Nifti1Image(vol, nifti_affine()), str(tmp_path / "scan.nii"))
    old = os.umask(0o002)
    try:
        res = cli(tmp_path, "predict", "scan.nii", "seg.nii.gz", "--model", MODEL,
                  "--threshold", "0.5", "--quiet")
    finally:
        os.umask(old)
    assert res.returncode == 0, res.stderr
    assert oct(os.stat(tmp_path / "seg.nii.gz").st_mode & 0o777) == oct(0o664)
