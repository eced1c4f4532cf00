"""Efficient architecture: dense kxk convolutions become depthwise-separable pairs (MobileNet).

``separable_(model, Separable(...))`` replaces, in place, each dense convolution (``groups=1``,
kernel larger than 1x1) by a depthwise kxk convolution followed by a pointwise 1x1 one, as in
MobileNet (Howard et al. 2017), and initialises the pair to the closest such pair to the
original: with ``multiplier`` m depthwise filters per input channel, the pair computes

    W[o, i, :, :] ~ sum_j P[o, i*m + j] * D[i*m + j, :, :]

so for each input channel ``i`` the ``(C_out, kh*kw)`` slice ``W[:, i]`` is replaced by its best
rank-m approximation (truncated SVD, Eckart-Young); with ``m = min(C_out, kh*kw)`` the pair is
exact. No non-linearity sits between the two, so the pair starts as a close linear
approximation of the original layer; fine-tune it afterwards with distillation from the
original model (a ``finetune`` or ``distill`` step; both distil by default).

>>> import torch
>>> from slimkit.models import create_model
>>> model = create_model("lenet5", input_shape=(1, 28, 28), num_classes=10)
>>> report = separable_(model, Separable(), example=torch.zeros(1, 1, 28, 28))
>>> [(row["name"], row["replaced"]) for row in report["layers"]]
[('conv1', True), ('conv2', True)]
>>> type(model.conv2).__name__
'SeparableConv2d'
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, cast

import torch
from torch import nn

from ..config import check
from ..layers import FilterFn, LayerSelection
from ..models import record_structure, register_structure_op, set_module
from ..pipeline import Context, check_if_slower, register_space, register_step
from ._replace import HAS_NO, Site, conv_geometry, example_for, replace_layers_, run_replacing
from .decompose import Factorized, _cost, decomposable_layers

__all__ = ["Separable", "separable_", "SeparableConv2d"]


@dataclass
class Separable:
    """Replace dense kxk convolutions by depthwise kxk + pointwise 1x1 pairs (MobileNet).

    Each pair starts as the closest depthwise-separable approximation of the original layer
    (a rank-``multiplier`` fit per input channel); fine-tune afterwards (``finetune`` / ``distill``).
    ``multiplier``: depthwise filters per input channel. ``skip``: layer names, globs or
    blocks left alone. ``only_if_smaller``: replace a layer only when that reduces both its
    parameters and its MACs. ``if_slower``: when the model after the step is slower on the target than before it
    (timed side by side), ``revert`` it (the default) or ``keep`` it anyway.
    The pairs that are slower than the convolutions they replaced, timed alone, are given back first.
    """

    multiplier: int = 1
    skip: list[str] = field(default_factory=list)
    only_if_smaller: bool = True
    if_slower: str = "revert"

    def __post_init__(self) -> None:
        check_if_slower(self.if_slower)
        check(1 <= self.multiplier <= 64, "multiplier", f"must be in 1..64 (depthwise filters per input channel), "
                                                         f"got {self.multiplier}")


class SeparableConv2d(Factorized):
    """Depthwise kxk (``C_in -> C_in*m``, ``groups=C_in``) -> pointwise 1x1 (``C_in*m -> C_out``)."""

    def __init__(self, conv: nn.Conv2d, multiplier: int = 1):
        c_in, m = conv.in_channels, int(multiplier)
        super().__init__(
            nn.Conv2d(c_in, c_in * m, *conv_geometry(conv), groups=c_in, bias=False),
            nn.Conv2d(c_in * m, conv.out_channels, 1, bias=conv.bias is not None),
        )


@register_structure_op("separable")
def _replay_separable(model: nn.Module, op: dict[str, Any]) -> None:
    conv = cast(nn.Conv2d, model.get_submodule(op["layer"]))  # recorded by separable_: a Conv2d
    set_module(model, op["layer"], SeparableConv2d(conv, op["multiplier"]))


def _separable_cost(site: Site, m: int) -> tuple[int, int]:
    conv = cast(nn.Conv2d, site.module)  # separable_ replaces convolutions only
    c_out, _, kh, kw = conv.weight.shape
    c_in = conv.in_channels
    bias = conv.bias.numel() if conv.bias is not None else 0
    w = c_in * m * (kh * kw + c_out)  # both convs run at the output resolution
    return w + bias, math.prod(site.out_shape[1:]) * w


def _fit(w: torch.Tensor, m: int) -> tuple[torch.Tensor, torch.Tensor, float]:
    """Depthwise ``(C_in*m, 1, kh, kw)`` and pointwise ``(C_out, C_in*m, 1, 1)`` weights closest to ``w``."""
    c_out, c_in, kh, kw = w.shape
    slices = w.double().transpose(0, 1).reshape(c_in, c_out, kh * kw)  # (C_in, C_out, kh*kw): W[:, i] per i
    u, s, vh = torch.linalg.svd(slices, full_matrices=False)  # batched over input channels
    root = s[:, :m].sqrt()  # (C_in, m)
    depth = (root[:, :, None] * vh[:, :m, :]).reshape(c_in * m, 1, kh, kw)  # filter i*m+j = sqrt(s_ij) v_ij
    point = (u[:, :, :m] * root[:, None, :])  # (C_in, C_out, m)
    point = point.permute(1, 0, 2).reshape(c_out, c_in * m, 1, 1)  # column i*m+j = sqrt(s_ij) u_ij
    total = float((s**2).sum())
    err = math.sqrt(float((s[:, m:] ** 2).sum()) / total) if total else 0.0
    return depth, point, err


def separable_(
    model: nn.Module,
    config: Separable | None = None,
    *,
    example: torch.Tensor | None = None,
    filter_fn: FilterFn | None = None,
) -> dict[str, Any]:
    """Replace dense kxk convolutions by depthwise-separable pairs initialised from them, in place.

    ``example``: an input batch (default: zeros of the model's recorded input shape) to find
    each layer's feature-map size for its MACs. ``filter_fn(module, name)``: return False to
    leave a layer alone. Returns ``layers`` (per layer: ``name``, ``replaced``, ``multiplier``,
    ``rel_error`` of the initial pair, ``params_before/after``, ``macs_before/after``, and a
    ``reason`` when left alone), ``replaced`` and the model's ``params_before/after`` and
    ``macs_before/after``.

    >>> from slimkit.models import load_model
    >>> model = load_model("zoo:resnet", input_shape=(1, 28, 28), num_classes=10)
    >>> report = separable_(model, Separable(multiplier=1, skip=["conv1"]))
    >>> report["replaced"], report["macs_after"] < report["macs_before"] / 4
    (18, True)
    """
    cfg = config or Separable()
    x = example_for(model, example, "separable_")
    modules = dict(model.named_modules())
    convs = {n: modules[n] for n in decomposable_layers(model) if isinstance(modules[n], nn.Conv2d)}
    selection = LayerSelection({"_default": cfg.multiplier}, skip=cfg.skip, filter_fn=filter_fn)
    selection.check([n for n in modules if n], what="convolutions", unknown=HAS_NO, unmatched=HAS_NO,
                    shown=list(convs))
    names = list(selection.resolve(convs)[0])
    return replace_layers_(model, x, names, lambda name, conv, site: _replace(model, name, cast(nn.Conv2d, conv), site, cfg),
                           label="separable", noun="convolutions")


def _replace(model: nn.Module, name: str, conv: nn.Conv2d, site: Site | None, cfg: Separable) -> dict[str, Any]:
    row: dict[str, Any] = {"name": name, "replaced": False}
    if conv.groups != 1:
        return {**row, "reason": "already a grouped convolution"}
    if conv.kernel_size == (1, 1):
        return {**row, "reason": "a 1x1 convolution is already pointwise"}
    if conv.padding_mode != "zeros":
        return {**row, "reason": f"padding_mode '{conv.padding_mode}'"}
    if site is None:
        return {**row, "reason": "not called exactly once by the model's forward"}
    kh, kw = conv.kernel_size
    m = min(cfg.multiplier, conv.out_channels, kh * kw)  # more filters than that cannot improve the fit
    params, macs = _cost("dense", site, None)
    p_after, m_after = _separable_cost(site, m)
    row.update(multiplier=m, params_before=params, macs_before=macs, params_after=p_after, macs_after=m_after)
    if cfg.only_if_smaller and not (p_after < params and m_after < macs):
        return {**row, "reason": f"multiplier {m} would not reduce both parameters and MACs"}
    depth, point, err = _fit(conv.weight.detach(), m)
    new = SeparableConv2d(conv, m).to(conv.weight.device)
    with torch.no_grad():
        new[0].weight.copy_(depth.to(conv.weight.dtype))
        new[1].weight.copy_(point.to(conv.weight.dtype))
        if conv.bias is not None:
            new[1].bias.copy_(conv.bias.detach())
    new.train(conv.training)
    set_module(model, name, new)
    record_structure(model, {"op": "separable", "layer": name, "multiplier": m})
    return {**row, "replaced": True, "rel_error": round(err, 6)}


@register_step("separable", Separable, forbids={"exported", "quantized", "fake_quant", "masked"}, reports_speed=True)
def _separable_step(ctx: Context, cfg: Separable) -> dict[str, Any]:
    """Depthwise-separable replacement of dense convolutions; follow it with finetune or distill."""
    return run_replacing(ctx, separable_, cfg, "separable")


@register_space("separable", order=10)
def _separable_space(trial: Any) -> Separable | None:
    if not trial.suggest_categorical("separable.on", [True, False]):
        return None
    return Separable(multiplier=trial.suggest_categorical("separable.multiplier", [1, 2]))
