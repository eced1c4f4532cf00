"""INT8 for ONNX Runtime: static (calibrated QDQ) and dynamic quantization of an ONNX file,
the census of the integer kernels ORT runs, and the float-vs-INT8 speed verdict."""

from __future__ import annotations

import contextlib
import logging
import math
import tempfile
import warnings
from collections.abc import Iterable, Mapping, Sequence
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
# Where quantize_onnx measures by default: one ORT thread, batch sizes 1 and 64, 1 s per batch size.
QUANTIZE_TARGET = Target("ort-cpu", (1, 64), threads=1, max_seconds=1.0)


@contextlib.contextmanager
def _quiet_ort():
    """onnxruntime.quantization logs warnings (pre-processing advice) through the root logger."""
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
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

    try:
        with _quiet_ort():
            quant_pre_process(str(src), str(dst))
        return dst, True
    except Exception as e:  # a graph its symbolic shape inference cannot handle: quantize as exported
        _console.info(f"  ORT pre-processing skipped ({type(e).__name__}: {str(e).splitlines()[0][:120] if str(e) else ''})")
        return src, False


class _Reader:
    """ONNX Runtime's CalibrationDataReader protocol over a tensor of examples."""

    def __init__(self, input_name: str, x: torch.Tensor, batch: int = 32):
        self.batches = [{input_name: np.ascontiguousarray(x[i : i + batch].numpy(), dtype=np.float32)}
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
            reduce_range: bool, range_overrides: dict[str, tuple[float, float]] | None) -> Any:
    """``write(path)``: ONNX Runtime's static (with ``x_cal``) or dynamic quantization of ``pre`` into ``path``."""
    from onnxruntime import quantization as oq

    if isinstance(config, DynamicInt8):
        ops = ["MatMul", "Gemm"] if config.ops == "linear" else None
        return lambda out: oq.quantize_dynamic(
            str(pre), str(out), op_types_to_quantize=ops, per_channel=config.per_channel, reduce_range=reduce_range,
            weight_type=_qtype(config.weight_type), nodes_to_exclude=exclude)
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
    with tempfile.TemporaryDirectory(prefix="slimkit-quant-") as tmp:
        dense, densified = _densify(src, Path(tmp) / "dense.onnx")
        pre, preprocessed = _preprocess(dense, Path(tmp) / "pre.onnx")
        exclude, kept = _excluded_nodes(onnx.load(str(pre), load_external_data=False), config.keep_float)
        write = _writer(pre, config, x_cal, exclude, reduce_range, range_overrides)
        with _console.status(f"{label} INT8 quantization with ONNX Runtime"), _quiet_ort():
            try:
                _io.atomic_write(dst, write)
            except SlimkitError:
                raise
            except Exception as e:
                raise ExportError(f"ONNX Runtime could not quantize {src.name}: {type(e).__name__}: "
                                  f"{str(e).splitlines()[0][:300] if str(e) else ''}") from None
    optimized = _optimized_graph(dst, threads)
    ops_int = _census(optimized.graph, INT8_KERNELS)
    agreement = parity(model if model is not None else src, dst, data.x_test[:parity_samples], threads=threads)
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
    }
    report["accuracy_drop"] = round(report["accuracy"]["float"] - report["accuracy"]["int8"], 6)
    report.update(speed_report(compare_latency({"float": src, "int8": dst}, data, target.batch_sizes, threads=threads,
                                               max_seconds=target.max_seconds)))
    if not ops_int:
        _console.info("  [yellow]no integer kernel runs in ONNX Runtime's optimised graph[/yellow]")
    return report


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
        raise ExportError(
            f"the INT8 model agrees with the float model on only {agree:.1%} of {report['agreement']['samples']} "
            f"test examples (min_agreement {cfg.min_agreement:.0%}); keep sensitive layers in float with "
            "keep_float, calibrate on more examples, or try method: entropy / percentile.")
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
