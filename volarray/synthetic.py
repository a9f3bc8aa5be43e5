"""Synthetic seismic volumes with folds and faults, for demos, tests and benchmarks."""
from __future__ import annotations

import numpy as np


def ricker(f: float = 0.08, n: int = 31) -> np.ndarray:
    t = np.arange(n) - n // 2
    a = (np.pi * f * t) ** 2
    return ((1 - 2 * a) * np.exp(-a)).astype(np.float32)


class _Survey:
    """The random geology of one survey; any (y, x) block of it can be rendered."""

    def __init__(self, shape, n_faults: int, seed: int, noise: float):
        rng = np.random.default_rng(seed)
        self.shape, self.seed, self.noise = tuple(shape), seed, noise
        nz = shape[0]
        self.refl = rng.standard_normal(nz * 2) * (rng.random(nz * 2) > 0.7)
        self.fold = rng.uniform(0.5, 1.5, size=2)
        self.faults = []
        for _ in range(n_faults):
            normal = rng.normal(size=3)
            normal[0] *= 0.3  # steep faults
            normal /= np.linalg.norm(normal)
            self.faults.append((normal, rng.uniform(0.2, 0.8, size=3) * np.array(shape),
                                rng.uniform(3, 8)))

    def render(self, ys: slice, xs: slice):
        """Amplitude (unnormalized) and fault mask of the full-z column block."""
        nz, ny, nx = self.shape
        z, y, x = np.meshgrid(np.arange(nz), np.arange(ys.start, ys.stop),
                              np.arange(xs.start, xs.stop), indexing="ij", sparse=True)
        depth = z + 6 * np.sin(2 * np.pi * y / ny * self.fold[0]) * np.cos(
            2 * np.pi * x / nx * self.fold[1]) + nz // 2
        mask = np.zeros((nz, ys.stop - ys.start, xs.stop - xs.start), dtype=np.uint8)
        for normal, centre, throw in self.faults:
            dist = ((z - centre[0]) * normal[0] + (y - centre[1]) * normal[1]
                    + (x - centre[2]) * normal[2])
            depth = depth + np.where(dist > 0, throw, 0.0)
            mask |= (np.abs(dist) < 1.0).astype(np.uint8)
        idx = np.clip(depth, 0, len(self.refl) - 2)
        i0 = idx.astype(np.int64)
        lam = idx - i0
        vol = self.refl[i0] * (1 - lam) + self.refl[i0 + 1] * lam
        w = ricker()
        n = nz + len(w) - 1  # "same" convolution along z, via FFT
        spec = np.fft.rfft(vol, n=n, axis=0) * np.fft.rfft(w, n=n)[:, None, None]
        vol = np.fft.irfft(spec, n=n, axis=0)[len(w) // 2: len(w) // 2 + nz]
        rng = np.random.default_rng((self.seed, ys.start, xs.start))  # noise per block
        return vol + self.noise * rng.standard_normal(vol.shape), mask


def seismic(shape=(128, 128, 128), n_faults: int = 3, seed: int = 0, noise: float = 0.1):
    """A (Z, Y, X) float32 amplitude volume, unit scale, and its fault mask (uint8).

    Reflectivity layers are folded by a smooth surface, offset across planar
    faults, convolved with a Ricker wavelet along z, and lightly noised.
    """
    survey = _Survey(shape, n_faults, seed, noise)
    vol, mask = survey.render(slice(0, shape[1]), slice(0, shape[2]))
    vol = (vol - vol.mean()) / (vol.std() + 1e-12)
    return vol.astype(np.float32), mask


def seismic_to_zarr(path, shape, chunks=(128, 128, 128), n_faults: int = 3, seed: int = 0,
                    noise: float = 0.1, block: int = 128):
    """Write a synthetic survey of any size to a zarr array, one (y, x) column block at
    a time (memory stays ~ Z x block^2), scaled to unit variance like `seismic`."""
    import zarr
    survey = _Survey(shape, n_faults, seed, noise)
    out = zarr.create_array(str(path), shape=tuple(shape), chunks=tuple(chunks), dtype="f4",
                            overwrite=True)
    scale = None
    for y0 in range(0, shape[1], block):
        for x0 in range(0, shape[2], block):
            ys, xs = slice(y0, min(y0 + block, shape[1])), slice(x0, min(x0 + block, shape[2]))
            vol, _ = survey.render(ys, xs)
            if scale is None:  # the first block sets the scale (std of the wavelet train)
                scale = (vol.mean(), vol.std() + 1e-12)
            out[:, ys, xs] = ((vol - scale[0]) / scale[1]).astype(np.float32)
    return out
