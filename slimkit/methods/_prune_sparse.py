"""Storing a pruned model sparse: ONNX sparse initializers, and CSR tensors in safetensors.

Both encodings are real files whose bytes are counted, never estimates:

- :func:`sparse_onnx` rewrites an ONNX file so every initializer that is mostly zeros becomes a
  ``sparse_initializer`` (non-zero values + their INT64 linear indices, the only index type
  ONNX allows). ONNX Runtime loads it and computes the same outputs.
- :func:`save_csr` writes a state dict in which each mostly-zero weight is stored as CSR
  (values, int16/int32 column indices, int32 row pointers over the weight seen as a
  ``(rows, row length)`` matrix); :func:`load_csr` reads it back to dense tensors.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from .. import _io
from ..errors import SlimkitError

__all__ = ["sparse_onnx", "save_csr", "load_csr", "csr_bytes"]

_CSR_SUFFIXES = (".csr_values", ".csr_columns", ".csr_rows")


def _worth_sparse(arr: np.ndarray, index_bytes: int) -> bool:
    """True when values + indices take fewer bytes than the dense tensor."""
    nz = int(np.count_nonzero(arr))
    return arr.ndim >= 2 and nz * (arr.itemsize + index_bytes) < arr.size * arr.itemsize


def sparse_onnx(src: str | Path, dst: str | Path) -> dict[str, Any]:
    """Write ``src`` to ``dst`` with its mostly-zero initializers stored as sparse initializers.

    Returns ``dense_bytes``, ``sparse_bytes`` and the ``sparse_initializers`` converted.

    >>> import torch
    >>> from slimkit.models import create_model
    >>> from slimkit.export import export_onnx
    >>> from slimkit.methods.prune import prune_, Unstructured
    >>> m = create_model("lenet300", input_shape=(1, 8, 8), num_classes=10)
    >>> _ = prune_(m, Unstructured(sparsity=0.9))
    >>> path = export_onnx(m, "/tmp/lenet300.onnx", torch.zeros(2, 1, 8, 8))
    >>> r = sparse_onnx(path, "/tmp/lenet300-sparse.onnx")
    >>> r["sparse_bytes"] < r["dense_bytes"]
    True
    """
    import onnx
    from onnx import helper, numpy_helper

    src, dst = Path(src), Path(dst)
    if not src.is_file():
        raise SlimkitError(f"ONNX file {src} does not exist.")
    model = onnx.load(str(src))
    g = model.graph
    converted = []
    for init in list(g.initializer):
        arr = numpy_helper.to_array(init)
        if not _worth_sparse(arr, 8):
            continue
        flat = arr.reshape(-1)
        idx = np.flatnonzero(flat)
        values = numpy_helper.from_array(np.ascontiguousarray(flat[idx]), init.name)
        indices = numpy_helper.from_array(idx.astype(np.int64), "")
        g.sparse_initializer.append(helper.make_sparse_tensor(values, indices, list(arr.shape)))
        g.initializer.remove(init)
        converted.append(init.name)
    onnx.checker.check_model(model)
    _io.write_bytes(dst, model.SerializeToString())
    return {"dense_bytes": src.stat().st_size, "sparse_bytes": dst.stat().st_size, "sparse_initializers": converted}


def _csr_state(state: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, list[int]]]:
    out: dict[str, torch.Tensor] = {}
    shapes: dict[str, list[int]] = {}
    for name, t in state.items():
        t = t.detach().cpu().contiguous()
        rows = t.shape[0] if t.dim() >= 2 else 0
        cols = t.numel() // rows if rows else 0
        col_bytes = 2 if cols <= 32767 else 4
        if t.dim() < 2 or not t.is_floating_point() or not _worth_sparse(t.numpy(), col_bytes):
            out[name] = t.clone()
            continue
        m = t.reshape(rows, cols)  # (rows, row length): conv kernels are flattened per output channel
        nz = m != 0
        r, c = nz.nonzero(as_tuple=True)
        out[name + ".csr_values"] = m[r, c].clone()
        out[name + ".csr_columns"] = c.to(torch.int16 if col_bytes == 2 else torch.int32)
        out[name + ".csr_rows"] = torch.cat([torch.zeros(1, dtype=torch.int64), nz.sum(1).cumsum(0)]).to(torch.int32)
        shapes[name] = list(t.shape)
    return out, shapes


def _csr_blob(model_or_state: nn.Module | dict[str, torch.Tensor]) -> bytes:
    from safetensors.torch import save

    state = model_or_state.state_dict() if isinstance(model_or_state, nn.Module) else model_or_state
    tensors, shapes = _csr_state(state)
    return save(tensors, metadata={"slimkit_csr": json.dumps(shapes)})


def csr_bytes(model: nn.Module | dict[str, torch.Tensor]) -> int:
    """Bytes of the model's weights stored as CSR in safetensors (see :func:`save_csr`)."""
    return len(_csr_blob(model))


def save_csr(model: nn.Module | dict[str, torch.Tensor], path: str | Path) -> Path:
    """Write the weights to ``path`` (safetensors) with each mostly-zero weight as CSR, atomically."""
    return _io.write_bytes(path, _csr_blob(model))


def load_csr(path: str | Path) -> dict[str, torch.Tensor]:
    """Read a file written by :func:`save_csr` back into a dense state dict."""
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise SlimkitError(f"weights file {path} does not exist.")
    with safe_open(str(path), "pt") as f:
        shapes = json.loads((f.metadata() or {}).get("slimkit_csr", "{}"))
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    state = {k: v for k, v in tensors.items() if not k.endswith(_CSR_SUFFIXES)}
    for name, shape in shapes.items():
        rows = shape[0]
        cols = math.prod(shape) // rows
        counts = tensors[name + ".csr_rows"].long().diff()
        r = torch.repeat_interleave(torch.arange(rows), counts)
        dense = torch.zeros(rows, cols, dtype=tensors[name + ".csr_values"].dtype)
        dense[r, tensors[name + ".csr_columns"].long()] = tensors[name + ".csr_values"]
        state[name] = dense.reshape(shape)
    return state
