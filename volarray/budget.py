"""Memory budgets: sizes parsed from what users write ('4GB'), printed as dask prints
them, and the defaults (per task, and the memory a lazy result will run in)."""
from __future__ import annotations

import math
import sys

import psutil

from .errors import InputError


def parse_bytes(value) -> int | None:
    """A memory budget in bytes from an int, a float or a string like '4GB'; None
    stays None (the default). What cannot be a budget is refused."""
    if value is None:
        return None
    if isinstance(value, bool):
        n = None
    elif isinstance(value, (int, float)):
        n = value if math.isfinite(value) else None
    else:
        import dask.utils
        try:
            n = dask.utils.parse_bytes(str(value).strip().lstrip("+"))  # "-1GB" is negative
        except Exception:
            n = None
    if n is None:
        raise InputError(f"memory_limit={value!r} is not a size; pass bytes or a string "
                         "like '4GB'", parameter='memory_limit')
    if n <= 0:
        raise InputError(f"memory_limit={value!r} is not a budget: it must be positive, e.g. "
                         f"'2GB'; omit it for the default ({format_bytes(default_memory_limit())} "
                         "per task here)", parameter='memory_limit')
    return int(n)


def default_memory_limit() -> int:
    """Per task: an eighth of this machine's memory, at most 2 GB."""
    return int(min(psutil.virtual_memory().total / 8, 2e9))


def format_bytes(n: float) -> str:
    """``1.2 GB``: decimal units, as dask's memory limits."""
    for unit in ("B", "kB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000


def run_memory() -> int:
    """The memory a lazy result will run in: the workers' of the default
    dask.distributed client when there is one, else this machine's."""
    try:
        if "distributed" not in sys.modules:  # no client without it (0.2 s to import)
            raise ImportError
        from distributed import default_client
        workers = default_client().scheduler_info().get("workers", {})
    except (ImportError, ValueError):
        workers = {}
    total = sum(w.get("memory_limit") or 0 for w in workers.values())
    return int(total) or psutil.virtual_memory().total
