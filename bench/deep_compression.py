"""Deep Compression on Fashion-MNIST, in the paper's layout (Han et al. 2016, Tables 2-3).

    .venv/bin/python -m bench.deep_compression [lenet300|lenet5 ...] [--device cuda]

For each model, the cached baseline (bench/_common.BASELINES) goes through `deep_compress`
(magnitude pruning with an AGP schedule and distillation, k-means weight sharing with linear
initialisation and centroid fine-tuning, Huffman coding into the .slim format) with two
settings: the paper's per-layer sparsities and bits, and a slimmer one aiming at 50x. The
ratio is the fp32 dense state dict (every parameter, biases included) over the whole .slim
file (header, codebooks, code tables, biases and CRC included). Targets: >= 40x (lenet300)
and >= 39x (lenet5) at no more than 0.5 points of test accuracy lost; aim 50x. The packed
file is reloaded with `slimkit.load_packed` and checked bit for bit. ``--device cuda`` runs the
fine-tunes on a GPU (the table has no timing, so its figures do not depend on where it ran).
"""

from __future__ import annotations

import sys
import time

import torch

from bench._common import CACHE, baseline, fashion_mnist, markdown_table, pop_option, write_section

# (label, config fields): the paper's settings first, then a slimmer one aiming at 50x.
SETTINGS = {
    "lenet300": [
        ("paper (92/91/74% pruned, 6-bit weights, 5-bit index)",
         {"sparsity": {"fc1": 0.92, "fc2": 0.91, "fc3": 0.74}, "bits": {"fc": 6}, "index_bits": {"fc": 5}}),
        ("slimmer (94/93/74% pruned, 4-bit weights, 5-bit index)",
         {"sparsity": {"fc1": 0.94, "fc2": 0.93, "fc3": 0.74}, "bits": {"fc": 4}, "index_bits": {"fc": 5}}),
    ],
    "lenet5": [
        ("paper (34/88/92/81% pruned, conv 8 / fc 5-bit weights, 5-bit index)",
         {"sparsity": {"conv1": 0.34, "conv2": 0.88, "fc1": 0.92, "fc2": 0.81}, "bits": {"conv": 8, "fc": 5},
          "index_bits": {"conv": 5, "fc": 5}}),
        ("slimmer (34/90/95/81% pruned, conv 6 / fc 4-bit weights, 5-bit index)",
         {"sparsity": {"conv1": 0.34, "conv2": 0.90, "fc1": 0.95, "fc2": 0.81}, "bits": {"conv": 6, "fc": 4},
          "index_bits": {"conv": 5, "fc": 5}}),
    ],
}
TARGET = {"lenet300": 40.0, "lenet5": 39.0}
TRAINING = {"prune_epochs": 20, "share_epochs": 3, "schedule": "agp", "lr": 2e-3, "share_lr": 2e-4}


def main() -> None:
    from slimkit.export.packed import load_packed
    from slimkit.methods.coding import DeepCompression, deep_compress, paper_table

    torch.set_num_threads(1)  # training: a busy 2-core machine is far slower with 2 threads (timings say threads)
    args = sys.argv[1:]
    device = pop_option(args, "--device", "cpu")
    names = args or list(SETTINGS)
    data = fashion_mnist()
    sections, summary = [], []
    for name in names:
        model, _, train_report = baseline(name, data)
        for label, fields in SETTINGS[name]:
            cfg = DeepCompression(**fields, **TRAINING, device=device)
            out = CACHE / f"deep-compression-{name}-{len(summary)}"
            t0 = time.perf_counter()
            res = deep_compress(model, data, cfg, out=out, overwrite=True)
            seconds = time.perf_counter() - t0
            r = res.report
            again = load_packed(out / "model.slim")
            exact = all(torch.equal(a.view(-1).view(torch.uint8), b.view(-1).view(torch.uint8))
                        for a, b in zip(again.state_dict().values(), res.model.state_dict().values()))
            headers, rows = paper_table(r)
            t, acc = r["total"], r["accuracy"]
            met = t["ratio"] >= TARGET[name] and acc["drop_points"] <= 0.5
            sections.append(
                f"### {name}: {label}\n\n" + markdown_table(headers, rows)
                + f"\n\nfp32 dense {t['dense_fp32_bytes']:,} B -> .slim file {t['file_bytes']:,} B "
                f"(coded layers {t['coded_bytes']:,} B, raw biases {t['raw_bytes']:,} B, header + CRC "
                f"{t['header_bytes']} B). Huffman streams {t['huffman_stream_bytes']:,} B against a Shannon "
                f"entropy bound of {t['entropy_bound_bytes']:,.0f} B. Test accuracy {acc['before']:.4f} -> "
                f"pruned {acc['pruned']:.4f} -> shared {acc['shared_before_finetune']:.4f} -> after centroid "
                f"fine-tuning {acc['after']:.4f}. `load_packed` bit-exact: {'yes' if exact else '**no**'}. "
                f"{seconds:.0f} s.")
            summary.append([name, label.split(" (")[0], f"{t['ratio']:.1f}x", f">= {TARGET[name]:.0f}x",
                            f"{acc['before']:.4f}", f"{acc['after']:.4f}", f"{acc['drop_points']:+.2f}",
                            "yes" if met else "**no**", "yes" if exact else "**no**"])
            print(summary[-1], file=sys.stderr)
    body = (
        "`deep_compress` on the cached Fashion-MNIST baselines: pruning with an AGP schedule over "
        f"{TRAINING['prune_epochs']} distilled fine-tuning epochs (lr {TRAINING['lr']}), k-means weight sharing "
        f"(linear initialisation) with {TRAINING['share_epochs']} epochs of centroid fine-tuning (lr "
        f"{TRAINING['share_lr']}), Huffman coding. Columns as in the paper: P = pruning, Q = quantization "
        "(weight sharing), H = Huffman coding; `bits (P+Q+H)` are the average Huffman bits per stored entry "
        "(filler entries included); `ratio (P+Q)` uses fixed-width symbols and indices. The total ratio is "
        "the fp32 dense state dict over the whole .slim file. 'bits' counts the zero symbol, so 5 bits = 31 "
        f"shared values. Fine-tunes ran on {device}.\n\n"
        + markdown_table(["model", "setting", "ratio", "target", "accuracy before", "after", "drop (pts)",
                          "target met (ratio and <= 0.5 pt)", "reload bit-exact"], summary)
        + "\n\n" + "\n\n".join(sections)
    )
    write_section("deep_compression", "Deep Compression: pruning + weight sharing + Huffman (issue 4)", body)


if __name__ == "__main__":
    main()
