"""Reaching a dask cluster through the scheduler file that ``dask scheduler
--scheduler-file F`` writes (the usual way on HPC systems: the scheduler runs in one
job, ``srun dask worker --scheduler-file F`` in others, on a shared file system)."""
from __future__ import annotations

import contextlib
import functools
import os

import dask

from .errors import InputError


def connect(scheduler_file, timeout: str = "30s"):
    """A `distributed.Client` of the scheduler named in ``scheduler_file``, the default
    client until it is closed (the caller closes it): the run is planned for its
    workers (their memory, their GPUs)."""
    from distributed import Client
    path = os.fspath(scheduler_file)
    if not os.path.isfile(path):
        raise InputError(f"scheduler_file={path!r} does not exist; start the scheduler "
                         f"first (`dask scheduler --scheduler-file {path}` writes it) or "
                         "pass the file it wrote", parameter="scheduler_file")
    try:
        return Client(scheduler_file=path, timeout=timeout)
    except Exception as e:
        raise InputError(f"scheduler_file={path!r}: cannot reach the dask scheduler it "
                         f"names ({type(e).__name__}: {e}); is that scheduler still "
                         "running?", parameter="scheduler_file") from e


def with_scheduler_file(run):
    """``run`` (a function taking ``scheduler=``) taking ``scheduler_file=`` too: the
    run gets a client of that cluster, closed when it returns or fails."""
    @functools.wraps(run)
    def wrapper(*args, scheduler=None, scheduler_file=None, **kwargs):
        if scheduler_file is None:
            return run(*args, scheduler=scheduler, **kwargs)
        if scheduler is not None:
            raise InputError(f"scheduler={scheduler!r} and scheduler_file={scheduler_file!r}:"
                             " pass one of them", parameter="scheduler_file")
        with connect(scheduler_file) as client:
            return run(*args, scheduler=client, **kwargs)
    return wrapper


def client_of(scheduler):
    """The distributed Client ``scheduler`` names (or the default one), or None."""
    try:
        from distributed import Client, default_client
    except ImportError:
        return None
    if isinstance(scheduler, Client):
        return scheduler
    if scheduler is None and dask.config.get("scheduler", None) in (None, "dask.distributed"):
        with contextlib.suppress(ValueError):
            return default_client()
    return None
