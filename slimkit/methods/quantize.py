"""INT8 quantization that is measured: static and dynamic INT8 for ONNX Runtime, dynamic INT8
for eager PyTorch, and quantization-aware training exported to integer QDQ kernels.

Top level API::

    quantize_onnx(src, dst, StaticInt8(method="entropy"), data=data)  # calibrated QDQ INT8 (ort-cpu)
    quantize_onnx(src, dst, DynamicInt8(), data=data)   # INT8 weights, activations quantized at run time
    quantize_(model, DynamicInt8())                     # torch-cpu: int8 linear kernels, in place
    quantize_(model, QAT(epochs=2), data=data)          # fake quantization + fine-tune, in place
    int8_ops(onnx_path)                                 # integer kernels in ONNX Runtime's optimised graph

INT8 is not always faster (on small models ONNX Runtime's integer kernels often lose to its
float ones), so every ONNX-level result carries a verdict: the float and the INT8 artifact
timed side by side at the batch sizes asked for, and ``"faster"``: true only if INT8 wins at
every one of them. The integer operators counted are those of the graph ONNX Runtime runs
after its own optimisations (``QLinearConv``, ``QGemm``, ...), which proves int8 kernels run.

>>> from slimkit.data import load_data
>>> from slimkit.models import create_model
>>> from slimkit.export import export_onnx
>>> data = load_data("digits")
>>> model = create_model("lenet5", input_shape=data.input_shape, num_classes=10)
>>> path = export_onnx(model, "/tmp/lenet5-float.onnx", data.example(2))
>>> report = quantize_onnx(path, "/tmp/lenet5-int8.onnx", StaticInt8(calibration_size=64), data=data,
...                        max_seconds=0.2)
>>> report["int8_ops"]["QLinearConv"], isinstance(report["faster"], bool)
(2, True)
"""

from __future__ import annotations

import contextlib
import logging
import math
import tempfile
import warnings
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .. import _console
from ..config import check
from ..data import DataBundle
from ..errors import ConfigError, ExportError, SlimkitError
from ..models import record_structure, register_structure_op, set_module
from ..pipeline import Context, ExportTransform, register_space, register_step
from ..training import fit
from ..pipeline import Finetune, export_step

__all__ = [
    "StaticInt8",
    "DynamicInt8",
    "QAT",
    "quantize_",
    "quantize_onnx",
    "int8_ops",
    "compare_latency",
    "Int8DynamicLinear",
    "FakeQuant",
    "fold_batchnorm_",
]

METHODS = ("minmax", "entropy", "percentile")
FORMATS = ("qdq", "qoperator")
INT8_TYPES = ("uint8", "int8")
IF_SLOWER = ("keep", "revert")
DYNAMIC_OPS = ("linear", "all")

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


# ----------------------------------------------------------------------------- configs


def _check_names(names: Iterable[str], field_name: str) -> None:
    for n in names:
        check(isinstance(n, str) and n.strip() != "", field_name, f"layer names must be non-empty strings, got {n!r}")


def check_layers(model: nn.Module, names: Iterable[str], field_name: str) -> list[str]:
    """The module names of ``model`` that ``names`` cover (a name covers itself and its children).

    An unknown name is a :class:`ConfigError` listing the model's layers.
    """
    modules = [n for n, _ in model.named_modules() if n]
    covered: list[str] = []
    for name in names:
        hit = [m for m in modules if m == name or m.startswith(name + ".")]
        if not hit:
            leaves = [n for n, m in model.named_modules() if n and not list(m.children())]
            shown = ", ".join(leaves[:30]) + (f", ... ({len(leaves)} in all)" if len(leaves) > 30 else "")
            raise ConfigError(f"the model has no layer named '{name}'; its layers are: {shown}", field=field_name)
        covered += [m for m in hit if m not in covered]
    return covered


@dataclass
class StaticInt8:
    """Static INT8 for ONNX Runtime: weights and activations in 8 bits, activation ranges
    calibrated on training examples; integer kernels (QLinearConv, QGemm...) run in ORT.

    ``calibration_size`` examples from the training split, ranges by ``method`` (``minmax``,
    ``entropy`` or ``percentile`` with ``percentile``); ``per_channel`` weight scales; ``format``
    ``qdq`` (QuantizeLinear/DequantizeLinear pairs ORT fuses into integer kernels: the fast one
    on CPU) or ``qoperator``; ``activation_type`` / ``weight_type`` ``uint8`` or ``int8`` (uint8
    activations with int8 weights are the fast pair on x86); ``reduce_range`` (7-bit weights,
    for CPUs without VNNI; null: decided from this CPU); ``keep_float``: torch module names left
    in float; ``if_slower``: ``keep`` the INT8 artifact anyway (the report says it is slower) or
    ``revert`` to the float one; ``min_agreement``: the least top-1 agreement with the torch
    model on test examples, else the step fails.
    """

    calibration_size: int = 256
    method: str = "minmax"
    percentile: float = 99.999
    per_channel: bool = True
    format: str = "qdq"
    activation_type: str = "uint8"
    weight_type: str = "int8"
    reduce_range: bool | None = None
    keep_float: list[str] = field(default_factory=list)
    if_slower: str = "keep"
    min_agreement: float = 0.9

    def __post_init__(self) -> None:
        check(self.calibration_size >= 1, "calibration_size",
              f"the calibration set must hold at least 1 example, got {self.calibration_size}")
        check(self.method in METHODS, "method", f"got '{self.method}'; choose one of {', '.join(METHODS)}")
        check(50 < self.percentile <= 100, "percentile", f"must be in (50, 100], got {self.percentile}")
        check(self.format in FORMATS, "format", f"got '{self.format}'; choose one of {', '.join(FORMATS)}")
        check(self.activation_type in INT8_TYPES, "activation_type",
              f"got '{self.activation_type}'; choose one of {', '.join(INT8_TYPES)}")
        check(self.weight_type in INT8_TYPES, "weight_type", f"got '{self.weight_type}'; choose one of {', '.join(INT8_TYPES)}")
        check(self.if_slower in IF_SLOWER, "if_slower", f"got '{self.if_slower}'; choose one of {', '.join(IF_SLOWER)}")
        check(0 <= self.min_agreement <= 1, "min_agreement", f"must be in [0, 1], got {self.min_agreement}")
        _check_names(self.keep_float, "keep_float")

    def check_model(self, model: nn.Module) -> None:
        check_layers(model, self.keep_float, "keep_float")


@dataclass
class DynamicInt8:
    """Dynamic INT8: weights stored in 8 bits, activations quantized batch by batch at run time.

    On ``ort-cpu`` (step ``quantize_dynamic``) ONNX Runtime's dynamic quantization of ``ops``:
    ``linear`` (MatMul/Gemm: DynamicQuantizeMatMul kernels) or ``all`` (convolutions too, as
    ConvInteger, which is slow on CPU). On ``torch-cpu`` (step ``quantize_dynamic_torch``) each
    ``nn.Linear`` becomes an :class:`Int8DynamicLinear` running PyTorch's x86 int8 kernel.
    ``weight_type``: ``int8`` or ``uint8`` (ORT only); ``per_channel`` scales; ``reduce_range``
    (7-bit, for CPUs without VNNI; null: decided from this CPU); ``keep_float``: module names
    left in float; ``if_slower`` and ``min_agreement`` as in :class:`StaticInt8`.
    """

    ops: str = "linear"
    weight_type: str = "int8"
    per_channel: bool = True
    reduce_range: bool | None = None
    keep_float: list[str] = field(default_factory=list)
    if_slower: str = "keep"
    min_agreement: float = 0.9

    def __post_init__(self) -> None:
        check(self.ops in DYNAMIC_OPS, "ops", f"got '{self.ops}'; choose one of {', '.join(DYNAMIC_OPS)}")
        check(self.weight_type in INT8_TYPES, "weight_type", f"got '{self.weight_type}'; choose one of {', '.join(INT8_TYPES)}")
        check(self.if_slower in IF_SLOWER, "if_slower", f"got '{self.if_slower}'; choose one of {', '.join(IF_SLOWER)}")
        check(0 <= self.min_agreement <= 1, "min_agreement", f"must be in [0, 1], got {self.min_agreement}")
        _check_names(self.keep_float, "keep_float")

    def check_model(self, model: nn.Module) -> None:
        check_layers(model, self.keep_float, "keep_float")


@dataclass
class QAT(Finetune):
    """Quantization-aware training: batch norms folded into their convolutions, then weights
    (int8, symmetric, per channel) and the inputs and outputs of every conv / linear layer
    (``activation_type``, observed with a moving min/max) are fake-quantized, and the model
    fine-tunes through them (straight-through estimator) for ``epochs`` (0: only insert them;
    later ``finetune`` steps train through them too). The export then runs in ONNX Runtime
    with integer QDQ kernels, using the learned ranges; measured like ``quantize_static``.

    The training fields are those of ``finetune`` (``epochs``, ``lr``, ``distill``...);
    ``calibration_size`` examples set the initial ranges; ``momentum`` of the range averages;
    ``keep_float``, ``if_slower`` and ``min_agreement`` as in :class:`StaticInt8`.
    """

    epochs: int = 2
    lr: float = 1e-4
    per_channel: bool = True
    activation_type: str = "uint8"
    calibration_size: int = 256
    momentum: float = 0.01
    keep_float: list[str] = field(default_factory=list)
    if_slower: str = "keep"
    min_agreement: float = 0.9

    def __post_init__(self) -> None:
        super().__post_init__()
        check(self.activation_type in INT8_TYPES, "activation_type",
              f"got '{self.activation_type}'; choose one of {', '.join(INT8_TYPES)}")
        check(self.calibration_size >= 1, "calibration_size",
              f"the calibration set must hold at least 1 example, got {self.calibration_size}")
        check(0 < self.momentum <= 1, "momentum", f"must be in (0, 1], got {self.momentum}")
        check(self.if_slower in IF_SLOWER, "if_slower", f"got '{self.if_slower}'; choose one of {', '.join(IF_SLOWER)}")
        check(0 <= self.min_agreement <= 1, "min_agreement", f"must be in [0, 1], got {self.min_agreement}")
        _check_names(self.keep_float, "keep_float")

    def check_model(self, model: nn.Module) -> None:
        check_layers(model, self.keep_float, "keep_float")


# ----------------------------------------------------------------------------- shared helpers


def cpu_has_vnni() -> bool:
    """Whether this CPU has 8-bit dot-product instructions (VNNI / AMX), so full-range int8 is safe."""
    try:
        flags = next((ln for ln in Path("/proc/cpuinfo").read_text().splitlines() if ln.startswith("flags")), "")
    except OSError:
        return False
    have = set(flags.split(":", 1)[-1].split())
    return bool(have & {"avx512_vnni", "avx_vnni", "amx_int8"})


def _reduce_range(value: bool | None) -> bool:
    return (not cpu_has_vnni()) if value is None else bool(value)


def _calibration(data: DataBundle, n: int) -> torch.Tensor:
    x = data.calibration(n)
    if len(x) == 0:
        raise SlimkitError(f"the calibration set of {data.name} is empty: the training split holds no example "
                           "to calibrate INT8 ranges on.")
    return x


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


def _optimized_graph(path: Path, threads: int = 1):
    """The graph ONNX Runtime actually runs, after its own optimisations (fusions into QLinearConv...)."""
    import onnx

    from ..export import ort_session

    with tempfile.TemporaryDirectory(prefix="slimkit-opt-") as tmp:
        out = Path(tmp) / "optimized.onnx"
        ort_session(path, threads, optimized_path=str(out))
        return onnx.load(str(out), load_external_data=False)


def int8_ops(path: str | Path) -> dict[str, int]:
    """Integer kernels (op type -> count) in the graph ONNX Runtime runs for ``path``, after its
    optimisations: the proof that int8 kernels run. ``{}`` for a float model."""
    counts: dict[str, int] = {}
    for node in _optimized_graph(Path(path)).graph.node:
        if node.op_type in INT8_KERNELS:
            counts[node.op_type] = counts.get(node.op_type, 0) + 1
    return counts


def _float_ops(graph: Any) -> dict[str, int]:
    counts: dict[str, int] = {}
    for node in graph.node:
        if node.op_type in FLOAT_KERNELS:
            counts[node.op_type] = counts.get(node.op_type, 0) + 1
    return counts


def compare_latency(artifacts: dict[str, Path], data: DataBundle, batch_sizes: Sequence[int], *, threads: int,
                    max_seconds: float = 1.0, rounds: int = 3) -> dict[str, dict[str, float]]:
    """Median latency (ms) of each ONNX artifact per batch size, measured side by side.

    The artifacts are timed in interleaved rounds (rotating order) and each figure is the
    median of the rounds' medians, so a noisy machine slows them alike.
    """
    from ..measure.backends import get_backend, time_runs

    backend = get_backend("ort-cpu")
    runners = {name: backend.prepare(None, Path(p), threads) for name, p in artifacts.items()}
    names = list(runners)
    samples: dict[str, dict[str, list[float]]] = {n: {str(b): [] for b in batch_sizes} for n in names}
    per = max(0.02, max_seconds / rounds)
    try:
        for r in range(rounds):
            order = names[r % len(names):] + names[: r % len(names)]
            for bs in batch_sizes:
                x = np.ascontiguousarray(data.example(int(bs)).numpy(), dtype=np.float32)
                for name in order:
                    stats = time_runs(lambda: runners[name](x), max_seconds=per, warmup_s=min(0.1, per))
                    samples[name][str(bs)].append(stats["median"])
    finally:
        for run in runners.values():
            run.close()
    return {n: {b: float(np.median(v)) for b, v in per_bs.items()} for n, per_bs in samples.items()}


def _onnx_accuracy(path: Path, data: DataBundle, threads: int) -> float:
    from ..export import ort_predict, ort_session

    logits = ort_predict(ort_session(path, threads), data.x_test)
    return float(np.mean(logits.argmax(1) == data.y_test.numpy()))


def _verdict(float_path: Path, int8_path: Path, data: DataBundle, batch_sizes: Sequence[int], threads: int,
             max_seconds: float) -> dict[str, Any]:
    """Both latencies side by side, the speed-up per batch size and whether INT8 is faster at all of them."""
    with _console.status("timing the float and the INT8 artifacts side by side"):
        lat = compare_latency({"float": float_path, "int8": int8_path}, data, batch_sizes, threads=threads,
                              max_seconds=max_seconds)
    speedup = {b: lat["float"][b] / lat["int8"][b] if lat["int8"][b] > 0 else 0.0 for b in lat["float"]}
    faster_at = {b: s > 1.0 for b, s in speedup.items()}
    geo = math.exp(sum(math.log(max(s, 1e-9)) for s in speedup.values()) / max(len(speedup), 1))
    return {
        "latency_ms": {"float": lat["float"], "int8": lat["int8"]},
        "speedup": {b: round(s, 4) for b, s in speedup.items()},
        "speedup_geomean": round(geo, 4),
        "faster_at": faster_at,
        "faster": all(faster_at.values()),
    }


def _nodes_of_layers(onnx_model: Any, layers: Iterable[str]) -> dict[str, list[str]]:
    """ONNX node names per torch module name (a module covers its children)."""
    from ..measure._graph import module_of_node

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
    from ..measure._graph import module_of_node

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
    import math as _math

    import onnx
    from onnx import numpy_helper

    model = onnx.load(str(src))
    sparse = list(model.graph.sparse_initializer)
    if not sparse:
        return src, 0
    for sp in sparse:
        values = numpy_helper.to_array(sp.values)
        idx = numpy_helper.to_array(sp.indices).astype(np.int64)
        dense = np.zeros(_math.prod(sp.dims), dtype=values.dtype)
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


def _qtype(name: str):
    from onnxruntime.quantization import QuantType

    return QuantType.QUInt8 if name == "uint8" else QuantType.QInt8


def _input_name(path: Path) -> str:
    import onnx

    m = onnx.load(str(path), load_external_data=False)
    inits = {i.name for i in m.graph.initializer}
    return next(i.name for i in m.graph.input if i.name not in inits)


# ----------------------------------------------------------------------------- ONNX-level: static / dynamic


def quantize_onnx(
    src: str | Path,
    dst: str | Path,
    config: StaticInt8 | DynamicInt8,
    *,
    data: DataBundle,
    model: nn.Module | None = None,
    threads: int = 1,
    batch_sizes: Sequence[int] = (1, 64),
    max_seconds: float = 1.0,
    parity_samples: int = 512,
    range_overrides: dict[str, tuple[float, float]] | None = None,
) -> dict[str, Any]:
    """Quantize the ONNX file ``src`` to INT8 into ``dst`` (the source is not changed); measure it.

    ``config``: :class:`StaticInt8` (calibrated on ``data``) or :class:`DynamicInt8` (ORT's
    dynamic quantization). ``model``: the torch model ``src`` was exported from; top-1 agreement
    is measured against it (else against ``src``), and ``keep_float`` names are checked on it.
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
    >>> r = quantize_onnx(src, "/tmp/mlp-dyn.onnx", DynamicInt8(), data=data, max_seconds=0.2)
    >>> r["int8_ops"]
    {'DynamicQuantizeMatMul': 3}
    """
    from onnxruntime import quantization as oq

    src, dst = Path(src), Path(dst)
    if not src.is_file():
        raise SlimkitError(f"ONNX file {src} does not exist.")
    if dst.resolve() == src.resolve():
        raise SlimkitError(f"the INT8 model would overwrite its source {src}; choose another output path.")
    if model is not None:
        config.check_model(model)
    static = isinstance(config, StaticInt8)
    x_cal = _calibration(data, config.calibration_size) if static else None
    reduce_range = _reduce_range(config.reduce_range)
    from .. import _io

    with tempfile.TemporaryDirectory(prefix="slimkit-quant-") as tmp:
        dense, densified = _densify(src, Path(tmp) / "dense.onnx")
        pre, preprocessed = _preprocess(dense, Path(tmp) / "pre.onnx")
        import onnx

        graph = onnx.load(str(pre), load_external_data=False)
        exclude, kept = _excluded_nodes(graph, config.keep_float)
        label = "static" if static else "dynamic"
        with _console.status(f"{label} INT8 quantization with ONNX Runtime"), _quiet_ort():
            if static:
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

                def write(tmp_path: Path) -> None:
                    oq.quantize_static(
                        str(pre), str(tmp_path), _Reader(_input_name(pre), x_cal), quant_format=fmt,
                        per_channel=config.per_channel, reduce_range=reduce_range,
                        activation_type=_qtype(config.activation_type), weight_type=_qtype(config.weight_type),
                        nodes_to_exclude=exclude, calibrate_method=method, extra_options=extra,
                    )
            else:
                ops = ["MatMul", "Gemm"] if config.ops == "linear" else None

                def write(tmp_path: Path) -> None:
                    oq.quantize_dynamic(
                        str(pre), str(tmp_path), op_types_to_quantize=ops, per_channel=config.per_channel,
                        reduce_range=reduce_range, weight_type=_qtype(config.weight_type), nodes_to_exclude=exclude,
                    )

            try:
                _io.atomic_write(dst, write)
            except SlimkitError:
                raise
            except Exception as e:
                raise ExportError(f"ONNX Runtime could not quantize {src.name}: {type(e).__name__}: "
                                  f"{str(e).splitlines()[0][:300] if str(e) else ''}") from None
    optimized = _optimized_graph(dst, threads)
    ops_int = {}
    for node in optimized.graph.node:
        if node.op_type in INT8_KERNELS:
            ops_int[node.op_type] = ops_int.get(node.op_type, 0) + 1
    x = data.x_test[:parity_samples]
    from ..export import parity

    agreement = parity(model if model is not None else src, dst, x, threads=threads)
    report: dict[str, Any] = {
        "mode": label,
        **({"method": config.method, "calibration_size": int(len(x_cal)), "format": config.format,
            "activation_type": config.activation_type} if static else {"ops": config.ops}),
        "weight_type": config.weight_type,
        "per_channel": config.per_channel,
        "reduce_range": reduce_range,
        "preprocessed": preprocessed,
        "densified_sparse_weights": densified,
        "kept_float": kept,
        "int8_ops": ops_int,
        "int8_op_count": sum(ops_int.values()),
        "float_ops": _float_ops(optimized.graph),
        "onnx_bytes": {"float": src.stat().st_size, "int8": dst.stat().st_size},
        "accuracy": {"float": _onnx_accuracy(src, data, threads), "int8": _onnx_accuracy(dst, data, threads)},
        "agreement": agreement,
    }
    report["accuracy_drop"] = round(report["accuracy"]["float"] - report["accuracy"]["int8"], 6)
    report.update(_verdict(src, dst, data, batch_sizes, threads, max_seconds))
    if not ops_int:
        _console.info("  [yellow]no integer kernel runs in ONNX Runtime's optimised graph[/yellow]")
    return report


def _onnx_step(ctx: Context, cfg: StaticInt8 | DynamicInt8, overrides: dict | None = None,
               float_path: Path | None = None) -> dict[str, Any]:
    """Quantize the current artifact (exporting first if needed); keep or revert by the verdict."""
    report: dict[str, Any] = {}
    if float_path is None:
        if ctx.onnx_path is None:
            report["export"] = export_step(ctx)
        float_path = ctx.onnx_path
    dst = ctx.new_path("model-int8")
    report.update(quantize_onnx(float_path, dst, cfg, data=ctx.data, model=ctx.model, threads=ctx.threads,
                                batch_sizes=ctx.batch_sizes, max_seconds=ctx.max_seconds, range_overrides=overrides))
    agree = report["agreement"]["top1_agreement"]
    if agree < cfg.min_agreement:
        raise ExportError(
            f"the INT8 model agrees with the float model on only {agree:.1%} of {report['agreement']['samples']} "
            f"test examples (min_agreement {cfg.min_agreement:.0%}); keep sensitive layers in float with "
            "keep_float, calibrate on more examples, or try method: entropy / percentile.")
    lat = report["latency_ms"]
    summary = ", ".join(f"batch {b}: {lat['float'][b]:.3f} -> {lat['int8'][b]:.3f} ms" for b in lat["float"])
    if not report["faster"] and cfg.if_slower == "revert":
        _console.info(f"  INT8 is [yellow]not faster[/yellow] ({summary}): keeping the float artifact (if_slower: revert)")
        report["applied"] = False
        ctx.onnx_path = float_path
        return report
    verdict = "faster" if report["faster"] else "[yellow]NOT faster[/yellow]"
    _console.info(f"  INT8 is {verdict} than float ({summary}); {report['int8_op_count']} integer kernels run")
    report["applied"] = True
    ctx.float_onnx_path = float_path
    ctx.onnx_path = dst
    ctx.parity = report["agreement"]
    return report


@register_step("quantize_static", StaticInt8, forbids={"quantized", "fake_quant"}, sets={"exported", "quantized"},
               targets={"ort-cpu"})
def _static_step(ctx: Context, cfg: StaticInt8) -> dict[str, Any]:
    """Static INT8 with calibration (ONNX Runtime, QDQ); reports INT8 vs float latency and "faster"."""
    return _onnx_step(ctx, cfg)


@register_space("quantize_static", order=90)
def _static_space(trial: Any) -> StaticInt8 | None:
    if not trial.suggest_categorical("quantize_static.on", [False, True]):
        return None
    return StaticInt8(
        method=trial.suggest_categorical("quantize_static.method", list(METHODS)),
        per_channel=trial.suggest_categorical("quantize_static.per_channel", [True, False]),
        calibration_size=trial.suggest_categorical("quantize_static.calibration_size", [64, 256]),
    )


@register_step("quantize_dynamic", DynamicInt8, forbids={"quantized", "fake_quant"}, sets={"exported", "quantized"},
               targets={"ort-cpu"})
def _dynamic_step(ctx: Context, cfg: DynamicInt8) -> dict[str, Any]:
    """Dynamic INT8 in ONNX Runtime (linear layers by default); reports INT8 vs float latency and "faster"."""
    return _onnx_step(ctx, cfg)


@register_space("quantize_dynamic", order=90)
def _dynamic_space(trial: Any) -> DynamicInt8 | None:
    if not trial.suggest_categorical("quantize_dynamic.on", [False, True]):
        return None
    return DynamicInt8(
        weight_type=trial.suggest_categorical("quantize_dynamic.weight_type", list(INT8_TYPES)),
        per_channel=trial.suggest_categorical("quantize_dynamic.per_channel", [True, False]),
    )


# ----------------------------------------------------------------------------- torch-cpu: dynamic int8 linear


def _quantized_ops_available() -> bool:
    return hasattr(torch.ops.quantized, "linear_dynamic") and hasattr(torch.ops.quantized, "linear_prepack")


class Int8DynamicLinear(nn.Module):
    """``nn.Linear`` with int8 weights (symmetric, one scale per output channel or one in all)
    whose input is quantized to 8 bits batch by batch: PyTorch's x86 kernel
    ``quantized::linear_dynamic`` (what the deprecated ``torch.ao.quantization.quantize_dynamic``
    runs), with its state held as plain tensors so the model saves as safetensors and reloads.

    While traced (ONNX export, batch-norm folding) it computes the same function in float with
    the dequantized weights, so the model still exports.
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True, reduce_range: bool = False):
        super().__init__()
        self.in_features, self.out_features, self.reduce_range = in_features, out_features, reduce_range
        # int8 values are weights, so they count as parameters; they never train.
        self.weight_int8 = nn.Parameter(torch.zeros(out_features, in_features, dtype=torch.int8), requires_grad=False)
        self.register_buffer("weight_scale", torch.ones(out_features))
        self.bias = nn.Parameter(torch.zeros(out_features)) if bias else None
        self._packed: Any = None

    @classmethod
    def from_float(cls, linear: nn.Linear, per_channel: bool = True, reduce_range: bool = False) -> "Int8DynamicLinear":
        w = linear.weight.detach().float()
        absmax = w.abs().amax(dim=1) if per_channel else w.abs().amax().expand(w.shape[0])
        scale = (absmax / 127.0).clamp_min(1e-12)  # (out,)
        q = torch.clamp(torch.round(w / scale[:, None]), -127, 127).to(torch.int8)
        m = cls(linear.in_features, linear.out_features, linear.bias is not None, reduce_range)
        with torch.no_grad():
            m.weight_int8.copy_(q)
            m.weight_scale.copy_(scale)
            if linear.bias is not None:
                m.bias.copy_(linear.bias.detach())
        return m

    def dequantized_weight(self) -> torch.Tensor:
        return self.weight_int8.float() * self.weight_scale[:, None]  # (out, in)

    def _packed_params(self) -> Any:
        if self._packed is None:
            with warnings.catch_warnings():  # quantized tensor creation warns of its deprecation
                warnings.simplefilter("ignore")
                q = torch._make_per_channel_quantized_tensor(
                    self.weight_int8.detach(), self.weight_scale.detach().double(),
                    torch.zeros(self.out_features, dtype=torch.long), 0)
                bias = None if self.bias is None else self.bias.detach().float()
                self._packed = torch.ops.quantized.linear_prepack(q, bias)
        return self._packed

    def _load_from_state_dict(self, *args: Any, **kwargs: Any) -> None:
        self._packed = None
        super()._load_from_state_dict(*args, **kwargs)

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_packed"] = None  # rebuilt from the tensors on first use
        return state

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.compiler.is_exporting() or torch.compiler.is_compiling() or x.dtype != torch.float32:
            return F.linear(x, self.dequantized_weight().to(x.dtype), self.bias)
        return torch.ops.quantized.linear_dynamic(x, self._packed_params(), self.reduce_range)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, int8, reduce_range={self.reduce_range}"


def _register_flops() -> None:
    """Count the int8 kernel's multiply-accumulates like a linear layer's (FlopCounterMode)."""
    from torch.utils.flop_counter import flop_registry, register_flop_formula

    if not _quantized_ops_available() or torch.ops.quantized.linear_dynamic in flop_registry:
        return

    @register_flop_formula(torch.ops.quantized.linear_dynamic, get_raw=True)
    def _linear_dynamic_flops(x: torch.Tensor, *args: Any, out_val: torch.Tensor | None = None, **kwargs: Any) -> int:
        return 2 * out_val.numel() * x.shape[-1] if out_val is not None else 0


_register_flops()


@register_structure_op("int8_dynamic_linear")
def _replay_dynamic(model: nn.Module, op: dict[str, Any]) -> None:
    for name in op["layers"]:
        lin = model.get_submodule(name)
        set_module(model, name, Int8DynamicLinear(lin.in_features, lin.out_features, lin.bias is not None,
                                                   bool(op.get("reduce_range", False))))


def _quantize_dynamic_torch_(model: nn.Module, cfg: DynamicInt8) -> dict[str, Any]:
    if cfg.ops != "linear":
        raise ConfigError("PyTorch dynamic quantization covers linear layers only; use ops: linear "
                          "(convolutions: the ort-cpu target's quantize_static)", field="ops")
    if cfg.weight_type != "int8":
        raise ConfigError("PyTorch's int8 linear kernel takes int8 weights; use weight_type: int8", field="weight_type")
    if not _quantized_ops_available():
        raise SlimkitError(f"this torch ({torch.__version__}) has no quantized::linear_dynamic kernel; "
                           "use target ort-cpu with quantize_dynamic instead.")
    keep = set(check_layers(model, cfg.keep_float, "keep_float"))
    reduce_range = _reduce_range(cfg.reduce_range)
    names = [n for n, m in model.named_modules() if type(m) is nn.Linear and n not in keep]
    if not names:
        raise SlimkitError("the model has no nn.Linear layer to quantize dynamically (convolutions need "
                           "static INT8: target ort-cpu, step quantize_static).")
    before = sum(m.weight.numel() * m.weight.element_size() for n, m in model.named_modules() if n in names)
    for name in names:
        set_module(model, name, Int8DynamicLinear.from_float(model.get_submodule(name), cfg.per_channel, reduce_range))
    record_structure(model, {"op": "int8_dynamic_linear", "layers": names, "reduce_range": reduce_range})
    after = sum(model.get_submodule(n).weight_int8.numel() for n in names)
    return {"mode": "dynamic", "runtime": "torch-cpu", "layers": names, "per_channel": cfg.per_channel,
            "reduce_range": reduce_range, "weight_bytes": {"float": before, "int8": after},
            "kernel": "quantized::linear_dynamic"}


@register_step("quantize_dynamic_torch", DynamicInt8, forbids={"exported", "quantized", "fake_quant"},
               sets={"quantized"}, targets={"torch-cpu"})
def _dynamic_torch_step(ctx: Context, cfg: DynamicInt8) -> dict[str, Any]:
    """Dynamic INT8 linear layers for eager PyTorch; reports INT8 vs float latency and "faster"."""
    from ..measure import accuracy
    from ..measure.backends import get_backend, time_runs

    before = _torch_copy(ctx.model)
    report = _quantize_dynamic_torch_(ctx.model, cfg)
    x = ctx.data.x_test
    with torch.no_grad():
        ref, got = before.eval()(x[:512]).argmax(1), ctx.model.eval()(x[:512]).argmax(1)
    report["agreement"] = {"top1_agreement": float((ref == got).float().mean()), "samples": int(min(len(x), 512))}
    report["accuracy"] = {"float": accuracy(before, x, ctx.data.y_test, threads=ctx.threads),
                          "int8": accuracy(ctx.model, x, ctx.data.y_test, threads=ctx.threads)}
    report["accuracy_drop"] = round(report["accuracy"]["float"] - report["accuracy"]["int8"], 6)
    if report["agreement"]["top1_agreement"] < cfg.min_agreement:
        raise SlimkitError(f"the INT8 model agrees with the float one on only {report['agreement']['top1_agreement']:.1%} "
                           f"of test examples (min_agreement {cfg.min_agreement:.0%}); keep layers in float with keep_float.")
    from ..export import fold_batchnorm

    backend = get_backend("torch-cpu")  # both timed as profile runs them: batch norms folded
    example = ctx.data.example(2)
    runners = {"float": backend.prepare(fold_batchnorm(before, example), None, ctx.threads),
               "int8": backend.prepare(fold_batchnorm(ctx.model, example), None, ctx.threads)}
    lat: dict[str, dict[str, list[float]]] = {k: {str(b): [] for b in ctx.batch_sizes} for k in runners}
    with _console.status("timing the float and the INT8 model side by side"):
        for r in range(3):
            for bs in ctx.batch_sizes:
                xb = np.ascontiguousarray(ctx.data.example(bs).numpy())
                for name in (("float", "int8") if r % 2 == 0 else ("int8", "float")):
                    lat[name][str(bs)].append(time_runs(lambda: runners[name](xb), max_seconds=max(0.02, ctx.max_seconds / 3),
                                                        warmup_s=0.05)["median"])
    med = {k: {b: float(np.median(v)) for b, v in per.items()} for k, per in lat.items()}
    speedup = {b: med["float"][b] / med["int8"][b] for b in med["float"]}
    report.update(latency_ms=med, speedup={b: round(s, 4) for b, s in speedup.items()},
                  faster_at={b: s > 1 for b, s in speedup.items()}, faster=all(s > 1 for s in speedup.values()))
    if not report["faster"] and cfg.if_slower == "revert":
        _console.info("  INT8 is [yellow]not faster[/yellow] on torch-cpu: keeping the float model (if_slower: revert)")
        _restore(ctx.model, before)
        report["applied"] = False
        return report
    report["applied"] = True
    return report


def _torch_copy(model: nn.Module) -> nn.Module:
    import copy

    return copy.deepcopy(model).eval()


def _restore(model: nn.Module, float_model: nn.Module) -> None:
    """Put the float layers back into ``model`` (in place) and forget the recorded int8 change."""
    from ..models import structure_of

    for name, mod in float_model.named_modules():
        if name and isinstance(model.get_submodule(name), Int8DynamicLinear):
            set_module(model, name, mod)
    ops = [op for op in structure_of(model) if op.get("op") != "int8_dynamic_linear"]
    model.__dict__["_slimkit_structure"] = ops


@register_space("quantize_dynamic_torch", order=75)  # torch-level: before export (80)
def _dynamic_torch_space(trial: Any) -> DynamicInt8 | None:
    if not trial.suggest_categorical("quantize_dynamic_torch.on", [False, True]):
        return None
    return DynamicInt8(per_channel=trial.suggest_categorical("quantize_dynamic_torch.per_channel", [True, False]))


# ----------------------------------------------------------------------------- quantization-aware training


class FakeQuant(nn.Module):
    """Fake quantization of an activation (one scale and zero point for the tensor) with a
    moving-average min/max observer, using ONNX Runtime's formulas for scale and zero point.

    In training it updates its range (``momentum``) and quantizes; the gradient passes straight
    through inside the range (``torch.fake_quantize_per_tensor_affine``). While observing
    (``observe=True``) in eval mode it widens its range to every batch it sees (calibration).
    While traced for export it is the identity: ONNX Runtime's quantizer inserts the real Q/DQ.
    """

    def __init__(self, dtype: str = "uint8", momentum: float = 0.01):
        super().__init__()
        self.dtype, self.momentum, self.observe = dtype, momentum, False
        self.register_buffer("min_val", torch.tensor(0.0))
        self.register_buffer("max_val", torch.tensor(0.0))
        self.register_buffer("seen", torch.tensor(0, dtype=torch.int64))

    def qparams(self) -> tuple[float, int, int, int]:
        """``(scale, zero_point, qmin, qmax)`` as ONNX Runtime computes them from the range."""
        lo, hi = min(float(self.min_val), 0.0), max(float(self.max_val), 0.0)
        if self.dtype == "int8":  # symmetric
            qmin, qmax = -127, 127
            absmax = max(abs(lo), abs(hi))
            scale = absmax / 127.0 if absmax > 0 else 1.0
            return scale, 0, qmin, qmax
        qmin, qmax = 0, 255
        scale = (hi - lo) / 255.0 if hi > lo else 1.0
        zp = int(round(qmin - lo / scale))
        return scale, max(qmin, min(qmax, zp)), qmin, qmax

    @torch.no_grad()
    def _update(self, x: torch.Tensor) -> None:
        lo, hi = x.min().float(), x.max().float()
        if int(self.seen) == 0:
            self.min_val.copy_(lo)
            self.max_val.copy_(hi)
        elif self.observe:
            self.min_val.copy_(torch.minimum(self.min_val, lo))
            self.max_val.copy_(torch.maximum(self.max_val, hi))
        else:
            self.min_val.lerp_(lo, self.momentum)
            self.max_val.lerp_(hi, self.momentum)
        self.seen += 1

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.compiler.is_exporting() or torch.compiler.is_compiling():
            return x
        if self.training or self.observe:
            self._update(x)
        if int(self.seen) == 0:
            return x
        scale, zp, qmin, qmax = self.qparams()
        return torch.fake_quantize_per_tensor_affine(x, scale, zp, qmin, qmax)

    def extra_repr(self) -> str:
        return f"{self.dtype}, range=[{float(self.min_val):.4g}, {float(self.max_val):.4g}]"


def fake_quant_weight(w: torch.Tensor, per_channel: bool = True) -> torch.Tensor:
    """Symmetric int8 fake quantization of a weight (scale = max |w| / 127, as ONNX Runtime's
    quantizer computes it), per output channel or for the whole tensor; identity while traced."""
    if torch.compiler.is_exporting() or torch.compiler.is_compiling():
        return w
    if per_channel:
        absmax = w.detach().abs().flatten(1).amax(dim=1)  # (out,)
        scale = (absmax / 127.0).clamp_min(1e-12).float()
        zp = torch.zeros(w.shape[0], dtype=torch.int32)
        return torch.fake_quantize_per_channel_affine(w, scale, zp, 0, -127, 127)
    scale = max(float(w.detach().abs().max()) / 127.0, 1e-12)
    return torch.fake_quantize_per_tensor_affine(w, scale, 0, -127, 127)


class _QATMixin:
    """Forward of a conv / linear layer with fake-quantized input, weight and output."""

    qat_per_channel: bool

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.act_in(x)
        w = fake_quant_weight(self.weight, self.qat_per_channel)
        return self.act_out(self._qat_forward(x, w))


class QATLinear(_QATMixin, nn.Linear):
    def _qat_forward(self, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        return F.linear(x, w, self.bias)


class QATConv1d(_QATMixin, nn.Conv1d):
    def _qat_forward(self, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        return self._conv_forward(x, w, self.bias)


class QATConv2d(_QATMixin, nn.Conv2d):
    def _qat_forward(self, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        return self._conv_forward(x, w, self.bias)


class QATConv3d(_QATMixin, nn.Conv3d):
    def _qat_forward(self, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        return self._conv_forward(x, w, self.bias)


_QAT_CLASSES: dict[type, type] = {nn.Linear: QATLinear, nn.Conv1d: QATConv1d, nn.Conv2d: QATConv2d, nn.Conv3d: QATConv3d}


def _qat_layers(model: nn.Module, keep: set[str]) -> list[str]:
    return [n for n, m in model.named_modules() if type(m) in _QAT_CLASSES and n not in keep]


def _make_qat(module: nn.Module, per_channel: bool, act_type: str, momentum: float) -> None:
    """Turn a conv / linear layer into its fake-quantized form, in place (same object, same parameters)."""
    module.__class__ = _QAT_CLASSES[type(module)]
    module.qat_per_channel = per_channel
    module.act_in = FakeQuant(act_type, momentum)
    module.act_out = FakeQuant(act_type, momentum)


def fold_batchnorm_(model: nn.Module, example: torch.Tensor) -> list[tuple[str, str]]:
    """Fold each foldable batch norm into the conv / linear before it, in place; returns the pairs.

    The layers stay the same objects (their weights and biases change), each folded batch norm
    becomes ``nn.Identity``, and the change is recorded so the saved model reloads.
    """
    from ..export import batchnorm_pairs

    was = model.training
    model.eval()
    pairs = batchnorm_pairs(model, example)
    for conv_name, bn_name in pairs:
        conv, bn = model.get_submodule(conv_name), model.get_submodule(bn_name)
        if isinstance(conv, nn.Linear):
            fused = torch.nn.utils.fusion.fuse_linear_bn_eval(conv, bn)
        else:
            fused = torch.nn.utils.fusion.fuse_conv_bn_eval(conv, bn)
        with torch.no_grad():
            conv.weight.copy_(fused.weight)
            if conv.bias is None:
                conv.bias = nn.Parameter(fused.bias.detach().clone())
            else:
                conv.bias.copy_(fused.bias)
        set_module(model, bn_name, nn.Identity())
    model.train(was)
    if pairs:
        record_structure(model, {"op": "fold_batchnorm", "pairs": [list(p) for p in pairs]})
    return pairs


@register_structure_op("fold_batchnorm")
def _replay_fold(model: nn.Module, op: dict[str, Any]) -> None:
    for conv_name, bn_name in op["pairs"]:
        conv = model.get_submodule(conv_name)
        if conv.bias is None:
            conv.bias = nn.Parameter(torch.zeros(conv.weight.shape[0]))
        set_module(model, bn_name, nn.Identity())


@register_structure_op("qat")
def _replay_qat(model: nn.Module, op: dict[str, Any]) -> None:
    for name in op["layers"]:
        _make_qat(model.get_submodule(name), bool(op["per_channel"]), op["activation_type"], float(op["momentum"]))


def _prepare_qat_(model: nn.Module, cfg: QAT, data: DataBundle) -> dict[str, Any]:
    keep = set(check_layers(model, cfg.keep_float, "keep_float"))
    x_cal = _calibration(data, cfg.calibration_size)
    pairs = fold_batchnorm_(model, data.example(2))
    names = _qat_layers(model, keep)
    if not names:
        raise SlimkitError("the model has no conv or linear layer to train with fake quantization.")
    for name in names:
        _make_qat(model.get_submodule(name), cfg.per_channel, cfg.activation_type, cfg.momentum)
    record_structure(model, {"op": "qat", "layers": names, "per_channel": cfg.per_channel,
                             "activation_type": cfg.activation_type, "momentum": cfg.momentum})
    observers = [m for m in model.modules() if isinstance(m, FakeQuant)]
    was = model.training
    model.eval()
    for obs in observers:
        obs.observe = True
    with torch.no_grad():  # initial ranges: the calibration examples' min / max
        for i in range(0, len(x_cal), 64):
            model(x_cal[i : i + 64])
    for obs in observers:
        obs.observe = False
    model.train(was)
    return {"layers": names, "folded_batchnorms": [list(p) for p in pairs], "calibration_size": int(len(x_cal))}


def quantize_(
    model: nn.Module,
    config: DynamicInt8 | QAT,
    *,
    data: DataBundle | None = None,
    teacher: nn.Module | None = None,
    hooks: Sequence[Any] = (),
) -> dict[str, Any]:
    """Quantize a torch model in place; return a report.

    ``DynamicInt8()``: every ``nn.Linear`` (except ``keep_float``) becomes an
    :class:`Int8DynamicLinear` (eager int8 kernels for ``torch-cpu``). ``QAT(...)``: batch norms
    folded, fake quantization inserted, then ``config.epochs`` of fine-tuning on ``data``
    (distilling from ``teacher``, default a copy taken before, when ``config.distill``).
    Export the QAT model with the ``export`` recipe step (or :func:`export_qat`) to get the
    integer ONNX model. For ONNX Runtime's static / dynamic INT8 see :func:`quantize_onnx`.

    >>> from slimkit.models import create_model
    >>> model = create_model("lenet300", input_shape=(1, 8, 8), num_classes=10)
    >>> quantize_(model, DynamicInt8())["layers"]
    ['fc1', 'fc2', 'fc3']
    >>> type(model.fc1).__name__
    'Int8DynamicLinear'
    """
    if not isinstance(model, nn.Module):
        raise SlimkitError(f"quantize_ needs a torch.nn.Module, got {type(model).__name__}.")
    if isinstance(config, DynamicInt8):
        return _quantize_dynamic_torch_(model, config)
    if isinstance(config, QAT):
        if data is None:
            raise SlimkitError("QAT calibrates its ranges and fine-tunes on data: pass data= (a DataBundle).")
        if config.epochs > 0 and config.distill and teacher is None:
            teacher = _torch_copy(model)
        report = _prepare_qat_(model, config, data)
        if config.epochs > 0:
            train = fit(model, data, config, teacher=teacher if config.distill else None, hooks=list(hooks), label="qat")
            train.pop("history", None)
            report["finetune"] = {"distilled": config.distill and teacher is not None, **train}
        from ..training import evaluate

        report["fake_quant_test_accuracy"] = evaluate(model, data.x_test, data.y_test)
        return report
    if isinstance(config, StaticInt8):
        raise SlimkitError("static INT8 quantizes the exported ONNX model: use quantize_onnx(src, dst, StaticInt8(), "
                           "data=...) or the quantize_static recipe step.")
    raise SlimkitError(f"quantize_ takes DynamicInt8(...) or QAT(...), got {type(config).__name__}.")


def qat_ranges(model: nn.Module, onnx_path: str | Path) -> dict[str, tuple[float, float]]:
    """The learned activation ranges of a QAT model, keyed by the tensor names of its ONNX export.

    A layer's input range goes to the tensor its ONNX node reads, its output range to the
    tensor the node writes (for Conv and Gemm); a tensor read by two layers gets the union.
    """
    import onnx

    from ..measure._graph import module_of_node

    g = onnx.load(str(onnx_path), load_external_data=False).graph
    params = {i.name for i in g.initializer}
    layers = {n: m for n, m in model.named_modules() if isinstance(m, _QATMixin)}
    out: dict[str, tuple[float, float]] = {}

    def add(tensor: str, obs: FakeQuant) -> None:
        if int(obs.seen) == 0:
            return
        lo, hi = float(obs.min_val), float(obs.max_val)
        if tensor in out:
            lo, hi = min(lo, out[tensor][0]), max(hi, out[tensor][1])
        out[tensor] = (lo, hi)

    for node in g.node:
        if node.op_type not in ("Conv", "Gemm", "MatMul"):
            continue
        mod = module_of_node(node, params)
        if mod not in layers:
            continue
        add(node.input[0], layers[mod].act_in)
        if node.op_type in ("Conv", "Gemm"):
            add(node.output[0], layers[mod].act_out)
    return out


def _qat_export(cfg: QAT) -> ExportTransform:
    def transform(ctx: Context, float_path: Path) -> tuple[Path, dict[str, Any]]:
        static = StaticInt8(calibration_size=cfg.calibration_size, per_channel=cfg.per_channel,
                            activation_type=cfg.activation_type, weight_type="int8", keep_float=list(cfg.keep_float),
                            if_slower=cfg.if_slower, min_agreement=cfg.min_agreement)
        overrides = qat_ranges(ctx.model, float_path)
        saved = ctx.onnx_path
        report = _onnx_step(ctx, static, overrides, float_path=float_path)
        report["qat_ranges"] = len(overrides)
        path = ctx.onnx_path
        ctx.onnx_path = saved
        return Path(path), report

    # integer kernels round unlike fake quantization: the step's own bar holds for export's parity
    return ExportTransform(transform, min_agreement=cfg.min_agreement)


@register_step("qat", QAT, forbids={"exported", "quantized", "fake_quant"}, sets={"fake_quant"}, targets={"ort-cpu"})
def _qat_step(ctx: Context, cfg: QAT) -> dict[str, Any]:
    """Quantization-aware training (fake quantization, straight-through); the export runs INT8 QDQ kernels."""
    report = quantize_(ctx.model, cfg, data=ctx.data, teacher=ctx.teacher, hooks=ctx.train_hooks())
    ctx.export_transform = _qat_export(cfg)
    return report


@register_space("qat", order=70)
def _qat_space(trial: Any) -> QAT | None:
    if not trial.suggest_categorical("qat.on", [False, True]):
        return None
    return QAT(epochs=trial.suggest_int("qat.epochs", 1, 3),
               lr=trial.suggest_float("qat.lr", 2e-5, 5e-4, log=True),
               per_channel=trial.suggest_categorical("qat.per_channel", [True, False]))
