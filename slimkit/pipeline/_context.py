"""What the steps of a recipe share while they run, and the step runner."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from torch import nn

from .. import _console
from ..data import DataBundle
from ..models import model_fingerprint
from ._recipe import Recipe, get_step

__all__ = ["Context", "ExportTransform", "SpeedVerdict", "run_recipe"]


@dataclass(frozen=True)
class SpeedVerdict:
    """What a step that times its artifact found: is the new artifact faster than the one before?

    Steps registered with ``reports_speed=True`` append one to ``ctx.verdicts``; the search and
    the reports read these instead of guessing from report keys. ``latency_ms`` holds
    ``{"before": {batch: ms}, "after": {batch: ms}}`` timed side by side; ``applied`` is false
    when the step reverted its change because it was slower (``if_slower: revert``).
    """

    step: str
    faster: bool
    speedup: dict[str, float]
    latency_ms: dict[str, dict[str, float]]
    applied: bool = True


@dataclass(frozen=True)
class ExportTransform:
    """Turns the float ONNX export into the artifact a step wants (QAT: integer QDQ kernels).

    ``fn(ctx, float_onnx) -> (onnx, report)``; ``min_agreement`` lowers the export's parity bar
    for that artifact (an integer artifact rounds differently from torch's fake quantization).
    """

    fn: Callable[[Any, Path], tuple[Path, dict[str, Any]]]
    min_agreement: float = 1.0


@dataclass
class Context:
    """What the steps of a recipe share while they run.

    ``model`` is changed in place by torch-level steps; ``onnx_path`` is set by ``export`` and
    replaced by ONNX-level steps (e.g. static INT8). ``teacher`` is a frozen copy of the model
    as it was before the recipe, used for distillation. ``hooks`` are training hooks that
    stay active for every later fine-tune (e.g. pruning masks). ``export_transform`` is applied by
    ``export`` to its float export; ``outputs`` are files a step made, ``{file name: path}``,
    that ``apply(out=DIR)`` copies into DIR (e.g. ``model.slim``); ``verdicts`` are the measured
    speed verdicts of the steps that time their artifact (:class:`SpeedVerdict`); ``not_met``
    says what a step was asked for and could not do (e.g. pruning that found nothing to prune):
    the result reports it and the CLI exits with code 3.
    """

    model: nn.Module
    data: DataBundle
    workdir: Path
    target: str = "ort-cpu"
    threads: int = 1
    batch_sizes: tuple[int, ...] = (1, 64)
    teacher: nn.Module | None = None
    onnx_path: Path | None = None
    float_onnx_path: Path | None = None
    parity: dict[str, Any] | None = None
    hooks: list[Any] = field(default_factory=list)
    state: set[str] = field(default_factory=set)
    reports: list[dict[str, Any]] = field(default_factory=list)
    epoch_callbacks: list[Any] = field(default_factory=list)
    max_seconds: float = 2.0
    export_transform: ExportTransform | None = None
    outputs: dict[str, Path] = field(default_factory=dict)
    verdicts: list[SpeedVerdict] = field(default_factory=list)
    not_met: list[str] = field(default_factory=list)
    exports: dict[str, Path] = field(default_factory=dict)

    def exported(self, model: nn.Module) -> Path | None:
        """The ONNX file this recipe already exported of a model with these weights and structure."""
        path = self.exports.get(model_fingerprint(model))
        return path if path is not None and path.is_file() else None

    def remember_export(self, model: nn.Module, path: Path) -> Path:
        """Note that ``path`` is ``model`` exported (see :meth:`exported`); returns ``path``."""
        self.exports[model_fingerprint(model)] = path
        return path

    def train_hooks(self) -> list[Any]:
        return [*self.hooks, *self.epoch_callbacks]

    def new_path(self, stem: str, suffix: str = ".onnx") -> Path:
        """A fresh file path in the work folder (``model-1.onnx``, ``model-2.onnx``, ...)."""
        i = 1
        while (self.workdir / f"{stem}-{i}{suffix}").exists():
            i += 1
        return self.workdir / f"{stem}-{i}{suffix}"


def run_recipe(recipe: Recipe, ctx: Context) -> list[dict[str, Any]]:
    """Run every step on ``ctx`` in order; each step's report is appended to ``ctx.reports``."""
    recipe.validate(ctx.target, ctx.state)
    recipe.check_model(ctx.model)
    n = len(recipe.steps)
    for i, step in enumerate(recipe.steps, 1):
        spec = get_step(step.name)
        _console.info(f"[bold]step {i}/{n}: {step.name}[/bold]")
        t0 = time.perf_counter()
        report = spec.handler(ctx, step.config) or {}
        ctx.state -= spec.clears
        ctx.state |= spec.sets
        ctx.reports.append({"step": step.name, "seconds": round(time.perf_counter() - t0, 3), **report})
    return ctx.reports
