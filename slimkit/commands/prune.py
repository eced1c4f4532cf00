"""Pruning commands: ``slimkit sensitivity`` and ``slimkit lottery``."""

from __future__ import annotations

import dataclasses
import json
import sys
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.table import Table

from .. import _console
from ..errors import NotMetError, SlimkitError
from ..methods.prune import LotteryConfig, SensitivityConfig, lottery as _lottery, sensitivity as _sensitivity
from ..models import ModelRef
from ..pipeline import AccuracyVerdict
from ..search import Budget
from ..training import TrainConfig
from .core import BUDGET_HELP
from ._app import OVERWRITE, SEED, DataOpt, QuietOpt, command, option, options, require_model, run_out, stdout


def _floats(text: str, flag: str) -> list[float]:
    try:
        values = [float(p) for p in text.split(",") if p.strip()]
    except ValueError:
        raise SlimkitError(f"{flag} must be comma-separated numbers like 0.1,0.5,0.9; got '{text}'.") from None
    if not values:
        raise SlimkitError(f"{flag} needs at least one number, like 0.1,0.5,0.9.")
    return values


@command("sensitivity")
def sensitivity(
    model: ModelRef = options(ModelRef),
    data: DataOpt = "digits",
    method: Annotated[str, typer.Option("--method", help="unstructured (weights) or structured (channels).")] = "unstructured",
    ratios: Annotated[str, typer.Option("--ratios", help="Pruning ratios to try per layer, comma separated, each in [0, 1).")] = "0.1,0.3,0.5,0.7,0.9",
    layers: Annotated[Optional[str], typer.Option("--layers", help="Only these layers (names or glob patterns, comma separated).")] = None,
    importance: Annotated[str, typer.Option("--importance", help="Channel ranking for --method structured: l1, l2, taylor or bn-scale.")] = "l2",
    target: Annotated[Optional[float], typer.Option("--target", help="A global ratio in (0, 1): derive per-layer ratios reaching it while sparing sensitive layers (written as a recipe step).")] = None,
    out: Path = run_out("runs/sensitivity",
                        "Folder for sensitivity.json, sensitivity.png (and recipe.yaml with --target)."),
    seed: int = SEED,
    overwrite: bool = OVERWRITE,
    as_json: Annotated[bool, typer.Option("--json", help="Print the report as one JSON object on stdout.")] = False,
    quiet: QuietOpt = False,
) -> None:
    """Prune each layer alone at each ratio (no fine-tune); table and plot of validation accuracy."""
    _console.set_quiet(quiet or as_json)
    require_model(model.spec, model.weights, "zoo:lenet300 --weights model.safetensors")
    names = [n.strip() for n in layers.split(",") if n.strip()] if layers else None
    # model.spec is None for a model slimkit saved (its weights alone): the methods resolve that too
    cfg = SensitivityConfig(method, _floats(ratios, "--ratios"), importance=importance, target=target, layers=names)
    rep = _sensitivity(model, data, cfg, out=out, overwrite=overwrite, seed=seed)
    if as_json:
        sys.stdout.write(json.dumps(rep) + "\n")
        return
    t = Table(title=f"{method} sensitivity: validation accuracy, unpruned {rep['baseline_accuracy']:.4f}")
    t.add_column("layer")
    t.add_column("params", justify="right")
    for r in rep["ratios"]:
        t.add_column(f"{r:g}", justify="right")
    if "allocation" in rep:
        t.add_column("ratio for target", justify="right")
    for name, row in rep["layers"].items():
        cells = [name, f"{row['params']:,}", *(f"{a:.4f}" for a in row["accuracy"])]
        if "allocation" in rep:
            cells.append(f"{rep['allocation']['ratios'][name]:g}")
        t.add_row(*cells)
    stdout.print(t)
    if "allocation" in rep:
        a = rep["allocation"]
        stdout.print(f"per-layer ratios reach {a['achieved']:.3f} of the weights (target {a['target']}), "
                     f"each layer losing at most {a['tolerance']:.4f} accuracy alone; recipe step in {out}/recipe.yaml")
    stdout.print(f"wrote {', '.join(rep['files'].values())}")


@command("lottery")
def lottery(
    model: ModelRef = options(ModelRef),
    data: DataOpt = "digits",
    rounds: Annotated[int, typer.Option("--rounds", "-r", help="Pruning rounds; (1 - rate)^rounds of the weights remain.")] = 8,
    rate: Annotated[float, typer.Option("--rate", help="Fraction of the remaining weights pruned each round.")] = 0.2,
    rewind_epoch: Annotated[int, typer.Option("--rewind-epoch", help="Epoch whose weights tickets rewind to (0: the initialisation).")] = 1,
    config: TrainConfig = options(TrainConfig, only=("epochs", "lr", "batch_size", "optimizer"),
                                  help={"epochs": "Training budget per network."}),
    scope: Annotated[str, typer.Option(help="global (one magnitude threshold) or layer (each layer loses the same fraction).")] = "global",
    control: Annotated[bool, typer.Option("--control/--no-control", help="Train the random-reinit control each round.")] = True,
    max_accuracy_drop: Optional[float] = option(Budget, "max_accuracy_drop", help=BUDGET_HELP["max_accuracy_drop"]),
    out: Path = run_out("runs/lottery",
                        "Folder for lottery.json, lottery.png, model.safetensors, ticket.safetensors."),
    seed: int = SEED,
    overwrite: bool = OVERWRITE,
    quiet: QuietOpt = False,
) -> None:
    """Lottery tickets: iterative magnitude pruning with weight rewinding, and a random-reinit control."""
    _console.set_quiet(quiet)
    require_model(model.spec, model.weights, "zoo:lenet300")
    rounds_cfg = LotteryConfig(rounds=rounds, rate=rate, rewind_epoch=rewind_epoch, scope=scope, control=control)
    res = _lottery(model, data, rounds_cfg, train=dataclasses.replace(config, seed=seed), out=out, overwrite=overwrite,
                   max_accuracy_drop=max_accuracy_drop)
    t = Table(title=f"lottery tickets (rate {rate}, rewind to epoch {rewind_epoch}): test accuracy")
    for col in ("round", "weights remaining", "ticket", "random reinit"):
        t.add_column(col, justify="right")
    for r in res.report["rounds"]:
        ctrl = r["control_accuracy"]
        t.add_row(str(r["round"]), f"{r['remaining']:.1%}", f"{r['ticket_accuracy']:.4f}",
                  "-" if ctrl is None else f"{ctrl:.4f}")
    stdout.print(t)
    stdout.print(f"wrote {', '.join(res.report['files'].values())}")
    if not res.report["within_budget"]:
        raise NotMetError(AccuracyVerdict.from_data(res.report["accuracy"]).message(str(out), "lottery.json"))
