"""``slimkit latency-table`` (measure a family's blocks on a target) and ``slimkit nas`` (search its architectures)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from .. import _console
from ..cli import DataOpt, QuietOpt, SeedOpt, TargetOpt, ThreadsOpt, TrustOpt, app, stdout
from ..errors import SlimkitError

FamilyOpt = Annotated[str, typer.Option("--family", "-f", help="Architecture family: mobilenetv2 or resnet "
                                        "(slimkit.nas.family_names()).")]
SpaceOpt = Annotated[Optional[Path], typer.Option("--space", help="YAML file narrowing the family's space (width, and "
                                                  "per stage blocks / kernel / expand choices).")]
BatchOneOpt = Annotated[int, typer.Option("--batch", "-b", help="Batch size the latency is measured and limited at.")]


@app.command("latency-table")
def latency_table(
    family: FamilyOpt = "mobilenetv2",
    data: DataOpt = "digits",
    target: TargetOpt = "ort-cpu",
    batch: BatchOneOpt = 1,
    threads: ThreadsOpt = None,
    out: Annotated[Path, typer.Option("--out", "-o", help="Where to write the table (JSON).")] = Path("latency_table.json"),
    space: SpaceOpt = None,
    rounds: Annotated[int, typer.Option("--rounds", help="Interleaved timing rounds (medians over rounds).")] = 7,
    validate: Annotated[int, typer.Option("--validate", help="Also time this many random architectures whole, in the "
                                          "same rounds, and report the prediction error.")] = 0,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace an existing table at --out.")] = False,
    seed: SeedOpt = 0,
    quiet: QuietOpt = False,
) -> None:
    """Measure each block configuration of a family's space once on the target; write the latency table."""
    from ..nas import build_latency_table

    _console.set_quiet(quiet)
    if out.exists() and not overwrite:
        raise SlimkitError(f"--out {out} already exists; pass --overwrite to replace it, or choose another file.")
    if out.exists() and out.is_dir():
        raise SlimkitError(f"--out {out} is a folder; give a file path such as {out / 'latency_table.json'}.")
    table = build_latency_table(family, data, target=target, batch=batch, threads=threads, space=space, rounds=rounds,
                                validate=validate, out=out, seed=seed)
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


@app.command("nas")
def nas(
    family: FamilyOpt = "mobilenetv2",
    data: DataOpt = "digits",
    teacher: Annotated[Optional[str], typer.Option("--teacher", help="Model that teaches each candidate (distillation): "
                                                   "zoo:NAME, package.module:function or FILE.pt.")] = None,
    teacher_weights: Annotated[Optional[Path], typer.Option("--teacher-weights", help="The teacher's weights.")] = None,
    target: TargetOpt = "ort-cpu",
    batch: BatchOneOpt = 1,
    threads: ThreadsOpt = None,
    max_latency_ms: Annotated[Optional[float], typer.Option(
        "--max-latency-ms", help="Latency limit (ms) at --batch; candidates the table predicts over it are never "
        "trained.")] = None,
    max_size_kb: Annotated[Optional[float], typer.Option("--max-size-kb", help="Size limit of the exported model (KB).")] = None,
    max_accuracy_drop: Annotated[Optional[float], typer.Option(
        "--max-accuracy-drop", help="Validation accuracy a candidate may lose against the teacher (0.01 = 1 point).")] = None,
    objective: Annotated[str, typer.Option("--objective", help="What 'best' means within budget: accuracy, latency or "
                                           "size.")] = "accuracy",
    trials: Annotated[int, typer.Option("--trials", "-n", help="Candidates to train (those rejected by the latency table "
                                        "do not count); the study's total, so a rerun resumes.")] = 20,
    timeout: Annotated[Optional[float], typer.Option("--timeout", help="Start no new trial after this many seconds.")] = None,
    sampler: Annotated[str, typer.Option("--sampler", help="tpe, gp, nsga2, random or grid.")] = "tpe",
    storage: Annotated[Optional[str], typer.Option(
        "--storage", help="Optuna storage URL shared by workers (default: a SQLite file in --out).")] = None,
    study: Annotated[Optional[str], typer.Option("--study", help="Study name (default: the --out folder's name).")] = None,
    out: Annotated[Path, typer.Option("--out", "-o", help="Folder for the study, the table, the trials and the "
                                      "results.")] = Path("runs/nas"),
    space: SpaceOpt = None,
    table: Annotated[Optional[Path], typer.Option("--latency-table", help="A table from slimkit latency-table (default: "
                                                  "reuse or build one in --out).")] = None,
    proxy_epochs: Annotated[int, typer.Option("--proxy-epochs", help="Epochs each candidate trains in the search.")] = 2,
    proxy_batches: Annotated[Optional[int], typer.Option("--proxy-batches", help="Cap on batches per proxy epoch.")] = 50,
    final_epochs: Annotated[int, typer.Option("--final-epochs", help="Epochs the best architecture trains at the end "
                                              "(0: keep it as the search trained it).")] = 10,
    lr: Annotated[float, typer.Option("--lr", help="Learning rate of the candidates' training.")] = 2e-3,
    val_size: Annotated[Optional[int], typer.Option("--val-size", help="Validation examples each candidate is judged "
                                                    "on (a fixed subset; quicker on big data).")] = None,
    table_rounds: Annotated[int, typer.Option("--table-rounds", help="Timing rounds when the table is built here.")] = 7,
    trust_pickle: TrustOpt = False,
    seed: SeedOpt = 0,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Start a new search in --out, deleting the previous "
                                            "one's study and results (a fitting latency table is kept).")] = False,
    max_seconds: Annotated[float, typer.Option("--max-seconds", help="Time cap when timing each candidate.")] = 1.0,
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Show each candidate's training output.")] = False,
    quiet: QuietOpt = False,
) -> None:
    """Search a family's architectures for the best within a latency budget measured on the target (resumable)."""
    from ..nas import nas as _nas
    from ..report import compare_table

    _console.set_quiet(quiet)
    res = _nas(family, data, teacher=teacher, teacher_weights=teacher_weights, trust_pickle=trust_pickle,
               target=target, batch=batch, threads=threads, space=space, latency_table=table,
               max_latency_ms=max_latency_ms, max_size_kb=max_size_kb, max_accuracy_drop=max_accuracy_drop,
               objective=objective, trials=trials, timeout=timeout, sampler=sampler, storage=storage, study=study,
               out=out, overwrite=overwrite, seed=seed, max_seconds=max_seconds, proxy_epochs=proxy_epochs,
               proxy_batches=proxy_batches, final_epochs=final_epochs, lr=lr, val_size=val_size,
               table_rounds=table_rounds,
               verbose=verbose)
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
