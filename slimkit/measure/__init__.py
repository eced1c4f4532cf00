"""Measurement: pure functions that never change the model they measure.

>>> from slimkit.data import load_data
>>> from slimkit.models import create_model
>>> data = load_data("digits")
>>> model = create_model("lenet300", input_shape=data.input_shape, num_classes=10)
>>> count_params(model)["params"]
50610
>>> report = profile(model, data, Target("ort-cpu", batch_sizes=(1, 64), max_seconds=0.5))
>>> sorted(report)  # doctest: +NORMALIZE_WHITESPACE
['accuracy', 'artifact_bytes', 'batch_sizes', 'latency_ms', 'layers', 'macs', 'nonzero_params',
 'params', 'target', 'threads']

Every figure for ``ort-cpu`` comes from the ONNX artifact itself (its initializers, its graph,
ONNX Runtime sessions); for ``torch-cpu`` from the batch-norm folded module that target runs.
"""

from __future__ import annotations

import functools
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from .. import _io
from ..data import DataBundle
from ..errors import SlimkitError
from ..export import export_onnx, fold_batchnorm
from ..models import input_dtype_of
from .backends import default_threads, get_backend, target_names, time_runs, torch_threads

__all__ = [
    "count_params",
    "count_macs",
    "layer_macs",
    "rnn_macs",
    "attention_macs",
    "artifact_bytes",
    "accuracy",
    "latency",
    "layer_profile",
    "profile",
    "graph_stats",
    "target_names",
    "default_threads",
    "time_runs",
    "Target",
    "read_onnx",
    "count_ops",
    "interleaved",
    "side_by_side",
    "medians",
]

from ._graph import count_ops, graph_stats  # noqa: E402
from ._target import Target  # noqa: E402
from .timing import interleaved, medians, side_by_side  # noqa: E402


def count_params(model: nn.Module) -> dict[str, int]:
    """Total and non-zero parameters of a torch model (buffers such as BN statistics excluded)."""
    total = nonzero = 0
    seen: set[int] = set()
    for p in model.parameters():
        if id(p) in seen:
            continue
        seen.add(id(p))
        total += p.numel()
        nonzero += int(torch.count_nonzero(p.detach()))
    return {"params": total, "nonzero_params": nonzero}


def rnn_macs(module: nn.RNNBase, steps: int) -> int:
    """Multiply-accumulates of a recurrent layer (``nn.LSTM``, ``nn.GRU``, ``nn.RNN``) over ``steps``
    time steps of one sequence.

    Every weight matrix (input-to-hidden, hidden-to-hidden and LSTM's projection, in every layer and
    direction) does one multiply-accumulate per element per step: gates x (input + hidden) x hidden
    x steps for each layer and direction. Gate non-linearities and element-wise products are not
    counted, as for the other layers.

    >>> rnn_macs(nn.LSTM(8, 64), steps=8)  # 4 gates x (8*64 + 64*64) x 8 steps
    147456
    >>> # GRU: 3 gates; 2 directions; the second layer reads both directions' 32 states
    >>> rnn_macs(nn.GRU(28, 32, num_layers=2, bidirectional=True), steps=28)
    838656
    """
    weights = sum(p.numel() for name, p in module.named_parameters(recurse=False) if name.startswith("weight_"))
    return int(steps) * int(weights)


def attention_macs(module: nn.MultiheadAttention, query_len: int, key_len: int | None = None) -> int:
    """Multiply-accumulates of ``nn.MultiheadAttention`` for one example: the Q, K, V and output
    projections plus the two attention matmuls (Q K^T and the weighted sum of V), over all heads.

    >>> attention_macs(nn.MultiheadAttention(16, 4), query_len=5)  # 4*L*E^2 + 2*L^2*E
    5920
    """
    e, lq = module.embed_dim, int(query_len)
    lk = lq if key_len is None else int(key_len)
    attended = lk + (module.bias_k is not None) + int(module.add_zero_attn)  # keys the queries attend to
    projections = lq * e * e + lk * module.kdim * e + lk * module.vdim * e + lq * e * e  # Q, K, V, out
    return int(projections + 2 * lq * attended * e)  # + Q K^T and attention x V (heads x head_dim = E)


def _batch_and_steps(x: Any) -> int:
    """Batch x sequence length of a recurrent or attention input (a PackedSequence: its real steps)."""
    if isinstance(x, nn.utils.rnn.PackedSequence):
        return int(x.batch_sizes.sum())
    if x.dim() == 2:  # unbatched (T, F)
        return int(x.shape[0])
    return int(x.shape[0] * x.shape[1])


def _analytic_hook(counts: dict[str, int], name: str) -> Any:
    """A forward hook adding the MACs of a recurrent or attention module (FlopCounterMode misses them:
    oneDNN's LSTM kernel and the attention fast path are not counted) to ``counts[name]``."""

    def hook(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], output: Any) -> None:
        if isinstance(module, nn.RNNBase):
            x = args[0] if args else kwargs["input"]
            counts[name] = counts.get(name, 0) + rnn_macs(module, _batch_and_steps(x))
        else:
            assert isinstance(module, nn.MultiheadAttention)
            q = args[0] if args else kwargs["query"]
            k = args[1] if len(args) > 1 else kwargs.get("key", q)
            if q.dim() == 2:  # unbatched (L, E)
                batch, lq, lk = 1, q.shape[0], k.shape[0]
            elif module.batch_first:  # (N, L, E)
                batch, lq, lk = q.shape[0], q.shape[1], k.shape[1]
            else:  # (L, N, E)
                batch, lq, lk = q.shape[1], q.shape[0], k.shape[0]
            counts[name] = counts.get(name, 0) + int(batch) * attention_macs(module, lq, lk)

    return hook


def layer_macs(model: nn.Module, input_shape: Sequence[int], *, dtype: torch.dtype | None = None) -> dict[str, int]:
    """Multiply-accumulates per module (fully qualified name) for one example, via FlopCounterMode.

    Recurrent layers and multi-head attention are counted by their shapes (:func:`rnn_macs`,
    :func:`attention_macs`), their containers included. The example is zeros of ``dtype``
    (default: what the model takes, int64 for a model over token ids, else float32).
    """
    from torch.utils.flop_counter import FlopCounterMode

    was_training = model.training
    model.eval()
    counter = FlopCounterMode(display=False)
    analytic: dict[str, int] = {}
    called: set[str] = set()  # modules whose forward ran (a ModuleList never does)
    handles = [m.register_forward_hook(_analytic_hook(analytic, n), with_kwargs=True)
               for n, m in model.named_modules() if isinstance(m, (nn.RNNBase, nn.MultiheadAttention))]
    handles += [m.register_forward_pre_hook(lambda mod, args, n=n: called.add(n)) for n, m in model.named_modules()]
    fastpath = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(False)  # encoder layers call their attention module
    try:
        with counter, torch.no_grad():
            model(torch.zeros((1, *input_shape), dtype=dtype or input_dtype_of(model)))
    finally:
        torch.backends.mha.set_fastpath_enabled(fastpath)
        for h in handles:
            h.remove()
        model.train(was_training)
    root = type(model).__name__
    out: dict[str, int] = {}
    for key, ops in counter.get_flop_counts().items():
        if key == "Global":
            out[""] = sum(ops.values()) // 2
            continue
        name = key[len(root) + 1:] if key.startswith(root + ".") else ("" if key == root else key)
        if name:
            out[name] = sum(ops.values()) // 2  # a multiply-accumulate is two FLOPs
    for name, macs in analytic.items():  # replace the counter's figure, in the module and all above it
        delta = macs - out.get(name, 0)
        parts = name.split(".")
        for owner in [".".join(parts[:i]) for i in range(len(parts), 0, -1)] + [""]:
            if owner in called or owner in out:
                out[owner] = out.get(owner, 0) + delta
    return out


def count_macs(model: nn.Module, input_shape: Sequence[int], *, dtype: torch.dtype | None = None) -> int:
    """Multiply-accumulates of conv / linear / matmul ops, recurrent layers and attention for one example
    (zeros of ``dtype``, see :func:`layer_macs`).

    >>> from slimkit.models import create_model
    >>> count_macs(create_model("lstm", input_shape=(1, 8, 8), num_classes=10, hidden=64), (1, 8, 8))
    148096
    >>> # one encoder layer over 16 token ids, dim 32: attention 4*16*32^2 + 2*16^2*32, feed-forward
    >>> # 2*16*32*128, classifier 32*2 (an embedding is a lookup: no MACs)
    >>> count_macs(create_model("transformer", input_shape=(16,), num_classes=2, vocab=32, dim=32, heads=2,
    ...                         layers=1), (16,), dtype=torch.int64)
    213056
    """
    return int(layer_macs(model, input_shape, dtype=dtype).get("", 0))


def artifact_bytes(path: str | Path) -> int:
    """Size on disk of an artifact: a file, or a folder's files summed."""
    p = Path(path)
    if p.is_dir():
        return sum(f.stat().st_size for f in p.rglob("*") if f.is_file())
    if not p.exists():
        raise SlimkitError(f"artifact {p} does not exist.")
    return p.stat().st_size


def _predict(runner: Any, x: torch.Tensor, batch: int = 256) -> np.ndarray:
    xs = x.numpy()
    return np.concatenate([runner(np.ascontiguousarray(xs[i : i + batch])) for i in range(0, len(xs), batch)])


def accuracy(model_or_runner: Any, x: torch.Tensor, y: torch.Tensor, *, threads: int | None = None) -> float:
    """Top-1 accuracy of a torch model (or a backend runner) on ``(x, y)``."""
    if len(x) == 0:
        raise SlimkitError("cannot measure accuracy on an empty split.")
    if isinstance(model_or_runner, nn.Module):
        model = model_or_runner
        was_training = model.training
        model.eval()
        try:
            with torch_threads(threads or default_threads()), torch.inference_mode():
                preds = torch.cat([model(x[i : i + 512]).argmax(1) for i in range(0, len(x), 512)])
        finally:
            model.train(was_training)
        return float((preds == y).float().mean())
    logits = _predict(model_or_runner, x)
    return float(np.mean(logits.argmax(1) == y.numpy()))


def _example_batch(data: DataBundle, batch: int) -> np.ndarray:
    return np.ascontiguousarray(data.example(batch).numpy())  # float32 examples, or int64 token ids


def latency(runner: Any, data: DataBundle, batch_sizes: Sequence[int], *, max_seconds: float = 2.0) -> dict[str, dict[str, float]]:
    """Latency per batch size (median, p90 in ms, spread, runs) of a backend runner on real examples."""
    out = {}
    for bs in batch_sizes:
        x = _example_batch(data, int(bs))
        out[str(int(bs))] = time_runs(functools.partial(runner, x), max_seconds=max_seconds)
    return out


def _prepare(model: nn.Module | None, onnx_path: Path | None, target: str, threads: int, example: torch.Tensor):
    backend = get_backend(target)
    if backend.needs_onnx:
        return backend.prepare(None, onnx_path, threads)

    return backend.prepare(fold_batchnorm(model, example) if model is not None else None, None, threads)


def layer_profile(
    model: nn.Module | None,
    data: DataBundle,
    *,
    target: str = "ort-cpu",
    onnx_path: str | Path | None = None,
    threads: int | None = None,
    batch_size: int = 1,
    repeats: int = 20,
) -> list[dict[str, Any]]:
    """Per-layer name, type, params, MACs and measured share of time on ``target``."""
    return _profile(model, data, target=target, onnx_path=onnx_path, threads=threads, batch_sizes=(),
                    layers_batch=batch_size, layer_repeats=repeats, with_layers=True)["layers"]


def profile(
    model: nn.Module | None,
    data: DataBundle,
    target: Target | str = "ort-cpu",
    *,
    onnx_path: str | Path | None = None,
    split: str = "test",
    latency: bool = True,
) -> dict[str, Any]:
    """Measure a model on a target: the figures ``slimkit profile --json`` prints.

    ``target``: a :class:`Target` (runtime, batch sizes, threads, time cap, per-layer profile)
    or a runtime name with the :class:`Target` defaults. For ``ort-cpu`` the model is exported
    to a temporary ONNX file unless ``onnx_path`` is given (then ``model`` may be ``None``).
    Returns ``params``, ``nonzero_params``, ``macs``, ``artifact_bytes``, ``accuracy`` (on
    ``split``), ``latency_ms`` (batch size -> median, p90, spread, runs; none timed with
    ``latency=False``) and ``layers``.

    >>> from slimkit.data import load_data
    >>> from slimkit.models import create_model
    >>> data = load_data("digits")
    >>> model = create_model("lenet300", input_shape=data.input_shape, num_classes=10)
    >>> profile(model, data, Target("torch-cpu", batch_sizes=(1,), max_seconds=0.1))["params"]
    50610
    """
    t = Target(target) if isinstance(target, str) else target
    return _profile(model, data, target=t.runtime, onnx_path=onnx_path, threads=t.threads,
                    batch_sizes=t.batch_sizes if latency else (), split=split, with_layers=t.layers,
                    max_seconds=t.max_seconds)


def read_onnx(path: str | Path) -> Any:
    """The ONNX model in ``path`` (weights left external), read behind the input-file guard."""
    import onnx

    def parse(p: Path) -> Any:
        model = onnx.load(str(p), load_external_data=False)
        if not model.graph.node:
            raise ValueError("the file holds no ONNX graph")
        return model

    return _io.read_file(path, "ONNX file", parse, expected="give an ONNX model (e.g. model.onnx that slimkit wrote)")


def _profile(
    model: nn.Module | None,
    data: DataBundle,
    *,
    target: str,
    onnx_path: str | Path | None,
    threads: int | None,
    batch_sizes: Sequence[int],
    split: str = "test",
    with_layers: bool = True,
    max_seconds: float = 2.0,
    layers_batch: int | None = None,
    layer_repeats: int = 20,
) -> dict[str, Any]:

    backend = get_backend(target)
    threads = int(threads or default_threads())
    if threads < 1:
        raise SlimkitError(f"--threads must be at least 1, got {threads}.")
    if any(int(b) < 1 for b in batch_sizes):
        raise SlimkitError(f"batch sizes must be at least 1, got {list(batch_sizes)}.")
    if model is None and onnx_path is None:
        raise SlimkitError("nothing to measure: give a model or an ONNX file.")
    if onnx_path is not None:
        read_onnx(onnx_path)  # a file that is not ONNX fails here, with its name, before any work
    example = data.example(2)
    with tempfile.TemporaryDirectory(prefix="slimkit-profile-") as tmp:
        result: dict[str, Any] = {"target": target, "threads": threads, "batch_sizes": [int(b) for b in batch_sizes]}
        if backend.needs_onnx:
            if onnx_path is None:
                assert model is not None
                onnx_path = export_onnx(model, Path(tmp) / "model.onnx", example)
            onnx_path = Path(onnx_path)
            stats = graph_stats(onnx_path)
            result.update(params=stats["params"], nonzero_params=stats["nonzero_params"], macs=stats["macs"],
                          artifact_bytes=artifact_bytes(onnx_path))
            runner = backend.prepare(None, onnx_path, threads)
            static_layers = stats["layers"]
        else:
            if model is None:
                raise SlimkitError(f"target {target} needs the torch model, not only an ONNX file.")
            deploy = fold_batchnorm(model, example)
            from safetensors.torch import save

            state = {k: v.detach().contiguous().clone() for k, v in deploy.state_dict().items()}
            result.update(**count_params(deploy), macs=count_macs(deploy, data.input_shape, dtype=data.input_dtype),
                          artifact_bytes=len(save(state)))
            runner = backend.prepare(deploy, None, threads)
            static_layers = _torch_layers(deploy, data.input_shape, data.input_dtype)
        try:
            x, y = data.split(split)
            result["accuracy"] = accuracy(runner, x, y)
            result["latency_ms"] = latency(runner, data, batch_sizes, max_seconds=max_seconds)
            if with_layers:
                bs = layers_batch or (int(batch_sizes[0]) if batch_sizes else 1)
                times = runner.layer_times(_example_batch(data, bs), layer_repeats)
                result["layers"] = _merge_layers(static_layers, times)
            else:
                result["layers"] = []
        finally:
            runner.close()
    return {k: result[k] for k in ("target", "threads", "batch_sizes", "params", "nonzero_params", "macs",
                                   "artifact_bytes", "accuracy", "latency_ms", "layers")}


def _torch_layers(model: nn.Module, input_shape: Sequence[int], dtype: torch.dtype) -> dict[str, dict[str, Any]]:
    """One row per leaf module and per module with parameters of its own (``nn.MultiheadAttention``'s
    input projections), with the MACs of its own computation (its children's left to their rows)."""
    macs = layer_macs(model, input_shape, dtype=dtype)
    out: dict[str, dict[str, Any]] = {}
    for name, mod in model.named_modules():
        children = [f"{name}.{c}" for c, _ in mod.named_children()]
        own = list(mod.parameters(recurse=False))
        if not name or (children and not own):
            continue
        n = sum(p.numel() for p in own)
        nz = sum(int(torch.count_nonzero(p.detach())) for p in own)
        m = max(0, macs.get(name, 0) - sum(macs.get(c, 0) for c in children))
        out[name] = {"type": type(mod).__name__, "params": n, "nonzero_params": nz, "macs": m}
    return out


def _merge_layers(static: dict[str, dict[str, Any]], times: dict[str, float]) -> list[dict[str, Any]]:
    total = sum(times.values()) or 1.0
    names = list(static) + [n for n in times if n not in static]
    rows = []
    other = 0.0
    for name in names:
        s = static.get(name, {})
        t = times.get(name, 0.0)
        if not s.get("params") and not s.get("macs") and t / total < 0.005:
            other += t  # cheap parameter-free layers (ReLU, Identity...) share one row
            continue
        rows.append({
            "name": name,
            "type": s.get("type") or "+".join(s.get("ops", [])) or "-",
            "params": int(s.get("params", 0)),
            "nonzero_params": int(s.get("nonzero_params", 0)),
            "macs": int(s.get("macs", 0)),
            "time_share": round(t / total, 4),
        })
    if other > 0:
        rows.append({"name": "(other layers)", "type": "-", "params": 0, "nonzero_params": 0, "macs": 0,
                     "time_share": round(other / total, 4)})
    return rows
