"""volarray: exact, out-of-core, distributed full-volume inference for PyTorch 3D models."""
from .cli_errors import quiet_start

quiet_start()  # on the command line, Ctrl-C while torch and dask load is one line

from .heap import request_huge_pages  # noqa: E402

request_huge_pages()  # before torch's first allocation, if it comes first (volarray/heap.py)

from . import accessor  # noqa: F401  (registers Dataset.volinfer / DataArray.volinfer)
from .api import normalization, plan, predict
from .errors import (InputError, MemoryBudgetError, OutputBusyError, SlowPlanWarning,
                     TaskCountWarning,
                     TraceError, UnsupportedOpError, VolarrayError, VolarrayWarning)
from .formats import open_dataarray
from .normalize import Normalization
from .planner import Plan
from .predictors import Exact, MeanStd, Window, ensemble, labels
from .tta import flips
from .store import predict_to_zarr
from . import rates as _rates, taskprobe as _taskprobe
from .version import __version__

_rates.use_task_probe(_taskprobe.engine_task_seconds)  # a real task's overhead, costed

__all__ = ["predict", "predict_to_zarr", "plan", "Plan", "Exact", "Window", "flips", "ensemble",
           "labels", "MeanStd", "normalization", "Normalization",
           "open_dataarray",
           "VolarrayError", "InputError", "UnsupportedOpError", "TraceError",
           "MemoryBudgetError", "OutputBusyError", "VolarrayWarning", "TaskCountWarning",
           "SlowPlanWarning",
           "__version__"]
