"""The configurations of the quantization steps, and what they share: layer names, ranges, calibration."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from ...config import check
from ...data import DataBundle
from ...errors import ConfigError, SlimkitError
from ...layers import LayerSelection
from ...pipeline import Finetune

__all__ = ["StaticInt8", "DynamicInt8", "QAT", "check_layers", "keep_float_selection", "cpu_has_vnni"]

METHODS = ("minmax", "entropy", "percentile")
FORMATS = ("qdq", "qoperator")
INT8_TYPES = ("uint8", "int8")
IF_SLOWER = ("keep", "revert")
DYNAMIC_OPS = ("linear", "all")
FALLBACK = ("auto", "off")


def _check_names(names: Iterable[str], field_name: str) -> None:
    for n in names:
        check(isinstance(n, str) and n.strip() != "", field_name, f"layer names must be non-empty strings, got {n!r}")


def _choice(value: str, options: tuple[str, ...], field_name: str) -> None:
    check(value in options, field_name, f"got '{value}'; choose one of {', '.join(options)}")


def _check_common(cfg: StaticInt8 | DynamicInt8 | QAT) -> None:
    """The fields every quantization config has: ``if_slower``, ``min_agreement``, ``keep_float``."""
    _choice(cfg.if_slower, IF_SLOWER, "if_slower")
    check(0 <= cfg.min_agreement <= 1, "min_agreement", f"must be in [0, 1], got {cfg.min_agreement}")
    _check_names(cfg.keep_float, "keep_float")


def _check_fallback(cfg: StaticInt8 | DynamicInt8) -> None:
    _choice(cfg.fallback, FALLBACK, "fallback")
    check(cfg.max_float_layers >= 1, "max_float_layers",
          f"the automatic fallback keeps at least 1 layer in float, got {cfg.max_float_layers}")


def keep_float_selection(names: Iterable[str]) -> LayerSelection:
    """The layers ``keep_float`` names, as a :class:`LayerSelection`: each name covers itself and its children.

    >>> model = nn.Sequential()
    >>> model.add_module("block", nn.Sequential(nn.Linear(2, 2))); model.add_module("fc", nn.Linear(2, 2))
    >>> [n for n, _, _ in keep_float_selection(["block"]).select(model, kinds=(nn.Linear,))]
    ['block.0']
    """
    return LayerSelection({key: True for name in names for key in (name, f"{name}.*")})


def check_layers(model: nn.Module, names: Iterable[str], field_name: str) -> list[str]:
    """The module names of ``model`` that ``names`` cover (a name covers itself and its children).

    An unknown name is a :class:`ConfigError` listing the model's layers.
    """
    names = list(names)
    selection = keep_float_selection(names)
    unknown = set(selection.unknown_names(model))
    for name in names:
        if name in unknown:
            leaves = [n for n, m in model.named_modules() if n and not list(m.children())]
            shown = ", ".join(leaves[:30]) + (f", ... ({len(leaves)} in all)" if len(leaves) > 30 else "")
            raise ConfigError(f"the model has no layer named '{name}'; its layers are: {shown}", field=field_name)
    return [n for n, _, _ in selection.select(model, kinds=(nn.Module,))]


class _KeepFloat:
    """``check_model``: the ``keep_float`` names must be layers of the model (checked before any work)."""

    keep_float: list[str]

    def check_model(self, model: nn.Module) -> None:
        check_layers(model, self.keep_float, "keep_float")


@dataclass
class StaticInt8(_KeepFloat):
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
    model on test examples. Below it, ``fallback: auto`` ranks the quantized layers by how much
    INT8 hurts each one and keeps the most sensitive in float (besides ``keep_float``), at most
    ``max_float_layers`` of them, as few as reach the bar; ``fallback: off`` (or no count within
    the cap reaching it) fails the step.
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
    fallback: str = "auto"
    max_float_layers: int = 8

    def __post_init__(self) -> None:
        check(self.calibration_size >= 1, "calibration_size",
              f"the calibration set must hold at least 1 example, got {self.calibration_size}")
        _choice(self.method, METHODS, "method")
        check(50 < self.percentile <= 100, "percentile", f"must be in (50, 100], got {self.percentile}")
        _choice(self.format, FORMATS, "format")
        _choice(self.activation_type, INT8_TYPES, "activation_type")
        _choice(self.weight_type, INT8_TYPES, "weight_type")
        _check_common(self)
        _check_fallback(self)


@dataclass
class DynamicInt8(_KeepFloat):
    """Dynamic INT8: weights stored in 8 bits, activations quantized batch by batch at run time.

    On ``ort-cpu`` (step ``quantize_dynamic``) ONNX Runtime's dynamic quantization of ``ops``:
    ``linear`` (MatMul/Gemm: DynamicQuantizeMatMul kernels; LSTM: DynamicQuantizeLSTM) or ``all`` (convolutions too, as
    ConvInteger, which is slow on CPU). On ``torch-cpu`` (step ``quantize_dynamic_torch``) each
    ``nn.Linear`` becomes an :class:`Int8DynamicLinear` running PyTorch's x86 int8 kernel.
    ``weight_type``: ``int8`` or ``uint8`` (ORT only); ``per_channel`` scales; ``reduce_range``
    (7-bit, for CPUs without VNNI; null: decided from this CPU); ``keep_float``: module names
    left in float; ``if_slower``, ``min_agreement``, ``fallback`` and ``max_float_layers`` as in
    :class:`StaticInt8` (the fallback is ONNX Runtime's only; ``quantize_dynamic_torch`` refuses).
    """

    ops: str = "linear"
    weight_type: str = "int8"
    per_channel: bool = True
    reduce_range: bool | None = None
    keep_float: list[str] = field(default_factory=list)
    if_slower: str = "keep"
    min_agreement: float = 0.9
    fallback: str = "auto"
    max_float_layers: int = 8

    def __post_init__(self) -> None:
        _choice(self.ops, DYNAMIC_OPS, "ops")
        _choice(self.weight_type, INT8_TYPES, "weight_type")
        _check_common(self)
        _check_fallback(self)


@dataclass
class QAT(_KeepFloat, Finetune):
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
        _choice(self.activation_type, INT8_TYPES, "activation_type")
        check(self.calibration_size >= 1, "calibration_size",
              f"the calibration set must hold at least 1 example, got {self.calibration_size}")
        check(0 < self.momentum <= 1, "momentum", f"must be in (0, 1], got {self.momentum}")
        _check_common(self)


def cpu_has_vnni() -> bool:
    """Whether this CPU has 8-bit dot-product instructions (VNNI / AMX), so full-range int8 is safe."""
    try:
        flags = next((ln for ln in Path("/proc/cpuinfo").read_text().splitlines() if ln.startswith("flags")), "")
    except OSError:
        return False
    have = set(flags.split(":", 1)[-1].split())
    return bool(have & {"avx512_vnni", "avx_vnni", "amx_int8"})


def reduce_range_for(value: bool | None) -> bool:
    """``reduce_range`` as configured, or (null) decided from this CPU: 7-bit weights without VNNI."""
    return (not cpu_has_vnni()) if value is None else bool(value)


def calibration_examples(data: DataBundle, n: int) -> torch.Tensor:
    """``n`` training examples to calibrate INT8 ranges on; an empty set is an error."""
    x = data.calibration(n)
    if len(x) == 0:
        raise SlimkitError(f"the calibration set of {data.name} is empty: the training split holds no example "
                           "to calibrate INT8 ranges on.")
    return x
