"""Helpers for users' own tests of volarray results."""
from __future__ import annotations

import numpy as np
import torch


def _as_numpy(x) -> np.ndarray:
    if hasattr(x, "compute") and not isinstance(x, np.ndarray):
        x = x.compute()
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu().numpy()
    return np.asarray(x)


def assert_volume_close(result, reference, atol: float = 1e-5, rtol: float = 0.0) -> float:
    """Assert two volumes (numpy, dask or torch) agree; returns the max abs difference.

    The failure message gives the shapes, the max difference and where it is.
    """
    a, b = _as_numpy(result), _as_numpy(reference)
    if a.shape != b.shape:
        raise AssertionError(f"shape {a.shape} differs from the reference's {b.shape}")
    if a.size == 0:
        return 0.0
    diff = np.abs(a.astype(np.float64) - b.astype(np.float64))
    if np.isnan(diff).any():
        where = np.argwhere(np.isnan(diff))[0]
        raise AssertionError(f"NaN difference at index {tuple(int(i) for i in where)}")
    worst = float(diff.max())
    bound = atol + rtol * np.abs(b.astype(np.float64))
    if (diff > bound).any():
        idx = np.unravel_index(int(np.argmax(diff - bound)), diff.shape)
        raise AssertionError(
            f"volumes differ: max abs difference {worst:.3g} (atol={atol}, rtol={rtol}); worst "
            f"at index {tuple(int(i) for i in idx)}: {a[idx]!r} vs reference {b[idx]!r}")
    return worst
