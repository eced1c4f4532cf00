"""Recipes: a list of steps, each a registered method name plus its config.

A recipe in YAML::

    steps:
      - finetune: {epochs: 3, lr: 0.001}
      - export: {}

Adding a method = one config dataclass, one handler, one registration::

    @register_step("finetune", Finetune, forbids={"exported"})
    def _finetune(ctx: Context, cfg: Finetune) -> dict: ...

Steps declare what state they need and leave behind (``requires`` / ``forbids`` /
``sets`` / ``clears`` of flags such as ``exported`` or ``quantized``), so a recipe in an
invalid order is rejected before any work starts, with the reason.

>>> recipe = Recipe.from_data([{"finetune": {"epochs": 1}}, "export"])
>>> [s.name for s in recipe.steps]
['finetune', 'export']
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from torch import nn

from .. import _io
from .._plugins import load_methods
from ..config import config_from_dict, config_to_dict
from ..errors import ConfigError, SlimkitError

__all__ = ["register_step", "register_space", "step_names", "get_step", "StepSpec", "Step", "Recipe", "FLAGS",
           "recipe_summary"]

# What each state flag means, for the messages that reject a recipe order.
FLAGS: dict[str, str] = {
    "exported": "the model has been exported to ONNX, so only steps that work on the ONNX file may follow",
    "quantized": "the model is quantized, so only steps that keep its integer form may follow",
    "fake_quant": "the model holds fake-quantization for quantization-aware training",
    "masked": "the model holds pruning masks",
}


@dataclass(frozen=True)
class StepSpec:
    name: str
    config: type
    handler: Callable[[Any, Any], dict[str, Any] | None]  # (Context, config) -> report
    requires: frozenset[str] = frozenset()
    forbids: frozenset[str] = frozenset()
    sets: frozenset[str] = frozenset()
    clears: frozenset[str] = frozenset()
    targets: frozenset[str] | None = None
    space: Callable[..., Any] | None = None
    order: int = 50
    reports_speed: bool = False  # its report holds a measured speed verdict (``faster``, ``speedup``, ``latency_ms``)

    @property
    def doc(self) -> str:
        doc = self.config.__doc__ or ""
        if doc.startswith(f"{self.config.__name__}("):  # the dataclass's generated signature
            doc = self.handler.__doc__ or ""
        return " ".join(doc.strip().split("\n\n")[0].split())


_STEPS: dict[str, StepSpec] = {}


def register_step(
    name: str,
    config: type,
    *,
    requires: Iterable[str] = (),
    forbids: Iterable[str] = (),
    sets: Iterable[str] = (),
    clears: Iterable[str] = (),
    targets: Iterable[str] | None = None,
    reports_speed: bool = False,
) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Register ``handler(ctx, config) -> report dict`` as recipe step ``name``.

    ``reports_speed``: the step times its artifact against the one before it and says in its
    report whether it is ``faster`` (with ``speedup`` and ``latency_ms``); the search shows it.
    """
    if not dataclasses.is_dataclass(config):
        raise TypeError(f"step '{name}': config must be a dataclass")
    for flag in (*requires, *forbids, *sets, *clears):
        if flag not in FLAGS:
            raise ValueError(f"step '{name}': unknown state flag '{flag}' (known: {', '.join(FLAGS)})")

    def deco(handler: Callable[..., Any]) -> Callable[..., Any]:
        _STEPS[name] = StepSpec(
            name, config, handler, frozenset(requires), frozenset(forbids), frozenset(sets), frozenset(clears),
            frozenset(targets) if targets is not None else None, reports_speed=reports_speed,
        )
        return handler

    return deco


def register_space(name: str, *, order: int) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Attach a search space to the registered step ``name``; declare it next to the config.

    ``fn(trial) -> config | None`` draws the step's config from an ``optuna.Trial`` (``None``:
    leave the step out of this trial). Parameter names must be prefixed with the step name
    (``"prune_structured.ratio"``). ``order`` places the step in the canonical order the
    search composes recipes in (lower runs first): architecture changes ~10, decomposition
    ~20, structured pruning ~30, unstructured pruning ~40, fine-tune/distill ~60,
    quantization-aware training ~70, export 80, ONNX-level quantization ~90.
    """

    def deco(fn: Callable[..., Any]) -> Callable[..., Any]:
        spec = _STEPS[name]  # the step registers first, in the same module
        _STEPS[name] = dataclasses.replace(spec, space=fn, order=order)
        return fn

    return deco


def _ensure_registered() -> None:
    load_methods()  # importing the methods registers their steps


def step_names() -> list[str]:
    _ensure_registered()
    return sorted(_STEPS)


def get_step(name: str) -> StepSpec:
    _ensure_registered()
    if name not in _STEPS:
        raise ConfigError(f"unknown step '{name}'; known steps: {', '.join(sorted(_STEPS))}")
    return _STEPS[name]


@dataclass
class Step:
    name: str
    config: Any

    def to_data(self) -> dict[str, Any]:
        return {self.name: config_to_dict(self.config)}


@dataclass
class Recipe:
    steps: list[Step] = field(default_factory=list)

    @classmethod
    def from_data(cls, data: Any, source: str = "recipe") -> "Recipe":
        """Build from parsed YAML: a list of steps, or a mapping with a ``steps`` list."""
        if isinstance(data, dict):
            unknown = set(data) - {"steps"}
            if unknown:
                raise ConfigError(f"unknown top-level key(s) {sorted(map(str, unknown))}; a recipe holds 'steps'", where=source)
            data = data.get("steps")
        if not isinstance(data, list) or not data:
            raise ConfigError("a recipe is a non-empty list of steps, e.g. [{finetune: {epochs: 3}}, export]", where=source)
        steps = []
        for i, item in enumerate(data, 1):
            body: Any
            if isinstance(item, str):
                name, body = item, {}
            elif isinstance(item, dict) and len(item) == 1:
                name, body = next(iter(item.items()))
                body = body or {}
            else:
                raise ConfigError(f"each step is a name or a one-key mapping 'name: {{fields}}', got {item!r}",
                                  where=f"{source} step {i}")
            where = f"{source} step {i} '{name}'"
            try:
                spec = get_step(str(name))
            except ConfigError as e:
                raise e.located(f"{source} step {i}") from None
            if not isinstance(body, dict):
                raise ConfigError(f"the config must be a mapping of fields, got {body!r}", where=where)
            steps.append(Step(spec.name, config_from_dict(spec.config, body, where=where)))
        recipe = cls(steps)
        recipe.validate()
        return recipe

    @classmethod
    def load(cls, path: str | Path) -> "Recipe":
        path = Path(path)

        def parse(p: Path) -> Any:
            try:
                return yaml.safe_load(p.read_text(encoding="utf-8"))
            except yaml.YAMLError as e:
                raise SlimkitError(f"recipe {p} is not valid YAML: {e}") from None

        data = _io.read_file(path, "recipe", parse, expected="give a YAML file with a list of steps")
        return cls.from_data(data, source=f"recipe {path.name}")

    @classmethod
    def coerce(cls, recipe: "Recipe | str | Path | list | dict") -> "Recipe":
        if isinstance(recipe, Recipe):
            return recipe
        if isinstance(recipe, (list, dict)):
            return cls.from_data(recipe)
        return cls.load(recipe)

    def to_data(self) -> dict[str, Any]:
        return {"steps": [s.to_data() for s in self.steps]}

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_data(), sort_keys=False)

    def check_model(self, model: nn.Module) -> None:
        """Run each config's ``check_model(model)`` (e.g. layer names exist), before any work."""
        for i, step in enumerate(self.steps, 1):
            check_model = getattr(step.config, "check_model", None)
            if callable(check_model):
                try:
                    check_model(model)
                except ConfigError as e:
                    raise e.located(f"recipe step {i} '{step.name}'") from None

    def validate(self, target: str | None = None, initial: Iterable[str] = ()) -> None:
        """Reject an invalid order (or a step the target cannot run) before any work, saying why."""
        state: dict[str, str] = {flag: "the input model" for flag in initial}
        for i, step in enumerate(self.steps, 1):
            spec = get_step(step.name)
            where = f"recipe step {i} '{step.name}'"
            for flag in spec.forbids:
                if flag in state:
                    raise ConfigError(
                        f"cannot come after {state[flag]}: {FLAGS[flag]}. Move '{step.name}' earlier.", where=where)
            for flag in spec.requires:
                if flag not in state:
                    raise ConfigError(f"needs a step before it that leaves the model {flag} ({FLAGS[flag]}).",
                                      where=where)
            if target is not None and spec.targets is not None and target not in spec.targets:
                raise ConfigError(f"runs only for target(s) {', '.join(sorted(spec.targets))}, not '{target}'.",
                                  where=where)
            for flag in spec.clears:
                state.pop(flag, None)
            for flag in spec.sets:
                state[flag] = f"step {i} '{step.name}'"


def recipe_summary(recipe: dict[str, Any] | Recipe, params: dict[str, Any] | None = None) -> str:
    """``prune_structured(ratio=0.41) > finetune(epochs=2, lr=0.0006) > export``: the drawn values.

    >>> recipe_summary({"steps": [{"finetune": {}}, {"export": {}}]}, {"finetune.epochs": 2})
    'finetune(epochs=2) > export'
    """
    data = recipe.to_data() if isinstance(recipe, Recipe) else recipe
    parts = []
    for item in data.get("steps", []):
        name = next(iter(item))
        drawn = {k.split(".", 1)[1]: v for k, v in (params or {}).items()
                 if k.startswith(name + ".") and not k.endswith(".on")}
        inner = ", ".join(f"{k}={_short(v)}" for k, v in drawn.items())
        parts.append(f"{name}({inner})" if inner else name)
    return " > ".join(parts)


def _short(v: Any) -> str:
    return f"{v:.3g}" if isinstance(v, float) else str(v)
