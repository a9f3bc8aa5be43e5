#!/usr/bin/env bash
# The command line end to end: a synthetic faulted survey in zarr, its plan, an exact
# prediction with a preview picture, and a resumed run. Run from the repository root.
set -euo pipefail
work=$(mktemp -d)
python - "$work" <<'PY'
import sys, torch
from volarray.models import FaultSeg3D, seeded
from volarray.synthetic import seismic_to_zarr
seismic_to_zarr(f"{sys.argv[1]}/survey.zarr", (96, 160, 128), chunks=(64, 64, 64), seed=3)
torch.save(seeded(FaultSeg3D).state_dict(), f"{sys.argv[1]}/faultseg3d.pt")  # your trained weights
PY
volarray plan "$work/survey.zarr" --model volarray.models:FaultSeg3D --memory-limit 1GB
volarray predict "$work/survey.zarr" "$work/faults.zarr" --model volarray.models:FaultSeg3D \
    --weights "$work/faultseg3d.pt" --memory-limit 1GB --preview "$work/preview.png"
volarray predict "$work/survey.zarr" "$work/faults.zarr" --model volarray.models:FaultSeg3D \
    --weights "$work/faultseg3d.pt" --memory-limit 1GB --resume   # nothing left to do
echo "outputs in $work"
