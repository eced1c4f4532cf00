"""Quantization-aware training: fake quantization in torch, then an export transform that turns
the float export into integer QDQ kernels using the learned ranges; and :func:`quantize_`, the
torch-level verb (dynamic INT8 linear layers, or QAT)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any, cast

import torch
import torch.nn.functional as F
from torch import nn

from ...data import DataBundle
from ...errors import SlimkitError
from ...export import fold_batchnorm_
from ...measure._graph import module_of_node
from ...models import record_structure, register_structure_op
from ...pipeline import Context, ExportTransform
from ...training import evaluate, fit
from ._configs import QAT, DynamicInt8, StaticInt8, calibration_examples, check_layers
from ._eager import float_copy, quantize_dynamic_torch_
from ._ort import onnx_step

__all__ = ["FakeQuant", "fake_quant_weight", "quantize_", "qat_ranges", "qat_export"]


class FakeQuant(nn.Module):
    """Fake quantization of an activation (one scale and zero point for the tensor) with a
    moving-average min/max observer, using ONNX Runtime's formulas for scale and zero point.

    In training it updates its range (``momentum``) and quantizes; the gradient passes straight
    through inside the range (``torch.fake_quantize_per_tensor_affine``). While observing
    (``observe=True``) in eval mode it widens its range to every batch it sees (calibration).
    While traced for export it is the identity: ONNX Runtime's quantizer inserts the real Q/DQ.
    """

    min_val: torch.Tensor
    max_val: torch.Tensor
    seen: torch.Tensor

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
    tensor_scale = max(float(w.detach().abs().max()) / 127.0, 1e-12)
    return torch.fake_quantize_per_tensor_affine(w, tensor_scale, 0, -127, 127)


class _QATMixin:
    """Forward of a conv / linear layer with fake-quantized input, weight and output."""

    qat_per_channel: bool
    act_in: FakeQuant
    act_out: FakeQuant
    weight: torch.Tensor

    def _qat_forward(self, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

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
    qat = cast(_QATMixin, module)
    qat.qat_per_channel = per_channel
    qat.act_in = FakeQuant(act_type, momentum)
    qat.act_out = FakeQuant(act_type, momentum)


@register_structure_op("qat")
def _replay_qat(model: nn.Module, op: dict[str, Any]) -> None:
    for name in op["layers"]:
        _make_qat(model.get_submodule(name), bool(op["per_channel"]), op["activation_type"], float(op["momentum"]))


def _prepare_qat_(model: nn.Module, cfg: QAT, data: DataBundle) -> dict[str, Any]:
    keep = set(check_layers(model, cfg.keep_float, "keep_float"))
    x_cal = calibration_examples(data, cfg.calibration_size)
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
    Export the QAT model with the ``export`` recipe step to get the integer ONNX model. For
    ONNX Runtime's static / dynamic INT8 see :func:`quantize_onnx`.

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
        return quantize_dynamic_torch_(model, config)
    if isinstance(config, QAT):
        if data is None:
            raise SlimkitError("QAT calibrates its ranges and fine-tunes on data: pass data= (a DataBundle).")
        if config.epochs > 0 and config.distill and teacher is None:
            teacher = float_copy(model)
        report = _prepare_qat_(model, config, data)
        if config.epochs > 0:
            train = fit(model, data, config, teacher=teacher if config.distill else None, hooks=list(hooks), label="qat")
            train.pop("history", None)
            report["finetune"] = {"distilled": config.distill and teacher is not None, **train}
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

    g = onnx.load(str(onnx_path), load_external_data=False).graph
    params = {i.name for i in g.initializer}
    layers: dict[str, _QATMixin] = {n: m for n, m in model.named_modules() if isinstance(m, _QATMixin)}
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


def qat_export(cfg: QAT) -> ExportTransform:
    """The ``export`` step's transform after QAT: static INT8 of the float export with the learned
    ranges, measured against it like ``quantize_static`` (its verdict is recorded under ``qat``)."""
    def transform(ctx: Context, float_path: Path) -> tuple[Path, dict[str, Any]]:
        static = StaticInt8(calibration_size=cfg.calibration_size, per_channel=cfg.per_channel,
                            activation_type=cfg.activation_type, weight_type="int8", keep_float=list(cfg.keep_float),
                            if_slower=cfg.if_slower, min_agreement=cfg.min_agreement,
                            fallback="off")  # the learned ranges hold for the layers QAT trained as INT8
        overrides = qat_ranges(ctx.model, float_path)
        saved = ctx.onnx_path
        report = onnx_step(ctx, static, "qat", overrides, float_path=float_path)
        report["qat_ranges"] = len(overrides)
        path = ctx.onnx_path
        assert path is not None  # onnx_step set it (to the INT8 or, reverted, the float export)
        ctx.onnx_path = saved
        return path, report

    # integer kernels round unlike fake quantization: the step's own bar holds for export's parity
    return ExportTransform(transform, min_agreement=cfg.min_agreement)
