"""Replacing a model's layers one by one, in place: the machinery that decompose_ and separable_ share.

Each verb picks layer names, and :func:`replace_layers_` traces the shapes each layer sees on one
example (:class:`Site`), calls the verb's ``replace(name, module, site)`` for each (one report row
each) and reports the model's parameters and MACs before and after; :func:`run_replacing` runs
such a verb as a recipe step.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, cast

import torch
from torch import nn

from .. import _console
from ..errors import ConfigError, SlimkitError
from ..measure import count_macs, count_params
from ..measure.backends import torch_threads
from ..models import forget_structure, origin_of, set_module
from ..pipeline import Context, judged_report, never_slower, slower_at, time_models

HAS_NO = "the model has no layer '{key}'; its {what} are: {names}"

Layer = nn.Linear | nn.Conv2d  # a layer these verbs replace
_Pair = tuple[int, int]


def conv_geometry(conv: nn.Conv2d) -> tuple[_Pair, _Pair, str | _Pair, _Pair]:
    """``conv``'s kernel size, stride, padding and dilation, typed as ``nn.Conv2d`` takes them
    (torch types the attributes as ``tuple[int, ...]``; a ``Conv2d``'s are pairs)."""
    return cast("tuple[_Pair, _Pair, str | _Pair, _Pair]", (conv.kernel_size, conv.stride, conv.padding, conv.dilation))


@dataclass
class Site:
    """A candidate layer and the shapes it saw on one example (batch dimension dropped)."""

    name: str
    module: Layer
    in_shape: tuple[int, ...]
    out_shape: tuple[int, ...]


def _trace_shapes(model: nn.Module, example: torch.Tensor, names: list[str]) -> dict[str, Site]:
    """Run ``model`` once and record the input/output shapes of the named layers called exactly once."""
    seen: dict[str, list[tuple[tuple[int, ...], tuple[int, ...]]]] = {n: [] for n in names}
    modules = dict(model.named_modules())
    handles = [
        modules[n].register_forward_hook(
            lambda m, args, out, n=n: seen[n].append((tuple(args[0].shape[1:]), tuple(out.shape[1:]))))
        for n in names
    ]
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            model(example)
    finally:
        model.train(was_training)
        for h in handles:
            h.remove()
    # the names are of linear or Conv2d layers
    return {n: Site(n, cast(Layer, modules[n]), *calls[0]) for n, calls in seen.items() if len(calls) == 1}


def example_for(model: nn.Module, example: torch.Tensor | None, verb: str = "decompose_") -> torch.Tensor:
    """One input example on the model's device: ``example[:1]``, or zeros of the recorded input shape."""
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    if example is not None:
        return example[:1].to(device)
    shape = origin_of(model).get("input_shape")
    if not shape:
        raise SlimkitError(f"{verb} needs example= (an input batch) to measure each layer's MACs; "
                           "this model does not record its input shape.")
    return torch.zeros((1, *shape), device=device)


def replace_layers_(model: nn.Module, x: torch.Tensor, names: list[str],
                    replace: Callable[[str, nn.Module, Site | None], dict[str, Any]], *, label: str,
                    noun: str) -> dict[str, Any]:
    """``replace(name, module, site)`` for each of ``names`` (one row each, with ``replaced``), and
    the model's parameters and MACs before and after on the input ``x``."""
    input_shape = tuple(x.shape[1:])
    params_before, macs_before = count_params(model)["params"], count_macs(model, input_shape)
    sites = _trace_shapes(model, x, names)
    rows: list[dict[str, Any]] = []
    # small factorizations: one thread is faster, and far faster on a busy machine
    with _console.progress() as bar, torch_threads(1):
        task = bar.add_task(label, total=len(names), info="")
        for name in names:
            bar.update(task, info=name)
            site = sites.get(name)
            row = replace(name, model.get_submodule(name), site)
            rows.append({**row, "in_shape": list(site.in_shape)} if site is not None and row["replaced"] else row)
            bar.advance(task)
    params_after, macs_after = count_params(model)["params"], count_macs(model, input_shape)
    replaced = sum(bool(r["replaced"]) for r in rows)
    _console.info(f"{label}: {replaced} of {len(rows)} {noun} replaced; params {params_before:,} -> "
                  f"{params_after:,}, MACs {macs_before:,} -> {macs_after:,}")
    return {"layers": rows, "replaced": replaced, "params_before": params_before, "params_after": params_after,
            "macs_before": macs_before, "macs_after": macs_after}


def run_replacing(ctx: Context, verb: Callable[..., dict[str, Any]], cfg: Any, step: str) -> dict[str, Any]:
    """A layer-replacing step: ``verb(ctx.model, cfg, example=...)``, its config errors placed in ``step``,
    then judged by its artifact on the target (:func:`slimkit.pipeline.never_slower`, ``cfg.if_slower``):
    the replaced layers that are slower on their own are given back first."""
    before = copy.deepcopy(ctx.model)
    try:
        report = verb(ctx.model, cfg, example=ctx.data.example(1))
    except ConfigError as e:
        raise e.located(f"recipe step '{step}'") from None
    if not report["replaced"]:
        return report
    speed = never_slower(ctx, step, before, cfg.if_slower,
                         revert_layers=lambda b: _revert_slower_layers(ctx, b, report, step))
    return judged_report(ctx, report, speed)


def _revert_slower_layers(ctx: Context, before: nn.Module, report: dict[str, Any], step: str) -> list[str]:
    """Time each replaced layer against the one it replaced, alone, on the target; give back the slower."""
    reverted = []
    for row in report["layers"]:
        if not row["replaced"]:
            continue
        name = row["name"]
        original = before.get_submodule(name)
        timed = time_models(ctx, {"original": original, "replaced": ctx.model.get_submodule(name)},
                            tag=name, example_shape=tuple(row["in_shape"]), label=f"timing {step} of {name} alone")
        slower = slower_at(timed, "original", "replaced")
        if slower:
            set_module(ctx.model, name, copy.deepcopy(original))
            forget_structure(ctx.model, name)
            speed = ", ".join(f"{s:.2f}x @{b}" for b, s in slower.items())
            row.update(replaced=False, reverted=True, reason=f"slower on {ctx.target} on its own ({speed})")
            reverted.append(name)
    if reverted:
        shape = tuple(ctx.data.example(1).shape[1:])
        report.update(replaced=sum(bool(r["replaced"]) for r in report["layers"]),
                      params_after=count_params(ctx.model)["params"], macs_after=count_macs(ctx.model, shape))
    return reverted
