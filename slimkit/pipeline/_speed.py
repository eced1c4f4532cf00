"""Never slower: a model-changing step is judged by its artifact on the target, timed side by side.

Fewer parameters and MACs do not make a model faster on a CPU runtime: a Tucker-2 decomposition
made ResNet-18 0.16x on ONNX Runtime, and structured pruning of a RegNet ran at 0.40x. So every
step that changes the model's structure (``decompose``, ``separable``, ``prune_structured``)
times the model before and after it on ``ctx.target`` with the one side-by-side timer (ONNX
exports on ``ort-cpu``, the modules with batch norms folded on ``torch-cpu``). When the new
model is slower at some batch size beyond the timing's noise, the step's ``if_slower`` decides:
``revert`` (the default) gives back the layers that are slower on their own where the step can
(``revert_layers``), else the model from before the step; ``keep`` keeps it and says so. Either
way the step's report holds the figures (``speed``) and ``ctx.verdicts`` the verdict.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Mapping
from typing import Any, cast

import torch
from torch import nn

from .. import _console
from ..config import check
from ..data import DataBundle
from ..export import export_layer_onnx, export_onnx, fold_batchnorm
from ..measure import count_macs, count_params
from ..measure.timing import medians, side_by_side
from ._context import Context, SpeedVerdict

__all__ = ["IF_SLOWER", "SLOWER_MARGIN", "side_by_side_rounds", "judged_report", "check_if_slower", "slower_at", "time_models", "never_slower"]

IF_SLOWER = ("revert", "keep")

#: An artifact is slower than another at a batch size when its speed-up is under
#: ``1 - max(SLOWER_MARGIN, the spread over rounds of either timing)``: within that, the two
#: are the same speed as far as the timer can tell.
SLOWER_MARGIN = 0.05


#: Side-by-side rounds last about this long per artifact and batch size. The machine's speed
#: moves in spells of a few hundred milliseconds that do not slow every model alike (a pruned
#: lenet5 at batch 64 reads 0.29x or 0.36x of its input depending on the spell), so many short
#: rounds sample more spells than a few long ones: with 0.3 s over 5 rounds the ratio read
#: 0.23-0.37 in 8 runs; with 1 s over 25 rounds, 0.31-0.39.
ROUND_S = 0.04
#: ... and there are at least / at most this many of them.
MIN_ROUNDS, MAX_ROUNDS = 5, 25


def side_by_side_rounds(max_seconds: float) -> int:
    """How many rounds a side-by-side timing capped at ``max_seconds`` (per artifact and batch) takes.

    >>> side_by_side_rounds(1.0), side_by_side_rounds(0.3), side_by_side_rounds(0.05), side_by_side_rounds(10)
    (25, 8, 5, 25)
    """
    return max(MIN_ROUNDS, min(MAX_ROUNDS, round(max_seconds / ROUND_S)))


def check_if_slower(value: str) -> None:
    """The config check every step with an ``if_slower`` field makes."""
    check(value in IF_SLOWER, "if_slower", f"got '{value}'; choose one of {', '.join(IF_SLOWER)}")


def slower_at(timed: Mapping[str, Mapping[str, Mapping[str, float]]], before: str, after: str) -> dict[str, float]:
    """``{batch: speed-up}`` where ``after`` is slower than ``before`` beyond the noise, from a
    :func:`slimkit.measure.timing.side_by_side` result.

    >>> t = {"a": {"1": {"median": 1.0, "spread": 0.02}, "64": {"median": 4.0, "spread": 0.02}},
    ...      "b": {"1": {"median": 1.3, "spread": 0.03, "ratio": 1.3}, "64": {"median": 4.1, "spread": 0.02, "ratio": 1.03}}}
    >>> slower_at(t, "a", "b")
    {'1': 0.769...}
    """
    ms = medians({before: timed[before], after: timed[after]})
    out = {}
    for b, t in timed[after].items():
        speedup = ms[before][b] / ms[after][b] if ms[after][b] > 0 else 0.0
        if speedup < 1 - max(SLOWER_MARGIN, t["spread"], timed[before][b]["spread"]):
            out[b] = speedup
    return out


def time_models(ctx: Context, models: Mapping[str, nn.Module], *, label: str, tag: str = "",
                example_shape: tuple[int, ...] | None = None) -> dict[str, dict[str, dict[str, float]]]:
    """Time ``models`` side by side on ``ctx.target`` (the first is the reference of the ratios).

    On ``ort-cpu`` each is exported to the work folder first (``timed-{tag}-{name}-N.onnx``); on
    ``torch-cpu`` it runs with its
    batch norms folded (as :func:`slimkit.measure.profile` times it). ``example_shape`` (no batch
    dimension) times the models on zeros of that shape instead of the data's examples (a single
    layer, exported by :func:`slimkit.export.export_layer_onnx`). A model exported before in this
    recipe with the same structure and weights reuses its file (:meth:`Context.exported`). Rounds
    and time as :func:`slimkit.pipeline.time_side_by_side`.
    """
    data = ctx.data if example_shape is None else cast(DataBundle, _ZerosData(ctx.data, example_shape))
    example = data.example(2)
    runnable: dict[str, Any] = {}
    for name, model in models.items():
        model = copy.deepcopy(model).eval()
        if ctx.target == "ort-cpu" and example_shape is not None:
            runnable[name] = export_layer_onnx(model, ctx.new_path(_safe(f"timed-{tag}-{name}")), example)
        elif ctx.target == "ort-cpu":
            runnable[name] = ctx.exported(model) or ctx.remember_export(
                model, export_onnx(model, ctx.new_path(_safe(f"timed-{tag}-{name}")), example))
        else:
            runnable[name] = fold_batchnorm(model, example)
    rounds = side_by_side_rounds(ctx.max_seconds)
    return side_by_side(runnable, data, ctx.batch_sizes, runtime=ctx.target, threads=ctx.threads, rounds=rounds,
                        max_seconds=ctx.max_seconds, label=label)


def never_slower(ctx: Context, step: str, before: nn.Module, if_slower: str, *,
                 revert_layers: Callable[[nn.Module], list[str]] | None = None) -> dict[str, Any]:
    """Judge the step that turned ``before`` into ``ctx.model``; revert it when slower (``if_slower``).

    ``revert_layers(before)`` gives back the step's layers that are slower on their own and names
    them; the whole model is judged again after it, and if it is still slower the step is
    reverted whole. Returns the step's ``speed`` report; appends a :class:`SpeedVerdict`.
    """
    timed = time_models(ctx, {"before": before, "after": ctx.model}, tag=step, label=f"timing {step}: before and after")
    slower = slower_at(timed, "before", "after")
    report: dict[str, Any] = {"timed": "side by side", **_figures(timed), "slower_at": slower, "if_slower": if_slower}
    if slower and if_slower == "revert" and revert_layers is not None:
        reverted = revert_layers(before)
        if reverted:
            report["reverted_layers"] = reverted
            timed = time_models(ctx, {"before": before, "after": ctx.model}, tag=step,
                                label=f"timing {step} again without its slower layers")
            slower = slower_at(timed, "before", "after")
            report.update(_figures(timed), slower_at=slower)
    applied = not (slower and if_slower == "revert")
    if not applied:
        ctx.model = before
    report.update(applied=applied, faster=not slower)
    speed = ", ".join(f"{s:.2f}x @{b}" for b, s in report["speedup"].items())
    if slower and applied:
        _console.info(f"  [red]{step} made the model slower on {ctx.target} ({speed}); kept because if_slower: keep[/red]")
    elif slower:
        _console.info(f"  {step} made the model [yellow]slower[/yellow] on {ctx.target} ({speed}): "
                      "reverted to the model before it (if_slower: revert)")
    elif report.get("reverted_layers"):
        _console.info(f"  {step}: {len(report['reverted_layers'])} layer(s) slower on their own reverted; "
                      f"the rest {speed}")
    else:
        _console.info(f"  {step} on {ctx.target}: {speed}")
    ctx.verdicts.append(SpeedVerdict(step, not slower, dict(report["speedup"]), dict(report["latency_ms"]),
                                     applied=applied))
    return report


def judged_report(ctx: Context, report: dict[str, Any], speed: dict[str, Any]) -> dict[str, Any]:
    """The step's report once judged: ``report`` with its ``speed``, or, when the step was reverted
    whole, what the model now is (``params_after``, ``macs_after``: the model from before the step),
    ``applied: false`` and the step's own figures under ``attempted``."""
    if speed["applied"]:
        return {**report, "speed": speed}
    shape = tuple(ctx.data.example(1).shape[1:])
    return {"applied": False, "reverted": f"slower on {ctx.target} than the model before it", "speed": speed,
            "params_after": count_params(ctx.model)["params"], "macs_after": count_macs(ctx.model, shape),
            "attempted": report}


def _figures(timed: Mapping[str, Mapping[str, Mapping[str, float]]]) -> dict[str, Any]:
    ms = medians(timed)
    return {"latency_ms": {"before": ms["before"], "after": ms["after"]},
            "speedup": {b: round(ms["before"][b] / ms["after"][b], 4) if ms["after"][b] > 0 else 0.0
                        for b in ms["after"]},
            "spread": {b: round(max(timed["before"][b]["spread"], timed["after"][b]["spread"]), 4)
                       for b in ms["after"]}}


def _safe(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_" else "_" for c in name)


class _ZerosData:
    """Stands in for a :class:`~slimkit.data.DataBundle` where only ``example(n)`` is read:
    zeros of one layer's input shape."""

    def __init__(self, data: Any, shape: tuple[int, ...]):
        self.name, self.shape = data.name, tuple(shape)

    def example(self, n: int) -> torch.Tensor:
        return torch.zeros((n, *self.shape))
