"""A registry of ops, keyed by what a captured node calls: the one table of what each
captured op becomes.

In the manner of ``functools.singledispatch`` and ``dask.utils.Dispatch``: a builder is
registered under module classes (looked up along the class's MRO, so subclasses of
``nn.Conv3d`` find the conv builder), functions and ATen OpOverloads (by identity),
tensor method names, or a rule (a predicate on the function, as for every ATen op
tagged ``torch.Tag.pointwise``). Explicit keys win over rules.

A builder is ``builder(ctx) -> LocalOp | GlobalNode | None``: ``ctx`` describes one
captured node (see `volarray.trace.OpContext`); ``None`` means that this form of the op
has no tile kernel. Beside each op, the registration also says

- how torch.export's ATen op is lowered to the torch function the builder reads
  (``lowering``: `volarray.capture.lower` reads it), and
- whether the op is per voxel in any memory layout (``per_voxel``: each output voxel
  depends on that voxel's values alone, channels first or last), so that it may run
  inside a channels-last block (`volarray.layout`).

The registrations themselves are in `volarray.ops.table`.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch.fx as fx

Builder = Callable[..., object]


@dataclass(frozen=True)
class Const:
    """A fixed argument of a lowered call (the mode of an interpolation)."""
    value: object


class Registry:
    """Builders by module class, function, method name, and rules over functions; the
    lowering of ATen ops; the ops that are per voxel in any layout."""

    def __init__(self):
        self.by_module: dict[type, Builder] = {}
        self.by_function: dict[object, Builder] = {}
        self.by_method: dict[str, Builder] = {}
        self.rules: list[tuple[Callable[[object], bool], Builder]] = []
        # ATen op -> (torch function, the ATen argument names in its positional order)
        self.lowerings: dict[object, tuple[Callable, tuple]] = {}
        self.per_voxel_modules: set[type] = set()
        self.per_voxel_functions: set = set()
        self.per_voxel_methods: set[str] = set()
        self.per_voxel_rules: list[Callable[[object], bool]] = []

    def register(self, builder: Builder | None, *, modules=(), functions=(), methods=(),
                 rule: Callable[[object], bool] | None = None, lowering: dict | None = None,
                 per_voxel: bool = False) -> Builder | None:
        """Register ``builder`` for each key given; one op, one call. ``builder=None``:
        the op has no tile kernel of its own (it runs only inside a channels-last
        block). ``lowering``: {ATen op: (torch function, the ATen argument names, or
        `Const` values, in the function's positional order)}. ``per_voxel``: the keys
        may run inside a channels-last block."""
        for table, keys in ((self.by_module, modules), (self.by_function, functions),
                            (self.by_method, methods)):
            for key in keys:
                if table.get(key, builder) is not builder:
                    raise ValueError(f"{key!r} is registered twice: to {table[key].__name__} "
                                     f"and {getattr(builder, '__name__', builder)}")
                if builder is not None:
                    table[key] = builder
        for op, how in (lowering or {}).items():
            if self.lowerings.get(op, how) != how:
                raise ValueError(f"{op!r} is lowered twice: to {self.lowerings[op]} and {how}")
            self.lowerings[op] = how
        if rule is not None and builder is not None:
            self.rules.append((rule, builder))
        if per_voxel:
            self.per_voxel_modules.update(modules)
            self.per_voxel_functions.update(functions)
            self.per_voxel_methods.update(methods)
            self.per_voxel_rules += [rule] if rule is not None else []
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

    def is_per_voxel(self, node: fx.Node, module=None) -> bool:
        """Whether what ``node`` calls is per voxel in any layout (see `register`)."""
        if node.op == "call_module":
            return any(c in self.per_voxel_modules for c in type(module).__mro__)
        if node.op == "call_method":
            return node.target in self.per_voxel_methods
        if node.op != "call_function":
            return False
        try:
            if node.target in self.per_voxel_functions:
                return True
        except TypeError:  # an unhashable callable
            return False
        return any(rule(node.target) for rule in self.per_voxel_rules)
