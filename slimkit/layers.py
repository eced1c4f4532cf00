"""Choosing layers by name, and replacing them: the one vocabulary every method uses.

A :class:`LayerSelection` says which of a model's layers a method touches and with what value:
``{"_default": v, "fc1": w, "layer3.*": None}`` (a name or a glob; ``None`` leaves a layer
out), plus ``skip`` globs and an optional ``filter_fn(module, name)``. Family keys
(``conv``, ``fc``) match every convolution or linear layer. The most specific key wins: an
exact name, then a glob, then a family, then ``_default``.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

from torch import nn

__all__ = ["set_module", "LayerSelection", "FAMILIES"]

# Family keys a selection may use: a key that names a kind of layer rather than one layer.
FAMILIES: dict[str, tuple[type[nn.Module], ...]] = {
    "conv": (nn.Conv1d, nn.Conv2d, nn.Conv3d),
    "fc": (nn.Linear,),
}


def set_module(root: nn.Module, name: str, new: nn.Module) -> None:
    """Replace the submodule ``name`` (dotted) of ``root`` by ``new``."""
    parent_name, _, child = name.rpartition(".")
    parent = root.get_submodule(parent_name) if parent_name else root
    setattr(parent, child, new)


def _is_glob(key: str) -> bool:
    return any(c in key for c in "*?[")


@dataclass
class LayerSelection:
    """Which layers a method touches, and the value each gets (see the module doc).

    >>> sel = LayerSelection({"_default": 0.5, "fc3": None}, skip=("conv*",))
    >>> model = nn.Sequential()
    >>> model.add_module("conv1", nn.Conv2d(1, 2, 3)); model.add_module("fc1", nn.Linear(2, 2))
    >>> model.add_module("fc3", nn.Linear(2, 2))
    >>> [(name, value) for name, _, value in sel.select(model, kinds=(nn.Linear, nn.Conv2d))]
    [('fc1', 0.5)]
    """

    values: Mapping[str, Any] = field(default_factory=dict)
    skip: Iterable[str] = ()
    filter_fn: Callable[[nn.Module, str], bool] | None = None

    def value_for(self, name: str, module: nn.Module) -> Any:
        """The value for layer ``name`` (``None``: leave it out)."""
        if any(fnmatch.fnmatchcase(name, pattern) for pattern in self.skip):
            return None
        if self.filter_fn is not None and not self.filter_fn(module, name):
            return None
        if name in self.values:
            return self.values[name]
        globs = [k for k in self.values if _is_glob(k) and fnmatch.fnmatchcase(name, k)]
        if globs:
            return self.values[max(globs, key=len)]  # the longest (most specific) pattern
        for family, kinds in FAMILIES.items():
            if family in self.values and isinstance(module, kinds):
                return self.values[family]
        return self.values.get("_default")

    def select(self, model: nn.Module, kinds: tuple[type[nn.Module], ...]) -> Iterator[tuple[str, nn.Module, Any]]:
        """``(name, module, value)`` for each layer of ``kinds`` that the selection keeps."""
        for name, module in model.named_modules():
            if name and isinstance(module, kinds):
                value = self.value_for(name, module)
                if value is not None:
                    yield name, module, value

    def unknown_names(self, model: nn.Module) -> list[str]:
        """Keys naming no layer of ``model`` (family keys, ``_default`` and globs matching one are fine)."""
        names = {n for n, _ in model.named_modules() if n}
        return [k for k in self.values if k != "_default" and k not in FAMILIES and k not in names
                and not (_is_glob(k) and any(fnmatch.fnmatchcase(n, k) for n in names))]
