"""One trial of the search, for real: draw a recipe, apply it, measure the exported artifact.

Each trial runs the spine's own machinery (:func:`slimkit.api.apply`): the recipe's steps on a
copy of the model, fine-tuning with distillation, ONNX export with its parity check, then the
artifact measured on the target (latency at the user's batch sizes, size, accuracy on the
*validation* split: the test split is kept for the final report). Every figure is stored in
the trial's user attributes; the budget becomes Optuna constraints (``trial.set_constraint``);
the objectives are ``(latency ratio, size KB, validation accuracy)``.

Early stopping. Optuna's ``trial.report`` / ``should_prune`` refuse multi-objective studies
(NotImplementedError), so :class:`EarlyStop` does the pruner's job from the validation curves the
trials record: after each fine-tune epoch, a trial whose accuracy is below the budget's floor
*and* below what every trial that ended within budget had reached at the same epoch stops
(``optuna.TrialPruned``), once two such trials exist.
"""

from __future__ import annotations

import contextlib
import copy
import json
import math
import os
import shutil
import socket
import time
import traceback
from pathlib import Path
from typing import Any

from torch import nn

from .. import _console, _io
from ..data import DataBundle, load_data
from ..errors import SlimkitError
from ..measure import Target
from ..models import resolve_model
from ..pipeline import ApplyResult, Recipe, apply_recipe, recipe_summary
from ._space import GridTrial, draw_recipe
from ._study import Budget, SearchConfig

__all__ = ["Session", "Objective", "EarlyStop", "figures_of", "constraint_values", "measure_baseline",
           "recipe_summary", "apply_trial"]


def _plain(x: Any) -> Any:
    """A JSON-safe copy (numpy / torch scalars, paths, tuples, sets...) for trial attributes."""
    return json.loads(json.dumps(x, default=lambda o: o.item() if hasattr(o, "item") else
                                 (list(o) if isinstance(o, (set, frozenset, tuple)) else str(o))))


# ----------------------------------------------------------------------------- figures and budget


def figures_of(result: dict[str, Any], baseline_val: dict[str, Any]) -> dict[str, Any]:
    """The figures a trial is judged on, from a measured profile and the baseline's."""
    lat = {b: s["median"] for b, s in result["latency_ms"].items()}
    base = {b: s["median"] for b, s in baseline_val["latency_ms"].items()}
    ratios = [lat[b] / base[b] for b in lat if base.get(b)]
    return {
        "val_accuracy": float(result["accuracy"]),
        "accuracy_drop": float(baseline_val["accuracy"] - result["accuracy"]),
        "latency_ms": lat,
        "latency_p90_ms": {b: s["p90"] for b, s in result["latency_ms"].items()},
        "speedup": {b: base[b] / lat[b] for b in lat if lat[b] > 0 and b in base},
        "throughput": {b: int(b) * 1000.0 / lat[b] for b in lat if lat[b] > 0},
        # the geometric mean over batch sizes of latency relative to the baseline (< 1: faster)
        "latency_ratio": math.exp(sum(math.log(r) for r in ratios) / len(ratios)) if ratios else 1.0,
        "artifact_bytes": int(result["artifact_bytes"]),
        "size_kb": result["artifact_bytes"] / 1024,
        "params": int(result["params"]),
        "nonzero_params": int(result["nonzero_params"]),
        "macs": int(result["macs"]),
    }


def constraint_values(budget: Budget, fig: dict[str, Any], batch_sizes: list[int]) -> dict[str, float]:
    """Optuna constraint values (<= 0: met), in the budget's own units, keyed by what they limit."""
    out: dict[str, float] = {}
    for b, ms in sorted((budget.max_latency_ms or {}).items()):
        out[f"latency_ms@{b}"] = fig["latency_ms"][str(b)] - ms
    if budget.min_throughput is not None:
        big = str(max(batch_sizes))
        out[f"throughput@{big}"] = budget.min_throughput - fig["throughput"][big]
    if budget.max_size_kb is not None:
        out["size_kb"] = fig["size_kb"] - budget.max_size_kb
    if budget.max_accuracy_drop is not None:
        out["accuracy_drop"] = fig["accuracy_drop"] - budget.max_accuracy_drop
    return out


def constraint_limits(budget: Budget, batch_sizes: list[int]) -> dict[str, float]:
    """Each constraint's limit (to scale violations and to say what was not met)."""
    out: dict[str, float] = {f"latency_ms@{b}": ms for b, ms in sorted((budget.max_latency_ms or {}).items())}
    if budget.min_throughput is not None:
        out[f"throughput@{max(batch_sizes)}"] = budget.min_throughput
    if budget.max_size_kb is not None:
        out["size_kb"] = budget.max_size_kb
    if budget.max_accuracy_drop is not None:
        out["accuracy_drop"] = budget.max_accuracy_drop
    return out


def apply_trial(recipe: Recipe | dict[str, Any], model: nn.Module | str, data: DataBundle, cfg: SearchConfig,
                out: Path, hooks: list[Any] | tuple[Any, ...] = ()) -> ApplyResult:
    """A trial's recipe applied for real to a copy of ``model`` (or the model a spec builds), its
    files written to ``out``, the artifact measured on the *validation* split."""
    recipe = Recipe.coerce(recipe)
    _io.prepare_out_dir(out, overwrite=True)
    net = resolve_model(copy.deepcopy(model) if isinstance(model, nn.Module) else model, data)
    target = Target(cfg.target, tuple(cfg.batch_sizes), cfg.threads, cfg.max_seconds, layers=False)
    return apply_recipe(recipe, net, data, target, out=out, hooks=hooks, baseline=False, split="val")


# ----------------------------------------------------------------------------- the baseline


def measure_baseline(model: nn.Module, data: DataBundle, cfg: SearchConfig, workdir: Path) -> dict[str, Any]:
    """The input model measured once per study: validation figures (what trials are judged
    against, with latency and the per-layer profile) and test accuracy (for the report)."""
    from ..export import export_onnx
    from ..measure import profile

    onnx_path = None
    if cfg.target == "ort-cpu":
        onnx_path = export_onnx(model, workdir / "baseline.onnx", data.example(2))
    common = dict(target=cfg.target, threads=cfg.threads, onnx_path=onnx_path)
    val = profile(model, data, batch_sizes=cfg.batch_sizes, split="val", layers=True,
                  max_seconds=max(cfg.max_seconds, 1.0), **common)
    test = profile(model, data, batch_sizes=(), split="test", layers=False, **common)
    return {"val": val, "test_accuracy": test["accuracy"]}


# ----------------------------------------------------------------------------- early stopping


class EarlyStop:
    """A training hook that stops a hopeless trial after a fine-tune epoch (see the module doc).

    Its validation curve (one value per fine-tune epoch, across every fine-tune of the recipe)
    is stored as the trial's ``val_curve`` attribute, which is what later trials compare with.
    """

    def __init__(self, trial: Any, floor: float | None, *, min_references: int = 2):
        self.trial = trial
        self.floor = floor
        self.min_references = min_references
        self.curve: list[float] = []

    def on_epoch_end(self, model: nn.Module, epoch: int, val_accuracy: float) -> None:
        import optuna

        self.curve.append(round(float(val_accuracy), 6))
        self.trial.set_user_attr("val_curve", self.curve)
        if self.floor is None or val_accuracy >= self.floor:
            return
        step = len(self.curve) - 1
        refs = []
        for t in self.trial.study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,)):
            curve = t.user_attrs.get("val_curve") or []
            if t.user_attrs.get("feasible") and len(curve) > step:
                refs.append(curve[step])
        if len(refs) >= self.min_references and val_accuracy < min(refs):
            reason = (f"validation accuracy {val_accuracy:.4f} after fine-tune epoch {step + 1} is below the "
                      f"budget's floor {self.floor:.4f} and below all {len(refs)} trials within budget at that "
                      f"epoch (lowest {min(refs):.4f})")
            self.trial.set_user_attr("pruned", reason)
            raise optuna.TrialPruned(reason)


# ----------------------------------------------------------------------------- one process's share


class Session:
    """What one process needs to run trials: the config, the data, the model, the baseline."""

    def __init__(self, cfg: SearchConfig, baseline: dict[str, Any], *, artifacts: Path,
                 data: DataBundle | None = None, model: nn.Module | None = None, verbose: bool = False):
        from ..models import load_model

        self.cfg = cfg
        self.baseline = baseline
        self.artifacts = Path(artifacts)
        self.verbose = verbose
        if data is None:
            from ._study import validation_subset

            data = validation_subset(load_data(cfg.data, seed=cfg.seed), cfg.val_size, cfg.seed)
        self.data = data
        if model is None:
            if not cfg.model:
                raise SlimkitError("this study was started from a Python model object that no spec rebuilds, so "
                                   "another process cannot join it; start it with a model spec (--model).")
            model = load_model(cfg.model, weights=cfg.weights, trust_pickle=cfg.trust_pickle,
                               input_shape=self.data.input_shape, num_classes=self.data.num_classes)
        self.model = model.eval()
        self.budget = cfg.budget_obj

    @property
    def floor(self) -> float | None:
        drop = self.budget.max_accuracy_drop
        return None if drop is None else self.baseline["val"]["accuracy"] - drop

    def trial_dir(self, number: int) -> Path:
        return self.artifacts / "trials" / f"{number:04d}"


class Objective:
    """``objective(trial) -> (latency ratio, size KB, validation accuracy)`` for ``study.optimize``."""

    def __init__(self, session: Session, *, grid: bool = False, total: int | None = None):
        self.s = session
        self.grid = grid
        self.total = total

    def __call__(self, trial: Any) -> tuple[float, float, float]:
        import optuna

        s, cfg = self.s, self.s.cfg
        t0 = time.perf_counter()
        trial.set_user_attr("worker", {"host": socket.gethostname(), "pid": os.getpid()})
        tdir = s.trial_dir(trial.number)
        stop = EarlyStop(trial, s.floor)
        try:
            recipe = draw_recipe(GridTrial(trial) if self.grid else trial, cfg.target, methods=cfg.methods,
                                 max_batches=cfg.finetune_batches)
            trial.set_user_attr("recipe", recipe.to_data())
            count = f"/{self.total}" if self.total else ""
            _console.info(f"[bold]trial {trial.number}[/bold]{count}: {recipe_summary(recipe, trial.params)}")
            with _console.muted() if not s.verbose else contextlib.nullcontext():
                res = apply_trial(recipe, s.model, s.data, cfg, tdir, hooks=[stop])
        except optuna.TrialPruned as e:
            if s.floor is not None and stop.curve:  # samplers see how far from the budget it was
                trial.set_constraint("accuracy_drop", s.baseline["val"]["accuracy"] - stop.curve[-1]
                                     - s.budget.max_accuracy_drop)
            record_stopped(trial, tdir, t0, e)
            raise
        except Exception as e:
            record_failure(trial, tdir, t0, e)
            raise
        fig, cons, feasible, steps = record_result(trial, s, res, tdir, t0)
        int8 = [r for r in steps if "faster" in r]
        if int8:
            trial.set_user_attr("int8", _plain(int8))
        _console.info("  " + describe_figures(fig, cfg.batch_sizes, feasible, cons)
                      + f" ({time.perf_counter() - t0:.1f}s)"
                      + "".join(f"; {r['step']}: INT8 {'faster' if r['faster'] else '[yellow]not faster[/yellow]'}"
                                for r in int8))
        return fig["latency_ratio"], fig["size_kb"], fig["val_accuracy"]


def record_stopped(trial: Any, tdir: Path, t0: float, e: BaseException) -> None:
    """A trial stopped early: its files go, its time and the reason stay."""
    shutil.rmtree(tdir, ignore_errors=True)
    trial.set_user_attr("seconds", round(time.perf_counter() - t0, 2))
    _console.info(f"  [yellow]stopped early[/yellow]: {e}")


def record_failure(trial: Any, tdir: Path, t0: float, e: BaseException) -> None:
    """A trial raised: its files go; the error (type, message, traceback tail) is kept in the study."""
    shutil.rmtree(tdir, ignore_errors=True)
    trial.set_user_attr("error", {"type": type(e).__name__, "message": str(e)[:2000],
                                  "traceback": traceback.format_exc(limit=-6)[-4000:]})
    trial.set_user_attr("seconds", round(time.perf_counter() - t0, 2))
    _console.info(f"  [red]failed[/red] ({type(e).__name__}): {str(e).splitlines()[0][:300] if str(e) else ''}")


def record_result(trial: Any, s: Session, res: Any, tdir: Path,
                  t0: float) -> tuple[dict[str, Any], dict[str, float], bool, list[dict[str, Any]]]:
    """A finished trial's figures, constraints and step reports into the study; returns
    ``(figures, constraint values, feasible, plain step reports)``."""
    fig = figures_of(res.report["result"], s.baseline["val"])
    cons = constraint_values(s.budget, fig, s.cfg.batch_sizes)
    for key, value in cons.items():
        trial.set_constraint(key, value)
    feasible = all(v <= 0 for v in cons.values())
    steps = [{k: v for k, v in r.items() if isinstance(v, (int, float, str, bool)) or v is None}
             for r in res.report["steps"]]
    trial.set_user_attr("figures", _plain(fig))
    trial.set_user_attr("violations", {k: v for k, v in cons.items() if v > 0})
    trial.set_user_attr("feasible", feasible)
    trial.set_user_attr("steps", _plain(steps))
    trial.set_user_attr("parity", _plain(res.report.get("parity")))
    trial.set_user_attr("artifacts", str(tdir.resolve()))
    trial.set_user_attr("seconds", round(time.perf_counter() - t0, 2))
    return fig, cons, feasible, steps


def describe_figures(fig: dict[str, Any], batch_sizes: list[int], feasible: bool | None = None,
                     cons: dict[str, float] | None = None) -> str:
    lat = ", ".join(f"{fig['latency_ms'][str(b)]:.3g} ms @{b}" for b in batch_sizes)
    text = (f"val {fig['val_accuracy']:.4f} ({-fig['accuracy_drop'] * 100:+.2f} pts), "
            f"speed-up {1 / fig['latency_ratio']:.2f}x ({lat}), {fig['size_kb']:.1f} KB")
    if feasible is None:
        return text
    if feasible:
        return text + ", [green]within budget[/green]"
    over = ", ".join(k for k, v in (cons or {}).items() if v > 0)
    return text + f", [red]over budget[/red] ({over})"
