"""Shared pieces of the benchmark scripts: machine description, Fashion-MNIST, cached
baselines, side-by-side latency, and writing a section of BENCHMARKS.md.

Run a benchmark from the repository root, e.g. ``.venv/bin/python -m bench.train_baselines``.
Each script prints its table and replaces its own section of BENCHMARKS.md (between
``<!-- bench:NAME -->`` markers), so scripts can run in any order, even at the same time.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import fcntl
import json
import os
import platform
import re
import shlex
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from slimkit import api
from slimkit.data import load_data
from slimkit.measure import timing
from slimkit.models import load_model
from slimkit.training import TrainConfig

ROOT = Path(__file__).resolve().parent.parent
BENCHMARKS = ROOT / "BENCHMARKS.md"
CACHE = ROOT / "bench" / ".cache"
FASHION = "/usr/share/datasets/fashion-mnist"
#: The machine's load (1, 5, 15 minutes) when the benchmark started, before it loaded it itself.
START_LOAD = os.getloadavg()


def command_line() -> str:
    """The exact command that ran this script, as a user would type it from the repo root."""
    mod = sys.modules["__main__"].__spec__
    target = f"-m {mod.name}" if mod is not None else shlex.quote(os.path.relpath(sys.argv[0], ROOT))
    return f".venv/bin/python {target} {' '.join(shlex.quote(a) for a in sys.argv[1:])}".strip()


def machine() -> str:
    """Cores, CPU model and the CPU flags that matter for int8 kernels, plus library versions."""
    import onnxruntime
    import torch

    model, flags = platform.processor() or platform.machine(), set()
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name") and model in ("", platform.machine(), platform.processor()):
                model = line.split(":", 1)[1].strip()
            if line.startswith("flags"):
                flags = set(line.split(":", 1)[1].split())
    wanted = ["avx2", "fma", "avx512f", "avx512bw", "avx512_vnni", "avx_vnni", "amx_int8"]
    have = [f for f in wanted if f in flags]
    return (f"{os.cpu_count()} cores, {model}, flags: {' '.join(have) or 'none of ' + ' '.join(wanted)}; "
            f"torch {torch.__version__}, onnxruntime {onnxruntime.__version__}, Python {platform.python_version()}")


def pop_option(args: list[str], name: str, default: str) -> str:
    """The value after ``name`` in ``args`` (both removed from it), or ``default``."""
    if name not in args:
        return default
    i = args.index(name)
    if i + 1 >= len(args):
        sys.exit(f"{name} needs a value, e.g. {name} {default}")
    value = args[i + 1]
    del args[i:i + 2]
    return value


def fashion_mnist(seed: int = 0):
    if not Path(FASHION).is_dir():
        sys.exit(f"Fashion-MNIST is not installed: run `apt-get update && apt-get install -y dataset-fashion-mnist` "
                 f"(it puts the IDX files in {FASHION}).")
    return load_data(f"idx:{FASHION}", seed=seed)


@contextlib.contextmanager
def _locked(path: Path):
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def trained(spec: str, data: Any, *, epochs: int, lr: float = 1e-3, seed: int = 0, tag: str = "fmnist",
            device: str = "cpu"):
    """A model trained on ``data``, cached in bench/.cache so every benchmark shares one baseline.

    Returns ``(model, weights_path, train_report)``. Two scripts asking for the same baseline at
    the same time train it once (a file lock guards the cache entry).
    """
    safe = re.sub(r"[^A-Za-z0-9_.=-]+", "_", spec.replace("zoo:", ""))
    folder = CACHE / f"{safe}-{tag}-e{epochs}-lr{lr}-s{seed}"
    with _locked(CACHE / f"{folder.name}.lock"):
        if not (folder / "train.json").exists():
            api.train(spec, data, out=folder, config=TrainConfig(epochs=epochs, lr=lr, seed=seed, device=device),
                      seed=seed, overwrite=True)
    model = load_model(spec, weights=folder / "model.safetensors", input_shape=data.input_shape,
                       num_classes=data.num_classes)
    return model, folder / "model.safetensors", json.loads((folder / "train.json").read_text())


# The baselines every benchmark compresses: trained once (cached), same settings everywhere.
BASELINES: dict[str, dict[str, Any]] = {
    "lenet300": {"spec": "zoo:lenet300", "epochs": 10},
    "lenet5": {"spec": "zoo:lenet5", "epochs": 10},
    "resnet": {"spec": "zoo:resnet", "epochs": 12},
    "mobilenetv2": {"spec": "zoo:mobilenetv2", "epochs": 12},
}


def baseline(name: str, data: Any, device: str = "cpu"):
    """The cached Fashion-MNIST baseline ``name`` (see BASELINES): (model, weights path, train report).

    ``device`` only matters when the baseline is not cached yet (``bench.baselines --device cuda``
    trains them on a GPU); every later use loads the cached weights on the CPU.
    """
    b = BASELINES[name]
    return trained(b["spec"], data, epochs=b["epochs"], device=device)


def side_by_side(artifacts: dict[str, Path], data: Any, batch_sizes: Sequence[int], *, threads: int = 2,
                 rounds: int = 5, max_seconds: float = 1.0) -> dict[str, dict[int, float]]:
    """Median latency (ms) of each ONNX artifact per batch size, timed side by side by slimkit's
    one timer (:func:`slimkit.measure.timing.side_by_side`: interleaved rounds, medians over rounds).

    ``max_seconds`` is spent on each artifact at each batch size in each round; the result is
    keyed by the batch size as an int.
    """
    timed = timing.side_by_side(artifacts, data, batch_sizes, threads=threads, rounds=rounds,
                                max_seconds=max_seconds * rounds)
    return {name: {int(b): ms for b, ms in per.items()} for name, per in timing.medians(timed).items()}


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    out = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    out += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(out)


def write_section(name: str, title: str, body: str) -> None:
    """Replace (or append) the section ``name`` of BENCHMARKS.md, with command, machine and date."""
    stamp = dt.datetime.now().strftime("%Y-%m-%d %H:%M")
    section = (f"<!-- bench:{name} -->\n## {title}\n\n"
               f"Command: `{command_line()}`  \nMachine: {machine()}  \nDate: {stamp}  \n"
               f"Load when it started (1/5/15 min): {' / '.join(f'{x:.2f}' for x in START_LOAD)}\n\n{body.strip()}\n"
               f"<!-- /bench:{name} -->")
    with _locked(CACHE / "BENCHMARKS.md.lock"):
        text = BENCHMARKS.read_text() if BENCHMARKS.exists() else (
            "# Benchmarks\n\nEvery figure here was measured by a script under `bench/`; each section names the "
            "exact command, the machine and the date. Latency ratios are measured side by side in one run "
            "(interleaved rounds, medians).\n")
        pattern = re.compile(rf"<!-- bench:{re.escape(name)} -->.*?<!-- /bench:{re.escape(name)} -->", re.S)
        text = pattern.sub(lambda _: section, text) if pattern.search(text) else text.rstrip() + "\n\n" + section + "\n"
        tmp = BENCHMARKS.with_suffix(".md.tmp")
        tmp.write_text(text)
        os.replace(tmp, BENCHMARKS)
    print(section)
