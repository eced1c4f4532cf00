"""The quantization recipe steps and their search spaces: ``quantize_static``, ``quantize_dynamic``
(ONNX Runtime), ``quantize_dynamic_torch`` (eager PyTorch) and ``qat``. Each times its artifact
against the float one side by side and records a :class:`~slimkit.pipeline.SpeedVerdict`."""

from __future__ import annotations

from typing import Any

import torch

from ... import _console
from ...errors import SlimkitError
from ...export import fold_batchnorm
from ...measure import accuracy
from ...measure.timing import medians, side_by_side
from ...pipeline import Context, register_space, register_step
from ._configs import INT8_TYPES, METHODS, QAT, DynamicInt8, StaticInt8
from ._eager import float_copy, quantize_dynamic_torch_, restore_float
from ._ort import add_verdict, onnx_step, speed_report
from ._qat import qat_export, quantize_

__all__: list[str] = []

_ORT_FORBIDS, _ORT_SETS = {"quantized", "fake_quant"}, {"exported", "quantized"}


@register_step("quantize_static", StaticInt8, forbids=_ORT_FORBIDS, sets=_ORT_SETS, targets={"ort-cpu"}, reports_speed=True)
def _static_step(ctx: Context, cfg: StaticInt8) -> dict[str, Any]:
    """Static INT8 with calibration (ONNX Runtime, QDQ); reports INT8 vs float latency and "faster"."""
    return onnx_step(ctx, cfg, "quantize_static")


@register_step("quantize_dynamic", DynamicInt8, forbids=_ORT_FORBIDS, sets=_ORT_SETS, targets={"ort-cpu"},
               reports_speed=True)
def _dynamic_step(ctx: Context, cfg: DynamicInt8) -> dict[str, Any]:
    """Dynamic INT8 in ONNX Runtime (linear layers by default); reports INT8 vs float latency and "faster"."""
    return onnx_step(ctx, cfg, "quantize_dynamic")


@register_step("quantize_dynamic_torch", DynamicInt8, forbids={"exported", "quantized", "fake_quant"},
               sets={"quantized"}, targets={"torch-cpu"}, reports_speed=True)
def _dynamic_torch_step(ctx: Context, cfg: DynamicInt8) -> dict[str, Any]:
    """Dynamic INT8 linear layers for eager PyTorch; reports INT8 vs float latency and "faster"."""
    before = float_copy(ctx.model)
    report = quantize_dynamic_torch_(ctx.model, cfg)
    x = ctx.data.x_test
    with torch.no_grad():
        ref, got = before.eval()(x[:512]).argmax(1), ctx.model.eval()(x[:512]).argmax(1)
    report["agreement"] = {"top1_agreement": float((ref == got).float().mean()), "samples": int(min(len(x), 512))}
    report["accuracy"] = {"float": accuracy(before, x, ctx.data.y_test, threads=ctx.threads),
                          "int8": accuracy(ctx.model, x, ctx.data.y_test, threads=ctx.threads)}
    report["accuracy_drop"] = round(report["accuracy"]["float"] - report["accuracy"]["int8"], 6)
    if report["agreement"]["top1_agreement"] < cfg.min_agreement:
        raise SlimkitError(f"the INT8 model agrees with the float one on only {report['agreement']['top1_agreement']:.1%} "
                           f"of test examples (min_agreement {cfg.min_agreement:.0%}); keep layers in float with keep_float.")
    example = ctx.data.example(2)  # both timed as profile runs them: batch norms folded
    timed = side_by_side({"float": fold_batchnorm(before, example), "int8": fold_batchnorm(ctx.model, example)},
                         ctx.data, ctx.batch_sizes, runtime="torch-cpu", threads=ctx.threads, rounds=3,
                         max_seconds=ctx.max_seconds, label="timing the float and the INT8 model side by side")
    report.update(speed_report(medians(timed)))
    report["applied"] = report["faster"] or cfg.if_slower != "revert"
    add_verdict(ctx, "quantize_dynamic_torch", report)
    if not report["applied"]:
        _console.info("  INT8 is [yellow]not faster[/yellow] on torch-cpu: keeping the float model (if_slower: revert)")
        restore_float(ctx.model, before)
    return report


@register_step("qat", QAT, forbids={"exported", "quantized", "fake_quant"}, sets={"fake_quant"}, targets={"ort-cpu"},
               reports_speed=True)
def _qat_step(ctx: Context, cfg: QAT) -> dict[str, Any]:
    """Quantization-aware training (fake quantization, straight-through); the export runs INT8 QDQ kernels
    (the ``export`` step times them against the float export and records the verdict under ``qat``)."""
    report = quantize_(ctx.model, cfg, data=ctx.data, teacher=ctx.teacher, hooks=ctx.train_hooks())
    ctx.export_transform = qat_export(cfg)
    return report


@register_space("quantize_static", order=90)
def _static_space(trial: Any) -> StaticInt8 | None:
    if not trial.suggest_categorical("quantize_static.on", [False, True]):
        return None
    return StaticInt8(
        method=trial.suggest_categorical("quantize_static.method", list(METHODS)),
        per_channel=trial.suggest_categorical("quantize_static.per_channel", [True, False]),
        calibration_size=trial.suggest_categorical("quantize_static.calibration_size", [64, 256]),
    )


@register_space("quantize_dynamic", order=90)
def _dynamic_space(trial: Any) -> DynamicInt8 | None:
    if not trial.suggest_categorical("quantize_dynamic.on", [False, True]):
        return None
    return DynamicInt8(
        weight_type=trial.suggest_categorical("quantize_dynamic.weight_type", list(INT8_TYPES)),
        per_channel=trial.suggest_categorical("quantize_dynamic.per_channel", [True, False]),
    )


@register_space("quantize_dynamic_torch", order=75)  # torch-level: before export (80)
def _dynamic_torch_space(trial: Any) -> DynamicInt8 | None:
    if not trial.suggest_categorical("quantize_dynamic_torch.on", [False, True]):
        return None
    return DynamicInt8(per_channel=trial.suggest_categorical("quantize_dynamic_torch.per_channel", [True, False]))


@register_space("qat", order=70)
def _qat_space(trial: Any) -> QAT | None:
    if not trial.suggest_categorical("qat.on", [False, True]):
        return None
    return QAT(epochs=trial.suggest_int("qat.epochs", 1, 3),
               lr=trial.suggest_float("qat.lr", 2e-5, 5e-4, log=True),
               per_channel=trial.suggest_categorical("qat.per_channel", [True, False]))
