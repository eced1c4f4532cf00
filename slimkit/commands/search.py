"""``slimkit compress`` (search for the best model within a budget) and ``slimkit worker`` (join one)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from .. import _console
from ..cli import (BatchOpt, DataOpt, ModelOpt, QuietOpt, SeedOpt, TargetOpt, ThreadsOpt,
                   TrustOpt, WeightsOpt, app, parse_batches, require_model, stdout)

VerboseOpt = Annotated[bool, typer.Option("--verbose", "-v", help="Show every step's output inside each trial.")]
TimeoutOpt = Annotated[Optional[float], typer.Option("--timeout", help="Start no new trial after this many seconds.")]


@app.command()
def compress(
    model: ModelOpt = None,
    weights: WeightsOpt = None,
    data: DataOpt = "digits",
    target: TargetOpt = "ort-cpu",
    batch: BatchOpt = "1,64",
    threads: ThreadsOpt = None,
    max_latency_ms: Annotated[Optional[str], typer.Option(
        "--max-latency-ms", help="Latency limit in ms for the smallest batch size (e.g. 0.5), or per batch size "
        "(e.g. 1:0.5,64:8).")] = None,
    min_throughput: Annotated[Optional[float], typer.Option(
        "--min-throughput", help="Examples per second the largest batch size must reach.")] = None,
    max_size_kb: Annotated[Optional[float], typer.Option("--max-size-kb", help="Size limit of the exported artifact (KB).")] = None,
    max_accuracy_drop: Annotated[float, typer.Option(
        "--max-accuracy-drop", help="Validation accuracy the model may lose, as a fraction (0.01 = 1 point).")] = 0.01,
    objective: Annotated[str, typer.Option("--objective", help="What 'best' means among the trials within budget: "
                                           "latency, size or accuracy.")] = "latency",
    trials: Annotated[int, typer.Option("--trials", "-n", help="Trials the study should hold (earlier runs' count; "
                                        "0 only sets the study up for workers).")] = 20,
    timeout: TimeoutOpt = None,
    sampler: Annotated[str, typer.Option("--sampler", help="tpe, nsga2, gp, random or grid.")] = "tpe",
    storage: Annotated[Optional[str], typer.Option(
        "--storage", help="Optuna storage URL shared by workers, e.g. postgresql://user:pw@host:5432/db "
        "(default: a SQLite file in --out).")] = None,
    study: Annotated[Optional[str], typer.Option("--study", help="Study name (default: the --out folder's name).")] = None,
    out: Annotated[Path, typer.Option("--out", "-o", help="Folder for the study, the trials and the results.")] = Path("runs/compress"),
    methods: Annotated[Optional[str], typer.Option(
        "--methods", help="Search only these steps, comma separated (default: every step with a search space; "
        "see slimkit steps).")] = None,
    finetune_batches: Annotated[Optional[int], typer.Option(
        "--finetune-batches", help="Cap on batches per fine-tune epoch in each trial (quicker trials).")] = None,
    val_size: Annotated[Optional[int], typer.Option(
        "--val-size", help="Judge trials on this many validation examples (a fixed subset; default: all).")] = None,
    warm: Annotated[bool, typer.Option("--warm-start/--no-warm-start", help="Try each method alone in the first "
                                       "trials, before the sampler combines them.")] = True,
    trust_pickle: TrustOpt = False,
    seed: SeedOpt = 0,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Start a new search in --out, deleting the previous "
                                            "one's study and results.")] = False,
    max_seconds: Annotated[float, typer.Option("--max-seconds", help="Time cap per batch size when timing each "
                                               "trial's artifact.")] = 1.0,
    verbose: VerboseOpt = False,
    quiet: QuietOpt = False,
) -> None:
    """Search every method for the best model within a budget (resumable: run it again to go on)."""
    from ..report import compare_table
    from ..search import compress as _compress

    _console.set_quiet(quiet)
    require_model(model, weights)
    res = _compress(model, data, weights=weights, trust_pickle=trust_pickle, target=target,
                    batch_sizes=parse_batches(batch), threads=threads, max_latency_ms=max_latency_ms,
                    min_throughput=min_throughput, max_size_kb=max_size_kb, max_accuracy_drop=max_accuracy_drop,
                    objective=objective, trials=trials, timeout=timeout, sampler=sampler, storage=storage, study=study,
                    out=out, overwrite=overwrite, seed=seed, max_seconds=max_seconds, finetune_batches=finetune_batches,
                    methods=[m for m in methods.split(",") if m.strip()] if methods else None, warm=warm, val_size=val_size,
                    verbose=verbose)
    if res.report is None:
        stdout.print(f"study ready in {out}; no trial yet")
        return
    best = res.report["best"]
    stdout.print(compare_table(res.report["baseline"], res.report["result"],
                               title=f"baseline / best (trial {best['trial']}, test split)"))
    stdout.print(f"wrote {out}/best.onnx, best.safetensors, best_recipe.yaml, trials.csv, result.json")
    stdout.print(f"report: {out}/report.html")


@app.command()
def worker(
    storage: Annotated[str, typer.Option("--storage", help="The study's storage URL, e.g. postgresql://user:pw@host:5432/db.")],
    study: Annotated[str, typer.Option("--study", help="The study's name (slimkit compress prints it).")],
    trials: Annotated[int, typer.Option("--trials", "-n", help="Trials to run in this process.")] = 10,
    timeout: TimeoutOpt = None,
    out: Annotated[Optional[Path], typer.Option("--out", "-o", help="Where this worker keeps its trials' files "
                                                "(default: the study's --out folder, if this machine shares it).")] = None,
    weights: Annotated[Optional[Path], typer.Option("--weights", "-w", help="A copy of the study's input weights on "
                                                    "this machine (default: the path the study was started with).")] = None,
    sampler: Annotated[Optional[str], typer.Option("--sampler", help="Override the study's sampler for this worker.")] = None,
    total: Annotated[Optional[int], typer.Option("--total", help="Stop once the study holds this many finished "
                                                 "trials (all workers together).")] = None,
    verbose: VerboseOpt = False,
    quiet: QuietOpt = False,
) -> None:
    """Join a search started by `slimkit compress --storage URL`: run more of its trials here."""
    from ..search import worker as _worker

    _console.set_quiet(quiet)
    counts = _worker(storage, study, trials=trials, timeout=timeout, out=out, weights=weights, sampler=sampler,
                     total=total, verbose=verbose)
    stdout.print(f"study '{study}': {sum(counts.values())} finished trials ({counts['complete']} complete, "
                 f"{counts['pruned']} stopped early, {counts['fail']} failed)")
