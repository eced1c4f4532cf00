"""Checks 1 to 3: configs round-trip, spaces draw valid configs, apply -> export -> parity -> reload."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import yaml
from torch import nn

from ..api import apply
from ..config import config_from_dict, config_to_dict
from ..data import DataBundle
from ..export import parity
from ..measure import Target, count_ops
from ..methods.quantize import int8_ops
from ..models import load_model, save_model
from ..pipeline import Recipe, Step, StepSpec, get_step
from ..search import draw_recipe
from ._cases import StepCase, _spec, case_recipe, case_target, prerequisites, quick, step_case

# ----------------------------------------------------------------------------- 1 and 2: configs and spaces


def check_config_yaml(step: str | StepSpec, config: Any) -> Recipe:
    """``config`` survives YAML (as a config and inside a recipe after its prerequisites); returns
    that recipe, read back."""
    spec = _spec(step)
    text = yaml.safe_dump(config_to_dict(config), sort_keys=False)
    again: Any = config_from_dict(spec.config, yaml.safe_load(text), where=f"'{spec.name}' read back from YAML")
    assert again == config, f"step '{spec.name}': the config changed through YAML:\n{config!r}\n-> {again!r}"
    steps = [Step(n, quick(get_step(n).config())) for n in prerequisites(spec)] + [Step(spec.name, config)]
    recipe = Recipe(steps)
    back = Recipe.from_data(yaml.safe_load(recipe.to_yaml()))
    assert back == recipe, f"step '{spec.name}': the recipe changed through YAML:\n{recipe.to_yaml()}"
    return back


def draw_configs(step: str | StepSpec, seeds: Iterable[int]) -> list[tuple[int, Any]]:
    """``(seed, config or None)``: the step's search space asked by a real Optuna trial per seed
    (``RandomSampler(seed=...)``); every parameter it draws is named ``"<step>.<name>"``."""
    import optuna

    spec = _spec(step)
    assert spec.space is not None, f"step '{spec.name}' has no search space"
    out = []
    for seed in seeds:
        trial = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=seed)).ask()
        config = spec.space(trial)
        stray = [p for p in trial.params if not p.startswith(f"{spec.name}.")]
        assert not stray, f"step '{spec.name}': its space draws {stray}, not prefixed '{spec.name}.'"
        out.append((seed, config))
    return out


def check_space(step: str | StepSpec, *, seeds: Iterable[int] = range(16), want: int = 4,
                model: nn.Module | None = None) -> list[Any]:
    """The step's search space draws valid configs: each an instance of its config class that
    passes ``__post_init__`` again, survives YAML, validates in a recipe after its prerequisites
    on the step's target (and fits ``model``); and :func:`slimkit.search.draw_recipe` puts the same
    config in a valid recipe. Stops after ``want`` configs; returns them."""
    import optuna


    spec = _spec(step)
    target = case_target(spec)
    drawn: list[Any] = []
    in_recipes = 0
    cfg: Any
    for seed, cfg in draw_configs(spec, seeds):
        if cfg is None:
            continue
        where = f"step '{spec.name}', seed {seed}"
        assert isinstance(cfg, spec.config), f"{where}: the space returned {type(cfg).__name__}, not {spec.config.__name__}"
        rebuilt = type(cfg)(**{f.name: getattr(cfg, f.name) for f in dataclasses.fields(spec.config) if f.init})
        assert rebuilt == cfg, f"{where}: validating the drawn config again changed it: {cfg!r} -> {rebuilt!r}"
        recipe = check_config_yaml(spec, cfg)
        recipe.validate(target)
        if model is not None:
            recipe.check_model(model)
        trial = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=seed)).ask()
        searched = draw_recipe(trial, target, methods=[spec.name])  # validates it
        assert Recipe.from_data(yaml.safe_load(searched.to_yaml())) == searched, f"{where}: {searched.to_yaml()}"
        mine = [s.config for s in searched.steps if s.name == spec.name]
        if mine:
            in_recipes += 1
            assert mine == [cfg], f"{where}: draw_recipe drew {mine} where the space alone drew {cfg!r}"
        drawn.append(cfg)
        if len(drawn) >= want:
            break
    assert drawn, f"step '{spec.name}': its search space returned None for every seed"
    assert in_recipes, f"step '{spec.name}': draw_recipe(methods=['{spec.name}']) never put it in a recipe on {target}"
    return drawn


# ----------------------------------------------------------------------------- 3: apply, export, parity, reload


@dataclass
class CaseRun:
    """One case run through :func:`slimkit.apply`: the input model (unchanged), the result (the
    returned model, its artifact, the report) and the output folder apply wrote."""

    name: str
    case: StepCase
    recipe: Recipe
    target: str
    model_in: nn.Module
    result: Any
    out: Path

    @property
    def model(self) -> nn.Module:
        return self.result.model

    @property
    def onnx_path(self) -> Path:
        return Path(self.result.onnx_path)

    @property
    def step_reports(self) -> list[dict[str, Any]]:
        """The step's report and any that follow it (the automatic export); prerequisites' left out."""
        reports = self.result.report["steps"]
        first = len(self.recipe.steps) - 1
        return reports[first:]

    @property
    def report(self) -> dict[str, Any]:
        """The step's own report."""
        return self.step_reports[0]


def run_case(step: str | StepSpec, model: nn.Module, data: DataBundle, out: str | Path,
             case: StepCase | None = None) -> CaseRun:
    """Run the step's case through the real pipeline (``slimkit.apply`` into ``out``): batch size
    1, one thread, latency capped at 0.05 s, no baseline."""

    spec = _spec(step)
    case = case or step_case(spec)
    recipe = case_recipe(spec, case)
    target = case_target(spec, case)
    res = apply(recipe, model, data, target=Target(target, batch_sizes=(1,), threads=1, max_seconds=0.05,
                                                   layers=False), budget=None, out=out)
    return CaseRun(spec.name, case, recipe, target, model, res, Path(out))


def _integer_artifact(path: Path) -> bool:

    ops = count_ops(path)
    return bool(int8_ops(path)) or any(op in ops for op in ("QuantizeLinear", "DynamicQuantizeLinear"))


def _leaves_quantized(recipe: Recipe) -> bool:
    state: set[str] = set()
    for s in recipe.steps:
        spec = get_step(s.name)
        state = (state - spec.clears) | spec.sets
    return "quantized" in state


def _least_agreement(recipe: Recipe) -> float:
    return min([float(s.config.min_agreement) for s in recipe.steps
                if hasattr(s.config, "min_agreement")] or [0.99])


def check_artifact(run: CaseRun, data: DataBundle, samples: int = 256) -> dict[str, Any]:
    """The exported artifact agrees with the returned torch model on test examples: a float
    artifact of a float model computes the same logits; an integer artifact, or the export of a
    quantized torch model (``torch-cpu`` int8 kernels), the same classes on at least the recipe's
    ``min_agreement``. Returns the parity measured."""

    path = run.onnx_path
    assert path.is_file() and path.stat().st_size > 0, f"step '{run.name}': no artifact at {path}"
    x = data.x_test[:samples]
    got = parity(run.model, path, x)
    if _integer_artifact(path) or _leaves_quantized(run.recipe):
        least = _least_agreement(run.recipe)
        assert got["top1_agreement"] >= least, (
            f"step '{run.name}': the artifact agrees with the torch model on {got['top1_agreement']:.1%} of "
            f"{got['samples']} test examples, below the recipe's min_agreement {least:.0%}")
    else:
        with torch.no_grad():
            scale = float(run.model.eval()(x).abs().max())
        assert got["max_abs_diff"] <= 1e-3 * (1 + scale), (
            f"step '{run.name}': the float artifact's logits differ from the torch model's by {got['max_abs_diff']:.3g}")
        assert got["top1_agreement"] >= 0.99, f"step '{run.name}': top-1 agreement {got['top1_agreement']:.1%}"
    return got


def check_reload(run: CaseRun, data: DataBundle, path: str | Path, *, samples: int = 128,
                 rtol: float = 1e-4, atol: float = 1e-5) -> nn.Module:
    """``save_model`` then ``load_model(weights=...)`` rebuilds the returned model: the same outputs
    on test examples. Returns the reloaded model."""
    path = save_model(run.model, path)
    again = load_model(weights=path, input_shape=data.input_shape, num_classes=data.num_classes)
    x = data.x_test[:samples]
    with torch.no_grad():
        want, got = run.model.eval()(x), again.eval()(x)
    assert got.shape == want.shape, f"step '{run.name}': the reloaded model returns {tuple(got.shape)}, not {tuple(want.shape)}"
    diff = float((got - want).abs().max())
    assert torch.allclose(got, want, rtol=rtol, atol=atol), (
        f"step '{run.name}': the reloaded model's outputs differ from the returned model's by up to {diff:.3g}")
    return again
