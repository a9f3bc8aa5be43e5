"""Load a weights file into a model, safely, with one-line errors.

Checkpoints come in many layouts: a bare state dict, PyTorch Lightning's ``state_dict``
whose keys carry ``model.``, nnU-Net's ``network_weights``, DataParallel's ``module.``,
torch.compile's ``_orig_mod.`` ... `load_weights` finds the state dict in the file that best
fits the model and loads it only when every key and shape fits; otherwise it raises an
`InputError` naming the keys and shapes, instead of torch's multi-line report. Files are
read with ``torch.load(weights_only=True)`` or safetensors: nothing in them is ever
unpickled as code.
"""
from __future__ import annotations

import pickle
import re
import sys
import zipfile
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .errors import InputError

__all__ = ["load_weights"]

# Where checkpoints keep the state dict, most usual first (ties go to the earlier one).
CHECKPOINT_KEYS = ("state_dict", "model_state_dict", "model", "network_weights", "net",
                   "weights", "params")
# Prefixes that wrappers put before every key: DataParallel / DDP, torch.compile, and the
# attribute that holds the network in Lightning modules and training wrappers.
KNOWN_PREFIXES = ("module.", "_orig_mod.", "model.", "net.", "network.")
MAX_DEPTH = 3    # levels of nested dicts searched for the state dict
MAX_STRIPS = 3   # prefixes removed one after another, e.g. "model._orig_mod."
SHOWN = 5        # keys named per kind of problem in a message
_ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")


def load_weights(model: torch.nn.Module, path, *, strict: bool = True) -> torch.nn.Module:
    """Load the weights in ``path`` (a ``torch.save`` file or ``.safetensors``) into ``model``.

    The state dict may be the whole file or nested in a checkpoint (see `CHECKPOINT_KEYS`),
    and its keys may carry a wrapper's prefix (see `KNOWN_PREFIXES`), removed only when that
    makes them fit the model; keys outside that prefix (a Lightning module's loss buffers, say)
    are then left out. With ``strict=True`` every model key must be in the file and
    every file key in the model; ``strict=False`` loads the keys both have, as torch's
    ``load_state_dict(strict=False)`` does. Shapes must agree either way. Raises `InputError`
    with one line that names the file, what is wrong and the fix. Returns ``model``.
    """
    path = Path(path)
    label = f"weights={str(path)!r}"
    content = read_weights_file(path, label)
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    candidates = list(find_state_dicts(content))
    if not candidates:
        raise InputError(f"{label} {describe_content(content)}, not a state dict (a dict of "
                         "parameter names to tensors); save one with "
                         "`torch.save(model.state_dict(), path)` and pass that file")
    fit = best_fit(candidates, expected)
    if fit.refused(strict):
        raise InputError(mismatch_message(label, fit, model))
    state = fit.state_dict(keep=None if strict else set(fit.matched))
    if strict:
        state = fill_num_batches_tracked(state, model)
    model.load_state_dict(state, strict=strict)
    return model


# --- reading the file ------------------------------------------------------------------

def read_weights_file(path: Path, label: str):
    """The file's content, read without unpickling arbitrary objects."""
    if not path.exists():
        raise InputError(f"{label} does not exist; pass the path of a weights file "
                         "(`torch.save(model.state_dict(), path)` or .safetensors)")
    if not path.is_file():
        raise InputError(f"{label} is not a file; pass the path of a weights file "
                         "(`torch.save(model.state_dict(), path)` or .safetensors)")
    if path.stat().st_size == 0:
        raise InputError(f"{label} is empty; pass a file saved with "
                         "`torch.save(model.state_dict(), path)`")
    if path.suffix == ".safetensors":
        return read_safetensors(path, label)
    if is_torchscript_archive(path):
        raise InputError(f"{label} is a TorchScript archive (torch.jit.save), not a state dict; "
                         "extract its weights with `torch.save(torch.jit.load(path).state_dict(), "
                         "'weights.pt')` and pass that file")
    try:
        return torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as e:
        names = unsafe_globals(path, e)
        if names:
            raise InputError(pickled_objects_message(label, names)) from e
        raise InputError(f"{label} is not a weights file torch can load safely "
                         f"({error_summary(e)}); pass a file saved with "
                         "`torch.save(model.state_dict(), path)` or a .safetensors file") from e


def read_safetensors(path: Path, label: str):
    try:
        from safetensors.torch import load_file
    except ImportError as e:
        raise InputError("reading .safetensors needs `pip install safetensors`") from e
    try:
        return load_file(str(path), device="cpu")
    except Exception as e:
        raise InputError(f"{label} is not a safetensors file that can be read "
                         f"({error_summary(e)}); pass a file written by "
                         "`safetensors.torch.save_file(model.state_dict(), path)`") from e


def is_torchscript_archive(path: Path) -> bool:
    """torch.load would hand these to torch.jit.load with a warning, then refuse them under
    weights_only; recognising them first gives a better fix."""
    if not zipfile.is_zipfile(path):
        return False
    try:
        with zipfile.ZipFile(path) as z:
            return any(n.endswith("/constants.pkl") or n == "constants.pkl" for n in z.namelist())
    except (OSError, zipfile.BadZipFile):
        return False


def unsafe_globals(path: Path, error: Exception) -> list[str]:
    """The Python classes and functions a pickle needs that weights_only refused: a sign of a
    pickled object (often a whole model) rather than a file that is not a checkpoint."""
    if not isinstance(error, pickle.UnpicklingError):
        return []
    names = []
    try:  # lists them all without unpickling, for the zip format
        names = list(torch.serialization.get_unsafe_globals_in_checkpoint(str(path)))
    except Exception:
        pass
    names += [n for n in re.findall(r"GLOBAL (\S+) was not an allowed global", str(error))
              if n not in names]
    return names


def pickled_objects_message(label: str, names: list[str]) -> str:
    modules = [n for n in names if is_module_class(n)]
    if modules:
        user = [n for n in modules if not n.startswith("torch.nn.modules.")]
        return (f"{label} holds a pickled model object ({(user or modules)[0]}), not a state "
                "dict; volarray never unpickles objects (that could run any code in the file): "
                "where the model is defined, re-save its weights with "
                "`torch.save(model.state_dict(), path)` and pass that file")
    return (f"{label} holds pickled Python objects besides tensors ({shown(names)}), which "
            "torch will not load safely; re-save only the weights with "
            "`torch.save(model.state_dict(), path)` and pass that file")


def is_module_class(qualified_name: str) -> bool:
    """Whether a pickled global is an nn.Module class, judged without importing anything."""
    if qualified_name.startswith("torch.nn.modules."):
        return True
    module_name, _, attr = qualified_name.rpartition(".")
    obj = getattr(sys.modules.get(module_name), attr, None)
    return isinstance(obj, type) and issubclass(obj, torch.nn.Module)


def error_summary(e: Exception) -> str:
    """``Type: the informative part`` of an exception, on one line: torch's weights_only
    errors bury the reason after paragraphs of advice."""
    text = str(e)
    reason = re.search(r"WeightsUnpickler error:\s*(.+?)(?:\n\s*\n|$)", text, re.S)
    if reason:
        text = reason.group(1)
    else:
        text = next((line for line in text.splitlines() if line.strip()), "")
    text = one_line(text)
    return f"{type(e).__name__}: {text}" if text else type(e).__name__


def one_line(text: str, limit: int = 200) -> str:
    """No ANSI colour codes, no newlines, no runaway length."""
    text = " ".join(_ANSI.sub("", text).split())
    return text if len(text) <= limit else text[:limit - 3] + "..."


# --- finding the state dict ------------------------------------------------------------

def find_state_dicts(content):
    """``(where, state_dict)`` for every dict of tensors in ``content``, breadth first and
    with the usual checkpoint keys first, so that ties go to the likelier layout."""
    queue = [("", content, 0)]
    while queue:
        where, obj, depth = queue.pop(0)
        if not isinstance(obj, dict):
            continue
        if is_state_dict(obj):
            yield where, obj
            continue
        if depth >= MAX_DEPTH:
            continue
        keys = [k for k in CHECKPOINT_KEYS if k in obj]
        keys += [k for k in obj if k not in CHECKPOINT_KEYS]
        queue += [(f"{where}[{k!r}]", obj[k], depth + 1) for k in keys]


def is_state_dict(obj) -> bool:
    """Names to tensors (``*_extra_state`` entries may hold anything)."""
    if not obj or not all(isinstance(k, str) for k in obj):
        return False
    return all(isinstance(v, torch.Tensor) or k.endswith("_extra_state") for k, v in obj.items())


def describe_content(content) -> str:
    if isinstance(content, torch.Tensor):
        return f"holds a single tensor of shape {tuple(content.shape)}"
    if isinstance(content, dict):
        if not content:
            return "holds an empty dict"
        return (f"holds a dict with keys {shown([repr(k) for k in content])} and no dict of "
                f"tensors within {MAX_DEPTH} levels")
    return f"holds a {type(content).__name__}"


@dataclass
class Fit:
    """One reading of the file (a state dict and a prefix removed from its keys) against
    the model's keys and shapes."""
    where: str
    prefix: str
    source: dict = field(repr=False)
    matched: list = field(default_factory=list)
    missing: list = field(default_factory=list)
    unexpected: list = field(default_factory=list)
    mismatched: list = field(default_factory=list)   # (key, file shape, model shape)
    order: int = 0

    def rank(self):
        """More keys with the right shape, then more names, then fewer missing; ties go to
        the earlier (likelier) layout, so that an ambiguous file is reported, not guessed."""
        return (len(self.matched), len(self.matched) + len(self.mismatched),
                -len(self.missing), -self.order)

    def refused(self, strict: bool) -> bool:
        """Shapes must agree and something must load; strict also wants the same keys."""
        if self.mismatched or not self.matched:
            return True
        return strict and bool(self.missing or self.unexpected)

    def state_dict(self, keep=None) -> OrderedDict:
        """The state dict with the prefix removed (and torch's per-module version metadata
        moved along), restricted to ``keep`` if given."""
        p = self.prefix
        state = OrderedDict((k[len(p):], v) for k, v in self.source.items() if k.startswith(p)
                            and (keep is None or k[len(p):] in keep))
        metadata = getattr(self.source, "_metadata", None)
        if metadata is not None:
            state._metadata = OrderedDict(
                (strip_module_prefix(k, p), v) for k, v in metadata.items()
                if strip_module_prefix(k, p) is not None)
        return state


def strip_module_prefix(module_path: str, prefix: str):
    """A module path of the metadata (``"model.enc1"``, no trailing dot) with the key prefix
    removed, or None when the module lies outside it."""
    if not prefix:
        return module_path
    if module_path == prefix[:-1]:
        return ""
    return module_path[len(prefix):] if module_path.startswith(prefix) else None


def prefixes_to_try(keys) -> list[str]:
    """``""`` and each chain of up to MAX_STRIPS wrapper prefixes the keys start with: a
    known one, or any first name that all remaining keys share."""
    found, frontier = [""], [""]
    for _ in range(MAX_STRIPS):
        next_frontier = []
        for p in frontier:
            rest = [k[len(p):] for k in keys if k.startswith(p)]
            steps = {q for q in KNOWN_PREFIXES if any(k.startswith(q) for k in rest)}
            first = {k.split(".", 1)[0] + "." for k in rest if "." in k}
            if len(first) == 1 and all("." in k for k in rest):
                steps |= first
            for q in sorted(steps, key=lambda q: (q not in KNOWN_PREFIXES, q)):
                if p + q not in found:
                    found.append(p + q)
                    next_frontier.append(p + q)
        frontier = next_frontier
    return found


def compare(where: str, source: dict, prefix: str, expected: dict, order: int) -> Fit:
    fit = Fit(where, prefix, source, order=order)
    stripped = {k[len(prefix):]: v for k, v in source.items() if k.startswith(prefix)}
    for key, shape in expected.items():
        if key not in stripped:
            if not key.endswith("num_batches_tracked"):  # BatchNorm fills it; eval ignores it
                fit.missing.append(key)
        elif not isinstance(stripped[key], torch.Tensor):
            fit.matched.append(key)  # an *_extra_state entry
        elif tuple(stripped[key].shape) == shape:
            fit.matched.append(key)
        else:
            fit.mismatched.append((key, tuple(stripped[key].shape), shape))
    fit.unexpected = [k for k in stripped if k not in expected]
    return fit


def best_fit(candidates, expected: dict) -> Fit:
    fits, order = [], 0
    for where, source in candidates:
        for prefix in prefixes_to_try(list(source)):
            fits.append(compare(where, source, prefix, expected, order))
            order += 1
    return max(fits, key=Fit.rank)


def fill_num_batches_tracked(state: OrderedDict, model: torch.nn.Module) -> OrderedDict:
    """Old checkpoints lack BatchNorm's counter; keep the model's own so strict loading works."""
    for key, value in model.state_dict().items():
        if key.endswith("num_batches_tracked") and key not in state:
            state[key] = value
    return state


# --- explaining a mismatch -------------------------------------------------------------

def mismatch_message(label: str, fit: Fit, model: torch.nn.Module) -> str:
    read = []
    if fit.where:
        read.append(f"the state dict under {fit.where}")
    if fit.prefix:
        read.append(f"key prefix {fit.prefix!r} removed")
    head = f"{label} ({', '.join(read)})" if read else label
    parts = []
    if fit.missing:
        parts.append(f"{count(fit.missing, 'key')} missing from the file: {shown(fit.missing)}")
    if fit.unexpected:
        parts.append(f"{count(fit.unexpected, 'key')} in the file that the model lacks: "
                     f"{shown(fit.unexpected)}")
    if fit.mismatched:
        shapes = [f"{k} is {f} in the file but {m} in the model" for k, f, m in fit.mismatched]
        parts.append(f"{count(fit.mismatched, 'shape mismatch', 'shape mismatches')}: "
                     f"{shown(shapes)}")
    return (f"{head} does not fit the model {type(model).__name__}: {'; '.join(parts)}; "
            f"{likely_cause(fit)}")


def likely_cause(fit: Fit) -> str:
    prefix = differing_prefix(fit.missing, fit.unexpected)
    if prefix is not None:
        side, p = prefix
        if side == "file":
            return (f"the file's keys carry an extra prefix {p!r}: the weights may belong to a "
                    f"part of a larger network, or pass the network that holds them as model=")
        return (f"the model's keys carry a prefix {p!r} that the file lacks: pass the wrapped "
                "network (e.g. `model.module`) as model=")
    if fit.mismatched and not (fit.missing or fit.unexpected):
        return ("the file was saved from the same architecture with another width or channel "
                "count: build the model with the arguments it was trained with")
    return ("the file was likely saved from another architecture, version or width of the "
            "model: check that model= is the network these weights were trained for")


def differing_prefix(missing, unexpected):
    """``("file", p)`` when a file key is a model key with ``p`` before it, ``("model", p)``
    for the reverse; None if no such pair."""
    return _prefixed(unexpected, missing, "file") or _prefixed(missing, unexpected, "model")


def _prefixed(keys, others, side: str):
    """(side, p) for the first key that is one of ``others`` with ``p`` before it."""
    others = set(others)
    for key in keys:
        parts = key.split(".")
        for i in range(1, len(parts)):
            if ".".join(parts[i:]) in others:
                return side, ".".join(parts[:i]) + "."
    return None


def count(items, singular: str, plural: str | None = None) -> str:
    return f"{len(items)} {singular if len(items) == 1 else (plural or singular + 's')}"


def shown(items) -> str:
    items = list(items)
    more = f" (and {len(items) - SHOWN} more)" if len(items) > SHOWN else ""
    return ", ".join(str(i) for i in items[:SHOWN]) + more
