"""INT8 for eager PyTorch (``torch-cpu``): each ``nn.Linear`` becomes an :class:`Int8DynamicLinear`
running PyTorch's x86 dynamic int8 kernel."""

from __future__ import annotations

import copy
import warnings
from typing import Any, cast

import torch
import torch.nn.functional as F
from torch import nn

from ...errors import ConfigError, SlimkitError
from ...models import record_structure, register_structure_op, set_module, structure_of
from ._configs import DynamicInt8, check_layers, reduce_range_for

__all__ = ["Int8DynamicLinear", "quantize_dynamic_torch_", "float_copy", "restore_float"]


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
        lin = cast(nn.Linear, model.get_submodule(name))
        set_module(model, name, Int8DynamicLinear(lin.in_features, lin.out_features, lin.bias is not None,
                                                   bool(op.get("reduce_range", False))))


def quantize_dynamic_torch_(model: nn.Module, cfg: DynamicInt8) -> dict[str, Any]:
    """Every ``nn.Linear`` of ``model`` (except ``keep_float``) becomes an :class:`Int8DynamicLinear`, in place."""
    if cfg.ops != "linear":
        raise ConfigError("PyTorch dynamic quantization covers linear layers only; use ops: linear "
                          "(convolutions: the ort-cpu target's quantize_static)", field="ops")
    if cfg.weight_type != "int8":
        raise ConfigError("PyTorch's int8 linear kernel takes int8 weights; use weight_type: int8", field="weight_type")
    if not _quantized_ops_available():
        raise SlimkitError(f"this torch ({torch.__version__}) has no quantized::linear_dynamic kernel; "
                           "use target ort-cpu with quantize_dynamic instead.")
    keep = set(check_layers(model, cfg.keep_float, "keep_float"))
    reduce_range = reduce_range_for(cfg.reduce_range)
    names = [n for n, m in model.named_modules() if type(m) is nn.Linear and n not in keep]
    if not names:
        raise SlimkitError("the model has no nn.Linear layer to quantize dynamically (convolutions need "
                           "static INT8: target ort-cpu, step quantize_static).")
    before = sum(m.weight.numel() * m.weight.element_size() for n, m in model.named_modules() if n in names)
    for name in names:
        linear = cast(nn.Linear, model.get_submodule(name))
        set_module(model, name, Int8DynamicLinear.from_float(linear, cfg.per_channel, reduce_range))
    record_structure(model, {"op": "int8_dynamic_linear", "layers": names, "reduce_range": reduce_range})
    after = sum(cast(Int8DynamicLinear, model.get_submodule(n)).weight_int8.numel() for n in names)
    return {"mode": "dynamic", "runtime": "torch-cpu", "layers": names, "per_channel": cfg.per_channel,
            "reduce_range": reduce_range, "weight_bytes": {"float": before, "int8": after},
            "kernel": "quantized::linear_dynamic"}


def float_copy(model: nn.Module) -> nn.Module:
    """A copy of ``model`` in eval mode (the float model, kept to compare with and to restore)."""
    return copy.deepcopy(model).eval()


def restore_float(model: nn.Module, float_model: nn.Module) -> None:
    """Put the float layers back into ``model`` (in place) and forget the recorded int8 change."""
    for name, mod in float_model.named_modules():
        if name and isinstance(model.get_submodule(name), Int8DynamicLinear):
            set_module(model, name, mod)
    ops = [op for op in structure_of(model) if op.get("op") != "int8_dynamic_linear"]
    model.__dict__["_slimkit_structure"] = ops
