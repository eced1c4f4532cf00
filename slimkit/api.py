"""The public verbs behind the CLI: ``train``, ``profile``, ``apply``, ``demo``.

Each takes either ready objects (an ``nn.Module``, a :class:`~slimkit.data.DataBundle`) or
the same specs the CLI takes (``"zoo:lenet5"``, ``"digits"``), so the CLI and the Python API
behave the same.
"""

from __future__ import annotations

import copy
import dataclasses
import datetime as _dt
import os
import platform
import shutil
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from . import _console, _io
from .data import DataBundle, load_data
from .errors import SlimkitError
from .measure import default_threads
from .measure import profile as _profile
from .models import check_fits, load_model, save_model
from .recipe import Context, Recipe, run_recipe
from .training import TrainConfig, fit, evaluate

__all__ = ["train", "profile", "apply", "demo", "TrainResult", "ApplyResult", "resolve_data", "resolve_model"]


def resolve_data(data: DataBundle | str, seed: int = 0) -> DataBundle:
    return data if isinstance(data, DataBundle) else load_data(data, seed=seed)


def resolve_model(
    model: nn.Module | str | None,
    data: DataBundle,
    *,
    weights: str | Path | None = None,
    trust_pickle: bool = False,
) -> nn.Module:
    """A model object, or the model a spec (and weights) build, checked against the data."""
    if isinstance(model, nn.Module):
        if weights:
            from .models import apply_weights, load_weights

            apply_weights(model, load_weights(weights), str(weights), type(model).__name__)
        m, name = model, type(model).__name__
    else:
        m = load_model(model, weights=weights, trust_pickle=trust_pickle,
                       input_shape=data.input_shape, num_classes=data.num_classes)
        from .models import origin_of

        name = origin_of(m).get("model") or "the model"
    check_fits(m, data.input_shape, data.num_classes, data.name, name)
    return m


def _run_info(target: str | None = None, threads: int | None = None) -> dict[str, Any]:
    return {
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "slimkit": __import__("slimkit").__version__,
        "torch": torch.__version__,
        "machine": {"cpus": os.cpu_count(), "processor": platform.processor() or platform.machine()},
        **({"target": target} if target else {}),
        **({"threads": threads} if threads else {}),
    }


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

    >>> res = train("zoo:lenet300", "digits", epochs=2)
    >>> 0 <= res.report["test_accuracy"] <= 1
    True
    """
    bundle = resolve_data(data, seed)
    if out is not None:
        _io.prepare_out_dir(out, overwrite=overwrite, inputs=[weights])
    torch.manual_seed(seed)  # the initial weights, too, follow the seed
    net = resolve_model(model, bundle, weights=weights)
    cfg = config or TrainConfig(epochs=epochs, seed=seed)
    _console.info(f"training on {bundle.describe()}")
    report = fit(net, bundle, cfg)
    test_acc = evaluate(net, bundle.x_test, bundle.y_test)
    result = {
        "model": model if isinstance(model, str) else type(model).__name__,
        "data": bundle.name,
        "test_accuracy": test_acc,
        "val_accuracy": report["best_val_accuracy"],
        "epochs": report["epochs_run"],
        "best_epoch": report["best_epoch"],
        "seconds": round(report["seconds"], 2),
        "config": dataclasses.asdict(cfg),
        "history": report["history"],
        **_run_info(),
    }
    if out is not None:
        out = Path(out)
        save_model(net, out / "model.safetensors")
        _io.write_json(out / "train.json", result)
        result["files"] = {"weights": str(out / "model.safetensors"), "report": str(out / "train.json")}
    return TrainResult(net, result)


# ----------------------------------------------------------------------------- profile


def profile(
    model: nn.Module | str | None,
    data: DataBundle | str = "digits",
    *,
    weights: str | Path | None = None,
    trust_pickle: bool = False,
    onnx: str | Path | None = None,
    target: str = "ort-cpu",
    batch_sizes: Sequence[int] = (1, 64),
    threads: int | None = None,
    seed: int = 0,
    max_seconds: float = 2.0,
    layers: bool = True,
) -> dict[str, Any]:
    """Measure a model (or an ONNX file with ``onnx=``) on a target; see :func:`slimkit.measure.profile`."""
    bundle = resolve_data(data, seed)
    net = None
    if onnx is None or target != "ort-cpu":
        net = resolve_model(model, bundle, weights=weights, trust_pickle=trust_pickle)
    elif not Path(onnx).is_file():
        raise SlimkitError(f"ONNX file {onnx} does not exist.")
    return _profile(net, bundle, target=target, batch_sizes=batch_sizes, threads=threads,
                    onnx_path=onnx, max_seconds=max_seconds, layers=layers)


# ----------------------------------------------------------------------------- apply


@dataclass
class ApplyResult:
    """What :func:`apply` returns: the compressed model, its artifact and the JSON report."""

    model: nn.Module
    onnx_path: Path
    report: dict[str, Any]


def apply(
    recipe: Recipe | str | Path | list | dict,
    model: nn.Module | str,
    data: DataBundle | str = "digits",
    *,
    weights: str | Path | None = None,
    trust_pickle: bool = False,
    target: str = "ort-cpu",
    batch_sizes: Sequence[int] = (1, 64),
    threads: int | None = None,
    out: str | Path | None = None,
    overwrite: bool = False,
    seed: int = 0,
    max_seconds: float = 2.0,
    layers: bool = True,
    epoch_callbacks: Sequence[Any] = (),
    measure_baseline: bool = True,
    split: str = "test",
) -> ApplyResult:
    """Run a recipe on a copy of the model, export, and measure the artifact on the target.

    With ``out``, writes ``model.onnx``, ``model.safetensors`` and ``result.json`` there
    (each atomically; ``result.json`` last). The input model is never changed. ``split``
    names the data split the result's accuracy is measured on (the search uses ``"val"``).

    >>> res = apply([{"finetune": {"epochs": 1}}, "export"], "zoo:lenet300", "digits", max_seconds=0.2)
    >>> sorted(res.report)[:3]
    ['baseline', 'batch_sizes', 'created']
    """
    from .measure.backends import get_backend

    get_backend(target)  # unknown target: fail before any work
    recipe = Recipe.coerce(recipe)
    recipe.validate(target)
    bundle = resolve_data(data, seed)
    out_dir = _io.prepare_out_dir(out, overwrite=overwrite, inputs=[weights, model if isinstance(model, str) else None]) if out else None
    net = resolve_model(model if isinstance(model, str) else copy.deepcopy(model), bundle,
                        weights=weights, trust_pickle=trust_pickle)
    recipe.check_model(net)  # e.g. unknown layer names: before the baseline is measured
    threads = int(threads or default_threads())
    baseline = None
    if measure_baseline:
        with _console.status(f"measuring the baseline on {target}"):
            baseline = _profile(net, bundle, target=target, batch_sizes=batch_sizes, threads=threads,
                                max_seconds=max_seconds, layers=layers)
    workdir = Path(tempfile.mkdtemp(prefix=".slimkit-work-", dir=out_dir))
    try:
        teacher = copy.deepcopy(net).eval()
        ctx = Context(model=net, data=bundle, workdir=workdir, target=target, threads=threads,
                      batch_sizes=tuple(int(b) for b in batch_sizes), teacher=teacher,
                      epoch_callbacks=list(epoch_callbacks), max_seconds=max_seconds)
        run_recipe(recipe, ctx)
        net = ctx.model  # a step may replace the model (e.g. distill with a student architecture)
        if ctx.onnx_path is None:  # every result is measured on an exported artifact
            from .methods.core import export_step

            ctx.reports.append({"step": "export (automatic)", **export_step(ctx)})
        with _console.status(f"measuring the result on {target}"):
            result = _profile(net if target != "ort-cpu" else None, bundle, target=target,
                              batch_sizes=batch_sizes, threads=threads, onnx_path=ctx.onnx_path,
                              max_seconds=max_seconds, layers=layers, split=split)
        report = {
            "model": model if isinstance(model, str) else type(model).__name__,
            "weights": str(weights) if weights else None,
            "data": bundle.name,
            "batch_sizes": [int(b) for b in batch_sizes],
            "split": split,
            "recipe": recipe.to_data(),
            "baseline": baseline,
            "result": result,
            "parity": ctx.parity,
            "steps": ctx.reports,
            **_run_info(target, threads),
        }
        if out_dir is not None:
            onnx_final = out_dir / "model.onnx"
            _io.atomic_write(onnx_final, lambda tmp: shutil.copyfile(ctx.onnx_path, tmp))
            save_model(net, out_dir / "model.safetensors")
            report["files"] = {"onnx": str(onnx_final), "weights": str(out_dir / "model.safetensors"),
                               "report": str(out_dir / "result.json")}
            for fname, src in ctx.extra.get("outputs", {}).items():  # files a step made, e.g. model.slim
                _io.atomic_write(out_dir / fname, lambda tmp, src=src: shutil.copyfile(src, tmp))
                report["files"][fname] = str(out_dir / fname)
            _io.write_json(out_dir / "result.json", report)
            onnx_path = onnx_final
        else:
            keep = Path(tempfile.mkdtemp(prefix="slimkit-")) / "model.onnx"
            shutil.copyfile(ctx.onnx_path, keep)
            onnx_path = keep
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    return ApplyResult(net, onnx_path, report)


# ----------------------------------------------------------------------------- demo


# The demo's budget: lose at most 1 point of validation accuracy; best = fastest at batch 1 and 64.
DEMO_BUDGET = {"max_accuracy_drop": 0.01}


def demo(out: str | Path = "runs/demo", *, epochs: int = 15, threads: int | None = None, trials: int = 12,
         timeout: float | None = 150.0, max_seconds: float = 0.3) -> Any:
    """Train ``lenet5`` on ``digits``, then ``compress`` it within the default budget (``runs/demo``).

    Searches every registered method for ``trials`` trials (no new trial starts after
    ``timeout`` seconds), prints the before/after table and the report's path.

    >>> res = demo("runs/demo", trials=4)  # doctest: +SKIP
    >>> res.report["result"]["accuracy"] > 0.9  # doctest: +SKIP
    True
    """
    from .report import compare_table
    from .search import compress

    out = Path(out)
    data = load_data("digits")
    _console.info(f"[bold]slimkit demo[/bold]: lenet5 on {data.describe()}")
    trained = train("zoo:lenet5", data, epochs=epochs, out=out / "trained", overwrite=True)
    _console.info(f"trained lenet5: test accuracy {trained.report['test_accuracy']:.4f}; searching for the fastest "
                  f"model that loses at most 1 point of validation accuracy ({trials} trials)")
    res = compress("zoo:lenet5", data, weights=out / "trained" / "model.safetensors", target="ort-cpu",
                   batch_sizes=(1, 64), threads=threads, objective="latency", trials=trials, timeout=timeout, out=out,
                   overwrite=True, max_seconds=max_seconds, **DEMO_BUDGET)
    best = res.report["best"]
    _console.console.print(compare_table(res.report["baseline"], res.report["result"],
                                         title=f"slimkit demo: baseline / best (trial {best['trial']}, test split)"))
    _console.info(f"results in {out}/ (best.onnx, best.safetensors, best_recipe.yaml, trials.csv, result.json)")
    _console.console.print(f"report: {out / 'report.html'}", soft_wrap=True)
    return res
