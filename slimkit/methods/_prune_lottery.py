"""Lottery tickets: iterative magnitude pruning with weight rewinding, and its random control.

Frankle & Carbin (2019) train a network, prune the smallest weights, reset the survivors to
their initial values and train again; the sparse "winning ticket" matches the dense network
where a randomly re-initialised network with the same mask does not. Frankle et al.
("Stabilizing the Lottery Ticket Hypothesis", 2019) rewind to the weights of an early epoch
instead of the initialisation. Each round here:

1. prunes ``rate`` of the remaining weights by magnitude (of the previous round's trained ticket);
2. rewinds the survivors to their values after ``rewind_epoch`` epochs and trains the
   remaining ``epochs - rewind_epoch`` epochs with the mask held (the ticket);
3. trains the same mask from a fresh random initialisation for all ``epochs`` (the control).
"""

from __future__ import annotations

import copy
import dataclasses
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .. import _console, _io
from ..config import check
from ..data import DataBundle, resolve_data
from ..errors import ConfigError
from ..models import ModelRef, resolve_model, save_model
from ..pipeline import AccuracyVerdict, check_max_drop
from ..training import TrainConfig, evaluate, fit
from ._prune_masks import MaskHook, apply_masks_, compute_masks_, masks_of, prunable_layers, set_masks, sparsity_report


@dataclass
class LotteryResult:
    """What :func:`lottery` returns: the final trained ticket (zeros where pruned) and the report."""

    model: nn.Module
    report: dict[str, Any]


class _Snapshot:
    """A fit hook that keeps a copy of the weights at the end of epoch ``epoch``."""

    def __init__(self, epoch: int):
        self.epoch = epoch
        self.state: dict[str, torch.Tensor] | None = None

    def on_epoch_end(self, model: nn.Module, epoch: int, val_accuracy: float) -> None:
        if epoch == self.epoch:
            self.state = copy.deepcopy(model.state_dict())


def _reinit_(model: nn.Module) -> None:
    """Fresh random weights for every layer that can reset itself (the random-reinit control)."""
    for m in model.modules():
        if m is not model and hasattr(m, "reset_parameters"):
            m.reset_parameters()


@dataclass(frozen=True)
class LotteryConfig:
    """The pruning rounds of :func:`lottery`.

    ``rounds`` of pruning ``rate`` of the remaining weights (``scope`` ``global``: one
    magnitude threshold; ``layer``: each layer loses the same fraction), so ``(1 - rate) **
    rounds`` of the weights remain at the end. ``rewind_epoch``: the epoch whose weights a
    ticket rewinds to (0: the initialisation). ``control``: also train the random-reinit
    control each round.

    >>> LotteryConfig(rounds=2, rate=0.5).rate
    0.5
    """

    rounds: int = 8
    rate: float = 0.2
    rewind_epoch: int = 1
    scope: str = "global"
    control: bool = True

    def __post_init__(self) -> None:
        check(self.rounds >= 1, "rounds", f"must be >= 1, got {self.rounds}")
        check(0 < self.rate < 1, "rate",
              f"must be in (0, 1) (the fraction of remaining weights pruned each round), got {self.rate}")
        check(self.rewind_epoch >= 0, "rewind_epoch", f"must be >= 0, got {self.rewind_epoch}")
        check(self.scope in ("global", "layer"), "scope", f"got '{self.scope}'; choose one of global, layer")


def lottery(
    model: nn.Module | str | ModelRef,
    data: DataBundle | str = "digits",
    config: LotteryConfig | None = None,
    *,
    train: TrainConfig | None = None,
    out: str | Path | None = None,
    overwrite: bool = False,
    max_accuracy_drop: float | None = 0.01,
) -> LotteryResult:
    """Iterative magnitude pruning with weight rewinding, plus the random-reinit control each round.

    ``config``: the rounds, the rate, the rewind epoch, the scope and the control
    (:class:`LotteryConfig`). ``train``: how every network trains; its ``epochs`` is the full
    training budget (a ticket trains ``epochs - rewind_epoch``) and its ``seed`` seeds the
    split, the initialisation and the training. The model starts from its random
    initialisation (seeded), or from its weights (a :class:`~slimkit.models.ModelRef`).

    With ``out``: ``lottery.json`` (per round: fraction of weights remaining, test accuracy of
    the ticket and of the control), ``lottery.png``, ``model.safetensors`` (the final trained
    ticket) and ``ticket.safetensors`` (the final mask applied to the rewound weights: the
    ticket before training). ``report["accuracy"]`` judges the final ticket against the dense
    network; past ``max_accuracy_drop`` (a fraction; ``None``: no limit) ``report["within_budget"]``
    is false (the files are still written).

    >>> res = lottery("zoo:lenet300", "digits", LotteryConfig(rounds=2, rewind_epoch=0),
    ...               train=TrainConfig(epochs=2))  # doctest: +SKIP
    >>> [r["remaining"] for r in res.report["rounds"]]  # doctest: +SKIP
    [1.0, 0.8, 0.64]
    """
    lt = config or LotteryConfig()
    cfg = train or TrainConfig()
    rounds, rate, rewind_epoch, scope, control = lt.rounds, lt.rate, lt.rewind_epoch, lt.scope, lt.control
    epochs, seed = cfg.epochs, cfg.seed
    check(epochs >= 1, "epochs", f"must be >= 1, got {epochs}")
    check(rewind_epoch < epochs, "rewind_epoch", f"must be in [0, epochs) = [0, {epochs}), got {rewind_epoch}")
    check_max_drop(max_accuracy_drop)
    weights = model.weights if isinstance(model, ModelRef) else None
    bundle = resolve_data(data, seed)
    torch.manual_seed(seed)
    net = resolve_model(copy.deepcopy(model) if isinstance(model, nn.Module) else model, bundle)
    out_dir = _io.prepare_out_dir(out, overwrite=overwrite, inputs=[weights]) if out is not None else None
    targets = list(prunable_layers(net))
    t0 = time.perf_counter()

    _console.info(f"lottery: dense training, {epochs} epochs (rewind point: epoch {rewind_epoch})")
    init_state = copy.deepcopy(net.state_dict())
    snap = _Snapshot(rewind_epoch)
    fit(net, bundle, cfg, hooks=[snap], label="dense")
    rewind = init_state if rewind_epoch == 0 else snap.state
    if rewind is None:
        raise ConfigError(f"dense training stopped early, before the rewind epoch {rewind_epoch}: lower rewind_epoch "
                          "or raise the training's patience", field="rewind_epoch")
    dense_acc = evaluate(net, bundle.x_test, bundle.y_test)
    rows = [{"round": 0, "remaining": 1.0, "nonzero_weights": sum(net.get_parameter(f"{n}.weight").numel() for n in targets),
             "ticket_accuracy": dense_acc, "control_accuracy": dense_acc if control else None}]
    ticket_cfg = dataclasses.replace(cfg, epochs=epochs - rewind_epoch)
    ticket_state: dict[str, torch.Tensor] = {}
    for r in range(1, rounds + 1):
        sparsity = 1 - (1 - rate) ** r
        compute_masks_(net, {n: sparsity for n in targets}, scope)  # prune the trained ticket's smallest weights
        masks = {n: m.clone() for n, m in masks_of(net).items()}
        net.load_state_dict(rewind)  # rewind the survivors
        set_masks(net, masks)
        apply_masks_(net)  # zero the pruned weights
        ticket_state = copy.deepcopy(net.state_dict())
        fit(net, bundle, ticket_cfg, hooks=[MaskHook()], label=f"ticket {r}")
        ticket_acc = evaluate(net, bundle.x_test, bundle.y_test)
        control_acc = None
        if control:
            ctrl = copy.deepcopy(net)
            torch.manual_seed(seed + 1000 + r)
            _reinit_(ctrl)
            set_masks(ctrl, {n: m.clone() for n, m in masks.items()})
            fit(ctrl, bundle, cfg, hooks=[MaskHook()], label=f"control {r}")
            control_acc = evaluate(ctrl, bundle.x_test, bundle.y_test)
        rep = sparsity_report(net, targets)
        kept = sum(v["nonzero"] for v in rep["layers"].values())
        total = sum(v["params"] for v in rep["layers"].values())
        rows.append({"round": r, "remaining": round(kept / total, 6), "nonzero_weights": kept,
                     "ticket_accuracy": ticket_acc, "control_accuracy": control_acc})
        _console.info(f"lottery round {r}/{rounds}: {kept / total:.1%} of weights remain; ticket {ticket_acc:.4f}"
                      + (f", random reinit {control_acc:.4f}" if control_acc is not None else ""))

    report = {
        "model": _model_name(model),
        "data": bundle.name, "rounds": rows, "rate": rate, "rewind_epoch": rewind_epoch, "epochs": epochs,
        "ticket_epochs": epochs - rewind_epoch, "control_epochs": epochs if control else None,
        "scope": scope, "pruned_layers": targets, "seconds": round(time.perf_counter() - t0, 1),
        "train": dataclasses.asdict(cfg),
    }
    last = rows[-1]
    verdict = AccuracyVerdict(dense_acc, float(last["ticket_accuracy"] or 0.0), max_accuracy_drop,
                              hints=[f"the last ticket keeps {last['remaining']:.1%} of the weights: fewer rounds "
                                     "(--rounds) or a lower --rate keep more"] if rounds else [])
    verdict.report()
    report["accuracy"] = verdict.to_data()
    report["within_budget"] = verdict.within_budget
    if out_dir is not None:
        save_model(net, out_dir / "model.safetensors")
        ticket = copy.deepcopy(net)
        ticket.load_state_dict(ticket_state)
        save_model(ticket, out_dir / "ticket.safetensors")
        plot = plot_lottery(report, out_dir / "lottery.png")
        report["files"] = {"report": str(out_dir / "lottery.json"), "plot": str(plot),
                           "model": str(out_dir / "model.safetensors"), "ticket": str(out_dir / "ticket.safetensors")}
        _io.write_json(out_dir / "lottery.json", report)
    return LotteryResult(net, report)


def _model_name(model: nn.Module | str | ModelRef) -> str | None:
    """What the report calls the model: its spec, a reference's name, or the module's class."""
    if isinstance(model, ModelRef):
        return model.name
    return model if isinstance(model, str) else type(model).__name__


def plot_lottery(report: dict[str, Any], path: str | Path) -> Path:
    """Test accuracy of tickets and random-reinit controls against the fraction of weights remaining."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = report["rounds"]
    x = [r["remaining"] * 100 for r in rows]
    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=110)
    ax.plot(x, [r["ticket_accuracy"] for r in rows], marker="o", label=f"ticket (rewound to epoch {report['rewind_epoch']})")
    ctrl = [(xx, r["control_accuracy"]) for xx, r in zip(x, rows) if r["control_accuracy"] is not None]
    if ctrl:
        ax.plot([c[0] for c in ctrl], [c[1] for c in ctrl], marker="s", linestyle="--", label="random reinit (same mask)")
    ax.set_xscale("log")
    ticks = [t for t in (100, 50, 20, 10, 5, 2, 1, 0.5, 0.2, 0.1) if min(x) * 0.8 <= t <= 100]
    ax.set_xticks(ticks, [f"{t:g}" for t in ticks])
    ax.minorticks_off()
    ax.invert_xaxis()
    ax.set_xlabel("weights remaining (%)")
    ax.set_ylabel("test accuracy")
    ax.set_title(f"lottery tickets: {report['model']}, rate {report['rate']}")
    ax.grid(alpha=0.3, which="both")
    ax.legend()
    fig.tight_layout()
    try:
        return _io.atomic_write(path, lambda tmp: fig.savefig(tmp, format="png"))
    finally:
        plt.close(fig)
