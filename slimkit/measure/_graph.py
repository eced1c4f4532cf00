"""Counting parameters and MACs on an ONNX graph, attributed to the torch modules they came from."""

from __future__ import annotations

import ast
import json
import math
from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np

from ..export import INPUT_SHAPE_KEY

_QUANT_META_POSITIONS = {  # inputs that are scales / zero points, not weights
    "QuantizeLinear": {1, 2},
    "DequantizeLinear": {1, 2},
    "QLinearConv": {1, 2, 4, 5, 6, 7},
    "QLinearMatMul": {1, 2, 4, 5, 6, 7},
    "MatMulInteger": {2, 3},
    "ConvInteger": {2, 3},
    "DynamicQuantizeLinear": set(),
    "BatchNormalization": {3, 4},  # running mean / var are statistics, not parameters
    "Clip": {1, 2},
    "Pad": {1, 2, 3},
    "Resize": {1, 2, 3},
}
_WEIGHT_SUFFIXES = ("_quantized", "_scale", "_zero_point", "_DequantizeLinear", "_QuantizeLinear")


def _onnx():
    import onnx

    return onnx


def module_of_tensor(name: str) -> str | None:
    """``layer1.0.conv1.weight_quantized`` -> ``layer1.0.conv1``."""
    for suf in _WEIGHT_SUFFIXES:
        if name.endswith(suf):
            name = name[: -len(suf)]
    if "." not in name:
        return None
    return name.rsplit(".", 1)[0]


def _meta(node: Any) -> dict[str, str]:
    return {p.key: p.value for p in node.metadata_props}


def module_of_node(node: Any, params: set[str]) -> str | None:
    """The torch module a node belongs to: by its weight's name, else the exporter's scope metadata."""
    for inp in node.input:
        if inp in params:
            mod = module_of_tensor(inp)
            if mod is not None:
                return mod
    scopes = _meta(node).get("pkg.torch.onnx.name_scopes")
    if scopes:
        try:
            names = ast.literal_eval(scopes)
        except (ValueError, SyntaxError):
            names = []
        # the last entry is the aten op itself; a node made outside any module (an LSTM's zero
        # initial state) is placed in the exporter's placeholder scope, which is no module
        mods = [n for n in names[:-1] if n and not n.startswith("_empty_nn_module_stack")]
        if mods:
            return mods[-1]
    return None


def _class_of_node(node: Any) -> str | None:
    hier = _meta(node).get("pkg.torch.onnx.class_hierarchy")
    if not hier:
        return None
    try:
        classes = ast.literal_eval(hier)
    except (ValueError, SyntaxError):
        return None
    mods = [c for c in classes if not c.startswith("aten.")]
    return mods[-1].rsplit(".", 1)[-1] if mods else None


def _shapes(model: Any) -> dict[str, list[int]]:
    """Tensor shapes at batch size 1: a symbolic axis of the input past the batch (a token sequence)
    takes the exported example's size, recorded in the metadata (``slimkit.input_shape``); other
    symbolic dims count as 1."""
    onnx = _onnx()
    m = onnx.ModelProto()
    m.CopyFrom(model)
    recorded = next((p.value for p in m.metadata_props if p.key == INPUT_SHAPE_KEY), None)
    example: list[int] = []
    if recorded:
        try:
            example = [int(v) for v in json.loads(recorded)]
        except (ValueError, TypeError):
            example = []
    for inp in m.graph.input:
        dims = inp.type.tensor_type.shape.dim
        if dims and not dims[0].dim_value:
            dims[0].ClearField("dim_param")
            dims[0].dim_value = 1
        for i, d in enumerate(list(dims)[1:]):
            if not d.dim_value and i < len(example) and len(example) == len(dims) - 1:
                d.ClearField("dim_param")
                d.dim_value = example[i]
    try:
        m = onnx.shape_inference.infer_shapes(m, data_prop=True)
    except Exception:
        pass
    out: dict[str, list[int]] = {}
    for vi in list(m.graph.value_info) + list(m.graph.input) + list(m.graph.output):
        t = vi.type.tensor_type
        if t.HasField("shape"):
            out[vi.name] = [d.dim_value if d.dim_value > 0 else 1 for d in t.shape.dim]
    for init in m.graph.initializer:
        out[init.name] = list(init.dims)
    for sparse in m.graph.sparse_initializer:  # stored sparse (values + indices)
        out[sparse.values.name] = list(sparse.dims)
    return out


def _node_macs(node: Any, shapes: dict[str, list[int]]) -> int:
    op = node.op_type
    ins = list(node.input)
    outs = list(node.output)

    def shape(name: str) -> list[int] | None:
        return shapes.get(name)

    if op in ("Conv", "ConvInteger", "QLinearConv"):
        w = shape(ins[3] if op == "QLinearConv" else ins[1])
        y = shape(outs[0])
        if not w or not y:
            return 0
        return int(math.prod(y) * math.prod(w[1:]))  # (N, C_out, H, W) x (C_in/g * kh * kw)
    if op == "ConvTranspose":
        w, x = shape(ins[1]), shape(ins[0])
        if not w or not x:
            return 0
        return int(math.prod(x) * math.prod(w[1:]))
    if op == "Gemm":
        a, b = shape(ins[0]), shape(ins[1])
        if not b:
            return 0
        attrs = {a_.name: a_.i for a_ in node.attribute}
        k, n = (b[1], b[0]) if attrs.get("transB", 0) else (b[0], b[1])
        m = (a[1] if attrs.get("transA", 0) else a[0]) if a else 1
        return int(m * k * n)
    if op in ("LSTM", "GRU", "RNN", "DynamicQuantizeLSTM"):
        x, w, r = shape(ins[0]), shape(ins[1]), shape(ins[2])
        if not x or len(x) < 3 or not w or not r:
            return 0
        # every weight of W (input) and R (recurrent), all directions, once per step and sequence:
        # X is (T, N, F) or, with layout=1, (N, T, F); DynamicQuantizeLSTM stores W, R transposed
        return int(x[0] * x[1] * (math.prod(w) + math.prod(r)))
    if op in ("MatMul", "MatMulInteger", "QLinearMatMul"):
        a = shape(ins[0])
        b = shape(ins[3] if op == "QLinearMatMul" else ins[1])
        y = shape(outs[0])
        k_dim = a[-1] if a else (b[-2] if b and len(b) > 1 else None)
        if not y or not k_dim:
            return 0
        return int(math.prod(y) * k_dim)  # every output element is a K-long dot product
    return 0


_PARAM_DTYPES = None


def _param_dtypes() -> set[int]:
    global _PARAM_DTYPES
    if _PARAM_DTYPES is None:
        T = _onnx().TensorProto
        _PARAM_DTYPES = {T.FLOAT, T.FLOAT16, T.BFLOAT16, T.DOUBLE, T.INT8, T.UINT8, T.INT4, T.UINT4}
    return _PARAM_DTYPES


def graph_stats(path: str | Path) -> dict[str, Any]:
    """Parameters (total, non-zero) and MACs at batch 1 of an ONNX file, overall and per module.

    Parameters are the initializers that hold weights: scales and zero points of
    quantization and the running statistics of batch norms are left out, and an INT32 bias
    feeding a DequantizeLinear counts as a parameter. MACs count Conv, Gemm and MatMul
    (and their integer forms) and the recurrent LSTM, GRU and RNN (and DynamicQuantizeLSTM).
    A weight the exporter renamed (``val_48``) is counted with the module of the node that reads it.
    """
    onnx = _onnx()
    from onnx import numpy_helper

    model = onnx.load(str(path))
    g = model.graph
    inits = {i.name: i for i in g.initializer}
    excluded: set[str] = set()
    int32_bias: set[str] = set()
    for node in g.node:
        for pos in _QUANT_META_POSITIONS.get(node.op_type, ()):
            if pos < len(node.input):
                excluded.add(node.input[pos])
        if node.op_type == "DequantizeLinear" and node.input and node.input[0] in inits:
            if inits[node.input[0]].data_type == onnx.TensorProto.INT32:
                int32_bias.add(node.input[0])
    params: dict[str, tuple[int, int]] = {}
    for name, init in inits.items():
        if name in excluded or name.endswith(("_scale", "_zero_point")):
            continue
        if init.data_type not in _param_dtypes() and name not in int32_bias:
            continue
        arr = numpy_helper.to_array(init)
        if arr.size == 1 and "." not in name:
            continue  # a constant of the graph (e.g. ReLU6's bounds), not a torch parameter
        params[name] = (int(arr.size), int(np.count_nonzero(arr)))
    for sparse in g.sparse_initializer:  # a weight stored sparse: its full size, its stored non-zeros
        if sparse.values.data_type in _param_dtypes():
            values = numpy_helper.to_array(sparse.values)
            params[sparse.values.name] = (int(math.prod(sparse.dims)), int(np.count_nonzero(values)))

    shapes = _shapes(model)
    layers: dict[str, dict[str, Any]] = defaultdict(lambda: {"params": 0, "nonzero_params": 0, "macs": 0, "ops": []})
    param_set = set(params)
    readers: dict[str, str] = {}  # an unnamed weight -> the module of the first node reading it
    for node in g.node:
        unnamed = [i for i in node.input if i in param_set and module_of_tensor(i) is None and i not in readers]
        owner = module_of_node(node, param_set) if unnamed else None
        for i in unnamed:
            if owner is not None:
                readers[i] = owner
    for name, (n, nz) in params.items():
        mod = module_of_tensor(name) or readers.get(name) or name
        layers[mod]["params"] += n
        layers[mod]["nonzero_params"] += nz
    total_macs = 0
    for node in g.node:
        macs = _node_macs(node, shapes)
        total_macs += macs
        owner = module_of_node(node, param_set)
        if owner is None:
            continue
        entry = layers[owner]
        entry["macs"] += macs
        if node.op_type not in ("QuantizeLinear", "DequantizeLinear") and node.op_type not in entry["ops"]:
            entry["ops"].append(node.op_type)
        cls = _class_of_node(node)
        if cls and "type" not in entry:
            entry["type"] = cls
    return {
        "params": sum(n for n, _ in params.values()),
        "nonzero_params": sum(nz for _, nz in params.values()),
        "macs": int(total_macs),
        "layers": {k: dict(v) for k, v in layers.items()},
        "param_names": set(params),
    }


def count_ops(path: str | Path) -> dict[str, int]:
    """How many nodes of each op type an ONNX file holds."""
    counts: dict[str, int] = defaultdict(int)
    for node in _onnx().load(str(path)).graph.node:
        counts[node.op_type] += 1
    return dict(counts)
