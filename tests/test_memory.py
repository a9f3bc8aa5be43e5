"""The plan's projected memory agrees with what a run measures."""
import json
import os
import subprocess
import sys

import pytest

SCRIPT = """
import json, sys, threading, time
import numpy as np
import psutil
import volarray
from volarray.models import FaultSeg3D, seeded

proc = psutil.Process()
model = seeded(FaultSeg3D)
vol = np.random.default_rng(0).standard_normal((96, 96, 96)).astype(np.float32)
volarray.predict(model, vol[:24, :24, :24], chunks=24).compute(scheduler="sync")  # warm up
limit = sys.argv[1] if sys.argv[1] != "None" else None
plan = volarray.plan(model, vol, chunks=96, memory_limit=limit)
y = volarray.predict(model, vol, chunks=96, memory_limit=limit)
base, peak, running = proc.memory_info().rss, [0], [True]

def sample():  # the resident set while the run goes, not the process's lifetime peak
    while running[0]:
        peak[0] = max(peak[0], proc.memory_info().rss)
        time.sleep(0.002)
t = threading.Thread(target=sample)
t.start()
out = y.compute(scheduler="sync")
running[0] = False
t.join()
print(json.dumps({"grown": peak[0] - base, "peak": plan.peak_bytes, "kept": plan.kept_bytes,
                  "out": out.nbytes, "slabs": [s.slab for s in plan.stages]}))
"""


def clean_env():
    """Without what a distributed LocalCluster leaves in os.environ (one OpenMP thread,
    an eager malloc trim) or a user's mmap threshold, which change how much memory a
    run holds."""
    leaked = {"MALLOC_TRIM_THRESHOLD_", "MALLOC_MMAP_THRESHOLD_", "OMP_NUM_THREADS",
              "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"}
    return {k: v for k, v in os.environ.items() if k not in leaked}


@pytest.mark.parametrize("limit", [None, "300MB"])
def test_measured_peak_agrees_with_projection(limit):
    """Whole regions (the default here) and regions swept in slabs (a tighter limit):
    a swept task holds one slab's tensors and, per node, only the halo rows the next
    slab reads."""
    res = subprocess.run([sys.executable, "-c", SCRIPT, str(limit)], capture_output=True,
                         text=True, check=True, env=clean_env())
    m = json.loads(res.stdout.strip().splitlines()[-1])
    assert any(m["slabs"]) == (limit is not None), m
    # one task at a time (sync): the largest task's tensors, plus what stays between stages
    projected = m["peak"] + m["kept"] + m["out"]
    assert 0.6 * projected <= m["grown"] <= 1.25 * projected, m


TASKS = """
import json, sys, threading, time
import numpy as np, psutil, volarray
from dask.callbacks import Callback
from volarray.models import FaultSeg3D, seeded
n, c = 192, 96
proc = psutil.Process()
model = seeded(FaultSeg3D)
vol = np.random.default_rng(0).standard_normal((n,) * 3).astype(np.float32)
volarray.predict(model, vol[:24, :24, :24], chunks=24).compute(scheduler="sync")  # warm up
plan = volarray.plan(model, vol, chunks=c)
y = volarray.predict(model, vol, chunks=c)
grown, running, now = {}, [True], {"peak": 0, "base": 0}

def sample():
    while running[0]:
        now["peak"] = max(now["peak"], proc.memory_info().rss)
        time.sleep(0.002)

class Growth(Callback):  # each task's growth of the resident set
    def _pretask(self, key, dsk, state):
        now.update(base=proc.memory_info().rss, peak=0)

    def _posttask(self, key, result, dsk, state, id):
        grown[str(key)] = now["peak"] - now["base"]
t = threading.Thread(target=sample)
t.start()
with Growth():
    y[:, c:, c:, c:].compute(scheduler="sync")  # each stage's tasks around one corner
# (the output stage's tasks are fused with the slicing: key_split of their name keeps only
# 'volarray-stage', so the fused task is 'getitem-volarray-stage-...')
running[0] = False
t.join()
print(json.dumps([{"stage": s.output, "projected": s.peak_bytes, "slab": s.slab,
                   "grown": max(v for k, v in grown.items() if f"volarray-stage-{s.index}-" in k
                                or s is plan.stages[-1] and "getitem-volarray-stage" in k)}
                  for s in plan.stages]))
"""


def test_each_stages_tasks_grow_memory_as_projected():
    """A multi-stage plan's swept tasks, each measured alone: with glibc's rising mmap
    threshold the slab tensors fragmented its arenas and the 192^3 output stage's task
    grew the resident set 1.46x its projection (467 MB against 320 MB; 1.6x at 256^3);
    with large tensors mapped (`volarray.heap.use_mapped_tensors`) 1.02x."""
    res = subprocess.run([sys.executable, "-c", TASKS], capture_output=True, text=True,
                         check=True, env=clean_env())
    stages = json.loads(res.stdout.strip().splitlines()[-1])
    assert len(stages) > 1 and all(s["slab"] for s in stages), stages
    for s in stages:
        assert s["grown"] <= 1.25 * s["projected"], stages


OUT_OF_CORE = """
import json, resource, sys, tempfile
from pathlib import Path
import volarray
from volarray.models import FaultSeg3D, seeded
from volarray.synthetic import seismic_to_zarr
n = int(sys.argv[1])
tmp = Path(tempfile.mkdtemp())
seismic_to_zarr(tmp / "in.zarr", (n, n, n), seed=1)
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
volarray.predict_to_zarr(seeded(FaultSeg3D), tmp / "in.zarr", tmp / "out.zarr")
print(json.dumps({"peak": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
                  "left": sorted(p.name for p in tmp.iterdir())}))
"""


@pytest.mark.slow
def test_out_of_core_512_cubed_stays_under_3GB():
    """FaultSeg3D from a 512^3 zarr to zarr (3.5 minutes here)."""
    res = subprocess.run([sys.executable, "-c", OUT_OF_CORE, "512"], capture_output=True,
                         text=True, check=True, env=clean_env())
    m = json.loads(res.stdout.strip().splitlines()[-1])
    assert m["peak"] <= 3e9, m
    assert m["left"] == ["in.zarr", "out.zarr"]  # the scratch store is gone


def test_every_task_returns_its_freed_heap(monkeypatch):
    """Each tile and statistics task holding more than TRIM_AFTER_BYTES gives its freed
    heap back (malloc_trim) before the next: without it glibc's per-thread arenas made
    a 512^3 run peak 15% higher. Small tasks leave their few freed blocks to the next
    (a trim cost 0.55 ms, a third of a FaultSSL task's own work)."""
    import numpy as np
    import volarray
    import volarray.worker
    from volarray.heap import release_freed_memory
    from volarray.models import InstanceNormUNet, seeded
    calls = []
    monkeypatch.setattr(volarray.worker, "release_freed_memory",
                        lambda: calls.append(1) or release_freed_memory())
    vol = np.random.default_rng(0).standard_normal((40, 36, 32)).astype(np.float32)
    model = seeded(InstanceNormUNet)
    plan = volarray.plan(model, vol, chunks=16)
    volarray.predict(model, vol, chunks=16).compute(scheduler="sync")
    assert calls == []  # tasks of a few hundred kB
    monkeypatch.setattr(volarray.worker, "TRIM_AFTER_BYTES", 0)
    volarray.predict(model, vol * 2, chunks=16).compute(scheduler="sync")
    picking = sum(b.n_tasks for b in plan.barriers if b.by_stage is not None)
    assert len(calls) == plan.n_tasks - picking > len(plan.stages)  # each that runs ops
    if sys.platform.startswith("linux"):
        assert volarray.heap._TRIM is not None  # glibc: the trim is real here


def test_heap_reuse_keeps_freed_memory_for_the_next_task(monkeypatch, tmp_path, capsys):
    """VOLARRAY_HEAP=reuse: glibc's threshold fixed at its 32 MB ceiling and no trim
    after tasks (the default returns freed memory: 1 MB threshold, a trim); the same
    numbers either way. A value other than 'return' or 'reuse' is refused by name
    before any task runs."""
    import numpy as np
    import volarray
    import volarray.heap as heap
    import volarray.worker
    from volarray.errors import InputError
    from volarray.models import InstanceNormUNet, seeded
    from conftest import whole_volume
    calls, trims = [], []
    monkeypatch.setattr(heap, "_MALLOPT", lambda param, value: calls.append((param, value)) or 1)
    monkeypatch.setattr(heap, "_TRIM", lambda pad: trims.append(pad) or 1)
    monkeypatch.delenv("MALLOC_MMAP_THRESHOLD_", raising=False)
    monkeypatch.setattr(heap, "_done", [])
    monkeypatch.setenv("VOLARRAY_HEAP", "reuse")
    assert heap.use_mapped_tensors()
    assert calls == [(-3, heap.REUSE_MMAP_THRESHOLD), (-1, heap.REUSE_TRIM_THRESHOLD)]
    assert not heap.release_freed_memory() and trims == []
    monkeypatch.setattr(volarray.worker, "TRIM_AFTER_BYTES", 0)  # every task would trim
    model = seeded(InstanceNormUNet)
    vol = np.random.default_rng(0).standard_normal((40, 36, 32)).astype(np.float32)
    want = whole_volume(model, vol)
    y = volarray.predict(model, vol, chunks=16).compute(scheduler="sync")
    np.testing.assert_allclose(y, want, atol=1e-5)
    assert trims == []
    monkeypatch.setattr(heap, "_done", [])
    monkeypatch.setenv("VOLARRAY_HEAP", "Return")
    assert heap.use_mapped_tensors() and calls[-1] == (-3, heap.MMAP_THRESHOLD)
    assert heap.release_freed_memory() and trims == [0]
    y = volarray.predict(model, vol * 1, chunks=16).compute(scheduler="sync")
    np.testing.assert_allclose(y, want, atol=1e-5)
    assert len(trims) > 1  # the default trims after each task
    monkeypatch.setenv("VOLARRAY_HEAP", "recycle")
    with pytest.raises(InputError, match="VOLARRAY_HEAP='recycle'.*'reuse'"):
        volarray.predict(model, vol, chunks=16)
    from volarray.cli import main  # the command line says so, and writes nothing
    monkeypatch.chdir(tmp_path)
    np.save("v.npy", vol[:32, :32, :32])
    code = main(["predict", "v.npy", "o.zarr", "--model", "volarray.models:FaultSeg3D",
                 "--quiet"])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("volarray: error: VOLARRAY_HEAP='recycle' is "
                                          "neither"), err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["v.npy"]


def test_a_host_that_takes_freed_memory_back_is_named_in_the_plan(monkeypatch, tmp_path):
    """A virtio balloon with free page reporting (feature bit 5) means the host takes
    back what tasks free; the plan says the projection leaves that out and names
    VOLARRAY_HEAP=reuse. Other virtio devices, a balloon without the bit, no sysfs:
    nothing said. Where VOLARRAY_HEAP is set (the user chose), nothing either."""
    import numpy as np
    import volarray
    import volarray.heap as heap
    from volarray.models import FaultSeg3D, seeded
    from volarray.planner import host_memory_notes

    def device(name, kind, bits):
        d = tmp_path / name
        d.mkdir()
        (d / "device").write_text(kind + "\n")
        (d / "features").write_text(bits + "\n")
    monkeypatch.setattr(heap, "VIRTIO_DEVICES", str(tmp_path / "missing"))
    assert not heap.host_takes_freed_memory()
    monkeypatch.setattr(heap, "VIRTIO_DEVICES", str(tmp_path))
    device("virtio0", "0x0002", "0" * 5 + "1" + "0" * 58)  # a block device, bit 5 set
    device("virtio1", "0x0005", "0110" + "0" * 60)  # a balloon without reporting
    assert not heap.host_takes_freed_memory()
    monkeypatch.delenv("VOLARRAY_HEAP", raising=False)
    assert heap.heap_policy() == "return"  # the default, which the other tests pin
    model, vol = seeded(FaultSeg3D), np.zeros((32, 32, 32), np.float32)
    assert not any("free page reporting" in n for n in volarray.plan(model, vol).notes)
    device("virtio2", "0x0005", "011001" + "0" * 58)  # reporting
    assert heap.host_takes_freed_memory()
    note = volarray.plan(model, vol).notes[-1]
    assert "free page reporting" in note and "VOLARRAY_HEAP=reuse" in note, note
    assert "free page reporting" in str(volarray.plan(model, vol))
    assert host_memory_notes("cuda:0") == []  # a GPU's tensors are not the host's heap
    for chosen in ("reuse", "return"):  # the user chose
        monkeypatch.setenv("VOLARRAY_HEAP", chosen)
        assert host_memory_notes("cpu") == []


def test_a_users_mmap_threshold_is_left_alone(monkeypatch):
    """The threshold is fixed once per process, and never over one the user set for
    glibc (``MALLOC_MMAP_THRESHOLD_``)."""
    import volarray.heap as heap
    calls = []
    monkeypatch.setattr(heap, "_MALLOPT", lambda param, value: calls.append((param, value)) or 1)
    monkeypatch.setattr(heap, "_done", [])
    monkeypatch.setenv("MALLOC_MMAP_THRESHOLD_", "65536")
    assert not heap.use_mapped_tensors() and calls == []
    monkeypatch.delenv("MALLOC_MMAP_THRESHOLD_")
    assert heap.use_mapped_tensors() and not heap.use_mapped_tensors()
    assert calls == [(-3, heap.MMAP_THRESHOLD)]


def heap_mode():
    from volarray.heap import kernel_thp_mode
    return kernel_thp_mode().get("mode")


@pytest.mark.skipif(heap_mode() != "madvise", reason="the kernel's huge pages are not in madvise mode")
@pytest.mark.parametrize("setting, asked", [(None, True), ("0", False)])
def test_importing_volarray_asks_torch_for_huge_pages(setting, asked):
    """Importing volarray before torch allocates asks torch for huge pages (a tile's
    freshly allocated tensors fault in 2 MB at a time, not 4 kB), unless the user set
    ``THP_MEM_ALLOC_ENABLE`` themselves; after torch allocated, it is too late. The
    variable is not left behind for child processes."""
    env = {k: v for k, v in clean_env().items() if k != "THP_MEM_ALLOC_ENABLE"}
    if setting is not None:
        env["THP_MEM_ALLOC_ENABLE"] = setting
    code = ("import os, torch; import volarray; from volarray.heap import huge_pages_requested;"
            "print(huge_pages_requested(), os.environ.get('THP_MEM_ALLOC_ENABLE'))")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True,
                         text=True, check=True).stdout.split()
    assert out == [str(asked), str(setting)]
    late = ("import torch; torch.zeros(1 << 20); import volarray;"
            "from volarray.heap import huge_pages_requested; print(huge_pages_requested())")
    out = subprocess.run([sys.executable, "-c", late], env=env, capture_output=True,
                         text=True, check=True).stdout.split()
    assert out == ["False"]


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="prctl is Linux's")
def test_a_short_run_keeps_huge_pages_off_and_a_long_one_on():
    """A run planned below SMALL_RUN_MACS turns the process's huge pages off while its
    tasks run (their first touch costs more than a short run saves); a longer one
    leaves them on."""
    import ctypes

    import dask.array as da
    import numpy as np
    import volarray
    from volarray.heap import SMALL_RUN_MACS
    from volarray.models import FaultSeg3D, seeded
    prctl = ctypes.CDLL("libc.so.6").prctl

    def runner(y):
        return next(v for v in y.dask.values() if hasattr(v, "huge_pages"))

    model = seeded(FaultSeg3D)
    try:
        small = volarray.predict(model, np.zeros((16, 16, 16), np.float32))
        assert not runner(small).huge_pages
        seen = []
        original = runner(small).run

        def run(*args):  # the flag while the task runs (PR_GET_THP_DISABLE)
            seen.append(prctl(42, 0, 0, 0, 0))
            return original(*args)
        runner(small).run = run
        small.compute(scheduler="sync")
        assert seen == [1] and prctl(42, 0, 0, 0, 0) == 0  # off while it ran, then back
        vol = da.zeros((256, 256, 256), dtype=np.float32, chunks=128)  # nothing computed
        plan = volarray.plan(model, vol)
        assert plan.planned_macs >= SMALL_RUN_MACS
        assert runner(volarray.predict(model, vol)).huge_pages
    finally:
        prctl(41, 0, 0, 0, 0)  # PR_SET_THP_DISABLE off, as the process started
