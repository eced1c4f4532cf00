"""Pruning commands: ``slimkit sensitivity`` and ``slimkit lottery``."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated, Optional

import typer

from .. import _console
from ..cli import DataOpt, ModelOpt, OverwriteOpt, QuietOpt, SeedOpt, TrustOpt, WeightsOpt, app, require_model, stdout
from ..errors import SlimkitError


def _floats(text: str, flag: str) -> list[float]:
    try:
        values = [float(p) for p in text.split(",") if p.strip()]
    except ValueError:
        raise SlimkitError(f"{flag} must be comma-separated numbers like 0.1,0.5,0.9; got '{text}'.") from None
    if not values:
        raise SlimkitError(f"{flag} needs at least one number, like 0.1,0.5,0.9.")
    return values


@app.command("sensitivity")
def sensitivity(
    model: ModelOpt = None,
    weights: WeightsOpt = None,
    data: DataOpt = "digits",
    method: Annotated[str, typer.Option("--method", help="unstructured (weights) or structured (channels).")] = "unstructured",
    ratios: Annotated[str, typer.Option("--ratios", help="Pruning ratios to try per layer, comma separated, each in [0, 1).")] = "0.1,0.3,0.5,0.7,0.9",
    layers: Annotated[Optional[str], typer.Option("--layers", help="Only these layers (names or glob patterns, comma separated).")] = None,
    importance: Annotated[str, typer.Option("--importance", help="Channel ranking for --method structured: l1, l2, taylor or bn-scale.")] = "l2",
    target: Annotated[Optional[float], typer.Option("--target", help="A global ratio in (0, 1): derive per-layer ratios reaching it while sparing sensitive layers (written as a recipe step).")] = None,
    out: Annotated[Path, typer.Option("--out", "-o", help="Folder for sensitivity.json, sensitivity.png (and recipe.yaml with --target).")] = Path("runs/sensitivity"),
    trust_pickle: TrustOpt = False,
    seed: SeedOpt = 0,
    overwrite: OverwriteOpt = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print the report as one JSON object on stdout.")] = False,
    quiet: QuietOpt = False,
) -> None:
    """Prune each layer alone at each ratio (no fine-tune); table and plot of validation accuracy."""
    from rich.table import Table

    from ..methods.prune import sensitivity as _sensitivity

    _console.set_quiet(quiet or as_json)
    require_model(model, weights, "zoo:lenet300 --weights model.safetensors")
    names = [n.strip() for n in layers.split(",") if n.strip()] if layers else None
    rep = _sensitivity(model, data, method, _floats(ratios, "--ratios"), weights=weights, trust_pickle=trust_pickle,
                       layers=names, importance=importance, target=target, out=out, overwrite=overwrite, seed=seed)
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


@app.command("lottery")
def lottery(
    model: ModelOpt = None,
    weights: WeightsOpt = None,
    data: DataOpt = "digits",
    rounds: Annotated[int, typer.Option("--rounds", "-r", help="Pruning rounds; (1 - rate)^rounds of the weights remain.")] = 8,
    rate: Annotated[float, typer.Option("--rate", help="Fraction of the remaining weights pruned each round.")] = 0.2,
    rewind_epoch: Annotated[int, typer.Option("--rewind-epoch", help="Epoch whose weights tickets rewind to (0: the initialisation).")] = 1,
    epochs: Annotated[int, typer.Option("--epochs", "-e", help="Training budget per network.")] = 10,
    lr: Annotated[float, typer.Option(help="Learning rate.")] = 1e-3,
    batch_size: Annotated[int, typer.Option(help="Training batch size.")] = 128,
    optimizer: Annotated[str, typer.Option(help="adam, adamw or sgd.")] = "adam",
    scope: Annotated[str, typer.Option(help="global (one magnitude threshold) or layer (each layer loses the same fraction).")] = "global",
    control: Annotated[bool, typer.Option("--control/--no-control", help="Train the random-reinit control each round.")] = True,
    out: Annotated[Path, typer.Option("--out", "-o", help="Folder for lottery.json, lottery.png, model.safetensors, ticket.safetensors.")] = Path("runs/lottery"),
    trust_pickle: TrustOpt = False,
    seed: SeedOpt = 0,
    overwrite: OverwriteOpt = False,
    quiet: QuietOpt = False,
) -> None:
    """Lottery tickets: iterative magnitude pruning with weight rewinding, and a random-reinit control."""
    from rich.table import Table

    from ..methods.prune import lottery as _lottery
    from ..training import TrainConfig

    _console.set_quiet(quiet)
    require_model(model, weights, "zoo:lenet300")
    cfg = TrainConfig(epochs=max(epochs, 1), lr=lr, batch_size=batch_size, optimizer=optimizer, seed=seed)
    res = _lottery(model, data, rounds=rounds, rate=rate, rewind_epoch=rewind_epoch, epochs=epochs, scope=scope,
                   train=cfg, control=control, weights=weights, trust_pickle=trust_pickle, out=out,
                   overwrite=overwrite, seed=seed)
    t = Table(title=f"lottery tickets (rate {rate}, rewind to epoch {rewind_epoch}): test accuracy")
    for col in ("round", "weights remaining", "ticket", "random reinit"):
        t.add_column(col, justify="right")
    for r in res.report["rounds"]:
        ctrl = r["control_accuracy"]
        t.add_row(str(r["round"]), f"{r['remaining']:.1%}", f"{r['ticket_accuracy']:.4f}",
                  "-" if ctrl is None else f"{ctrl:.4f}")
    stdout.print(t)
    stdout.print(f"wrote {', '.join(res.report['files'].values())}")
