"""``slimkit compress`` (search for the best model within a budget) and ``slimkit worker`` (join one)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from .. import _console, api
from ..measure import Target
from ..models import ModelRef
from ..report import compare_table
from ..search import Budget, CompressSpace, Search, Store, WorkerOptions
from ._app import DataOpt, QuietOpt, command, flags_of, options, require_model, stdout


@command()
def compress(
    model: ModelRef = options(ModelRef),
    data: DataOpt = "digits",
    target: Target = options(Target, defaults={"max_seconds": 1.0}, help={
        "max_seconds": "Time cap per batch size when timing each trial's artifact."}),
    budget: Budget = options(Budget),
    search: Search = options(Search, defaults={"objective": "latency"}, help={
        "objective": "What 'best' means among the trials within budget: latency, size or accuracy."}),
    store: Store = options(Store),
    space: CompressSpace = options(CompressSpace),
    quiet: QuietOpt = False,
) -> None:
    """Search every method for the best model within a budget (resumable: run it again to go on)."""
    _console.set_quiet(quiet)
    require_model(model.spec, model.weights)
    with flags_of(Budget, Search, Store, CompressSpace, Target):
        res = api.compress(model, data, budget=budget, target=target, search=search, store=store, space=space)
    out = store.out
    if res.report is None:
        stdout.print(f"study ready in {out}; no trial yet")
        return
    best = res.report["best"]
    stdout.print(compare_table(res.report["baseline"], res.report["result"],
                               title=f"baseline / best (trial {best['trial']}, test split)"))
    stdout.print(f"wrote {out}/best.onnx, best.safetensors, best_recipe.yaml, trials.csv, result.json")
    stdout.print(f"report: {out}/report.html")


@command()
def worker(
    storage: Annotated[str, typer.Option("--storage", help="The study's storage URL, e.g. postgresql://user:pw@host:5432/db.")],
    study: Annotated[str, typer.Option("--study", help="The study's name (slimkit compress prints it).")],
    trials: Annotated[int, typer.Option("--trials", "-n", help="Trials to run in this process.")] = 10,
    timeout: Annotated[Optional[float], typer.Option("--timeout", help="Start no new trial after this many seconds.")] = None,
    out: Annotated[Optional[Path], typer.Option("--out", "-o", help="Where this worker keeps its trials' files "
                                                "(default: the study's --out folder, if this machine shares it).")] = None,
    weights: Annotated[Optional[Path], typer.Option("--weights", "-w", help="A copy of the study's input weights on "
                                                    "this machine (default: the path the study was started with).")] = None,
    total: Annotated[Optional[int], typer.Option("--total", help="Stop once the study holds this many finished "
                                                 "trials (all workers together).")] = None,
    run: WorkerOptions = options(WorkerOptions),
    quiet: QuietOpt = False,
) -> None:
    """Join a search started by `slimkit compress --storage URL`: run more of its trials here."""
    _console.set_quiet(quiet)
    counts = api.worker(storage, study, trials=trials, timeout=timeout, out=out, weights=weights, total=total,
                        options=run)
    stdout.print(f"study '{study}': {sum(counts.values())} finished trials ({counts['complete']} complete, "
                 f"{counts['pruned']} stopped early, {counts['fail']} failed)")
