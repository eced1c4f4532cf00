"""The spine's own steps: ``finetune`` and ``export``."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from .. import _console
from ..config import check
from ..errors import ExportError
from ..export import export_onnx, parity
from ..training import TrainConfig, fit
from ._context import Context
from ._recipe import register_space, register_step

__all__ = ["Finetune", "Export", "export_step"]


@dataclass
class Finetune(TrainConfig):
    """Fine-tune the model; with ``distill`` (the default) the model as it was before the
    recipe teaches it (Hinton's soft targets, ``temperature`` and ``alpha``)."""

    epochs: int = 3
    lr: float = 5e-4
    distill: bool = True


@register_step("finetune", Finetune, forbids={"exported", "quantized"})
def _finetune(ctx: Context, cfg: Finetune) -> dict[str, Any]:
    """Fine-tune with the shared loop (distillation from the original model by default)."""
    teacher = ctx.teacher if cfg.distill else None
    report = fit(ctx.model, ctx.data, cfg, teacher=teacher, hooks=ctx.train_hooks(), label="finetune")
    report.pop("history", None)
    return {"distilled": teacher is not None, **report}


@register_space("finetune", order=60)
def _finetune_space(trial: Any) -> Finetune | None:
    """How the search draws a fine-tune: 0 epochs leaves the step out of the trial."""
    epochs = trial.suggest_int("finetune.epochs", 0, 4)
    if epochs == 0:
        return None
    lr = trial.suggest_float("finetune.lr", 1e-4, 3e-3, log=True)
    if not trial.suggest_categorical("finetune.distill", [True, False]):
        return Finetune(epochs=epochs, lr=lr, distill=False)
    return Finetune(epochs=epochs, lr=lr, distill=True,
                    temperature=trial.suggest_float("finetune.temperature", 1.0, 8.0),
                    alpha=trial.suggest_float("finetune.alpha", 0.3, 0.95))


@dataclass
class Export:
    """Export to ONNX (dynamic batch) and check parity with the torch model on test examples.

    The export fails if fewer than ``min_agreement`` of the examples get the same top-1 class.
    """

    opset: int | None = None
    parity_samples: int = 512
    min_agreement: float = 0.99

    def __post_init__(self) -> None:
        check(self.opset is None or 13 <= self.opset <= 25, "opset", f"must be in 13..25 or null, got {self.opset}")
        check(self.parity_samples >= 1, "parity_samples", f"must be >= 1, got {self.parity_samples}")
        check(0 <= self.min_agreement <= 1, "min_agreement", f"must be in [0, 1], got {self.min_agreement}")


def export_step(ctx: Context, cfg: Export | None = None) -> dict[str, Any]:
    """Export ``ctx.model`` into the work folder, check parity, and make it the current artifact."""
    cfg = cfg or Export()
    path = ctx.new_path("model")
    with _console.status("exporting to ONNX"):
        export_onnx(ctx.model, path, ctx.data.example(2), opset=cfg.opset)
    float_path = path
    transformed: dict[str, Any] = {}
    transform = ctx.export_transform  # e.g. QAT: the float export -> integer QDQ kernels
    if transform is not None:
        path, transformed = transform.fn(ctx, float_path)
    x = ctx.data.x_test[: cfg.parity_samples]
    result = parity(ctx.model, path, x, threads=ctx.threads)
    # an integer artifact (QAT) rounds differently from torch's fake quantization: its own step's threshold holds
    least = min(cfg.min_agreement, transform.min_agreement if transform is not None else 1.0)
    if result["top1_agreement"] < least:
        raise ExportError(
            f"the exported ONNX model disagrees with the torch model on {1 - result['top1_agreement']:.1%} of "
            f"{result['samples']} test examples (max abs logit difference {result['max_abs_diff']:.3g}); "
            f"the minimum agreement is {least:.0%}."
        )
    ctx.onnx_path, ctx.float_onnx_path = path, float_path
    ctx.parity = result
    return {"parity": result, "onnx_bytes": path.stat().st_size, **transformed}


register_step("export", Export, forbids={"exported"}, sets={"exported"})(export_step)


@register_space("export", order=80)
def _export_space(trial: Any) -> Export:
    """Every searched recipe is exported (ONNX-level steps come after it); nothing to draw."""
    return Export()
