"""slimkit: fit a trained PyTorch model to a deployment budget.

Top level API (imported lazily, so ``import slimkit`` stays fast)::

    slimkit.train, slimkit.profile, slimkit.apply, slimkit.demo      # the CLI's verbs
    slimkit.load_model, slimkit.save_model, slimkit.load_data         # inputs
    slimkit.fit, slimkit.TrainConfig                                  # the fine-tune loop
    slimkit.export_onnx, slimkit.Recipe, slimkit.register_step        # export, recipes
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_LAZY = {
    # verbs
    "train": "slimkit.api",
    "profile": "slimkit.api",
    "apply": "slimkit.api",
    "demo": "slimkit.api",
    "ApplyResult": "slimkit.api",
    "TrainResult": "slimkit.api",
    # inputs
    "load_model": "slimkit.models",
    "save_model": "slimkit.models",
    "create_model": "slimkit.models",
    "register_model": "slimkit.models",
    "load_data": "slimkit.data",
    "DataBundle": "slimkit.data",
    # training, export, recipes
    "fit": "slimkit.training",
    "TrainConfig": "slimkit.training",
    "export_onnx": "slimkit.export",
    "parity": "slimkit.export",
    "Recipe": "slimkit.recipe",
    "register_step": "slimkit.recipe",
    "Finetune": "slimkit.methods.core",
    "Export": "slimkit.methods.core",
    # errors
    "SlimkitError": "slimkit.errors",
    "ConfigError": "slimkit.errors",
    "ExportError": "slimkit.errors",
}

__all__ = sorted(_LAZY) + ["__version__"]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'slimkit' has no attribute '{name}'")


def __dir__() -> list[str]:
    return __all__
