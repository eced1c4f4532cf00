"""Latency backends: how a model runs on a target, behind one small contract.

A backend turns an artifact into a :class:`Runner`:

- ``prepare(model, onnx_path, threads) -> Runner``;
- ``runner(x: np.ndarray) -> np.ndarray`` returns logits for a batch of examples (float32, or
  int64 token ids ``(N, T)``);
- ``runner.layer_times(x, repeats) -> {module name: seconds}`` times each layer on the target;
- ``runner.close()`` frees it.

``torch-cpu`` runs the (batch-norm folded) module in eager PyTorch; ``ort-cpu`` runs the ONNX
file in ONNX Runtime's CPU provider. Both honour an explicit thread count. The shared test
suite ``tests/test_backends.py`` runs the same checks against every registered backend.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
import time
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
from torch import nn

from ..errors import SlimkitError
from ..export import ort_feed, ort_input_dtype, ort_session
from ._graph import module_of_node

__all__ = ["Runner", "Backend", "get_backend", "register_backend", "target_names", "default_threads", "torch_threads"]


def default_threads() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


@contextlib.contextmanager
def torch_threads(n: int):
    """Run torch with ``n`` intra-op threads, restoring the previous setting after."""
    old = torch.get_num_threads()
    torch.set_num_threads(int(n))
    try:
        yield
    finally:
        torch.set_num_threads(old)


class Runner(Protocol):
    def __call__(self, x: np.ndarray) -> np.ndarray: ...

    def layer_times(self, x: np.ndarray, repeats: int) -> dict[str, float]: ...

    def close(self) -> None: ...


class Backend(Protocol):
    name: str
    needs_onnx: bool

    def prepare(self, model: nn.Module | None, onnx_path: Path | None, threads: int) -> Runner: ...


_BACKENDS: dict[str, Backend] = {}


def register_backend(backend: Backend) -> Backend:
    _BACKENDS[backend.name] = backend
    return backend


def target_names() -> list[str]:
    return sorted(_BACKENDS)


def get_backend(target: str) -> Backend:
    if target not in _BACKENDS:
        raise SlimkitError(f"unknown target '{target}'; choose one of: {', '.join(target_names())}.")
    return _BACKENDS[target]


# ----------------------------------------------------------------------------- torch-cpu


class _TorchRunner:
    def __init__(self, model: nn.Module, threads: int):
        self.model = model.eval()
        self.threads = threads

    def __call__(self, x: np.ndarray) -> np.ndarray:
        with torch_threads(self.threads), torch.inference_mode():
            return self.model(torch.from_numpy(x)).float().numpy()

    def layer_times(self, x: np.ndarray, repeats: int) -> dict[str, float]:
        """Time each leaf module with forward hooks (their sum is the time spent in layers)."""
        totals: dict[str, float] = defaultdict(float)
        starts: dict[str, float] = {}
        hooks = []
        for name, mod in self.model.named_modules():
            if name and not list(mod.children()):
                hooks.append(mod.register_forward_pre_hook(lambda m, a, n=name: starts.__setitem__(n, time.perf_counter())))
                hooks.append(mod.register_forward_hook(
                    lambda m, a, o, n=name: totals.__setitem__(n, totals[n] + time.perf_counter() - starts[n])))
        xt = torch.from_numpy(x)
        try:
            with torch_threads(self.threads), torch.inference_mode():
                self.model(xt)  # warm-up
                totals.clear()
                for _ in range(repeats):
                    self.model(xt)
        finally:
            for h in hooks:
                h.remove()
        return dict(totals)

    def close(self) -> None:
        pass


class TorchCPU:
    name = "torch-cpu"
    needs_onnx = False

    def prepare(self, model: nn.Module | None, onnx_path: Path | None, threads: int) -> Runner:
        if model is None:
            raise SlimkitError("target torch-cpu needs a torch model, but only an ONNX file was given.")
        return _TorchRunner(model, threads)


# ----------------------------------------------------------------------------- ort-cpu


class _OrtRunner:
    def __init__(self, path: Path, threads: int):
        self.path = Path(path)
        self.threads = threads
        self.session = ort_session(self.path, threads)
        self.input = self.session.get_inputs()[0].name
        self.dtype = ort_input_dtype(self.session)

    def _feed(self, x: np.ndarray) -> dict[str, np.ndarray]:
        # the input's own dtype goes straight in (timed calls); anything else is converted or explained
        return {self.input: x} if x.dtype == self.dtype else ort_feed(self.session, x)

    def __call__(self, x: np.ndarray) -> np.ndarray:
        return self.session.run(None, self._feed(x))[0]

    def layer_times(self, x: np.ndarray, repeats: int) -> dict[str, float]:
        """ONNX Runtime's own profiler, each kernel attributed to the torch module it came from."""
        import onnx

        with tempfile.TemporaryDirectory() as tmp:
            opt_path = Path(tmp) / "optimized.onnx"
            sess = ort_session(self.path, self.threads, profile_dir=tmp, optimized_path=str(opt_path))
            feed = self._feed(x)
            sess.run(None, feed)  # warm-up (also profiled; dropped below)
            for _ in range(repeats):
                sess.run(None, feed)
            trace = Path(sess.end_profiling())
            try:
                events = json.loads(trace.read_text())
            finally:
                trace.unlink(missing_ok=True)
            original = onnx.load(str(self.path), load_external_data=False).graph
            optimized = onnx.load(str(opt_path), load_external_data=False).graph if opt_path.exists() else original
        params = {i.name for i in original.initializer}
        by_name = {n.name: n for n in original.node}
        by_output = {o: n for n in original.node for o in n.output}

        def owner(node: Any) -> str:
            mod = module_of_node(node, params)
            if mod:
                return mod
            src = None
            for cand in (node.name, _strip_runtime_suffix(node.name), *node.output):
                src = by_name.get(cand) or by_output.get(cand)
                if src is not None:
                    break
            if src is None:
                return "(runtime)"
            if node.op_type in _HEAVY and src.op_type not in _HEAVY:
                # a fused kernel named after its activation (Conv+Relu -> "relu_nchwc"): find its conv
                src = _nearest_heavy_producer(src, by_output) or src
            return module_of_node(src, params) or "(graph)"

        owners = {n.name: owner(n) for n in optimized.node}
        # skip the warm-up run's kernels: keep the last `repeats` runs' events
        node_events = [e for e in events if e.get("cat") == "Node" and e["name"].endswith("_kernel_time")]
        runs = [e for e in events if e.get("cat") == "Session" and e["name"] == "model_run"]
        if len(runs) > repeats:
            cutoff = runs[len(runs) - repeats]["ts"]
            node_events = [e for e in node_events if e["ts"] >= cutoff]
        durations: dict[str, list[float]] = defaultdict(list)
        for e in node_events:
            durations[e["name"][: -len("_kernel_time")]].append(e["dur"] * 1e-6)
        # the median per kernel: one preempted run must not make a layer look slow
        per_run = max(1, repeats)
        totals: dict[str, float] = defaultdict(float)
        for node_name, ds in durations.items():
            calls_per_run = max(1, round(len(ds) / per_run))
            totals[owners.get(node_name, "(runtime)")] += float(np.median(ds)) * calls_per_run
        return dict(totals)

    def close(self) -> None:
        self.session = None


_HEAVY = {"Conv", "FusedConv", "Gemm", "FusedGemm", "MatMul", "FusedMatMul", "ConvInteger", "QLinearConv",
          "MatMulInteger", "QLinearMatMul", "DynamicQuantizeMatMul", "MatMulIntegerToFloat"}


def _strip_runtime_suffix(name: str) -> str:
    for suffix in ("_nchwc", "_quant", "_fused"):
        name = name.removesuffix(suffix)
    return name


def _nearest_heavy_producer(node: Any, by_output: dict[str, Any], depth: int = 4) -> Any | None:
    frontier = [node]
    for _ in range(depth):
        nxt = []
        for n in frontier:
            for inp in n.input:
                src = by_output.get(inp)
                if src is None:
                    continue
                if src.op_type in _HEAVY:
                    return src
                nxt.append(src)
        frontier = nxt
    return None


class OrtCPU:
    name = "ort-cpu"
    needs_onnx = True

    def prepare(self, model: nn.Module | None, onnx_path: Path | None, threads: int) -> Runner:
        if onnx_path is None:
            raise SlimkitError("target ort-cpu needs an ONNX file; export the model first.")
        return _OrtRunner(Path(onnx_path), threads)


register_backend(TorchCPU())
register_backend(OrtCPU())


# ----------------------------------------------------------------------------- timing


def time_runs(
    run: Callable[[], Any],
    *,
    warmup_s: float = 0.2,
    min_runs: int = 10,
    max_seconds: float = 2.0,
    rel_tol: float = 0.02,
) -> dict[str, float]:
    """Time ``run()`` until its median is stable (or ``max_seconds`` pass), after a warm-up.

    Runs are timed in rounds; the loop stops once the median moved by less than ``rel_tol``
    over two consecutive rounds. Returns ``median`` and ``p90`` in milliseconds, the
    ``spread`` (interquartile range over median) and the number of ``runs``.
    """
    t0 = time.perf_counter()
    n_warm = 0
    while n_warm < 3 or time.perf_counter() - t0 < warmup_s:
        run()
        n_warm += 1
        if time.perf_counter() - t0 > max_seconds:
            break
    per_run = (time.perf_counter() - t0) / max(n_warm, 1)
    chunk = int(min(50, max(5, 0.05 / max(per_run, 1e-6))))
    samples: list[float] = []
    start = time.perf_counter()
    previous, stable = None, 0
    while True:
        for _ in range(chunk):
            s = time.perf_counter()
            run()
            samples.append(time.perf_counter() - s)
        elapsed = time.perf_counter() - start
        if len(samples) >= min_runs:
            med = float(np.median(samples))
            stable = stable + 1 if previous is not None and abs(med - previous) <= rel_tol * med else 0
            previous = med
            if stable >= 2:
                break
        if elapsed > max_seconds and len(samples) >= 3:
            break
    a = np.asarray(samples) * 1e3
    q1, med, q3, p90 = np.percentile(a, [25, 50, 75, 90])
    return {
        "median": float(med),
        "p90": float(p90),
        "spread": float((q3 - q1) / med) if med > 0 else 0.0,
        "runs": len(samples),
    }
