"""The one side-by-side timer: several models timed in interleaved rounds, medians over rounds.

Timing two artifacts minutes apart on a shared machine compares the machine's load, not the
artifacts. Every comparison slimkit makes (INT8 against float, a trial against the baseline, a
latency table's blocks, the finalists of a search, the benchmarks) goes through
:func:`interleaved`: each round visits every candidate once, in a rotating (or shuffled) order,
and times a chunk of calls; a candidate's figure is the median over rounds, so drift hits every
candidate alike, and the spread over rounds says how far to trust it.

Ratios are paired: the machine here switches between a fast and a ~1.6x slower spell every few
hundred milliseconds, so two medians over rounds can sit in different spells. The median over
rounds of each round's own ratio (both visits, back to back, in one spell) is what
:func:`side_by_side` reports as ``ratio`` and :func:`medians` builds on: timing a pruned lenet5
against its input 12 times, the ratio of medians read 0.36-0.61 at batch 1, the paired ratio
0.48-0.53.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from torch import nn

from .. import _console
from ..data import DataBundle
from .backends import get_backend

__all__ = ["interleaved", "side_by_side", "medians"]


def _chunk_size(run: Callable[[], Any], seconds: float) -> int:
    """Warm ``run`` up and return how many calls take about ``seconds``."""
    t0 = time.perf_counter()
    n = 0
    while n < 3 or (time.perf_counter() - t0 < min(0.02, seconds) and n < 200):
        run()
        n += 1
    per = (time.perf_counter() - t0) / n
    return int(min(2000, max(3, seconds / max(per, 1e-6))))


def interleaved(runs: Mapping[str, Callable[[], Any]], *, rounds: int = 5, seconds: float = 0.05,
                shuffle_seed: int | None = None, pause_s: float = 0.0, label: str | None = None) -> dict[str, list[float]]:
    """Per-round median latency (ms) of each callable, timed in interleaved rounds.

    Each round visits every callable once, in a rotating order (or a fresh random one with
    ``shuffle_seed``); a visit makes two warm-up calls (another session's threads may still be
    spinning), then times a chunk of calls (about ``seconds`` long, 3 to 2000 calls) and keeps
    their median. ``pause_s`` sleeps between visits. Returns ``{name: [median per round]}``.

    >>> out = interleaved({"a": lambda: sum(range(100)), "b": lambda: sum(range(1000))}, rounds=3, seconds=0.005)
    >>> len(out["a"]), out["a"][0] < out["b"][0]
    (3, True)
    """
    calls = {name: _chunk_size(run, seconds) for name, run in runs.items()}
    out: dict[str, list[float]] = {name: [] for name in runs}
    names = list(runs)
    rng = random.Random(shuffle_seed) if shuffle_seed is not None else None
    with _console.progress() as bar:
        task = bar.add_task(label or "timing side by side", total=rounds * len(names), info="")
        for r in range(rounds):
            if rng is not None:
                rng.shuffle(names)
                order = names
            else:
                order = names[r % len(names):] + names[: r % len(names)]
            for name in order:
                run = runs[name]
                run()
                run()
                samples = []
                for _ in range(calls[name]):
                    s = time.perf_counter()
                    run()
                    samples.append(time.perf_counter() - s)
                out[name].append(float(np.median(samples)) * 1e3)
                bar.update(task, advance=1, info=f"round {r + 1}/{rounds}")
                if pause_s:
                    time.sleep(pause_s)
    return out


#: The shortest chunk of calls a visit times. Shorter chunks measure the cost of switching between
#: sessions (caches refilled with the other model's weights) more than the model: timed in 7 ms
#: chunks, a NAS candidate and its teacher at batch 1 read 0.72x; in 100 ms chunks, 1.0x.
MIN_CHUNK_S = 0.02


def side_by_side(models: Mapping[str, Path | nn.Module], data: DataBundle, batch_sizes: Sequence[int], *,
                 runtime: str = "ort-cpu", threads: int = 1, rounds: int = 3, max_seconds: float = 1.0,
                 label: str | None = None) -> dict[str, dict[str, dict[str, float]]]:
    """Latency of each model per batch size, timed side by side on ``runtime``.

    ``models`` maps a name to an ONNX file (``ort-cpu``) or a torch module (``torch-cpu``, run
    as given: fold its batch norms first to time it as ``profile`` does). ``max_seconds`` is the
    time spent on one model at one batch size over all rounds (at least
    :data:`MIN_CHUNK_S` a round). Returns
    ``{name: {batch: {"median": ms, "spread": (q3 - q1) / median over rounds, "rounds": n}}}``;
    every model after the first (the reference) also has ``"ratio"``: the median over rounds of
    its time over the reference's in the same round.
    """
    backend = get_backend(runtime)
    runners = {name: backend.prepare(m if isinstance(m, nn.Module) else None,
                                     None if isinstance(m, nn.Module) else Path(m), threads)
               for name, m in models.items()}
    inputs = {str(b): np.ascontiguousarray(data.example(int(b)).numpy()) for b in batch_sizes}
    runs = {(name, b): (lambda r=runner, x=x: r(x)) for name, runner in runners.items() for b, x in inputs.items()}
    try:
        keyed = {f"{name}@{b}": fn for (name, b), fn in runs.items()}
        per_round = interleaved(keyed, rounds=rounds, seconds=max(MIN_CHUNK_S, max_seconds / max(rounds, 1)), label=label)
    finally:
        for runner in runners.values():
            runner.close()
    out: dict[str, dict[str, dict[str, float]]] = {name: {} for name in models}
    reference = next(iter(models))
    for (name, b) in runs:
        values = np.asarray(per_round[f"{name}@{b}"])
        q1, med, q3 = np.percentile(values, [25, 50, 75])
        out[name][b] = {"median": float(med), "spread": float((q3 - q1) / med) if med > 0 else 0.0,
                        "rounds": int(len(values))}
        if name != reference:
            ref = np.asarray(per_round[f"{reference}@{b}"])
            out[name][b]["ratio"] = float(np.median(values / np.maximum(ref, 1e-12)))
    return out


def medians(timed: Mapping[str, Mapping[str, Mapping[str, float]]]) -> dict[str, dict[str, float]]:
    """``{name: {batch: ms}}`` from :func:`side_by_side`'s result: the reference's median, and each
    other model's as the reference's median times its paired ``ratio``, so that the ratio of any
    two figures is paired too.

    >>> medians({"a": {"1": {"median": 2.0}}, "b": {"1": {"median": 1.4, "ratio": 0.5}}})
    {'a': {'1': 2.0}, 'b': {'1': 1.0}}
    """
    reference = next(iter(timed.values()), {})
    return {name: {b: reference[b]["median"] * s["ratio"] if "ratio" in s else s["median"] for b, s in per.items()}
            for name, per in timed.items()}
