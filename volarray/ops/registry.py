"""A registry of op builders, keyed by what a captured node calls.

In the manner of ``functools.singledispatch`` and ``dask.utils.Dispatch``: a builder is
registered under module classes (looked up along the class's MRO, so subclasses of
``nn.Conv3d`` find the conv builder), functions and ATen OpOverloads (by identity),
tensor method names, or a rule (a predicate on the function, as for every ATen op
tagged ``torch.Tag.pointwise``). Explicit keys win over rules.

A builder is ``builder(ctx) -> LocalOp | GlobalNode | None``: ``ctx`` describes one
captured node (see `volarray.trace.OpContext`); ``None`` means that this form of the op
has no tile kernel. The registrations themselves are in `volarray.ops.table`.
"""
from __future__ import annotations

from typing import Callable

import torch.fx as fx

Builder = Callable[..., object]


class Registry:
    """Builders by module class, function, method name, and rules over functions."""

    def __init__(self):
        self.by_module: dict[type, Builder] = {}
        self.by_function: dict[object, Builder] = {}
        self.by_method: dict[str, Builder] = {}
        self.rules: list[tuple[Callable[[object], bool], Builder]] = []

    def register(self, builder: Builder, *, modules=(), functions=(), methods=(),
                 rule: Callable[[object], bool] | None = None) -> Builder:
        """Register ``builder`` for each key given; one op, one call."""
        for table, keys in ((self.by_module, modules), (self.by_function, functions),
                            (self.by_method, methods)):
            for key in keys:
                if table.get(key, builder) is not builder:
                    raise ValueError(f"{key!r} is registered twice: to {table[key].__name__} "
                                     f"and {builder.__name__}")
                table[key] = builder
        if rule is not None:
            self.rules.append((rule, builder))
        return builder

    def lookup(self, node: fx.Node, module=None) -> Builder | None:
        """The builder for ``node`` (``module``: the module a call_module node calls),
        or None when no builder is registered for what it calls."""
        if node.op == "call_module":
            return next((self.by_module[c] for c in type(module).__mro__
                         if c in self.by_module), None)
        if node.op == "call_method":
            return self.by_method.get(node.target)
        if node.op != "call_function":
            return None
        try:
            builder = self.by_function.get(node.target)
        except TypeError:  # an unhashable callable
            builder = None
        if builder is not None:
            return builder
        return next((b for rule, b in self.rules if rule(node.target)), None)
