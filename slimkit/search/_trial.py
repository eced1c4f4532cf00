"""One trial's machinery, shared by every search: the session, the recipe applied for real, the
figures and constraints, early stopping, and the recorder that writes it all into the study.

A trial runs the spine (:func:`slimkit.pipeline.apply_recipe`): the recipe's steps on a copy
of the model, fine-tuning with distillation, ONNX export with its parity check, then the
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
import shutil
import time
import traceback
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torch import nn

from .. import _console, _io
from ..data import DataBundle, load_data
from ..errors import SlimkitError
from ..export import export_onnx
from ..measure import Target, profile
from ..models import load_model, resolve_model
from ..pipeline import ApplyResult, Recipe, apply_recipe, get_step, step_names
from ._faults import Interrupted, armed, deadline, this_worker, writable, write_cause
from ._options import Budget
from ._record import SearchRecord
from ._study import validation_subset

__all__ = ["Session", "TrialRecorder", "Judged", "EarlyStop", "figures_of", "constraint_values", "constraint_limits",
           "measure_baseline", "apply_trial", "describe_figures", "speed_verdicts", "verdict_text", "trial_verdicts"]


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


def constraint_values(budget: Budget, fig: dict[str, Any], batch_sizes: Sequence[int]) -> dict[str, float]:
    """Optuna constraint values (<= 0: met), in the budget's own units, keyed by what they limit."""
    limits = constraint_limits(budget, batch_sizes)
    out: dict[str, float] = {}
    for key, limit in limits.items():
        if key.startswith("latency_ms@"):
            out[key] = fig["latency_ms"][key.split("@")[1]] - limit
        elif key.startswith("throughput@"):
            out[key] = limit - fig["throughput"][key.split("@")[1]]
        else:
            out[key] = fig[key] - limit
    return out


def constraint_limits(budget: Budget, batch_sizes: Sequence[int]) -> dict[str, float]:
    """Each constraint's limit (to scale violations and to say what was not met)."""
    out: dict[str, float] = {f"latency_ms@{b}": ms for b, ms in sorted(budget.latency_limits.items())}
    if budget.min_throughput is not None:
        out[f"throughput@{max(batch_sizes)}"] = budget.min_throughput
    if budget.max_size_kb is not None:
        out["size_kb"] = budget.max_size_kb
    if budget.max_accuracy_drop is not None:
        out["accuracy_drop"] = budget.max_accuracy_drop
    return out


def describe_figures(fig: dict[str, Any], batch_sizes: Sequence[int], feasible: bool | None = None,
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


# ----------------------------------------------------------------------------- applying and measuring


def apply_trial(recipe: Recipe | dict[str, Any], model: nn.Module | str, data: DataBundle, record: SearchRecord,
                out: Path, hooks: Sequence[Any] = ()) -> ApplyResult:
    """A trial's recipe applied for real to a copy of ``model`` (or the model a spec builds), its
    files written to ``out``, the artifact measured on the *validation* split."""
    recipe = Recipe.coerce(recipe)
    _io.prepare_out_dir(out, overwrite=True)
    net = resolve_model(copy.deepcopy(model) if isinstance(model, nn.Module) else model, data)
    return apply_recipe(recipe, net, data, record.target_obj, out=out, hooks=hooks, baseline=False, split="val")


def measure_baseline(model: nn.Module, data: DataBundle, record: SearchRecord, workdir: Path) -> dict[str, Any]:
    """The input model measured once per study: validation figures (what trials are judged
    against, with latency and the per-layer profile) and test accuracy (for the report)."""
    onnx_path = None
    if record.target == "ort-cpu":
        onnx_path = export_onnx(model, workdir / "baseline.onnx", data.example(2))
    target = Target(record.target, tuple(record.batch_sizes), record.threads, max(record.max_seconds, 1.0))
    val = profile(model, data, target, onnx_path=onnx_path, split="val")
    test = profile(model, data, Target(record.target, threads=record.threads, layers=False), onnx_path=onnx_path,
                   split="test", latency=False)
    return {"val": val, "test_accuracy": test["accuracy"]}


def verdict_text(verdict: dict[str, Any], *, markup: bool = False) -> str:
    """One step's speed verdict in words.

    >>> verdict_text({"step": "decompose", "faster": False, "applied": False})
    'decompose: not faster, reverted'
    """
    slow = "[yellow]not faster[/yellow]" if markup else "not faster"
    said = "faster" if verdict["faster"] else slow
    return f"{verdict['step']}: {said}" + ("" if verdict.get("applied", True) else ", reverted")


def trial_verdicts(attrs: dict[str, Any]) -> list[dict[str, Any]]:
    """A trial's speed verdicts from its attributes (``int8`` in studies written before 0.2)."""
    return list(attrs.get("verdicts") or attrs.get("int8") or [])


def speed_verdicts(res: ApplyResult, steps: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The speed verdicts of the steps that time their artifact (``verdicts`` in a trial's attributes).

    From :attr:`ApplyResult.verdicts`; a step registered with ``reports_speed`` that appended
    none is read from its report's ``faster`` key.
    """
    if res.verdicts:
        return [{"step": v.step, "faster": v.faster, "speedup": v.speedup, "applied": v.applied}
                for v in res.verdicts]
    speedy = {n for n in step_names() if get_step(n).reports_speed}
    return [r for r in steps if "faster" in r and (r.get("step") in speedy or not speedy)]


# ----------------------------------------------------------------------------- one process's share


class Session:
    """What one process needs to run trials: the record, the data, the model, the baseline."""

    def __init__(self, record: SearchRecord, baseline: dict[str, Any], *, artifacts: Path,
                 data: DataBundle | None = None, model: nn.Module | None = None, verbose: bool = False):
        self.record = record
        self.baseline = baseline
        self.artifacts = Path(artifacts)
        self.verbose = verbose
        if data is None:
            data = validation_subset(load_data(record.data, seed=record.seed), record.val_size, record.seed)
        self.data = data
        if model is None:
            if not record.model:
                raise SlimkitError("this study was started from a Python model object that no spec rebuilds, so "
                                   "another process cannot join it; start it with a model spec (--model).")
            model = load_model(record.model, weights=record.weights, trust_pickle=record.trust_pickle,
                               input_shape=self.data.input_shape, num_classes=self.data.num_classes)
        self.model = model.eval()
        self.budget = record.budget_obj
        self.trial_timeout = record.trial_timeout
        # set when a trial could not write its files and the folder takes none: the search stops
        self.write_failure: OSError | None = None

    @property
    def floor(self) -> float | None:
        drop = self.budget.max_accuracy_drop
        return None if drop is None else self.baseline["val"]["accuracy"] - drop

    def trial_dir(self, number: int) -> Path:
        return self.artifacts / "trials" / f"{number:04d}"


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


# ----------------------------------------------------------------------------- recording a trial


@dataclass
class Judged:
    """A finished trial as judged: its figures, constraint values, whether it met the budget,
    its plain step reports and its steps' speed verdicts."""

    figures: dict[str, Any]
    constraints: dict[str, float]
    feasible: bool
    steps: list[dict[str, Any]]
    verdicts: list[dict[str, Any]]

    @property
    def values(self) -> tuple[float, float, float]:
        """The study's objectives: (latency ratio, size KB, validation accuracy)."""
        return self.figures["latency_ratio"], self.figures["size_kb"], self.figures["val_accuracy"]


class TrialRecorder:
    """Writes one trial into the study: who runs it, its files' folder, how it ended and how long it took.

    >>> rec = TrialRecorder(trial, session)  # doctest: +SKIP
    >>> with rec.guard():  # doctest: +SKIP
    ...     res = rec.apply(recipe, session.model, hooks=[EarlyStop(trial, session.floor)])
    >>> judged = rec.result(res)  # doctest: +SKIP
    """

    def __init__(self, trial: Any, session: Session):
        self.trial = trial
        self.session = session
        self.t0 = time.perf_counter()
        self.dir = session.trial_dir(trial.number)
        trial.set_user_attr("worker", this_worker())

    def seconds(self, digits: int = 2) -> float:
        return round(time.perf_counter() - self.t0, digits)

    @contextlib.contextmanager
    def guard(self, on_stopped: Callable[[], None] | None = None) -> Iterator[None]:
        """Record a trial stopped early (``on_stopped()`` first), failed, timed out (the session's
        ``trial_timeout``) or interrupted (SIGTERM, Ctrl-C) inside the block, and re-raise.

        A trial that could not write its files is failed with that reason; if the output folder
        takes no file at all any more, the search is stopped (``session.write_failure``).
        """
        import optuna

        try:
            with armed(), deadline(self.session.trial_timeout):
                yield
        except optuna.TrialPruned as e:
            if on_stopped is not None:
                on_stopped()
            self.stopped(e)
            raise
        except Exception as e:
            cause = write_cause(e)  # a step may have wrapped it (an export that could not write)
            self.failed(cause or e)
            if cause is not None and not writable(self.dir.parent):
                self.session.write_failure = cause
                self.trial.study.stop()
            raise
        except KeyboardInterrupt as e:
            self.interrupted(e)
            raise
    def apply(self, recipe: Recipe | dict[str, Any], model: nn.Module | str, hooks: Sequence[Any] = ()) -> ApplyResult:
        """The recipe applied for real into this trial's folder (steps' output muted unless verbose)."""
        s = self.session
        with _console.muted() if not s.verbose else contextlib.nullcontext():
            return apply_trial(recipe, model, s.data, s.record, self.dir, hooks=hooks)

    def stopped(self, e: BaseException) -> None:
        """A trial stopped early: its files go, its time and the reason stay."""
        shutil.rmtree(self.dir, ignore_errors=True)
        self.trial.set_user_attr("seconds", self.seconds())
        _console.info(f"  [yellow]stopped early[/yellow]: {e}")

    def failed(self, e: BaseException) -> None:
        """A trial raised: its files go; the error (type, message, traceback tail) is kept in the study."""
        shutil.rmtree(self.dir, ignore_errors=True)
        self.trial.set_user_attr("error", {"type": type(e).__name__, "message": str(e)[:2000],
                                           "traceback": traceback.format_exc(limit=-6)[-4000:]})
        self.trial.set_user_attr("seconds", self.seconds())
        _console.info(f"  [red]failed[/red] ({type(e).__name__}): {str(e).splitlines()[0][:300] if str(e) else ''}")

    def interrupted(self, e: KeyboardInterrupt) -> None:
        """A trial stopped by SIGTERM or Ctrl-C: recorded as failed (error ``Interrupted``)."""
        shutil.rmtree(self.dir, ignore_errors=True)
        how = str(e) if isinstance(e, Interrupted) else "interrupted by Ctrl-C (SIGINT)"
        self.trial.set_user_attr("error", {"type": "Interrupted", "message": f"{how} after {self.seconds(1)} s",
                                           "traceback": ""})
        self.trial.set_user_attr("seconds", self.seconds())
        _console.info(f"  [red]interrupted[/red]: {how}")

    def result(self, res: ApplyResult) -> Judged:
        """A finished trial's figures, constraints, step reports and speed verdicts into the study."""
        s, trial = self.session, self.trial
        fig = figures_of(res.report["result"], s.baseline["val"])
        cons = constraint_values(s.budget, fig, s.record.batch_sizes)
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
        trial.set_user_attr("artifacts", str(self.dir.resolve()))
        verdicts = speed_verdicts(res, steps)
        if verdicts:
            trial.set_user_attr("verdicts", _plain(verdicts))
        trial.set_user_attr("seconds", self.seconds())
        return Judged(fig, cons, feasible, steps, verdicts)

    def describe(self, judged: Judged) -> str:
        """The one line a finished trial prints: its figures, whether within budget, its speed verdicts."""
        return describe_figures(judged.figures, self.session.record.batch_sizes, judged.feasible,
                                judged.constraints)
