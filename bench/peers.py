"""Issue 11's peer table: `slimkit compress` against single methods and Microsoft Olive, one model, one run.

    .venv/bin/python -m bench.peers                  # lenet5 on Fashion-MNIST (about 15 minutes)
    .venv/bin/python -m bench.peers resnet           # a cached baseline by name (bench/_common.BASELINES)

Every artifact is timed in the same interleaved rounds (slimkit's one timer: paired ratios,
medians) on ONNX Runtime, 2 threads, at batch 1 and 64, and its test accuracy measured on the
10,000 test images by an ONNX Runtime session. The peers:

- fp32: the baseline's export;
- ORT static INT8 alone (`quantize_static`);
- Torch-Pruning 50% of channels with a full fine-tune (`prune_structured` > `finetune`), and that
  model in INT8;
- Olive 0.13 (`olive-ai` in bench/.olive-venv, set up once: see ``OLIVE_SETUP``): ORT static
  quantization with its quantization choices searched jointly with ORT session-parameter
  tuning by its TPE sampler, accuracy goal max-degradation 1 point on the validation split;
- `slimkit compress` with the wall-clock budget of the slowest peer, and again with 8 minutes.

Olive's own latency figures use its tuned session settings; here every artifact runs with the
same session settings (2 threads, default options), so the table compares the models.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort

from bench._common import CACHE, FASHION, ROOT, baseline, fashion_mnist, markdown_table, side_by_side, write_section

THREADS = 2
BATCHES = (1, 64)
MAX_DROP = 0.01
FT = {"epochs": 3, "lr": 1e-3, "max_batches": 100}  # the full fine-tune the pruned peer gets
OLIVE_PY = ROOT / "bench" / ".olive-venv" / "bin" / "python"
OLIVE_SETUP = ("python3.11 -m venv bench/.olive-venv && bench/.olive-venv/bin/pip install torch==2.13.0 && "
               "bench/.olive-venv/bin/pip install olive-ai==0.13.0 onnxruntime onnx optuna requests psutil "
               "transformers tabulate")
OLIVE_SAMPLES = 20
LONG_S = 480  # a second search with a budget of its own, beside the one with the slowest peer's


def _accuracy(onnx_path: Path, x: np.ndarray, y: np.ndarray) -> float:
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = THREADS
    sess = ort.InferenceSession(str(onnx_path), opts, providers=["CPUExecutionProvider"])
    name = sess.get_inputs()[0].name
    pred = np.concatenate([sess.run(None, {name: x[i:i + 512]})[0].argmax(1) for i in range(0, len(x), 512)])
    return float((pred == y).mean())


def _olive(fp32: Path, data, folder: Path) -> tuple[Path | None, float, str]:
    """Run Olive in its own environment; (its best model or None, seconds, what happened)."""
    if not OLIVE_PY.exists():
        return None, 0.0, f"bench/.olive-venv is missing; set it up with: {OLIVE_SETUP}"
    folder.mkdir(parents=True, exist_ok=True)
    npz = folder / "data.npz"
    np.savez(npz, **{f"{k}_{s}": getattr(data, f"{k}_{s}").numpy() for k in ("x", "y") for s in ("train", "val")})
    job = {"onnx": str(fp32), "npz": str(npz), "out": str(folder), "max_drop": MAX_DROP, "threads": THREADS,
           "samples": OLIVE_SAMPLES, "batch": 1, "classes": int(data.num_classes)}
    (folder / "job.json").write_text(json.dumps(job))
    t0 = time.perf_counter()
    run = subprocess.run([str(OLIVE_PY), str(ROOT / "bench" / "olive_run.py"), str(folder / "job.json")],
                         capture_output=True, text=True, env={**os.environ, "OLIVE_DISABLE_TELEMETRY": "1"})
    seconds = time.perf_counter() - t0
    (folder / "olive.log").write_text(run.stdout + run.stderr)
    if run.returncode != 0 or not (folder / "olive.json").exists():
        tail = (run.stderr or run.stdout).strip().splitlines()[-1:] or ["no output"]
        return None, seconds, f"Olive failed (exit {run.returncode}): {tail[0]}"
    out = json.loads((folder / "olive.json").read_text())
    if not out.get("model"):
        return None, seconds, "Olive returned no model that met its accuracy goal"
    return Path(out["model"]), seconds, f"Olive's best (its metrics: {out['metrics']})"


def main() -> None:
    import slimkit
    from slimkit.errors import NoFeasibleTrialError
    from slimkit.models import ModelRef
    from slimkit.pipeline import recipe_summary
    from slimkit.search import Budget, CompressSpace, Search, Store, compress

    name = sys.argv[1] if len(sys.argv) > 1 else "lenet5"
    data = fashion_mnist()
    model, weights, _ = baseline(name, data)
    folder = CACHE / f"peers-{name}"
    target = slimkit.Target("ort-cpu", batch_sizes=BATCHES, threads=THREADS, max_seconds=0.3, layers=False)
    common = dict(target=target, budget=None, overwrite=True)
    seconds: dict[str, float] = {}

    def timed(label, fn):
        t0 = time.perf_counter()
        out = fn()
        seconds[label] = time.perf_counter() - t0
        print(f"{label}: {seconds[label]:.0f}s", file=sys.stderr)
        return out

    fp32 = timed("fp32", lambda: slimkit.apply(["export"], model, data, out=folder / "fp32", **common))
    int8 = timed("INT8", lambda: slimkit.apply([{"quantize_static": {}}], model, data, out=folder / "int8", **common))
    tp = timed("TP 50%", lambda: slimkit.apply(
        [{"prune_structured": {"ratio": 0.5, "if_slower": "keep"}}, {"finetune": FT}, "export"], model, data,
        out=folder / "tp50", **common))
    both = timed("TP 50% + INT8", lambda: slimkit.apply([{"quantize_static": {}}], tp.model, data,
                                                        out=folder / "tp50-int8", **common))
    olive_model, seconds["Olive"], olive_note = _olive(fp32.onnx_path, data, folder / "olive")
    budget_s = max(seconds.values())
    searches = {"slimkit compress": budget_s, f"slimkit compress, {LONG_S // 60} min": LONG_S}
    reports: dict[str, tuple[dict, str | None]] = {}
    for label, timeout in searches.items():
        where = folder / ("search" if timeout == budget_s else "search-long")
        t0 = time.perf_counter()
        try:
            res = compress(ModelRef(f"zoo:{name}", weights=weights), data, budget=Budget(max_accuracy_drop=MAX_DROP),
                           target=slimkit.Target("ort-cpu", batch_sizes=BATCHES, threads=THREADS, max_seconds=0.3),
                           search=Search(objective="latency", trials=200, timeout=timeout, seed=0),
                           store=Store(out=where, overwrite=True), space=CompressSpace())
            reports[label] = (res.report, None)
        except NoFeasibleTrialError as e:
            reports[label] = (json.loads((where / "result.json").read_text()), str(e))
        seconds[label] = time.perf_counter() - t0

    arts = {"fp32": fp32.onnx_path, "INT8": int8.onnx_path, "TP 50%": tp.onnx_path, "TP 50% + INT8": both.onnx_path}
    if olive_model is not None:
        arts["Olive"] = olive_model
    for label, (report, _) in reports.items():
        if report.get("best") is not None:
            arts[label] = folder / ("search" if label == "slimkit compress" else "search-long") / "best.onnx"
    x, y = data.x_test.numpy(), data.y_test.numpy()
    acc = {k: _accuracy(p, x, y) for k, p in arts.items()}
    lat = side_by_side(arts, data, BATCHES, threads=THREADS, rounds=15, max_seconds=0.2)
    rows = []
    for k in arts:
        drop = acc["fp32"] - acc[k]
        rows.append([f"**{k}**" if k in searches else k, f"{acc[k]:.4f}", f"{-drop * 100:+.2f}",
                     "yes" if drop <= MAX_DROP + 1e-9 else "**no**", f"{lat[k][1]:.4f}", f"{lat[k][64]:.3f}",
                     f"{lat['fp32'][1] / lat[k][1]:.2f}x", f"{lat['fp32'][64] / lat[k][64]:.2f}x",
                     f"{seconds.get(k, 0) / 60:.1f}"])
    table = markdown_table(["model", "test acc", "vs fp32 (pts)", "<= 1 pt", "ms @1", "ms @64", "speed-up @1",
                            "speed-up @64", "minutes"], rows)
    notes = [f"- Olive: {olive_note} ({seconds['Olive'] / 60:.1f} min, {OLIVE_SAMPLES} TPE samples)."]
    for label, (report, err) in reports.items():
        if label not in arts:
            notes.append(f"- {label}: no trial met the budget ({err}).")
            continue
        best = report["best"]
        notes.append(f"- {label}: {report['trials']['total']} trials in {seconds[label] / 60:.1f} min (no trial starts "
                     f"after {searches[label] / 60:.1f} min; then {len(report.get('finalists') or [])} finalist(s) "
                     f"fine-tuned fully); best trial {best['trial']}: `{recipe_summary(best['recipe'], best.get('params'))}`.")
        fair = [k for k in arts if k not in ("fp32", *searches) and acc["fp32"] - acc[k] <= MAX_DROP + 1e-9]
        beaten = [k for k in fair if lat[label][1] < lat[k][1] and lat[label][64] < lat[k][64]]
        notes.append(f"- {label} beats {len(beaten)} of the {len(fair)} peers within 1 point at both batch sizes "
                     f"({', '.join(beaten) or 'none'}).")
    body = (f"`{name}` trained on Fashion-MNIST (`idx:{FASHION}`), at most 1 point of test accuracy lost. Every "
            "artifact timed in the same 15 interleaved rounds (paired ratios, medians), ONNX Runtime, 2 threads; "
            "test accuracy by an ONNX Runtime session on the 10,000 test images. The pruned peer is fine-tuned "
            f"{FT['epochs']} epochs x {FT['max_batches']} batches (distilled). Olive's artifact is timed with the "
            "same session settings as the others.\n\n" + table + "\n\n" + "\n".join(notes))
    write_section(f"peers-{name}", f"Peers: slimkit compress, single methods and Olive on {name} (issue 11)", body)


if __name__ == "__main__":
    main()
