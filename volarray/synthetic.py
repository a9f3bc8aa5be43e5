"""Synthetic seismic volumes with folds and faults, for demos, tests and benchmarks."""
from __future__ import annotations

import numpy as np


def ricker(f: float = 0.08, n: int = 31) -> np.ndarray:
    t = np.arange(n) - n // 2
    a = (np.pi * f * t) ** 2
    return ((1 - 2 * a) * np.exp(-a)).astype(np.float32)


def seismic(shape=(128, 128, 128), n_faults: int = 3, seed: int = 0, noise: float = 0.1):
    """A (Z, Y, X) float32 amplitude volume, unit scale, and its fault mask (uint8).

    Reflectivity layers are folded by a smooth surface, offset across planar
    faults, convolved with a Ricker wavelet along z, and lightly noised.
    """
    rng = np.random.default_rng(seed)
    nz, ny, nx = shape
    refl = rng.standard_normal(nz * 2) * (rng.random(nz * 2) > 0.7)
    z, y, x = np.meshgrid(np.arange(nz), np.arange(ny), np.arange(nx), indexing="ij",
                          sparse=True)
    fold = 6 * np.sin(2 * np.pi * y / max(ny, 1) * rng.uniform(0.5, 1.5)) * np.cos(
        2 * np.pi * x / max(nx, 1) * rng.uniform(0.5, 1.5))
    depth = z + fold + nz // 2
    faults = np.zeros(shape, dtype=np.uint8)
    for _ in range(n_faults):
        normal = rng.normal(size=3)
        normal[0] *= 0.3  # steep faults
        normal /= np.linalg.norm(normal)
        centre = rng.uniform(0.2, 0.8, size=3) * np.array(shape)
        dist = (z - centre[0]) * normal[0] + (y - centre[1]) * normal[1] + (x - centre[2]) * normal[2]
        depth = depth + np.where(dist > 0, rng.uniform(3, 8), 0.0)
        faults |= (np.abs(dist) < 1.0).astype(np.uint8)
    idx = np.clip(depth, 0, len(refl) - 2)
    i0 = idx.astype(np.int64)
    lam = idx - i0
    vol = refl[i0] * (1 - lam) + refl[i0 + 1] * lam
    w = ricker()
    n = nz + len(w) - 1  # "same" convolution along z, via FFT
    spec = np.fft.rfft(vol, n=n, axis=0) * np.fft.rfft(w, n=n)[:, None, None]
    vol = np.fft.irfft(spec, n=n, axis=0)[len(w) // 2: len(w) // 2 + nz]
    vol = vol + noise * rng.standard_normal(shape)
    vol = (vol - vol.mean()) / (vol.std() + 1e-12)
    return vol.astype(np.float32), faults
