"""The public verbs behind the CLI: ``train``, ``profile``, ``apply``, ``compress``, ``nas``,
``worker``, ``demo``.

Each takes either ready objects (an ``nn.Module``, a :class:`~slimkit.data.DataBundle`) or
the same specs the CLI takes (``"zoo:lenet5"``, ``"digits"``), so the CLI and the Python API
behave the same.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from . import _console, _io
from ._provenance import run_info
from .data import DataBundle, load_data, resolve_data
from .errors import SlimkitError
from .measure import Target
from .measure import profile as _profile
from .models import ModelRef, resolve_model, save_model
from .nas import NasResult, NasSpace, nas, nas_worker
from .pipeline import AccuracyVerdict, ApplyResult, Recipe, apply_recipe, fits_in, training_hints, write_result
from .report import compare_table
from .search import (Budget, CompressResult, CompressSpace, Search, Store, WorkerOptions, check_worker_args, compress,
                     compress_worker, constraint_limits, constraint_values, figures_of, join_study, trial_counts)
from .training import FROM_SCRATCH, TrainConfig, evaluate, fit

__all__ = ["train", "profile", "apply", "compress", "nas", "worker", "demo", "TrainResult", "ApplyResult",
           "CompressResult", "NasResult", "ModelRef", "Target", "Budget", "Search", "Store", "CompressSpace",
           "NasSpace", "WorkerOptions"]


# ----------------------------------------------------------------------------- train


@dataclass
class TrainResult:
    """What :func:`train` returns: the trained model and the ``train.json`` report."""

    model: nn.Module
    report: dict[str, Any]


def train(
    model: nn.Module | str,
    data: DataBundle | str = "digits",
    *,
    epochs: int = 10,
    out: str | Path | None = None,
    weights: str | Path | None = None,
    config: TrainConfig | None = None,
    seed: int = 0,
    overwrite: bool = False,
) -> "TrainResult":
    """Train a model; with ``out``, write ``model.safetensors`` and ``train.json`` there.

    Without ``config`` it trains as :data:`slimkit.training.FROM_SCRATCH` says: at least
    ``epochs`` epochs and at least 2,000 optimisation steps (a small data set gets more epochs).

    >>> res = train("zoo:lenet300", "digits", epochs=2)
    >>> 0 <= res.report["test_accuracy"] <= 1
    True
    """
    bundle = resolve_data(data, seed)
    torch.manual_seed(seed)  # the initial weights, too, follow the seed
    net = resolve_model(model, bundle, weights=weights)  # bad inputs fail before --out is created
    if out is not None:
        _io.prepare_out_dir(out, overwrite=overwrite, inputs=[weights])
    cfg = config or TrainConfig(epochs=epochs, seed=seed, **FROM_SCRATCH)
    _console.info(f"training on {bundle.describe()}")
    report = fit(net, bundle, cfg)
    test_acc = evaluate(net, bundle.x_test, bundle.y_test)
    kept_initial = cfg.epochs > 0 and report["best_epoch"] == 0
    if kept_initial:
        _console.info(f"[yellow]no epoch beat the initial weights[/yellow] (validation accuracy "
                      f"{report['best_val_accuracy']:.4f} before training): kept the initial weights. Train longer "
                      "(--epochs), with another --lr, or check the data.")
    result = {
        "model": model if isinstance(model, str) else type(model).__name__,
        "data": bundle.name,
        "test_accuracy": test_acc,
        "val_accuracy": report["best_val_accuracy"],
        "epochs": report["epochs_run"],
        "steps": report["steps"],
        "best_epoch": report["best_epoch"],
        "kept_initial_weights": kept_initial,
        "seconds": round(report["seconds"], 2),
        "config": dataclasses.asdict(cfg),
        "history": report["history"],
        **run_info(),
    }
    if out is not None:
        out = Path(out)
        save_model(net, out / "model.safetensors")
        _io.write_json(out / "train.json", result)
        result["files"] = {"weights": str(out / "model.safetensors"), "report": str(out / "train.json")}
    return TrainResult(net, result)


def _trained_before(folder: Path, config: TrainConfig) -> dict[str, Any] | None:
    """``train.json`` of a model ``train`` wrote to ``folder`` with ``config`` and this slimkit, or None."""
    try:
        report = json.loads((folder / "train.json").read_text())
    except (OSError, ValueError):
        return None
    same = (report.get("config") == json.loads(json.dumps(dataclasses.asdict(config)))
            and report.get("slimkit") == run_info()["slimkit"] and (folder / "model.safetensors").is_file())
    return report if same else None


# ----------------------------------------------------------------------------- profile


def profile(
    model: nn.Module | str | ModelRef | None,
    data: DataBundle | str = "digits",
    *,
    target: Target = Target(),
    onnx: str | Path | None = None,
    seed: int = 0,
) -> dict[str, Any]:
    """Measure a model (or an ONNX file with ``onnx=``) on a target; see :func:`slimkit.measure.profile`.

    >>> p = profile("zoo:lenet300", "digits", target=Target(batch_sizes=(1,), max_seconds=0.1))
    >>> p["params"]
    50610
    """
    bundle = resolve_data(data, seed)
    net = None
    if onnx is None or target.runtime != "ort-cpu":
        net = resolve_model(model, bundle)
    elif not Path(onnx).is_file():
        raise SlimkitError(f"ONNX file {onnx} does not exist.")
    return _profile(net, bundle, target, onnx_path=onnx)


# ----------------------------------------------------------------------------- apply


def apply(
    recipe: Recipe | str | Path | list | dict,
    model: nn.Module | str | ModelRef,
    data: DataBundle | str = "digits",
    *,
    target: Target = Target(),
    out: str | Path | None = None,
    overwrite: bool = False,
    seed: int = 0,
    budget: Budget | None = Budget(),
) -> ApplyResult:
    """Run a recipe on a copy of the model, export, and measure the artifact on the target.

    With ``out``, writes ``model.onnx``, ``model.safetensors`` and ``result.json`` there
    (each atomically; ``result.json`` last). The input model is never changed.

    ``budget``: what the result may cost against the input model, measured first on the same
    split. By default it may lose 1 point of test accuracy (``Budget().max_accuracy_drop``);
    latency, throughput and size limits are judged too when given. Past a limit the artifacts
    are still written, ``result.json`` says ``within_budget: false`` and lists why under
    ``not_met`` (the CLI exits 3). ``None`` measures no baseline and judges nothing.

    >>> res = apply([{"finetune": {"epochs": 1}}, "export"], "zoo:lenet300", "digits",
    ...             target=Target(max_seconds=0.1))
    >>> sorted(res.report)[:3]
    ['accuracy', 'baseline', 'batch_sizes']
    """
    recipe = Recipe.coerce(recipe)
    recipe.validate(target.runtime)
    limits = budget.resolve(target.batch_sizes) if budget is not None else None  # a bad budget fails first
    bundle = resolve_data(data, seed)
    ref = model if isinstance(model, ModelRef) else None
    weights = ref.weights if ref else None
    spec = ref.spec if ref else model
    net = resolve_model(copy.deepcopy(model) if isinstance(model, nn.Module) else model, bundle)
    recipe.check_model(net)  # e.g. unknown layer names: before anything is measured or --out created
    out_dir = _io.prepare_out_dir(out, overwrite=overwrite, inputs=[weights, spec if isinstance(spec, str) else None]) \
        if out else None
    res = apply_recipe(recipe, net, bundle, target, out=out_dir, baseline=limits is not None)
    name = (ref.name if ref else model) if not isinstance(model, nn.Module) else type(model).__name__
    res.report = {"model": name, "weights": str(weights) if weights else None, **res.report}
    if limits is not None:
        _judge(res.report, limits, target, out_dir)
    if out_dir is not None:
        write_result(out_dir, res.report)
    for note in res.report["not_met"]:
        _console.info(f"[yellow]not met[/yellow]: {note}")
    return res


def _judge(report: dict[str, Any], budget: Budget, target: Target, out: Path | None) -> None:
    """Judge an applied recipe against ``budget``: ``accuracy``, ``within_budget`` and ``not_met`` in ``report``."""
    base, result = report["baseline"], report["result"]
    verdict = AccuracyVerdict(float(base["accuracy"]), float(result["accuracy"]), budget.max_accuracy_drop,
                              split=report["split"], hints=training_hints(fits_in(report["steps"])))
    verdict.report()
    report["accuracy"] = verdict.to_data()
    if not verdict.within_budget:
        report["not_met"].append(verdict.message(str(out) if out else "the result"))
    costs = dataclasses.replace(budget, max_accuracy_drop=None)  # accuracy is judged above, with its hints
    fig = figures_of(result, base)
    sizes = [int(b) for b in target.batch_sizes]
    limits = constraint_limits(costs, sizes)
    for key, excess in constraint_values(costs, fig, sizes).items():
        if excess > 0:
            report["not_met"].append(f"over the budget: {key} is {limits[key] + excess:.4g} (limit {limits[key]:.4g}).")
    report["budget"] = dataclasses.asdict(budget)
    report["within_budget"] = not report["not_met"]


# ----------------------------------------------------------------------------- worker


def worker(
    storage: str,
    study: str,
    *,
    trials: int = 10,
    total: int | None = None,
    timeout: float | None = None,
    out: str | Path | None = None,
    weights: str | Path | None = None,
    options: WorkerOptions | None = None,
) -> dict[str, int]:
    """Run ``trials`` more trials of a study that ``compress`` or ``nas`` started (``--storage`` shared).

    The study holds the whole search configuration (its kind decides which search runs here), so
    nothing else is needed; ``out`` puts this worker's trial files elsewhere (another machine),
    ``weights`` points at a copy of the input weights (its hash must match); ``total`` stops the
    worker once the study holds that many finished trials (trained candidates for ``nas``), all
    workers together; ``options`` override the study's sampler or show each step's output.
    Returns the study's trial counts afterwards.

    >>> worker("postgresql://user@db:5432/slimkit", "lenet5-search", trials=10)  # doctest: +SKIP
    {'complete': 10, 'pruned': 0, 'fail': 0}
    """
    check_worker_args(trials, total, timeout)
    joined = join_study(storage, study, weights=weights)
    run = nas_worker if joined.record.kind == "nas" else compress_worker
    run(joined, trials=trials, total=total, timeout=timeout, out=Path(out) if out else None,
        options=options or WorkerOptions())
    counts = trial_counts(joined.study)
    _console.info(f"worker {os.getpid()} done; the study holds {sum(counts.values())} finished trials "
                  f"({counts['complete']} complete)")
    return counts


# ----------------------------------------------------------------------------- demo


# The demo's budget: lose at most 1 point of validation accuracy; best = fastest at batch 1 and 64.
DEMO_BUDGET = Budget(max_accuracy_drop=0.01)


def demo(out: str | Path = "runs/demo", *, epochs: int = 15, threads: int | None = None, trials: int = 12,
         timeout: float | None = 150.0, max_seconds: float = 0.3) -> CompressResult:
    """Train ``lenet5`` on ``digits``, then ``compress`` it within the default budget (``runs/demo``).

    Searches every registered method for ``trials`` trials (no new trial starts after
    ``timeout`` seconds), prints the before/after table and the report's path.

    >>> res = demo("runs/demo", trials=4)  # doctest: +SKIP
    >>> res.report["result"]["accuracy"] > 0.9  # doctest: +SKIP
    True
    """
    out = Path(out)
    data = load_data("digits")
    _console.info(f"[bold]slimkit demo[/bold]: lenet5 on {data.describe()}")
    report = _trained_before(out / "trained", TrainConfig(epochs=epochs, **FROM_SCRATCH))
    if report is None:
        report = train("zoo:lenet5", data, epochs=epochs, out=out / "trained", overwrite=True).report
    else:
        _console.info(f"reusing the lenet5 trained in {out / 'trained'} by an earlier demo (same settings)")
    _console.info(f"trained lenet5: test accuracy {report['test_accuracy']:.4f}; searching for the fastest "
                  f"model that loses at most 1 point of validation accuracy ({trials} trials)")
    res = compress(ModelRef("zoo:lenet5", weights=out / "trained" / "model.safetensors"), data, budget=DEMO_BUDGET,
                   target=Target("ort-cpu", batch_sizes=(1, 64), threads=threads, max_seconds=max_seconds),
                   search=Search(objective="latency", trials=trials, timeout=timeout),
                   store=Store(out=out, overwrite=True))
    assert res.report is not None
    best = res.report["best"]
    _console.console.print(compare_table(res.report["baseline"], res.report["result"],
                                         title=f"slimkit demo: baseline / best (trial {best['trial']}, test split)"))
    _console.info(f"results in {out}/ (best.onnx, best.safetensors, best_recipe.yaml, trials.csv, result.json)")
    _console.console.print(f"report: {out / 'report.html'}", soft_wrap=True)
    return res
