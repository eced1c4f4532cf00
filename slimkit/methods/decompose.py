"""Low-rank decomposition: truncated SVD of linear layers, Tucker-2 and CP of convolutions.

``decompose_(model, LowRank(...))`` replaces, in place, each linear layer by two thinner ones
(truncated SVD) and each dense convolution by a chain of smaller ones:

- **SVD** (linear layers and 1x1 convolutions): ``W ~ B A`` with ``A`` of shape ``(r, in)`` and
  ``B`` of shape ``(out, r)``: one layer becomes two.
- **Tucker-2** (kxk convolutions, Kim et al. 2016): ``W ~ core x0 U_out x1 U_in``:
  1x1 conv (``C_in -> r_in``) -> kxk conv (``r_in -> r_out``) -> 1x1 conv (``r_out -> C_out``).
- **CP** (kxk convolutions, Lebedev et al. 2015, with the two spatial modes kept together):
  ``W[o, i, :, :] ~ sum_r A[o, r] B[i, r] K[r, :, :]``: 1x1 conv (``C_in -> R``) -> depthwise kxk
  conv (``R`` channels) -> 1x1 conv (``R -> C_out``).

Tucker-2 and CP are computed with TensorLy (pytorch backend), SVD with ``torch.linalg``. The rank
of each layer comes from a retained-energy threshold (``energy``: the fraction of the weight's
squared norm the low-rank layer keeps, ``1 - relative_error**2``), a rank ``ratio``, or an
explicit rank per layer (``ranks``). A layer is replaced only when the replacement has fewer
parameters *and* fewer MACs than the original (``only_if_smaller``). The report records, per
layer, the rank, the relative reconstruction error and the parameters and MACs before/after.

>>> import torch
>>> from slimkit.models import create_model
>>> model = create_model("lenet300", input_shape=(1, 28, 28), num_classes=10)
>>> report = decompose_(model, LowRank(ratio=0.2, skip=["fc3"]), example=torch.zeros(1, 1, 28, 28))
>>> [row["name"] for row in report["layers"] if row["replaced"]]
['fc1', 'fc2']
>>> type(model.fc1).__name__
'LowRankLinear'

Follow a decomposition with ``finetune`` (or ``distill``) in a recipe: the low-rank layers are
trained further, taught by the original model.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, field
from typing import Any, cast

import torch
from torch import nn

from ..config import check
from ..errors import ConfigError
from ..layers import FilterFn, LayerSelection
from ..models import record_structure, register_structure_op, set_module
from ..pipeline import Context, check_if_slower, register_space, register_step
from ._replace import HAS_NO, Layer, Site, conv_geometry, example_for, replace_layers_, run_replacing

__all__ = [
    "LowRank",
    "decompose_",
    "LowRankLinear",
    "LowRankConv2d",
    "Tucker2Conv2d",
    "CPConv2d",
    "Factorized",
]

CONV_METHODS = ("tucker2", "cp", "none")
LINEAR_METHODS = ("svd", "none")
_AUTO = "auto"  # the rank of a layer without one of its own in ``ranks``: from ``ratio`` or ``energy``

Rank = int | list[int]  # one rank (SVD, CP) or [r_out, r_in] (Tucker-2)


def _one_rank(rank: Rank | None) -> int:
    """The single rank of an SVD or CP factorization."""
    if rank is None or isinstance(rank, list):
        raise TypeError(f"expected one integer rank, got {rank!r}")
    return int(rank)


def _two_ranks(rank: Rank | None) -> tuple[int, int]:
    """The ``(r_out, r_in)`` ranks of a Tucker-2 factorization."""
    if rank is None or isinstance(rank, int):
        raise TypeError(f"expected [r_out, r_in], got {rank!r}")
    r_out, r_in = rank
    return int(r_out), int(r_in)


@dataclass
class LowRank:
    """Low-rank decomposition: truncated SVD of linear layers, Tucker-2 or CP of convolutions.

    ``conv``: ``tucker2``, ``cp`` or ``none``; ``linear``: ``svd`` or ``none``. The rank of each
    layer: ``ranks[name]`` when given (a name, glob or family key, as in
    :class:`slimkit.layers.LayerSelection`; an int, for Tucker-2 also ``[r_out, r_in]``; ``null``
    leaves the layer alone), else ``ratio`` times the full rank when ``ratio`` is set
    (``min(out, in)``; Tucker-2: each of ``C_out``, ``C_in``; CP: ``min(C_out, C_in)``), else the
    smallest rank that keeps ``energy`` of the weight's squared norm. ``skip``: layer names, globs
    or blocks left alone. ``only_if_smaller``: replace a layer only when that reduces both
    its parameters and its MACs. ``iterations``: Tucker-2 (HOOI) / CP (ALS) iterations. ``if_slower``: when the model after the step is slower on the target than before it
    (timed side by side), ``revert`` it (the default) or ``keep`` it anyway.
    The layers that are slower than the ones they replaced, timed alone, are given back first.
    """

    conv: str = "tucker2"
    linear: str = "svd"
    energy: float = 0.9
    ratio: float | None = None
    ranks: dict[str, Rank | None] = field(default_factory=dict)
    skip: list[str] = field(default_factory=list)
    only_if_smaller: bool = True
    iterations: int = 20
    if_slower: str = "revert"

    def __post_init__(self) -> None:
        check(self.conv in CONV_METHODS, "conv", f"got '{self.conv}'; choose one of {', '.join(CONV_METHODS)}")
        check(self.linear in LINEAR_METHODS, "linear",
              f"got '{self.linear}'; choose one of {', '.join(LINEAR_METHODS)}")
        check(0 < self.energy <= 1, "energy",
              f"must be in (0, 1] (the fraction of each weight's squared norm to keep), got {self.energy}")
        check(self.ratio is None or 0 < self.ratio <= 1, "ratio",
              f"must be in (0, 1] (rank as a fraction of the full rank) or null, got {self.ratio}")
        check(self.iterations >= 1, "iterations", f"must be >= 1, got {self.iterations}")
        check_if_slower(self.if_slower)
        for name, rank in self.ranks.items():
            ok = rank is None or (isinstance(rank, int) and rank >= 1) or (
                isinstance(rank, (list, tuple)) and len(rank) == 2 and all(isinstance(r, int) and r >= 1 for r in rank))
            check(ok, "ranks", f"ranks['{name}'] = {rank!r}: give a rank >= 1, [r_out, r_in] for Tucker-2, "
                               "or null to leave the layer alone")


# ----------------------------------------------------------------------------- the replacement modules


class Factorized(nn.Sequential):
    """A layer replaced by a chain of smaller ones; never decomposed again."""


class LowRankLinear(Factorized):
    """``Linear(in, out)`` of rank ``r`` as ``Linear(in, r, bias=False) -> Linear(r, out)``."""

    def __init__(self, in_features: int, out_features: int, rank: int, bias: bool = True):
        super().__init__(nn.Linear(in_features, rank, bias=False), nn.Linear(rank, out_features, bias=bias))


class LowRankConv2d(Factorized):
    """A 1x1 convolution of rank ``r`` as two 1x1 convolutions (the first keeps stride and padding)."""

    def __init__(self, conv: nn.Conv2d, rank: int):
        _, stride, padding, _ = conv_geometry(conv)
        super().__init__(
            nn.Conv2d(conv.in_channels, rank, 1, stride, padding, bias=False),
            nn.Conv2d(rank, conv.out_channels, 1, bias=conv.bias is not None),
        )


class Tucker2Conv2d(Factorized):
    """Tucker-2: 1x1 (``C_in -> r_in``) -> kxk core (``r_in -> r_out``) -> 1x1 (``r_out -> C_out``)."""

    def __init__(self, conv: nn.Conv2d, r_out: int, r_in: int):
        super().__init__(
            nn.Conv2d(conv.in_channels, r_in, 1, bias=False),
            nn.Conv2d(r_in, r_out, *conv_geometry(conv), bias=False),
            nn.Conv2d(r_out, conv.out_channels, 1, bias=conv.bias is not None),
        )


class CPConv2d(Factorized):
    """CP of rank ``R``: 1x1 (``C_in -> R``) -> depthwise kxk (``R`` channels) -> 1x1 (``R -> C_out``)."""

    def __init__(self, conv: nn.Conv2d, rank: int):
        super().__init__(
            nn.Conv2d(conv.in_channels, rank, 1, bias=False),
            nn.Conv2d(rank, rank, *conv_geometry(conv), groups=rank, bias=False),
            nn.Conv2d(rank, conv.out_channels, 1, bias=conv.bias is not None),
        )


def _build(kind: str, layer: nn.Module, rank: Rank) -> Factorized:
    """The empty replacement module for ``layer`` (shapes only; weights are set or loaded later)."""
    if kind == "svd" and isinstance(layer, nn.Linear):
        return LowRankLinear(layer.in_features, layer.out_features, _one_rank(rank), layer.bias is not None)
    conv = cast(nn.Conv2d, layer)  # every other decomposition is of a convolution
    if kind == "svd":
        return LowRankConv2d(conv, _one_rank(rank))
    if kind == "tucker2":
        return Tucker2Conv2d(conv, *_two_ranks(rank))
    if kind == "cp":
        return CPConv2d(conv, _one_rank(rank))
    raise ValueError(f"unknown decomposition '{kind}'")


@register_structure_op("lowrank")
def _replay_lowrank(model: nn.Module, op: dict[str, Any]) -> None:
    layer = model.get_submodule(op["layer"])
    set_module(model, op["layer"], _build(op["kind"], layer, op["rank"]))


# ----------------------------------------------------------------------------- layer cost


def _positions(shape: tuple[int, ...]) -> int:
    """Spatial positions of a conv feature map ``(C, H, W)``, or rows of a linear input ``(..., F)``."""
    return math.prod(shape[1:]) if len(shape) == 3 else math.prod(shape[:-1])


def _cost(kind: str, site: Site, rank: Rank | None) -> tuple[int, int]:
    """(parameters, MACs per example) of the layer at ``site`` as it is (``kind='dense'``) or decomposed."""
    m = site.module
    bias = m.bias.numel() if m.bias is not None else 0
    if isinstance(m, nn.Linear):
        rows = _positions(site.in_shape)
        if kind == "dense":
            return m.in_features * m.out_features + bias, rows * m.in_features * m.out_features
        w = _one_rank(rank) * (m.in_features + m.out_features)
        return w + bias, rows * w
    c_out, c_in_g, kh, kw = m.weight.shape
    c_in = m.in_channels
    hw_in, hw_out = _positions(site.in_shape), _positions(site.out_shape)
    if kind == "dense":
        w = c_out * c_in_g * kh * kw
        return w + bias, hw_out * w
    if kind == "svd":  # both 1x1 convs run at the output resolution
        r = _one_rank(rank)
        return r * (c_in + c_out) + bias, hw_out * r * (c_in + c_out)
    if kind == "tucker2":
        r_out, r_in = _two_ranks(rank)
        core = r_out * r_in * kh * kw
        return (c_in * r_in + core + r_out * c_out + bias,
                hw_in * c_in * r_in + hw_out * (core + r_out * c_out))
    r = _one_rank(rank)  # cp
    return (r * (c_in + kh * kw + c_out) + bias,
            hw_in * c_in * r + hw_out * r * (kh * kw + c_out))


# ----------------------------------------------------------------------------- the factorizations


def _energy_rank(s: torch.Tensor, energy: float) -> int:
    """Smallest ``r`` whose ``r`` largest singular values keep ``energy`` of ``sum(s**2)``."""
    e = s.double() ** 2
    total = float(e.sum())
    if total == 0.0:
        return 1
    kept = torch.cumsum(e, 0) / total
    return min(len(s), int((kept < energy - 1e-12).sum()) + 1)


def _rel_error(w: torch.Tensor, approx: torch.Tensor) -> float:
    norm = float(w.norm())
    return float((w - approx).norm()) / norm if norm else 0.0


def _svd(w2: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor, float]:
    """``w2 (out, in) ~ b @ a`` with ``a (r, in)``, ``b (out, r)``; singular values split evenly."""
    u, s, vh = torch.linalg.svd(w2.double(), full_matrices=False)
    root = s[:rank].sqrt()
    a = root[:, None] * vh[:rank]  # (r, in)
    b = u[:, :rank] * root  # (out, r)
    total = float((s**2).sum())
    err = math.sqrt(max(float((s[rank:] ** 2).sum()), 0.0) / total) if total else 0.0
    return a, b, err


def _tucker2(w: torch.Tensor, r_out: int, r_in: int, iterations: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, float]:
    """Tucker-2 of ``w (C_out, C_in, kh, kw)`` on its two channel modes (TensorLy, HOOI from HOSVD)."""
    import tensorly as tl
    from tensorly.decomposition import partial_tucker

    w64 = w.double()
    with tl.backend_context("pytorch"), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        (core, (u_out, u_in)), _ = partial_tucker(w64, rank=[r_out, r_in], modes=[0, 1], init="svd",
                                                  n_iter_max=iterations, tol=1e-7)
        approx = tl.tenalg.multi_mode_dot(core, [u_out, u_in], modes=[0, 1])
    return core, u_out, u_in, _rel_error(w64, approx)


def _cp(w: torch.Tensor, rank: int, iterations: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, float]:
    """CP of ``w (C_out, C_in, kh, kw)`` seen as ``(C_out, C_in, kh*kw)`` (TensorLy ALS, seeded)."""
    import tensorly as tl
    from tensorly.decomposition import parafac

    c_out, c_in, kh, kw = w.shape
    w3 = w.double().reshape(c_out, c_in, kh * kw)  # (C_out, C_in, kh*kw)
    with tl.backend_context("pytorch"), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        cp = parafac(w3, rank=rank, init="svd", n_iter_max=max(iterations, 50), tol=1e-8, random_state=0,
                     normalize_factors=True)
        approx = tl.cp_to_tensor(cp)
    weights, (a, b, k) = cp.weights, cp.factors
    scale = weights.abs().clamp_min(1e-30) ** (1 / 3)  # share each component's weight among its three factors
    sign = torch.where(weights < 0, -1.0, 1.0).to(weights)
    return a * scale * sign, b * scale, k * scale, _rel_error(w3, approx)


# ----------------------------------------------------------------------------- rank choice


def _full_rank(kind: str, m: Layer) -> Rank:
    if isinstance(m, nn.Linear):
        return min(m.in_features, m.out_features)
    if kind == "svd":
        return min(m.in_channels, m.out_channels)
    if kind == "tucker2":
        return [m.out_channels, m.in_channels]
    kh, kw = m.kernel_size
    a, b, c = m.out_channels, m.in_channels, kh * kw
    return min(a * b, a * c, b * c)  # no CP rank above this is ever needed


def _check_explicit(name: str, kind: str, m: Layer, rank: Rank) -> Rank:
    full = _full_rank(kind, m)
    if kind == "tucker2":
        r_out, r_in = (rank, rank) if isinstance(rank, int) else rank
        full_out, full_in = _two_ranks(full)
        if r_out > full_out or r_in > full_in:
            raise ConfigError(
                f"ranks['{name}'] = {rank!r} is larger than the layer allows: Tucker-2 ranks of its "
                f"{tuple(m.weight.shape)} weight are at most [{full_out}, {full_in}] ([C_out, C_in])",
                field="ranks")
        return [int(r_out), int(r_in)]
    if not isinstance(rank, int):
        raise ConfigError(f"ranks['{name}'] = {rank!r}: {kind.upper()} takes one integer rank ([r_out, r_in] is "
                          "for Tucker-2 convolutions)", field="ranks")
    if rank > _one_rank(full):
        what = "min(out, in)" if kind == "svd" else "min of the products of its mode sizes"
        raise ConfigError(
            f"ranks['{name}'] = {rank} is larger than the matrix: the {tuple(m.weight.shape)} weight has rank at "
            f"most {full} ({what})", field="ranks")
    return rank


def _kind_of(m: nn.Module, cfg: LowRank) -> tuple[str | None, str]:
    """The decomposition for module ``m`` under ``cfg`` (None: not decomposable, with the reason)."""
    if isinstance(m, nn.Linear):
        return ("svd", "") if cfg.linear == "svd" else (None, "linear: none")
    if isinstance(m, nn.Conv2d):
        if m.groups != 1:
            return None, "grouped convolution"
        if m.padding_mode != "zeros":
            return None, f"padding_mode '{m.padding_mode}'"
        if cfg.conv == "none":
            return None, "conv: none"
        if m.kernel_size == (1, 1):
            return "svd", ""
        return cfg.conv, ""
    return None, f"{type(m).__name__} is not a linear or Conv2d layer"


def _largest_smaller_rank(kind: str, site: Site, full: int) -> int:
    """The largest rank whose layer still has fewer params and MACs than the dense one (0: none)."""
    params, macs = _cost("dense", site, None)
    lo, hi = 0, full
    while lo < hi:  # cost grows with the rank: bisect
        mid = (lo + hi + 1) // 2
        p, m = _cost(kind, site, mid)
        if p < params and m < macs:
            lo = mid
        else:
            hi = mid - 1
    return lo


# ----------------------------------------------------------------------------- the verb


def decomposable_layers(model: nn.Module) -> list[str]:
    """Names of the linear and ``Conv2d`` layers outside already factorized blocks."""
    out: list[str] = []
    inside: list[str] = []
    for name, m in model.named_modules():
        if any(name.startswith(p + ".") for p in inside):
            continue
        if isinstance(m, Factorized):
            inside.append(name)
        elif isinstance(m, (nn.Linear, nn.Conv2d)):
            out.append(name)
    return out


def decompose_(
    model: nn.Module,
    config: LowRank | None = None,
    *,
    example: torch.Tensor | None = None,
    filter_fn: FilterFn | None = None,
) -> dict[str, Any]:
    """Replace the model's linear and convolution layers by low-rank chains, in place.

    ``example``: an input batch (default: zeros of the model's recorded input shape), used to
    find each layer's feature-map size for its MACs. ``filter_fn(module, name)``: return False to
    leave a layer alone. Returns ``layers`` (per layer: ``name``, ``kind``, ``replaced``,
    ``rank``, ``rel_error``, ``params_before/after``, ``macs_before/after``, and ``reason`` when
    left alone), ``replaced`` (how many) and the model's ``params_before/after`` and
    ``macs_before/after``.

    >>> from slimkit.models import load_model
    >>> model = load_model("zoo:resnet", input_shape=(1, 28, 28), num_classes=10)  # records its input shape
    >>> report = decompose_(model, LowRank(conv="tucker2", ratio=0.5))
    >>> report["macs_after"] < report["macs_before"]
    True
    """
    cfg = config or LowRank()
    x = example_for(model, example)
    modules = dict(model.named_modules())
    candidates = {n: modules[n] for n in decomposable_layers(model)}
    selection = LayerSelection({"_default": _AUTO, **cfg.ranks}, skip=cfg.skip, filter_fn=filter_fn)
    selection.check([n for n in modules if n], what="decomposable layers", field="ranks", unknown=HAS_NO,
                    unmatched=HAS_NO, shown=list(candidates))
    for name in cfg.ranks:
        if name in modules and name not in candidates:
            raise ConfigError(f"ranks['{name}']: '{name}' is a {type(modules[name]).__name__}, "
                              f"not a linear or Conv2d layer that can be decomposed", field="ranks")
    explicit: dict[str, Rank] = {}
    for name, rank in selection.explicit(candidates).items():  # checked before any layer changes
        kind, why = _kind_of(candidates[name], cfg)
        if rank is None:
            continue
        if kind is None:
            raise ConfigError(f"ranks['{name}']: this layer cannot be decomposed ({why})", field="ranks")
        explicit[name] = _check_explicit(name, kind, cast(Layer, candidates[name]), rank)  # it has a kind
    todo = list(selection.resolve(candidates)[0])
    return replace_layers_(model, x, todo, lambda name, module, site: _decompose_layer(
        model, name, module, site, cfg, explicit.get(name)), label="decompose", noun="layers")


def _decompose_layer(model: nn.Module, name: str, m: nn.Module, site: Site | None, cfg: LowRank,
                     rank: Rank | None) -> dict[str, Any]:
    kind, why = _kind_of(m, cfg)
    row: dict[str, Any] = {"name": name, "kind": kind, "replaced": False}
    if kind is None:
        return {**row, "reason": why}
    layer = cast(Layer, m)  # _kind_of gives a kind to linear and Conv2d layers only
    if site is None:
        return {**row, "reason": "not called exactly once by the model's forward"}
    params, macs = _cost("dense", site, None)
    row.update(params_before=params, macs_before=macs)
    w = layer.weight.detach()
    if rank is None:
        rank = _auto_rank(kind, layer, w, site, cfg)
        if rank is None:
            return {**row, "reason": f"energy {cfg.energy} needs a CP rank at which the layer is no smaller"}
    p_after, m_after = _cost(kind, site, rank)
    if cfg.only_if_smaller and not (p_after < params and m_after < macs):
        return {**row, "rank": rank, "params_after": p_after, "macs_after": m_after,
                "reason": f"rank {rank} would not reduce both parameters and MACs"}
    new, err = _factorize(kind, layer, w, rank, cfg)
    set_module(model, name, new)
    record_structure(model, {"op": "lowrank", "layer": name, "kind": kind, "rank": rank})
    return {**row, "replaced": True, "rank": rank, "rel_error": round(err, 6), "params_after": p_after,
            "macs_after": m_after}


def _auto_rank(kind: str, m: Layer, w: torch.Tensor, site: Site, cfg: LowRank) -> Rank | None:
    """The rank from ``ratio`` (when set) or ``energy``; None when CP cannot reach the energy while smaller."""
    if kind == "tucker2":
        c_out, c_in = w.shape[:2]
        if cfg.ratio is not None:
            return [max(1, round(cfg.ratio * c_out)), max(1, round(cfg.ratio * c_in))]
        s_out = torch.linalg.svdvals(w.double().reshape(c_out, -1))  # mode-0 unfolding (C_out, C_in*kh*kw)
        s_in = torch.linalg.svdvals(w.double().transpose(0, 1).reshape(c_in, -1))  # mode-1 (C_in, C_out*kh*kw)
        return [_energy_rank(s_out, cfg.energy), _energy_rank(s_in, cfg.energy)]
    if kind == "svd":
        if cfg.ratio is not None:
            return max(1, round(cfg.ratio * _one_rank(_full_rank(kind, m))))
        return _energy_rank(torch.linalg.svdvals(w.double().reshape(w.shape[0], -1)), cfg.energy)
    # cp
    conv = cast(nn.Conv2d, m)  # CP is of convolutions only
    if cfg.ratio is not None:
        return max(1, round(cfg.ratio * min(conv.out_channels, conv.in_channels)))
    full = _one_rank(_full_rank(kind, conv))
    r_max = _largest_smaller_rank(kind, site, full) if cfg.only_if_smaller else full
    return _cp_energy_rank(w, cfg.energy, r_max, cfg.iterations) if r_max else None


def _cp_energy_rank(w: torch.Tensor, energy: float, r_max: int, iterations: int) -> int | None:
    """Smallest CP rank (searched: doubling, then two bisection steps) with ``1 - err**2 >= energy``."""
    allowed = math.sqrt(max(1.0 - energy, 0.0))
    r, failed = max(1, r_max // 16), 0
    while _cp(w, r, iterations)[3] > allowed:
        failed = r
        if r >= r_max:
            return None
        r = min(r_max, 2 * r)
    for _ in range(2):
        if r - failed <= 1:
            break
        mid = (failed + r) // 2
        if _cp(w, mid, iterations)[3] <= allowed:
            r = mid
        else:
            failed = mid
    return r


def _factorize(kind: str, m: Layer, w: torch.Tensor, rank: Rank, cfg: LowRank) -> tuple[Factorized, float]:
    """The replacement for ``m`` with weights that approximate ``w``, and its relative error."""
    new = _build(kind, m, rank).to(w.device)
    dtype = w.dtype
    weights = [cast(Layer, layer).weight for layer in new]  # the chain's linear / conv layers
    with torch.no_grad():
        if kind == "svd":
            a, b, err = _svd(w.reshape(w.shape[0], -1), _one_rank(rank))  # (out, in) for 1x1 convs too
            weights[0].copy_(a.reshape(weights[0].shape).to(dtype))
            weights[1].copy_(b.reshape(weights[1].shape).to(dtype))
        elif kind == "tucker2":
            core, u_out, u_in, err = _tucker2(w, *_two_ranks(rank), cfg.iterations)
            weights[0].copy_(u_in.t()[:, :, None, None].to(dtype))  # (r_in, C_in, 1, 1)
            weights[1].copy_(core.to(dtype))  # (r_out, r_in, kh, kw)
            weights[2].copy_(u_out[:, :, None, None].to(dtype))  # (C_out, r_out, 1, 1)
        else:
            a, b, k, err = _cp(w, _one_rank(rank), cfg.iterations)
            kh, kw = w.shape[2:]
            weights[0].copy_(b.t()[:, :, None, None].to(dtype))  # (R, C_in, 1, 1)
            weights[1].copy_(k.t().reshape(-1, 1, kh, kw).to(dtype))  # (R, 1, kh, kw)
            weights[2].copy_(a[:, :, None, None].to(dtype))  # (C_out, R, 1, 1)
        if m.bias is not None:
            new[-1].bias.copy_(m.bias.detach())
    new.train(m.training)
    return new, err


# ----------------------------------------------------------------------------- recipe step and search space


@register_step("decompose", LowRank, forbids={"exported", "quantized", "fake_quant", "masked"}, reports_speed=True)
def _decompose_step(ctx: Context, cfg: LowRank) -> dict[str, Any]:
    """Low-rank decomposition of the model's layers; follow it with finetune or distill."""
    return run_replacing(ctx, decompose_, cfg, "decompose")


@register_space("decompose", order=20)
def _decompose_space(trial: Any) -> LowRank | None:
    if not trial.suggest_categorical("decompose.on", [True, False]):
        return None
    return LowRank(conv=trial.suggest_categorical("decompose.conv", ["tucker2", "cp"]),
                   energy=trial.suggest_float("decompose.energy", 0.5, 0.95))
