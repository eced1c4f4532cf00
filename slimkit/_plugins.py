"""Loading the method plug-ins once.

The methods (layer 6) register their recipe steps, search spaces and structure ops when their
modules are imported. Lower layers that need the registry filled (the step registry when a
recipe names a step, ``load_model`` when it replays a pruned model's structure) call
:func:`load_methods`, which imports ``slimkit.methods`` by name: the one dynamic import of
slimkit's own code, so no package imports one above it.
"""

from __future__ import annotations

import importlib

__all__ = ["load_methods"]

_loaded = False


def load_methods() -> None:
    """Import every method module (idempotent; cheap after the first call)."""
    global _loaded
    if not _loaded:
        _loaded = True
        importlib.import_module("slimkit.methods")
