"""Whole-volume normalization statistics: exact InstanceNorm, GroupNorm, squeeze-
excitation and ASPP image pooling across chunks."""
import numpy as np
import pytest
import torch
import torch.nn as nn

import volarray
from volarray.models import DeepLabV3Plus3D, GroupNormNet, InstanceNormUNet, SEResUNet, seeded
from volarray.ops.reduce import channel_var_mean, stats_chunk, stats_combine
from volarray.testing import assert_volume_close

from conftest import random_volume, whole_volume

CASES = {  # non-cubic volumes, chunks that do not divide them
    "InstanceNormUNet": (lambda: seeded(InstanceNormUNet, width=8), (20, 28, 36), (9, 13, 11)),
    "GroupNormNet": (lambda: seeded(GroupNormNet), (15, 22, 19), (7, 9, 8)),
    "DeepLabV3Plus3D": (lambda: seeded(DeepLabV3Plus3D), (17, 30, 25), (8, 11, 9)),
    "SEResUNet": (lambda: seeded(SEResUNet), (13, 22, 18), (6, 7, 9)),
}


@pytest.fixture(scope="module")
def cases():
    out = {}
    for name, (make, shape, chunks) in CASES.items():
        model = make()
        unit = random_volume(shape, seed=5)
        offset = unit * 50 + 300
        out[name] = (model, chunks, unit, whole_volume(model, unit), offset,
                     whole_volume(model, offset))
    return out


@pytest.mark.parametrize("scheduler", ["sync", "threads"])
@pytest.mark.parametrize("name", list(CASES))
def test_norm_models_exact(cases, name, scheduler):
    model, chunks, unit, ref, offset, ref_offset = cases[name]
    y = volarray.predict(model, unit, chunks=chunks)
    assert_volume_close(y.compute(scheduler=scheduler), ref, atol=1e-5)
    y = volarray.predict(model, offset, chunks=chunks)
    assert_volume_close(y.compute(scheduler=scheduler), ref_offset, atol=1e-4)


@pytest.mark.parametrize("name", list(CASES))
def test_norm_models_on_local_cluster(cases, local_cluster, name):
    model, chunks, unit, ref, _, _ = cases[name]
    y = volarray.predict(model, unit, chunks=chunks)
    assert_volume_close(local_cluster.compute(y).result(), ref, atol=1e-5)


def test_patchwise_statistics_would_differ(cases):
    """The point of it all: per-chunk norms give another answer; volarray does not."""
    model, chunks, unit, ref, _, _ = cases["InstanceNormUNet"]
    patch = whole_volume(model, np.ascontiguousarray(unit[:12, :16, :20]))
    assert np.abs(patch - ref[:, :12, :16, :20]).max() > 1e-3
    out = volarray.predict(model, unit, chunks=chunks).compute()
    assert_volume_close(out, ref, atol=1e-5)


def test_keep_or_recompute_follows_the_budget(cases):
    model, chunks, unit, ref, _, _ = cases["InstanceNormUNet"]
    roomy = volarray.plan(model, unit, chunks=chunks, keep="8x")
    tight = volarray.plan(model, unit, chunks=chunks, keep=0)
    assert tight.kept_bytes == 0 < roomy.kept_bytes <= 8 * unit.nbytes
    assert sum(b.recomputed for b in tight.barriers) > sum(b.recomputed for b in roomy.barriers)
    assert tight.compute_ratio > roomy.compute_ratio
    assert "recomputed from" in str(tight) and "as they make it" in str(roomy)
    for keep in (0, "8x"):
        y = volarray.predict(model, unit, chunks=chunks, keep=keep)
        assert_volume_close(y.compute(), ref, atol=1e-5)


@pytest.mark.parametrize("scheduler", ["sync", "threads"])
def test_a_kept_tensors_statistics_come_from_the_tasks_that_make_it(cases, scheduler, tmp_path,
                                                                    monkeypatch):
    """A barrier on a kept tensor has no tasks of its own reading it again: the stage's
    tasks reduce their output as they make it, in memory and to scratch alike (the
    tokens of scratch writes then carry the statistics)."""
    from volarray.worker import stats_task
    model, chunks, unit, ref, _, _ = cases["InstanceNormUNet"]
    plan = volarray.plan(model, unit, chunks=chunks, keep="8x")
    by_stage = [b for b in plan.barriers if b.by_stage is not None]
    assert by_stage and all(not b.recomputed and b.moved_bytes == 0 for b in by_stage)
    for b in by_stage:
        assert plan.stages[b.by_stage].output == b.program.output
        assert plan.stages[b.by_stage].bounds == b.bounds
    charged = plan.n_tasks - sum(b.n_tasks for b in by_stage)
    assert plan.costed_tasks == charged
    assert plan.projection.overhead_s == pytest.approx(charged * plan.rates.task_s)
    assert f"({charged} tasks at" in plan.time_line()
    y = volarray.predict(model, unit, chunks=chunks, keep="8x")
    reading = sum(1 for t in dict(y.__dask_graph__()).values()
                  if isinstance(t, tuple) and t and t[0] is stats_task)
    assert reading == sum(b.n_tasks for b in plan.barriers if b.by_stage is None)
    assert_volume_close(y.compute(scheduler=scheduler), ref, atol=1e-5)
    on_disk = volarray.plan(model, unit, chunks=chunks, keep="8x", scratch=True)
    assert on_disk.storage == "scratch" and any(b.by_stage is not None
                                                for b in on_disk.barriers)
    import volarray.scratchfiles as scratchfiles
    written = []
    write = scratchfiles.TaskFiles.write_region
    monkeypatch.setattr(scratchfiles.TaskFiles, "write_region",
                        lambda self, region, y: written.append(1) or write(self, region, y))
    out = volarray.predict_to_zarr(model, unit, tmp_path / "out.zarr", chunks=chunks,
                                   keep="8x", scheduler=scheduler, scratch=True)
    assert written  # the kept tensors went to scratch files
    assert_volume_close(np.asarray(out), ref, atol=1e-5)


class ThreeNormsOfOneTensor(nn.Module):
    """A global mean, an InstanceNorm and a GroupNorm of one conv's output: three
    barriers on one kept tensor."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv3d(1, 4, 3, padding=1)
        self.inorm = nn.InstanceNorm3d(4, affine=True)
        self.gnorm = nn.GroupNorm(2, 4)
        self.head = nn.Conv3d(4, 1, 3, padding=1)

    def forward(self, x):
        y = torch.relu(self.conv(x))
        return self.head(self.inorm(y) + self.gnorm(y) + y * y.mean(dim=(2, 3, 4), keepdim=True))


def test_several_barriers_computed_by_one_stages_tasks():
    model = seeded(ThreeNormsOfOneTensor)
    vol = random_volume((19, 22, 17), seed=3)
    plan = volarray.plan(model, vol, chunks=(8, 9, 7), keep="8x")
    per_stage = {}
    for b in plan.barriers:
        if b.by_stage is not None:
            per_stage.setdefault(b.by_stage, []).append(b)
    assert max(len(v) for v in per_stage.values()) >= 2, str(plan)
    for scheduler in ("sync", "threads"):
        y = volarray.predict(model, vol, chunks=(8, 9, 7), keep="8x").compute(
            scheduler=scheduler)
        assert_volume_close(y, whole_volume(model, vol), atol=1e-5)


@pytest.mark.parametrize("groups", [1, 2, 4, 8])
def test_group_norm_any_group_count(groups):
    torch.manual_seed(groups)
    model = nn.Sequential(nn.Conv3d(1, 8, 3, padding=1), nn.GroupNorm(groups, 8), nn.SiLU(),
                          nn.Conv3d(8, 8, 3, padding=1), nn.GroupNorm(groups, 8, affine=False)).eval()
    vol = random_volume((11, 14, 9), seed=groups)
    out = volarray.predict(model, vol, chunks=(4, 6, 5)).compute()
    assert_volume_close(out, whole_volume(model, vol), atol=1e-5)


def test_functional_norms_and_global_mean():
    class Fn(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv3d(1, 4, 3, padding=1)
            self.w = nn.Parameter(torch.rand(4) + 0.5)

        def forward(self, x):
            y = torch.nn.functional.instance_norm(self.conv(x), weight=self.w, bias=None)
            y = torch.nn.functional.group_norm(y, 2)
            g = torch.nn.functional.adaptive_avg_pool3d(y * y, 1)
            return y - torch.mean(y, dim=(-3, -2, -1), keepdim=True) + g.expand_as(y)
    model = Fn().eval()
    vol = random_volume((9, 10, 11))
    out = volarray.predict(model, vol, chunks=(4, 3, 5)).compute()
    assert_volume_close(out, whole_volume(model, vol), atol=1e-5)


def test_running_stats_instance_norm_is_pointwise():
    m = nn.InstanceNorm3d(2, track_running_stats=True)
    m.running_mean.fill_(0.3)
    model = nn.Sequential(nn.Conv3d(1, 2, 1), m).eval()
    vol = random_volume((6, 7, 8))
    plan = volarray.plan(model, vol, chunks=3)
    assert plan.barriers == ()
    assert_volume_close(volarray.predict(model, vol, chunks=3).compute(), whole_volume(model, vol))


def test_chan_merge_is_stable_with_large_offset():
    rng = np.random.default_rng(0)
    x = torch.from_numpy((rng.standard_normal((1, 4, 10, 12, 14)) * 50 + 300).astype(np.float32))
    parts = [stats_chunk(x[..., :3, :, :], 2), stats_chunk(x[..., 3:, :5, :], 2),
             stats_chunk(x[..., 3:, 5:, :], 2)]
    n, mean, m2 = stats_combine(parts)
    flat = x.double().reshape(2, -1).numpy()
    np.testing.assert_allclose(n, flat.shape[1])
    np.testing.assert_allclose(mean, flat.mean(1), rtol=1e-6)
    np.testing.assert_allclose(m2 / n, flat.var(1), rtol=1e-6)


@pytest.mark.parametrize("channels,shape,offset", [(16, (24, 40, 36), 300.0), (3, (9, 50, 60), 0.0),
                                                   (64, (8, 32, 33), -1e3)])
def test_channels_last_statistics_match_float64(channels, shape, offset):
    """The column-sum statistics of a channels-last tile (`channel_var_mean`) are as
    accurate as torch.var_mean's, offsets of thousands included, and the same on any
    layout (other layouts take torch.var_mean)."""
    rng = np.random.default_rng(channels)
    x = torch.from_numpy((rng.standard_normal((1, channels) + shape) * 7 + offset)
                         .astype(np.float32))
    last = x.contiguous(memory_format=torch.channels_last_3d)
    assert last.numel() >= 1 << 16  # the blocked path, not the small tiles' fallback
    ref = x.double()
    ref_var, ref_mean = ref.var(dim=(0, 2, 3, 4), unbiased=False), ref.mean(dim=(0, 2, 3, 4))
    torch_var, torch_mean = torch.var_mean(x, dim=(0, 2, 3, 4), correction=0)
    for var, mean in (channel_var_mean(last), channel_var_mean(x)):
        assert ((mean.double() - ref_mean).abs().max()
                <= 2 * (torch_mean.double() - ref_mean).abs().max() + 1e-6 * abs(offset) + 1e-7)
        np.testing.assert_allclose(var.double().numpy(), ref_var.numpy(), rtol=3e-7)
        np.testing.assert_allclose(var.numpy(), torch_var.numpy(), rtol=5e-7)
