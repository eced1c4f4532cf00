"""One trial of an architecture search: draw an architecture, reject it by the latency table or
train it briefly, then judge it like a ``compress`` trial (on :mod:`slimkit.search`'s study kit)."""

from __future__ import annotations

import time
from typing import Any

import torch

from .. import _console
from ..pipeline import Recipe
from ..search import Session, TrialRecorder, constraint_values
from ._hooks import ParetoStop, RecalibrateBN, weight_kb
from ._space import Arch, Family, Space, arch_summary
from ._table import LatencyTable

__all__ = ["NasObjective", "StopWhenTrained", "proxy_recipe", "trained_count", "rejected_count",
           "MAX_REJECTED_IN_A_ROW"]

MAX_REJECTED_IN_A_ROW = 60  # proposals in a row rejected or already trained: stop


def proxy_recipe(spec: str, *, teacher: bool, epochs: int, batches: int | None, lr: float, seed: int) -> Recipe:
    """How a candidate is trained: distilled from the teacher into the architecture ``spec``
    (``distill`` with a ``student``), or from the labels alone (``finetune``), then exported."""
    if teacher:
        step = {"distill": {"student": spec, "epochs": epochs, "lr": lr, "max_batches": batches, "seed": seed}}
    else:
        step = {"finetune": {"epochs": epochs, "lr": lr, "max_batches": batches, "distill": False, "seed": seed}}
    return Recipe.from_data([step, "export"])


class NasObjective:
    """``objective(trial) -> (latency ratio, size KB, validation accuracy)`` for ``study.optimize``.

    ``trained`` counts the trials this process trained (the rejected ones are not counted).
    """

    def __init__(self, session: Session, table: LatencyTable, family: Family, space: Space, *,
                 total: int | None = None):
        if session.record.nas is None:
            raise ValueError("an architecture search's session needs the record's nas settings")
        self.s = session
        self.table = table
        self.family = family
        self.space = space
        self.total = total
        self.nas = session.record.nas
        self.trained = 0
        self.rejected_in_a_row = 0

    def __call__(self, trial: Any) -> tuple[float, float, float]:
        import optuna

        s, record, nas = self.s, self.s.record, self.nas
        rec = TrialRecorder(trial, s)
        arch = self.space.sample(trial)
        spec = self.family.spec(arch)
        model = self.family.build(arch, s.data.input_shape, s.data.num_classes)
        pred = self.table.predict(arch, model=model)["ms"]
        kb = weight_kb(model)
        summary = arch_summary(arch)
        b = str(self.table.batch)
        trial.set_user_attr("arch", arch)
        trial.set_user_attr("summary", summary)
        trial.set_user_attr("student", spec)
        trial.set_user_attr("prediction", {"predicted_ms": pred, "batch": self.table.batch, "weight_kb": kb})
        trial.set_user_attr("columns", {f"predicted_ms@{b}": round(pred, 5), "weight_kb": round(kb, 2)})
        count = f"/{self.total}" if self.total else ""
        over = self._over_budget(pred, kb)
        same = self._trained_before(trial, arch)
        if same is not None and not over:
            return self._duplicate(trial, same, rec)
        if over:
            reason = "rejected before training: " + "; ".join(text for _, text in over.values())
            for key, (gap, _) in over.items():
                trial.set_constraint(key, gap)
            trial.set_user_attr("rejected", reason)
            trial.set_user_attr("pruned", reason)
            trial.set_user_attr("seconds", rec.seconds(3))
            self.rejected_in_a_row += 1
            _console.info(f"trial {trial.number}: {summary}: [yellow]{reason}[/yellow]")
            raise optuna.TrialPruned(reason)
        self.rejected_in_a_row = 0
        self.trained += 1
        recipe = proxy_recipe(spec, teacher=nas.teacher, epochs=nas.proxy_epochs, batches=nas.proxy_batches,
                              lr=nas.lr, seed=record.seed)
        trial.set_user_attr("recipe", recipe.to_data())
        trial.set_user_attr("model", record.model if nas.teacher else spec)
        _console.info(f"[bold]trial {trial.number}[/bold] (trained {self.trained}{count}): {summary}, predicted "
                      f"{pred:.3g} ms @{b}")
        stop = ParetoStop(trial, s.floor, pred, nas.proxy_epochs)
        with rec.guard():
            torch.manual_seed(record.seed)  # the candidate's initial weights (finetune builds it from the spec)
            res = rec.apply(recipe, s.model if nas.teacher else spec,
                            hooks=[stop, RecalibrateBN(s.data.x_train, nas.proxy_epochs, seed=record.seed)])
        judged = rec.result(res)
        measured = judged.figures["latency_ms"][b]
        err = (pred - measured) / measured if measured > 0 else None
        trial.set_user_attr("prediction", {"predicted_ms": pred, "measured_ms": measured, "relative_error": err,
                                           "batch": self.table.batch, "weight_kb": kb})
        trial.set_user_attr("columns", {f"predicted_ms@{b}": round(pred, 5), "weight_kb": round(kb, 2),
                                        "prediction_error": None if err is None else round(err, 4)})
        _console.info("  " + rec.describe(judged)
                      + f"; predicted {pred:.3g} ms ({'-' if err is None else f'{err:+.0%}'})"
                      + f" ({time.perf_counter() - rec.t0:.1f}s)")
        return judged.values

    def _over_budget(self, pred: float, kb: float) -> dict[str, tuple[float, str]]:
        """What the candidate exceeds by the table's prediction and its weights' size: ``{constraint: (gap, why)}``."""
        budget, b = self.s.budget, self.table.batch
        over = {}
        limit = budget.latency_limits.get(b)
        if limit is not None and pred > limit:
            over[f"latency_ms@{b}"] = (pred - limit, f"predicted latency {pred:.3g} ms > {limit:g} ms at batch {b}")
        if budget.max_size_kb is not None and kb > budget.max_size_kb:
            over["size_kb"] = (kb - budget.max_size_kb,
                               f"its weights alone take {kb:.1f} KB > {budget.max_size_kb:g} KB")
        return over

    def _trained_before(self, trial: Any, arch: Arch) -> Any | None:
        import optuna

        for t in trial.study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,)):
            if t.user_attrs.get("arch") == arch and "figures" in t.user_attrs and not t.user_attrs.get("duplicate_of"):
                return t
        return None

    def _duplicate(self, trial: Any, same: Any, rec: TrialRecorder) -> tuple[float, float, float]:
        """The sampler proposed an architecture already trained: reuse that trial's figures."""
        a = same.user_attrs
        for key in ("figures", "violations", "feasible", "prediction", "recipe", "model", "steps", "parity",
                    "artifacts", "val_curve"):
            if key in a:
                trial.set_user_attr(key, a[key])
        trial.set_user_attr("columns", {**(a.get("columns") or {}), "duplicate_of": same.number})
        trial.set_user_attr("duplicate_of", same.number)
        for key, value in constraint_values(self.s.budget, a["figures"], self.s.record.batch_sizes).items():
            trial.set_constraint(key, value)
        trial.set_user_attr("seconds", rec.seconds(3))
        self.rejected_in_a_row += 1
        _console.info(f"trial {trial.number}: {a.get('summary') or arch_summary(a['arch'])}: already trained in trial "
                      f"{same.number}; its figures are reused")
        f = a["figures"]
        return f["latency_ratio"], f["size_kb"], f["val_accuracy"]


class StopWhenTrained:
    """Stop ``study.optimize`` once ``target`` trials were trained (rejections do not count), or
    when the sampler keeps proposing candidates the table rejects."""

    def __init__(self, objective: NasObjective, target: int | None, trained_before: int):
        self.objective = objective
        self.target = target
        self.trained_before = trained_before
        self.gave_up = False

    def __call__(self, study: Any, trial: Any) -> None:
        if self.target is not None and self.trained_before + self.objective.trained >= self.target:
            study.stop()
        elif self.objective.rejected_in_a_row >= MAX_REJECTED_IN_A_ROW:
            self.gave_up = True
            study.stop()


def trained_count(study: Any) -> int:
    """Trials that trained a candidate (not those rejected by the table, nor repeats of a trained one)."""
    return sum((t.state.name in ("COMPLETE", "FAIL") and not t.user_attrs.get("duplicate_of"))
               or (t.state.name == "PRUNED" and not t.user_attrs.get("rejected"))
               for t in study.get_trials(deepcopy=False))


def rejected_count(study: Any) -> int:
    return sum(bool(t.user_attrs.get("rejected")) for t in study.get_trials(deepcopy=False))
