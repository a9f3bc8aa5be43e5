"""Kept tensors on a file system: one .npy file per task region, read back over any
box (a task's region plus a halo) exactly as the whole tensor's slice."""
import numpy as np
import pytest

from volarray.geometry import Box, Interval, grid_boxes
from volarray.scratchfiles import task_files


def test_any_box_reads_back_the_whole_tensors_slice(tmp_path):
    rng = np.random.default_rng(0)
    bounds = ((0, 7, 14, 19), (0, 10, 13), (0, 5, 10, 15, 17))  # uneven, odd sides
    whole = rng.standard_normal((3, 19, 13, 17)).astype(np.float32)
    files = task_files(str(tmp_path / "t"), bounds, 3, "float32")
    for _, box in grid_boxes(bounds):
        files.write_region((slice(None),) + box.slices(), whole[(slice(None),) + box.slices()])
    assert not [p for p in (tmp_path / "t").iterdir() if ".part-" in p.name]
    for _ in range(200):
        lo = rng.integers(-3, [19, 13, 17])
        hi = lo + rng.integers(0, 12, 3)
        box = Box(tuple(Interval(int(a), int(b)) for a, b in zip(lo, hi)))
        clipped = tuple(slice(max(0, a), max(max(0, a), min(b, n)))
                        for a, b, n in zip(lo, hi, whole.shape[1:]))
        np.testing.assert_array_equal(files.read_box(box), whole[(slice(None),) + clipped])


def test_half_precision_is_stored_as_asked(tmp_path):
    files = task_files(str(tmp_path / "h"), ((0, 4),) * 3, 2, "float16")
    y = np.arange(2 * 64, dtype=np.float32).reshape(2, 4, 4, 4)
    files.write_region((slice(None),) + Box.from_bounds((0, 0, 0), (4, 4, 4)).slices(), y)
    got = files.read_box(Box.from_bounds((1, 0, 2), (3, 4, 4)))
    assert got.dtype == np.float16
    np.testing.assert_array_equal(got, y[:, 1:3, :, 2:4].astype(np.float16))


def test_regions_are_stored_and_read_back_channels_last(tmp_path):
    """A tile's (C, z, y, x) view of channels-last memory is written as it lies, and a
    region comes back as such a view: the next task takes it without a copy."""
    import torch
    from volarray.devices import to_device
    files = task_files(str(tmp_path / "c"), ((0, 6),) * 3, 4, "float32")
    tile = torch.randn(1, 4, 6, 6, 6).contiguous(memory_format=torch.channels_last_3d)
    files.write_region((slice(None),) + Box.from_bounds((0, 0, 0), (6, 6, 6)).slices(),
                       tile[0].numpy())
    (stored,) = (tmp_path / "c").iterdir()
    assert np.load(stored).shape == (6, 6, 6, 4)
    got = files.read_box(Box.from_bounds((1, 0, 2), (5, 6, 6)))
    assert got.transpose(1, 2, 3, 0).flags.c_contiguous
    t = to_device(got, "cpu")
    assert t.data_ptr() == got.ctypes.data  # the array itself, not a copy
    np.testing.assert_array_equal(t[0].numpy(), tile[0, :, 1:5, :, 2:6].numpy())


def test_a_whole_task_region_is_mapped_and_writes_never_reach_the_file(tmp_path):
    """The next stage's task on the same grid reads one file whole: it is mapped
    copy-on-write (no fresh array), taken by `to_device` as it is, and a write into
    the tile changes this process's pages only."""
    from volarray.devices import to_device
    bounds = ((0, 5, 9), (0, 6), (0, 7))
    whole = np.arange(2 * 9 * 6 * 7, dtype=np.float32).reshape(2, 9, 6, 7)
    files = task_files(str(tmp_path / "m"), bounds, 2, "float32")
    for _, box in grid_boxes(bounds):
        files.write_region((slice(None),) + box.slices(), whole[(slice(None),) + box.slices()])
    box = Box.from_bounds((5, 0, 0), (9, 6, 7))
    got = files.read_box(box)
    assert isinstance(got.base, np.memmap) or isinstance(got, np.memmap)
    assert got.flags.writeable
    t = to_device(got, "cpu")
    assert t.data_ptr() == got.ctypes.data
    t.add_(1000)  # a tile written in place
    np.testing.assert_array_equal(files.read_box(box), whole[:, 5:9])
    np.testing.assert_array_equal(files.read_box(Box.from_bounds((4, 0, 0), (9, 6, 7))),
                                  whole[:, 4:9])
    edge = files.read_box(Box.from_bounds((5, -2, 0), (12, 6, 9)))  # clipped: the last file
    assert isinstance(edge.base, np.memmap) or isinstance(edge, np.memmap)
    np.testing.assert_array_equal(edge, whole[:, 5:9])


@pytest.mark.parametrize("channels", [1, 3])
def test_an_input_region_reaches_its_tile_channels_last_without_a_copy_of_one_channel(channels):
    """A volume's region read for a task (`VolumeSource.read`) becomes a tile with a
    true channels-last stride: a 1-channel region is handed on as zarr decoded it, but
    with a channel stride of 1 (numpy's stride 0 for that axis made the convs answer
    in NCDHW, and every later op copied: 210 copies, 0.6 s, in GroupNormNet 128^3)."""
    import torch
    import zarr
    from volarray.devices import to_device
    from volarray.readers import CheckedReader, VolumeSource
    shape = (channels, 20, 21, 22) if channels > 1 else (20, 21, 22)
    z = zarr.create_array(store={}, shape=shape, chunks=(8,) * len(shape), dtype="f4")
    z[:] = np.random.default_rng(0).standard_normal(shape).astype(np.float32)
    box = Box.from_bounds((3, 0, 5), (13, 12, 22))
    a = VolumeSource(CheckedReader(z)).read(box)
    t = to_device(a, "cpu")
    assert t.stride()[1] == 1 and t.is_contiguous(memory_format=torch.channels_last_3d)
    whole = np.asarray(z[...]).reshape((channels,) + shape[-3:])
    np.testing.assert_array_equal(t[0].numpy(), whole[(slice(None),) + box.slices()])
    if channels == 1:
        assert t.data_ptr() == a.ctypes.data


def test_a_numpy_volume_is_never_handed_to_a_tile_as_it_is():
    """A region of the user's own numpy volume (here a view: full y and x, one channel)
    is copied, so that a tile written in place cannot change the input."""
    from volarray.devices import to_device
    from volarray.readers import VolumeSource
    vol = np.random.default_rng(1).standard_normal((10, 6, 7)).astype(np.float32)
    before = vol.copy()
    a = VolumeSource(vol).read(Box.from_bounds((2, 0, 0), (8, 6, 7)))
    assert not np.shares_memory(a, vol)
    np.testing.assert_array_equal(a[0], vol[2:8])
    to_device(a, "cpu").add_(1.0)  # a tile written in place
    np.testing.assert_array_equal(vol, before)


def test_zarr_scratch_opens_its_array_once_per_run_and_process(tmp_path, monkeypatch):
    """Object-store scratch (`ZarrRegions`) opens its array once for all of a run's
    region writes and reads in this process (each open is a request there); pickled to
    a worker it opens it again, once."""
    import pickle

    import zarr
    from volarray.location import Location, OpenedArrays
    from volarray.scratchfiles import ZarrRegions
    loc = Location.of(str(tmp_path / "k.zarr"))
    zarr.create_array(str(tmp_path / "k.zarr"), shape=(2, 8, 8, 8), chunks=(2, 4, 4, 4),
                      dtype="f4")
    opened = []
    open_array = Location.open_array
    monkeypatch.setattr(Location, "open_array",
                        lambda self, mode="r": opened.append(mode) or open_array(self, mode))
    regions = ZarrRegions(OpenedArrays(loc))
    y = np.arange(2 * 4 * 4 * 4, dtype=np.float32).reshape(2, 4, 4, 4)
    for lo in ((0, 0, 0), (4, 4, 4)):
        box = Box.from_bounds(lo, tuple(v + 4 for v in lo))
        regions.write_region((slice(None),) + box.slices(), y)
        np.testing.assert_array_equal(regions.read_box(box), y)
    assert opened == ["r+"]
    again = pickle.loads(pickle.dumps(regions))
    np.testing.assert_array_equal(again.read_box(Box.from_bounds((0, 0, 0), (4, 4, 4))), y)
    assert opened == ["r+", "r+"]
