"""End to end with the Python API: a synthetic seismic survey with faults, FaultSeg3D
with seeded weights, exact full-volume prediction written to zarr.

    python examples/seismic_faults.py [OUT.zarr]
"""
import sys
import tempfile
import time
from pathlib import Path

import dask.array as da
import numpy as np
import torch
import zarr

import volarray
from volarray.models import FaultSeg3D, seeded
from volarray.synthetic import seismic

workdir = Path(tempfile.mkdtemp())
out_path = Path(sys.argv[1]) if len(sys.argv) > 1 else workdir / "faults.zarr"

# 1. A survey on disk, chunked as a survey would be.
amplitude, truth = seismic((96, 160, 128), n_faults=4, seed=3)
survey = zarr.open_array(str(workdir / "survey.zarr"), mode="w", shape=amplitude.shape,
                         chunks=(64, 64, 64), dtype="f4")
survey[:] = amplitude

# 2. The model (use your trained weights: model.load_state_dict(torch.load(...))).
model = seeded(FaultSeg3D)

# 3. What will run, before it runs.
plan = volarray.plan(model, survey, memory_limit="1GB")
print(plan)
plan.validate()

# 4. Lazy prediction, stored chunk by chunk.
prob = volarray.predict(model, survey, memory_limit="1GB")
t0 = time.perf_counter()
da.to_zarr(prob, str(out_path), overwrite=False)
print(f"wrote {out_path} {prob.shape} in {time.perf_counter() - t0:.1f} s")

# 5. The same numbers as one whole-volume forward.
with torch.inference_mode():
    ref = model(torch.from_numpy(amplitude)[None, None])[0].numpy()
stored = zarr.open_array(str(out_path), mode="r")[:]
print(f"max |volarray - torch| = {np.abs(stored - ref).max():.1e}")
