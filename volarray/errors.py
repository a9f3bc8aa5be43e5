"""Exception hierarchy: every error volarray raises on purpose is a VolarrayError.

Messages name the value given, what was required, and the argument to change.
"""


class VolarrayError(Exception):
    """Base class of all errors raised by volarray. ``parameter``: the argument of the
    call whose value is at fault (``"roi_size"``, ``"chunks"``...), or None; the command
    line names its flag from it."""

    def __init__(self, *args, parameter: str | None = None):
        super().__init__(*args)
        self.parameter = parameter

    def __reduce__(self):  # keeps ``parameter`` across processes (distributed workers)
        return _rebuild, (type(self), self.args, self.parameter)


def _rebuild(cls, args, parameter):
    return cls(*args, parameter=parameter)


class InputError(VolarrayError, ValueError):
    """The volume or an argument of `predict` / `plan` is not usable."""


class UnsupportedOpError(VolarrayError):
    """exact mode cannot place an operation of the model on a tile grid."""


class TraceError(VolarrayError):
    """The model could not be captured (torch.export, then torch.fx), or its capture
    differs from its own forward."""


class MemoryBudgetError(VolarrayError):
    """A task of the plan cannot fit in the memory limit."""


class OutputBusyError(VolarrayError):
    """Another run is writing the same output (it holds the output's claim). The command
    line exits with ``exit_code``: the request was valid, the output was busy."""

    exit_code = 1


class VolarrayWarning(UserWarning):
    """Base class of the warnings volarray issues: it runs, but likely not as meant."""


class SlowPlanWarning(VolarrayWarning):
    """A plan whose budgets (keep, memory_limit) force it to compute several times what
    a plan with more storage or memory would; its message names that budget."""


class TaskCountWarning(VolarrayWarning):
    """A run of so many tasks (tiny chunks, tiny windows) that planning and scheduling
    alone take minutes and gigabytes."""
