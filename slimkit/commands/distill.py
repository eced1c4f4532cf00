"""``slimkit distill`` (train a student from a teacher) and ``slimkit decompose`` (low-rank layers).

Both are shorthands for ``slimkit apply`` with a two- or three-step recipe, so they measure,
export and write exactly what ``apply`` does (``model.onnx``, ``model.safetensors``,
``result.json`` with the recipe that ran), and the recipe in ``result.json`` replays the run.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.table import Table

from .. import _console, api
from ..errors import ConfigError, SlimkitError
from ..measure import Target
from ..methods.decompose import LowRank
from ..methods.distill import Distill
from ..models import ModelRef
from ..pipeline import Export, Finetune, Recipe, Step
from ..report import fmt_count
from ..training import TrainConfig
from ..search import Budget
from .core import BUDGET_HELP, finish_apply
from ._app import OVERWRITE, SEED, DataOpt, QuietOpt, command, option, options, require_model, run_out, stdout


def _pairs(values: list[str] | None, flag: str) -> dict[str, str]:
    """``["conv2=layer3", ...]`` -> ``{"conv2": "layer3"}``."""
    out: dict[str, str] = {}
    for v in values or []:
        left, sep, right = v.partition("=")
        if not sep or not left.strip() or not right.strip():
            raise ConfigError(f"got {v!r}; write STUDENT_LAYER=TEACHER_LAYER, e.g. {flag} conv2=layer3",
                              where=f"option {flag}")
        out[left.strip()] = right.strip()
    return out


def _ranks(values: list[str] | None) -> dict[str, int | list[int] | None]:
    """``["fc1=64", "layer1.0.conv1=8,16", "fc3=none"]`` -> ``{"fc1": 64, ...}``."""
    out: dict[str, int | list[int] | None] = {}
    for v in values or []:
        name, sep, rank = v.partition("=")
        try:
            if not sep:
                raise ValueError
            parts = [p.strip() for p in rank.split(",")]
            out[name.strip()] = None if rank.strip().lower() in ("none", "null") else (
                int(parts[0]) if len(parts) == 1 else [int(p) for p in parts])
        except ValueError:
            raise ConfigError(f"got {v!r}; write LAYER=RANK, LAYER=R_OUT,R_IN (Tucker-2) or LAYER=none",
                              where="option --rank") from None
    return out




@command("distill")
def distill_cmd(
    teacher: Annotated[Optional[str], typer.Option("--teacher", help="The teacher: zoo:NAME[,k=v], package.module:function or FILE.pt with --trust-pickle.")] = None,
    teacher_weights: Annotated[Optional[Path], typer.Option("--teacher-weights", "-w", help="The teacher's weights (.safetensors or a state dict).")] = None,
    student: Annotated[Optional[str], typer.Option("--student", help="The student architecture: zoo:NAME[,k=v] or package.module:function.")] = None,
    student_weights: Annotated[Optional[Path], typer.Option("--student-weights", help="Start the student from these weights (default: fresh).")] = None,
    data: DataOpt = "digits",
    out: Path = run_out("runs/distill"),
    config: TrainConfig = options(TrainConfig, only=("epochs", "lr", "batch_size", "temperature", "alpha"),
                                  help={"epochs": "Training epochs of the student."}),
    feature: Annotated[Optional[list[str]], typer.Option("--feature", help="Feature pair STUDENT_LAYER=TEACHER_LAYER (repeatable); a 1x1 conv / linear adapter bridges different widths.")] = None,
    feature_weight: Annotated[float, typer.Option(help="Weight of the feature loss.")] = 1.0,
    target: Target = options(Target),
    budget: Budget = options(Budget, only=("max_accuracy_drop",), help=BUDGET_HELP),
    trust_pickle: bool = option(ModelRef, "trust_pickle"),
    seed: int = SEED,
    overwrite: bool = OVERWRITE,
    quiet: QuietOpt = False,
) -> None:
    """Train a (smaller) student model from a teacher by knowledge distillation, export and measure both."""
    _console.set_quiet(quiet)
    if not teacher and not teacher_weights:
        raise SlimkitError("--teacher is required, e.g. --teacher zoo:resnet --teacher-weights runs/resnet/model.safetensors.")
    if not student:
        raise SlimkitError("--student is required: the architecture to train, e.g. --student zoo:lenet5 "
                           "or --student mypkg.models:small.")
    cfg = Distill(epochs=config.epochs, lr=config.lr, batch_size=config.batch_size, temperature=config.temperature,
                  alpha=config.alpha, features=_pairs(feature, "--feature"), feature_weight=feature_weight, seed=seed,
                  patience=None, student=student, student_weights=str(student_weights) if student_weights else None)
    recipe = Recipe([Step("distill", cfg), Step("export", Export())])
    res = api.apply(recipe, ModelRef(teacher, teacher_weights, trust_pickle), data, target=target, out=out,
                    overwrite=overwrite, seed=seed, budget=budget)
    step = res.report["steps"][0]
    stdout.print(f"student {student}: KL to the teacher {step['teacher_gap_before']:.4f} -> "
                 f"{step['teacher_gap_after']:.4f} (validation, T={cfg.temperature:g})")
    finish_apply(res.report, out, title=f"{out}")


@command("decompose")
def decompose_cmd(
    model: ModelRef = options(ModelRef),
    data: DataOpt = "digits",
    out: Path = run_out("runs/decompose"),
    conv: Annotated[str, typer.Option(help="Convolutions: tucker2, cp or none.")] = "tucker2",
    linear: Annotated[str, typer.Option(help="Linear layers: svd or none.")] = "svd",
    energy: Annotated[float, typer.Option(help="Keep this fraction of each weight's energy (squared norm) when choosing ranks.")] = 0.9,
    ratio: Annotated[Optional[float], typer.Option(help="Instead of --energy: rank = ratio x full rank.")] = None,
    rank: Annotated[Optional[list[str]], typer.Option("--rank", help="Explicit rank LAYER=R, LAYER=R_OUT,R_IN (Tucker-2) or LAYER=none (repeatable).")] = None,
    skip: Annotated[Optional[list[str]], typer.Option("--skip", help="Leave this layer (or prefix) alone (repeatable).")] = None,
    finetune_epochs: Annotated[int, typer.Option("--finetune-epochs", help="Fine-tune epochs after decomposing, distilled from the original (0: none).")] = 3,
    lr: float = option(TrainConfig, "lr", default=5e-4, help="Fine-tune learning rate."),
    if_slower: Annotated[str, typer.Option("--if-slower", help="When the decomposed model is slower on the target (timed side by side): revert (layers slower on their own first, then the whole step) or keep.")] = "revert",
    target: Target = options(Target),
    budget: Budget = options(Budget, only=("max_accuracy_drop",), help=BUDGET_HELP),
    seed: int = SEED,
    overwrite: bool = OVERWRITE,
    quiet: QuietOpt = False,
) -> None:
    """Low-rank decomposition (SVD / Tucker-2 / CP), fine-tune with distillation, export and measure."""
    _console.set_quiet(quiet)
    require_model(model.spec, model.weights, "zoo:resnet --weights model.safetensors")
    try:
        cfg = LowRank(conv=conv, linear=linear, energy=energy, ratio=ratio, ranks=_ranks(rank), skip=list(skip or []),
                      if_slower=if_slower)
    except ConfigError as e:  # name the flag the field came from (--if-slower, --rank ...)
        flag = {"ranks": "rank"}.get(e.field or "", e.field or "")
        raise e.located(f"--{flag.replace('_', '-')}") if e.field and not e.where else e from None
    steps = [Step("decompose", cfg)]
    if finetune_epochs:
        steps.append(Step("finetune", Finetune(epochs=finetune_epochs, lr=lr, seed=seed)))
    res = api.apply(Recipe(steps + [Step("export", Export())]), model, data, target=target, out=out,
                    overwrite=overwrite, seed=seed, budget=budget)
    t = Table(title="decomposed layers")
    for col in ("layer", "kind", "rank", "rel. error", "params", "MACs", "note"):
        t.add_column(col, justify="left" if col in ("layer", "kind", "note") else "right")
    for row in res.report["steps"][0]["layers"]:
        size = (f"{fmt_count(row['params_before'])} -> {fmt_count(row['params_after'])}"
                if row.get("params_after") is not None else fmt_count(row.get("params_before")))
        macs = (f"{fmt_count(row['macs_before'])} -> {fmt_count(row['macs_after'])}"
                if row.get("macs_after") is not None else fmt_count(row.get("macs_before")))
        t.add_row(row["name"], row.get("kind") or "-", str(row.get("rank", "-")),
                  f"{row['rel_error']:.3f}" if "rel_error" in row else "-", size, macs,
                  "" if row["replaced"] else row.get("reason", ""))
    stdout.print(t)
    finish_apply(res.report, out, title=f"{out}")
