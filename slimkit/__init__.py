"""slimkit: fit a trained PyTorch model to a deployment budget.

Top level API (imported lazily, so ``import slimkit`` stays fast)::

    slimkit.train, slimkit.profile, slimkit.apply, slimkit.demo      # the CLI's verbs
    slimkit.compress, slimkit.worker, slimkit.api.nas                 # the searches
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
    "ApplyResult": "slimkit.pipeline",
    "TrainResult": "slimkit.api",
    "ModelRef": "slimkit.models",
    "Target": "slimkit.measure",
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
    "Recipe": "slimkit.pipeline",
    "register_step": "slimkit.pipeline",
    "Finetune": "slimkit.pipeline",
    "Export": "slimkit.pipeline",
    # pruning (issue 3)
    "prune_": "slimkit.methods.prune",
    "Unstructured": "slimkit.methods.prune",
    "MaskHook": "slimkit.methods.prune",
    "masks_of": "slimkit.methods.prune",
    "finalize_": "slimkit.methods.prune",
    "Structured": "slimkit.methods.prune",
    "sensitivity": "slimkit.methods.prune",
    "SensitivityConfig": "slimkit.methods.prune",
    "lottery": "slimkit.methods.prune",
    "LotteryConfig": "slimkit.methods.prune",
    # quantization and Deep Compression (issue 4)
    "quantize_": "slimkit.methods.quantize",
    "quantize_onnx": "slimkit.methods.quantize",
    "int8_ops": "slimkit.methods.quantize",
    "StaticInt8": "slimkit.methods.quantize",
    "DynamicInt8": "slimkit.methods.quantize",
    "QAT": "slimkit.methods.quantize",
    "deep_compress": "slimkit.methods.coding",
    "DeepCompression": "slimkit.methods.coding",
    "load_packed": "slimkit.export.packed",
    # the search (issue 6) and its option objects
    "compress": "slimkit.api",
    "worker": "slimkit.api",
    "CompressResult": "slimkit.search",
    "Budget": "slimkit.search",
    "Search": "slimkit.search",
    "Store": "slimkit.search",
    "CompressSpace": "slimkit.search",
    "WorkerOptions": "slimkit.search",
    # distillation, low-rank decomposition, efficient architecture (issue 5)
    "distill": "slimkit.methods.distill",
    "Distillation": "slimkit.methods.distill",
    "Distill": "slimkit.methods.distill",
    "FeatureDistillation": "slimkit.methods.distill",
    "decompose_": "slimkit.methods.decompose",
    "LowRank": "slimkit.methods.decompose",
    "separable_": "slimkit.methods.architecture",
    "Separable": "slimkit.methods.architecture",
    # hardware-aware architecture search (issue 7); the verb itself: slimkit.api.nas (slimkit.nas is the package)
    "NasSpace": "slimkit.nas",
    "build_latency_table": "slimkit.nas",
    "TableConfig": "slimkit.nas",
    "LatencyTable": "slimkit.nas",
    "NasResult": "slimkit.nas",
    "register_family": "slimkit.nas",
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
