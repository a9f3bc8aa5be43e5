"""The cost model (issue 27): rates (given, cached, calibrated), a plan's projected
time and its three parts, keep-or-recompute by time within the storage budget, and
plans the budgets make pathological (noted, warned, refused)."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest

import volarray
from volarray import rates as R
from volarray.costing import project
from volarray.models import FaultSeg3D, seeded

FAST = "macs=2e10,bytes=1e9,task=0.0002"
VOL64 = np.zeros((64,) * 3, np.float32)


@pytest.fixture
def cache(tmp_path, monkeypatch):
    """An empty rates cache in tmp_path, no rates in the environment, and a
    calibration that takes no time (and counts its calls)."""
    monkeypatch.setenv("VOLARRAY_CACHE_DIR", str(tmp_path))
    monkeypatch.delenv("VOLARRAY_RATES", raising=False)
    calls = []

    def fake(device="cpu", where=None):
        calls.append(device)
        return R.Rates(3e10, 2e9, 1e-3, "calibrated", 5e9)
    monkeypatch.setattr(R, "calibrate", fake)
    return calls


def test_rates_from_the_environment_and_refused_when_malformed(monkeypatch):
    monkeypatch.setenv("VOLARRAY_RATES", "macs=1e10, bytes=5e8, task=0.01")
    r = R.rates_for("cpu")
    assert (r.macs_per_s, r.bytes_per_s, r.task_s, r.source) == (1e10, 5e8, 0.01,
                                                                 "VOLARRAY_RATES")
    for bad in ("macs=1e10,bytes=5e8", "macs=fast,bytes=1,task=1", "macs=0,bytes=1,task=1",
                "flops=1,bytes=1,task=1"):
        monkeypatch.setenv("VOLARRAY_RATES", bad)
        with pytest.raises(volarray.InputError, match="VOLARRAY_RATES"):
            R.rates_for("cpu")


def test_the_memory_rate_is_optional_in_the_environment_and_costs_op_outputs(monkeypatch):
    """mem= costs every op's output bytes (norms, activations, a sweep's copies) at its
    rate: a fourth part of the projection, shown in the plan; without it, three."""
    model = seeded(FaultSeg3D)
    monkeypatch.setenv("VOLARRAY_RATES", FAST + ",mem=4e9")
    r = R.rates_for("cpu")
    assert r.memory_bytes_per_s == 4e9 and "memory-bound ops 4 GB/s" in r.text()
    plan = volarray.plan(model, VOL64, chunks=32)
    t = plan.projection
    # every op's output at least once over the volume: more than the output's bytes
    assert plan.touched_bytes > 16 * VOL64.nbytes
    assert t.memory_s == pytest.approx(plan.touched_bytes / 4e9)
    assert plan.projected_seconds == pytest.approx(t.compute_s + t.io_s + t.overhead_s
                                                   + t.memory_s)
    assert f"memory-bound ops {t.memory_s:.3g} s" in str(plan)
    # recomputation touches more: a plan keeping nothing computes and touches more
    bare = volarray.plan(model, VOL64, chunks=16, keep=0)
    assert bare.touched_bytes > volarray.plan(model, VOL64, chunks=16).touched_bytes
    monkeypatch.setenv("VOLARRAY_RATES", FAST)
    plain = volarray.plan(model, VOL64, chunks=32)
    assert plain.projection.memory_s == 0 and "memory-bound" not in str(plain)
    monkeypatch.setenv("VOLARRAY_RATES", FAST + ",mem=0")
    with pytest.raises(volarray.InputError, match="memory_bytes_per_s"):
        R.rates_for("cpu")


def test_op_outputs_counted_once_a_fused_relu_free_and_statistics_read():
    """touched_bytes over one whole-volume task: a conv's output, not again for the ReLU
    its kernel runs; a norm's statistics task reads its input once more (at the
    statistics' passes); a SiLU, a trilinear upsampling and a max pool weigh their
    output bytes by their ops' measured passes."""
    from volarray.costing import STATS_PASSES
    from volarray.ops.pointwise import TRANSCENDENTAL_PASSES
    from volarray.ops.pool import POOL_PASSES
    from volarray.ops.resample import LINEAR_PASSES
    import torch.nn as nn
    vol = np.zeros((16, 12, 10), np.float32)
    out = 4 * 4 * vol.size  # 4 channels of float32
    fused = nn.Sequential(nn.Conv3d(1, 4, 3, padding=1), nn.ReLU()).eval()
    assert volarray.plan(fused, vol, chunks=vol.shape).touched_bytes == out
    normed = nn.Sequential(nn.Conv3d(1, 4, 3, padding=1), nn.InstanceNorm3d(4)).eval()
    plan = volarray.plan(normed, vol, chunks=vol.shape)
    (barrier,) = plan.barriers
    # the stage: conv and norm outputs; the barrier: the conv recomputed, then read
    assert plan.stages[-1].touched_bytes == 2 * out
    assert barrier.touched_bytes == (out + int(STATS_PASSES * out) if barrier.recomputed
                                     else int(STATS_PASSES * out))
    silu = nn.Sequential(nn.Conv3d(1, 4, 3, padding=1), nn.SiLU()).eval()
    assert volarray.plan(silu, vol, chunks=vol.shape).touched_bytes == \
        int(out + TRANSCENDENTAL_PASSES * out)
    up = nn.Sequential(nn.Conv3d(1, 4, 3, padding=1), nn.MaxPool3d(2),
                       nn.Upsample(scale_factor=2, mode="trilinear")).eval()
    assert volarray.plan(up, vol, chunks=vol.shape).touched_bytes == \
        int(out + POOL_PASSES["max"] * out / 8 + LINEAR_PASSES * out)
    for cheap in (nn.LeakyReLU(0.01), nn.Hardtanh(), nn.Hardsigmoid()):  # no "elu", "tanh"
        net = nn.Sequential(nn.Conv3d(1, 4, 3, padding=1), cheap).eval()  # in their names
        assert volarray.plan(net, vol, chunks=vol.shape).touched_bytes == 2 * out
    near = nn.Sequential(nn.Conv3d(1, 4, 3, padding=1), nn.Upsample(scale_factor=2)).eval()
    assert volarray.plan(near, vol, chunks=vol.shape).touched_bytes == out + 8 * out


def test_calibrated_once_then_read_from_the_cache(cache, tmp_path):
    first = R.rates_for("cpu")
    assert cache == ["cpu"] and first.source == "calibrated"
    again = R.rates_for("cpu")  # from the JSON file: no second calibration
    assert cache == ["cpu"] and again.source.startswith("cache ")
    assert (again.macs_per_s, again.bytes_per_s, again.task_s,
            again.memory_bytes_per_s) == (3e10, 2e9, 1e-3, 5e9)
    data = json.loads((tmp_path / "rates.json").read_text())
    assert list(data) == [R.machine_key("cpu")] and "measured" in data[R.machine_key("cpu")]
    del data[R.machine_key("cpu")]["memory_bytes_per_s"]  # cached before the memory rate
    (tmp_path / "rates.json").write_text(json.dumps(data))
    assert R.rates_for("cpu").source == "calibrated" and cache == ["cpu", "cpu"]
    (tmp_path / "rates.json").write_text("{ damaged")
    R.rates_for("cpu")  # a damaged cache is measured again, not an error
    assert cache == ["cpu", "cpu", "cpu"]


def test_an_unwritable_cache_does_not_stop_a_run(cache, tmp_path, monkeypatch):
    """A read-only home (an HPC node): the rates are measured and used, not saved."""
    def refuse(*args, **kwargs):
        raise PermissionError(13, "Permission denied", str(tmp_path / "rates.json"))
    monkeypatch.setattr(R, "save", refuse)
    assert R.rates_for("cpu").source == "calibrated" and cache == ["cpu"]
    assert volarray.plan(seeded(FaultSeg3D, width=4), np.zeros((16,) * 3, np.float32)) \
        .rates.source == "calibrated"


def test_calibrate_command_measures_and_caches(cache, tmp_path, capsys):
    from volarray.cli import main
    assert main(["calibrate"]) == 0
    assert cache == ["cpu"] and "GMAC/s" in capsys.readouterr().out
    assert R.cached("cpu").macs_per_s == 3e10


def test_entries_from_before_the_engine_task_probe_are_measured_again(cache, tmp_path):
    R.rates_for("cpu")
    data = json.loads((tmp_path / "rates.json").read_text())
    assert data[R.machine_key("cpu")]["calibration"] == R.CALIBRATION
    del data[R.machine_key("cpu")]["calibration"]  # cached with a trivial dask task's rate
    (tmp_path / "rates.json").write_text(json.dumps(data))
    assert R.rates_for("cpu").source == "calibrated" and cache == ["cpu", "cpu"]


def test_the_task_probe_sets_the_task_rate_and_its_runs_see_provisional_rates(monkeypatch):
    """`calibrate` asks the registered probe (volarray's own tasks) for the per-task
    rate; the probe's own plans get the rates measured so far, not a calibration
    inside the calibration."""
    monkeypatch.delenv("VOLARRAY_RATES", raising=False)
    for name, value in (("measure_macs", 3e10), ("measure_bytes", 2e9), ("measure_task", 1e-4),
                        ("measure_memory", 5e9)):
        monkeypatch.setattr(R, name, lambda *a, v=value, **k: v)
    seen = []

    def probe(device):
        seen.append(R.rates_for(device))  # what a plan inside the probe is costed at
        return 1.5e-3
    monkeypatch.setattr(R, "_task_probe", probe)
    got = R.calibrate("cpu")
    assert got.task_s == 1.5e-3 and got.macs_per_s == 3e10
    assert seen[0].task_s == 1e-4 and seen[0].memory_bytes_per_s == 5e9
    assert R._provisional.get() is None  # gone once measured


def test_engine_tasks_cost_more_than_trivial_dask_tasks():
    """The real probe: a volarray task (region read, ops, statistics, output) costs
    more than a trivial dask task (1.0-1.3 ms against 0.07 here)."""
    from volarray.taskprobe import engine_task_seconds
    assert R._task_probe is engine_task_seconds  # registered by importing volarray
    engine, trivial = engine_task_seconds("cpu"), R.measure_task()
    assert engine > 2 * trivial, (engine, trivial)


@pytest.mark.slow
def test_calibrate_command_in_a_subprocess(tmp_path):
    """The real calibration (a few seconds), as a user runs it."""
    env = {**os.environ, "VOLARRAY_CACHE_DIR": str(tmp_path), "PYTHONPATH": os.getcwd()}
    env.pop("VOLARRAY_RATES", None)
    run = subprocess.run([sys.executable, "-m", "volarray.cli", "calibrate"], env=env,
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    rates = R.Rates(**{k: v for k, v in json.loads((tmp_path / "rates.json").read_text())
                       [R.machine_key("cpu")].items() if k not in ("measured", "calibration")})
    assert rates.macs_per_s > 1e8 and rates.bytes_per_s > 1e6 and rates.task_s < 0.1
    assert rates.memory_bytes_per_s > 1e7


def test_plan_shows_its_projected_time_in_three_parts(monkeypatch):
    monkeypatch.setenv("VOLARRAY_RATES", FAST)
    plan = volarray.plan(seeded(FaultSeg3D), VOL64, chunks=32)
    t = plan.projection
    assert t.compute_s == pytest.approx(plan.planned_macs / 2e10)
    assert t.io_s == pytest.approx(plan.moved_bytes / 1e9)
    assert t.overhead_s == pytest.approx(plan.n_tasks * 2e-4)
    assert plan.projected_seconds == pytest.approx(t.compute_s + t.io_s + t.overhead_s)
    # at least the input read and the output written
    assert plan.moved_bytes >= 2 * VOL64.nbytes
    assert plan.storage == "memory" and plan.storage_bytes == plan.kept_bytes
    text = str(plan)
    assert f"projected time {t.seconds:.3g} s: compute {t.compute_s:.3g} s" in text
    assert "overhead" in text and "rates: VOLARRAY_RATES" in text
    assert volarray.plan(seeded(FaultSeg3D), VOL64, scratch=True).storage == "scratch"


def test_scratch_runs_keep_within_half_the_free_disk_and_keep_caps_it(monkeypatch):
    monkeypatch.setenv("VOLARRAY_RATES", FAST)
    monkeypatch.setattr("volarray.keep.free_disk", lambda where=None: 10 ** 9)
    model = seeded(FaultSeg3D)
    # within the input's bytes first; the disk's room only where that costs much compute
    assert volarray.plan(model, VOL64, scratch=True).keep_budget == VOL64.nbytes
    tight = volarray.plan(model, VOL64, scratch=True, memory_limit="45MB")
    assert tight.keep_budget == 5 * 10 ** 8 and tight.compute_ratio < 1.5, str(tight)
    assert volarray.plan(model, VOL64, scratch=True, memory_limit="45MB",
                         keep="1x").compute_ratio > 3  # keep= caps it
    assert volarray.plan(model, VOL64, scratch=True, keep="2x").keep_budget == 2 * VOL64.nbytes
    assert volarray.plan(model, VOL64, scratch=True, keep="8GB").keep_budget == 5 * 10 ** 8
    assert volarray.plan(model, VOL64).keep_budget == VOL64.nbytes  # lazy: memory, as before


def test_what_is_kept_follows_the_storage_rate(monkeypatch):
    """The same budgets: with fast storage the planner keeps more tensors on scratch and
    computes less; with slow storage writing them costs more than recomputing them."""
    model = seeded(FaultSeg3D)
    plans = {}
    for rate in (1e9, 1e5):
        monkeypatch.setenv("VOLARRAY_RATES", f"macs=2e10,bytes={rate},task=0.0002")
        plans[rate] = volarray.plan(model, VOL64, memory_limit="16MB", scratch=True,
                                     keep="64x")
    fast, slow = plans[1e9], plans[1e5]
    assert fast.kept_bytes > slow.kept_bytes and fast.compute_ratio < slow.compute_ratio
    assert fast.moved_bytes > slow.moved_bytes
    for p, other in ((fast, slow), (slow, fast)):  # each the faster at its own rates
        assert p.projected_seconds < project(other.stages + other.barriers, p.rates).seconds


def test_budget_that_forces_much_compute_is_named(monkeypatch):
    """keep='1x' in tasks of 45 MB: 3.5x one forward where keeping 27.5 MB computes
    1.07x: the plan says so and validate warns, naming keep=; with tasks that fit only
    8^3 chunks it is 90x, refused before anything runs."""
    monkeypatch.setenv("VOLARRAY_RATES", FAST)
    model = seeded(FaultSeg3D)
    plan = volarray.plan(model, VOL64, memory_limit="45MB", keep="1x")
    assert plan.shortfall is not None and plan.shortfall.parameter == "keep"
    assert "slow plan: compute 3.71x is 3.5x the 1.07x of a plan with more storage: pass " \
           "keep='27.5 MB'" in str(plan)
    with pytest.warns(volarray.SlowPlanWarning, match="keep='27.5 MB'"):
        plan.validate()
    with pytest.warns(volarray.SlowPlanWarning, match="keep="):
        volarray.predict(model, VOL64, memory_limit="45MB", keep="1x")
    tight = volarray.plan(model, VOL64, memory_limit="8MB", keep="1x").peak_bytes
    worse = volarray.plan(model, VOL64, memory_limit=tight, keep="1x")
    assert worse.compute_ratio > 20 * worse.shortfall.best
    with pytest.raises(volarray.MemoryBudgetError, match="refused: .* pass keep=") as e:
        worse.validate()
    assert e.value.parameter == "keep"
    assert volarray.plan(model, VOL64, memory_limit="45MB", keep="2GB").shortfall is None


@pytest.mark.slow
def test_issue_case_160_at_60MB_keeps_on_scratch(tmp_path, monkeypatch):
    """FaultSeg3D 160^3 with --memory-limit 60MB through the CLI: 16,000 tasks of 8^3 and
    146.8x one forward before; with scratch for the full-resolution tensors at most
    1.5x. The lazy predict keeps the same tensors in memory (up to an eighth of it, as
    the README says); held to keep='10MB' it is refused, naming the keep= that fits."""
    monkeypatch.setenv("VOLARRAY_RATES", FAST)
    x = np.zeros((160,) * 3, np.float32)
    np.save(tmp_path / "x.npy", x)
    run = subprocess.run([sys.executable, "-m", "volarray.cli", "plan", str(tmp_path / "x.npy"),
                          "--model", "volarray.models:FaultSeg3D", "--memory-limit", "60MB"],
                         env={**os.environ, "PYTHONPATH": os.getcwd()}, capture_output=True,
                         text=True, timeout=600)
    assert run.returncode == 0, run.stderr
    ratio = float(run.stdout.split("\n  compute ")[1].split("x")[0])
    assert ratio <= 1.5 and "slow plan" not in run.stdout, run.stdout
    lazy = volarray.plan(seeded(FaultSeg3D), x, memory_limit="60MB")
    assert lazy.storage == "memory" and lazy.compute_ratio <= 1.5
    capped = volarray.plan(seeded(FaultSeg3D), x, memory_limit="60MB", keep="10MB")
    with pytest.raises(volarray.MemoryBudgetError, match="pass keep='430.1 MB'"):
        capped.validate()


def test_a_failing_task_probe_warns_and_the_run_goes_on(monkeypatch):
    """A probe that fails (a GPU out of memory, say) leaves a trivial task's rate and
    a warning, not a failed run."""
    monkeypatch.delenv("VOLARRAY_RATES", raising=False)
    for name, value in (("measure_macs", 3e10), ("measure_bytes", 2e9), ("measure_task", 1e-4),
                        ("measure_memory", 5e9)):
        monkeypatch.setattr(R, name, lambda *a, v=value, **k: v)

    def probe(device):
        raise RuntimeError("CUDA out of memory")
    monkeypatch.setattr(R, "_task_probe", probe)
    with pytest.warns(RuntimeWarning, match="task probe failed on 'cpu'.*out of memory"):
        got = R.calibrate("cpu")
    assert got.task_s == 1e-4 and R._provisional.get() is None
