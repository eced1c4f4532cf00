"""``slimkit deep-compress``: pruning + k-means weight sharing + Huffman coding into DIR/model.slim."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.table import Table

from .. import _console, _io
from ..data import resolve_data
from ..errors import ConfigError, NotMetError
from ..methods.coding import DeepCompression, deep_compress as _deep_compress, paper_table, parse_layer_values
from ..models import ModelRef, resolve_model
from ..pipeline import AccuracyVerdict
from ..report import fmt_bytes
from ..search import Budget
from ..training import TrainConfig
from .core import BUDGET_HELP
from ._app import OVERWRITE, SEED, DataOpt, QuietOpt, command, option, options, require_model, run_out, stdout


@contextmanager
def _named_flags() -> Iterator[None]:
    """A :class:`DeepCompression` field is the flag of the same name: ``bits`` -> ``--bits: ...``."""
    try:
        yield
    except ConfigError as e:
        raise ConfigError(e.reason, where=f"--{e.field.replace('_', '-')}" if e.field else None) from None


@command("deep-compress")
def deep_compress(
    model: ModelRef = options(ModelRef),
    data: DataOpt = "digits",
    sparsity: Annotated[str, typer.Option(help="Fraction of weights pruned: one number, or per layer type / name, e.g. conv=0.6,fc=0.92,fc3=0.7.")] = "conv=0.6,fc=0.92",
    bits: Annotated[str, typer.Option(help="Bits per shared weight (1..8; 2**bits - 1 values plus zero), e.g. conv=8,fc=5.")] = "conv=8,fc=5",
    index_bits: Annotated[str, typer.Option("--index-bits", help="Bits of the relative position index (1..8), e.g. conv=8,fc=5.")] = "conv=8,fc=5",
    skip: Annotated[str, typer.Option(help="Layers left dense (comma-separated names or patterns).")] = "",
    prune_epochs: Annotated[int, typer.Option("--prune-epochs", help="Fine-tuning epochs after (during, with agp) pruning.")] = 8,
    share_epochs: Annotated[int, typer.Option("--share-epochs", help="Epochs of centroid fine-tuning after weight sharing.")] = 2,
    schedule: Annotated[str, typer.Option(help="Pruning schedule: agp (gradual) or one-shot.")] = "agp",
    lr: float = option(TrainConfig, "lr", default=DeepCompression.lr, help="Learning rate after pruning."),
    share_lr: Annotated[float, typer.Option("--share-lr", help="Learning rate of the centroid fine-tuning.")] = 2e-4,
    batch_size: int = option(TrainConfig, "batch_size"),
    max_batches: Optional[int] = option(TrainConfig, "max_batches", help="Cap on batches per fine-tuning epoch."),
    no_distill: Annotated[bool, typer.Option("--no-distill", help="Fine-tune on labels only (default: the original model teaches).")] = False,
    min_steps: int = option(TrainConfig, "min_steps", default=DeepCompression.min_steps,
                            help="At least this many optimisation steps in each fine-tune (a small data set gets more epochs)."),
    max_accuracy_drop: Optional[float] = option(Budget, "max_accuracy_drop", help=BUDGET_HELP["max_accuracy_drop"]),
    out: Path = run_out("runs/deep-compress", "Folder for model.slim and result.json."),
    seed: int = SEED,
    overwrite: bool = OVERWRITE,
    quiet: QuietOpt = False,
) -> None:
    """Deep Compression: prune, share weights (k-means), Huffman-code; write DIR/model.slim and DIR/result.json."""
    _console.set_quiet(quiet)
    require_model(model.spec, model.weights)
    with _named_flags():
        cfg = DeepCompression(
            sparsity=parse_layer_values(sparsity, float, "sparsity"),
            bits=parse_layer_values(bits, int, "bits"),
            index_bits=parse_layer_values(index_bits, int, "index_bits"),
            skip=[s.strip() for s in skip.split(",") if s.strip()],
            prune_epochs=prune_epochs, share_epochs=share_epochs, schedule=schedule, lr=lr, share_lr=share_lr,
            batch_size=batch_size, max_batches=max_batches, min_steps=min_steps, distill=not no_distill, seed=seed,
        )
    bundle = resolve_data(data, seed)
    net = resolve_model(model, bundle)
    with _named_flags():
        cfg.check_model(net)  # unknown layer names: before any work
    _io.prepare_out_dir(out, overwrite=overwrite, inputs=[model.weights])
    res = _deep_compress(net, bundle, cfg, out=out, overwrite=True, max_accuracy_drop=max_accuracy_drop)
    r = res.report
    _, rows = paper_table(r)
    table = Table(title=f"Deep Compression of {model.name} on {bundle.name} (P prune, Q share, H Huffman)")
    for h in ("layer", "weights", "kept", "bits", "bits H", "index", "index H", "bytes", "ratio P+Q", "ratio"):
        table.add_column(h, justify="left" if h == "layer" else "right")
    for row in rows:
        table.add_row(*[c.replace("**", "") for c in row])
    stdout.print(table)
    t, acc = r["total"], r["accuracy"]
    stdout.print(f"{fmt_bytes(t['file_bytes'])} packed vs {fmt_bytes(t['dense_fp32_bytes'])} fp32 dense: "
                 f"{t['ratio']:.1f}x (Huffman streams {t['huffman_stream_bytes']:,} B, entropy bound "
                 f"{t['entropy_bound_bytes']:,.0f} B); test accuracy {acc['before']:.4f} -> {acc['after']:.4f} "
                 f"({-acc['drop_points']:+.2f} pts)")
    stdout.print(f"wrote {out}/model.slim and {out}/result.json")
    if not r["within_budget"]:
        raise NotMetError(AccuracyVerdict.from_data(acc).message(str(out)))
