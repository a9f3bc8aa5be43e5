"""Exception hierarchy: every error volarray raises on purpose is a VolarrayError.

Messages name the value given, what was required, and the argument to change.
"""


class VolarrayError(Exception):
    """Base class of all errors raised by volarray."""


class InputError(VolarrayError, ValueError):
    """The volume or an argument of `predict` / `plan` is not usable."""


class UnsupportedOpError(VolarrayError):
    """exact mode cannot place an operation of the model on a tile grid."""


class TraceError(VolarrayError):
    """The model could not be captured (torch.export, then torch.fx), or its capture
    differs from its own forward."""


class MemoryBudgetError(VolarrayError):
    """A task of the plan cannot fit in the memory limit."""
