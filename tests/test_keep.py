"""What to keep between stages on norm-heavy networks (issue 27): the keep sequence
from the top, costed by estimate, so that a network with hundreds of statistics
barriers plans in seconds (torchseis's FaultSSL: 438 candidates, 274 barriers, over 5
minutes before) and keeps what makes it run near one forward's compute."""
import time

import numpy as np
import pytest
import torch
from torch import nn

import volarray
from volarray.costing import cost_stage, estimated_macs, Stage, stage_bounds
from volarray.keep import SLOW_NOTE, Compute, keep_sequence
from volarray.program import TileProgram
from volarray.trace import trace

from test_tta import torchseis


class Block(nn.Module):
    """conv - InstanceNorm - ReLU twice, with a residual add: two barriers."""

    def __init__(self, c):
        super().__init__()
        self.a = nn.Sequential(nn.Conv3d(c, c, 3, padding=1), nn.InstanceNorm3d(c, affine=True),
                               nn.ReLU())
        self.b = nn.Sequential(nn.Conv3d(c, c, 3, padding=1), nn.InstanceNorm3d(c, affine=True))

    def forward(self, x):
        return torch.relu(x + self.b(self.a(x)))


class DeepNormNet(nn.Module):
    """``depth`` residual blocks at full resolution, one downsampled branch: a small
    FaultSSL (2 * depth + 2 statistics barriers)."""

    def __init__(self, depth=24, c=4):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv3d(1, c, 3, padding=1), nn.InstanceNorm3d(c), nn.ReLU())
        self.blocks = nn.Sequential(*[Block(c) for _ in range(depth)])
        self.down = nn.Sequential(nn.Conv3d(c, c, 3, stride=2, padding=1),
                                  nn.InstanceNorm3d(c), nn.ReLU())
        self.head = nn.Conv3d(2 * c, 1, 1)

    def forward(self, x):
        y = self.blocks(self.stem(x))
        z = nn.functional.interpolate(self.down(y), size=y.shape[2:])
        return self.head(torch.cat([y, z], 1))


def seeded_deep(**kw):
    torch.manual_seed(0)
    return DeepNormNet(**kw).eval()


def test_estimated_macs_follow_the_exact_costing():
    """The estimate (one interior task per axis) within 10% of `cost_stage` on every
    stage the sequence costs, on an odd grid."""
    graph = trace(seeded_deep(depth=4), (1, 1, 27, 21, 18))
    compute = Compute(graph, (10, 8, 7), exact=False)
    list(keep_sequence(graph, compute))
    assert len(compute.memo) > 20
    for (name, sources), est in compute.memo.items():
        node = graph.nodes[name]
        prog = TileProgram(graph, name, tuple(n for n in graph.nodes if n in sources))
        bounds = stage_bounds((10, 8, 7), node.shape, node.scale)
        exact = cost_stage(graph, Stage(-1, prog, bounds))[0].macs
        assert est == estimated_macs(graph, name, sources, bounds, compute.index)
        assert abs(est - exact) <= 0.1 * exact, (name, est, exact)


def test_sequence_is_nested_and_starts_near_one_forward():
    graph = trace(seeded_deep(depth=6), (1, 1, 24, 20, 16))
    seq = list(keep_sequence(graph, Compute(graph, (12, 10, 8))))
    assert all(b.names < a.names and b.bytes < a.bytes for a, b in zip(seq, seq[1:]))
    from volarray.costing import model_macs
    assert seq[0].macs <= 1.3 * model_macs(graph)  # every tensor kept: stages of one conv


def test_many_barriers_plan_fast_and_keep_enough():
    """50 statistics barriers with the user's small chunks: planned in seconds, and the
    lazy result keeps (in memory, past the input's bytes, where nothing kept recomputes
    the network above each barrier) what makes it compute within SLOW_NOTE of one
    forward (on a volume this small, fewer tasks beat less compute); equal to the
    whole-volume forward."""
    model = seeded_deep(depth=24)
    vol = np.random.default_rng(0).standard_normal((20, 24, 28)).astype(np.float32)
    t0 = time.perf_counter()
    plan = volarray.plan(model, vol, chunks=(10, 12, 16))
    planned = time.perf_counter() - t0
    assert len(plan.barriers) == 50
    assert planned < 20, planned
    assert plan.compute_ratio <= SLOW_NOTE, plan
    assert plan.kept_bytes > vol.nbytes  # within the input's bytes it recomputed much
    got = volarray.predict(model, vol, chunks=(10, 12, 16)).compute()
    with torch.no_grad():
        want = model(torch.from_numpy(vol)[None, None])[0].numpy()
    np.testing.assert_allclose(got, want, rtol=0, atol=2e-5)


def test_a_lazy_result_takes_more_memory_only_where_the_input_bytes_are_slow():
    """FaultSeg3D at 256^3 plans within the input's bytes (1.35x); at 64^3 in tasks of
    45 MB that budget computes 3.5x, and the lazy result keeps 27 MB in memory (an
    eighth of it at most) for 1.07x."""
    import dask.array as da
    from volarray.models import FaultSeg3D, seeded
    model = seeded(FaultSeg3D)
    big = volarray.plan(model, da.zeros((256,) * 3, np.float32, chunks=128))
    assert big.keep_budget == 256 ** 3 * 4 and big.kept_bytes <= big.keep_budget
    small = volarray.plan(model, np.zeros((64,) * 3, np.float32), memory_limit="45MB")
    assert small.kept_bytes > 64 ** 3 * 4 and small.compute_ratio < 1.2, small
    assert small.keep_budget > small.kept_bytes


@pytest.mark.slow
@pytest.mark.xfail(strict=False, reason="borderline on this 2-core machine: 4.0x-5.4x "
                   "measured (volarray 9.4-10.5 s against plain torch's 1.8-2.6 s), 4.4x and "
                   "4.9x once in-place modules ran without a clone, 3.4x-3.8x on 2026-12-05 "
                   "(volarray 9.8-10.6 s, torch itself slowed to 2.7-3.1 s); later that day, "
                   "statistics computed by the stages' own tasks: 4.1x-4.6x standalone "
                   "(volarray 8.1-8.9 s, torch 1.9-2.2 s), 2.9x-3.0x in pytest (9.0 s, torch "
                   "3.1 s); capture, probe check and planning are about 4.5 s of it; with pointwise "
                   "ops shaped without torch._dynamo (volarray/metashapes.py) 3.2x in pytest "
                   "(8.0 s against 2.5 s), its build 3.1-3.5 s")
def test_torchseis_faultssl_with_small_chunks_within_5x_torch(capsys):
    """The issue's case: FaultSSL at 48x64x80, chunks (24, 40, 32): 274 barriers.
    volarray's first call (capture, plan, run) against plain torch's warm forward."""
    ts = torchseis()
    from torchseis.models.fault.faultssl import FaultSSL
    torch.manual_seed(0)
    model = FaultSSL().eval()
    vol = np.random.default_rng(0).standard_normal((48, 64, 80)).astype(np.float32)
    times = []
    with torch.no_grad():
        for _ in range(2):  # plain torch warm: the best of two
            t0 = time.perf_counter()
            want = model(torch.from_numpy(vol)[None, None])[0].numpy()
            times.append(time.perf_counter() - t0)
    plain = min(times)
    t0 = time.perf_counter()
    got = volarray.predict(model, vol, chunks=(24, 40, 32)).compute()
    took = time.perf_counter() - t0
    with capsys.disabled():
        print(f"\nFaultSSL {ts.__name__}: volarray {took:.1f} s, torch {plain:.1f} s "
              f"({took / plain:.1f}x), max |diff| {np.abs(got - want).max():.1e}")
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-4)
    assert took <= 5 * plain
