"""Issue 2's figures: `slimkit train` on Fashion-MNIST, and `slimkit profile` agreement/stability.

    .venv/bin/python -m bench.spine

1. Runs `slimkit train --model zoo:lenet5|zoo:lenet300 --data idx:/usr/share/datasets/fashion-mnist
   --epochs 10` (targets: 0.89 and 0.88 test accuracy).
2. Runs `slimkit profile --json --batch 1,64 --threads 2` three times per target on the trained
   lenet5: params / MACs / accuracy must agree between torch-cpu and ort-cpu, and the batch-64
   latency median must vary by less than 20% across the three runs.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from bench._common import CACHE, FASHION, ROOT, markdown_table, write_section

SLIMKIT = str(ROOT / ".venv" / "bin" / "slimkit")


def run(args: list[str]) -> str:
    print("$ slimkit", " ".join(args), file=sys.stderr)
    return subprocess.run([SLIMKIT, *args], check=True, capture_output=True, text=True).stdout


def main() -> None:
    if not Path(FASHION).is_dir():
        sys.exit("install Debian's dataset-fashion-mnist first")
    data = f"idx:{FASHION}"
    rows = []
    for name, target in (("lenet5", 0.89), ("lenet300", 0.88)):
        out = CACHE / f"spine-train-{name}"
        cmd = ["train", "--model", f"zoo:{name}", "--data", data, "--epochs", "10", "--out", str(out), "--overwrite", "-q"]
        run(cmd)
        rep = json.loads((out / "train.json").read_text())
        rows.append([f"`slimkit {' '.join(cmd[:-4])}`", f"{rep['test_accuracy']:.4f}", f">= {target}",
                     "yes" if rep["test_accuracy"] >= target else "**no**", f"{rep['seconds']:.0f} s"])
    train_table = markdown_table(["command", "test accuracy", "target", "met", "training time"], rows)

    weights = CACHE / "spine-train-lenet5" / "model.safetensors"
    prof: dict[str, list[dict]] = {}
    for target in ("torch-cpu", "ort-cpu"):
        for _ in range(3):
            out = run(["profile", "--model", "zoo:lenet5", "--weights", str(weights), "--data", data, "--target", target,
                       "--batch", "1,64", "--threads", "2", "--json"])
            prof.setdefault(target, []).append(json.loads(out))
    rows = []
    for target, runs in prof.items():
        med64 = [r["latency_ms"]["64"]["median"] for r in runs]
        med1 = [r["latency_ms"]["1"]["median"] for r in runs]
        var = (max(med64) - min(med64)) / min(med64)
        rows.append([target, f"{runs[0]['params']:,}", f"{runs[0]['macs']:,}", f"{runs[0]['accuracy']:.4f}",
                     " / ".join(f"{m:.3f}" for m in med1), " / ".join(f"{m:.3f}" for m in med64), f"{var:.1%}"])
    t, o = prof["torch-cpu"][0], prof["ort-cpu"][0]
    agree = all(t[k] == o[k] for k in ("params", "macs")) and abs(t["accuracy"] - o["accuracy"]) < 1e-9
    profile_table = markdown_table(
        ["target", "params", "MACs", "test accuracy", "batch 1 median ms (3 runs)", "batch 64 median ms (3 runs)",
         "batch 64 spread (max-min)/min"], rows)
    body = (
        "### `slimkit train` on Fashion-MNIST (10 epochs, Adam 1e-3, cosine, batch 128)\n\n" + train_table +
        "\n\n### `slimkit profile` of the trained lenet5, three runs per target, 2 threads\n\n"
        f"Command: `slimkit profile --model zoo:lenet5 --weights W --data {data} --target T --batch 1,64 "
        "--threads 2 --json`\n\n" + profile_table +
        f"\n\nparams / MACs / accuracy agree between torch-cpu and ort-cpu: **{'yes' if agree else 'no'}**. "
        "torch-cpu runs the model with batch norms folded (as the ONNX export does), so both count the same "
        "parameters."
    )
    write_section("spine", "Spine: training and profiling (issue 2)", body)


if __name__ == "__main__":
    main()
