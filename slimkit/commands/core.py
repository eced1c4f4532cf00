"""The spine's commands: ``train``, ``profile``, ``apply``, ``demo`` and ``steps``."""

from __future__ import annotations

import dataclasses
import json
import sys
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.table import Table

from .. import _console
from .. import api
from ..errors import NotMetError, SlimkitError
from ..measure import Target
from ..models import ModelRef
from ..pipeline import Recipe, get_step, step_names
from ..report import compare_table, layers_table, profile_table
from ..search import Budget, Search
from ..training import FROM_SCRATCH, TrainConfig
from ._app import OVERWRITE, SEED, DataOpt, QuietOpt, command, flags_of, option, options, require_model, run_out, stdout

__all__ = ["train", "profile", "apply", "demo", "steps", "finish_apply", "BUDGET_HELP"]


# How a command that changes a model reads --max-accuracy-drop (the search's flag, a per-command meaning)
BUDGET_HELP = {"max_accuracy_drop": "Test accuracy the model may lose, as a fraction (0.01 = 1 point); past it the "
               "artifacts are still written, result.json says within_budget: false and the command exits 3."}


@command()
def train(
    model: ModelRef = options(ModelRef, only=("spec", "weights")),
    data: DataOpt = "digits",
    config: TrainConfig = options(TrainConfig, only=("epochs", "min_steps", "lr", "batch_size", "optimizer", "patience"),
                                   defaults=FROM_SCRATCH),
    out: Path = run_out("runs/train", "Folder for model.safetensors and train.json."),
    seed: int = SEED,
    overwrite: bool = OVERWRITE,
    quiet: QuietOpt = False,
) -> None:
    """Train a model and write DIR/model.safetensors and DIR/train.json."""
    _console.set_quiet(quiet)
    if not model.spec:
        raise SlimkitError("--model is required, e.g. --model zoo:lenet5.")
    cfg = dataclasses.replace(config, seed=seed)
    res = api.train(model.spec, data, epochs=cfg.epochs, out=out, weights=model.weights, config=cfg, seed=seed,
                    overwrite=overwrite)
    r = res.report
    stdout.print(f"test accuracy {r['test_accuracy']:.4f} after {r['epochs']} epochs, {r['steps']} steps "
                 f"({r['seconds']:.1f}s); "
                 f"wrote {out}/model.safetensors and {out}/train.json")
    if r["kept_initial_weights"]:
        raise NotMetError(f"training did not improve on the initial weights in {r['epochs']} epochs (validation "
                          f"accuracy {r['val_accuracy']:.4f}); {out}/model.safetensors holds the initial weights. "
                          "Train longer (--epochs), try another --lr, or check the data.")


@command()
def profile(
    model: ModelRef = options(ModelRef),
    data: DataOpt = "digits",
    target: Target = options(Target),
    onnx: Annotated[Optional[Path], typer.Option("--onnx", help="Profile this ONNX file instead of a torch model (ort-cpu).")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object on stdout instead of tables.")] = False,
    seed: int = SEED,
) -> None:
    """Measure a model on a target: params, MACs, size, accuracy, latency, and per layer."""
    _console.set_quiet(as_json)
    if model.spec is None and onnx is None and model.weights is None:
        raise SlimkitError("give --model (with --weights), --weights of a model slimkit saved, or --onnx FILE to profile.")
    if model.spec and model.spec.startswith("zoo:") and model.weights is None:
        _console.info("note: no --weights given, so the zoo model is measured with its initial (untrained) "
                      "weights; accuracy will be near chance.")
    p = api.profile(model, data, onnx=onnx, seed=seed, target=target)
    if as_json:
        sys.stdout.write(json.dumps(p) + "\n")
        return
    stdout.print(profile_table(p, title=f"{model.spec or onnx}"))
    stdout.print(layers_table(p))


@command()
def apply(
    recipe: Annotated[Path, typer.Argument(help="Recipe YAML: a list of steps, e.g. [{finetune: {epochs: 3}}, export].")],
    model: ModelRef = options(ModelRef),
    data: DataOpt = "digits",
    target: Target = options(Target),
    budget: Budget = options(Budget, help=BUDGET_HELP),
    out: Path = run_out("runs/apply"),
    seed: int = SEED,
    overwrite: bool = OVERWRITE,
    quiet: QuietOpt = False,
) -> None:
    """Run a recipe on a model, export it, and measure before and after on the target."""
    _console.set_quiet(quiet)
    rec = Recipe.load(recipe)  # a bad recipe fails here, before anything is loaded
    require_model(model.spec, model.weights)
    with flags_of(Budget):  # e.g. a latency limit for a batch size --batch does not measure
        res = api.apply(rec, model, data, out=out, overwrite=overwrite, seed=seed, target=target, budget=budget)
    finish_apply(res.report, out, title=str(recipe))


def finish_apply(report: dict, out: Path, title: str) -> None:
    """Print an applied recipe's before/after table; exit 3 (:class:`NotMetError`) when a request was not met."""
    stdout.print(compare_table(report["baseline"], report["result"], title=title))
    stdout.print(f"wrote {out}/model.onnx, {out}/model.safetensors, {out}/result.json")
    if report["not_met"]:
        raise NotMetError(" ".join(report["not_met"]) + f" The artifacts in {out} are written; result.json lists "
                          "this under not_met.")


@command()
def demo(
    out: Path = run_out("runs/demo", "Where the demo writes its results."),
    epochs: int = option(TrainConfig, "epochs", default=15, help="Epochs to train lenet5 on digits first."),
    threads: Optional[int] = option(Target, "threads"),
    trials: int = option(Search, "trials", default=12, help="Trials of the search."),
    timeout: Optional[float] = option(Search, "timeout", default=150.0),
) -> None:
    """Train lenet5 on digits, search for the fastest model within 1 point of accuracy, print before/after."""
    api.demo(out, epochs=epochs, threads=threads, trials=trials, timeout=timeout)


@command()
def steps() -> None:
    """List the recipe steps and their fields (with defaults)."""
    t = Table(title="recipe steps")
    t.add_column("step")
    t.add_column("what it does")
    t.add_column("fields (default)")
    for name in step_names():
        spec = get_step(name)
        fields = ", ".join(f"{f.name}={f.default!r}" if f.default is not dataclasses.MISSING else f.name
                           for f in dataclasses.fields(spec.config))
        t.add_row(name, spec.doc, fields)
    stdout.print(t)
