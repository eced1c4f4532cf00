"""``slimkit deep-compress``: pruning + k-means weight sharing + Huffman coding into DIR/model.slim."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from .. import _console
from ..cli import DataOpt, ModelOpt, OverwriteOpt, QuietOpt, SeedOpt, TrustOpt, WeightsOpt, app, require_model, stdout
from ..errors import ConfigError


@app.command("deep-compress")
def deep_compress(
    model: ModelOpt = None,
    weights: WeightsOpt = None,
    data: DataOpt = "digits",
    sparsity: Annotated[str, typer.Option(help="Fraction of weights pruned: one number, or per layer type / name, e.g. conv=0.6,fc=0.92,fc3=0.7.")] = "conv=0.6,fc=0.92",
    bits: Annotated[str, typer.Option(help="Bits per shared weight (1..8; 2**bits - 1 values plus zero), e.g. conv=8,fc=5.")] = "conv=8,fc=5",
    index_bits: Annotated[str, typer.Option("--index-bits", help="Bits of the relative position index (1..8), e.g. conv=8,fc=5.")] = "conv=8,fc=5",
    skip: Annotated[str, typer.Option(help="Layers left dense (comma-separated names or patterns).")] = "",
    prune_epochs: Annotated[int, typer.Option("--prune-epochs", help="Fine-tuning epochs after (during, with agp) pruning.")] = 8,
    share_epochs: Annotated[int, typer.Option("--share-epochs", help="Epochs of centroid fine-tuning after weight sharing.")] = 2,
    schedule: Annotated[str, typer.Option(help="Pruning schedule: agp (gradual) or one-shot.")] = "agp",
    lr: Annotated[float, typer.Option(help="Learning rate after pruning.")] = 1e-3,
    share_lr: Annotated[float, typer.Option("--share-lr", help="Learning rate of the centroid fine-tuning.")] = 2e-4,
    batch_size: Annotated[int, typer.Option("--batch-size", help="Training batch size.")] = 128,
    max_batches: Annotated[Optional[int], typer.Option("--max-batches", help="Cap on batches per fine-tuning epoch.")] = None,
    no_distill: Annotated[bool, typer.Option("--no-distill", help="Fine-tune on labels only (default: the original model teaches).")] = False,
    out: Annotated[Path, typer.Option("--out", "-o", help="Folder for model.slim and result.json.")] = Path("runs/deep-compress"),
    trust_pickle: TrustOpt = False,
    seed: SeedOpt = 0,
    overwrite: OverwriteOpt = False,
    quiet: QuietOpt = False,
) -> None:
    """Deep Compression: prune, share weights (k-means), Huffman-code; write DIR/model.slim and DIR/result.json."""
    from ..data import resolve_data
    from ..models import resolve_model
    from ..methods.coding import DeepCompression, deep_compress as _deep_compress, paper_table, parse_layer_values
    from ..report import fmt_bytes

    _console.set_quiet(quiet)
    require_model(model, weights)
    try:
        cfg = DeepCompression(
            sparsity=parse_layer_values(sparsity, float, "sparsity"),
            bits=parse_layer_values(bits, int, "bits"),
            index_bits=parse_layer_values(index_bits, int, "index_bits"),
            skip=[s.strip() for s in skip.split(",") if s.strip()],
            prune_epochs=prune_epochs, share_epochs=share_epochs, schedule=schedule, lr=lr, share_lr=share_lr,
            batch_size=batch_size, max_batches=max_batches, distill=not no_distill, seed=seed,
        )
    except ConfigError as e:
        flag = f"--{e.field.replace('_', '-')}" if e.field else None
        raise ConfigError(e.reason, where=flag) from None
    bundle = resolve_data(data, seed)
    net = resolve_model(model, bundle, weights=weights, trust_pickle=trust_pickle)
    try:
        cfg.check_model(net)  # unknown layer names: before any work
    except ConfigError as e:
        raise ConfigError(e.reason, where=f"--{e.field.replace('_', '-')}" if e.field else None) from None
    from .. import _io

    _io.prepare_out_dir(out, overwrite=overwrite, inputs=[weights])
    res = _deep_compress(net, bundle, cfg, out=out, overwrite=True)
    r = res.report
    from rich.table import Table

    _, rows = paper_table(r)
    table = Table(title=f"Deep Compression of {model or weights} on {bundle.name} (P prune, Q share, H Huffman)")
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
