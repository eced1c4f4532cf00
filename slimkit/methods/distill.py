"""Knowledge distillation: a teacher model teaches a student (logits and, optionally, features).

``distill(student, teacher, data, Distillation(...))`` trains ``student`` in place with the
spine's loop (:func:`slimkit.fit`) on Hinton et al.'s loss (soft targets at temperature ``T``,
weighted by ``alpha``, plus the hard labels) and, for each pair of named layers in
``features`` (student layer -> teacher layer), a FitNets-style mean squared error between the
student's feature map and the teacher's. Where the widths differ, a learned adapter (a 1x1
convolution for feature maps, a linear layer for vectors) maps the student's features to the
teacher's width; the adapters train with the student and are dropped afterwards, so they are
never part of the saved or exported model.

The student is any model: the compressed model (the recipe step's default, taught by the
model as it was before the recipe), or a different, smaller architecture (the step's
``student: zoo:NAME`` or ``package.module:function``; ``slimkit distill --student``), which is
how a small model is trained from a big one.

>>> from slimkit.data import load_data
>>> from slimkit.models import create_model
>>> data = load_data("digits")
>>> teacher = create_model("lenet5", input_shape=data.input_shape, num_classes=10)
>>> student = create_model("lenet5", input_shape=data.input_shape, num_classes=10, channels=(4, 8), hidden=32)
>>> report = distill(student, teacher, data, Distillation(epochs=1, features={"conv2": "conv2"}))
>>> report["adapters"]
{'conv2': 'Conv2d(8 -> 50, 1x1)'}
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .. import _console
from ..config import check
from ..data import DataBundle
from ..errors import ConfigError, SlimkitError
from ..layers import layer_error
from ..models import check_fits, load_model, zoo_names
from ..pipeline import Context, register_space, register_step
from ..training import TrainConfig, fit

__all__ = ["Distillation", "Distill", "distill", "FeatureDistillation", "teacher_gap"]

NO_LAYER = "the {what} has no layer '{key}'; its layers include: {names}"


@dataclass
class Distillation(TrainConfig):
    """Train a student from a teacher: Hinton's soft targets plus optional feature matching.

    The loss is ``alpha * T^2 * KL(student/T || teacher/T) + (1 - alpha) * cross-entropy``
    (``temperature`` T) ``+ feature_weight * mean MSE over the feature pairs``. ``features``:
    student layer name -> teacher layer name; a 1x1 conv / linear adapter maps the student's
    width to the teacher's where they differ. The other fields are :class:`TrainConfig`'s.
    """

    epochs: int = 3
    lr: float = 5e-4
    features: dict[str, str] = field(default_factory=dict)
    feature_weight: float = 1.0

    def __post_init__(self) -> None:
        super().__post_init__()
        check(self.feature_weight >= 0, "feature_weight", f"must be >= 0, got {self.feature_weight}")
        for s, t in self.features.items():
            check(bool(s) and bool(t), "features", f"each pair is 'student_layer: teacher_layer', got {s!r}: {t!r}")


@dataclass
class Distill(Distillation):
    """Distil from the model as it was before the recipe (logits, and feature pairs if given).

    By default the student is the current (compressed) model. With ``student`` (a model spec:
    ``zoo:NAME[,k=v]`` or ``package.module:function``, optionally ``student_weights``) the
    model is replaced by that architecture, trained from the teacher: how a small model is
    trained from a big one.
    """

    student: str | None = None
    student_weights: str | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        check(self.student_weights is None or self.student is not None, "student_weights",
              "needs 'student' (the architecture the weights belong to)")
        if self.student is not None:
            check_student_spec(self.student)


# ----------------------------------------------------------------------------- feature distillation


def _layer(model: nn.Module, name: str, role: str) -> nn.Module:
    """The layer ``name`` of the student or teacher (a feature pair names one layer on each side)."""
    modules = dict(model.named_modules())
    if name not in modules or not name:
        leaves = [n for n, m in modules.items() if n and not list(m.children())]
        raise layer_error(name, leaves, field="features", what=role, message=NO_LAYER)
    return modules[name]


def _as_tensor(out: Any, name: str) -> torch.Tensor:
    if isinstance(out, torch.Tensor):
        return out
    raise SlimkitError(f"feature distillation needs layer '{name}' to return one tensor, it returned "
                       f"{type(out).__name__}; pick a layer that outputs a tensor.")


class _Adapter(nn.Module):
    """Maps a student feature to the teacher's shape: 1x1 conv / linear on channels, pooling on space."""

    def __init__(self, s_shape: torch.Size, t_shape: torch.Size):
        super().__init__()
        self.spatial = len(s_shape) == 4 and len(t_shape) == 4
        if self.spatial:
            self.size = (min(s_shape[2], t_shape[2]), min(s_shape[3], t_shape[3]))
            self.proj: nn.Module = nn.Conv2d(s_shape[1], t_shape[1], 1) if s_shape[1] != t_shape[1] else nn.Identity()
        else:
            s_width, t_width = _flat_width(s_shape), _flat_width(t_shape)
            self.proj = nn.Linear(s_width, t_width) if s_width != t_width else nn.Identity()

    def forward(self, s: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.spatial:
            s = self.proj(s)
            if s.shape[2:] != self.size:
                s = F.adaptive_avg_pool2d(s, self.size)
            if t.shape[2:] != self.size:
                t = F.adaptive_avg_pool2d(t, self.size)
            return s, t
        return self.proj(_flat(s)), _flat(t)

    def describe(self) -> str | None:
        p = self.proj
        if isinstance(p, nn.Conv2d):
            return f"Conv2d({p.in_channels} -> {p.out_channels}, 1x1)"
        if isinstance(p, nn.Linear):
            return f"Linear({p.in_features} -> {p.out_features})"
        return None


def _key(name: str) -> str:
    return name.replace(".", "__")  # ModuleDict keys may not hold dots


@contextlib.contextmanager
def _eval(*models: nn.Module):
    """Put ``models`` in eval mode for the block, restoring each one's mode after."""
    modes = [m.training for m in models]
    for m in models:
        m.eval()
    try:
        yield
    finally:
        for m, mode in zip(models, modes):
            m.train(mode)


def _flat(x: torch.Tensor) -> torch.Tensor:
    """Feature maps are averaged over space; anything else is flattened: (N, ...) -> (N, F)."""
    return x.mean(dim=(2, 3)) if x.dim() == 4 else x.flatten(1)


def _flat_width(shape: torch.Size) -> int:
    return int(shape[1]) if len(shape) == 4 else int(torch.Size(shape[1:]).numel())


class FeatureDistillation:
    """Training hook for :func:`slimkit.fit`: feature matching between named student/teacher layers.

    Forward hooks capture each pair's outputs; ``extra_loss`` returns ``weight`` times the mean
    MSE over the pairs (through the adapters); the adapters have their own Adam optimizer,
    stepped after each student step, and are never part of the student. Call :meth:`close`
    (or let ``on_train_end`` do it) to remove the hooks.
    """

    def __init__(self, student: nn.Module, teacher: nn.Module, pairs: dict[str, str], *,
                 example: torch.Tensor, weight: float = 1.0, lr: float = 1e-3):
        self.student, self.teacher, self.weight = student, teacher, float(weight)
        self.pairs = dict(pairs)
        self._s_layers = {s: _layer(student, s, "student") for s in self.pairs}
        self._t_layers = {t: _layer(teacher, t, "teacher") for t in self.pairs.values()}
        self._s: dict[str, torch.Tensor] = {}
        self._t: dict[str, torch.Tensor] = {}
        self._t_input: torch.Tensor | None = None
        self._handles: list[Any] = []
        self.open()
        with torch.no_grad(), _eval(student, teacher):
            student(example), teacher(example)
        self.adapters = nn.ModuleDict()
        for s, t in self.pairs.items():
            s_out, t_out = _as_tensor(self._s[s], s), _as_tensor(self._t[t], t)
            self.adapters[_key(s)] = _Adapter(s_out.shape, t_out.shape)
        params = list(self.adapters.parameters())
        self.optimizer = torch.optim.Adam(params, lr=lr) if params else None

    def open(self) -> None:
        """(Re-)register the forward hooks that capture the pairs' features."""
        if self._handles:
            return
        self._handles = [m.register_forward_hook(self._keep(self._s, n)) for n, m in self._s_layers.items()]
        self._handles += [m.register_forward_hook(self._keep(self._t, n)) for n, m in self._t_layers.items()]
        self._handles.append(self.teacher.register_forward_pre_hook(self._teacher_input))

    @staticmethod
    def _keep(store: dict[str, torch.Tensor], name: str):
        def hook(module: nn.Module, args: Any, out: Any) -> None:
            store[name] = out

        return hook

    def _teacher_input(self, module: nn.Module, args: Any) -> None:
        self._t_input = args[0] if args else None

    def adapter_summary(self) -> dict[str, str]:
        return {s: d for s in self.pairs if (d := self.adapters[_key(s)].describe())}

    def measure(self, x: torch.Tensor, batch: int = 512) -> float:
        """The weighted feature loss on ``x`` (eval mode, no gradients), averaged over batches."""
        was_open = bool(self._handles)
        self.open()
        self._follow(self.student)
        total = 0.0
        try:
            with torch.no_grad(), _eval(self.student, self.teacher):
                for i in range(0, len(x), batch):
                    xb = x[i : i + batch]
                    self.student(xb), self.teacher(xb)
                    total += float(self.loss()) * len(xb)
        finally:
            if not was_open:
                self.close()
        return total / max(len(x), 1)

    def loss(self) -> torch.Tensor:
        """The weighted feature loss of the last student and teacher forward passes."""
        terms = []
        for s, t in self.pairs.items():
            s_feat, t_feat = self.adapters[_key(s)](self._s[s], self._t[t].detach())
            terms.append(F.mse_loss(s_feat, t_feat))
        return self.weight * torch.stack(terms).mean()

    def _follow(self, model: nn.Module) -> None:
        """Keep the adapters on the device the student runs on (fit may train on an accelerator)."""
        device = next((p.device for p in model.parameters()), None)
        if device is not None:
            self.adapters.to(device)

    # hook protocol of slimkit.fit
    def on_train_begin(self, model: nn.Module, total_steps: int) -> None:
        self._follow(model)

    def extra_loss(self, model: nn.Module, x: torch.Tensor, logits: torch.Tensor) -> torch.Tensor | None:
        if not self.pairs or self.weight == 0:
            return None
        if self._t_input is not x:  # the loop ran no teacher on this batch: run it here
            with torch.no_grad():
                self.teacher(x)
        return self.loss()

    def on_step_end(self, model: nn.Module, step: int, total: int) -> None:
        if self.optimizer is not None:
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)

    def on_train_end(self, model: nn.Module) -> None:
        self.close()

    def close(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []
        self._s.clear()
        self._t.clear()
        self._t_input = None


# ----------------------------------------------------------------------------- the verb


def teacher_gap(student: nn.Module, teacher: nn.Module, x: torch.Tensor, temperature: float = 4.0,
                batch: int = 512) -> float:
    """KL divergence from the teacher's soft targets to the student's at ``temperature`` (mean per example)."""
    total = 0.0
    with torch.no_grad(), _eval(student, teacher):
        for i in range(0, len(x), batch):
            xb = x[i : i + batch]
            s = F.log_softmax(student(xb) / temperature, dim=1)
            t = F.softmax(teacher(xb) / temperature, dim=1)
            total += float(F.kl_div(s, t, reduction="sum"))
    return total / max(len(x), 1)


def distill(
    student: nn.Module,
    teacher: nn.Module,
    data: DataBundle,
    config: Distillation | None = None,
    *,
    hooks: list[Any] | tuple[Any, ...] = (),
    label: str = "distill",
) -> dict[str, Any]:
    """Train ``student`` in place from ``teacher`` on ``data``; the teacher is not changed.

    Returns the :func:`slimkit.fit` report plus ``teacher_gap_before`` / ``teacher_gap_after``
    (KL divergence to the teacher's soft targets on the validation split, at the config's
    temperature), ``feature_loss_before`` / ``feature_loss_after`` when ``features`` are given,
    and the ``adapters`` that were trained (student layer -> adapter).

    >>> from slimkit.data import load_data
    >>> from slimkit.models import create_model
    >>> data = load_data("digits")
    >>> teacher = create_model("lenet5", input_shape=data.input_shape, num_classes=10)
    >>> student = create_model("lenet300", input_shape=data.input_shape, num_classes=10)
    >>> report = distill(student, teacher, data, Distillation(epochs=2, temperature=4.0, alpha=0.9))
    >>> report["teacher_gap_after"] < report["teacher_gap_before"]
    True
    """
    cfg = config or Distillation()
    if student is teacher:
        raise SlimkitError("the student and the teacher are the same module; distil into a copy or another model.")
    x_val = data.x_val
    feature = None
    if cfg.features:
        feature = FeatureDistillation(student, teacher, cfg.features, example=data.example(2, "train"),
                                      weight=cfg.feature_weight, lr=cfg.lr)
    try:
        gap_before = teacher_gap(student, teacher, x_val, cfg.temperature)
        feat_before = feature.measure(x_val) if feature else None
        report = fit(student, data, cfg, teacher=teacher, hooks=[*hooks, *([feature] if feature else [])], label=label)
        gap_after = teacher_gap(student, teacher, x_val, cfg.temperature)
        feat_after = feature.measure(x_val) if feature else None
    finally:
        if feature is not None:
            feature.close()
    report.pop("history", None)
    out: dict[str, Any] = {**report, "temperature": cfg.temperature, "alpha": cfg.alpha,
                           "teacher_gap_before": gap_before, "teacher_gap_after": gap_after}
    if feature is not None:
        out.update(features=dict(cfg.features), feature_loss_before=feat_before, feature_loss_after=feat_after,
                   adapters=feature.adapter_summary())
    _console.info(f"distill: KL to the teacher {gap_before:.4f} -> {gap_after:.4f}"
                  + (f", feature loss {feat_before:.4f} -> {feat_after:.4f}" if feature else ""))
    return out


# ----------------------------------------------------------------------------- recipe step and search space


def build_student(spec: str, data: DataBundle, *, weights: str | None = None, seed: int = 0) -> nn.Module:
    """A fresh student of architecture ``spec`` for ``data`` (seeded), with ``weights`` if given."""
    torch.manual_seed(seed)
    model = load_model(spec, weights=weights, input_shape=data.input_shape, num_classes=data.num_classes)
    check_fits(model, data.input_shape, data.num_classes, data.name, f"the student {spec}")
    return model


def check_student_spec(spec: str, field_name: str = "student") -> None:
    """Reject a student spec that can never build a model, before any work."""
    if spec.startswith("zoo:"):
        name = spec[4:].split(",")[0].strip()
        if name not in zoo_names():
            raise ConfigError(f"unknown zoo model '{name}'; the zoo has: {', '.join(zoo_names())}", field=field_name)
    elif ":" not in spec or spec.endswith((".pt", ".pth")):
        raise ConfigError(f"got {spec!r}; give a zoo:NAME[,key=value] or package.module:function that builds the "
                          "student (a pickled model is not accepted here)", field=field_name)


@register_step("distill", Distill, forbids={"exported", "quantized"})
def _distill_step(ctx: Context, cfg: Distill) -> dict[str, Any]:
    """Distil from the model as it was before the recipe (logits and optional feature pairs)."""
    if ctx.teacher is None:
        raise SlimkitError("the distill step needs a teacher: run it through slimkit apply (the input model "
                           "teaches) or call distill(student, teacher, data, ...) directly.")
    extra: dict[str, Any] = {}
    if cfg.student:
        if ctx.hooks:
            raise SlimkitError(
                "distill with a 'student' replaces the model by a new architecture, so it cannot follow a step "
                "that keeps training hooks on the old one (pruning masks, ...); put it first in the recipe.")
        ctx.model = build_student(cfg.student, ctx.data, weights=cfg.student_weights, seed=cfg.seed)
        extra["student"] = cfg.student
    try:
        report = distill(ctx.model, ctx.teacher, ctx.data, cfg, hooks=ctx.train_hooks())
    except ConfigError as e:
        raise e.located("recipe step 'distill'") from None
    return {**extra, **report}


@register_space("distill", order=60)
def _distill_space(trial: Any) -> Distill | None:
    if not trial.suggest_categorical("distill.on", [True, False]):
        return None
    return Distill(epochs=trial.suggest_int("distill.epochs", 1, 3),
                   temperature=trial.suggest_categorical("distill.temperature", [2.0, 4.0, 8.0]),
                   alpha=trial.suggest_float("distill.alpha", 0.5, 0.95))
