"""The ``slimkit`` command line: a thin layer over :mod:`slimkit.api` (same behaviour, same errors)."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console

from . import _console
from .errors import SlimkitError
from .measure import Target
from .models import ModelRef

app = typer.Typer(
    name="slimkit",
    help="Fit a trained PyTorch model to a deployment budget: measure, compress, export, measure again.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode="rich",
)
stdout = Console(highlight=False)

# ----------------------------------------------------------------------------- shared options

ModelOpt = Annotated[Optional[str], typer.Option("--model", "-m", help="zoo:NAME[,key=value...], package.module:function, or FILE.pt with --trust-pickle.")]
WeightsOpt = Annotated[Optional[Path], typer.Option("--weights", "-w", help="Weights: .safetensors, or a state dict (loaded with weights_only=True).")]
TrustOpt = Annotated[bool, typer.Option("--trust-pickle", help="Allow --model FILE.pt, a fully pickled module. Unpickling runs code from the file: only for files you trust.")]
DataOpt = Annotated[str, typer.Option("--data", "-d", help="digits (built in), idx:DIR, npz:FILE or package.module:function.")]
TargetOpt = Annotated[str, typer.Option("--target", "-t", help="Where the model must run: ort-cpu (ONNX Runtime) or torch-cpu (eager PyTorch).")]
BatchOpt = Annotated[str, typer.Option("--batch", "-b", help="Batch sizes to time, comma separated.")]
ThreadsOpt = Annotated[Optional[int], typer.Option("--threads", help="Threads for the target runtime (default: this machine's cores).")]
SeedOpt = Annotated[int, typer.Option("--seed", help="Seed of the train/val/test split and of training.")]
OverwriteOpt = Annotated[bool, typer.Option("--overwrite", help="Replace the results of a previous run in --out.")]
MaxSecondsOpt = Annotated[float, typer.Option("--max-seconds", help="Time cap per batch size for latency measurement.")]
QuietOpt = Annotated[bool, typer.Option("--quiet", "-q", help="Only print the result.")]


def require_model(model: str | None, weights: Path | None, example: str = "zoo:lenet5 --weights model.safetensors") -> None:
    """A model comes from --model, or from --weights of a model slimkit saved (its spec is inside)."""
    if not model and not weights:
        raise SlimkitError(f"--model is required, e.g. --model {example}.")


def parse_batches(text: str) -> tuple[int, ...]:
    try:
        sizes = tuple(int(p) for p in text.split(",") if p.strip())
    except ValueError:
        raise SlimkitError(f"--batch must be comma-separated integers like 1,64; got '{text}'.") from None
    if not sizes or any(b < 1 for b in sizes):
        raise SlimkitError(f"--batch sizes must be integers >= 1, like 1,64; got '{text}'.")
    return sizes


# ----------------------------------------------------------------------------- commands


@app.command()
def train(
    model: ModelOpt = None,
    data: DataOpt = "digits",
    epochs: Annotated[int, typer.Option("--epochs", "-e", help="Training epochs.")] = 10,
    out: Annotated[Path, typer.Option("--out", "-o", help="Folder for model.safetensors and train.json.")] = Path("runs/train"),
    weights: WeightsOpt = None,
    lr: Annotated[float, typer.Option(help="Learning rate.")] = 1e-3,
    batch_size: Annotated[int, typer.Option(help="Training batch size.")] = 128,
    optimizer: Annotated[str, typer.Option(help="adam, adamw or sgd.")] = "adam",
    patience: Annotated[Optional[int], typer.Option(help="Stop after this many epochs without a better validation accuracy.")] = None,
    seed: SeedOpt = 0,
    overwrite: OverwriteOpt = False,
    quiet: QuietOpt = False,
) -> None:
    """Train a model and write DIR/model.safetensors and DIR/train.json."""
    from .api import train as _train
    from .training import TrainConfig

    _console.set_quiet(quiet)
    if not model:
        raise SlimkitError("--model is required, e.g. --model zoo:lenet5.")
    cfg = TrainConfig(epochs=epochs, lr=lr, batch_size=batch_size, optimizer=optimizer, patience=patience, seed=seed)
    res = _train(model, data, epochs=epochs, out=out, weights=weights, config=cfg, seed=seed, overwrite=overwrite)
    r = res.report
    stdout.print(f"test accuracy {r['test_accuracy']:.4f} after {r['epochs']} epochs ({r['seconds']:.1f}s); "
                 f"wrote {out}/model.safetensors and {out}/train.json")


@app.command()
def profile(
    model: ModelOpt = None,
    weights: WeightsOpt = None,
    data: DataOpt = "digits",
    target: TargetOpt = "ort-cpu",
    batch: BatchOpt = "1,64",
    threads: ThreadsOpt = None,
    onnx: Annotated[Optional[Path], typer.Option("--onnx", help="Profile this ONNX file instead of a torch model (ort-cpu).")] = None,
    trust_pickle: TrustOpt = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object on stdout instead of tables.")] = False,
    seed: SeedOpt = 0,
    max_seconds: MaxSecondsOpt = 2.0,
) -> None:
    """Measure a model on a target: params, MACs, size, accuracy, latency, and per layer."""
    from .api import profile as _profile
    from .report import layers_table, profile_table

    _console.set_quiet(as_json)
    if model is None and onnx is None and weights is None:
        raise SlimkitError("give --model (with --weights), --weights of a model slimkit saved, or --onnx FILE to profile.")
    if model and model.startswith("zoo:") and weights is None:
        _console.info("note: no --weights given, so the zoo model is measured with its initial (untrained) "
                      "weights; accuracy will be near chance.")
    p = _profile(ModelRef(model, weights, trust_pickle), data, onnx=onnx, seed=seed,
                 target=Target(target, parse_batches(batch), threads, max_seconds))
    if as_json:
        sys.stdout.write(json.dumps(p) + "\n")
        return
    stdout.print(profile_table(p, title=f"{model or onnx}"))
    stdout.print(layers_table(p))


@app.command()
def apply(
    recipe: Annotated[Path, typer.Argument(help="Recipe YAML: a list of steps, e.g. [{finetune: {epochs: 3}}, export].")],
    model: ModelOpt = None,
    weights: WeightsOpt = None,
    data: DataOpt = "digits",
    target: TargetOpt = "ort-cpu",
    out: Annotated[Path, typer.Option("--out", "-o", help="Folder for model.onnx, model.safetensors and result.json.")] = Path("runs/apply"),
    batch: BatchOpt = "1,64",
    threads: ThreadsOpt = None,
    trust_pickle: TrustOpt = False,
    seed: SeedOpt = 0,
    overwrite: OverwriteOpt = False,
    max_seconds: MaxSecondsOpt = 2.0,
    quiet: QuietOpt = False,
) -> None:
    """Run a recipe on a model, export it, and measure before and after on the target."""
    from .api import apply as _apply
    from .pipeline import Recipe
    from .report import compare_table

    _console.set_quiet(quiet)
    rec = Recipe.load(recipe)  # a bad recipe fails here, before anything is loaded
    require_model(model, weights)
    res = _apply(rec, ModelRef(model, weights, trust_pickle), data, out=out, overwrite=overwrite, seed=seed,
                 target=Target(target, parse_batches(batch), threads, max_seconds))
    stdout.print(compare_table(res.report["baseline"], res.report["result"], title=str(recipe)))
    stdout.print(f"wrote {out}/model.onnx, {out}/model.safetensors, {out}/result.json")


@app.command()
def demo(
    out: Annotated[Path, typer.Option("--out", "-o", help="Where the demo writes its results.")] = Path("runs/demo"),
    epochs: Annotated[int, typer.Option(help="Epochs to train lenet5 on digits first.")] = 15,
    threads: ThreadsOpt = None,
    trials: Annotated[int, typer.Option("--trials", "-n", help="Trials of the search.")] = 12,
    timeout: Annotated[float, typer.Option("--timeout", help="Start no new trial after this many seconds.")] = 150.0,
) -> None:
    """Train lenet5 on digits, search for the fastest model within 1 point of accuracy, print before/after."""
    from .api import demo as _demo

    _demo(out, epochs=epochs, threads=threads, trials=trials, timeout=timeout)


@app.command()
def steps() -> None:
    """List the recipe steps and their fields (with defaults)."""
    import dataclasses

    from rich.table import Table

    from .pipeline import get_step, step_names

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


# ----------------------------------------------------------------------------- entry point

from . import commands as _commands  # noqa: E402

_commands.load_all()  # the method families' commands (sensitivity, lottery, compress, ...)



def main(argv: list[str] | None = None) -> None:
    """Run the CLI; a user error prints one paragraph and exits with its code (2), no traceback."""
    try:
        app(args=argv, prog_name="slimkit")
    except SlimkitError as e:
        _console.console.print(f"error: {e}", style="red", markup=False, highlight=False, soft_wrap=True)
        sys.exit(e.exit_code)
    except KeyboardInterrupt:
        _console.console.print("interrupted", style="red")
        sys.exit(130)


if __name__ == "__main__":
    main()
