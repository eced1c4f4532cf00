"""The search space: every registered step that carries a space, walked in its ``order``.

A trial's recipe is drawn step by step: a step the target cannot run, or that cannot follow
the steps already drawn (its ``forbids`` / ``requires`` flags), is left out *before* its space
is asked, so the trial records no parameter for it. Each space returns a config or ``None``
(leave the step out). The assembled recipe is then validated like any user recipe.

A new method joins the search by registering its space next to its config
(:func:`slimkit.pipeline.register_space`); nothing here names a method.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterable, Sequence
from typing import Any

from ..errors import ConfigError
from ..pipeline import Recipe, Step, StepSpec, get_step, step_names
from ..training import TrainConfig

__all__ = ["searchable_steps", "draw_recipe", "GridTrial", "GRID_LEVELS", "off_switch", "warm_start", "on_the_file", "with_max_batches"]

# Steps every searched recipe needs (the artifact is measured on the target).
ALWAYS = ("export",)
GRID_LEVELS = 3


def searchable_steps(target: str, methods: Iterable[str] | None = None) -> list[StepSpec]:
    """The registered steps that carry a space and can run on ``target``, in search order.

    ``methods`` restricts the search to those steps (``export`` is always kept).
    """
    specs = [get_step(n) for n in step_names()]
    with_space = {s.name: s for s in specs if s.space is not None}
    if methods is not None:
        wanted = [m.strip() for m in methods if m and m.strip()]
        unknown = [m for m in wanted if m not in with_space]
        if unknown:
            raise ConfigError(
                f"cannot search over {', '.join(repr(m) for m in unknown)}: the steps with a search space are "
                f"{', '.join(sorted(with_space))}.", where="--methods")
        keep = set(wanted) | set(ALWAYS)
        with_space = {n: s for n, s in with_space.items() if n in keep}
    out = [s for s in with_space.values() if s.targets is None or target in s.targets]
    return sorted(out, key=lambda s: (s.order, s.name))


def with_max_batches(config: Any, max_batches: int | None, *, only_unset: bool = False) -> Any:
    """``config`` with the batch cap of every fine-tune epoch (a field ``max_batches``, nested ones
    included: a pruning step's own ``finetune``) set to ``max_batches`` (``None``: whole epochs);
    with ``only_unset``, only the caps that are not set yet (a trial's proxy cap)."""
    if not dataclasses.is_dataclass(config) or isinstance(config, type):
        return config
    changes: dict[str, Any] = {}
    for f in dataclasses.fields(config):
        value = getattr(config, f.name)
        if f.name == "max_batches":
            if value != max_batches and not (only_unset and value is not None):
                changes[f.name] = max_batches
        elif dataclasses.is_dataclass(value) and not isinstance(value, type):
            changed = with_max_batches(value, max_batches, only_unset=only_unset)
            if changed is not value:
                changes[f.name] = changed
    return dataclasses.replace(config, **changes) if changes else config


def draw_recipe(
    trial: Any,
    target: str,
    *,
    methods: Iterable[str] | None = None,
    max_batches: int | None = None,
) -> Recipe:
    """Draw one recipe from ``trial`` (an ``optuna.Trial``, or anything with its ``suggest_*``).

    >>> import optuna
    >>> recipe = draw_recipe(optuna.trial.FixedTrial({"finetune.epochs": 0}), "ort-cpu", methods=["finetune"])
    >>> [s.name for s in recipe.steps]
    ['export']
    """
    steps: list[Step] = []
    state: set[str] = set()
    for spec in searchable_steps(target, methods):
        if spec.forbids & state or not spec.requires <= state:
            continue  # cannot follow what was drawn so far: not asked, so no parameter recorded
        assert spec.space is not None  # searchable_steps keeps only steps with a space
        config = spec.space(trial)
        if config is None:
            continue
        if not isinstance(config, spec.config):
            raise TypeError(f"the search space of step '{spec.name}' returned {type(config).__name__}, "
                            f"not its config {spec.config.__name__} (or None)")
        steps.append(Step(spec.name, config if max_batches is None else
                          with_max_batches(config, max_batches, only_unset=True)))
        state -= spec.clears
        state |= spec.sets
    recipe = Recipe(steps)
    recipe.validate(target)
    return recipe


def _levels(low: float, high: float, *, log: bool, n: int) -> list[float]:
    if high <= low:
        return [low]
    if log and low > 0:
        a, b = math.log(low), math.log(high)
        return [float(math.exp(a + (b - a) * i / (n - 1))) for i in range(n)]
    return [float(low + (high - low) * i / (n - 1)) for i in range(n)]


class GridTrial:
    """An ``optuna.Trial`` seen through a grid: each numeric parameter takes ``levels`` values.

    ``suggest_float`` / ``suggest_int`` become a choice among low, middle (geometric for a
    log scale) and high; categorical choices are kept. With Optuna's ``BruteForceSampler``
    this enumerates every combination of the conditional space, without repeats, without
    listing the (huge) product up front.
    """

    def __init__(self, trial: Any, levels: int = GRID_LEVELS):
        self._trial = trial
        self._levels = levels

    def suggest_float(self, name: str, low: float, high: float, *, step: float | None = None,
                      log: bool = False) -> float:
        values = _levels(low, high, log=log, n=self._levels)
        if step:
            values = [min(high, low + round((v - low) / step) * step) for v in values]
        return self._trial.suggest_categorical(name, sorted(set(values)))

    def suggest_int(self, name: str, low: int, high: int, *, step: int = 1, log: bool = False) -> int:
        values = [low + round((v - low) / step) * step for v in _levels(low, high, log=log, n=self._levels)]
        return int(self._trial.suggest_categorical(name, sorted({int(min(high, v)) for v in values})))

    def suggest_categorical(self, name: str, choices: Sequence[Any]) -> Any:
        return self._trial.suggest_categorical(name, choices)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._trial, name)


# ----------------------------------------------------------------------------- warm start


class _StopProbe(Exception):
    pass


class _Probe:
    """A stand-in trial that answers the first ``suggest_*`` with its ``first``-th option
    (a categorical's choices; a number's low or high end) and every later one with the first."""

    number = 0
    params: dict[str, Any] = {}
    user_attrs: dict[str, Any] = {}

    def __init__(self, first: int):
        self.first = first
        self.calls: list[tuple[str, Any]] = []

    def _answer(self, name: str, options: Sequence[Any]) -> Any:
        if self.calls:
            value = options[0]
        elif self.first < len(options):
            value = options[self.first]
        else:
            raise _StopProbe
        self.calls.append((name, value))
        return value

    def suggest_categorical(self, name: str, choices: Sequence[Any]) -> Any:
        return self._answer(name, list(choices))

    def suggest_int(self, name: str, low: int, high: int, **kw: Any) -> int:
        return self._answer(name, [low, high])

    def suggest_float(self, name: str, low: float, high: float, **kw: Any) -> float:
        return self._answer(name, [low, high])


def off_switch(spec: StepSpec) -> tuple[str, Any, Any] | None:
    """``(parameter, off value, on value)`` of ``spec``'s step, found by asking its space.

    A space that returns ``None`` right after its first suggestion has an off switch (e.g.
    ``prune_structured.on = False``, ``finetune.epochs = 0``); one that always returns a config
    (``export``) has none.
    """
    if spec.space is None:
        return None
    off = on = None
    for first in range(16):
        probe = _Probe(first)
        try:
            config = spec.space(probe)
        except _StopProbe:
            break
        except Exception:  # a space that needs more than a trial's suggest_* cannot be probed
            return None
        if config is None and len(probe.calls) == 1:
            off = off or probe.calls[0]
        elif config is not None and probe.calls:
            on = on or probe.calls[0]
    if off is None or on is None or off[0] != on[0]:
        return None
    return off[0], off[1], on[1]


def is_training_step(spec: StepSpec) -> bool:
    """A step that only trains (fine-tune, distillation): it leaves no state flag behind."""
    return isinstance(spec.config, type) and issubclass(spec.config, TrainConfig) and not spec.sets


def on_the_file(spec: StepSpec) -> bool:
    """A step that works on the exported ONNX file (ONNX Runtime's INT8): it exports or needs the export."""
    return "exported" in spec.requires or "exported" in spec.sets


def warm_start(target: str, methods: Iterable[str] | None = None, *, limit: int | None = None,
               seed: int = 0) -> list[dict[str, Any]]:
    """Parameters of the first trials: the reference, then each compression step alone.

    The reference switches every compression step off: the input model through the same
    fine-tune, export and measurement, a point within any accuracy budget that anchors the
    front. Then each compression step alone (the others off) measures every method on its own
    before the sampler combines them (Optuna's ``enqueue_trial``), the quick steps on the exported
    file first. Fine-tuning steps stay free,
    so the sampler still decides how each one recovers. ``limit`` caps the number of these
    trials (the methods tried alone are then a subset chosen by ``seed``).
    """
    import random

    specs = searchable_steps(target, methods)
    switches = {s.name: off_switch(s) for s in specs if not is_training_step(s)}  # training steps stay free
    switches = {n: sw for n, sw in switches.items() if sw is not None}
    if not switches:
        return []
    # a step that clears a flag finishes an earlier step's work (the sparse format after pruning
    # masks): it is switched off in these trials but not tried alone
    names = [s.name for s in specs if s.name in switches and not s.clears]
    # the steps on the exported file (INT8) first: they take seconds, so even a search stopped by
    # its timeout after a few trials has tried them (the sampler never sees the order)
    order = {s.name: (not on_the_file(s), s.order) for s in specs}
    if limit is not None and len(names) > limit - 1:
        names = random.Random(seed).sample(names, max(limit - 1, 0))
    names = sorted(names, key=lambda n: order[n])
    reference = {sw[0]: sw[1] for sw in switches.values()}
    return [reference] + [{sw[0]: sw[2] if other == name else sw[1] for other, sw in switches.items()}
                          for name in names]
