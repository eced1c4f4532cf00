"""Pruning that really shrinks: unstructured magnitude pruning with masks, structured channel
pruning (Torch-Pruning's dependency graph), sensitivity analysis and lottery tickets.

Top level API::

    prune_(model, Unstructured(sparsity=0.9, scope="global"))   # zero the smallest weights, masks held
    prune_(model, Structured(ratio=0.3, importance="l2"), example=x)   # remove channels for real
    MaskHook.of(model)         # a fit() hook keeping the masks applied while fine-tuning
    finalize_(model)           # drop the masks (the zeros stay); per-layer non-zero counts
    sensitivity(model, data, SensitivityConfig("unstructured", ratios))   # prune each layer alone, no fine-tune
    lottery(model, data, LotteryConfig(rounds=8, rate=0.2, rewind_epoch=1))   # IMP with rewinding + random control

>>> from slimkit.models import create_model
>>> model = create_model("lenet300", input_shape=(1, 8, 8), num_classes=10)
>>> report = prune_(model, Unstructured(sparsity=0.9, scope="global"))
>>> report["pruned_layers_sparsity"]
0.9
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from .. import _console
from ..config import check
from ..data import DataBundle
from ..errors import ExportError, SlimkitError
from ..export import parity
from ..layers import FilterFn, LayerSelection
from ..measure import count_macs, count_params
from ..pipeline import (Context, Finetune, check_if_slower, judged_report, never_slower, register_space,
                        register_step)
from ..training import fit
from ._prune_masks import (
    AGPSchedule,
    MaskHook,
    apply_masks_,
    compute_masks_,
    finalize_,
    has_masks,
    masks_of,
    resolve_targets,
    sparsity_report,
)
from ._prune_lottery import LotteryConfig, LotteryResult, lottery, plot_lottery
from ._prune_sensitivity import SensitivityConfig, allocate, plot_sensitivity, sensitivity
from ._prune_structured import IMPORTANCES, prune_channels_
from ._prune_sparse import csr_bytes, load_csr, save_csr, sparse_onnx

__all__ = [
    "Unstructured",
    "Structured",
    "prune_",
    "MaskHook",
    "masks_of",
    "apply_masks_",
    "finalize_",
    "sparse_onnx",
    "save_csr",
    "load_csr",
    "csr_bytes",
    "StoreSparse",
    "sensitivity",
    "SensitivityConfig",
    "allocate",
    "plot_sensitivity",
    "lottery",
    "LotteryConfig",
    "LotteryResult",
    "plot_lottery",
]

SCOPES = ("layer", "global")
SCHEDULES = ("one-shot", "agp")


# ----------------------------------------------------------------------------- configs


@dataclass
class Unstructured:
    """Unstructured magnitude pruning: zero the smallest weights, keep them zero with masks.

    ``sparsity``: fraction of each pruned layer's weights set to zero (``scope="layer"``) or of
    all pruned layers' weights together under one magnitude threshold (``scope="global"``).
    ``layers``: a sparsity of its own per layer, by module name, glob or family (``conv``, ``fc``;
    see :class:`slimkit.layers.LayerSelection`); such a layer is pruned alone.
    ``skip``: layers never pruned (module names, glob patterns like ``"layer3.*"``, or blocks).
    ``schedule``: ``one-shot``, or ``agp`` (Zhu & Gupta's cubic schedule, growing the sparsity
    over the first ``ramp`` of the ``finetune`` steps). ``finetune``: fine-tune after pruning
    (by default distilling from the unpruned model); ``agp`` needs it.
    """

    sparsity: float = 0.5
    scope: str = "global"
    layers: dict[str, float] = field(default_factory=dict)
    skip: list[str] = field(default_factory=list)
    schedule: str = "one-shot"
    ramp: float = 0.75
    finetune: Finetune | None = None

    def __post_init__(self) -> None:
        check(isinstance(self.sparsity, (int, float)) and 0 <= self.sparsity < 1, "sparsity",
              f"must be in [0, 1) (the fraction of weights set to zero), got {self.sparsity}")
        check(self.scope in SCOPES, "scope", f"got '{self.scope}'; choose one of {', '.join(SCOPES)}")
        check(self.schedule in SCHEDULES, "schedule", f"got '{self.schedule}'; choose one of {', '.join(SCHEDULES)}")
        for name, s in self.layers.items():
            check(0 <= s < 1, "layers", f"the sparsity of '{name}' must be in [0, 1), got {s}")
        check(0 < self.ramp <= 1, "ramp", f"must be in (0, 1] (the share of fine-tuning the schedule spans), got {self.ramp}")
        check(self.schedule != "agp" or (self.finetune is not None and self.finetune.epochs >= 1), "finetune",
              "schedule 'agp' prunes gradually while fine-tuning: give finetune with epochs >= 1, "
              "e.g. finetune: {epochs: 5}")


@dataclass
class Structured:
    """Structured channel pruning: remove whole channels so the model is physically smaller.

    Uses Torch-Pruning's dependency graph, so channels tied by residual adds, concatenations,
    grouped and depthwise convolutions are removed together. ``ratio``: fraction of each
    layer's output channels removed (``scope="global"``: ranked across layers, the same total
    fraction). ``layers``: a ratio of its own per layer, by module name, glob or family. ``importance``: how
    channels are ranked (``l1``, ``l2`` weight norms, ``taylor`` first-order loss change on
    real training batches, ``bn-scale`` batch-norm scale). ``round_to``: each layer keeps the
    nearest multiple of this many channels (8 by default: ONNX Runtime's CPU kernels run odd
    channel counts much slower; 1: no rounding; ``scope="global"`` rounds down); for a grouped
    convolution, each group keeps a multiple of it. ``skip``:
    layers whose output channels are kept (the classifier always is). ``finetune``: fine-tune
    after pruning (distilling from the unpruned model by default). ``if_slower``: when the model after the step is slower on the target than before it
    (timed side by side), ``revert`` it (the default) or ``keep`` it anyway.
    """

    ratio: float = 0.3
    layers: dict[str, float] = field(default_factory=dict)
    importance: str = "l2"
    round_to: int = 8
    skip: list[str] = field(default_factory=list)
    scope: str = "layer"
    finetune: Finetune | None = None
    if_slower: str = "revert"

    def __post_init__(self) -> None:
        check(isinstance(self.ratio, (int, float)) and 0 <= self.ratio < 1, "ratio",
              f"must be in [0, 1) (the fraction of channels removed), got {self.ratio}")
        for name, r in self.layers.items():
            check(0 <= r < 1, "layers", f"the ratio of '{name}' must be in [0, 1), got {r}")
        check(self.importance in IMPORTANCES, "importance",
              f"unknown importance '{self.importance}'; choose one of {', '.join(IMPORTANCES)}")
        check(self.round_to >= 1, "round_to", f"must be >= 1 (1: no rounding), got {self.round_to}")
        check(self.scope in SCOPES, "scope", f"got '{self.scope}'; choose one of {', '.join(SCOPES)}")
        check_if_slower(self.if_slower)


@dataclass
class StoreSparse:
    """Store the exported ONNX artifact sparse: mostly-zero weights become ONNX sparse
    initializers (values + indices), which ONNX Runtime loads; reports dense and sparse bytes."""

    min_agreement: float = 0.99

    def __post_init__(self) -> None:
        check(0 <= self.min_agreement <= 1, "min_agreement", f"must be in [0, 1], got {self.min_agreement}")


# ----------------------------------------------------------------------------- the verb


def prune_(
    model: nn.Module,
    config: Unstructured | Structured,
    *,
    example: torch.Tensor | None = None,
    data: DataBundle | None = None,
    teacher: nn.Module | None = None,
    filter_fn: FilterFn | None = None,
    hooks: list[Any] | tuple[Any, ...] = (),
) -> dict[str, Any]:
    """Prune ``model`` in place as ``config`` says; return a report.

    ``example``: a real input batch (structured pruning traces the model with it; default:
    from ``data``). ``data``: needed to fine-tune (``config.finetune``), for Taylor importance
    and for gradual schedules. ``teacher``: the model distillation learns from (default: a copy
    of ``model`` taken before pruning). ``filter_fn(module, name) -> bool``: prune only the
    layers it accepts. ``hooks``: more training hooks for the fine-tune.

    >>> from slimkit.models import create_model
    >>> model = create_model("lenet300", input_shape=(1, 8, 8), num_classes=10)
    >>> r = prune_(model, Unstructured(sparsity=0.5, scope="layer", skip=["fc3"]))
    >>> r["layers"]["fc2"]["sparsity"], "fc3" in r["layers"]
    (0.5, False)
    """
    if not isinstance(model, nn.Module):
        raise SlimkitError(f"prune_ needs a torch.nn.Module, got {type(model).__name__}.")
    ft = getattr(config, "finetune", None)
    needs_data = ft is not None and ft.epochs > 0
    if needs_data and data is None:
        raise SlimkitError(f"{type(config).__name__} fine-tunes after pruning (finetune.epochs={ft.epochs}): "
                           "pass data= (a DataBundle), or set finetune to None.")
    if needs_data and ft.distill and teacher is None:
        teacher = copy.deepcopy(model).eval()
    if isinstance(config, Unstructured):
        return _unstructured(model, config, data, teacher, filter_fn, hooks)
    if isinstance(config, Structured):
        return _structured(model, config, example, data, teacher, filter_fn, hooks)
    raise SlimkitError(f"prune_ takes Unstructured(...) or Structured(...), got {type(config).__name__}.")


def _finetune(model: nn.Module, data: DataBundle | None, ft: Finetune, teacher: nn.Module | None,
              hooks: list[Any], label: str) -> dict[str, Any]:
    assert data is not None  # prune_ asks for data when the config fine-tunes
    teacher = teacher if ft.distill else None
    report = fit(model, data, ft, teacher=teacher, hooks=hooks, label=label)
    report.pop("history", None)
    return {"distilled": teacher is not None, **report}


def _unstructured(model: nn.Module, cfg: Unstructured, data: DataBundle | None, teacher: nn.Module | None,
                  filter_fn: FilterFn | None, hooks: Any) -> dict[str, Any]:
    targets, skipped, alone = resolve_targets(model, cfg.sparsity, cfg.layers, cfg.skip, filter_fn)
    if not targets:
        raise SlimkitError("no layer is left to prune: every prunable layer was skipped.")
    before = sparsity_report(model, list(targets))
    schedule = None
    if cfg.schedule == "agp":
        schedule = AGPSchedule(targets, cfg.scope, alone, ramp=cfg.ramp)
        compute_masks_(model, {n: 0.0 for n in targets}, cfg.scope, alone)  # masks exist from step 0
    else:
        compute_masks_(model, targets, cfg.scope, alone)
    report: dict[str, Any] = {"method": "unstructured", "scope": cfg.scope, "schedule": cfg.schedule,
                              "target_sparsity": cfg.sparsity}
    if cfg.finetune is not None and cfg.finetune.epochs > 0:
        report["finetune"] = _finetune(model, data, cfg.finetune, teacher, [MaskHook(schedule), *hooks],
                                       label="prune+finetune")
    report.update(sparsity_report(model, list(targets)))
    report["nonzero_before"] = before["nonzero_params"]
    report["skipped"] = skipped
    return report


def _structured(model: nn.Module, cfg: Structured, example: torch.Tensor | None, data: DataBundle | None,
                teacher: nn.Module | None, filter_fn: FilterFn | None, hooks: Any) -> dict[str, Any]:
    if has_masks(model):
        raise SlimkitError("this model holds unstructured pruning masks; prune structurally first, or finalize_ "
                           "the masks before removing channels.")
    if example is None:
        if data is None:
            raise SlimkitError("structured pruning traces the model: pass example= (a real input batch) or data=.")
        example = data.example(2, split="train")
    if example.shape[0] < 2:
        example = example.repeat((2,) + (1,) * (example.dim() - 1))
    shape = tuple(example.shape[1:])
    before = {**count_params(model), "macs": count_macs(model, shape)}
    with _console.status(f"structured pruning ({cfg.importance}, ratio {cfg.ratio})"):
        selection = LayerSelection({"_default": cfg.ratio, **cfg.layers}, skip=cfg.skip, filter_fn=filter_fn)
        result = prune_channels_(model, selection, importance=cfg.importance, round_to=cfg.round_to,
                                 scope=cfg.scope, example=example, data=data)
    after = {**count_params(model), "macs": count_macs(model, shape)}
    report: dict[str, Any] = {
        "method": "structured", "importance": cfg.importance, "ratio": cfg.ratio, "scope": cfg.scope,
        "params_before": before["params"], "params": after["params"],
        "macs_before": before["macs"], "macs": after["macs"],
        "macs_reduction": round(before["macs"] / max(after["macs"], 1), 3),
        **result,
    }
    if cfg.finetune is not None and cfg.finetune.epochs > 0:
        report["finetune"] = _finetune(model, data, cfg.finetune, teacher, list(hooks), label="prune+finetune")
    return report


# ----------------------------------------------------------------------------- recipe steps


@register_step("prune_unstructured", Unstructured, forbids={"exported", "quantized"}, sets={"masked"})
def _unstructured_step(ctx: Context, cfg: Unstructured) -> dict[str, Any]:
    """Unstructured magnitude pruning; the masks hold through every later fine-tune."""
    report = prune_(ctx.model, cfg, data=ctx.data, teacher=ctx.teacher, hooks=ctx.train_hooks())
    if not any(isinstance(h, MaskHook) and h.schedule is None for h in ctx.hooks):
        ctx.hooks.append(MaskHook())
    from safetensors.torch import save

    state = {k: v.detach().contiguous().clone() for k, v in ctx.model.state_dict().items()}
    report["dense_safetensors_bytes"] = len(save(state))
    report["csr_safetensors_bytes"] = csr_bytes(ctx.model)
    return report


@register_space("prune_unstructured", order=40)
def _unstructured_space(trial: Any) -> Unstructured | None:
    if not trial.suggest_categorical("prune_unstructured.on", [False, True]):
        return None
    return Unstructured(
        sparsity=trial.suggest_float("prune_unstructured.sparsity", 0.3, 0.95),
        scope=trial.suggest_categorical("prune_unstructured.scope", ["global", "layer"]),
    )


@register_step("prune_structured", Structured, forbids={"exported", "quantized", "masked"}, reports_speed=True)
def _structured_step(ctx: Context, cfg: Structured) -> dict[str, Any]:
    """Structured channel pruning (Torch-Pruning): fewer channels, fewer MACs, and, measured on the
    target, a faster artifact (else reverted: ``if_slower``)."""
    before = copy.deepcopy(ctx.model)
    report = prune_(ctx.model, cfg, example=ctx.data.example(2, split="train"), data=ctx.data, teacher=ctx.teacher,
                    hooks=ctx.train_hooks())
    if not report.get("pruned_layers"):
        skipped = report.get("skipped") or {}
        why = "; ".join(f"{name}: {reason}" for name, reason in list(skipped.items())[:5]) or "no layer with channels"
        ctx.not_met.append(f"prune_structured removed no channel: nothing in this model could be pruned ({why}).")
        return report
    return judged_report(ctx, report, never_slower(ctx, "prune_structured", before, cfg.if_slower))


@register_space("prune_structured", order=30)
def _structured_space(trial: Any) -> Structured | None:
    if not trial.suggest_categorical("prune_structured.on", [False, True]):
        return None
    return Structured(
        ratio=trial.suggest_float("prune_structured.ratio", 0.1, 0.6),
        importance=trial.suggest_categorical("prune_structured.importance", ["l1", "l2", "taylor"]),
    )


@register_step("store_sparse", StoreSparse, requires={"exported"}, forbids={"quantized"}, clears={"masked"})
def _store_sparse_step(ctx: Context, cfg: StoreSparse) -> dict[str, Any]:
    """Rewrite the current ONNX artifact with sparse initializers and check it still agrees."""
    src = ctx.onnx_path
    assert src is not None  # the step requires an exported model
    dst = ctx.new_path("model-sparse")
    report = sparse_onnx(src, dst)
    x = ctx.data.x_test[:512]
    # sparse storage is lossless: the rewritten file must compute what the dense one did (an integer
    # QAT artifact differs from torch's fake quantization by itself; the export step judged that)
    same = parity(src, dst, x, threads=ctx.threads)
    if same["top1_agreement"] < cfg.min_agreement:
        raise ExportError(f"the sparse ONNX artifact disagrees with the dense one it was rewritten from on "
                          f"{1 - same['top1_agreement']:.1%} of {same['samples']} test examples.")
    result = parity(ctx.model, dst, x, threads=ctx.threads)
    ctx.onnx_path = dst
    ctx.parity = result
    report["csr_safetensors_bytes"] = csr_bytes(ctx.model)
    return {**report, "parity": result, "dense_agreement": same}


@register_space("store_sparse", order=85)
def _store_sparse_space(trial: Any) -> StoreSparse | None:
    return StoreSparse() if trial.suggest_categorical("store_sparse.on", [False, True]) else None
