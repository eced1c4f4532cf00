"""Automatic float fallback for ONNX Runtime INT8: rank the quantized layers by how much INT8
hurts each one, then find how many of the worst to leave in float for the agreement bar.

Static INT8 ranks with ONNX Runtime's own debugging tools (``onnxruntime.quantization.qdq_loss_debug``),
from one run of the float model and the QDQ model already written: a layer's score is the worst
signal-to-quantization-noise ratio (SQNR, dB) among the tensors the QDQ model quantizes for it, its
weights (float against dequantized) and its activation inputs and outputs (the float activations
against the same activations quantized with the scale and zero point the QDQ model holds). Dynamic
INT8 has no stored activation ranges, so each layer is quantized alone (no calibration: cheap) and
scored by the SQNR of the model's logits. The lower the SQNR, the more sensitive the layer.

:func:`smallest_passing` then keeps the ``k`` most sensitive layers in float, ``k`` found by
doubling then bisection (1, 2, 4, ... up to the cap, then between the last failing and the
first passing ``k``), so a cap of 8 costs at most 6 quantizations.
"""

from __future__ import annotations

import tempfile
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from ...measure._graph import module_of_node

__all__ = ["candidate_layers", "rank_static", "rank_isolated", "smallest_passing", "QUANTIZED_OPS"]

# The compute operators each INT8 mode quantizes: the layers a fallback may leave in float.
QUANTIZED_OPS = {
    "static": frozenset({"Conv", "ConvTranspose", "Gemm", "MatMul"}),
    "dynamic-linear": frozenset({"Gemm", "MatMul", "LSTM"}),
    "dynamic-all": frozenset({"Conv", "Gemm", "MatMul", "LSTM"}),
}


def candidate_layers(onnx_model: Any, op_types: frozenset[str], skip: Iterable[str] = ()) -> dict[str, list[str]]:
    """Torch module name -> names of its ONNX nodes, for each module owning a node of ``op_types``
    (in graph order), leaving out the modules ``skip`` covers (a name covers its children)."""
    skip = list(skip)
    params = {i.name for i in onnx_model.graph.initializer}
    owners: dict[str, list[str]] = {}
    for node in onnx_model.graph.node:
        mod = module_of_node(node, params)
        if mod is None or any(mod == s or mod.startswith(s + ".") for s in skip):
            continue
        owners.setdefault(mod, []).append(node.name)
    with_ops = {module_of_node(n, params) for n in onnx_model.graph.node if n.op_type in op_types}
    return {mod: nodes for mod, nodes in owners.items() if mod in with_ops}


def _sqnr(x: np.ndarray, y: np.ndarray) -> float:
    from onnxruntime.quantization.qdq_loss_debug import compute_signal_to_quantization_noice_ratio

    return float(compute_signal_to_quantization_noice_ratio(x, y))


def _activation_qparams(qdq_model: Any) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Tensor name -> (scale, zero point) of every activation the QDQ model quantizes."""
    from onnx import numpy_helper
    from onnxruntime.quantization.qdq_loss_debug import QUANT_INPUT_SUFFIX

    inits = {i.name: i for i in qdq_model.graph.initializer}
    out: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    for node in qdq_model.graph.node:
        if node.op_type != "QuantizeLinear" or node.input[0] in inits or len(node.input) < 3:
            continue
        if node.input[1] not in inits or node.input[2] not in inits:
            continue
        name = node.input[0].removesuffix(QUANT_INPUT_SUFFIX)  # a graph output is renamed to quantize it
        out[name] = (numpy_helper.to_array(inits[node.input[1]]), numpy_helper.to_array(inits[node.input[2]]))
    return out


def _fake_quant(x: np.ndarray, scale: np.ndarray, zero_point: np.ndarray) -> np.ndarray:
    """``x`` quantized per tensor as ONNX's QuantizeLinear does, then dequantized."""
    info = np.iinfo(zero_point.dtype)
    s, z = float(scale.reshape(-1)[0]), int(zero_point.reshape(-1)[0])
    q = np.clip(np.rint(x / s) + z, info.min, info.max)
    return ((q - z) * s).astype(np.float32)


def _float_activations(float_path: Path, feeds: Sequence[Mapping[str, np.ndarray]], op_types: frozenset[str],
                       threads: int) -> dict[str, np.ndarray]:
    """The inputs and outputs of the ``op_types`` nodes of the float model on ``feeds`` (flattened)."""
    import onnxruntime as ort
    from onnxruntime.quantization.qdq_loss_debug import collect_activations, modify_model_output_intermediate_tensors

    so = ort.SessionOptions()
    so.intra_op_num_threads = int(threads)
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    so.log_severity_level = 3
    with tempfile.TemporaryDirectory(prefix="slimkit-rank-") as tmp:
        augmented = Path(tmp) / "augmented.onnx"
        modify_model_output_intermediate_tensors(str(float_path), str(augmented), op_types_for_saving=sorted(op_types))
        acts = collect_activations(str(augmented), feeds, session_options=so)  # type: ignore[arg-type]
    return {name: np.concatenate(parts) for name, parts in acts.items()}


def rank_static(float_path: Path, qdq_path: Path, candidates: Mapping[str, Sequence[str]],
                feeds: Sequence[Mapping[str, np.ndarray]], threads: int = 1) -> list[tuple[str, float]]:
    """``(layer, SQNR dB)`` of each candidate layer, most sensitive (lowest) first, for the QDQ model
    ``qdq_path`` quantized from ``float_path``: the worst SQNR among the layer's quantized weights
    and activations. A layer of which nothing is quantized is left out."""
    import onnx
    from onnxruntime.quantization.qdq_loss_debug import compute_weight_error, create_weight_matching

    float_model = onnx.load(str(float_path), load_external_data=False)
    qparams = _activation_qparams(onnx.load(str(qdq_path), load_external_data=False))
    weights = compute_weight_error(create_weight_matching(str(float_path), str(qdq_path)))
    ops = frozenset(n.op_type for n in float_model.graph.node if n.name in {x for v in candidates.values() for x in v})
    acts = _float_activations(float_path, feeds, ops, threads)
    by_name = {n.name: n for n in float_model.graph.node}
    act_sqnr: dict[str, float] = {}
    ranked: list[tuple[str, float]] = []
    for layer, nodes in candidates.items():
        scores: list[float] = []
        for node in (by_name[n] for n in nodes):
            for t in [*node.input, *node.output]:
                if t in weights:
                    scores.append(float(weights[t]))
                elif t in qparams and t in acts:
                    if t not in act_sqnr:
                        act_sqnr[t] = _sqnr(acts[t], _fake_quant(acts[t], *qparams[t]))
                    scores.append(act_sqnr[t])
        if scores:
            ranked.append((layer, round(min(scores), 3)))
    return sorted(ranked, key=lambda p: p[1])


def rank_isolated(candidates: Mapping[str, Sequence[str]], logits_with_only: Callable[[list[str]], np.ndarray],
                  float_logits: np.ndarray) -> list[tuple[str, float]]:
    """``(layer, SQNR dB)`` of the model's logits when only that layer is quantized, most sensitive
    (lowest) first; ``logits_with_only(nodes)`` quantizes only ``nodes`` and returns the logits."""
    ranked = [(layer, round(_sqnr(float_logits, logits_with_only(list(nodes))), 3)) for layer, nodes in candidates.items()]
    return sorted(ranked, key=lambda p: p[1])


def smallest_passing(cap: int, passes: Callable[[int], bool]) -> int | None:
    """The smallest ``k`` in ``1..cap`` with ``passes(k)``, by doubling then bisection (``passes``
    is assumed to turn true and stay true as ``k`` grows); ``None`` if ``passes(cap)`` is false.

    >>> tried = []
    >>> smallest_passing(8, lambda k: tried.append(k) or k >= 3), tried
    (3, [1, 2, 4, 3])
    >>> smallest_passing(4, lambda k: False)
    """
    failing, k = 0, 1
    while not passes(k):
        if k >= cap:
            return None
        failing, k = k, min(2 * k, cap)
    passing = k
    while passing - failing > 1:
        mid = (failing + passing) // 2
        if passes(mid):
            passing = mid
        else:
            failing = mid
    return passing
