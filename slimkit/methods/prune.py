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
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from torch import nn

from .. import _console
from ..config import check
from ..data import DataBundle
from ..errors import ConfigError, ExportError, SlimkitError
from ..export import export_layer_onnx, fold_batchnorm, parity
from ..layers import FilterFn, LayerSelection
from ..measure import Target, count_macs, count_params, medians, side_by_side
from ..measure.backends import get_backend
from ..models import model_fingerprint
from ..pipeline import (SLOWER_MARGIN, Context, Finetune, check_if_slower, judged_report, never_slower,
                        register_space, register_step, side_by_side_rounds)
from ..training import evaluate, fit
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
from ._prune_structured import IMPORTANCES, allocate_latency_, prune_channels_
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
DEFAULT_RATIO = 0.3
#: A latency-targeted allocation scores its candidates on at most this many validation examples.
SCORING_EXAMPLES = 1024
#: ... and profiles each layer over this many runs of the target batch.
PROFILE_REPEATS = 20
#: The search's latency targets fine-tune each iteration's cut this many batches (NetAdapt's
#: short-term fine-tune): without it a resnet on digits fell to 0.10 test accuracy at 1.6x, with
#: 20 batches it kept 0.978 (from 0.983).
SEARCH_RECOVER_BATCHES = 10


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
    fraction; 0.3 when neither it nor a target is given). ``layers``: a ratio of its own per layer, by module name, glob or family. ``importance``: how
    channels are ranked (``l1``, ``l2`` weight norms, ``taylor`` first-order loss change on
    real training batches, ``bn-scale`` batch-norm scale). ``round_to``: each layer keeps the
    nearest multiple of this many channels (8 by default: ONNX Runtime's CPU kernels run odd
    channel counts much slower; 1: no rounding; ``scope="global"`` rounds down); for a grouped
    convolution, each group keeps a multiple of it. ``skip``:
    layers whose output channels are kept (the classifier always is). ``finetune``: fine-tune
    after pruning (distilling from the unpruned model by default). ``if_slower``: when the model after the step is slower on the target than before it
    (timed side by side), ``revert`` it (the default) or ``keep`` it anyway.

    Latency-targeted (instead of ``ratio`` / ``layers``): ``target_speedup`` (> 1: how many times
    faster than the input) or ``target_latency_ms`` (ms per batch), at ``target_batch`` (one of
    the target's batch sizes; default: the largest). The per-layer ratios are allocated
    NetAdapt-style: each iteration removes ``latency_step`` of the input's measured layer time
    from the channel group where validation accuracy (pruned, not fine-tuned) suffers least, by
    the per-layer times profiled on the target, until the model timed side by side with the input
    reaches the target or nothing more can be pruned. ``recover_batches``: training batches of
    fine-tuning (distilled from the input) after each iteration, NetAdapt's short-term fine-tune
    (0: none; ``finetune`` still runs once at the end). The report holds ``target``, ``reached``,
    the ``ratios`` chosen and the ``iterations``.

    >>> Structured(target_speedup=2.5).ratio is None
    True
    """

    ratio: float | None = None
    layers: dict[str, float] = field(default_factory=dict)
    importance: str = "l2"
    round_to: int = 8
    skip: list[str] = field(default_factory=list)
    scope: str = "layer"
    finetune: Finetune | None = None
    if_slower: str = "revert"
    target_speedup: float | None = None
    target_latency_ms: float | None = None
    target_batch: int | None = None
    latency_step: float = 0.1
    recover_batches: int = 0

    def __post_init__(self) -> None:
        check(self.ratio is None or isinstance(self.ratio, (int, float)) and 0 <= self.ratio < 1, "ratio",
              f"must be in [0, 1) (the fraction of channels removed), got {self.ratio}")
        for name, r in self.layers.items():
            check(0 <= r < 1, "layers", f"the ratio of '{name}' must be in [0, 1), got {r}")
        check(self.importance in IMPORTANCES, "importance",
              f"unknown importance '{self.importance}'; choose one of {', '.join(IMPORTANCES)}")
        check(self.round_to >= 1, "round_to", f"must be >= 1 (1: no rounding), got {self.round_to}")
        check(self.scope in SCOPES, "scope", f"got '{self.scope}'; choose one of {', '.join(SCOPES)}")
        check_if_slower(self.if_slower)
        check(self.target_speedup is None or self.target_speedup > 1, "target_speedup",
              f"must be > 1 (how many times faster than the input the pruned model must run), got {self.target_speedup}")
        check(self.target_latency_ms is None or self.target_latency_ms > 0, "target_latency_ms",
              f"must be > 0 (milliseconds per batch on the target), got {self.target_latency_ms}")
        check(self.target_speedup is None or self.target_latency_ms is None, "target_latency_ms",
              "give target_speedup or target_latency_ms, not both")
        check(0 < self.latency_step <= 1, "latency_step",
              f"must be in (0, 1] (the share of the input's latency one iteration removes), got {self.latency_step}")
        check(self.recover_batches >= 0, "recover_batches",
              f"must be >= 0 (training batches of fine-tuning after each iteration; 0: none), got {self.recover_batches}")
        if self.targeted:
            check(self.ratio is None, "ratio", "give either ratio (one ratio for every layer) or target_speedup / "
                  "target_latency_ms (ratios allocated per layer from the measured times), not both")
            check(not self.layers, "layers", "per-layer ratios are allocated from the measured times when a target is "
                  "given; keep a layer whole with skip instead")
            check(self.scope == "layer", "scope", "a latency target allocates ratios per layer: scope must be 'layer'")
            check(self.target_batch is None or self.target_batch >= 1, "target_batch",
                  f"must be >= 1 (the batch size the target is measured at), got {self.target_batch}")
        else:
            check(self.target_batch is None, "target_batch",
                  "is the batch size a target is measured at: give target_speedup or target_latency_ms with it")

    @property
    def targeted(self) -> bool:
        """Whether the ratios come from a latency target rather than ``ratio`` / ``layers``."""
        return self.target_speedup is not None or self.target_latency_ms is not None


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
    target: Target | None = None,
) -> dict[str, Any]:
    """Prune ``model`` in place as ``config`` says; return a report.

    ``example``: a real input batch (structured pruning traces the model with it; default:
    from ``data``). ``data``: needed to fine-tune (``config.finetune``), for Taylor importance,
    for gradual schedules and for a latency target. ``teacher``: the model distillation learns from (default: a copy
    of ``model`` taken before pruning). ``filter_fn(module, name) -> bool``: prune only the
    layers it accepts. ``hooks``: more training hooks for the fine-tune. ``target``: where a
    latency target (``Structured(target_speedup=...)``) is measured (default: ``Target()``).

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
    if isinstance(config, Structured) and config.targeted:
        if data is None:
            raise SlimkitError("a latency target is met on real examples and scored on validation accuracy: pass data=.")
        t = target or Target()
        with tempfile.TemporaryDirectory(prefix="slimkit-prune-") as tmp:
            ctx = Context(model=model, data=data, workdir=Path(tmp), target=t.runtime, threads=t.resolved_threads,
                          batch_sizes=t.batch_sizes, max_seconds=t.max_seconds)
            return _latency_targeted(ctx, config, filter_fn, teacher, hooks, measure_last=True)
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
    ratio = DEFAULT_RATIO if cfg.ratio is None else cfg.ratio
    with _console.status(f"structured pruning ({cfg.importance}, ratio {ratio})"):
        selection = LayerSelection({"_default": ratio, **cfg.layers}, skip=cfg.skip, filter_fn=filter_fn)
        result = prune_channels_(model, selection, importance=cfg.importance, round_to=cfg.round_to,
                                 scope=cfg.scope, example=example, data=data)
    after = {**count_params(model), "macs": count_macs(model, shape)}
    report: dict[str, Any] = {
        "method": "structured", "importance": cfg.importance, "ratio": ratio, "scope": cfg.scope,
        "params_before": before["params"], "params": after["params"],
        "macs_before": before["macs"], "macs": after["macs"],
        "macs_reduction": round(before["macs"] / max(after["macs"], 1), 3),
        **result,
    }
    if cfg.finetune is not None and cfg.finetune.epochs > 0:
        report["finetune"] = _finetune(model, data, cfg.finetune, teacher, list(hooks), label="prune+finetune")
    return report


def _latency_targeted(ctx: Context, cfg: Structured, filter_fn: FilterFn | None, teacher: nn.Module | None,
                      hooks: Any, *, measure_last: bool) -> dict[str, Any]:
    """Prune ``ctx.model`` in place to ``cfg``'s latency target on ``ctx.target`` (see
    :func:`slimkit.methods._prune_structured.allocate_latency_`), then fine-tune it. With
    ``measure_last`` the report's ``reached`` is the allocation's last side-by-side timing (the
    recipe step times the exported artifact after, and reports that)."""
    if has_masks(ctx.model):
        raise SlimkitError("this model holds unstructured pruning masks; prune structurally first, or finalize_ "
                           "the masks before removing channels.")
    batch = cfg.target_batch or max(ctx.batch_sizes)
    if batch not in ctx.batch_sizes:
        raise ConfigError(f"{batch} is not one of the batch sizes the target times "
                          f"({', '.join(map(str, ctx.batch_sizes))}); add it there or leave target_batch out",
                          field="target_batch")
    b = str(batch)
    data, model = ctx.data, ctx.model
    reference = copy.deepcopy(model).eval()
    x_val, y_val = (data.x_val, data.y_val) if len(data.x_val) else (data.x_train, data.y_train)
    x_val, y_val = x_val[:SCORING_EXAMPLES], y_val[:SCORING_EXAMPLES]

    runnable = _Runnable(ctx)

    def measure(m: nn.Module, first: bool) -> tuple[float, float]:
        models = {"input": runnable(m)} if first else {"input": runnable(reference), "pruned": runnable(m)}
        ms = medians(side_by_side(models, data, (batch,), runtime=ctx.target, threads=ctx.threads,
                                  rounds=side_by_side_rounds(ctx.max_seconds), max_seconds=ctx.max_seconds,
                                  label=f"timing the {'input' if first else 'pruned model'} at batch {batch}"))
        return (ms["input"][b], 1.0) if first else (ms["pruned"][b], ms["input"][b] / max(ms["pruned"][b], 1e-12))

    if cfg.target_speedup is not None:
        goal: dict[str, Any] = {"speedup": cfg.target_speedup, "batch": b}
        speedup = float(cfg.target_speedup)

        def reached(ms: float, s: float) -> bool:
            return s >= speedup

        def remaining(ms: float, s: float) -> float:  # from the speed-up: the input's drift cancels out
            return max(0.0, 1 - s / speedup)
    else:
        goal = {"latency_ms": cfg.target_latency_ms, "batch": b}
        limit = float(cfg.target_latency_ms or 0.0)

        def reached(ms: float, s: float) -> bool:
            return ms <= limit

        def remaining(ms: float, s: float) -> float:
            return max(0.0, 1 - limit / ms)

    example = data.example(2, split="train")
    shape = tuple(example.shape[1:])
    before = {**count_params(model), "macs": count_macs(model, shape)}
    _console.info(f"  latency-targeted pruning: {_goal_text(goal)} on {ctx.target}")
    result = allocate_latency_(
        model, LayerSelection({"_default": 0.0}, skip=cfg.skip, filter_fn=filter_fn), importance=cfg.importance,
        round_to=cfg.round_to, example=example, data=data, reached=reached, remaining=remaining, step=cfg.latency_step,
        layer_times=lambda m: _layer_times(ctx, runnable(m), batch), measure=measure,
        accuracy=lambda m: evaluate(m, x_val, y_val), recover=_recover(cfg, data, teacher or reference))
    after = {**count_params(model), "macs": count_macs(model, shape)}
    report: dict[str, Any] = {
        "method": "structured", "importance": cfg.importance, "scope": "layer", "target": goal,
        "params_before": before["params"], "params": after["params"],
        "macs_before": before["macs"], "macs": after["macs"],
        "macs_reduction": round(before["macs"] / max(after["macs"], 1), 3),
        **result,
    }
    last = result["iterations"][-1]  # every iteration is timed
    if measure_last or result["stopped"] == "the input already meets the target":
        report["reached"] = {"batch": b, "speedup": last["speedup"], "latency_ms": last["measured_ms"],
                             "met": reached(last["measured_ms"], last["speedup"])}
    if cfg.finetune is not None and cfg.finetune.epochs > 0:
        report["finetune"] = _finetune(model, data, cfg.finetune, teacher, list(hooks), label="prune+finetune")
    return report


def _recover(cfg: Structured, data: DataBundle, teacher: nn.Module) -> Callable[[nn.Module], None] | None:
    """NetAdapt's short-term fine-tune of each iteration's cut: ``cfg.recover_batches`` training
    batches, distilled from ``teacher`` (None: no fine-tune between iterations)."""
    if not cfg.recover_batches:
        return None
    ft = Finetune(epochs=1, max_batches=cfg.recover_batches, batch_size=64)

    def recover(model: nn.Module) -> None:
        with _console.muted():
            fit(model, data, ft, teacher=teacher, label="recover")

    return recover


class _Runnable:
    """What the allocation times and profiles a model as on ``ctx.target``: on ``ort-cpu`` an ONNX
    file exported with TorchScript's exporter (:func:`slimkit.export.export_layer_onnx`: tens of
    milliseconds against a second or more through torch.export; the step's verdict and ``reached``
    are timed on the real artifact after), on ``torch-cpu`` the module with its batch norms folded.
    A model with the same weights and structure is exported once."""

    def __init__(self, ctx: Context):
        self.ctx = ctx
        self.example = ctx.data.example(2)
        self.done: dict[str, Path | nn.Module] = {}

    def __call__(self, model: nn.Module) -> Path | nn.Module:
        key = model_fingerprint(model)
        if key not in self.done:
            folded = fold_batchnorm(model, self.example)
            self.done[key] = (export_layer_onnx(folded, self.ctx.new_path("netadapt"), self.example)
                              if get_backend(self.ctx.target).needs_onnx else folded)
        return self.done[key]


def _layer_times(ctx: Context, runnable: Path | nn.Module, batch: int) -> dict[str, float]:
    """Seconds per layer on ``ctx.target`` at ``batch``: the profiler's figures (the backend's
    ``layer_times``) of an ONNX file or a module from :class:`_Runnable`."""
    backend = get_backend(ctx.target)
    runner = (backend.prepare(runnable, None, ctx.threads) if isinstance(runnable, nn.Module)
              else backend.prepare(None, runnable, ctx.threads))
    try:
        return runner.layer_times(np.ascontiguousarray(ctx.data.example(batch).numpy()), PROFILE_REPEATS)
    finally:
        runner.close()


def _goal_text(goal: dict[str, Any]) -> str:
    what = f"{goal['speedup']:g}x faster" if "speedup" in goal else f"{goal['latency_ms']:g} ms"
    return f"{what} at batch {goal['batch']}"


def _reached(cfg: Structured, speed: dict[str, Any], batch: str) -> dict[str, Any]:
    """What the side-by-side timing of the step found at the target's batch size; ``met`` within
    ``SLOWER_MARGIN`` of the target (the rounds' ``spread`` is reported beside it)."""
    s, ms = speed["speedup"][batch], speed["latency_ms"]["after"][batch]
    met = s >= cfg.target_speedup * (1 - SLOWER_MARGIN) if cfg.target_speedup is not None \
        else ms <= (cfg.target_latency_ms or 0.0) * (1 + SLOWER_MARGIN)
    return {"batch": batch, "speedup": s, "latency_ms": round(ms, 4), "spread": speed["spread"][batch], "met": met}


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
    if cfg.targeted:
        teacher = ctx.teacher if ctx.teacher is not None else before
        report = _latency_targeted(ctx, cfg, None, teacher, ctx.train_hooks(), measure_last=False)
    else:
        report = prune_(ctx.model, cfg, example=ctx.data.example(2, split="train"), data=ctx.data,
                        teacher=ctx.teacher, hooks=ctx.train_hooks())
    if not report.get("pruned_layers"):
        if report.get("stopped") == "the input already meets the target":
            return report
        skipped = report.get("skipped") or {}
        why = "; ".join(f"{name}: {reason}" for name, reason in list(skipped.items())[:5]) or "no layer with channels"
        ctx.not_met.append(f"prune_structured removed no channel: nothing in this model could be pruned ({why}).")
        return report
    speed = never_slower(ctx, "prune_structured", before, cfg.if_slower)
    if cfg.targeted:
        report["reached"] = reached = _reached(cfg, speed, report["target"]["batch"])
        _console.info(f"  prune_structured: asked {_goal_text(report['target'])}, reached {reached['speedup']:.2f}x "
                      f"({reached['latency_ms']:.3f} ms)")
        if not reached["met"]:
            ctx.not_met.append(f"prune_structured did not reach its target ({_goal_text(report['target'])}): "
                               f"{reached['speedup']:.2f}x, {reached['latency_ms']:.3f} ms ({report['stopped']}).")
    return judged_report(ctx, report, speed)


@register_space("prune_structured", order=30)
def _structured_space(trial: Any) -> Structured | None:
    if not trial.suggest_categorical("prune_structured.on", [False, True]):
        return None
    importance = trial.suggest_categorical("prune_structured.importance", ["l1", "l2", "taylor"])
    try:  # a blind ratio, or a latency target whose ratios are allocated per layer from measured times
        mode = trial.suggest_categorical("prune_structured.mode", ["ratio", "target"])
    except ValueError:  # optuna's FixedTrial replaying a trial drawn before there was a mode: a ratio
        mode = "ratio"
    if mode == "target":
        return Structured(target_speedup=trial.suggest_float("prune_structured.target_speedup", 1.2, 3.0),
                          importance=importance, recover_batches=SEARCH_RECOVER_BATCHES)
    return Structured(ratio=trial.suggest_float("prune_structured.ratio", 0.1, 0.6), importance=importance)


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
