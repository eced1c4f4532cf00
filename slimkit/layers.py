"""Choosing layers by name, and replacing them: the one vocabulary every method uses.

A :class:`LayerSelection` says which of a model's layers a method touches and with what value:
``{"_default": v, "fc1": w, "layer3.*": None}`` (a name or a glob; ``None`` leaves a layer
out), plus ``skip`` patterns and an optional ``filter_fn(module, name)``. Family keys
(``conv``, ``fc``) match every convolution or linear layer. The most specific key wins: an
exact name, then a glob, then a family, then ``_default``. A skip pattern is a name, a glob
or a block: ``"layer3"`` skips ``layer3`` and every layer inside it.

Each method keeps its own field names (pruning's ``layers`` + ``skip``, low-rank's ``ranks``,
Deep Compression's ``all`` / ``conv`` / ``fc`` keys) and maps them onto a selection;
:meth:`LayerSelection.check` rejects a key or a skip pattern that names no layer, before any
work, with a message that names the field and lists the layers.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Callable, Collection, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from torch import nn

from .errors import ConfigError

__all__ = ["set_module", "LayerSelection", "FAMILIES", "FilterFn", "family_of", "match_names", "layer_error",
           "listing", "UNKNOWN", "UNMATCHED"]

FilterFn = Callable[[nn.Module, str], bool]

# Family keys a selection may use: a key that names a kind of layer rather than one layer.
FAMILIES: dict[str, tuple[type[nn.Module], ...]] = {
    "conv": (nn.modules.conv._ConvNd,),  # every convolution, transposed ones included
    "fc": (nn.Linear,),
}

# Messages for a name that matches no layer: ``{key}`` the name, ``{what}`` the kind of layers
# listed, ``{names}`` their listing.
UNKNOWN = "unknown layer name '{key}'; the model's {what} are: {names}"
UNMATCHED = "no layer is named or matches '{key}'; the model's {what} are: {names}"


def set_module(root: nn.Module, name: str, new: nn.Module) -> None:
    """Replace the submodule ``name`` (dotted) of ``root`` by ``new``."""
    parent_name, _, child = name.rpartition(".")
    parent = root.get_submodule(parent_name) if parent_name else root
    setattr(parent, child, new)


def family_of(module: nn.Module) -> str | None:
    """The family key (``conv``, ``fc``) of ``module``, or None."""
    return next((family for family, kinds in FAMILIES.items() if isinstance(module, kinds)), None)


def _is_glob(key: str) -> bool:
    return any(c in key for c in "*?[")


def _matches(pattern: str, name: str) -> bool:
    """``pattern`` names ``name`` exactly, as a glob, or as a block holding it."""
    return name == pattern or name.startswith(pattern + ".") or (_is_glob(pattern) and fnmatch.fnmatchcase(name, pattern))


def listing(names: Iterable[str], limit: int = 30) -> str:
    """``"a, b, c"``; past ``limit`` names: ``"a, b, ... (N in all)"``."""
    names = list(names)
    return ", ".join(names[:limit]) + (f", ... ({len(names)} in all)" if len(names) > limit else "")


def layer_error(key: str, names: Iterable[str], *, field: str, what: str, message: str = UNKNOWN) -> ConfigError:
    """The :class:`ConfigError` for ``key`` naming no layer (``message``: see :data:`UNKNOWN`)."""
    return ConfigError(message.format(key=key, what=what, names=listing(names)), field=field)


def match_names(patterns: Iterable[str], names: Iterable[str], *, field: str, what: str,
                message: str = UNMATCHED) -> set[str]:
    """The ``names`` that ``patterns`` (names, globs or blocks) match; a pattern matching none is an error.

    >>> sorted(match_names(["fc*"], ["conv1", "fc1", "fc2"], field="skip", what="layers"))
    ['fc1', 'fc2']
    """
    names = list(names)
    hit: set[str] = set()
    for pattern in patterns:
        found = [n for n in names if _matches(pattern, n)]
        if not found:
            raise layer_error(pattern, names, field=field, what=what, message=message)
        hit.update(found)
    return hit


@dataclass
class LayerSelection:
    """Which layers a method touches, and the value each gets (see the module doc).

    >>> sel = LayerSelection({"_default": 0.5, "fc3": None}, skip=("conv*",))
    >>> model = nn.Sequential()
    >>> model.add_module("conv1", nn.Conv2d(1, 2, 3)); model.add_module("fc1", nn.Linear(2, 2))
    >>> model.add_module("fc3", nn.Linear(2, 2))
    >>> [(name, value) for name, _, value in sel.select(model, kinds=(nn.Linear, nn.Conv2d))]
    [('fc1', 0.5)]
    >>> sel.resolve(dict(model.named_children()))
    ({'fc1': 0.5}, {'conv1': 'skipped by name'})
    """

    values: Mapping[str, Any] = field(default_factory=dict)
    skip: Iterable[str] = ()
    filter_fn: FilterFn | None = None

    def key_for(self, name: str, module: nn.Module) -> str | None:
        """The key of :attr:`values` that applies to layer ``name`` (skip and ``filter_fn`` aside), or None."""
        if name in self.values:
            return name
        globs = [k for k in self.values if _is_glob(k) and fnmatch.fnmatchcase(name, k)]
        if globs:
            return max(globs, key=len)  # the longest (most specific) pattern
        family = family_of(module)
        if family in self.values:
            return family
        return "_default" if "_default" in self.values else None

    def left_out(self, name: str, module: nn.Module) -> str | None:
        """Why ``skip`` or ``filter_fn`` leaves layer ``name`` out (None: they keep it)."""
        if any(_matches(pattern, name) for pattern in self.skip):
            return "skipped by name"
        if self.filter_fn is not None and not self.filter_fn(module, name):
            return "left out by filter_fn"
        return None

    def value_for(self, name: str, module: nn.Module) -> Any:
        """The value for layer ``name`` (``None``: leave it out)."""
        if self.left_out(name, module):
            return None
        key = self.key_for(name, module)
        return None if key is None else self.values[key]

    def explicit(self, layers: Mapping[str, nn.Module]) -> dict[str, Any]:
        """``{name: value}`` of the ``layers`` given a value by a key other than ``_default`` (skip aside)."""
        out = {}
        for name, module in layers.items():
            key = self.key_for(name, module)
            if key is not None and key != "_default":
                out[name] = self.values[key]
        return out

    def resolve(self, layers: Mapping[str, nn.Module]) -> tuple[dict[str, Any], dict[str, str]]:
        """``({name: value} of the layers kept, {name: why} of those skip or filter_fn left out)``."""
        kept: dict[str, Any] = {}
        dropped: dict[str, str] = {}
        for name, module in layers.items():
            why = self.left_out(name, module)
            if why:
                dropped[name] = why
                continue
            key = self.key_for(name, module)
            if key is not None and self.values[key] is not None:
                kept[name] = self.values[key]
        return kept, dropped

    def select(self, model: nn.Module, kinds: tuple[type[nn.Module], ...]) -> Iterator[tuple[str, nn.Module, Any]]:
        """``(name, module, value)`` for each layer of ``kinds`` that the selection keeps."""
        for name, module in model.named_modules():
            if name and isinstance(module, kinds):
                value = self.value_for(name, module)
                if value is not None:
                    yield name, module, value

    def unknown_names(self, model: nn.Module | Collection[str]) -> list[str]:
        """Keys naming no layer of ``model`` (or no name of a collection); family keys, ``_default``
        and globs matching one are fine."""
        names = [n for n, _ in model.named_modules() if n] if isinstance(model, nn.Module) else list(model)
        known = set(names)
        return [k for k in self.values if k != "_default" and k not in FAMILIES and k not in known
                and not (_is_glob(k) and any(fnmatch.fnmatchcase(n, k) for n in names))]

    def check(
        self,
        names: Collection[str],
        *,
        what: str,
        field: str = "layers",
        skip_field: str | None = "skip",
        unknown: str = UNKNOWN,
        unmatched: str = UNMATCHED,
        shown: Sequence[str] | None = None,
    ) -> None:
        """Raise a :class:`ConfigError` for the first key naming none of ``names`` (in ``field``), then
        for the first skip pattern matching none (in ``skip_field``; None: skip is not checked).
        The message lists ``shown`` (default: ``names``) as the model's ``what``.

        >>> LayerSelection({"fc9": 0.5}).check(["fc1", "fc2"], what="prunable layers")
        Traceback (most recent call last):
        ...
        slimkit.errors.ConfigError: field 'layers': unknown layer name 'fc9'; the model's prunable layers are: fc1, fc2
        """
        shown = list(names) if shown is None else shown
        bad = self.unknown_names(names)
        if bad:
            raise layer_error(bad[0], shown, field=field, what=what, message=unknown)
        if skip_field is not None:
            for pattern in self.skip:
                if not any(_matches(pattern, n) for n in names):
                    raise layer_error(pattern, shown, field=skip_field, what=what, message=unmatched)
