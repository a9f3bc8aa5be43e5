"""volarray: exact, out-of-core, distributed full-volume inference for PyTorch 3D models."""
from .heap import request_huge_pages

request_huge_pages()  # before torch's first allocation, if it comes first (volarray/heap.py)

from . import accessor  # noqa: F401  (registers Dataset.volinfer / DataArray.volinfer)
from .api import normalization, plan, predict
from .errors import (InputError, MemoryBudgetError, OutputBusyError, TraceError,
                     UnsupportedOpError, VolarrayError)
from .formats import open_dataarray
from .normalize import Normalization
from .planner import Plan
from .predictors import Exact, MeanStd, Window, ensemble, flips, labels
from .store import predict_to_zarr
from .version import __version__

__all__ = ["predict", "predict_to_zarr", "plan", "Plan", "Exact", "Window", "flips", "ensemble",
           "labels", "MeanStd", "normalization", "Normalization",
           "open_dataarray",
           "VolarrayError", "InputError", "UnsupportedOpError", "TraceError",
           "MemoryBudgetError", "OutputBusyError", "__version__"]
