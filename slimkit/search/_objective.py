"""``compress``'s objective: draw a recipe from every registered step's space, apply it for real,
judge the exported artifact (see :mod:`slimkit.search._trial` for the machinery it shares)."""

from __future__ import annotations

import time
from typing import Any

from .. import _console
from ..pipeline import recipe_summary
from ._space import GridTrial, draw_recipe
from ._trial import EarlyStop, Session, TrialRecorder, verdict_text

__all__ = ["Objective"]


class Objective:
    """``objective(trial) -> (latency ratio, size KB, validation accuracy)`` for ``study.optimize``."""

    def __init__(self, session: Session, *, grid: bool = False, total: int | None = None):
        self.s = session
        self.grid = grid
        self.total = total

    def __call__(self, trial: Any) -> tuple[float, float, float]:
        s, record = self.s, self.s.record
        rec = TrialRecorder(trial, s)
        stop = EarlyStop(trial, s.floor)

        def constrain() -> None:  # samplers see how far from the budget a stopped trial was
            if s.floor is not None and stop.curve:
                trial.set_constraint("accuracy_drop", s.baseline["val"]["accuracy"] - stop.curve[-1]
                                     - s.budget.max_accuracy_drop)

        with rec.guard(on_stopped=constrain):
            recipe = draw_recipe(GridTrial(trial) if self.grid else trial, record.target, methods=record.methods,
                                 max_batches=record.finetune_batches)
            trial.set_user_attr("recipe", recipe.to_data())
            count = f"/{self.total}" if self.total else ""
            _console.info(f"[bold]trial {trial.number}[/bold]{count}: {recipe_summary(recipe, trial.params)}")
            res = rec.apply(recipe, s.model, hooks=[stop])
        judged = rec.result(res)
        _console.info("  " + rec.describe(judged) + f" ({time.perf_counter() - rec.t0:.1f}s)"
                      + "".join(f"; {verdict_text(r, markup=True)}" for r in judged.verdicts))
        return judged.values
