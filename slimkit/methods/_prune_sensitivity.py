"""Sensitivity analysis: prune each layer alone at each ratio and measure validation accuracy.

The result's table says how much each layer can lose; :func:`allocate` turns it into
per-layer ratios that reach a global target while sparing the sensitive layers (the layers
whose accuracy falls first get the smallest ratios).
"""

from __future__ import annotations

import copy
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import yaml
from torch import nn

from .. import _console, _io
from ..config import check
from ..data import DataBundle, resolve_data
from ..errors import ConfigError, SlimkitError
from ..layers import LayerSelection, match_names
from ..models import ModelRef, resolve_model
from ..training import evaluate
from ._prune_masks import _keep_mask, prunable_layers
from ._prune_structured import IMPORTANCES, channel_groups, classifier_of, prune_channels_

METHODS = ("unstructured", "structured")
DEFAULT_RATIOS = (0.1, 0.3, 0.5, 0.7, 0.9)


def check_ratios(ratios: Sequence[float]) -> tuple[float, ...]:
    ratios = tuple(sorted(float(r) for r in ratios))
    if not ratios or any(not 0 <= r < 1 for r in ratios):
        raise ConfigError(f"ratios must be one or more numbers in [0, 1), got {list(ratios)}", field="ratios")
    return ratios


@dataclass(frozen=True)
class SensitivityConfig:
    """What :func:`sensitivity` measures.

    ``method``: ``unstructured`` (magnitude, the layer's weights) or ``structured`` (the
    layer's output channels with everything coupled to them; ``importance`` ranks them).
    ``ratios``: the pruning ratios tried per layer, each in [0, 1). ``target``: a global ratio
    (fraction of the analysed weights removed) to allocate per layer (``None``: no
    allocation). ``layers``: names or glob patterns to analyse (``None``: all).

    >>> SensitivityConfig("structured", [0.5, 0.2], importance="l1").ratios
    (0.2, 0.5)
    """

    method: str = "unstructured"
    ratios: Sequence[float] = DEFAULT_RATIOS
    importance: str = "l2"
    target: float | None = None
    layers: Sequence[str] | None = None

    def __post_init__(self) -> None:
        check(self.method in METHODS, "method", f"unknown method '{self.method}'; choose one of {', '.join(METHODS)}")
        check(self.importance in IMPORTANCES, "importance",
              f"unknown importance '{self.importance}'; choose one of {', '.join(IMPORTANCES)}")
        object.__setattr__(self, "ratios", check_ratios(self.ratios))
        check(self.target is None or 0 < self.target < 1, "target", f"target must be in (0, 1), got {self.target}")
        if self.layers is not None:
            object.__setattr__(self, "layers", tuple(self.layers))


def sensitivity(
    model: nn.Module | str | ModelRef,
    data: DataBundle | str = "digits",
    config: SensitivityConfig | None = None,
    *,
    out: str | Path | None = None,
    overwrite: bool = False,
    seed: int = 0,
) -> dict[str, Any]:
    """Prune each layer alone at each ratio (no fine-tune) and measure validation accuracy.

    ``config`` (:class:`SensitivityConfig`): the method, the ratios, the importance, the layers
    and the global ``target``; with a target, the result's ``allocation`` holds per-layer ratios
    reaching it while sparing sensitive layers, and ``recipe`` the step that applies them. With
    ``out``, writes ``sensitivity.json`` and ``sensitivity.png`` there (and ``recipe.yaml``
    with that step, for ``slimkit apply``). ``seed``: the train/val/test split.

    >>> r = sensitivity("zoo:lenet300", "digits", SensitivityConfig("unstructured", [0.5, 0.9], target=0.7))  # doctest: +SKIP
    >>> r["layers"]["fc1"]["accuracy"], r["allocation"]["ratios"]  # doctest: +SKIP
    """
    cfg = config or SensitivityConfig()
    method, ratios, importance, target, layers = cfg.method, tuple(cfg.ratios), cfg.importance, cfg.target, cfg.layers
    weights = model.weights if isinstance(model, ModelRef) else None
    bundle = resolve_data(data, seed)
    net = resolve_model(copy.deepcopy(model) if isinstance(model, nn.Module) else model, bundle).eval()
    out_dir = _io.prepare_out_dir(out, overwrite=overwrite, inputs=[weights]) if out is not None else None
    base = evaluate(net, bundle.x_val, bundle.y_val)
    example = bundle.example(2, split="train")
    t0 = time.perf_counter()
    if method == "unstructured":
        cand = prunable_layers(net)
        chosen = match_names(layers, cand, field="layers", what="prunable layers") if layers else set(cand)
        rows = {}
        for n in _progress(cand, chosen, "unstructured"):
            curve = _unstructured_curve(net, n, ratios, bundle)
            rows[n] = {"params": cand[n].weight.numel(), "accuracy": curve}
            _report_row(n, curve)
    else:
        head = classifier_of(net, example)
        groups = channel_groups(net, example, {head} if head else set())
        what = "channel groups (by root layer)"
        chosen = match_names(layers, groups, field="layers", what=what) if layers else set(groups)
        rows = {}
        for n in _progress(groups, chosen, "structured"):
            curve = _structured_curve(net, n, ratios, bundle, importance, example)
            rows[n] = {"params": groups[n]["params"], "coupled": groups[n]["coupled"], "accuracy": curve}
            _report_row(n, curve)
    report: dict[str, Any] = {
        "method": method, "importance": importance if method == "structured" else None, "ratios": list(ratios),
        "split": "val", "baseline_accuracy": base, "layers": rows,
        "seconds": round(time.perf_counter() - t0, 2),
    }
    if target is not None:
        report["allocation"] = allocate(report, target)
        report["recipe"] = _recipe(method, importance, report["allocation"]["ratios"])
    if out_dir is not None:
        plot = plot_sensitivity(report, out_dir / "sensitivity.png")
        report["files"] = {"report": str(out_dir / "sensitivity.json"), "plot": str(plot)}
        if "recipe" in report:
            _io.write_text(out_dir / "recipe.yaml", yaml.safe_dump({"steps": [report["recipe"]]}, sort_keys=False))
            report["files"]["recipe"] = str(out_dir / "recipe.yaml")
        _io.write_json(out_dir / "sensitivity.json", report)
    return report


def _report_row(name: str, accuracy: list[float]) -> None:
    _console.info(f"  {name}: " + " ".join(f"{a:.4f}" for a in accuracy))


def _progress(names: Any, chosen: set[str], what: str) -> list[str]:
    ordered = [n for n in names if n in chosen]
    _console.info(f"{what} sensitivity of {len(ordered)} layer(s)")
    return ordered


@torch.no_grad()
def _unstructured_curve(model: nn.Module, name: str, ratios: Sequence[float], data: DataBundle) -> list[float]:
    w = model.get_submodule(name).weight
    saved = w.detach().clone()
    accs = []
    try:
        for r in ratios:
            keep = _keep_mask(saved.abs().flatten(), r).view_as(saved)
            w.copy_(saved * keep)
            accs.append(evaluate(model, data.x_val, data.y_val))
    finally:
        w.copy_(saved)
    return accs


def _structured_curve(model: nn.Module, name: str, ratios: Sequence[float], data: DataBundle, importance: str,
                      example: torch.Tensor) -> list[float]:
    accs = []
    for r in ratios:
        trial = copy.deepcopy(model)
        prune_channels_(trial, LayerSelection({"_default": 0.0, name: r}), importance=importance, round_to=1,
                        scope="layer", example=example, data=data)
        accs.append(evaluate(trial, data.x_val, data.y_val))
    return accs


def allocate(report: dict[str, Any], target: float) -> dict[str, Any]:
    """Per-layer ratios whose parameter-weighted mean reaches ``target``, sparing sensitive layers.

    Greedy on the measured curves: starting from nothing pruned, repeatedly move the layer
    whose next measured ratio costs the least accuracy (larger layers first on ties) to that
    ratio, until the weighted mean reaches the target; the last move is interpolated so the
    target is met, not overshot. ``tolerance`` is the largest single-layer drop accepted.
    """
    ratios = report["ratios"]
    base = report["baseline_accuracy"]
    layers = report["layers"]
    total = sum(v["params"] for v in layers.values()) or 1
    cost: dict[str, list[float]] = {}
    for n, v in layers.items():  # the drop at each ratio, made monotone (noise cannot make pruning free)
        worst, c = 0.0, []
        for a in v["accuracy"]:
            worst = max(worst, base - a)
            c.append(worst)
        cost[n] = c
    chosen = {n: 0.0 for n in layers}
    step = {n: 0 for n in layers}
    achieved, tol = 0.0, 0.0
    while achieved < target - 1e-9:
        moves = [(cost[n][step[n]], -layers[n]["params"], n) for n in layers
                 if step[n] < len(ratios) and layers[n]["params"]]
        if not moves:
            best = sum(max(ratios) * v["params"] for v in layers.values()) / total
            raise SlimkitError(
                f"a global ratio of {target} cannot be reached with the measured ratios (at most {max(ratios)} per "
                f"layer gives {best:.3f}); measure larger ratios or lower the target.")
        drop, _, n = min(moves)
        new = ratios[step[n]]
        gain = (new - chosen[n]) * layers[n]["params"] / total
        if achieved + gain > target:  # interpolate the last move to land on the target
            new = chosen[n] + (target - achieved) * total / layers[n]["params"]
            gain = target - achieved
        chosen[n] = round(new, 4)
        achieved += gain
        tol = max(tol, drop)
        step[n] += 1
    return {"target": target, "achieved": round(achieved, 6), "tolerance": round(tol, 6), "ratios": chosen}


def _recipe(method: str, importance: str, ratios: dict[str, float]) -> dict[str, Any]:
    if method == "unstructured":
        return {"prune_unstructured": {"sparsity": 0.0, "scope": "layer", "layers": ratios}}
    return {"prune_structured": {"ratio": 0.0, "importance": importance, "layers": ratios}}


def plot_sensitivity(report: dict[str, Any], path: str | Path) -> Path:
    """A PNG with one validation-accuracy curve per layer against its pruning ratio."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5), dpi=110)
    for name, row in report["layers"].items():
        ax.plot(report["ratios"], row["accuracy"], marker="o", markersize=3, label=name)
    ax.axhline(report["baseline_accuracy"], color="black", linestyle="--", linewidth=1, label="unpruned")
    what = "sparsity (fraction of weights zeroed)" if report["method"] == "unstructured" else \
        "fraction of output channels removed"
    ax.set_xlabel(what)
    ax.set_ylabel("validation accuracy (no fine-tune)")
    ax.set_title(f"{report['method']} pruning sensitivity, one layer at a time")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=6, ncol=2 if len(report["layers"]) > 12 else 1, loc="center left", bbox_to_anchor=(1.01, 0.5))
    fig.tight_layout()

    def write(tmp: Path) -> None:
        fig.savefig(tmp, format="png")

    try:
        return _io.atomic_write(path, write)
    finally:
        plt.close(fig)
