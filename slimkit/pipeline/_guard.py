"""The accuracy guard every command that changes a model shares.

A command measures accuracy before and after on one split; past ``max_drop`` it still
writes its artifacts, but its result says ``within_budget: false``, the console says so
loudly, and the command exits 3. Where the fine-tunes show why (the loss rose, too few
optimisation steps), the message says what to change.

>>> v = AccuracyVerdict(before=0.96, after=0.63, max_drop=0.01)
>>> v.within_budget, round(v.drop_points, 1)
(False, 33.0)
>>> v.to_data()["within_budget"]
False
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from .. import _console
from ..config import check

__all__ = ["AccuracyVerdict", "check_max_drop", "training_hints", "fits_in", "FEW_STEPS"]

#: A fine-tune with fewer optimisation steps than this is named as a likely cause of a loss.
FEW_STEPS = 500


@dataclass
class AccuracyVerdict:
    """Accuracy before and after a command, judged against the drop the user allows.

    ``max_drop``: a fraction (0.01 = 1 point), ``None``: no limit (the figures are still
    reported). ``hints``: what to change, shown when the drop is past the limit.
    """

    before: float
    after: float
    max_drop: float | None
    split: str = "test"
    hints: list[str] = field(default_factory=list)

    @property
    def drop_points(self) -> float:
        return 100.0 * (self.before - self.after)

    @property
    def within_budget(self) -> bool:
        return self.max_drop is None or self.before - self.after <= self.max_drop + 1e-9

    def to_data(self) -> dict[str, Any]:
        return {"split": self.split, "before": self.before, "after": self.after,
                "drop_points": round(self.drop_points, 3),
                "max_drop_points": None if self.max_drop is None else round(100.0 * self.max_drop, 3),
                "within_budget": self.within_budget, "hints": list(self.hints)}

    @classmethod
    def from_data(cls, data: dict[str, Any]) -> "AccuracyVerdict":
        """The verdict :meth:`to_data` wrote (``result.json``'s ``accuracy``)."""
        limit = data.get("max_drop_points")
        return cls(data["before"], data["after"], None if limit is None else limit / 100.0, split=data.get("split", "test"),
                   hints=list(data.get("hints") or []))

    def summary(self) -> str:
        """``test accuracy 0.9638 -> 0.9471 (-1.67 pts; the limit is 2 pts)``."""
        limit = "" if self.max_drop is None else f"; the limit is {100 * self.max_drop:g} pts"
        return f"{self.split} accuracy {self.before:.4f} -> {self.after:.4f} ({-self.drop_points:+.2f} pts{limit})"

    def message(self, where: str, file: str = "result.json") -> str:
        """What a command says when the drop is past the limit; ``where``: the folder it wrote."""
        text = (f"accuracy dropped past the limit: {self.summary()}. The artifacts in {where} are written; "
                f"{file} says within_budget: false.")
        if self.hints:
            text += " Likely cause: " + "; ".join(self.hints) + "."
        else:
            text += " Allow more (--max-accuracy-drop), fine-tune longer, or compress less."
        return text

    def report(self) -> None:
        """Print the verdict: plainly when within the limit, loudly when not."""
        if self.within_budget:
            _console.info(self.summary())
        else:
            _console.info(f"[bold red]over the accuracy budget[/bold red]: {self.summary()}")


def check_max_drop(max_drop: float | None) -> None:
    """A ``max_accuracy_drop`` argument is a fraction in [0, 1] or None (checked before any work)."""
    check(max_drop is None or 0 <= max_drop <= 1, "max_accuracy_drop",
          f"must be a fraction in [0, 1] (0.01 = 1 point), got {max_drop}")


def training_hints(fits: Iterable[tuple[str, dict[str, Any]]]) -> list[str]:
    """What the fine-tunes' own figures say about a loss of accuracy.

    ``fits``: ``(what, report)`` pairs of :func:`slimkit.training.fit` reports (``steps``,
    ``first_loss``, ``last_loss``).

    >>> training_hints([("pruning fine-tune", {"steps": 80, "first_loss": 0.03, "last_loss": 11.0})])
    ['the pruning fine-tune made only 80 optimisation steps: give it more (--min-steps or more epochs)', \
'its loss rose from 0.03 to 11 while it trained (with pruning: while the sparsity ramped): fine-tune longer or compress less']
    """
    hints = []
    for what, r in fits:
        steps, first, last = r.get("steps"), r.get("first_loss"), r.get("last_loss")
        if steps is not None and 0 < steps < FEW_STEPS:
            hints.append(f"the {what} made only {steps} optimisation steps: give it more (--min-steps or more epochs)")
        if first is not None and last is not None and last > max(1.5 * first, 0.1):
            name = "its" if hints and hints[-1].startswith(f"the {what} ") else f"the {what}'s"
            hints.append(f"{name} loss rose from {first:.3g} to {last:.3g} while it trained (with pruning: while the "
                         "sparsity ramped): fine-tune longer or compress less")
    return hints


def fits_in(reports: Iterable[dict[str, Any]]) -> list[tuple[str, dict[str, Any]]]:
    """``(what, fit report)`` for each fine-tune inside step reports (a ``finetune`` step, a
    pruning step's nested ``finetune``...), named after its step.

    >>> [w for w, _ in fits_in([{"step": "prune", "finetune": {"steps": 9, "first_loss": 1.0}}])]
    ['prune fine-tune']
    """
    found: list[tuple[str, dict[str, Any]]] = []

    def walk(r: dict[str, Any], name: str) -> None:
        if "first_loss" in r and "steps" in r:
            found.append((name if "fine-tune" in name else f"{name} fine-tune", r))
        for key, value in r.items():
            if isinstance(value, dict):
                walk(value, name if key in ("finetune", "report") else f"{name} {key}".replace("_", " "))

    for r in reports:
        if isinstance(r, dict):
            step = str(r.get("step", ""))
            walk(r, "fine-tune" if step == "finetune" else step)
    return found
