"""INT8 for ONNX Runtime: static (calibrated QDQ) and dynamic quantization of an ONNX file,
the census of the integer kernels ORT runs, and the float-vs-INT8 speed verdict."""

from __future__ import annotations

import contextlib
import io
import logging
import dataclasses
import math
import shutil
import tempfile
import warnings
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from ... import _console, _io
from ...data import DataBundle
from ...errors import ConfigError, ExportError, SlimkitError
from ...export import ort_predict, ort_session, parity
from ...measure import Target
from ...measure._graph import module_of_node
from ...measure.timing import medians, side_by_side
from ...pipeline import Context, SpeedVerdict, export_step
from ._configs import DynamicInt8, StaticInt8, calibration_examples, reduce_range_for
from ._fallback import QUANTIZED_OPS, candidate_layers, rank_isolated, rank_static, smallest_passing

__all__ = ["quantize_onnx", "int8_ops", "compare_latency", "speed_report", "INT8_KERNELS", "FLOAT_KERNELS"]

# Operators of ONNX Runtime's optimised graph that compute on 8-bit integers.
INT8_KERNELS = frozenset({
    "QLinearConv", "QLinearMatMul", "QGemm", "QLinearAdd", "QLinearMul", "QLinearAveragePool",
    "QLinearGlobalAveragePool", "QLinearConcat", "QLinearSigmoid", "QLinearLeakyRelu", "QLinearSoftmax",
    "QLinearReduceMean", "QLinearWhere", "QLinearConvTranspose", "ConvInteger", "MatMulInteger",
    "DynamicQuantizeMatMul", "MatMulIntegerToFloat", "QAttention", "DynamicQuantizeLSTM", "QEmbedLayerNormalization",
    "NhwcMaxPool", "QuickGelu",
})
# Float compute kernels: what is left of them after quantization is shown next to the integer ones.
FLOAT_KERNELS = frozenset({"Conv", "FusedConv", "Gemm", "FusedGemm", "MatMul", "FusedMatMul", "NchwcConv"})
# Examples the automatic float fallback ranks the layers on (their activations are held in memory).
RANK_EXAMPLES = 64
# Where quantize_onnx measures by default: one ORT thread, batch sizes 1 and 64, 1 s per batch size.
QUANTIZE_TARGET = Target("ort-cpu", (1, 64), threads=1, max_seconds=1.0)


@contextlib.contextmanager
def _quiet_ort():
    """onnxruntime.quantization logs warnings (pre-processing advice) through the root logger, and
    its histogram calibration prints its progress to stdout: keep both out of slimkit's output."""
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
            warnings.simplefilter("ignore")
            yield
    finally:
        root.setLevel(level)


def _optimized_graph(path: Path, threads: int = 1) -> Any:
    """The graph ONNX Runtime actually runs, after its own optimisations (fusions into QLinearConv...)."""
    import onnx

    with tempfile.TemporaryDirectory(prefix="slimkit-opt-") as tmp:
        out = Path(tmp) / "optimized.onnx"
        ort_session(path, threads, optimized_path=str(out))
        return onnx.load(str(out), load_external_data=False)


def _census(graph: Any, kinds: frozenset[str]) -> dict[str, int]:
    """Op type -> count of the nodes of ``graph`` whose type is one of ``kinds``."""
    counts: dict[str, int] = {}
    for node in graph.node:
        if node.op_type in kinds:
            counts[node.op_type] = counts.get(node.op_type, 0) + 1
    return counts


def int8_ops(path: str | Path) -> dict[str, int]:
    """Integer kernels (op type -> count) in the graph ONNX Runtime runs for ``path``, after its
    optimisations: the proof that int8 kernels run. ``{}`` for a float model."""
    return _census(_optimized_graph(Path(path)).graph, INT8_KERNELS)


def compare_latency(artifacts: dict[str, Path], data: DataBundle, batch_sizes: Sequence[int], *, threads: int,
                    max_seconds: float = 1.0, rounds: int = 3) -> dict[str, dict[str, float]]:
    """Median latency (ms) of each ONNX artifact per batch size, measured side by side
    (:func:`slimkit.measure.timing.side_by_side`, ``max_seconds`` per artifact and batch size)."""
    return medians(side_by_side(artifacts, data, batch_sizes, threads=threads, rounds=rounds, max_seconds=max_seconds,
                                label="timing the float and the INT8 artifacts side by side"))


def speed_report(latency_ms: Mapping[str, Mapping[str, float]]) -> dict[str, Any]:
    """The verdict on ``{"float": {batch: ms}, "int8": {batch: ms}}`` timed side by side: the
    speed-up per batch size and whether INT8 is faster at all of them.

    >>> r = speed_report({"float": {"1": 2.0, "64": 8.0}, "int8": {"1": 1.0, "64": 10.0}})
    >>> r["speedup"], r["faster_at"], r["faster"]
    ({'1': 2.0, '64': 0.8}, {'1': True, '64': False}, False)
    """
    before, after = latency_ms["float"], latency_ms["int8"]
    speedup = {b: before[b] / after[b] if after[b] > 0 else 0.0 for b in before}
    faster_at = {b: s > 1.0 for b, s in speedup.items()}
    geo = math.exp(sum(math.log(max(s, 1e-9)) for s in speedup.values()) / max(len(speedup), 1))
    return {
        "latency_ms": {"float": dict(before), "int8": dict(after)},
        "speedup": {b: round(s, 4) for b, s in speedup.items()},
        "speedup_geomean": round(geo, 4),
        "faster_at": faster_at,
        "faster": all(faster_at.values()),
    }


def add_verdict(ctx: Context, step: str, report: Mapping[str, Any]) -> None:
    """Append the step's measured :class:`SpeedVerdict` (from its report) to ``ctx.verdicts``."""
    lat = report["latency_ms"]
    ctx.verdicts.append(SpeedVerdict(step, bool(report["faster"]), dict(report["speedup"]),
                                     {"before": dict(lat["float"]), "after": dict(lat["int8"])},
                                     applied=bool(report["applied"])))


def _onnx_accuracy(path: Path, data: DataBundle, threads: int) -> float:
    logits = ort_predict(ort_session(path, threads), data.x_test)
    return float(np.mean(logits.argmax(1) == data.y_test.numpy()))


def _nodes_of_layers(onnx_model: Any, layers: Iterable[str]) -> dict[str, list[str]]:
    """ONNX node names per torch module name (a module covers its children)."""
    params = {i.name for i in onnx_model.graph.initializer}
    out: dict[str, list[str]] = {name: [] for name in layers}
    for node in onnx_model.graph.node:
        mod = module_of_node(node, params)
        if mod is None:
            continue
        for name in out:
            if mod == name or mod.startswith(name + "."):
                out[name].append(node.name)
    return out


def _onnx_modules(onnx_model: Any) -> list[str]:
    params = {i.name for i in onnx_model.graph.initializer}
    mods = {module_of_node(n, params) for n in onnx_model.graph.node}
    return sorted(m for m in mods if m)


def _excluded_nodes(onnx_model: Any, keep_float: Sequence[str]) -> tuple[list[str], dict[str, list[str]]]:
    """Node names to leave in float for the torch module names in ``keep_float``."""
    if not keep_float:
        return [], {}
    nodes = _nodes_of_layers(onnx_model, keep_float)
    missing = [n for n, v in nodes.items() if not v]
    if missing:
        known = _onnx_modules(onnx_model)
        raise ConfigError(f"no node of the ONNX graph comes from layer(s) {', '.join(repr(m) for m in missing)} "
                          f"(a batch norm is folded away at export); the graph's layers are: "
                          f"{', '.join(known[:30])}", field="keep_float")
    return sorted({n for v in nodes.values() for n in v}), nodes


def _densify(src: Path, dst: Path) -> tuple[Path, int]:
    """A copy of ``src`` with its sparse initializers (``store_sparse``) made dense, which ORT's
    quantizer needs (the INT8 weights are stored dense, 8 bits each); ``src`` if it has none."""
    import onnx
    from onnx import numpy_helper

    model = onnx.load(str(src))
    sparse = list(model.graph.sparse_initializer)
    if not sparse:
        return src, 0
    for sp in sparse:
        values = numpy_helper.to_array(sp.values)
        idx = numpy_helper.to_array(sp.indices).astype(np.int64)
        dense = np.zeros(math.prod(sp.dims), dtype=values.dtype)
        if idx.ndim == 2:  # (NNZ, rank) coordinates -> linear positions
            idx = np.ravel_multi_index(tuple(idx.T), tuple(sp.dims))
        dense[idx] = values
        model.graph.initializer.append(numpy_helper.from_array(dense.reshape(tuple(sp.dims)), sp.values.name))
    del model.graph.sparse_initializer[:]
    onnx.save(model, str(dst))
    return dst, len(sparse)


def _preprocess(src: Path, dst: Path) -> tuple[Path, bool]:
    """ORT's recommended pre-processing (shape inference, graph clean-up); the source if it fails."""
    from onnxruntime.quantization.shape_inference import quant_pre_process

    try:  # its symbolic shape inference writes scratch files into the current folder: make that dst's
        with _quiet_ort(), contextlib.chdir(dst.parent):
            quant_pre_process(str(src), str(dst))
        return dst, True
    except Exception as e:  # a graph its symbolic shape inference cannot handle: quantize as exported
        _console.info(f"  ORT pre-processing skipped ({type(e).__name__}: {str(e).splitlines()[0][:120] if str(e) else ''})")
        return src, False


def _as_input(x: torch.Tensor) -> np.ndarray:
    """An ONNX Runtime feed: float32 for float data, token ids stay integer."""
    return np.ascontiguousarray(x.numpy(), dtype=np.float32 if x.is_floating_point() else np.int64)


class _Reader:
    """ONNX Runtime's CalibrationDataReader protocol over a tensor of examples."""

    def __init__(self, input_name: str, x: torch.Tensor, batch: int = 32):
        self.batches = [{input_name: _as_input(x[i : i + batch])}
                        for i in range(0, len(x), batch)]
        self.i = 0

    def get_next(self) -> dict[str, np.ndarray] | None:
        if self.i >= len(self.batches):
            return None
        self.i += 1
        return self.batches[self.i - 1]

    def rewind(self) -> None:
        self.i = 0


def _qtype(name: str) -> Any:
    from onnxruntime.quantization import QuantType

    return QuantType.QUInt8 if name == "uint8" else QuantType.QInt8


def _input_name(path: Path) -> str:
    import onnx

    m = onnx.load(str(path), load_external_data=False)
    inits = {i.name for i in m.graph.initializer}
    return next(i.name for i in m.graph.input if i.name not in inits)


def _writer(pre: Path, config: StaticInt8 | DynamicInt8, x_cal: torch.Tensor | None, exclude: list[str],
            reduce_range: bool, range_overrides: dict[str, tuple[float, float]] | None,
            only: list[str] | None = None) -> Any:
    """``write(path)``: ONNX Runtime's static (with ``x_cal``) or dynamic quantization of ``pre`` into
    ``path``, leaving the nodes ``exclude`` names in float (``only``: quantize these nodes alone)."""
    from onnxruntime import quantization as oq

    if isinstance(config, DynamicInt8):
        ops = ["MatMul", "Gemm", "LSTM"] if config.ops == "linear" else None  # LSTM: DynamicQuantizeLSTM

        def renamed(names: list[str]) -> list[str]:  # its quantizer turns Gemm "g" into MatMul "g_MatMul" first
            return [*names, *(f"{n}_MatMul" for n in names)]

        return lambda out: oq.quantize_dynamic(
            str(pre), str(out), op_types_to_quantize=ops, per_channel=config.per_channel, reduce_range=reduce_range,
            weight_type=_qtype(config.weight_type), nodes_to_exclude=renamed(exclude),
            nodes_to_quantize=None if only is None else renamed(only))
    assert x_cal is not None, "static INT8 is calibrated on examples"
    extra: dict[str, Any] = {}
    if config.method == "percentile":
        extra["CalibPercentile"] = config.percentile
    if range_overrides:
        extra["TensorQuantOverrides"] = {
            name: [{"rmin": np.float32(lo), "rmax": np.float32(hi)}] for name, (lo, hi) in range_overrides.items()
        }
    method = {"minmax": oq.CalibrationMethod.MinMax, "entropy": oq.CalibrationMethod.Entropy,
              "percentile": oq.CalibrationMethod.Percentile}[config.method]
    fmt = oq.QuantFormat.QDQ if config.format == "qdq" else oq.QuantFormat.QOperator
    return lambda out: oq.quantize_static(
        str(pre), str(out), _Reader(_input_name(pre), x_cal), quant_format=fmt, per_channel=config.per_channel,
        reduce_range=reduce_range, activation_type=_qtype(config.activation_type),
        weight_type=_qtype(config.weight_type), nodes_to_exclude=exclude, calibrate_method=method, extra_options=extra)


def _quantize(write: Any, out: Path, name: str) -> Path:
    """``write(out)``, ONNX Runtime's failures as an :class:`ExportError` naming the source ``name``."""
    try:
        write(out)
    except SlimkitError:
        raise
    except Exception as e:
        raise ExportError(f"ONNX Runtime could not quantize {name}: {type(e).__name__}: "
                          f"{str(e).splitlines()[0][:300] if str(e) else ''}") from None
    return out


def _rank(config: StaticInt8 | DynamicInt8, pre: Path, candidates: dict[str, list[str]], first: Path,
          write: Callable[..., Path], x_rank: torch.Tensor, threads: int, tmp: Path) -> list[tuple[str, float]]:
    """The candidate layers ranked most sensitive first (see :mod:`._fallback`)."""
    if isinstance(config, StaticInt8):
        qdq = first if config.format == "qdq" else write(tmp / "debug-qdq.onnx", qdq=True)
        name = _input_name(pre)
        feeds = [{name: _as_input(x_rank[i : i + 32])} for i in range(0, len(x_rank), 32)]
        return rank_static(pre, qdq, candidates, feeds, threads)
    return rank_isolated(candidates, lambda nodes: ort_predict(ort_session(write(tmp / "only.onnx", only=nodes), threads),
                                                               x_rank),
                         ort_predict(ort_session(pre, threads), x_rank))


def _auto_fallback(config: StaticInt8 | DynamicInt8, pre: Path, pre_model: Any, first: tuple[Path, float],
                   write: Callable[..., Path], agreement_of: Callable[[Path], float], x_rank: torch.Tensor,
                   threads: int, tmp: Path) -> tuple[dict[str, Any], Path]:
    """Keep the fewest most sensitive layers in float that bring the top-1 agreement to
    ``config.min_agreement`` (at most ``config.max_float_layers``); returns the fallback's report
    and the artifact chosen: the fewest layers in float that reach the bar, else the one that agrees
    most. The report's ``kept_float`` are the layers left in float in that artifact, ``keep_float``
    the config's field that reproduces it without the search (with the user's own names)."""
    mode = "static" if isinstance(config, StaticInt8) else f"dynamic-{config.ops}"
    candidates = candidate_layers(pre_model, QUANTIZED_OPS[mode], skip=config.keep_float)
    _console.info(f"  INT8 agrees on only {first[1]:.1%} (min_agreement {config.min_agreement:.0%}): ranking "
                  f"{len(candidates)} layers by their INT8 sensitivity to keep the worst in float")
    ranking = _rank(config, pre, candidates, first[0], write, x_rank, threads, tmp)  # no status: write shows one
    layers = [name for name, _ in ranking]
    attempts: list[dict[str, Any]] = [{"float_layers": [], "agreement": round(first[1], 6)}]
    paths: dict[int, tuple[Path, float]] = {0: first}

    def passes(k: int) -> bool:
        path = write(tmp / f"int8-float{k}.onnx", also_float=[n for name in layers[:k] for n in candidates[name]])
        paths[k] = (path, agreement_of(path))
        attempts.append({"float_layers": layers[:k], "agreement": round(paths[k][1], 6)})
        _console.info(f"  fallback: {k} layer(s) in float ({', '.join(layers[:k])}): agreement {paths[k][1]:.1%}")
        return paths[k][1] >= config.min_agreement

    cap = min(config.max_float_layers, len(layers))
    k = smallest_passing(cap, passes) if cap else None
    best = k if k is not None else max(paths, key=lambda i: paths[i][1])
    report = {
        "mode": "auto",
        "measure": ("SQNR (dB) of the layer's quantized weights and activations, worst of them" if mode == "static"
                    else "SQNR (dB) of the logits with only that layer quantized"),
        "sensitivity": [{"layer": name, "sqnr_db": score} for name, score in ranking[:max(2 * cap, 10)]],
        "attempts": attempts,
        "reached": k is not None,
        "kept_float": layers[:best],
        "keep_float": [*config.keep_float, *layers[:best]],
    }
    return report, paths[best][0]


def quantize_onnx(
    src: str | Path,
    dst: str | Path,
    config: StaticInt8 | DynamicInt8,
    *,
    data: DataBundle,
    model: nn.Module | None = None,
    target: Target = QUANTIZE_TARGET,
    parity_samples: int = 512,
    range_overrides: dict[str, tuple[float, float]] | None = None,
) -> dict[str, Any]:
    """Quantize the ONNX file ``src`` to INT8 into ``dst`` (the source is not changed); measure it.

    ``config``: :class:`StaticInt8` (calibrated on ``data``) or :class:`DynamicInt8` (ORT's
    dynamic quantization). ``model``: the torch model ``src`` was exported from; top-1 agreement
    is measured against it (else against ``src``), and ``keep_float`` names are checked on it.
    ``target``: the ONNX Runtime threads, and the batch sizes and time cap of the side-by-side
    timing (default: 1 thread, batch sizes 1 and 64, 1 s).
    ``range_overrides``: ``{tensor name: (min, max)}`` activation ranges to use instead of the
    calibrated ones (quantization-aware training passes its learned ranges).

    Returns the report: ``int8_ops`` / ``float_ops`` of the optimised graph, ``latency_ms``
    (``float`` and ``int8`` per batch size, timed side by side), ``speedup``, ``faster``,
    ``accuracy`` (``float``, ``int8`` on the test split), ``agreement`` and the bytes.

    >>> from slimkit.data import load_data
    >>> from slimkit.models import create_model
    >>> from slimkit.export import export_onnx
    >>> data = load_data("digits")
    >>> model = create_model("lenet300", input_shape=data.input_shape, num_classes=10)
    >>> src = export_onnx(model, "/tmp/mlp.onnx", data.example(2))
    >>> r = quantize_onnx(src, "/tmp/mlp-dyn.onnx", DynamicInt8(), data=data,
    ...                   target=Target(threads=1, max_seconds=0.2))
    >>> r["int8_ops"]
    {'DynamicQuantizeMatMul': 3}
    """
    import onnx

    src, dst = Path(src), Path(dst)
    threads = target.resolved_threads
    if not src.is_file():
        raise SlimkitError(f"ONNX file {src} does not exist.")
    if dst.resolve() == src.resolve():
        raise SlimkitError(f"the INT8 model would overwrite its source {src}; choose another output path.")
    if model is not None:
        config.check_model(model)
    static = isinstance(config, StaticInt8)
    x_cal = calibration_examples(data, config.calibration_size) if static else None
    reduce_range = reduce_range_for(config.reduce_range)
    label = "static" if static else "dynamic"
    reference: nn.Module | Path = model if model is not None else src
    x_parity = data.x_test[:parity_samples]
    fallback: dict[str, Any] | None = None
    with tempfile.TemporaryDirectory(prefix="slimkit-quant-") as tmp:
        dense, densified = _densify(src, Path(tmp) / "dense.onnx")
        pre, preprocessed = _preprocess(dense, Path(tmp) / "pre.onnx")
        pre_model = onnx.load(str(pre), load_external_data=False)
        exclude, kept = _excluded_nodes(pre_model, config.keep_float)

        def write(out: Path, also_float: Sequence[str] = (), only: list[str] | None = None, qdq: bool = False) -> Path:
            cfg = dataclasses.replace(config, format="qdq") if qdq and isinstance(config, StaticInt8) else config
            with _console.status(f"{label} INT8 quantization with ONNX Runtime"), _quiet_ort():
                return _quantize(_writer(pre, cfg, x_cal, [*exclude, *also_float], reduce_range, range_overrides, only),
                                 out, src.name)

        chosen = write(Path(tmp) / "int8.onnx")
        if config.fallback == "auto":
            agreement = parity(reference, chosen, x_parity, threads=threads)["top1_agreement"]
            if agreement < config.min_agreement:
                x_rank = data.calibration(RANK_EXAMPLES) if x_cal is None else x_cal[:RANK_EXAMPLES]
                fallback, chosen = _auto_fallback(
                    config, pre, pre_model, (chosen, agreement), write,
                    lambda path: parity(reference, path, x_parity, threads=threads)["top1_agreement"],
                    x_rank, threads, Path(tmp))
                kept.update(_nodes_of_layers(pre_model, fallback["kept_float"]))
        _io.atomic_write(dst, lambda out: shutil.copyfile(chosen, out))
    optimized = _optimized_graph(dst, threads)
    ops_int = _census(optimized.graph, INT8_KERNELS)
    agreement = parity(reference, dst, x_parity, threads=threads)
    report: dict[str, Any] = {
        "mode": label,
        **({"ops": config.ops} if isinstance(config, DynamicInt8) else
           {"method": config.method, "calibration_size": 0 if x_cal is None else len(x_cal), "format": config.format,
            "activation_type": config.activation_type}),
        "weight_type": config.weight_type,
        "per_channel": config.per_channel,
        "reduce_range": reduce_range,
        "preprocessed": preprocessed,
        "densified_sparse_weights": densified,
        "kept_float": kept,
        "int8_ops": ops_int,
        "int8_op_count": sum(ops_int.values()),
        "float_ops": _census(optimized.graph, FLOAT_KERNELS),
        "onnx_bytes": {"float": src.stat().st_size, "int8": dst.stat().st_size},
        "accuracy": {"float": _onnx_accuracy(src, data, threads), "int8": _onnx_accuracy(dst, data, threads)},
        "agreement": agreement,
        **({"fallback": fallback} if fallback is not None else {}),
    }
    report["accuracy_drop"] = round(report["accuracy"]["float"] - report["accuracy"]["int8"], 6)
    report.update(speed_report(compare_latency({"float": src, "int8": dst}, data, target.batch_sizes, threads=threads,
                                               max_seconds=target.max_seconds)))
    if not ops_int:
        _console.info("  [yellow]no integer kernel runs in ONNX Runtime's optimised graph[/yellow]")
    return report


def _refusal(report: Mapping[str, Any], cfg: StaticInt8 | DynamicInt8, step: str) -> str:
    """Why an INT8 artifact below ``min_agreement`` is refused, and what the automatic fallback tried."""
    agree, samples = report["agreement"]["top1_agreement"], report["agreement"]["samples"]
    head = (f"the INT8 model agrees with the float model on only {agree:.1%} of {samples} test examples "
            f"(min_agreement {cfg.min_agreement:.0%})")
    fallback = report.get("fallback")
    if fallback is None:
        auto = " (or let fallback: auto find them)" if step != "qat" else ""
        return (f"{head}; keep sensitive layers in float with keep_float{auto}, calibrate on more examples, or try "
                "method: entropy / percentile.")
    tried = "; ".join(f"[{', '.join(a['float_layers'])}] -> {a['agreement']:.1%}" for a in fallback["attempts"])
    return (f"{head}, even with the most INT8-sensitive layers kept in float (fallback: auto, at most "
            f"max_float_layers {cfg.max_float_layers}). Layers in float and the agreement of each attempt: {tried}. "
            "Raise max_float_layers, name the layers in keep_float, calibrate on more examples, or try "
            "method: entropy / percentile.")


def onnx_step(ctx: Context, cfg: StaticInt8 | DynamicInt8, step: str, overrides: dict | None = None,
              float_path: Path | None = None) -> dict[str, Any]:
    """Quantize the current artifact (exporting first if needed); keep or revert by the verdict,
    which is appended to ``ctx.verdicts`` under ``step``."""
    report: dict[str, Any] = {}
    if float_path is None:
        if ctx.onnx_path is None:
            report["export"] = export_step(ctx)
        float_path = ctx.onnx_path
    assert float_path is not None  # export_step set it
    dst = ctx.new_path("model-int8")
    target = Target("ort-cpu", ctx.batch_sizes, ctx.threads, ctx.max_seconds)
    report.update(quantize_onnx(float_path, dst, cfg, data=ctx.data, model=ctx.model, target=target,
                                range_overrides=overrides))
    agree = report["agreement"]["top1_agreement"]
    if agree < cfg.min_agreement:
        raise ExportError(_refusal(report, cfg, step))
    fallback = report.get("fallback")
    if fallback is not None:
        _console.info(f"  kept in float automatically: {', '.join(fallback['kept_float'])} (agreement {agree:.1%}); "
                      f"to reproduce without the search: keep_float: \\[{', '.join(fallback['keep_float'])}]")
    lat = report["latency_ms"]
    summary = ", ".join(f"batch {b}: {lat['float'][b]:.3f} -> {lat['int8'][b]:.3f} ms" for b in lat["float"])
    report["applied"] = report["faster"] or cfg.if_slower != "revert"
    add_verdict(ctx, step, report)
    if not report["applied"]:
        _console.info(f"  INT8 is [yellow]not faster[/yellow] ({summary}): keeping the float artifact (if_slower: revert)")
        ctx.onnx_path = float_path
        return report
    verdict = "faster" if report["faster"] else "[yellow]NOT faster[/yellow]"
    _console.info(f"  INT8 is {verdict} than float ({summary}); {report['int8_op_count']} integer kernels run")
    ctx.float_onnx_path = float_path
    ctx.onnx_path = dst
    ctx.parity = report["agreement"]
    return report
