"""Unstructured magnitude pruning: masks, the AGP schedule and the training hook holding them.

Masks live on the model (``model.__dict__``, like the spine's origin and structure records),
keyed by module name, one boolean tensor shaped like that module's ``weight`` (``True`` =
kept). The weights themselves are zeroed where the mask is ``False``, so the model is an
ordinary module at every moment: it exports, saves and loads as usual. A :class:`MaskHook`
re-applies the masks after every optimizer step so fine-tuning cannot revive a pruned
weight; :func:`finalize_` drops the masks (the zeros stay).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from typing import Any, cast

import torch
from torch import nn

from .. import _console
from ..errors import SlimkitError
from ..layers import FilterFn, LayerSelection

__all__ = ["masks_of", "has_masks", "apply_masks_", "finalize_", "MaskHook", "prunable_layers", "sparsity_report"]

_MASKS_ATTR = "_slimkit_masks"


# ----------------------------------------------------------------------------- which layers


def prunable_layers(model: nn.Module) -> dict[str, nn.Module]:
    """Modules whose ``weight`` is a matrix or a kernel (linear, conv, embedding...), by name."""
    out = {}
    for name, mod in model.named_modules():
        w = getattr(mod, "weight", None)
        if name and isinstance(w, nn.Parameter) and w.dim() >= 2:
            out[name] = mod
    return out


def resolve_targets(
    model: nn.Module,
    sparsity: float,
    layers: Mapping[str, float],
    skip: Iterable[str],
    filter_fn: FilterFn | None,
) -> tuple[dict[str, float], dict[str, str], set[str]]:
    """``({layer: target sparsity}, {skipped layer: why}, {layers given a sparsity of their own})``."""
    cand = prunable_layers(model)
    selection = LayerSelection({"_default": sparsity, **layers}, skip=skip, filter_fn=filter_fn)
    selection.check(cand, what="prunable layers")
    targets, skipped = selection.resolve(cand)
    alone = set(selection.explicit({n: cand[n] for n in targets}))
    return {n: float(s) for n, s in targets.items()}, skipped, alone


# ----------------------------------------------------------------------------- masks


def masks_of(model: nn.Module) -> dict[str, torch.Tensor]:
    """The model's pruning masks, ``{module name: bool tensor shaped like its weight}`` ({} if none)."""
    return model.__dict__.get(_MASKS_ATTR, {})


def has_masks(model: nn.Module) -> bool:
    return bool(masks_of(model))


def set_masks(model: nn.Module, masks: dict[str, torch.Tensor]) -> None:
    model.__dict__[_MASKS_ATTR] = masks


@torch.no_grad()
def apply_masks_(model: nn.Module) -> None:
    """Zero every masked-out weight (in place)."""
    for name, mask in masks_of(model).items():
        w = cast(torch.Tensor, model.get_submodule(name).weight)  # masks are of linear and conv layers
        if w.shape != mask.shape:
            raise SlimkitError(
                f"the pruning mask of '{name}' is shaped {tuple(mask.shape)} but its weight is now "
                f"{tuple(w.shape)}: the layer changed after unstructured pruning. Finalise the masks "
                "(finalize_) before changing the architecture, or prune structurally first.")
        w.mul_(mask.to(w.device, w.dtype))


@torch.no_grad()
def compute_masks_(model: nn.Module, targets: Mapping[str, float], scope: str, alone: Iterable[str] = ()) -> None:
    """Prune ``model`` in place to ``targets`` by weight magnitude and store the masks.

    ``scope="layer"``: each layer loses its own fraction of smallest weights.
    ``scope="global"``: one magnitude threshold over all layers except those in ``alone``
    (layers given their own sparsity), which are pruned on their own. Masks only grow
    sparser: a weight pruned before stays pruned.
    """
    old = masks_of(model)
    alone = set(alone)
    scores = {}
    for n in targets:
        s = model.get_submodule(n).weight.detach().abs().float()
        if n in old:
            s = s * old[n].to(s.device)
        scores[n] = s
    new: dict[str, torch.Tensor] = {}
    shared = [n for n in targets if n not in alone] if scope == "global" else []
    if shared:
        new.update(_global_keep({n: scores[n] for n in shared}, targets[shared[0]]))
    for n in targets:
        if n not in new:
            new[n] = _keep_mask(scores[n].flatten(), targets[n]).view_as(scores[n])
    for n, mask in new.items():
        if n in old:
            mask &= old[n].to(mask.device)
    merged = dict(old)
    merged.update(new)
    set_masks(model, merged)
    apply_masks_(model)


def _keep_mask(scores: torch.Tensor, sparsity: float) -> torch.Tensor:
    """Keep all but the ``round(sparsity * n)`` smallest scores."""
    return _keep_top(scores, scores.numel() - int(round(sparsity * scores.numel())))


def _keep_top(scores: torch.Tensor, kept: int) -> torch.Tensor:
    """Keep the ``kept`` largest scores (exact count; ties broken by position)."""
    keep = torch.zeros(scores.numel(), dtype=torch.bool)
    if kept > 0:
        keep[torch.argsort(scores, descending=True, stable=True)[:kept]] = True
    return keep


# A global threshold can remove a whole layer whose weights are small (its fan-in is large),
# which cuts the network in two. Each layer keeps at least this share of its weights.
MIN_KEPT = 0.02


def _global_keep(scores: dict[str, torch.Tensor], sparsity: float) -> dict[str, torch.Tensor]:
    """One magnitude threshold over all layers, except that none keeps fewer than MIN_KEPT."""
    sizes = {n: s.numel() for n, s in scores.items()}
    kept_total = sum(sizes.values()) - int(round(sparsity * sum(sizes.values())))
    floors = {n: min(sizes[n], math.ceil(MIN_KEPT * sizes[n])) for n in scores}
    pinned: set[str] = set()
    while True:
        rest = [n for n in scores if n not in pinned]
        budget = max(0, kept_total - sum(floors[n] for n in pinned))
        out = {n: _keep_top(scores[n].flatten(), floors[n]).view_as(scores[n]) for n in pinned}
        if not rest:
            return out
        flat = torch.cat([scores[n].flatten() for n in rest])  # (sum of the rest's numel,)
        keep = _keep_top(flat, budget)
        offset, short = 0, []
        for n in rest:
            out[n] = keep[offset : offset + sizes[n]].view_as(scores[n])
            offset += sizes[n]
            if int(out[n].sum()) < floors[n]:
                short.append(n)
        if not short:
            return out
        pinned.update(short)


def finalize_(model: nn.Module) -> dict[str, Any]:
    """Remove the model's pruning masks; the pruned weights stay zero. Returns the sparsity report.

    >>> from slimkit.models import create_model
    >>> from slimkit.methods.prune import prune_, Unstructured
    >>> model = create_model("lenet300", input_shape=(1, 8, 8), num_classes=10)
    >>> _ = prune_(model, Unstructured(sparsity=0.8, scope="layer"))
    >>> finalize_(model)["layers"]["fc1"]["sparsity"]
    0.8
    """
    names = list(masks_of(model))
    apply_masks_(model)
    model.__dict__.pop(_MASKS_ATTR, None)
    return sparsity_report(model, names)


def sparsity_report(model: nn.Module, names: Iterable[str] | None = None) -> dict[str, Any]:
    """Parameters and non-zeros per layer (``names``: the pruned layers; default: the masked ones)."""
    names = list(names if names is not None else masks_of(model))
    layers = {}
    for n in names:
        w = model.get_submodule(n).weight.detach()
        nz = int(torch.count_nonzero(w))
        layers[n] = {"params": w.numel(), "nonzero": nz, "sparsity": round(1 - nz / max(w.numel(), 1), 6)}
    total = sum(v["params"] for v in layers.values())
    nonzero = sum(v["nonzero"] for v in layers.values())
    all_params = sum(p.numel() for p in model.parameters())
    all_nz = sum(int(torch.count_nonzero(p.detach())) for p in model.parameters())
    return {
        "pruned_layers_sparsity": round(1 - nonzero / max(total, 1), 6),
        "params": all_params,
        "nonzero_params": all_nz,
        "compression": round(all_params / max(all_nz, 1), 3),
        "layers": layers,
    }


# ----------------------------------------------------------------------------- the hook


class AGPSchedule:
    """Zhu & Gupta's automated gradual pruning: ``s_t = s_f * (1 - (1 - t / T)^3)``.

    ``T`` is ``ramp`` times the fine-tune's steps; masks are recomputed ``updates`` times over
    the ramp, so the last ``1 - ramp`` of fine-tuning recovers at the final sparsity.
    """

    def __init__(self, targets: Mapping[str, float], scope: str, alone: Iterable[str] = (), ramp: float = 0.75,
                 updates: int = 20):
        self.targets = dict(targets)
        self.scope = scope
        self.alone = set(alone)
        self.ramp = ramp
        self.updates = updates
        self.end = 0
        self.every = 1
        self.done = False

    def fraction(self, step: int) -> float:
        if step >= self.end:
            return 1.0
        return 1.0 - (1.0 - step / self.end) ** 3

    def begin(self, total_steps: int) -> None:
        self.end = max(1, int(round(self.ramp * total_steps)))
        self.every = max(1, self.end // self.updates)

    def step(self, model: nn.Module, step: int) -> None:
        if self.done or (step % self.every and step < self.end):
            return
        frac = self.fraction(step)
        compute_masks_(model, {n: t * frac for n, t in self.targets.items()}, self.scope, self.alone)
        self.done = frac >= 1.0

    def finish(self, model: nn.Module) -> None:
        if not self.done:
            _console.info("gradual pruning: fine-tuning ended before the schedule did; pruning to the target now")
            compute_masks_(model, self.targets, self.scope, self.alone)
            self.done = True


class MaskHook:
    """A :func:`slimkit.training.fit` hook that keeps pruning masks applied while the model trains.

    It reads the masks from the model it is given, so one hook serves any masked model;
    with a gradual ``schedule`` it also grows the masks step by step and tells ``fit`` not to
    keep an epoch as the best one before the target sparsity is reached.

    >>> from slimkit.data import load_data
    >>> from slimkit.models import create_model
    >>> from slimkit.training import fit, TrainConfig
    >>> from slimkit.methods.prune import prune_, Unstructured
    >>> data = load_data("digits")
    >>> model = create_model("lenet300", input_shape=data.input_shape, num_classes=10)
    >>> _ = prune_(model, Unstructured(sparsity=0.9, scope="layer"))
    >>> _ = fit(model, data, TrainConfig(epochs=1), hooks=[MaskHook.of(model)])
    >>> round(float((model.fc1.weight == 0).float().mean()), 4)
    0.9
    """

    def __init__(self, schedule: AGPSchedule | None = None):
        self.schedule = schedule

    @classmethod
    def of(cls, model: nn.Module) -> "MaskHook":
        """The hook for ``model``; a :class:`SlimkitError` if the model holds no masks."""
        if not has_masks(model):
            raise SlimkitError("this model holds no pruning masks; prune it first with prune_(model, Unstructured(...)).")
        return cls()

    def on_train_begin(self, model: nn.Module, total_steps: int) -> None:
        if self.schedule is not None:
            self.schedule.begin(total_steps)
            self.schedule.step(model, 0)
        apply_masks_(model)

    def on_step_end(self, model: nn.Module, step: int, total_steps: int) -> None:
        if self.schedule is not None:
            self.schedule.step(model, step)
        apply_masks_(model)

    def checkpoint_ok(self, model: nn.Module, epoch: int) -> bool:
        return self.schedule is None or self.schedule.done

    def on_train_end(self, model: nn.Module) -> None:
        if self.schedule is not None:
            self.schedule.finish(model)
        apply_masks_(model)
