"""How a failed capture is reported: one line, at the model's own line of code.

torch raises long, multi-line errors from deep inside its tracers; volarray reports the
first line of the message and the innermost frame of the user's code, and says when
the volume's channels are not the model's.
"""
from __future__ import annotations

import contextlib
import logging
import os
import traceback
from pathlib import Path

import torch.nn as nn

from .errors import TraceError


def first_line(exc: BaseException) -> str:
    """An exception's message without torch.fx's multi-line context."""
    text = str(exc).strip()
    return text.splitlines()[0] if text else ""


def user_frame(exc: BaseException) -> str:
    """' at FILE:LINE in FUNCTION (`source`)' for the innermost frame of the traceback
    that is not torch's own: the model's line at fault."""
    frames = [f for f in traceback.extract_tb(exc.__traceback__)
              if f"{os.sep}torch{os.sep}" not in f.filename
              and f"{os.sep}volarray{os.sep}" not in f.filename]
    if not frames:
        return ""
    f = frames[-1]
    where = os.sep.join(Path(f.filename).parts[-3:])
    return f" at {where}:{f.lineno} in {f.name} (`{(f.line or '').strip()}`)"


def channel_mismatch(model: nn.Module, input_shape, error: Exception) -> None:
    """Raise a TraceError naming the channel counts when the model's first convolution
    takes another number of channels than the volume has."""
    first = next((m for m in model.modules() if isinstance(m, nn.modules.conv._ConvNd)), None)
    if first is not None and first.in_channels != input_shape[1]:
        raise TraceError(
            f"the model's first convolution takes {first.in_channels} input "
            f"channel(s); the volume has {input_shape[1]} (shape {tuple(input_shape[1:])}): "
            "pass a (C, Z, Y, X) volume with the channels the model was trained on") from error


@contextlib.contextmanager
def quiet_fake_tensors():
    """torch logs every op that fails on fake tensors, with its traceback, before the
    exception reaches volarray, which reports it in one line."""
    log = logging.getLogger("torch._subclasses.fake_tensor")
    level = log.level
    log.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        log.setLevel(level)
