"""How many tasks a run will have, told before anything heavy runs: chunks so small
(``chunks=1``) that planning and scheduling alone would take minutes warn, with the count
and the chunks that would give fewer."""
from __future__ import annotations

import math
import warnings

from .errors import TaskCountWarning

# A graph past this many tasks warns: planning it takes minutes (524,290 tasks, from
# chunks=1 on a 64^3 volume: 5 minutes and 3.7 GB of graph), and so does stopping it.
TASK_WARNING = 100_000


def chunk_count(shape, chunks) -> int:
    """Chunks of ``shape`` in chunks of ``chunks`` (None on an axis: one chunk there, the
    fewest the planner could choose)."""
    return math.prod(-(-n // min(c or n, n)) for n, c in zip(shape, chunks))


def fewer_chunks(shape, step: int = 8) -> str:
    """The chunks to suggest in place of tiny ones: the smallest side, a power of two
    times ``step``, that makes at most TASK_WARNING / 10 chunks."""
    side = max(step, 1)
    while side < max(shape) and chunk_count(shape, (side,) * len(shape)) > TASK_WARNING // 10:
        side *= 2
    side = min(side, max(shape))
    n = chunk_count(shape, (side,) * len(shape))
    return (f"pass chunks={side} or larger ({n:,} chunk{'s' if n > 1 else ''}), or no "
            "chunks= for the planner's choice")


def warn_of_many_tasks(count: int, what: str, fix: str) -> None:
    """A TaskCountWarning past TASK_WARNING tasks: ``what`` made ``count``, ``fix``."""
    if count > TASK_WARNING:
        warnings.warn(f"{what}: a graph of at least {count:,} tasks, more than "
                      f"{TASK_WARNING:,}, whose planning and scheduling alone take minutes "
                      f"and gigabytes; {fix}", TaskCountWarning, stacklevel=3)


def warn_of_tiny_chunks(shape, given, step: int = 8) -> int:
    """Before any planning, from the shape alone: the fewest tasks ``given`` chunks
    (as `coerce_chunks` returns them) can make, warned of past TASK_WARNING."""
    if given is None:
        return 0
    count = chunk_count(shape, given)
    warn_of_many_tasks(count, f"chunks={tuple(given)} split the volume {tuple(shape)} into "
                       f"{count:,} chunks", fewer_chunks(shape, step))
    return count
