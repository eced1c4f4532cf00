"""How each registered step runs in the conformance suite: its target, prerequisites, capped config."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from ..config import config_from_dict, config_to_dict
from ..pipeline import Recipe, StepSpec, get_step, step_names
from ._models import DEFAULT_MODEL

# ----------------------------------------------------------------------------- how each step runs


@dataclass(frozen=True)
class StepCase:
    """How one step runs in the conformance checks.

    ``config``: fields set on the step's default config (YAML data, e.g. ``{"student": "zoo:lenet300"}``);
    ``model``: the model spec it runs on (trained first); ``target``: the runtime (``None``:
    :func:`case_target`); ``before``: recipe items run before it (``None``: :func:`prerequisites`).
    """

    config: dict[str, Any] = field(default_factory=dict)
    model: str = DEFAULT_MODEL
    target: str | None = None
    before: tuple[Any, ...] | None = None


# The smallest valid config and model of each step whose defaults cannot run on DEFAULT_MODEL.
# Every built-in step runs with its defaults; a new step whose config has required fields, or
# that needs another model, adds its entry here (a plugin: ``STEP_CASES["my_step"] = StepCase(...)``).
STEP_CASES: dict[str, StepCase] = {}


def _spec(step: str | StepSpec) -> StepSpec:
    return step if isinstance(step, StepSpec) else get_step(step)


def case_target(step: str | StepSpec, case: StepCase | None = None) -> str:
    """The runtime a step runs on in the checks: the case's, else ``ort-cpu`` where the step runs
    there, else the first target it names (``quantize_dynamic_torch``: ``torch-cpu``)."""
    spec = _spec(step)
    if case is not None and case.target is not None:
        return case.target
    if spec.targets is None or "ort-cpu" in spec.targets:
        return "ort-cpu"
    return sorted(spec.targets)[0]


def prerequisites(step: str | StepSpec, target: str | None = None) -> list[str]:
    """The steps that must run before ``step``, in search order: for each flag it ``requires``
    (``exported``: ``export``) or ``clears`` (``masked``: ``prune_unstructured``, whose work the step
    finishes), the registered step that sets that flag with the least else, runs on ``target`` and
    needs nothing itself.

    >>> prerequisites("store_sparse")
    ['prune_unstructured', 'export']
    """
    spec = _spec(step)
    target = target or case_target(spec)
    chosen: dict[str, StepSpec] = {}
    for flag in sorted(spec.requires | spec.clears):
        providers = [get_step(n) for n in step_names() if n != spec.name]
        providers = [p for p in providers if flag in p.sets and not p.requires
                     and (p.targets is None or target in p.targets)]
        if not providers:
            if flag in spec.requires:
                raise AssertionError(f"step '{spec.name}' requires the flag '{flag}', which no registered step "
                                     f"running on {target} sets without needing another; add a StepCase with "
                                     f"'before' to slimkit.testing.STEP_CASES")
            continue  # a flag it clears but nothing sets: it has nothing to finish
        best = min(providers, key=lambda p: (len(p.sets), p.order, p.name))
        chosen[best.name] = best
    return [s.name for s in sorted(chosen.values(), key=lambda s: (s.order, s.name))]


def quick(config: Any, *, epochs: int = 1, max_batches: int = 2) -> Any:
    """``config`` with its training capped, so a check takes seconds: fields named ``epochs`` or
    ``*_epochs`` at most ``epochs`` (0 stays 0), ``max_batches`` at most ``max_batches``, nested
    configs too (a pruning step's own ``finetune``). The copy is validated again.

    >>> from slimkit.methods.coding import DeepCompression
    >>> c = quick(DeepCompression())
    >>> c.prune_epochs, c.share_epochs, c.max_batches
    (1, 1, 2)
    """
    if not dataclasses.is_dataclass(config) or isinstance(config, type):
        return config
    changes: dict[str, Any] = {}
    for f in dataclasses.fields(config):
        if not f.init:
            continue
        value = getattr(config, f.name)
        is_int = isinstance(value, int) and not isinstance(value, bool)
        if (f.name == "epochs" or f.name.endswith("_epochs")) and is_int and value > epochs:
            changes[f.name] = epochs
        elif f.name == "max_batches" and (value is None or (is_int and value > max_batches)):
            changes[f.name] = max_batches
        elif dataclasses.is_dataclass(value) and not isinstance(value, type):
            capped = quick(value, epochs=epochs, max_batches=max_batches)
            if capped is not value:
                changes[f.name] = capped
    return dataclasses.replace(config, **changes) if changes else config


def step_case(step: str | StepSpec, cases: dict[str, StepCase] | None = None) -> StepCase:
    """The case a step runs with: its entry in ``cases`` (default :data:`STEP_CASES`), else its
    defaults on :data:`DEFAULT_MODEL`. A step whose default config cannot be built and that has
    no entry fails here, saying so: every registered step must have a way to run."""
    spec = _spec(step)
    cases = STEP_CASES if cases is None else cases
    if spec.name in cases:
        return cases[spec.name]
    try:
        spec.config()
    except Exception as e:  # required fields, or defaults its own validation rejects
        raise AssertionError(
            f"step '{spec.name}' has no runnable case: its config {spec.config.__name__} cannot be built from its "
            f"defaults ({type(e).__name__}: {e}); add the smallest valid config and model for it to "
            f"slimkit.testing.STEP_CASES") from None
    return StepCase()


def _item(name: str, config: Any) -> dict[str, Any]:
    return {name: config_to_dict(config)}


def case_recipe(step: str | StepSpec, case: StepCase | None = None) -> Recipe:
    """The recipe a case runs: its prerequisites (default configs), then the step, training capped."""
    spec = _spec(step)
    case = case or step_case(spec)
    target = case_target(spec, case)
    before = list(case.before) if case.before is not None else prerequisites(spec, target)
    items: list[Any] = []
    for item in before:
        name, body = (item, {}) if isinstance(item, str) else next(iter(item.items()))
        base: Any = config_from_dict(get_step(name).config, body or {}, where=f"prerequisite '{name}'")
        items.append(_item(name, quick(base)))
    cfg = quick(config_from_dict(spec.config, case.config, where=f"the case of '{spec.name}'"))
    items.append(_item(spec.name, cfg))
    recipe = Recipe.from_data(items, source=f"the conformance case of '{spec.name}'")
    recipe.validate(target)
    return recipe


