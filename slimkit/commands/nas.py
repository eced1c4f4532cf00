"""``slimkit latency-table`` (measure a family's blocks on a target) and ``slimkit nas`` (search its architectures)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Optional

import typer

from .. import _console, api
from ..errors import SlimkitError
from ..measure import Target
from ..models import ModelRef
from ..nas import NasSpace, TableConfig, build_latency_table
from ..report import compare_table
from ..search import Budget, Search, Store
from ..training import TrainConfig
from ._app import SEED, DataOpt, QuietOpt, command, flags_of, option, options, stdout

FamilyOpt = Annotated[str, typer.Option("--family", "-f", help="Architecture family: mobilenetv2 or resnet "
                                        "(slimkit.nas.family_names()).")]
SpaceOpt = Annotated[Optional[Path], typer.Option("--space", help="YAML file narrowing the family's space (width, and "
                                                  "per stage blocks / kernel / expand choices).")]
BatchOneOpt = Annotated[int, typer.Option("--batch", "-b", help="Batch size the latency is measured and limited at.")]


@command("latency-table")
def latency_table(
    family: FamilyOpt = "mobilenetv2",
    data: DataOpt = "digits",
    target: str = option(Target, "runtime"),
    batch: BatchOneOpt = 1,
    threads: Optional[int] = option(Target, "threads"),
    out: Annotated[Path, typer.Option("--out", "-o", help="Where to write the table (JSON).")] = Path("latency_table.json"),
    space: SpaceOpt = None,
    rounds: Annotated[int, typer.Option("--rounds", help="Interleaved timing rounds (medians over rounds).")] = 7,
    validate: Annotated[int, typer.Option("--validate", help="Also time this many random architectures whole, in the "
                                          "same rounds, and report the prediction error.")] = 0,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace an existing table at --out.")] = False,
    seed: int = SEED,
    quiet: QuietOpt = False,
) -> None:
    """Measure each block configuration of a family's space once on the target; write the latency table."""
    _console.set_quiet(quiet)
    if out.exists() and not overwrite:
        raise SlimkitError(f"--out {out} already exists; pass --overwrite to replace it, or choose another file.")
    if out.exists() and out.is_dir():
        raise SlimkitError(f"--out {out} is a folder; give a file path such as {out / 'latency_table.json'}.")
    table = build_latency_table(family, data, Target(target, (batch,), threads),
                                TableConfig(space=space, rounds=rounds, validate=validate), out=out, seed=seed)
    d = table.data
    ms, fastest = table.fastest()
    stdout.print(f"{table.describe()}; measured in {d['seconds']:.0f}s")
    stdout.print("fixed cost per width (ms): " + ", ".join(f"{w}: {v:.4g}" for w, v in d["fixed_ms"].items()))
    stdout.print(f"fastest architecture of the space: predicted {ms:.4g} ms")
    if d.get("validation"):
        v = d["validation"]
        stdout.print(f"validation: {len(v['pairs'])} random architectures, mean relative error "
                     f"{v['mean_relative_error']:.1%} (largest {v['max_relative_error']:.1%})")
    stdout.print(f"wrote {out}")



@command("nas")
def nas(
    space: dict[str, Any] = options(NasSpace, skip=("teacher",), build=False),
    data: DataOpt = "digits",
    teacher: Optional[str] = option(NasSpace, "teacher"),
    teacher_weights: Annotated[Optional[Path], typer.Option("--teacher-weights", help="The teacher's weights.")] = None,
    trust_pickle: bool = option(ModelRef, "trust_pickle"),
    lr: float = option(TrainConfig, "lr", default=2e-3, help="Learning rate of the candidates' training."),
    target: Target = options(Target, defaults={"batch_sizes": (1,), "max_seconds": 1.0}, help={
        "batch_sizes": "Batch size the latency is measured and limited at.",
        "max_seconds": "Time cap when timing each candidate."}),
    budget: Budget = options(Budget, skip=("min_throughput",), defaults={"max_accuracy_drop": None}, help={
        "max_latency_ms": "Latency limit (ms) at --batch; candidates the table predicts over it are never trained.",
        "max_size_kb": "Size limit of the exported model (KB).",
        "max_accuracy_drop": "Validation accuracy a candidate may lose against the teacher (0.01 = 1 point)."}),
    search: Search = options(Search, defaults={"objective": "accuracy"}, help={
        "objective": "What 'best' means within budget: accuracy, latency or size.",
        "trials": "Candidates to train (those rejected by the latency table do not count); the study's total, so a "
                  "rerun resumes.",
        "sampler": "tpe, gp, nsga2, random or grid.",
        "val_size": "Validation examples each candidate is judged on (a fixed subset; quicker on big data).",
        "verbose": "Show each candidate's training output."}),
    store: Store = options(Store, defaults={"out": "runs/nas"}, help={
        "out": "Folder for the study, the table, the trials and the results.",
        "storage": "Optuna storage URL shared by workers (default: a SQLite file in --out).",
        "overwrite": "Start a new search in --out, deleting the previous one's study and results (a fitting latency "
                     "table is kept)."}),
    quiet: QuietOpt = False,
) -> None:
    """Search a family's architectures for the best within a latency budget measured on the target (resumable)."""
    _console.set_quiet(quiet)
    if teacher_weights is not None and teacher is None:
        raise SlimkitError("--teacher-weights needs --teacher (the architecture the weights belong to).")
    with flags_of(NasSpace, Budget, Search, Store, Target):
        nas_space = NasSpace(**space, lr=lr, teacher=ModelRef(teacher, weights=teacher_weights, trust_pickle=trust_pickle)
                             if teacher else None)
        res = api.nas(nas_space, data, budget=budget, target=target, search=search, store=store)
    out = store.out
    if res.report is None:
        stdout.print(f"study ready in {out}; no trained candidate yet")
        return
    r = res.report
    best = r["best"]
    stdout.print(compare_table(r["baseline"], r["result"], title=f"baseline / best architecture (trial {best['trial']}, "
                                                                  "test split)"))
    lp = r["latency_prediction"]
    if lp["mean_relative_error"] is not None:
        stdout.print(f"latency table: mean relative error {lp['mean_relative_error']:.1%} over {len(lp['pairs'])} "
                     f"trained candidates; {r['rejected']} candidates rejected before training")
    stdout.print(f"wrote {out}/best.onnx, best.safetensors, best_arch.yaml, best_recipe.yaml, trials.csv, result.json")
    stdout.print(f"report: {out}/report.html")
