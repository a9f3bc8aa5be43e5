"""A cluster reached as on HPC systems: `dask scheduler --scheduler-file F` and `dask
worker --scheduler-file F` started from the command line as separate processes talking
TCP, used by `volarray predict --scheduler-file F` and `predict_to_zarr(scheduler_file=)`;
and the SLURM recipe of the README (dask-jobqueue's job script, one GPU per job)."""
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import zarr

import volarray
from volarray.models import FaultSeg3D, seeded
from volarray.testing import assert_volume_close

from conftest import random_volume, whole_volume

distributed = pytest.importorskip("distributed")
ROOT = Path(__file__).resolve().parent.parent
DASK = [sys.executable, "-m", "distributed.cli.dask_scheduler"]
WORKER = [sys.executable, "-m", "distributed.cli.dask_worker"]


def environment():
    """This checkout first on the path of every process (as an editable install)."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT)] + [p for p in [env.get("PYTHONPATH")] if p])
    return env


def stop(procs):
    for p in reversed(procs):  # the workers, then the scheduler
        if p.poll() is None:
            p.send_signal(signal.SIGTERM)
    for p in reversed(procs):
        try:
            p.wait(timeout=20)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()


@pytest.fixture(scope="module")
def scheduler_file(tmp_path_factory):
    """A scheduler and two single-threaded workers, each its own process, found through
    the scheduler file; all stopped at the end, whatever happened. The scheduler keeps
    layer annotations (GPU resources): DASK_OPTIMIZATION__FUSE__ACTIVE=False."""
    d = tmp_path_factory.mktemp("cluster")
    f, env, procs = d / "scheduler.json", environment(), []
    logs = [open(d / f"{name}.log", "w") for name in ("scheduler", "worker-0", "worker-1")]
    try:
        procs.append(subprocess.Popen(
            DASK + ["--scheduler-file", str(f), "--host", "127.0.0.1", "--port", "0",
                    "--dashboard-address", ":0"],
            cwd=d, env=dict(env, DASK_OPTIMIZATION__FUSE__ACTIVE="False"),
            stdout=logs[0], stderr=subprocess.STDOUT))
        deadline = time.time() + 60
        while not f.exists() and time.time() < deadline:
            time.sleep(0.1)
        for log in logs[1:]:
            procs.append(subprocess.Popen(
                WORKER + ["--scheduler-file", str(f), "--nthreads", "1", "--nworkers", "1",
                          "--no-nanny", "--dashboard-address", ":0", "--host", "127.0.0.1"],
                cwd=d, env=env, stdout=log, stderr=subprocess.STDOUT))
        with distributed.Client(scheduler_file=str(f), timeout="60s") as client:
            client.wait_for_workers(2, timeout=120)
        yield f
    finally:
        stop(procs)
        for log in logs:
            log.close()
    assert all(p.poll() is not None for p in procs)


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    d = tmp_path_factory.mktemp("survey")
    torch.manual_seed(0)
    model = seeded(FaultSeg3D, width=4)
    torch.save(model.state_dict(), d / "w.pt")
    (d / "mymodels.py").write_text(
        "from volarray.models import FaultSeg3D\n\ndef small():\n"
        "    return FaultSeg3D(width=4)\n")
    vol = random_volume((16, 24, 32), seed=5)
    zarr.open_group(str(d / "survey.zarr"), mode="w").create_array(
        "amplitude", data=vol, chunks=(8, 8, 16))
    return d, model, vol


def cli(*args, cwd):
    return subprocess.run([sys.executable, "-m", "volarray.cli", *map(str, args)], cwd=cwd,
                          env=environment(), capture_output=True, text=True, timeout=300)


def test_cli_scheduler_file_is_exact(scheduler_file, work):
    """The workers run in another folder: the user's model module (mymodels.py here)
    need not be importable there."""
    d, model, vol = work
    common = ("--model", "mymodels:small", "--weights", "w.pt", "--var", "amplitude",
              "--chunks", "8", "--quiet")
    r = cli("predict", "survey.zarr", "cluster.zarr", *common, "--scheduler-file",
            scheduler_file, cwd=d)
    assert r.returncode == 0, r.stderr
    assert "ERROR" not in r.stderr and "Traceback" not in r.stderr, r.stderr
    out = zarr.open_group(str(d / "cluster.zarr"), mode="r")["prediction"][...]
    local = volarray.predict(model, vol, chunks=8).compute(scheduler="sync")
    assert_volume_close(out, local, atol=1e-6)
    assert_volume_close(out, whole_volume(model, vol))
    with distributed.Client(scheduler_file=str(scheduler_file)) as client:
        ran = client.run_on_scheduler(lambda dask_scheduler: sorted(dask_scheduler.task_prefixes))
    assert {"volarray-stage", "volarray-write"} <= set(ran), ran  # the work ran there


def test_predict_to_zarr_scheduler_file(scheduler_file, work, tmp_path):
    d, model, vol = work
    out = volarray.predict_to_zarr(model, str(d / "survey.zarr"), str(tmp_path / "o.zarr"),
                                   var="amplitude", chunks=8, scheduler_file=scheduler_file)
    assert_volume_close(out[...], whole_volume(model, vol))
    with pytest.raises(volarray.InputError, match="pass one of them"):
        volarray.predict_to_zarr(model, str(d / "survey.zarr"), str(tmp_path / "p.zarr"),
                                 var="amplitude", scheduler="sync",
                                 scheduler_file=scheduler_file)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks a client without CUDA")
def test_gpu_tasks_claim_the_gpu_resource_on_the_cluster(scheduler_file, work):
    """From a machine without CUDA (a login node), under a client of the cluster,
    device='cuda' builds; its tile tasks reach the scheduler restricted to workers with
    a GPU resource, so on these workers (none) they wait instead of running. (In dask
    2026.8 the scheduler optimizes the graph, and dask.array's low-level fusion drops
    layer annotations: this scheduler runs with it off, as the README says.)"""
    _, model, vol = work
    with pytest.raises(volarray.InputError, match="sees no CUDA device"):
        volarray.predict(model, vol, chunks=8, device="cuda")  # no client: refused
    with distributed.Client(scheduler_file=str(scheduler_file)) as client:
        future = client.compute(volarray.predict(model, vol, chunks=8, device="cuda"))
        try:
            deadline = time.time() + 30
            while time.time() < deadline:
                restricted = client.run_on_scheduler(lambda dask_scheduler: {
                    ts.prefix.name: ts.resource_restrictions
                    for ts in dask_scheduler.tasks.values()})
                if "volarray-stage" in restricted:
                    break
                time.sleep(0.2)
            assert restricted["volarray-stage"] == {"GPU": 1}, restricted
            assert future.status == "pending"
        finally:
            client.cancel(future)


def test_a_missing_scheduler_file_is_one_line(work):
    d, _, _ = work
    r = cli("predict", "survey.zarr", "x.zarr", "--model", "mymodels:small", "--var",
            "amplitude", "--scheduler-file", "nowhere.json", cwd=d)
    assert r.returncode == 2
    assert r.stderr.startswith(  # the CLI words the parameter as its flag, once
        "volarray: error: --scheduler-file nowhere.json does not exist"), r.stderr
    assert "dask scheduler --scheduler-file nowhere.json" in r.stderr
    assert "Traceback" not in r.stderr and not (d / "x.zarr").exists()


def test_slurm_recipe_job_script():
    """The README's SLURM recipe, built without SLURM: each job asks for one GPU and
    starts one worker holding the GPU resource that volarray's GPU tasks claim."""
    jobqueue = pytest.importorskip("dask_jobqueue")
    cluster = jobqueue.SLURMCluster(
        cores=8, processes=1, memory="64GB", walltime="04:00:00",
        job_extra_directives=["--gres=gpu:1"], worker_extra_args=["--resources", "GPU=1"],
        scheduler_options={"dashboard_address": ":0", "host": "127.0.0.1"})
    try:
        script = cluster.job_script()
    finally:
        cluster.close()
    lines = script.splitlines()
    assert "#SBATCH --gres=gpu:1" in lines
    assert "#SBATCH --cpus-per-task=8" in lines
    worker = next(line for line in lines if "dask_worker" in line or "dask worker" in line)
    assert "--resources GPU=1" in worker and "--nthreads 8" in worker
