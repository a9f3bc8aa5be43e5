import os

import numpy as np
import pytest
import torch

from volarray.models import seeded

# Plans are costed at these rates (this 2-core CPU's, measured by `volarray calibrate`):
# no default test calibrates (seconds) or reads the user's cache; command-line
# subprocesses inherit them. tests/test_cost.py sets its own.
os.environ.setdefault("VOLARRAY_RATES", "macs=2e10,bytes=1e9,task=0.0002")
# The default heap policy, chosen: plans say nothing of a VM host that takes freed
# memory back (`volarray.planner.host_memory_notes`), so printed plans are the same on any
# machine (a shell's VOLARRAY_HEAP=reuse would change what the memory tests measure).
# tests/test_memory.py unsets it where it tests that note and the default.
os.environ["VOLARRAY_HEAP"] = "return"


def whole_volume(model, volume: np.ndarray) -> np.ndarray:
    """The reference: one whole-volume forward, ``model(volume[None])[0]``."""
    x = torch.from_numpy(volume if volume.ndim == 4 else volume[None])[None]
    with torch.inference_mode():
        return model(x)[0].numpy()


@pytest.fixture(autouse=True)
def environment_restored():
    """What a test leaves in os.environ, undone: a distributed LocalCluster sets one
    OpenMP thread there for its workers, and a later test's command-line subprocess ran
    single-threaded beside a two-thread in-process reference (window mode then differs
    in the last bit on this CPU)."""
    before = dict(os.environ)
    yield
    restore_environment(before)


@pytest.fixture
def rng():
    return np.random.default_rng(0)


def random_volume(shape, seed=0, offset=0.0, scale=1.0):
    return (np.random.default_rng(seed).standard_normal(shape) * scale + offset).astype(np.float32)


@pytest.fixture(scope="session")
def local_cluster():
    """A distributed LocalCluster of 2 single-threaded worker processes."""
    distributed = pytest.importorskip("distributed")
    before = dict(os.environ)
    with distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True,
                                  dashboard_address=None, worker_dashboard_address=None) as c:
        restore_environment(before)  # its workers have theirs (see environment_restored)
        with distributed.Client(c, set_as_default=False) as client:
            yield client


def restore_environment(before: dict) -> None:
    """Only the keys that changed (clearing os.environ would race the threads of a
    running cluster)."""
    for key in set(os.environ) - set(before):
        del os.environ[key]
    for key, value in before.items():
        if os.environ.get(key) != value:
            os.environ[key] = value


def slow_writes(seconds: float) -> str:
    """Python source that slows every chunk write of volarray.store, so that a run in a
    subprocess can be stopped mid-way."""
    return f"""
import time
import volarray.store
_write_block = volarray.store.write_block
def _slow_write_block(*a):
    n = _write_block(*a)
    time.sleep({seconds})
    return n
volarray.store.write_block = _slow_write_block
"""


__all__ = ["whole_volume", "random_volume", "seeded", "slow_writes"]
