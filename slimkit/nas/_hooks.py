"""The training hooks of an architecture search: batch-norm recalibration of a briefly trained
candidate (:class:`RecalibrateBN`) and the trials' pruner (:class:`ParetoStop`)."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ..search import EarlyStop

__all__ = ["weight_kb", "RecalibrateBN", "recalibrate_bn", "ParetoStop"]


def weight_kb(model: nn.Module) -> float:
    """KB of the conv / linear weights and biases (float32): a lower bound of the exported size."""
    n = sum(p.numel() for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))
            for p in m.parameters(recurse=False))
    return n * 4 / 1024


# ----------------------------------------------------------------------------- training hooks


class RecalibrateBN:
    """Re-estimate every batch norm's statistics on a few training batches at the end of each
    epoch, before the validation accuracy is measured.

    A candidate trained from scratch for a few dozen steps has running statistics far from its
    current weights' (momentum 0.1 has not caught up), so its validation accuracy in eval mode
    is near chance even when its training loss has dropped: the proxy would rank nothing. The
    statistics are reset and recomputed as a plain average (``momentum=None``) over
    ``batches`` training batches, in train mode without gradients (as Once-for-All does for
    its sub-networks).
    """

    def __init__(self, x_train: torch.Tensor, epochs: int, *, batches: int = 4, batch_size: int = 128, seed: int = 0):
        self.x = x_train
        self.epochs = max(1, int(epochs))
        self.batches = batches
        self.batch_size = batch_size
        self.seed = seed
        self.per_epoch = 1

    def on_train_begin(self, model: nn.Module, total_steps: int) -> None:
        self.per_epoch = max(1, total_steps // self.epochs)

    def on_step_end(self, model: nn.Module, step: int, total_steps: int) -> None:
        if step % self.per_epoch == 0:
            recalibrate_bn(model, self.x, batches=self.batches, batch_size=self.batch_size, seed=self.seed + step)


def recalibrate_bn(model: nn.Module, x: torch.Tensor, *, batches: int = 4, batch_size: int = 128, seed: int = 0) -> int:
    """Reset and re-estimate ``model``'s batch-norm statistics on ``batches`` batches of ``x``; returns how many."""
    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats]
    if not bns:
        return 0
    momenta = [b.momentum for b in bns]
    was = model.training
    idx = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))
    dev = next((p.device for p in model.parameters()), torch.device("cpu"))
    try:
        for b in bns:
            b.reset_running_stats()
            b.momentum = None  # a cumulative average over the batches below
        model.train()
        with torch.no_grad():
            for i in range(batches):
                chunk = idx[i * batch_size:(i + 1) * batch_size]
                if len(chunk) < 2:
                    break
                model(x[chunk].to(dev))
    finally:
        for b, m in zip(bns, momenta):
            b.momentum = m
        model.train(was)
    return len(bns)


# ----------------------------------------------------------------------------- early stopping


class ParetoStop:
    """The trials' pruner: after a proxy epoch (not the last), stop a candidate that is slower
    (by the table) than at least ``min_references`` finished candidates which all had a better
    validation accuracy at the same epoch: it is unlikely to reach the Pareto front.

    Also applies the ``compress`` search's rule (:class:`slimkit.search.EarlyStop`):
    below the budget's accuracy floor and below every feasible trial at that epoch. Optuna's
    own ``trial.report`` / ``should_prune`` refuse multi-objective studies, hence a hook.
    """

    def __init__(self, trial: Any, floor: float | None, predicted_ms: float, epochs: int, *,
                 min_references: int = 2):
        self.base = EarlyStop(trial, floor, min_references=min_references)
        self.trial = trial
        self.predicted_ms = predicted_ms
        self.epochs = epochs
        self.min_references = min_references

    @property
    def curve(self) -> list[float]:
        return self.base.curve

    def on_epoch_end(self, model: nn.Module, epoch: int, val_accuracy: float) -> None:
        import optuna

        self.base.on_epoch_end(model, epoch, val_accuracy)
        step = len(self.curve) - 1
        if step + 1 >= self.epochs:
            return  # stopping after the last proxy epoch saves nothing
        better = []
        for t in self.trial.study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,)):
            curve = t.user_attrs.get("val_curve") or []
            pred = (t.user_attrs.get("prediction") or {}).get("predicted_ms")
            if pred is not None and pred <= self.predicted_ms and len(curve) > step and curve[step] > val_accuracy:
                better.append((t.number, curve[step]))
        if len(better) >= self.min_references:
            reason = (f"after proxy epoch {step + 1}, validation accuracy {val_accuracy:.4f} is below that of "
                      f"{len(better)} finished candidates predicted at most as slow (trials "
                      f"{', '.join(str(n) for n, _ in better[:5])})")
            self.trial.set_user_attr("pruned", reason)
            raise optuna.TrialPruned(reason)
