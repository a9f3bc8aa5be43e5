"""Calling the user's model as it is: its dtype, its forward on meta tensors (its
output's shape at no cost, the model left exactly as it was), and the prediction among
its outputs. Window mode, padding and the capture use these; none looks at a graph.
"""
from __future__ import annotations

import contextlib
import warnings

import torch
import torch.nn as nn

from .errors import InputError


def model_dtype(model: nn.Module) -> torch.dtype:
    """The dtype of the model's weights (float32 when it has none)."""
    params = list(model.parameters())
    return params[0].dtype if params else torch.float32


def meta_forward(model: nn.Module, input_shape, dtype=torch.float32):
    """``model`` itself (not a capture) on an empty meta tensor: its output, at no cost,
    with the model left exactly as it was. Raises what the forward raises."""
    with meta_weights(model), torch.inference_mode(), warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # torch's advice, shown by the model
        return model(torch.empty(input_shape, dtype=dtype, device="meta"))


@contextlib.contextmanager
def meta_weights(module: nn.Module):
    """Within the block, every parameter and buffer of ``module`` is an empty tensor on
    the meta device; afterwards each is exactly the object it was. (Unlike
    torch.func.functional_call, this restores models in which one submodule has two
    names, as MONAI's DynUNet and nnU-Net's networks have: each module object is
    visited once.)"""
    saved = []
    try:
        for m in module.modules():  # each module object once, however many names it has
            for store in (m._parameters, m._buffers):
                for name, t in list(store.items()):
                    if t is None or t.is_meta:
                        continue
                    saved.append((store, name, t))
                    empty = torch.empty_like(t, device="meta")
                    store[name] = nn.Parameter(empty, t.requires_grad) if isinstance(
                        t, nn.Parameter) else empty
        yield module
    finally:
        for store, name, t in reversed(saved):
            store[name] = t


def pick_output(y, select=None, what: str = "the model"):
    """The prediction among a model's outputs: the tensor itself; element ``select`` of
    a list or tuple (by default the first: nnU-Net's deep-supervision convention, the
    full-resolution head); entry ``select`` of a dict, which must be named."""
    if isinstance(y, (list, tuple)) and y:
        index = 0 if select is None else select
        if not isinstance(index, int) or isinstance(index, bool) or not -len(y) <= index < len(y):
            raise InputError(f"select={select!r}: {what} returns a {type(y).__name__} of "
                             f"{len(y)} outputs; pass select= an index from 0 to {len(y) - 1}", parameter='select')
        return y[index]
    if isinstance(y, dict):
        if select not in y:
            raise InputError(f"select={select!r}: {what} returns a dict with keys {list(y)}; "
                             "pass select= the key of the prediction", parameter='select')
        return y[select]
    if select not in (None, 0):
        raise InputError(f"select={select!r}: {what} returns one output; pass select=None", parameter='select')
    return y
