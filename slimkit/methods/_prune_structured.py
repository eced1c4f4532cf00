"""Structured channel pruning on Torch-Pruning's dependency graph, made safe for unseen models.

Torch-Pruning traces the model once and groups every layer whose channels are coupled
(a residual add ties the convolutions feeding it; a depthwise convolution ties its input and
output channels; a concatenation maps channel ranges). Removing a group's channels keeps the
model valid. A model the graph does not fully understand (a hard-coded ``view``, an op with a
fixed channel count) can still break after a group is pruned: every group is pruned on a
trial copy first, the copy is run on a real batch, and a group whose pruning breaks the
forward pass is left out and named in the report. Only then does the real model take the
pruned structure.

Grouped convolutions keep their group count. Torch-Pruning removes the same positions from
every group of a grouped convolution (and from every layer whose channels reach it), so each
group narrows alike and the layer stays a valid grouped convolution. What ``round_to`` aligns
there is the group width, not only the total: ONNX Runtime's fast CPU convolution (NCHWc)
takes a grouped convolution only when its channels per group, in and out, are multiples of its
block (8, or 16 with AVX-512), and a layer off the block costs layout reorders around it too.
Ten groups of 12 is 120 channels, a multiple of 8, yet a 1x1, grouped 3x3, 1x1 block ran no
faster with them than with the unpruned ten groups of 16; with ten groups of 8 it ran twice as
fast. Taking whole groups away instead (fewer groups, the same width) would keep RegNet's
design, but is not what Torch-Pruning does and would need a pruning function of its own. A
group whose width has no narrower multiple of ``round_to`` (a group width of 8 at
``round_to=8``) is kept whole and named in the report.

The pruned architecture is recorded with :func:`slimkit.models.record_structure` (op
``prune_channels``: new shapes of every changed module) so ``save_model`` / ``load_model``
rebuild it.
"""

from __future__ import annotations

import copy
import math
import warnings
from collections.abc import Callable, Collection, Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .. import _console
from ..errors import ConfigError, SlimkitError
from ..layers import LayerSelection
from ..models import record_structure, register_structure_op

IMPORTANCES = ("l1", "l2", "taylor", "bn-scale")
TAYLOR_BATCHES = 4  # training batches whose gradients score channels for Taylor importance
_MAX_RETRIES = 32


def _tp():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        import torch_pruning as tp
    return tp


def root_layers(model: nn.Module) -> dict[str, nn.modules.conv._ConvNd | nn.Linear]:
    """Layers whose output channels can root a pruning group (conv and linear), by name."""
    return {n: m for n, m in model.named_modules()
            if n and isinstance(m, (nn.modules.conv._ConvNd, nn.Linear))}


def classifier_of(model: nn.Module, example: torch.Tensor) -> str | None:
    """The layer that produces the logits: the last conv/linear run whose outputs number the classes."""
    roots = root_layers(model)
    order: list[tuple[str, int]] = []
    handles = [m.register_forward_hook(lambda mod, inp, out, n=n: order.append((n, out.shape[1] if out.dim() > 1 else -1)))
               for n, m in roots.items()]
    was = model.training
    model.eval()
    try:
        with torch.no_grad():
            out = model(example)
    finally:
        for h in handles:
            h.remove()
        model.train(was)
    classes = out.shape[1] if isinstance(out, torch.Tensor) and out.dim() > 1 else None
    for name, channels in reversed(order):
        if channels == classes:
            return name
    return order[-1][0] if order else None


def _importance(kind: str):
    tp = _tp()
    if kind == "l1":
        return tp.importance.MagnitudeImportance(p=1)
    if kind == "l2":
        return tp.importance.MagnitudeImportance(p=2)
    if kind == "taylor":
        return tp.importance.TaylorImportance()
    return tp.importance.BNScaleImportance()


def _taylor_gradients(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch: int = 128) -> None:
    """Accumulate the loss gradient of ``TAYLOR_BATCHES`` real training batches (eval mode: BN stats untouched)."""
    model.eval()
    model.zero_grad(set_to_none=True)
    for i in range(TAYLOR_BATCHES):
        xb, yb = x[i * batch : (i + 1) * batch], y[i * batch : (i + 1) * batch]
        if len(xb) == 0:
            break
        F.cross_entropy(model(xb), yb).backward()


def _shape_snapshot(model: nn.Module) -> dict[str, dict[str, Any]]:
    """Per module: its own parameter / buffer shapes and its int (or int tuple) attributes."""
    snap = {}
    for name, mod in model.named_modules():
        attrs = {k: (list(v) if isinstance(v, tuple) else v) for k, v in vars(mod).items()
                 if not k.startswith("_") and (isinstance(v, int) and not isinstance(v, bool)
                                               or isinstance(v, tuple) and all(isinstance(i, int) for i in v))}
        snap[name] = {
            "attrs": attrs,
            "params": {k: list(p.shape) for k, p in mod._parameters.items() if p is not None},
            "buffers": {k: list(b.shape) for k, b in mod._buffers.items() if b is not None},
        }
    return snap


def _changes(before: Mapping[str, Any], after: Mapping[str, Any]) -> dict[str, Any]:
    out = {}
    for name, a in after.items():
        b = before.get(name)
        if b is None or a == b:
            continue
        out[name] = {
            "attrs": {k: v for k, v in a["attrs"].items() if b["attrs"].get(k) != v},
            "params": {k: v for k, v in a["params"].items() if b["params"].get(k) != v},
            "buffers": {k: v for k, v in a["buffers"].items() if b["buffers"].get(k) != v},
        }
    return out


@register_structure_op("prune_channels")
def _replay_prune_channels(model: nn.Module, op: dict[str, Any]) -> None:
    """Give every recorded module its pruned shapes (the weights are loaded after)."""
    for name, change in op["modules"].items():
        try:
            mod = model.get_submodule(name) if name else model
        except AttributeError:
            raise SlimkitError(f"the saved pruned model changes layer '{name}', which this model does not have.") from None
        for k, v in change["attrs"].items():
            setattr(mod, k, tuple(v) if isinstance(getattr(mod, k, None), tuple) else v)
        for k, shape in change["params"].items():
            old = mod._parameters[k]
            mod._parameters[k] = nn.Parameter(torch.zeros(shape, dtype=old.dtype), requires_grad=old.requires_grad)
        for k, shape in change["buffers"].items():
            old_buffer = mod._buffers[k]
            mod._buffers[k] = torch.zeros(shape, dtype=old_buffer.dtype)


def channel_groups(model: nn.Module, example: torch.Tensor, ignored: Collection[str] = frozenset()) -> dict[str, dict[str, Any]]:
    """Torch-Pruning's channel groups, by root layer: ``coupled`` (the layers whose output channels
    go with the root's), ``channels`` (how many), ``params`` (parameters of every layer touched),
    ``touched`` (every module whose channels the group changes, in or out: batch norms, pools and the
    layers reading the channels too), ``split`` (into how many equal blocks a grouped convolution in
    the group cuts the channels; 1 if none) and ``split_by`` (that convolution)."""
    tp = _tp()
    modules = dict(model.named_modules())
    names = {m: n for n, m in modules.items()}
    was = model.training
    model.eval()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            dg = tp.DependencyGraph().build_dependency(model, example_inputs=example)
            groups = {}
            for group in dg.get_all_groups(ignored_layers=[modules[n] for n in ignored],
                                           root_module_types=[nn.modules.conv._ConvNd, nn.Linear]):
                root = group[0].dep.target.module
                touched = {names[dep.target.module] for dep, _ in group if dep.target.module in names}
                split, by = _channel_split(group, dg)
                groups[names[root]] = {
                    "coupled": sorted(names[dep.target.module] for dep, _ in group
                                      if dg.is_out_channel_pruning_fn(dep.handler) and dep.target.module in names),
                    "channels": int(dg.get_out_channels(root)),
                    "params": sum(p.numel() for n in touched for p in modules[n].parameters(recurse=False)),
                    "touched": sorted(touched),
                    "split": split,
                    "split_by": names.get(by, "?") if by is not None else None,
                }
    except Exception as e:
        raise SlimkitError(f"Torch-Pruning cannot trace this model for structured pruning: {_first_line(e)}. "
                           "Prune it unstructured instead.") from None
    finally:
        model.train(was)
    return groups


def _channel_split(group: Any, dg: Any) -> tuple[int, nn.Module | None]:
    """Into how many equal blocks a grouped convolution cuts a group's channels, and that convolution.

    Read as ``MetaPruner._get_channel_groups`` reads it: a grouped convolution (not a depthwise
    one) reached through its output or input channels splits them into its groups, and the same
    positions go from every block. Torch-Pruning splits at group norms too; their widths need no
    alignment, and they are left out here.
    """
    split, by = 1, None
    for dep, _ in group:
        mod = dep.target.module
        if not isinstance(mod, nn.modules.conv._ConvNd) or mod.groups == mod.out_channels:
            continue
        pruner = dg.get_pruner_of_module(mod)
        if pruner is None:
            continue
        n = (pruner.get_out_channel_groups(mod) if dg.is_out_channel_pruning_fn(dep.handler)
             else pruner.get_in_channel_groups(mod))
        if n > split:
            split, by = n, mod
    return split, by


def kept_channels(channels: int, ratio: float, round_to: int) -> int:
    """Channels a layer keeps at ``ratio``: the nearest multiple of ``round_to`` (at least one multiple);
    a layer with fewer channels than ``round_to`` is rounded to whole channels only."""
    kept = channels * (1 - ratio)
    if round_to > 1 and channels >= round_to:
        return min(channels, max(round_to, int(round(kept / round_to)) * round_to))
    return min(channels, max(1, int(round(kept))))


def _unaligned(g: Mapping[str, Any], ratio: float, round_to: int) -> str | None:
    """Why a group cut into blocks by a grouped convolution is kept whole, if no narrower group
    width is a multiple of ``round_to`` while ``ratio`` asks for one."""
    split = g["split"]
    if split < 2 or round_to < 2 or g["channels"] % split:
        return None
    width = g["channels"] // split
    if width > round_to or kept_channels(width, ratio, 1) >= width:
        return None
    return (f"kept whole: its channels meet the grouped convolution '{g['split_by']}' ({split} groups of {width}), "
            f"and no narrower group width is a multiple of round_to={round_to}")


def _layer_plan(model: nn.Module, example: torch.Tensor, ratio: float, layers: Mapping[str, float],
                round_to: int, ignored: set[str]) -> tuple[dict[str, float], dict[str, str]]:
    """Per group root, the ratio that leaves exactly :func:`kept_channels` (a group takes the ratio
    given to any of its layers in ``layers``, else ``ratio``); and the groups that cannot be cut
    aligned, with why.

    A group split by a grouped convolution keeps the same count in every group, a multiple of
    ``round_to``: the group width is what is rounded (see the module's docstring).
    """
    plan, whole = {}, {}
    for root, g in channel_groups(model, example, ignored).items():
        r = next((layers[m] for m in [root, *g["coupled"]] if m in layers), ratio)
        why = _unaligned(g, r, round_to)
        if why is not None:
            whole[root] = why
            continue
        split = g["split"] if g["channels"] % g["split"] == 0 else 1
        kept = split * kept_channels(g["channels"] // split, r, round_to)
        # Torch-Pruning keeps int(n * (1 - ratio)) of each group's n channels: aim half a channel above
        plan[root] = 0.0 if kept >= g["channels"] else 1 - (kept + 0.5) / g["channels"]
    return plan, whole


def _channels(model: nn.Module) -> dict[str, int]:
    out = {}
    for n, m in root_layers(model).items():
        out[n] = m.out_channels if isinstance(m, nn.modules.conv._ConvNd) else m.out_features
    return out


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return (text[0] if text else type(e).__name__)[:200]


def _check_prunable(model: nn.Module, selection: LayerSelection, importance: str,
                    data: Any) -> dict[str, nn.modules.conv._ConvNd | nn.Linear]:
    """The model's root layers, once the selection names only layers it has and ``importance`` can run."""
    roots = root_layers(model)
    if not roots:
        raise SlimkitError("structured pruning removes channels of convolution and linear layers; this model has none.")
    selection.check(roots, what="conv and linear layers")
    if importance == "bn-scale" and not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules()):
        raise ConfigError("'bn-scale' scores channels by the scale of the batch norm after them, and this model has "
                          "no batch norm; use l1, l2 or taylor", field="importance")
    if importance == "taylor" and data is None:
        raise SlimkitError("Taylor importance needs gradients on real training batches: pass data=.")
    return roots


def _kept_whole(model: nn.Module, selection: LayerSelection, example: torch.Tensor) -> dict[str, str]:
    """``{root layer: why}`` of the layers whose output channels are kept: skipped by name, the
    classifier, then those ``filter_fn`` leaves out."""
    _, left_out = selection.resolve(root_layers(model))
    skipped = {n: why for n, why in left_out.items() if why == "skipped by name"}
    head = classifier_of(model, example)
    if head is not None and head not in skipped:
        skipped[head] = "the classifier (its outputs are the classes)"
    skipped.update({n: why for n, why in left_out.items() if n not in skipped})  # then filter_fn's
    return skipped


def prune_channels_(
    model: nn.Module,
    selection: LayerSelection,
    *,
    importance: str,
    round_to: int,
    scope: str,
    example: torch.Tensor,
    data: Any = None,
) -> dict[str, Any]:
    """Remove channels from ``model`` in place (see :class:`slimkit.methods.prune.Structured`).

    ``selection``: the ratio of each layer's output channels removed (``_default``: the ratio of
    every layer without one of its own), the layers skipped and ``filter_fn``.
    """
    roots = _check_prunable(model, selection, importance, data)
    ratio = float(selection.values.get("_default", 0.0))
    layers = selection.explicit(roots)
    skipped = _kept_whole(model, selection, example)
    was_training = model.training
    model.eval()
    with torch.no_grad():
        reference = model(example)
    before_shapes = _shape_snapshot(model)
    before_channels = _channels(model)

    if scope == "layer":  # exact per-group channel counts, rounded to the nearest multiple
        layers, whole = _layer_plan(model, example, ratio, layers, round_to, set(skipped))
        skipped.update(whole)
        ratio, round_to = 0.0, 1
    elif round_to > 1:  # Torch-Pruning rounds each group's width down: a width at round_to has nothing below
        skipped.update(_layer_plan(model, example, ratio, layers, round_to, set(skipped))[1])
    failed: dict[str, str] = {}
    check_each = False  # one forward check at the end; group by group only once something broke
    removed: dict[str, list[int]] = {}
    for _ in range(_MAX_RETRIES):
        trial = copy.deepcopy(model)
        broken = _try_prune(trial, ratio, layers, importance, round_to, scope, example, data,
                            set(skipped) | set(failed), reference.shape, check_each, removed)
        if broken is None:
            break
        if broken[0] is not None:
            failed[broken[0]] = broken[1]
        check_each = True
    else:
        raise SlimkitError(f"structured pruning kept breaking this model ({len(failed)} layers left out: "
                           f"{', '.join(failed)}); prune it unstructured instead.")
    model.__dict__.update({k: v for k, v in trial.__dict__.items() if not k.startswith("_slimkit")})
    model.zero_grad(set_to_none=True)
    model.train(was_training)

    changes = _changes(before_shapes, _shape_snapshot(model))
    if changes:
        record_structure(model, {"op": "prune_channels", "modules": changes})
    after_channels = _channels(model)
    return {
        "channels": {n: [before_channels[n], after_channels.get(n, before_channels[n])] for n in before_channels},
        "pruned_layers": sorted(n for n in before_channels if after_channels.get(n) != before_channels[n]),
        "removed_channels": removed,
        "skipped": {**skipped, **{n: f"cannot be pruned: {why}" for n, why in failed.items()}},
    }


def _try_prune(model: nn.Module, ratio: float, layers: Mapping[str, float], importance: str, round_to: int,
               scope: str, example: torch.Tensor, data: Any, ignored: set[str], out_shape: torch.Size,
               check_each: bool, removed: dict[str, list[int]]) -> tuple[str | None, str] | None:
    """Prune ``model``; ``None`` if it still runs, else ``(root layer of the group that broke it, why)``.

    Without ``check_each`` the model is run once at the end, and a failure names no layer. On
    success ``removed`` receives the output channels removed, by root layer.
    """
    tp = _tp()
    modules = dict(model.named_modules())
    names = {m: n for n, m in modules.items()}
    if importance == "taylor":
        _taylor_gradients(model, data.x_train, data.y_train)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            pruner = tp.pruner.MetaPruner(
                model, example, importance=_importance(importance), pruning_ratio=ratio,
                pruning_ratio_dict={modules[n]: r for n, r in layers.items()},
                ignored_layers=[modules[n] for n in ignored],
                round_to=round_to if round_to > 1 else None,
                global_pruning=scope == "global", max_pruning_ratio=0.9 if scope == "global" else 1.0,
            )
    except Exception as e:
        raise SlimkitError(f"Torch-Pruning cannot trace this model for structured pruning: {_first_line(e)}. "
                           "Prune it unstructured instead.") from None

    def runs() -> None:
        out = model(example)
        if not isinstance(out, torch.Tensor) or out.shape != out_shape:
            raise RuntimeError("the output changed shape to "
                               f"{tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__}")

    scoring: list[Any] = [None]  # the group Torch-Pruning is scoring, to name it if scoring fails
    score = pruner.estimate_importance

    def estimate_importance(group: Any) -> Any:
        scoring[0] = group
        return score(group)

    pruner.estimate_importance = estimate_importance
    steps = pruner.step(interactive=True)
    with torch.no_grad():
        while True:
            try:
                group = next(steps)
            except StopIteration:
                break
            except Exception as e:  # e.g. a grouped convolution with a channel multiplier
                bad = scoring[0]
                return (names.get(bad[0].dep.target.module, "?") if bad is not None else None), _first_line(e)
            root = names.get(group[0].dep.target.module, "?")
            misaligned = _misaligned_groups(group, pruner.DG, names)
            if misaligned:
                return root, misaligned
            try:
                group.prune()
                if check_each:
                    runs()
            except Exception as e:
                return root, _first_line(e)
        if not check_each:
            try:
                runs()
            except Exception as e:
                return None, _first_line(e)
    model.zero_grad(set_to_none=True)
    removed.update({name: sorted(int(i) for i in idxs) for name, is_out, idxs in pruner.DG.pruning_history() if is_out})
    return None


def _misaligned_groups(group: Any, dg: Any, names: dict[nn.Module, str]) -> str | None:
    """Why a group cannot be pruned correctly, if it reaches a grouped convolution out of step.

    Torch-Pruning cuts a grouped convolution's channels by position within its groups, which is
    right only when every group loses the same positions. Channels arriving through a
    concatenation need not line up with the groups, nor need the outputs of convolutions with
    different group counts tied by an add; pruning them would silently scramble which channels
    each group sees.
    """
    for dep, idxs in group:
        mod = dep.target.module
        if not isinstance(mod, nn.modules.conv._ConvNd) or mod.groups == 1:
            continue
        if dg.is_in_channel_pruning_fn(dep.handler) and mod.groups < mod.in_channels:
            channels = mod.in_channels
        elif dg.is_out_channel_pruning_fn(dep.handler) and mod.groups < mod.out_channels:
            channels = mod.out_channels
        else:
            continue
        size = channels // mod.groups
        per_group: list[set[int]] = [set() for _ in range(mod.groups)]
        for i in idxs:
            i = int(getattr(i, "idx", i))
            per_group[i // size].add(i % size)
        if any(g != per_group[0] for g in per_group):
            return (f"its channels reach the grouped convolution '{names.get(mod, '?')}' out of step with its "
                    f"{mod.groups} groups")
    return None


# ----------------------------------------------------------------------------- latency-targeted allocation

#: The latency-targeted allocation removes at most this share of a group's channels.
MAX_TARGET_RATIO = 0.9
#: ... and stops after this many iterations whatever it reached.
MAX_ITERATIONS = 40
#: ... or after this many iterations without a measured speed-up more than STALL_MARGIN above the
#: best so far, going back to that best iteration: on 8x8 digits a resnet at batch 64 stays near
#: 1.4-1.7x however many channels go (the small convolutions are not what its time is spent on),
#: and pruning on to the last channel took its test accuracy from 0.98 to 0.75 for nothing.
STALL_ITERATIONS, STALL_MARGIN = 3, 0.05


def narrower(group: Mapping[str, Any], original: int, round_to: int) -> list[int]:
    """The channel counts a group may be cut to next, widest first: a multiple of ``round_to`` per
    group of a grouped convolution (per layer otherwise), keeping at least ``1 - MAX_TARGET_RATIO``
    of the ``original`` channels. A layer narrower than ``round_to`` steps by whole channels, as
    :func:`kept_channels` rounds it; a grouped one is kept whole (see :func:`_unaligned`).

    >>> narrower({"channels": 50, "split": 1}, 50, 8), narrower({"channels": 6, "split": 1}, 6, 8)
    ([48, 40, 32, 24, 16, 8], [5, 4, 3, 2, 1])
    >>> narrower({"channels": 160, "split": 10}, 160, 8)  # ten groups of 16 -> ten groups of 8
    [80]
    """
    split = group["split"] if group["split"] > 1 and group["channels"] % group["split"] == 0 else 1
    width = group["channels"] // split
    if round_to > 1 and width >= round_to:
        widths = range((width - 1) // round_to * round_to, round_to - 1, -round_to)
    elif split > 1 and round_to > 1:
        widths = range(0)
    else:
        widths = range(width - 1, 0, -1)
    least = max(1, math.ceil(original * (1 - MAX_TARGET_RATIO)))
    return [split * w for w in widths if split * w >= least]


def allocate_latency_(
    model: nn.Module,
    selection: LayerSelection,
    *,
    importance: str,
    round_to: int,
    example: torch.Tensor,
    data: Any,
    reached: Callable[[float, float], bool],
    remaining: Callable[[float, float], float],
    step: float,
    layer_times: Callable[[nn.Module], Mapping[str, float]],
    measure: Callable[[nn.Module, bool], tuple[float, float]],
    accuracy: Callable[[nn.Module], float],
    recover: Callable[[nn.Module], None] | None = None,
) -> dict[str, Any]:
    """Prune ``model`` in place until its measured latency meets a target, NetAdapt-style.

    Each iteration takes a slice of latency (``step`` of the input's time in its layers, or what
    is left to the goal if less) and, for every channel group, the fewest channels whose removal
    saves that slice by the per-layer times measured on the target (a group's time is the time
    of every module whose channels it changes; removing a share of its channels removes that
    share of it). Each such candidate is pruned on a copy (the other groups untouched) and its
    ``accuracy`` taken without fine-tuning; the most accurate candidate that saves the whole slice
    is kept (when none can, the one losing the least accuracy per unit of time saved). The model
    is then timed (``measure``) and profiled again, until ``reached`` says the target is met, no
    group can lose more channels (at most :data:`MAX_TARGET_RATIO` of them, aligned as
    :func:`narrower` says), :data:`MAX_ITERATIONS` have run, or :data:`STALL_ITERATIONS` in a
    row bought no measured speed-up (then the model goes back to the fastest iteration).

    Callbacks: ``layer_times(m)`` per-module times of ``m`` on the target; ``measure(m, first)``
    ``(latency in ms, speed-up over the input)`` of ``m`` (``first``: ``m`` is the input, timed
    alone); ``reached(latency_ms, speedup)``; ``remaining(latency_ms, speedup)`` the share of
    the current latency still to remove; ``accuracy(m)`` validation accuracy; ``recover(m)``, if
    given, fine-tunes the kept cut briefly before the next iteration scores its candidates
    (NetAdapt's short-term fine-tune). ``selection``: its ``skip`` and ``filter_fn`` (ratios are
    chosen here). Returns ``iterations`` (the layer cut, its channels, the estimated and the
    measured latency, the speed-up and the accuracy after each, and after ``recover``),
    ``ratios`` (the share of each group root's channels removed), ``stopped`` (why it stopped)
    and the engine's report (``channels``, ``pruned_layers``, ``skipped``).
    """
    _check_prunable(model, selection, importance, data)
    skipped = _kept_whole(model, selection, example)
    before_channels = _channels(model)
    current = copy.deepcopy(model).eval()
    latency, speedup = measure(current, True)
    accuracy_now = accuracy(current)
    iterations: list[dict[str, Any]] = [{"iteration": 0, "layer": None, "estimated_ms": round(latency, 4),
                                        "measured_ms": round(latency, 4), "speedup": 1.0,
                                        "accuracy": round(accuracy_now, 4)}]
    stopped = "nothing more can be pruned"
    if reached(latency, speedup):
        stopped = "the input already meets the target"
    else:
        times = dict(layer_times(current))
        first_total = sum(times.values())
        best = (speedup, 0, current)  # the fastest iteration measured so far
        for i in range(1, MAX_ITERATIONS + 1):
            total = sum(times.values())
            scale = latency / max(total, 1e-12)  # ms of latency per unit of layer time
            cut = max(min(remaining(latency, speedup) * total, step * first_total), 1e-12)
            pick = _best_cut(current, example, skipped, before_channels, times, cut, accuracy_now,
                             importance=importance, round_to=round_to, data=data, accuracy=accuracy)
            if pick is None:
                break
            root, channels, kept, estimate, accuracy_now, current = pick
            row: dict[str, Any] = {"iteration": i, "layer": root, "channels": [channels, kept],
                                   "estimated_ms": round(latency - estimate * scale, 4),
                                   "accuracy": round(accuracy_now, 4)}
            said = f"accuracy {accuracy_now:.4f}"
            if recover is not None:  # before timing: the file timed is the one profiled next
                recover(current)
                accuracy_now = accuracy(current)
                row["recovered_accuracy"] = round(accuracy_now, 4)
                said += f" ({accuracy_now:.4f} recovered)"
            latency, speedup = measure(current, False)
            row.update(measured_ms=round(latency, 4), speedup=round(speedup, 4))
            iterations.append(row)
            _console.info(f"  iteration {i}: {root} {channels} -> {kept} channels: {latency:.3f} ms "
                          f"(estimated {row['estimated_ms']:.3f}), {speedup:.2f}x, {said}")
            if reached(latency, speedup):
                stopped = "target reached"
                break
            if speedup > best[0] * (1 + STALL_MARGIN):
                best = (speedup, i, current)
            elif i - best[1] >= STALL_ITERATIONS:
                stopped = (f"no faster than iteration {best[1]} ({best[0]:.2f}x) in {STALL_ITERATIONS} more "
                           f"iterations: kept iteration {best[1]}")
                current = best[2]
                break
            times = dict(layer_times(current))
        else:
            stopped = f"stopped after {MAX_ITERATIONS} iterations"

    was_training = model.training
    model.__dict__.update(current.__dict__)  # the pruned modules and their recorded structure
    model.zero_grad(set_to_none=True)
    model.train(was_training)
    after_channels = _channels(model)
    return {
        "iterations": iterations,
        "stopped": stopped,
        "ratios": {n: round(1 - after_channels[n] / c, 4) for n, c in before_channels.items()
                   if after_channels.get(n, c) != c},
        "channels": {n: [c, after_channels.get(n, c)] for n, c in before_channels.items()},
        "pruned_layers": sorted(n for n, c in before_channels.items() if after_channels.get(n) != c),
        "skipped": skipped,
    }


def _best_cut(current: nn.Module, example: torch.Tensor, skipped: dict[str, str], original: Mapping[str, int],
              times: Mapping[str, float], cut: float, accuracy_now: float, *, importance: str, round_to: int,
              data: Any, accuracy: Callable[[nn.Module], float]) -> tuple[Any, ...] | None:
    """One NetAdapt iteration: per group, the fewest channels saving ``cut`` of layer time (or all it
    may lose), pruned on a copy and scored by accuracy; the best as ``(root, channels, kept, estimated
    saving, accuracy, the pruned copy)``, or ``None`` when no group can lose more.
    A group whose pruning fails is added to ``skipped``."""
    scored = []
    groups = channel_groups(current, example, set(skipped))
    for root, g in groups.items():
        options = narrower(g, original.get(root, g["channels"]), round_to)
        spent = sum(times.get(n, 0.0) for n in g["touched"])
        if not options or spent <= 0:
            continue
        c = g["channels"]
        kept = next((k for k in options if (1 - k / c) * spent >= cut), options[-1])
        trial = copy.deepcopy(current)
        others = [n for n in groups if n != root]  # left as they are (ratio 0 would align them to round_to)
        result = prune_channels_(trial, LayerSelection({root: 1 - kept / c}, skip=others), importance=importance,
                                 round_to=round_to, scope="layer", example=example, data=data)
        if root not in result["pruned_layers"]:
            skipped[root] = result["skipped"].get(root, "cannot be pruned")
            continue
        estimate = (1 - kept / c) * spent
        acc = accuracy(trial)
        scored.append((estimate >= cut * (1 - 1e-9), acc, estimate, root, c, kept, trial))
    if not scored:
        return None
    whole = [s for s in scored if s[0]]
    if whole:  # NetAdapt: the most accurate of the candidates that save the slice (then the one saving more)
        best = max(whole, key=lambda s: (s[1], s[2]))
    else:  # none can: the least accuracy lost per unit of time saved
        best = min(scored, key=lambda s: (max(0.0, accuracy_now - s[1]) / s[2], -s[2]))
    _, acc, estimate, root, c, kept, trial = best
    return root, c, kept, estimate, acc, trial
