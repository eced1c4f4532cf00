"""The searchable blocks of a model and the ONNX subgraphs that run them: what a latency table
measures (:mod:`slimkit.nas._table`).

:func:`block_plan` lists an architecture's blocks in order, each with the key its latency is
stored under; :func:`onnx_chain` cuts blocks out of an exported graph (by the exporter's module
scopes) and chains them into a model of their own.
"""

from __future__ import annotations

import ast
import copy
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from ..errors import SlimkitError
from ._space import Arch, Family

__all__ = ["block_plan", "onnx_chain", "scopes"]


# ----------------------------------------------------------------------------- blocks of a model


def _signature(module: nn.Module, in_shape: Sequence[int]) -> str:
    """What decides a block's latency: its type, input shape and every conv / linear it holds."""
    parts = []
    for m in module.modules():
        if isinstance(m, nn.Conv2d):
            text = f"{m.in_channels}>{m.out_channels} k{m.kernel_size[0]}"
            text += f" s{m.stride[0]}" if m.stride[0] != 1 else ""
            text += f" g{m.groups}" if m.groups != 1 else ""
            parts.append(text)
        elif isinstance(m, nn.Linear):
            parts.append(f"fc {m.in_features}>{m.out_features}")
    return f"{type(module).__name__} {'x'.join(map(str, in_shape))} [{'; '.join(parts)}]"


def block_plan(family: Family, arch: Arch, input_shape: Sequence[int], num_classes: int,
               model: nn.Module | None = None) -> tuple[nn.Module, list[dict[str, Any]]]:
    """The model of ``arch`` and its searchable blocks in order, each with its table key.

    Each block: ``name`` (module), ``stage``, ``role`` (``first`` of its stage or ``next``),
    ``key`` (``role: signature``), ``in_shape`` / ``out_shape`` (one example, no batch).
    """
    if model is None:
        model = family.build(arch, input_shape, num_classes)
    blocks = family.blocks(model)
    counts = [int(st.get("blocks", 1)) for st in arch["stages"]]
    if sum(counts) != len(blocks):
        raise SlimkitError(f"family '{family.name}': the architecture asks for {sum(counts)} blocks but the model "
                           f"has {len(blocks)}; its blocks() does not match its build().")
    shapes: dict[str, tuple[tuple[int, ...], tuple[int, ...]]] = {}
    hooks = [m.register_forward_hook(lambda mod, a, o, n=name: shapes.__setitem__(
        n, (tuple(a[0].shape[1:]), tuple(o.shape[1:])))) for name, m in blocks]
    was = model.training
    model.eval()
    try:
        with torch.no_grad():
            model(torch.zeros((1, *input_shape)))
    finally:
        for h in hooks:
            h.remove()
        model.train(was)
    plan, i = [], 0
    for stage, n in enumerate(counts):
        for j in range(n):
            name, mod = blocks[i]
            in_shape, out_shape = shapes[name]
            role = "first" if j == 0 else "next"
            plan.append({"name": name, "stage": stage, "role": role,
                         "key": f"{role}: {_signature(mod, in_shape)}", "in_shape": in_shape, "out_shape": out_shape})
            i += 1
    return model, plan


# ----------------------------------------------------------------------------- ONNX chains


def scopes(node: Any) -> list[str]:
    """The torch module scopes the exporter recorded on an ONNX node."""
    for p in node.metadata_props:
        if p.key == "pkg.torch.onnx.name_scopes":
            try:
                return list(ast.literal_eval(p.value))
            except (ValueError, SyntaxError):
                return []
    return []


def onnx_chain(model: Any, names: Sequence[str], in_shape: Sequence[int], out_shape: Sequence[int]) -> Any:
    """An ONNX model running the blocks ``names`` of ``model`` (an exported ``ModelProto``) one
    after the other; a name may repeat (each copy gets its own tensors and weights).

    The blocks' nodes are found by the exporter's module scopes; each must read one activation
    and hand one on, and consecutive blocks must fit (``in_shape`` of the first, ``out_shape``
    of the last, without the batch dimension, which stays dynamic).
    """
    import onnx
    from onnx import helper

    g = model.graph
    inits = {i.name: i for i in g.initializer}
    graph_outputs = {o.name for o in g.output}
    segments: dict[str, tuple[list[Any], str, str]] = {}
    for name in dict.fromkeys(names):
        idx = [k for k, n in enumerate(g.node) if name in scopes(n)]
        if not idx:
            raise SlimkitError(f"the exported graph has no node of module '{name}' (the exporter's scope metadata "
                               "is missing); this family cannot be measured block by block on ort-cpu.")
        nodes = [g.node[k] for k in idx]
        inside = set(idx)
        produced = {o for n in nodes for o in n.output if o}
        ext = [i for i in dict.fromkeys(i for n in nodes for i in n.input if i) if i not in produced and i not in inits]
        used_outside = {i for k, n in enumerate(g.node) if k not in inside for i in n.input} | graph_outputs
        outs = [o for o in produced if o in used_outside]
        if len(ext) != 1 or len(outs) != 1:
            raise SlimkitError(f"module '{name}' reads {len(ext)} and hands on {len(outs)} activations in the exported "
                               "graph; a searchable block must read one and hand on one.")
        segments[name] = (nodes, ext[0], outs[0])
    new_nodes, new_inits = [], []
    current = "input"
    for j, name in enumerate(names):
        nodes, src, dst = segments[name]
        rename = {src: current}
        for n in nodes:
            for t in list(n.input) + list(n.output):
                if t and t not in rename:
                    rename[t] = f"b{j}/{t}"
                    if t in inits:
                        init = copy.deepcopy(inits[t])
                        init.name = rename[t]
                        new_inits.append(init)
        for n in nodes:
            m = copy.deepcopy(n)
            m.name = f"b{j}/{n.name}"
            del m.input[:]
            m.input.extend(rename.get(t, t) if t else t for t in n.input)
            del m.output[:]
            m.output.extend(rename.get(t, t) if t else t for t in n.output)
            new_nodes.append(m)
        current = rename[dst]
    dims_in: list[str | int] = ["batch", *map(int, in_shape)]
    dims_out: list[str | int] = ["batch", *map(int, out_shape)]
    graph = helper.make_graph(
        new_nodes, "chain",
        [helper.make_tensor_value_info("input", onnx.TensorProto.FLOAT, dims_in)],
        [helper.make_tensor_value_info(current, onnx.TensorProto.FLOAT, dims_out)],
        initializer=new_inits)
    out = helper.make_model(graph, opset_imports=list(model.opset_import), ir_version=model.ir_version)
    out.functions.extend(model.functions)
    return out
