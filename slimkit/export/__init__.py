"""Export to ONNX with a dynamic batch dimension, and check the export against torch.

>>> from slimkit.models import create_model
>>> model = create_model("lenet5", input_shape=(1, 8, 8), num_classes=10).eval()
>>> path = export_onnx(model, "/tmp/lenet5.onnx", torch.zeros(2, 1, 8, 8))
>>> parity(model, path, torch.rand(64, 1, 8, 8))["top1_agreement"]
1.0

Integer token ids ``(N, T)`` export as they are (an int64 input) with a dynamic sequence axis
besides the batch axis; the example's own shape is recorded in the file (metadata
``slimkit.input_shape``), so figures counted on the graph (MACs) are those of the example's length.

Before export, batch norms that directly follow a convolution or linear layer are folded
into it (:func:`fold_batchnorm`), as any deployment would do; the folded copy is also what
``torch-cpu`` measures, so parameter counts agree between the two targets.
"""

from __future__ import annotations

import contextlib
import copy
import io
import json
import logging
import re
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any, cast

import numpy as np
import torch
from torch import nn

from .. import _io
from ..errors import ExportError
from ..models import record_structure, register_structure_op, set_module

__all__ = ["export_onnx", "export_layer_onnx", "fold_batchnorm", "fold_batchnorm_", "batchnorm_pairs", "parity", "ort_session",
           "ort_feed", "ort_input_dtype", "INPUT_SHAPE_KEY"]

#: ONNX metadata key holding the shape of one example the artifact was exported with (a JSON list).
INPUT_SHAPE_KEY = "slimkit.input_shape"

_CONV_OPS = {"aten.conv1d.default", "aten.conv2d.default", "aten.conv3d.default", "aten.linear.default"}
_BN_OPS = {"aten.batch_norm.default", "aten._native_batch_norm_legit_no_training.default"}


@contextlib.contextmanager
def _quiet_exporter():
    """The exporter prints progress to stdout and logs about torchvision; keep stdout clean."""
    loggers = [logging.getLogger(n) for n in ("torch.onnx", "torch.onnx._internal.exporter._registration")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
            warnings.simplefilter("ignore")
            yield
    finally:
        for lg, lvl in zip(loggers, levels):
            lg.setLevel(lvl)


def _module_of(node: Any) -> str | None:
    stack = node.meta.get("nn_module_stack") or {}
    if not stack:
        return None
    return list(stack.values())[-1][0]


def _export_program(model: nn.Module, example: torch.Tensor) -> torch.export.ExportedProgram:
    with _quiet_exporter():
        return torch.export.export(model, (example,), strict=False)


def fold_batchnorm(model: nn.Module, example: torch.Tensor) -> nn.Module:
    """A copy of ``model`` in eval mode with each batch norm folded into the conv/linear before it.

    A batch norm is folded only when it consumes the output of a conv or linear layer that
    nothing else uses (found on the graph ``torch.export`` traces), so the copy computes
    the same function. The original model is not changed.
    """
    m = copy.deepcopy(model).eval()
    _fuse_(m, batchnorm_pairs(m, example))
    _drop_zero_biases(m)
    return m


def fold_batchnorm_(model: nn.Module, example: torch.Tensor) -> list[tuple[str, str]]:
    """Fold each foldable batch norm into the conv / linear before it, in place; returns the pairs.

    The layers stay the same objects (their weights and biases change), each folded batch norm
    becomes ``nn.Identity``, and the change is recorded so the saved model reloads.

    >>> from slimkit.models import create_model
    >>> model = create_model("resnet", input_shape=(1, 8, 8), num_classes=10, width=0.25)
    >>> len(fold_batchnorm_(model, torch.zeros(2, 1, 8, 8))) > 0
    True
    """
    was = model.training
    model.eval()
    pairs = batchnorm_pairs(model, example)
    _fuse_(model, pairs)
    model.train(was)
    if pairs:
        record_structure(model, {"op": "fold_batchnorm", "pairs": [list(p) for p in pairs]})
    return pairs


def _fuse_(model: nn.Module, pairs: list[tuple[str, str]]) -> None:
    """Fold each ``(conv or linear, batch norm)`` pair in place (eval statistics); the batch norm becomes ``nn.Identity``."""
    for conv_name, bn_name in pairs:
        conv = model.get_submodule(conv_name)
        bn = cast(nn.modules.batchnorm._BatchNorm, model.get_submodule(bn_name))
        fused: nn.Linear | nn.modules.conv._ConvNd
        if isinstance(conv, nn.Linear):
            fused = torch.nn.utils.fusion.fuse_linear_bn_eval(conv, bn)
        else:
            fused = torch.nn.utils.fusion.fuse_conv_bn_eval(cast(nn.modules.conv._ConvNd, conv), bn)
        with torch.no_grad():
            conv.weight.copy_(fused.weight)
            bias = cast(torch.Tensor, fused.bias)  # the fusion always gives a bias
            if conv.bias is None:
                conv.bias = nn.Parameter(bias.detach().clone())
            else:
                conv.bias.copy_(bias)
        set_module(model, bn_name, nn.Identity())


@register_structure_op("fold_batchnorm")
def _replay_fold(model: nn.Module, op: dict[str, Any]) -> None:
    for conv_name, bn_name in op["pairs"]:
        conv = model.get_submodule(conv_name)
        if conv.bias is None:
            conv.bias = nn.Parameter(torch.zeros(conv.weight.shape[0]))
        set_module(model, bn_name, nn.Identity())


def batchnorm_pairs(model: nn.Module, example: torch.Tensor) -> list[tuple[str, str]]:
    """``(conv or linear, batch norm)`` module names where the batch norm can be folded.

    Found on the graph ``torch.export`` traces: the batch norm consumes the output of a conv
    or linear layer that nothing else uses, and each module is called once. ``[]`` when the
    model has no batch norm or cannot be traced.
    """
    if not any(isinstance(x, nn.modules.batchnorm._BatchNorm) for x in model.modules()):
        return []
    try:
        ep = _export_program(model, example)
    except Exception:
        return []  # not traceable here; export itself will explain
    pairs: list[tuple[str, str]] = []
    seen_calls: dict[str, int] = {}
    for node in ep.graph_module.graph.nodes:
        if node.op != "call_function":
            continue
        name = _module_of(node)
        if name is not None and str(node.target) in _CONV_OPS | _BN_OPS:
            seen_calls[name] = seen_calls.get(name, 0) + 1
        if str(node.target) in _BN_OPS:
            src = node.args[0]
            src_name = _module_of(src) if getattr(src, "op", None) == "call_function" else None
            if src_name and name and str(src.target) in _CONV_OPS and len(src.users) == 1:
                pairs.append((src_name, name))
    modules = dict(model.named_modules())
    out = []
    for conv_name, bn_name in pairs:
        conv, bn = modules.get(conv_name), modules.get(bn_name)
        if conv is None or bn is None or seen_calls.get(conv_name) != 1 or seen_calls.get(bn_name) != 1:
            continue  # a module called twice cannot be folded for one of its uses only
        if not isinstance(bn, nn.modules.batchnorm._BatchNorm) or not bn.track_running_stats:
            continue
        if (isinstance(conv, nn.modules.conv._ConvNd) and not conv.transposed) or isinstance(conv, nn.Linear):
            out.append((conv_name, bn_name))
    return out


def _drop_zero_biases(model: nn.Module) -> None:
    """Remove all-zero biases, as the ONNX exporter's optimizer does, so counts agree."""
    for mod in model.modules():
        if isinstance(mod, (nn.modules.conv._ConvNd, nn.Linear)) and mod.bias is not None:
            if not torch.count_nonzero(mod.bias.detach()):
                mod.bias = None


def export_onnx(
    model: nn.Module,
    path: str | Path,
    example: torch.Tensor,
    *,
    fold_bn: bool = True,
    opset: int | None = None,
) -> Path:
    """Export ``model`` to one ONNX file at ``path`` with a dynamic batch dimension.

    The input takes ``example``'s dtype: float32, or int64 for token ids ``(N, T)``, whose
    sequence axis is marked dynamic too (``torch.export.Dim.AUTO``: where the model's code fixes
    the length, the graph keeps it, and another length fails when run). The file is written atomically. If export fails, :class:`ExportError` names
    the module and the operator that failed.
    """
    path = Path(path)
    if example.shape[0] < 2:  # batch 1 would be specialised into the graph
        example = example.repeat((2,) + (1,) * (example.dim() - 1))
    m = fold_batchnorm(model, example) if fold_bn else copy.deepcopy(model).eval()
    kwargs: dict[str, Any] = {}
    if opset is not None:
        kwargs["opset_version"] = opset
    dims: dict[int, Any] = {0: torch.export.Dim("batch")}
    if example.dim() == 2 and not example.dtype.is_floating_point:  # token ids (N, T)
        dims[1] = torch.export.Dim.AUTO  # dynamic where the model allows it, else the example's length

    def write(tmp: Path) -> None:
        with _quiet_exporter():
            torch.onnx.export(
                m, (example,), str(tmp), dynamo=True, external_data=False,
                dynamic_shapes=(dims,), input_names=["input"], output_names=["logits"], **kwargs,
            )
        _record_input_shape(tmp, example)

    try:
        return _io.atomic_write(path, write)
    except Exception as e:  # the exporter raises many kinds; explain which module failed
        raise _explain_failure(m, example, e) from None


def _record_input_shape(path: Path, example: torch.Tensor) -> None:
    """Write the shape of one example into the file's metadata, where a symbolic axis needs a value."""
    import onnx

    model = onnx.load(str(path))
    graph_input = model.graph.input[0].type.tensor_type.shape.dim
    if all(d.dim_value for d in list(graph_input)[1:]):
        return  # every axis but the batch is fixed: the graph says it all
    entry = next((p for p in model.metadata_props if p.key == INPUT_SHAPE_KEY), None) or model.metadata_props.add()
    entry.key, entry.value = INPUT_SHAPE_KEY, json.dumps([int(d) for d in example.shape[1:]])
    onnx.save(model, str(path))


def export_layer_onnx(layer: nn.Module, path: str | Path, example: torch.Tensor) -> Path:
    """Export one layer (or a short chain of them) to time it alone, with TorchScript's exporter.

    A Conv2d or a chain of convolutions exports in about 10 ms this way against 0.6-0.9 s through
    torch.export (measured here), and the graph is the same handful of nodes. Not for artifacts
    that ship: those go through :func:`export_onnx`. Falls back to it when TorchScript fails.
    """
    path = Path(path)
    m = copy.deepcopy(layer).eval()
    if example.shape[0] < 2:
        example = example.repeat((2,) + (1,) * (example.dim() - 1))

    def write(tmp: Path) -> None:
        with _quiet_exporter():
            torch.onnx.export(m, (example,), str(tmp), dynamo=False, input_names=["input"], output_names=["logits"],
                              dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}})

    try:
        return _io.atomic_write(path, write)
    except Exception:  # a layer TorchScript cannot trace: the exporter that ships artifacts
        return export_onnx(layer, path, example)


_OP_PATTERNS = (
    re.compile(r"target=torch\.ops\.([\w.]+)"),
    re.compile(r"OpOverload\(op='([\w.]+)', overload='(\w+)'"),
    re.compile(r"\b(aten[.:]{1,2}\w+(?:\.\w+)?)"),
)


def _explain_failure(model: nn.Module, example: torch.Tensor, err: Exception) -> ExportError:
    text = "\n".join(str(x) for x in _chain(err))
    op = None
    for pat in _OP_PATTERNS:
        if found := pat.search(text):
            op = ".".join(g for g in found.groups() if g)
            break
    module = None
    try:
        ep = _export_program(model, example)
        if op:
            base = op.rsplit(".", 1)[0] if op.count(".") >= 2 else op
            for node in ep.graph_module.graph.nodes:
                if node.op == "call_function" and str(node.target).startswith(base):
                    module = _module_of(node)
                    break
    except Exception as trace_err:  # torch.export itself failed: bisect the module tree
        module = _first_failing_module(model, example)
        if op is None:
            op = _first_line(trace_err)
    label = f"'{module}' ({type(model.get_submodule(module)).__name__})" if module else "the model's forward"
    where = "" if module is None else f" in module {label}"
    return ExportError(
        f"ONNX export failed{where} at operator '{op or 'unknown'}': {_first_line(err)}. "
        "Replace that operator with one ONNX supports, or register an ONNX translation for it "
        "(torch.onnx.export custom_translation_table).",
        module=module, op=op,
    )


def _chain(err: BaseException) -> Iterator[BaseException]:
    at: BaseException | None = err
    while at is not None:
        yield at
        at = at.__cause__ or at.__context__


def _first_line(err: BaseException) -> str:
    for e in _chain(err):
        for line in str(e).splitlines():
            line = line.strip()
            if line and not line.startswith("Failed to convert"):
                return re.sub(r"\x1b\[[0-9;]*m", "", line)[:300]
    return type(err).__name__


def _first_failing_module(model: nn.Module, example: torch.Tensor) -> str | None:
    """The deepest submodule that torch.export cannot trace on its own input."""
    inputs: dict[str, tuple] = {}
    hooks = [
        mod.register_forward_pre_hook(lambda m, args, n=name: inputs.setdefault(n, args))
        for name, mod in model.named_modules() if name
    ]
    try:
        with torch.no_grad():
            model(example)
    except Exception:
        pass
    finally:
        for h in hooks:
            h.remove()
    failing = None
    name_prefix = ""
    while True:
        parent = model.get_submodule(name_prefix) if name_prefix else model
        for child_name, child in parent.named_children():
            full = f"{name_prefix}.{child_name}" if name_prefix else child_name
            args = inputs.get(full)
            if args is None:
                continue
            try:
                with _quiet_exporter():
                    torch.export.export(child, args, strict=False)
            except Exception:
                failing = full
                break
        else:
            return failing
        name_prefix = failing


# ----------------------------------------------------------------------------- running ONNX


def ort_session(path: str | Path, threads: int = 1, *, profile_dir: str | Path | None = None,
                optimized_path: str | None = None) -> Any:
    """An ONNX Runtime CPU session with an explicit thread count.

    ``profile_dir``: profile the session, writing ONNX Runtime's trace into that folder (never the
    current folder: without a prefix ONNX Runtime creates ``onnxruntime_profile__*.json`` there
    at session creation, and leaves it behind if a run fails).
    """
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = int(threads)
    so.inter_op_num_threads = 1
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.log_severity_level = 3
    if profile_dir is not None:
        so.enable_profiling = True
        so.profile_file_prefix = str(Path(profile_dir) / "ort-profile")
    if optimized_path:
        so.optimized_model_filepath = str(optimized_path)
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])


_ORT_DTYPES = {"tensor(float)": np.float32, "tensor(double)": np.float64, "tensor(float16)": np.float16,
               "tensor(int64)": np.int64, "tensor(int32)": np.int32, "tensor(int16)": np.int16,
               "tensor(int8)": np.int8, "tensor(uint8)": np.uint8}


def ort_input_dtype(session: Any) -> np.dtype:
    """The NumPy dtype of ``session``'s first input (float32 for a float model, int64 for token ids)."""
    inp = session.get_inputs()[0]
    if inp.type not in _ORT_DTYPES:
        raise ExportError(f"the ONNX model's input '{inp.name}' has type {inp.type}, which slimkit cannot feed.")
    return np.dtype(_ORT_DTYPES[inp.type])


def ort_feed(session: Any, x: torch.Tensor | np.ndarray) -> dict[str, np.ndarray]:
    """The feed of ``session``'s first input for the batch ``x``, in the dtype the input declares.

    A float batch for a float input, or integer ids for an integer input, is converted (float64 ->
    float32, int32 -> int64); integer ids for a float input, or floats for an integer one, raise
    :class:`ExportError` saying which the model takes and which the data holds.
    """
    inp = session.get_inputs()[0]
    arr = x.numpy() if isinstance(x, torch.Tensor) else np.asarray(x)
    want = ort_input_dtype(session)
    if np.issubdtype(want, np.integer) != np.issubdtype(arr.dtype, np.integer):
        takes = "integer token ids" if np.issubdtype(want, np.integer) else "float examples"
        holds = "integer token ids" if np.issubdtype(arr.dtype, np.integer) else "float examples"
        raise ExportError(
            f"the ONNX model takes {takes} ({inp.type} input '{inp.name}') but the data holds {holds} "
            f"({arr.dtype}); give the data the model was made for, or export the model for this data."
        )
    return {inp.name: np.ascontiguousarray(arr, dtype=want)}


def ort_predict(session, x: torch.Tensor | np.ndarray, batch: int = 512) -> np.ndarray:
    arr = x.numpy() if isinstance(x, torch.Tensor) else x
    outs = [session.run(None, ort_feed(session, arr[i : i + batch]))[0] for i in range(0, len(arr), batch)]
    return np.concatenate(outs) if outs else np.zeros((0, 0), np.float32)


def parity(model: nn.Module | str | Path, onnx_path: str | Path, x: torch.Tensor, *, threads: int = 1) -> dict[str, Any]:
    """Compare the torch model (or another ONNX artifact) and the ONNX artifact on real inputs ``x``
    (float examples, or int64 token ids).

    Returns ``max_abs_diff`` of the logits, ``top1_agreement`` (fraction of examples whose
    predicted class agrees) and the number of ``samples``.
    """
    if isinstance(model, nn.Module):
        model = model.eval()
        with torch.no_grad():
            ref = model(x).float().numpy()
    else:
        ref = ort_predict(ort_session(model, threads), x)
    got = ort_predict(ort_session(onnx_path, threads), x)
    if got.shape != ref.shape:
        raise ExportError(f"the ONNX model returns shape {got.shape}, torch returns {ref.shape}.")
    return {
        "max_abs_diff": float(np.max(np.abs(got - ref))) if ref.size else 0.0,
        "top1_agreement": float(np.mean(got.argmax(1) == ref.argmax(1))) if len(ref) else 1.0,
        "samples": int(len(x)),
    }
