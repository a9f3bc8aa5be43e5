"""Stores by URL through fsspec: fsspec's memory file system and a local S3-compatible
server (moto) that the tests start, for input, output, resume marks, scratch and the
output rules (never the input, never a user's entries)."""
import json
import subprocess
import sys

import numpy as np
import pytest
import zarr

import volarray
from volarray.errors import InputError
from volarray.models import FaultSeg3D, seeded
from volarray.outputs import DONE
from volarray.testing import assert_volume_close

from conftest import random_volume, whole_volume


@pytest.fixture(scope="module")
def model():
    return seeded(FaultSeg3D, width=8)


@pytest.fixture(scope="module")
def volume():
    return random_volume((24, 40, 32), seed=11)


@pytest.fixture(scope="module")
def reference(model, volume):
    return whole_volume(model, volume)


@pytest.fixture
def memfs():
    import fsspec
    fs = fsspec.filesystem("memory")
    root = f"/volarray-test-{np.random.default_rng().integers(1 << 30)}"
    fs.mkdir(root)
    yield root
    fs.rm(root, recursive=True)


def _write_input(url, volume, storage_options=None):
    zarr.create_array(url, shape=volume.shape, chunks=(16, 16, 16), dtype="f4",
                      storage_options=storage_options)[:] = volume


@pytest.mark.parametrize("scratch", [False, True])
def test_memory_urls_in_and_out(memfs, model, volume, reference, scratch):
    _write_input(f"memory://{memfs}/in.zarr", volume)
    out = volarray.predict_to_zarr(model, f"memory://{memfs}/in.zarr",
                                   f"memory://{memfs}/out.zarr", chunks=(16, 24, 20),
                                   scratch=scratch, scheduler="threads")
    assert_volume_close(out[...], reference)
    group = zarr.open_group(f"memory://{memfs}/out.zarr", mode="r")
    assert group[DONE][...].all()
    import fsspec
    # the scratch store beside the output is gone, nothing else was made
    assert sorted(p.rsplit("/", 1)[1] for p in fsspec.filesystem("memory").ls(memfs,
                                                                              detail=False)) \
        == ["in.zarr", "out.zarr"]


def test_memory_url_resume_recomputes_only_unmarked(memfs, model, volume, reference):
    url = f"memory://{memfs}/out.zarr"
    volarray.predict_to_zarr(model, volume, url, chunks=16)
    group = zarr.open_group(url, mode="r+")
    marks = group[DONE][...]
    assert marks.size > 2
    # a run that died: one chunk half-written and unmarked
    group["prediction"][:, :16, :16, :16] = np.nan
    group[DONE][0, 0, 0] = 0
    out = volarray.predict_to_zarr(model, volume, url, chunks=16, resume=True)
    assert_volume_close(out[...], reference)
    assert zarr.open_group(url, mode="r")[DONE][...].all()


def test_url_output_rules(memfs, model, volume):
    import fsspec
    fs = fsspec.filesystem("memory")
    _write_input(f"memory://{memfs}/data/in.zarr", volume)
    # never the input, a store around it, or a store inside it
    for target in ("data/in.zarr", "data", "data/in.zarr/inner"):
        with pytest.raises(InputError, match="input"):
            volarray.predict_to_zarr(model, f"memory://{memfs}/data/in.zarr",
                                     f"memory://{memfs}/{target}", overwrite=True)
    # a user's store is not replaced, even with overwrite=True
    fs.pipe_file(f"{memfs}/theirs.zarr/notes.txt", b"mine")
    with pytest.raises(InputError, match="did not write"):
        volarray.predict_to_zarr(model, volume, f"memory://{memfs}/theirs.zarr", overwrite=True)
    assert fs.cat_file(f"{memfs}/theirs.zarr/notes.txt") == b"mine"
    # overwrite=True replaces volarray's entries of its output and keeps the user's
    url = f"memory://{memfs}/out.zarr"
    volarray.predict_to_zarr(model, volume, url, chunks=16)
    fs.pipe_file(f"{memfs}/out.zarr/README.txt", b"keep me")
    with pytest.raises(InputError, match="exists"):
        volarray.predict_to_zarr(model, volume, url, chunks=16)
    volarray.predict_to_zarr(model, volume * 2, url, chunks=16, overwrite=True)
    assert fs.cat_file(f"{memfs}/out.zarr/README.txt") == b"keep me"
    assert not [p for p in fs.ls(memfs, detail=False) if ".replacing-" in p]
    # a bucket's top is refused
    with pytest.raises(InputError, match="itself"):
        volarray.predict_to_zarr(model, volume, "memory://toplevel")


def test_file_url_is_the_local_path(tmp_path, model, volume, reference):
    out = volarray.predict_to_zarr(model, volume, f"file://{tmp_path}/out.zarr", chunks=16)
    assert_volume_close(out[...], reference)
    assert (tmp_path / "out.zarr" / "zarr.json").is_file()
    with pytest.raises(InputError, match="input"):
        volarray.predict_to_zarr(model, tmp_path / "out.zarr" / "prediction",
                                 f"file://{tmp_path}/out.zarr", overwrite=True)


def test_missing_url_input_names_it(memfs, model):
    with pytest.raises(InputError, match="does not exist"):
        volarray.predict_to_zarr(model, f"memory://{memfs}/nothing.zarr",
                                 f"memory://{memfs}/out.zarr")


# -- a local S3-compatible server ---------------------------------------------------------

@pytest.fixture(scope="module")
def s3():
    pytest.importorskip("s3fs")
    server_mod = pytest.importorskip("moto.server")
    boto3 = pytest.importorskip("boto3")
    server = server_mod.ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    endpoint = f"http://{host}:{port}"
    boto3.client("s3", endpoint_url=endpoint, aws_access_key_id="test",
                 aws_secret_access_key="test", region_name="us-east-1").create_bucket(
        Bucket="survey")
    yield {"key": "test", "secret": "test",
           "client_kwargs": {"endpoint_url": endpoint, "region_name": "us-east-1"}}
    server.stop()


def test_s3_in_and_out_with_resume(s3, model, volume, reference):
    _write_input("s3://survey/in.zarr", volume, storage_options=s3)
    kw = dict(chunks=(16, 24, 20), storage_options=s3)
    out = volarray.predict_to_zarr(model, "s3://survey/in.zarr", "s3://survey/out.zarr",
                                   scratch=True, **kw)
    assert_volume_close(out[...], reference)
    group = zarr.open_group("s3://survey/out.zarr", mode="r+", storage_options=s3)
    group[DONE][0, 0, 0] = 0
    group["prediction"][:, :16, :24, :20] = 0
    out = volarray.predict_to_zarr(model, "s3://survey/in.zarr", "s3://survey/out.zarr",
                                   resume=True, **kw)
    assert_volume_close(out[...], reference)
    import s3fs
    names = sorted(p.rsplit("/", 1)[1] for p in s3fs.S3FileSystem(**s3).ls("survey"))
    assert names == ["in.zarr", "out.zarr"]  # no scratch or staging left
    with pytest.raises(InputError, match="input"):
        volarray.predict_to_zarr(model, "s3://survey/in.zarr", "s3://survey/in.zarr",
                                 overwrite=True, storage_options=s3)


@pytest.mark.slow  # S3 in and out with resume is tested through the API above
def test_cli_s3_urls(s3, model, volume, reference, tmp_path):
    _write_input("s3://survey/cli-in.zarr", volume, storage_options=s3)
    torch = pytest.importorskip("torch")
    torch.save(model.state_dict(), tmp_path / "w.pt")
    (tmp_path / "mymodels.py").write_text(
        "from volarray.models import FaultSeg3D\n\ndef small():\n    return FaultSeg3D(width=8)\n")
    run = subprocess.run(
        [sys.executable, "-m", "volarray.cli", "predict", "s3://survey/cli-in.zarr",
         "s3://survey/cli-out.zarr", "--model", "mymodels:small", "--weights", "w.pt",
         "--chunks", "16", "--quiet", "--storage-options", json.dumps(s3)],
        capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert run.returncode == 0, run.stderr
    out = zarr.open_group("s3://survey/cli-out.zarr", mode="r", storage_options=s3)
    assert_volume_close(out["prediction"][...], reference)
