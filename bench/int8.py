"""INT8 on ort-cpu: fp32 vs static INT8 vs dynamic INT8 vs QAT, side by side (issue 4).

    .venv/bin/python -m bench.int8 [resnet|mobilenetv2|lenet5 ...]

For each cached Fashion-MNIST baseline, the recipes `[quantize_static]`, `[quantize_dynamic]`
(linear layers, the default), `[quantize_dynamic: {ops: all}]` (convolutions too, as
ConvInteger) and `[qat]` run through `slimkit.apply` on ort-cpu with 2 threads. Every artifact
is then timed side by side with the fp32 export (interleaved rounds, medians) at batch 1 and 64;
the ratio is fp32 latency / INT8 latency (> 1: INT8 faster). Accuracy is on the 10,000 test
images; "integer kernels" are counted in ONNX Runtime's optimised graph.
"""

from __future__ import annotations

import json
import shutil
import sys
import time

from bench._common import CACHE, baseline, fashion_mnist, markdown_table, side_by_side, write_section

MODELS = ("lenet5", "resnet", "mobilenetv2")
BATCHES = (1, 64)
THREADS = 2
QAT = {"epochs": 1, "max_batches": 150, "lr": 1e-4}
VARIANTS = [  # (label, folder, recipe)
    ("static INT8", "static", [{"quantize_static": {}}]),
    ("dynamic INT8 (linear)", "dynamic", [{"quantize_dynamic": {}}]),
    ("dynamic INT8 (all ops)", "dynamic-all", [{"quantize_dynamic": {"ops": "all"}}]),
    (f"QAT ({QAT['epochs']} epoch x {QAT['max_batches']} batches)", "qat", [{"qat": QAT}]),
]


def main() -> None:
    import slimkit
    from slimkit.methods.quantize import int8_ops

    import torch

    torch.set_num_threads(THREADS)
    names = sys.argv[1:] or list(MODELS)
    data = fashion_mnist()
    rows, notes = [], []
    for name in names:
        model, weights, train = baseline(name, data)
        folder = CACHE / f"int8-{name}"
        shutil.rmtree(folder, ignore_errors=True)
        arts, acc, kernels, verdicts, secs = {}, {}, {}, {}, {}
        t0 = time.perf_counter()
        res = slimkit.apply(["export"], model, data, out=folder / "fp32", baseline=False, target=slimkit.Target("ort-cpu", threads=THREADS, max_seconds=0.3, layers=False))
        arts["fp32"], acc["fp32"], kernels["fp32"], secs["fp32"] = (res.onnx_path, res.report["result"]["accuracy"],
                                                                     {}, time.perf_counter() - t0)
        for label, sub, recipe in VARIANTS:
            t0 = time.perf_counter()
            res = slimkit.apply(recipe, model, data, out=folder / sub, baseline=False, target=slimkit.Target("ort-cpu", threads=THREADS, max_seconds=0.6, layers=False))
            step = next(s for s in res.report["steps"] if "faster" in s)
            arts[label], acc[label] = res.onnx_path, res.report["result"]["accuracy"]
            kernels[label] = int8_ops(res.onnx_path)
            verdicts[label] = step
            secs[label] = time.perf_counter() - t0
            print(f"{name} {label}: {acc[label]:.4f}, step says faster={step['faster']}", file=sys.stderr)
        lat = side_by_side(arts, data, BATCHES, threads=THREADS, rounds=5, max_seconds=1.0)
        for label in arts:
            ratio = {b: lat["fp32"][b] / lat[label][b] for b in BATCHES}
            faster = label != "fp32" and all(r > 1 for r in ratio.values())
            k = kernels[label]
            rows.append([
                name if label == "fp32" else "", label, f"{acc[label]:.4f}",
                f"{(acc[label] - acc['fp32']) * 100:+.2f}" if label != "fp32" else "",
                f"{lat[label][1]:.3f}", f"{ratio[1]:.2f}x" if label != "fp32" else "",
                f"{lat[label][64]:.3f}", f"{ratio[64]:.2f}x" if label != "fp32" else "",
                ("yes" if faster else "**no**") if label != "fp32" else "",
                ", ".join(f"{op} {n}" for op, n in sorted(k.items())) if k else ("-" if label == "fp32" else "**none**"),
                ("yes" if verdicts[label]["faster"] else "no") if label in verdicts else "",
            ])
        notes.append(f"{name}: baseline test accuracy {train['test_accuracy']:.4f}; quantization took "
                     + ", ".join(f"{lab} {s:.0f} s" for lab, s in secs.items() if lab != "fp32"))
        (folder / "rows.json").write_text(json.dumps({"rows": rows[-len(arts):], "note": notes[-1]}))
    # models not run this time: their rows from their last run (the table says which run wrote what)
    rows, notes = [], []
    for name in MODELS:
        saved = CACHE / f"int8-{name}" / "rows.json"
        if saved.is_file():
            got = json.loads(saved.read_text())
            rows += got["rows"]
            notes.append(got["note"])
    body = (
        f"Cached Fashion-MNIST baselines, ort-cpu, {THREADS} threads. Latency: median ms, all artifacts of a "
        "model timed side by side in one run (5 interleaved rounds); ratio = fp32 / INT8 (> 1: INT8 is "
        "faster). 'faster' = faster at both batch sizes in this table; 'step verdict' = the `\"faster\"` "
        "the recipe step itself reported from its own (shorter) side-by-side timing. Static and QAT: QDQ, "
        "uint8 activations, int8 per-channel weights, 256 calibration images (minmax).\n\n"
        + markdown_table(["model", "variant", "test accuracy", "vs fp32 (pts)", "batch 1 ms", "ratio",
                          "batch 64 ms", "ratio", "faster", "integer kernels (optimised graph)", "step verdict"], rows)
        + "\n\n" + "  \n".join(notes)
    )
    write_section("int8", "INT8 on ort-cpu: fp32 vs static vs dynamic vs QAT (issue 4)", body)


if __name__ == "__main__":
    main()
