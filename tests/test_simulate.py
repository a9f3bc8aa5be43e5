"""benchmarks/bench_simulate.py: the simulation's task costs add up to the plan's, and a
small graph runs on a LocalCluster of sleeping workers."""
import importlib.util
from pathlib import Path

import pytest

from volarray.models import InstanceNormUNet, seeded

pytest.importorskip("distributed")
PATH = Path(__file__).parents[1] / "benchmarks" / "bench_simulate.py"
spec = importlib.util.spec_from_file_location("bench_simulate", PATH)
sim = importlib.util.module_from_spec(spec)
spec.loader.exec_module(sim)


@pytest.fixture(scope="module")
def modelled():
    import volarray
    model = seeded(InstanceNormUNet)
    vol = sim.lazy_volume(64)
    plan = volarray.plan(model, vol, chunks=32, keep="1x")
    dsk = dict(volarray.predict(model, vol, chunks=32, keep="1x").__dask_graph__())
    return plan, dsk, sim.simulated(dsk, sim.TaskCost(plan), rate=1e12, bandwidth=1e9)


def test_task_costs_add_up_to_the_plan(modelled):
    """Every task's share of its stage's MACs adds up to the plan's total compute, and
    every tile task writes its region of the stage's output."""
    plan, dsk, (seconds, kinds, writes, deps) = modelled
    cost = sim.TaskCost(plan)
    macs = sum(cost.of(t, k)[0] for k, t in dsk.items() if sim.istask(t))
    assert macs == pytest.approx(plan.compute_ratio * plan.model_macs, rel=1e-9)
    tiles = [k for k in kinds if kinds[k].startswith("stage")]
    assert len(tiles) == sum(s.n_tasks for s in plan.stages)
    barriers = {kinds[k] for k in kinds if kinds[k].startswith("statistics")}
    assert len(barriers) == len(plan.barriers) > 0
    assert all(seconds[k] > 0 for k in tiles) and set(deps) == set(dsk)


def test_simulation_runs_the_graph(modelled):
    """The sleep graph runs on a LocalCluster: every task shows in the task stream, the
    walls respect the critical path, and barriers leave workers idle."""
    plan, dsk, (seconds, kinds, writes, deps) = modelled
    cp = sim.critical_path(seconds, deps)
    assert 0 < cp <= sum(seconds.values())
    scale = 0.05 / cp
    wall, stream = sim.run_simulation(2, seconds, writes, deps, scale, 1e4)
    assert {r["key"] for r in stream} == set(seconds)
    assert wall >= cp * scale
    busy, idle = sim.utilization(stream, kinds, 2)
    assert 0 < busy <= 1 and idle > 0
