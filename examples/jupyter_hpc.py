# %% [markdown]
# # volarray in Jupyter on an HPC cluster
# Cells for a notebook (`# %%` markers: VS Code, Jupytext). Locally this runs on a
# LocalCluster; on a SLURM machine, swap in the dask-jobqueue cell.

# %%
import tempfile

import xarray as xr
from distributed import Client, LocalCluster

import volarray  # registers Dataset.volinfer / DataArray.volinfer
from volarray.models import FaultSeg3D, seeded
from volarray.synthetic import seismic_to_zarr

# %% A cluster: local workers here (processes=True too, from a notebook) ...
cluster = LocalCluster(n_workers=2, threads_per_worker=1, processes=False, dashboard_address=None)
# ... or on SLURM (pip install dask-jobqueue), one GPU per job:
# from dask_jobqueue import SLURMCluster
# cluster = SLURMCluster(cores=8, memory="64GB", walltime="04:00:00",
#                        job_extra_directives=["--gres=gpu:1"],
#                        worker_extra_args=["--resources", "GPU=1"])
# cluster.scale(jobs=8)
client = Client(cluster)

# %% A survey as an xarray Dataset backed by zarr
work = tempfile.mkdtemp()
seismic_to_zarr(f"{work}/amplitude.zarr", (96, 128, 128), chunks=(64, 64, 64), seed=5)
amplitude = volarray.io.as_dask_volume(volarray.io.open_volume(f"{work}/amplitude.zarr"))[0]
ds = xr.Dataset({"amplitude": xr.DataArray(amplitude, dims=("depth", "inline", "crossline"))})

# %% What will run, before it runs (renders as HTML in Jupyter)
model = seeded(FaultSeg3D)
volarray.plan(model, ds.amplitude.data, memory_limit="1GB")

# %% Lazy prediction as a new variable; dask's dashboard / progress work as usual
ds = ds.volinfer.predict(model, var="amplitude", name="fault", memory_limit="1GB")
ds.fault

# %% Write it (runs on the cluster)
ds[["fault"]].to_zarr(f"{work}/faults.zarr", mode="w", consolidated=False)
print(xr.open_zarr(f"{work}/faults.zarr", consolidated=False).fault)
client.close()
cluster.close()
