"""Issue 3's pruning figures on Fashion-MNIST (2 threads), every number from the exported ONNX artifact.

    .venv/bin/python -m bench.pruning            # all three models
    .venv/bin/python -m bench.pruning lenet300   # or some of them (each section is rewritten whole)

1. lenet300, unstructured global magnitude pruning with the AGP schedule over a distilled
   fine-tune: target >= 90% sparsity (>= 10x fewer non-zero weights) at <= 0.5 point test
   accuracy drop. Dense ONNX bytes against the sparse ONNX (sparse initializers) and CSR bytes.
2. resnet (ResNet-20) and mobilenetv2, structured channel pruning (Torch-Pruning) and a
   distilled fine-tune: target >= 2x fewer MACs at <= 1 point drop; ONNX Runtime latency of
   the unpruned and the pruned artifact measured side by side (interleaved rounds, medians)
   at batch 1 and 64.
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

from bench._common import BASELINES, baseline, fashion_mnist, markdown_table, side_by_side, write_section

THREADS = 2

# The recipes measured. Fine-tunes distil from the unpruned model (the step's default).
UNSTRUCTURED = {
    "one-shot 90%, no fine-tune": [{"prune_unstructured": {"sparsity": 0.9, "scope": "global"}}],
    "AGP 90%": [{"prune_unstructured": {"sparsity": 0.9, "scope": "global", "schedule": "agp",
                                        "finetune": {"epochs": 10, "lr": 1e-3}}}],
    "AGP 92%": [{"prune_unstructured": {"sparsity": 0.92, "scope": "global", "schedule": "agp",
                                        "finetune": {"epochs": 10, "lr": 1e-3}}}],
    "AGP 95%": [{"prune_unstructured": {"sparsity": 0.95, "scope": "global", "schedule": "agp",
                                        "finetune": {"epochs": 10, "lr": 1e-3}}}],
}
FT = {"epochs": 4, "lr": 1e-3, "max_batches": 200}  # 4 x 200 batches of 128: ~1.7 passes over the data
STRUCTURED = {
    "resnet": {"ratio": 0.35, "importance": "l2", "round_to": 8, "finetune": FT},
    "mobilenetv2": {"ratio": 0.35, "importance": "l2", "round_to": 8, "finetune": FT},
}


def _apply(recipe, name, data, out):
    from slimkit import api

    _, weights, _ = baseline(name, data)
    return api.apply([*recipe, "export"], api.ModelRef(BASELINES[name]["spec"], weights=weights), data, out=out, overwrite=True, target=api.Target("ort-cpu", batch_sizes=(1,), threads=THREADS, max_seconds=0.2, layers=False))


def unstructured(data, work: Path) -> str:
    from slimkit.measure import Target, graph_stats, profile
    from slimkit.methods.prune import csr_bytes, sparse_onnx

    rows = []
    for label, recipe in UNSTRUCTURED.items():
        print(f"lenet300: {label}", file=sys.stderr)
        res = _apply(recipe, "lenet300", data, work / f"lenet300-{len(rows)}")
        base, result = res.report["baseline"], res.report["result"]
        step = res.report["steps"][0]
        pruned = sum(v["params"] for v in step["layers"].values())
        kept = sum(v["nonzero"] for v in step["layers"].values())
        sparse = sparse_onnx(res.onnx_path, res.onnx_path.with_name("model-sparse.onnx"))
        # the accuracy and the counts come from the sparse artifact itself, run by ONNX Runtime
        sp = profile(None, data, Target("ort-cpu", threads=THREADS, layers=False), onnx_path=sparse_path(res),
                     latency=False)
        stats = graph_stats(sparse_path(res))
        drop = (base["accuracy"] - sp["accuracy"]) * 100
        sparsity = 1 - kept / pruned
        met = sparsity >= 0.9 and drop <= 0.5
        rows.append([label, f"{sparsity:.1%}", f"{kept:,} / {pruned:,}", f"{stats['params'] / stats['nonzero_params']:.1f}x",
                     f"{base['accuracy']:.4f}", f"{sp['accuracy']:.4f}", f"{drop:.2f}",
                     f"{sparse['dense_bytes']:,}", f"{sparse['sparse_bytes']:,}", f"{csr_bytes(res.model):,}",
                     "yes" if met else "no"])
        assert result["nonzero_params"] == stats["nonzero_params"]
    return ("Unstructured global magnitude pruning of `zoo:lenet300` (baseline: 10 epochs). AGP rows grow the "
            "sparsity over the first 75% of a 10-epoch fine-tune (Adam 1e-3, distilling from the unpruned model); "
            "masks hold throughout. Accuracy: Fashion-MNIST test split, run by ONNX Runtime on the sparse artifact. "
            "Bytes: the dense ONNX file, the same graph with sparse initializers (values + int64 indices, which "
            "ONNX Runtime loads), and the weights as CSR in safetensors (int16 column indices). Target: >= 90% "
            "sparsity at <= 0.5 point drop.\n\n"
            + markdown_table(["recipe", "sparsity (weights)", "non-zero / weights", "params / non-zero (whole model)",
                              "test acc. before", "test acc. after", "drop (pt)", "dense ONNX bytes",
                              "sparse ONNX bytes", "CSR bytes", "target met"], rows))


def sparse_path(res) -> Path:
    return res.onnx_path.with_name("model-sparse.onnx")


def structured(name: str, data, work: Path) -> list:
    from slimkit.export import export_onnx

    cfg = STRUCTURED[name]
    print(f"{name}: structured {cfg}", file=sys.stderr)
    res = _apply([{"prune_structured": cfg}], name, data, work / name)
    base, result = res.report["baseline"], res.report["result"]
    model, _, _ = baseline(name, data)
    dense_onnx = export_onnx(model, work / f"{name}-dense.onnx", data.example(2))
    lat = side_by_side({"unpruned": dense_onnx, "pruned": res.onnx_path}, data, (1, 64), threads=THREADS)
    macs_x = base["macs"] / result["macs"]
    drop = (base["accuracy"] - result["accuracy"]) * 100
    step = res.report["steps"][0]
    return [f"`{BASELINES[name]['spec']}`", f"ratio {cfg['ratio']}, {cfg['importance']}, channels to multiples of {cfg['round_to']}", f"{base['params']:,} -> {result['params']:,}",
            f"{base['macs']:,} -> {result['macs']:,}", f"{macs_x:.2f}x", f"{base['accuracy']:.4f}",
            f"{result['accuracy']:.4f}", f"{drop:.2f}",
            f"{lat['unpruned'][1]:.3f} / {lat['pruned'][1]:.3f} = {lat['unpruned'][1] / lat['pruned'][1]:.2f}x",
            f"{lat['unpruned'][64]:.2f} / {lat['pruned'][64]:.2f} = {lat['unpruned'][64] / lat['pruned'][64]:.2f}x",
            f"{step['finetune']['seconds']:.0f} s", "yes" if macs_x >= 2 and drop <= 1 else "no"]


def main() -> None:
    names = sys.argv[1:] or ["lenet300", "resnet", "mobilenetv2"]
    data = fashion_mnist()
    with tempfile.TemporaryDirectory(prefix="bench-pruning-") as tmp:
        work = Path(tmp)
        if "lenet300" in names:
            write_section("pruning-unstructured", "Pruning: unstructured, lenet300 (issue 3)", unstructured(data, work))
        conv = [n for n in ("resnet", "mobilenetv2") if n in names]
        rows = [structured(n, data, work) for n in conv]
        if rows:
            body = (
                "Structured channel pruning (Torch-Pruning dependency graph, the classifier kept), then a distilled "
                f"fine-tune of {FT['epochs']} epochs x {FT['max_batches']} batches of 128 (Adam {FT['lr']}). "
                "Params, MACs and accuracy (Fashion-MNIST test split) come from the exported ONNX artifacts; latency: "
                f"ONNX Runtime, {THREADS} threads, the unpruned and the pruned artifact interleaved in one run, median "
                "ms and the ratio unpruned / pruned (> 1: the pruned model is faster). Target: >= 2x fewer MACs at "
                "<= 1 point drop.\n\n"
                + markdown_table(["model", "pruning", "params", "MACs", "MACs fewer", "test acc. before",
                                  "test acc. after", "drop (pt)", "ORT batch 1 ms (unpruned / pruned)",
                                  "ORT batch 64 ms (unpruned / pruned)", "fine-tune time", "target met"], rows))
            write_section("pruning-structured", "Pruning: structured, resnet and mobilenetv2 (issue 3)", body)


if __name__ == "__main__":
    main()
