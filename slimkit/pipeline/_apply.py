"""The spine: baseline -> steps -> export -> measure the artifact -> report.

:func:`apply_recipe` is what ``slimkit apply``, every search trial and every finalist run: the
recipe's steps on the model (in place), an export when the recipe made none, and the artifact
measured on the target.
"""

from __future__ import annotations

import copy
import functools
import shutil
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from torch import nn

from .. import _console, _io
from .._provenance import run_info
from ..data import DataBundle
from ..measure import Target
from ..measure import profile as measure_profile
from ..measure.timing import medians, side_by_side
from ..export import export_onnx
from ..models import save_model
from ._context import Context, SpeedVerdict, run_recipe
from ._recipe import Recipe
from ._speed import side_by_side_rounds
from ._steps import export_step

__all__ = ["apply_recipe", "ApplyResult", "write_result", "time_side_by_side"]


@dataclass
class ApplyResult:
    """What :func:`apply_recipe` returns: the compressed model, its artifact and the JSON report.

    Without an output folder the artifact lives in a temporary folder that this result owns: it
    is removed when the result is garbage-collected (or at exit), so nothing is left behind.
    """

    model: nn.Module
    onnx_path: Path
    report: dict[str, Any]
    verdicts: list[SpeedVerdict] = field(default_factory=list)
    _scratch: tempfile.TemporaryDirectory[str] | None = field(default=None, repr=False, compare=False)


def apply_recipe(
    recipe: Recipe,
    model: nn.Module,
    data: DataBundle,
    target: Target,
    *,
    out: Path | None = None,
    hooks: Sequence[Any] = (),
    baseline: bool = True,
    split: str = "test",
) -> ApplyResult:
    """Run ``recipe`` on ``model`` (changed in place), export, and measure the artifact on ``target``.

    With ``out`` (an existing folder), writes ``model.onnx``, ``model.safetensors`` and the files a
    step made there, each atomically (:func:`write_result` adds ``result.json``). ``hooks`` join
    every fine-tune (the search's early stop); ``split`` is where accuracy is measured (the
    search judges trials on ``"val"``). The caller checks the recipe and the model first.
    """
    recipe.validate(target.runtime)
    recipe.check_model(model)  # e.g. unknown layer names: before the baseline is measured
    threads = target.resolved_threads
    measured_before = None
    workdir = Path(tempfile.mkdtemp(prefix=".slimkit-work-", dir=out))
    base_onnx = None
    scratch = None
    try:
        if baseline:
            with _console.status(f"measuring the baseline on {target.runtime}"):
                if target.runtime == "ort-cpu":  # one export: measured now, timed beside the result later
                    base_onnx = export_onnx(model, workdir / "baseline.onnx", data.example(2))
                measured_before = measure_profile(model, data, target, onnx_path=base_onnx)
        ctx = Context(model=model, data=data, workdir=workdir, target=target.runtime, threads=threads,
                      batch_sizes=target.batch_sizes, teacher=copy.deepcopy(model).eval(),
                      epoch_callbacks=list(hooks), max_seconds=target.max_seconds)
        if base_onnx is not None:  # a step that times the model before it reuses this file
            ctx.remember_export(model, base_onnx)
        run_recipe(recipe, ctx)
        net = ctx.model  # a step may replace the model (e.g. distill with a student architecture)
        if ctx.onnx_path is None:  # every result is measured on an exported artifact
            ctx.reports.append({"step": "export (automatic)", **export_step(ctx)})
        assert ctx.onnx_path is not None
        with _console.status(f"measuring the result on {target.runtime}"):
            result = measure_profile(net if target.runtime != "ort-cpu" else None, data, target,
                                     onnx_path=ctx.onnx_path, split=split)
        if measured_before is not None and base_onnx is not None and target.batch_sizes:
            time_side_by_side(measured_before, result, base_onnx, ctx.onnx_path, data, target)
        report = {
            "data": data.name,
            "batch_sizes": list(target.batch_sizes),
            "split": split,
            "recipe": recipe.to_data(),
            "baseline": measured_before,
            "result": result,
            "parity": ctx.parity,
            "steps": ctx.reports,
            "not_met": list(ctx.not_met),
            **run_info(target.runtime, threads),
        }
        if out is not None:
            onnx_path = _write_outputs(out, ctx, net, report)
        else:
            scratch = tempfile.TemporaryDirectory(prefix="slimkit-")
            onnx_path = Path(scratch.name) / "model.onnx"
            shutil.copyfile(ctx.onnx_path, onnx_path)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    return ApplyResult(net, onnx_path, report, list(ctx.verdicts), scratch)


#: A spread over rounds ((q3 - q1) / median) past this re-times the pair once, twice as long.
WIDE_SPREAD = 0.25
#: ... when the timing cap (``Target.max_seconds``) is at least this long.
RETIME_FROM_S = 0.25


def time_side_by_side(baseline: dict[str, Any], result: dict[str, Any], baseline_onnx: Path, result_onnx: Path,
                      data: DataBundle, target: Target, rounds: int | None = None) -> None:
    """Make the before/after latency medians those of the two artifacts timed side by side.

    Timed one after the other, the two figures compare the machine's load at two moments as
    much as the models; timed in the same interleaved rounds, drift hits both alike. The
    result's median is the baseline's times the paired ratio (``ratio_to_baseline``, the median
    of the per-round ratios; ``own_median`` is its median over rounds). ``p90`` stays each
    artifact's own; each median is marked ``timed: side by side`` with its spread over rounds
    (``rounds`` of them, :func:`side_by_side_rounds` by default); a spread past
    :data:`WIDE_SPREAD` re-times the pair once (``retimed``) unless ``max_seconds`` is under
    :data:`RETIME_FROM_S`.
    """
    rounds = rounds or side_by_side_rounds(target.max_seconds)

    def time_pair(n: int) -> dict[str, dict[str, dict[str, float]]]:
        return side_by_side({"baseline": baseline_onnx, "result": result_onnx}, data, target.batch_sizes,
                            runtime="ort-cpu", threads=target.resolved_threads, rounds=n,
                            max_seconds=target.max_seconds * n / rounds, label="timing before and after side by side")

    def widest(t: dict[str, dict[str, dict[str, float]]]) -> float:
        return max(s["spread"] for per in t.values() for s in per.values())

    timed = time_pair(rounds)
    # under a short time cap the user chose speed over precision: the spread is reported, not re-timed
    retimed = widest(timed) > WIDE_SPREAD and target.max_seconds >= RETIME_FROM_S
    if retimed:  # the machine's load moved during the rounds: time again, twice as long, keep the tighter
        again = time_pair(2 * rounds)
        timed = min((timed, again), key=widest)
    paired = medians(timed)
    for figures, name in ((baseline, "baseline"), (result, "result")):
        for b, t in timed[name].items():
            figures["latency_ms"][b].update(median=paired[name][b], spread=t["spread"], timed="side by side",
                                            rounds=t["rounds"], retimed=retimed)
            if "ratio" in t:  # the result's median is the baseline's times the paired ratio
                figures["latency_ms"][b].update(ratio_to_baseline=t["ratio"], own_median=t["median"])


def _write_outputs(out: Path, ctx: Context, net: nn.Module, report: dict[str, Any]) -> Path:
    """``model.onnx``, ``model.safetensors`` and the steps' own files; their paths go into the report."""
    assert ctx.onnx_path is not None
    src_onnx = ctx.onnx_path
    onnx_final = out / "model.onnx"
    _io.atomic_write(onnx_final, lambda tmp: shutil.copyfile(src_onnx, tmp))
    save_model(net, out / "model.safetensors")
    report["files"] = {"onnx": str(onnx_final), "weights": str(out / "model.safetensors"),
                       "report": str(out / "result.json")}
    for fname, src in ctx.outputs.items():  # files a step made, e.g. model.slim
        _io.atomic_write(out / fname, functools.partial(_copy_to, src))
        report["files"][fname] = str(out / fname)
    return onnx_final


def _copy_to(src: Path, tmp: Path) -> None:
    shutil.copyfile(src, tmp)


def write_result(out: Path, report: dict[str, Any]) -> Path:
    """``out/result.json``, written atomically after the artifacts it describes."""
    path = out / "result.json"
    _io.write_json(path, report)
    return path
