"""Issue 7's figures: `slimkit latency-table` and `slimkit nas` on Fashion-MNIST, ONNX Runtime, 2 threads.

    .venv/bin/python -m bench.nas                # both parts (about 25 minutes on an idle machine)
    .venv/bin/python -m bench.nas table          # or one of them: table, pareto
    .venv/bin/python -m bench.nas --smoke        # a tiny run of both on digits that prints instead of writing

1. table: the latency table of the zoo's MobileNetV2 space (4 widths, per stage blocks / kernel /
   expansion) at batch 1, and its prediction against the measured latency of 30 random
   architectures of the space, exported and timed whole: (a) in the same interleaved rounds as
   the table, (b) again later in a separate side-by-side run, as a search's trial would be.
   Target: mean relative error <= 10%. Beside it, the FLOPs proxy (latency = a + b * MACs,
   fitted on the same reference networks) that ProxylessNAS argues against.
2. pareto: `slimkit nas` (MobileNetV2 candidates distilled from the ResNet-20 teacher, latency
   budget by the table) next to `slimkit compress` on that teacher, the same wall-clock
   budget each; the Pareto fronts (accuracy against ORT latency at batch 1), every front
   member timed again side by side with the teacher.
"""

from __future__ import annotations

import contextlib
import json
import math
import random
import statistics
import sys
import time
from pathlib import Path

from bench._common import (CACHE, FASHION, baseline, fashion_mnist,
                           markdown_table, pop_option, side_by_side, write_section)

THREADS = 2
VALIDATE = 30  # random architectures the table's prediction is checked on
ROUNDS = 7
BUDGET_S = 10 * 60  # wall-clock of each search in part 2 (no new trial starts after it)
VAL_SIZE = 1000  # validation images each trial is judged on
FT_BATCHES = 30  # compress: batches of 128 per fine-tune epoch (as bench.search)
PROXY_EPOCHS, PROXY_BATCHES = 2, 30  # nas: each candidate's training (distilled from the teacher)
FINAL_EPOCHS, FINAL_BATCHES = 2, 100  # nas: the best architecture's training at the end
COMPRESS_METHODS = ["separable", "decompose", "prune_structured", "distill", "finetune", "qat", "quantize_static",
                    "quantize_dynamic"]
SMOKE = False
SPACE = None  # the family's default space (SMOKE narrows it)


def _section(name: str, title: str, body: str) -> None:
    if SMOKE:
        print(f"--- {name}: {title}\n{body}")
    else:
        write_section(name, title, body)


def _data():
    if SMOKE:
        from slimkit.data import load_data

        return load_data("digits")
    return fashion_mnist()


def _spearman(a: list[float], b: list[float]) -> float:
    def ranks(v: list[float]) -> list[float]:
        order = sorted(range(len(v)), key=lambda i: v[i])
        r = [0.0] * len(v)
        for pos, i in enumerate(order):
            r[i] = float(pos)
        return r

    ra, rb = ranks(a), ranks(b)
    ma, mb = statistics.fmean(ra), statistics.fmean(rb)
    cov = sum((x - ma) * (y - mb) for x, y in zip(ra, rb))
    return cov / math.sqrt(sum((x - ma) ** 2 for x in ra) * sum((y - mb) ** 2 for y in rb))


def _table_path() -> Path:
    return CACHE / "nas" / ("table-smoke.json" if SMOKE else "table.json")


# ----------------------------------------------------------------------------- 1. table


def table() -> None:
    from slimkit.measure import count_macs
    from slimkit.measure import Target
    from slimkit.nas import TableConfig, arch_summary, build_latency_table, get_family
    from slimkit.nas import relative_error

    data = _data()
    fam = get_family("mobilenetv2")
    folder = CACHE / "nas" / ("validation-smoke" if SMOKE else "validation")
    folder.mkdir(parents=True, exist_ok=True)
    space = fam.space if SPACE is None else fam.space.narrowed(SPACE)
    archs = [space.random(random.Random(1000 + i)) for i in range(VALIDATE)]
    t0 = time.perf_counter()
    tab = build_latency_table(fam, data, Target("ort-cpu", batch_sizes=(1,), threads=THREADS),
                              TableConfig(space=space, rounds=ROUNDS, validate=archs), validation_dir=folder,
                              out=_table_path())
    build_s = time.perf_counter() - t0
    d = tab.data
    pairs = d["validation"]["pairs"]
    # (b) the same 30 networks timed again, later, in their own side-by-side run
    arts = {f"v{i}": folder / f"val{i}.onnx" for i in range(len(archs))}
    later = side_by_side(arts, data, (1,), threads=THREADS, rounds=5, max_seconds=0.3)
    # the FLOPs proxy: a + b * MACs, least squares on the reference networks
    refs = d["references"]
    ref_macs = [count_macs(fam.build(r["arch"], data.input_shape, data.num_classes), data.input_shape) for r in refs]
    ref_ms = [r["measured_ms"] for r in refs]
    mx, my = statistics.fmean(ref_macs), statistics.fmean(ref_ms)
    slope = sum((x - mx) * (y - my) for x, y in zip(ref_macs, ref_ms)) / sum((x - mx) ** 2 for x in ref_macs)
    intercept = my - slope * mx
    macs = [count_macs(fam.build(a, data.input_shape, data.num_classes), data.input_shape) for a in archs]
    flops_pred = [intercept + slope * m for m in macs]

    pred = [p["predicted_ms"] for p in pairs]
    same = [p["measured_ms"] for p in pairs]
    late = [later[f"v{i}"][1] for i in range(len(archs))]
    err_same = [relative_error(p, m) for p, m in zip(pred, same)]
    err_late = [relative_error(p, m) for p, m in zip(pred, late)]
    err_flops = [relative_error(p, m) for p, m in zip(flops_pred, same)]
    # load drift between the table and the later run, seen on the same networks
    drift = statistics.median(t_late / t_same for t_late, t_same in zip(late, same))

    def summary(errors: list[float]) -> tuple[str, str, str, str]:
        return (f"{statistics.fmean(errors):.1%}", f"{statistics.median(errors):.1%}", f"{max(errors):.1%}",
                f"{sum(e <= 0.10 for e in errors)}/{len(errors)}")

    rows = [
        ["latency table, timed in the same rounds", *summary(err_same), f"{_spearman(pred, same):.3f}"],
        ["latency table, timed again later (side by side)", *summary(err_late), f"{_spearman(pred, late):.3f}"],
        ["FLOPs proxy a + b*MACs (fitted on the references)", *summary(err_flops), f"{_spearman(macs, same):.3f}"],
    ]
    mre = statistics.fmean(err_same)
    detail = [[i, f"`{arch_summary(a)}`", f"{m / 1e6:.2f}", f"{p:.4f}", f"{s:.4f}", f"{e:+.1%}", f"{lt:.4f}"]
              for i, (a, m, p, s, e, lt) in enumerate(zip(archs, macs, pred, same,
                                                         [(p - s) / s for p, s in zip(pred, same)], late))]
    fixed = ", ".join(f"width {w}: {v:.4f} ms" for w, v in d["fixed_ms"].items())
    spread = [r["residual_ms"] for r in refs]
    load = d.get("machine_load")
    body = (
        f"The zoo's MobileNetV2 on {data.name} ({'x'.join(map(str, data.input_shape))}), its default search space "
        f"({space.size():,} architectures: widths {', '.join(f'{w:g}' for w in space.width)}; per stage blocks, "
        f"depthwise kernel 3/5, expansion 3/6), ONNX Runtime, batch 1, {THREADS} threads. The table holds "
        f"{len(d['blocks'])} block entries and a fixed cost per width ({fixed}); it was measured from "
        f"{len(refs)} exported reference networks in {ROUNDS} interleaved rounds in {build_s / 60:.1f} min "
        f"(load average at the end: {load}). A following block is the difference between a chain of 4 copies after "
        f"the stage's first block and that first block alone; the first block of a stage is timed alone, and the "
        f"fixed cost (the reference networks' measured latency minus their blocks, median) absorbs its session "
        f"overhead (the references' residuals spread over {min(spread):.4f} to {max(spread):.4f} ms).\n\n"
        f"{VALIDATE} random architectures of the space, exported whole; relative error |predicted - measured| / "
        f"measured:\n\n"
        + markdown_table(["predictor", "mean error", "median", "largest", "within 10%", "rank correlation"], rows)
        + f"\n\nTarget mean relative error <= 10%: **{'met' if mre <= 0.10 else 'missed'}** ({mre:.1%}) when timed in "
        f"the same rounds as the table. Timed again later the same networks ran {drift:.2f}x as long (median ratio): "
        f"that is the shared machine's load moving between runs, not the table; it shows up as error in any "
        "prediction made at one time and checked at another. The FLOPs proxy is fitted on the same reference "
        "networks and still misses: MACs do not count the depthwise convolutions' memory-bound cost or the "
        "per-layer overhead that dominate these small networks.\n\n"
        + _idle_note(archs)
        + "<details><summary>Every architecture</summary>\n\n"
        + markdown_table(["#", "architecture (width, then per stage blocks x kernel expansion)", "MMACs",
                          "predicted ms", "measured ms (same rounds)", "error", "measured ms (later)"], detail)
        + "\n\n</details>")
    _section("nas-table", "NAS: latency-table accuracy on 30 random architectures (issue 7)", body)


def _idle_note(archs: list[dict]) -> str:
    """The same table and 30 architectures measured on a quiet machine, if such a file is cached.

    ``bench/.cache/nas/idle-table.json``: a table built with the same call on another, idle
    machine (``build_latency_table(..., validate=<the same 30 architectures>)``); this shared
    machine's load is what limits the figures above.
    """
    path = CACHE / "nas" / "idle-table.json"
    if SMOKE or not path.is_file():
        return ""
    d = json.loads(path.read_text())
    v = d.get("validation") or {}
    pairs = v.get("pairs") or []
    if [p["arch"] for p in pairs] != archs:
        return ""
    errors = [p["relative_error"] for p in pairs]
    return (f"The same table built the same way and checked on the same {len(pairs)} architectures on an idle "
            f"machine ({d['machine']['cpus']} cores, load average {d.get('machine_load')}, {d['threads']} threads, "
            f"torch {d.get('torch')}, measured {d.get('measured')}): mean relative error "
            f"**{statistics.fmean(errors):.1%}** (median {statistics.median(errors):.1%}, largest {max(errors):.1%}, "
            f"{sum(e <= 0.10 for e in errors)}/{len(errors)} within 10%).\n\n")


# ----------------------------------------------------------------------------- 2. pareto


def _front(points: list[dict]) -> list[dict]:
    """The points no other beats on both accuracy (higher) and latency (lower)."""
    front = []
    for p in points:
        if not any(q is not p and q["acc"] >= p["acc"] and q["ms"] <= p["ms"] and (q["acc"] > p["acc"] or q["ms"] < p["ms"])
                   for q in points):
            front.append(p)
    return sorted(front, key=lambda p: p["ms"])


def _trial_points(folder: Path, batch: int = 1) -> list[dict]:
    import optuna

    optuna.logging.set_verbosity(optuna.logging.ERROR)
    st = optuna.load_study(study_name=folder.name, storage=f"sqlite:///{folder / 'study.db'}")
    pts = []
    for t in st.get_trials(deepcopy=False):
        f = t.user_attrs.get("figures")
        if t.state.name != "COMPLETE" or not f or t.user_attrs.get("duplicate_of"):
            continue
        pts.append({"trial": t.number, "acc": f["val_accuracy"], "ms": f["latency_ms"][str(batch)],
                    "what": t.user_attrs.get("summary") or _recipe(t), "onnx": Path(t.user_attrs["artifacts"]) / "model.onnx"})
    return pts


def _recipe(t) -> str:
    from slimkit.pipeline import recipe_summary

    return recipe_summary(t.user_attrs["recipe"], t.params)


def _test_accuracy(onnx: Path, data) -> float:
    from slimkit.export import ort_predict, ort_session

    logits = ort_predict(ort_session(onnx, THREADS), data.x_test)
    return float((logits.argmax(1) == data.y_test.numpy()).mean())


def pareto() -> None:
    from slimkit.errors import NoFeasibleTrialError
    from slimkit.export import export_onnx
    from slimkit.measure import Target
    from slimkit.models import ModelRef
    from slimkit.nas import LatencyTable, NasSpace, nas
    from slimkit.search import Budget, CompressSpace, Search, Store, compress

    data = _data()
    if SMOKE:
        from slimkit.models import create_model, save_model, set_origin
        from slimkit.training import TrainConfig, fit

        teacher = create_model("resnet", input_shape=data.input_shape, num_classes=10, width=0.5)
        set_origin(teacher, "zoo:resnet,width=0.5", data.input_shape, 10)
        fit(teacher, data, TrainConfig(epochs=3))
        weights = save_model(teacher, CACHE / "nas" / "smoke-teacher.safetensors")
        spec = "zoo:resnet,width=0.5"
    else:
        teacher, weights, _ = baseline("resnet", data)
        spec = "zoo:resnet"
    if not _table_path().is_file():
        table()
    tab = LatencyTable.load(_table_path())
    rng = random.Random(7)
    space = tab.space
    preds = sorted(tab.predict(space.random(rng))["ms"] for _ in range(200))
    limit = round(preds[int(len(preds) * 0.7)], 3)  # 30% of the space is over it: rejected untrained
    folder = CACHE / "nas"
    target = Target("ort-cpu", batch_sizes=(1,), threads=THREADS, max_seconds=0.5)
    t0 = time.perf_counter()
    try:
        compress(ModelRef(spec, weights=weights), data, budget=Budget(max_accuracy_drop=None), target=target,
                 search=Search(objective="latency", trials=200, timeout=BUDGET_S, val_size=VAL_SIZE, seed=0),
                 store=Store(out=folder / "compress", overwrite=True),
                 space=CompressSpace(methods=COMPRESS_METHODS, finetune_batches=FT_BATCHES))
    except NoFeasibleTrialError:
        pass
    compress_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    try:
        res = nas(NasSpace("mobilenetv2", space=space, teacher=ModelRef(spec, weights=weights), latency_table=tab,
                           proxy_epochs=PROXY_EPOCHS, proxy_batches=PROXY_BATCHES, final_epochs=FINAL_EPOCHS,
                           final_batches=FINAL_BATCHES),
                  data, budget=Budget(max_latency_ms=limit, max_accuracy_drop=None), target=target,
                  search=Search(objective="accuracy", trials=200, timeout=BUDGET_S, val_size=VAL_SIZE, seed=0),
                  store=Store(out=folder / "search", overwrite=True))
        report = res.report
    except NoFeasibleTrialError as e:  # every trained candidate measured over the limit: report it all the same
        report = json.loads((folder / "search" / "result.json").read_text())
        print(f"nas: {e}", file=sys.stderr)
    nas_s = time.perf_counter() - t0

    c_pts, n_pts = _trial_points(folder / "compress"), _trial_points(folder / "search")
    c_front, n_front = _front(c_pts), _front(n_pts)
    teacher_onnx = export_onnx(teacher, folder / "teacher.onnx", data.example(2))
    arts = {"teacher": teacher_onnx}
    if report.get("best"):
        arts["nas best (trained fully)"] = folder / "search" / "best.onnx"
    for p in c_front:
        arts[f"compress #{p['trial']}"] = p["onnx"]
    for p in n_front:
        arts[f"nas #{p['trial']}"] = p["onnx"]
    lat = side_by_side(arts, data, (1,), threads=THREADS, rounds=5, max_seconds=0.5)
    acc = {name: _test_accuracy(path, data) for name, path in arts.items()}
    base = lat["teacher"][1]
    rows = [["teacher", "`zoo:resnet` (ResNet-20)", "-", f"{acc['teacher']:.4f}", f"{base:.3f}", "1.00x"]]
    for label, front in (("compress", c_front), ("nas", n_front)):
        for p in front:
            name = f"{label} #{p['trial']}"
            rows.append([name, f"`{p['what']}`", f"{p['acc']:.4f}", f"{acc[name]:.4f}", f"{lat[name][1]:.3f}",
                         f"{base / lat[name][1]:.2f}x"])
    best = report.get("best")
    if best:
        import yaml

        from slimkit.nas import arch_summary

        best_arch = yaml.safe_load((folder / "search" / "best_arch.yaml").read_text())["arch"]
        rows.append([f"**nas best, trained fully** (trial {best['trial']})", f"`{arch_summary(best_arch)}`", "-",
                     f"{acc['nas best (trained fully)']:.4f}", f"{lat['nas best (trained fully)'][1]:.3f}",
                     f"{base / lat['nas best (trained fully)'][1]:.2f}x"])
    lp = report["latency_prediction"]
    nas_trained = [p for p in n_pts]
    c_count = len(c_pts)
    body = (
        f"ResNet-20 (`zoo:resnet`) trained on Fashion-MNIST is the teacher and the model `compress` starts from. "
        f"Each search gets the same wall-clock budget ({BUDGET_S / 60:.0f} min: no trial starts after it); "
        f"`compress` ran {compress_s / 60:.1f} min ({c_count} complete trials; methods {', '.join(COMPRESS_METHODS)}, "
        f"fine-tunes capped at {FT_BATCHES} batches per epoch, no accuracy limit so that its whole front shows), "
        f"`nas` ran {nas_s / 60:.1f} min including the final training ({len(nas_trained)} candidates trained "
        f"{PROXY_EPOCHS} epochs x {PROXY_BATCHES} batches distilled from the teacher, {report['rejected']} rejected "
        f"by the latency table before training (limit {limit} ms at batch 1, the 70th percentile of the space's predicted "
        f"latencies), then the best trained {FINAL_EPOCHS} epochs x {FINAL_BATCHES} batches). The table itself was "
        f"built once beforehand (part 1). Both judge trials on the same {VAL_SIZE} validation images; below, "
        "every model on the Pareto front of its search (validation accuracy against latency at batch 1, as the "
        f"search measured it) with its test accuracy on the 10,000 test images and its latency timed again side by "
        f"side with the teacher (5 interleaved rounds, medians), ONNX Runtime, {THREADS} threads.\n\n"
        + markdown_table(["model", "what", "val acc (search)", "test acc", "ms @1", "speed-up"], rows)
        + (f"\n\nThe latency table predicted the search's trained candidates with a mean relative error of "
           f"{lp['mean_relative_error']:.1%} (largest {lp['max_relative_error']:.1%}) against each trial's own timing. "
           if lp["mean_relative_error"] is not None else "\n\nNo candidate completed its training. ")
        + ("" if best else f"No nas candidate met the latency limit as measured ({len(n_pts)} trained). ")
        + "The nas candidates' accuracies on the front are proxies (a short training from scratch); compress trials "
        "start from the trained teacher, so their validation accuracy is close to final.")
    _section("nas-pareto", "NAS: Pareto front of nas next to compress on the resnet teacher (issue 7)", body)
    (folder / "pareto.json").write_text(json.dumps({"compress": c_pts, "nas": n_pts, "latency": lat, "acc": acc},
                                                   default=str, indent=1))


# ----------------------------------------------------------------------------- 3. supernet


SUPERNET_K = 12  # random architectures ranked both ways
SUPERNET_WIDTH = 0.5  # one width: the ranking is among depths, kernels and expansions
DEVICE = "cpu"  # --device cuda: train on a GPU where one is lent (the figures are accuracies, not latencies)
CACHED = False  # --cached: write the supernet section from a previous run's results


def _kendall(a: list[float], b: list[float]) -> float:
    n, s = len(a), 0
    for i in range(n):
        for j in range(i + 1, n):
            s += (1 if (a[i] - a[j]) * (b[i] - b[j]) > 0 else -1 if (a[i] - a[j]) * (b[i] - b[j]) < 0 else 0)
    return 2 * s / (n * (n - 1))


def supernet() -> None:
    """The weight-sharing supernet's ranking of architectures against training each alone.

    With ``--cached``, the section is written from the results a previous run left in
    ``bench/.cache/nas/supernet.json`` (e.g. a run with ``--device cuda`` on a machine with a GPU).
    """
    import copy
    import datetime as dt

    from bench._common import command_line, machine

    cache = CACHE / "nas" / ("supernet-smoke.json" if SMOKE else "supernet.json")
    if CACHED:
        res = json.loads(cache.read_text())
        _section("nas-supernet", "NAS: a weight-sharing supernet's ranking against training each candidate alone "
                                 "(issue 7)", res["body"] + f"\n\nMeasured by `{res['command']}` on {res['machine']} "
                 f"({res['date']}); this section was written from that run's results (`{cache.relative_to(CACHE.parent.parent)}`).")
        return

    import torch

    from slimkit.nas import arch_summary, get_family
    from slimkit.nas import RecalibrateBN
    from slimkit.nas._supernet import Supernet, evaluate_subnet, train_supernet
    from slimkit.search import validation_subset
    from slimkit.methods.distill import Distillation, distill
    from slimkit.models import create_model
    from slimkit.training import TrainConfig, fit

    data = _data()
    if SMOKE:
        teacher = create_model("resnet", input_shape=data.input_shape, num_classes=10, width=0.5)
        fit(teacher, data, TrainConfig(epochs=2))
    else:
        teacher, _, _ = baseline("resnet", data)
        data = validation_subset(data, VAL_SIZE, 0)
    fam = get_family("mobilenetv2")
    space = fam.space.narrowed({"width": [SUPERNET_WIDTH], **(SPACE or {})})
    rng = random.Random(2024)
    archs = []
    while len(archs) < SUPERNET_K:
        a = space.random(rng)
        if a not in archs:
            archs.append(a)
    alone, alone_s = [], time.perf_counter()
    for i, arch in enumerate(archs):  # each trained alone, exactly as a nas trial trains a candidate
        torch.manual_seed(0)
        model = fam.build(arch, data.input_shape, data.num_classes)
        cfg = Distillation(epochs=PROXY_EPOCHS, lr=2e-3, max_batches=PROXY_BATCHES, seed=0, device=DEVICE)
        report = distill(model, copy.deepcopy(teacher), data, cfg, hooks=[RecalibrateBN(data.x_train, PROXY_EPOCHS)])
        alone.append(report["best_val_accuracy"])
        print(f"alone {i}: {arch_summary(arch)}: {alone[-1]:.4f}", file=sys.stderr)
    alone_s = time.perf_counter() - alone_s
    subnet_steps = SUPERNET_K * PROXY_EPOCHS * PROXY_BATCHES  # the same number of sub-network updates
    sn = Supernet(fam, input_shape=data.input_shape, num_classes=data.num_classes, space=space)
    torch.manual_seed(0)
    rep = train_supernet(sn, data, steps=max(1, subnet_steps // 4), teacher=copy.deepcopy(teacher),
                         train=TrainConfig(lr=2e-3, device=DEVICE))
    inherited = [evaluate_subnet(sn, arch, data)[0] for arch in archs]
    sp, kt = _spearman(inherited, alone), _kendall(inherited, alone)
    best_alone = max(range(len(archs)), key=lambda i: alone[i])
    best_inh = max(range(len(archs)), key=lambda i: inherited[i])
    rows = [[i, f"`{arch_summary(a)}`", f"{alone[i]:.4f}", f"{inherited[i]:.4f}"] for i, a in enumerate(archs)]
    body = (
        f"The zoo's MobileNetV2 space at width {SUPERNET_WIDTH} ({space.size()} architectures: per stage blocks, kernel, "
        f"expansion) on {data.name}, distilled from the ResNet-20 teacher. {SUPERNET_K} random architectures, "
        f"each (a) trained alone as a `nas` trial trains a candidate ({PROXY_EPOCHS} epochs x {PROXY_BATCHES} batches "
        f"of 128, {alone_s / 60:.1f} min in all) and (b) evaluated with the weights it inherits from one supernet "
        f"trained once with the sandwich rule ({rep['steps']} steps x {rep['subnets_per_step']} sub-networks = "
        f"{rep['steps'] * rep['subnets_per_step']} sub-network updates against {subnet_steps} for the candidates "
        f"alone, {rep['seconds'] / 60:.1f} min), batch-norm statistics re-estimated "
        f"on 8 training batches. Training on {DEVICE}. Validation accuracy on {len(data.x_val)} images.\n\n"
        + markdown_table(["#", "architecture", "val acc, trained alone", "val acc, inherited"], rows)
        + f"\n\nRank agreement between the two: Spearman **{sp:.2f}**, Kendall tau **{kt:.2f}**; the supernet's "
        f"first is #{best_inh}; trained alone, #{best_alone} is best"
        f"{' (the same)' if best_inh == best_alone else ''}. Once trained, the supernet ranks any number of "
        "architectures at the cost of an evaluation each.")
    _section("nas-supernet", "NAS: a weight-sharing supernet's ranking against training each candidate alone "
                             "(issue 7)", body)
    cache.parent.mkdir(parents=True, exist_ok=True)
    cache.write_text(json.dumps(
        {"archs": archs, "alone": alone, "inherited": inherited, "spearman": sp, "kendall": kt, "body": body,
         "device": DEVICE, "machine": machine(), "command": command_line(),
         "date": dt.datetime.now().strftime("%Y-%m-%d %H:%M")}, indent=1))


PARTS = {"table": table, "pareto": pareto, "supernet": supernet}


def main() -> None:
    global SMOKE, VALIDATE, ROUNDS, BUDGET_S, VAL_SIZE, FT_BATCHES, PROXY_BATCHES, FINAL_EPOCHS, FINAL_BATCHES, SPACE
    global SUPERNET_K, DEVICE, CACHED
    args = sys.argv[1:]
    if "--cached" in args:
        args.remove("--cached")
        CACHED = True
    DEVICE = pop_option(args, "--device", DEVICE)
    if "--smoke" in args:
        args.remove("--smoke")
        SMOKE, VALIDATE, ROUNDS, BUDGET_S, VAL_SIZE = True, 4, 3, 90, None
        FT_BATCHES, PROXY_BATCHES, FINAL_EPOCHS, FINAL_BATCHES, SUPERNET_K = 2, 3, 1, 3, 3
        SPACE = {"width": [0.5], "stages": [{}, {"kernel": [3]}, {"expand": [3]}, {"blocks": [1]}, {"blocks": [1]}]}
    names = args or list(PARTS)
    unknown = [n for n in names if n not in PARTS]
    if unknown:
        sys.exit(f"unknown part(s) {unknown}; choose from {', '.join(PARTS)}")
    if not SMOKE and not Path(FASHION).is_dir():
        sys.exit("install Debian's dataset-fashion-mnist first")
    for name in names:
        PARTS[name]()


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        main()
