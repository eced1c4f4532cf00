"""Conformance checks every registered recipe step passes: slimkit's own suite and plugins run the same.

``tests/test_conformance.py`` runs them on every name :func:`step_names` lists, so a new method
gets them by registering. A plugin author runs them on a step of their own::

    from slimkit.data import load_data
    from slimkit.testing import check_step, step_case, train_model

    data = load_data("digits")
    model = train_model(step_case("my_step").model, data)
    checked = check_step("my_step", model, data, tmp_dir)  # AssertionError naming what failed

What a step must do (each check raises ``AssertionError`` with the reason):

1. its config, the default one and those its search space draws, round-trips through YAML
   (:func:`check_config_yaml`);
2. its search space draws valid configs, in recipes that validate (:func:`check_space`);
3. run through the real pipeline (:func:`run_case`), the ONNX artifact agrees with the torch
   model (:func:`check_artifact`) and the model saved with ``save_model`` loads again with the
   same outputs (:func:`check_reload`);
4. the figures its report carries are those measured on the artifact and the returned model
   (:func:`check_report_figures`, by key name: ``onnx_bytes``, ``int8_ops``, ``params``...).

A step runs with its default config, training capped by :func:`quick`, on ``lenet5``, after the
steps that give it the state it needs (:func:`prerequisites`). A step whose defaults cannot run
gets an entry in :data:`STEP_CASES`: the smallest valid config and model for it.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import yaml
from torch import nn

from ..config import config_from_dict, config_to_dict
from ..data import DataBundle
from ..models import create_model, load_model, save_model, set_origin

# The step registry: the one import of it in this package (it moves with the spine).
from ..pipeline import Recipe, Step, StepSpec, get_step, step_names

__all__ = [
    "TinyMLP",
    "TinyCNN",
    "tiny_mlp",
    "tiny_cnn",
    "train_model",
    "StepCase",
    "STEP_CASES",
    "DEFAULT_MODEL",
    "MODELS",
    "step_case",
    "case_target",
    "prerequisites",
    "quick",
    "case_recipe",
    "draw_configs",
    "check_config_yaml",
    "check_space",
    "CaseRun",
    "run_case",
    "check_artifact",
    "check_reload",
    "check_report_figures",
    "check_step",
]

DEFAULT_MODEL = "zoo:lenet5"  # conv and linear layers: every built-in method has work to do on it
# The models a step without a STEP_CASES entry runs on: lenet5, and a CNN with batch norms and a
# residual add (what compression breaks most often).
MODELS = (DEFAULT_MODEL, "slimkit.testing:tiny_cnn")


# ----------------------------------------------------------------------------- toy models


class TinyMLP(nn.Module):
    """Two linear layers: the smallest model a linear-layer method can work on.

    >>> model = TinyMLP((1, 8, 8), 10)
    >>> model(*model.example_inputs()).shape
    torch.Size([2, 10])
    """

    def __init__(self, input_shape: Sequence[int] = (1, 8, 8), num_classes: int = 10, hidden: int = 32):
        super().__init__()
        self.input_shape = tuple(input_shape)
        self.fc1 = nn.Linear(math.prod(self.input_shape), hidden)
        self.relu = nn.ReLU()
        self.fc2 = nn.Linear(hidden, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.relu(self.fc1(x.flatten(1))))  # (N, C*H*W) -> (N, classes)

    def example_inputs(self, batch: int = 2) -> tuple[torch.Tensor]:
        return (torch.randn(batch, *self.input_shape),)


class TinyCNN(nn.Module):
    """Conv-BN-ReLU, a residual block (two convs tied by an add), pooling, a linear classifier:
    the structures compression breaks most often (batch norms to fold, channels tied by an add).

    >>> model = TinyCNN((1, 8, 8), 10)
    >>> model(*model.example_inputs()).shape
    torch.Size([2, 10])
    """

    def __init__(self, input_shape: Sequence[int] = (1, 8, 8), num_classes: int = 10, width: int = 16):
        super().__init__()
        self.input_shape = tuple(input_shape)
        self.conv1 = nn.Conv2d(self.input_shape[0], width, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, width, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(width)
        self.relu = nn.ReLU()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(width, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.relu(x + self.bn2(self.conv2(x)))  # the residual add ties conv1's and conv2's channels
        return self.fc(self.pool(x).flatten(1))  # (N, width, 1, 1) -> (N, width) -> (N, classes)

    def example_inputs(self, batch: int = 2) -> tuple[torch.Tensor]:
        return (torch.randn(batch, *self.input_shape),)


def tiny_mlp(input_shape: Sequence[int] = (1, 8, 8), num_classes: int = 10) -> TinyMLP:
    """The factory behind the model spec ``slimkit.testing:tiny_mlp``."""
    return TinyMLP(input_shape, num_classes)


def tiny_cnn(input_shape: Sequence[int] = (1, 8, 8), num_classes: int = 10) -> TinyCNN:
    """The factory behind the model spec ``slimkit.testing:tiny_cnn``."""
    return TinyCNN(input_shape, num_classes)


def train_model(spec: str, data: DataBundle, *, epochs: int = 8, seed: int = 0) -> nn.Module:
    """A model built from ``spec`` (``zoo:lenet5``, ``slimkit.testing:tiny_cnn``...) and trained on
    ``data``, remembering its spec so that a saved copy loads again."""
    from ..models import build_model
    from ..training import TrainConfig, fit

    torch.manual_seed(seed)
    model = build_model(spec, input_shape=data.input_shape, num_classes=data.num_classes)
    set_origin(model, spec, data.input_shape, data.num_classes)
    fit(model, data, TrainConfig(epochs=epochs, batch_size=32, lr=2e-3, seed=seed))
    return model.eval()


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
        base = config_from_dict(get_step(name).config, body or {}, where=f"prerequisite '{name}'")
        items.append(_item(name, quick(base)))
    cfg = quick(config_from_dict(spec.config, case.config, where=f"the case of '{spec.name}'"))
    items.append(_item(spec.name, cfg))
    recipe = Recipe.from_data(items, source=f"the conformance case of '{spec.name}'")
    recipe.validate(target)
    return recipe


# ----------------------------------------------------------------------------- 1 and 2: configs and spaces


def check_config_yaml(step: str | StepSpec, config: Any) -> Recipe:
    """``config`` survives YAML (as a config and inside a recipe after its prerequisites); returns
    that recipe, read back."""
    spec = _spec(step)
    text = yaml.safe_dump(config_to_dict(config), sort_keys=False)
    again = config_from_dict(spec.config, yaml.safe_load(text), where=f"'{spec.name}' read back from YAML")
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

    from ..search import draw_recipe

    spec = _spec(step)
    target = case_target(spec)
    drawn: list[Any] = []
    in_recipes = 0
    for seed, cfg in draw_configs(spec, seeds):
        if cfg is None:
            continue
        where = f"step '{spec.name}', seed {seed}"
        assert isinstance(cfg, spec.config), f"{where}: the space returned {type(cfg).__name__}, not {spec.config.__name__}"
        rebuilt = type(cfg)(**{f.name: getattr(cfg, f.name) for f in dataclasses.fields(cfg) if f.init})
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
    from ..api import apply
    from ..measure import Target

    spec = _spec(step)
    case = case or step_case(spec)
    recipe = case_recipe(spec, case)
    target = case_target(spec, case)
    res = apply(recipe, model, data, target=Target(target, batch_sizes=(1,), threads=1, max_seconds=0.05,
                                                   layers=False), baseline=False, out=out)
    return CaseRun(spec.name, case, recipe, target, model, res, Path(out))


def _integer_artifact(path: Path) -> bool:
    from ..measure import count_ops
    from ..methods.quantize import int8_ops

    ops = count_ops(path)
    return bool(int8_ops(path)) or any(op in ops for op in ("QuantizeLinear", "DynamicQuantizeLinear"))


def _leaves_quantized(recipe: Recipe) -> bool:
    state: set[str] = set()
    for s in recipe.steps:
        spec = get_step(s.name)
        state = (state - spec.clears) | spec.sets
    return "quantized" in state


def _least_agreement(recipe: Recipe) -> float:
    return min([float(getattr(s.config, "min_agreement")) for s in recipe.steps
                if hasattr(s.config, "min_agreement")] or [0.99])


def check_artifact(run: CaseRun, data: DataBundle, samples: int = 256) -> dict[str, Any]:
    """The exported artifact agrees with the returned torch model on test examples: a float
    artifact of a float model computes the same logits; an integer artifact, or the export of a
    quantized torch model (``torch-cpu`` int8 kernels), the same classes on at least the recipe's
    ``min_agreement``. Returns the parity measured."""
    from ..export import parity

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


# ----------------------------------------------------------------------------- 4: the reported figures


ACC_TOL = 1e-6  # accuracies: a report may hold a float32 mean; one test example is ~3e-3 on digits


def _same(got: Any, want: Any, what: str, *, tol: float = 0.0) -> None:
    ok = got == want if tol == 0 else math.isclose(float(got), float(want), rel_tol=0, abs_tol=tol)
    assert ok, f"{what}: the report says {got!r}, the artifact / model gives {want!r}"


class _Figures:
    """What the figures of a step's report are checked against, computed once each."""

    def __init__(self, run: CaseRun, data: DataBundle):
        self.run, self.data = run, data
        self._cache: dict[str, Any] = {}

    def _get(self, key: str, fn: Any) -> Any:
        if key not in self._cache:
            self._cache[key] = fn()
        return self._cache[key]

    @property
    def unchanged_input(self) -> bool:
        """Whether the step saw the input model as given (no prerequisite changed it first)."""
        return all(get_step(s.name).requires or "exported" in get_step(s.name).sets
                   for s in self.run.recipe.steps[:-1])

    def params(self) -> dict[str, int]:
        from ..measure import count_params

        return self._get("params", lambda: count_params(self.run.model))

    def params_in(self) -> dict[str, int]:
        from ..measure import count_params

        return self._get("params_in", lambda: count_params(self.run.model_in))

    def macs(self) -> int:
        from ..measure import count_macs

        return self._get("macs", lambda: count_macs(self.run.model, self.data.input_shape))

    def macs_in(self) -> int:
        from ..measure import count_macs

        return self._get("macs_in", lambda: count_macs(self.run.model_in, self.data.input_shape))

    def accuracy(self, split: str) -> float:
        from ..training import evaluate

        return self._get(f"acc_{split}", lambda: evaluate(self.run.model, *self.data.split(split)))

    def accuracy_in(self) -> float:
        from ..training import evaluate

        return self._get("acc_in", lambda: evaluate(self.run.model_in, self.data.x_test, self.data.y_test))

    def artifact_accuracy(self) -> float:
        from ..export import ort_predict, ort_session

        def run() -> float:
            logits = ort_predict(ort_session(self.run.onnx_path, 1), self.data.x_test)
            return float((logits.argmax(1) == self.data.y_test.numpy()).mean())

        return self._get("acc_artifact", run)

    def int8_ops(self) -> dict[str, int]:
        from ..methods.quantize import int8_ops

        return self._get("int8_ops", lambda: int8_ops(self.run.onnx_path))

    def graph(self) -> dict[str, Any]:
        from ..measure import graph_stats

        return self._get("graph", lambda: graph_stats(self.run.onnx_path))

    def parity(self, samples: int) -> dict[str, Any]:
        from ..export import parity

        return self._get(f"parity_{samples}", lambda: parity(self.run.model, self.run.onnx_path,
                                                             self.data.x_test[:samples], threads=1))


def _module(model: nn.Module, name: str) -> nn.Module | None:
    try:
        return model.get_submodule(name)
    except AttributeError:
        return None


def _check_parity_figure(fig: _Figures, value: dict[str, Any], what: str) -> None:
    got = fig.parity(int(value["samples"]))
    _same(value["top1_agreement"], got["top1_agreement"], f"{what}.top1_agreement", tol=ACC_TOL)
    _same(value["max_abs_diff"], got["max_abs_diff"], f"{what}.max_abs_diff",
          tol=1e-6 * (1 + abs(got["max_abs_diff"])))


def check_report_figures(run: CaseRun, data: DataBundle) -> list[str]:
    """Check each figure of the step's report that can be measured again, by key name, against
    the artifact (``onnx_bytes``, ``sparse_bytes``, ``int8_ops``, ``parity``...) or the returned
    model (``params``, ``nonzero_params``, ``macs``, ``best_val_accuracy``, ``layers``...).
    Returns the keys checked (``report.key``); a step with none to check fails."""
    fig = _Figures(run, data)
    checked: list[str] = []
    reports = run.step_reports
    artifact_keys = ("onnx_bytes", "sparse_bytes", "int8_ops", "parity", "agreement")
    # the report that made the final artifact: the last one naming an artifact figure
    made = max((i for i, r in enumerate(reports) if any(k in r for k in artifact_keys)), default=None)
    size = run.onnx_path.stat().st_size
    onnx_runtime = run.target == "ort-cpu"

    def mark(key: str, i: int) -> None:
        checked.append(f"{reports[i]['step']}.{key}")

    for i, r in enumerate(reports):
        label = f"step '{run.name}', report of '{r['step']}'"
        final = i == made
        reverted = r.get("applied") is False
        # ---- the artifact
        if final and isinstance(r.get("onnx_bytes"), int):
            _same(r["onnx_bytes"], size, f"{label}: onnx_bytes")
            mark("onnx_bytes", i)
        if final and isinstance(r.get("onnx_bytes"), dict) and {"float", "int8"} <= set(r["onnx_bytes"]):
            key = "float" if reverted else "int8"
            _same(r["onnx_bytes"][key], size, f"{label}: onnx_bytes.{key}")
            mark(f"onnx_bytes.{key}", i)
        if final and "sparse_bytes" in r:
            _same(r["sparse_bytes"], size, f"{label}: sparse_bytes")
            mark("sparse_bytes", i)
        if final and "sparse_initializers" in r:
            import onnx

            names = [t.values.name for t in onnx.load(str(run.onnx_path)).graph.sparse_initializer]
            value = r["sparse_initializers"]  # a count, or the names of the initializers stored sparse
            _same(sorted(value) if isinstance(value, list) else value, sorted(names) if isinstance(value, list)
                  else len(names), f"{label}: sparse_initializers")
            mark("sparse_initializers", i)
        if final and "int8_ops" in r and not reverted:
            _same(dict(r["int8_ops"]), fig.int8_ops(), f"{label}: int8_ops")
            mark("int8_ops", i)
            if "int8_op_count" in r:
                _same(r["int8_op_count"], sum(fig.int8_ops().values()), f"{label}: int8_op_count")
                mark("int8_op_count", i)
        if final and isinstance(r.get("parity"), dict):
            _check_parity_figure(fig, r["parity"], f"{label}: parity")
            mark("parity", i)
        if final and onnx_runtime and not reverted and isinstance(r.get("agreement"), dict) \
                and "max_abs_diff" in r["agreement"]:
            _check_parity_figure(fig, r["agreement"], f"{label}: agreement")  # torch model vs the artifact
            mark("agreement", i)
        # ---- the returned model (the step's own report; the export after it changes no weights)
        if i != 0:
            continue
        if isinstance(r.get("agreement"), dict) and "max_abs_diff" not in r["agreement"] and fig.unchanged_input:
            # torch vs torch (the step's runtime is the model itself): the input model vs the returned one
            n = int(r["agreement"]["samples"])
            with torch.no_grad():
                x = data.x_test[:n]
                same = (run.model_in.eval()(x).argmax(1) == run.model.eval()(x).argmax(1)).float().mean()
            _same(r["agreement"]["top1_agreement"], float(same), f"{label}: agreement.top1_agreement", tol=ACC_TOL)
            mark("agreement", i)
        for key in ("params", "nonzero_params"):
            if isinstance(r.get(key), int):
                _same(r[key], fig.params()[key], f"{label}: {key}")
                mark(key, i)
        if isinstance(r.get("params_after"), int):
            _same(r["params_after"], fig.params()["params"], f"{label}: params_after")
            mark("params_after", i)
        for key in ("macs", "macs_after"):
            if isinstance(r.get(key), int):
                _same(r[key], fig.macs(), f"{label}: {key}")
                mark(key, i)
        if fig.unchanged_input:
            for key, want in (("params_before", lambda: fig.params_in()["params"]),
                              ("nonzero_before", lambda: fig.params_in()["nonzero_params"]),
                              ("macs_before", fig.macs_in)):
                if isinstance(r.get(key), int):
                    _same(r[key], want(), f"{label}: {key}")
                    mark(key, i)
        for prefix, part in (("", r), ("finetune.", r.get("finetune"))):
            if isinstance(part, dict) and isinstance(part.get("best_val_accuracy"), float) and part.get("epochs_run"):
                _same(part["best_val_accuracy"], fig.accuracy("val"), f"{label}: {prefix}best_val_accuracy", tol=ACC_TOL)
                mark(f"{prefix}best_val_accuracy", i)
        if isinstance(r.get("fake_quant_test_accuracy"), float):
            _same(r["fake_quant_test_accuracy"], fig.accuracy("test"), f"{label}: fake_quant_test_accuracy", tol=ACC_TOL)
            mark("fake_quant_test_accuracy", i)
        acc = r.get("accuracy")
        if isinstance(acc, dict):
            after = "float" if reverted else ("int8" if "int8" in acc else "after")
            if after in acc:
                onnx_level = onnx_runtime and "agreement" in r and "max_abs_diff" in r["agreement"]
                want = fig.artifact_accuracy() if onnx_level else fig.accuracy("test")
                _same(acc[after], want, f"{label}: accuracy.{after}", tol=ACC_TOL)
                mark(f"accuracy.{after}", i)
            before = "float" if "float" in acc else "before"
            if before in acc and before != after and fig.unchanged_input:
                # an ONNX-level step measures its float artifact: torch may round one example differently
                tol = 1.5 / len(data.y_test) if onnx_runtime and "int8" in acc else ACC_TOL
                _same(acc[before], fig.accuracy_in(), f"{label}: accuracy.{before}", tol=tol)
                mark(f"accuracy.{before}", i)
        layers = r.get("layers")
        if isinstance(layers, dict):
            for name, row in layers.items():
                mod = _module(run.model, name)
                w = getattr(mod, "weight", None)
                if not isinstance(row, dict) or not isinstance(w, torch.Tensor):
                    continue
                if "params" in row:
                    _same(row["params"], w.numel(), f"{label}: layers.{name}.params")
                if "nonzero" in row:
                    _same(row["nonzero"], int(torch.count_nonzero(w.detach())), f"{label}: layers.{name}.nonzero")
                mark(f"layers.{name}", i)
        channels = r.get("channels")
        if isinstance(channels, dict):
            for name, pair in channels.items():
                mod = _module(run.model, name)
                n = getattr(mod, "out_channels", getattr(mod, "out_features", None))
                if isinstance(pair, (list, tuple)) and n is not None:
                    _same(pair[-1], n, f"{label}: channels.{name} (after)")
                    mark(f"channels.{name}", i)
        wb = r.get("weight_bytes")
        if isinstance(wb, dict) and isinstance(r.get("layers"), list) and "int8" in wb and not reverted:
            state = run.model.state_dict()
            int8 = sum(t.numel() * t.element_size() for k, t in state.items()
                       if t.dtype in (torch.int8, torch.uint8) and any(k.startswith(n + ".") for n in r["layers"]))
            _same(wb["int8"], int8, f"{label}: weight_bytes.int8")
            mark("weight_bytes.int8", i)
            if "float" in wb and fig.unchanged_input:
                dense = sum(run.model_in.get_submodule(n).weight.numel() * 4 for n in r["layers"])
                _same(wb["float"], dense, f"{label}: weight_bytes.float")
                mark("weight_bytes.float", i)
        if "packed_bytes" in r:
            extra = {k: Path(v) for k, v in run.result.report.get("files", {}).items()
                     if k not in ("onnx", "weights", "report")}
            assert len(extra) == 1, f"{label}: packed_bytes, but apply wrote {sorted(extra)} beside the model"
            _same(r["packed_bytes"], next(iter(extra.values())).stat().st_size, f"{label}: packed_bytes")
            mark("packed_bytes", i)
    # the spine's own figures of the result
    rep = run.result.report
    if isinstance(rep.get("parity"), dict) and "max_abs_diff" in rep["parity"]:
        _check_parity_figure(fig, rep["parity"], f"step '{run.name}': apply's parity")
        checked.append("apply.parity")
    result = rep.get("result") or {}
    if onnx_runtime and "artifact_bytes" in result:
        _same(result["artifact_bytes"], size, f"step '{run.name}': result.artifact_bytes")
        _same(result["params"], fig.graph()["params"], f"step '{run.name}': result.params")
        _same(result["nonzero_params"], fig.graph()["nonzero_params"], f"step '{run.name}': result.nonzero_params")
        checked.append("apply.result")
    step_own = [c for c in checked if not c.startswith("apply.")]
    assert step_own, (f"step '{run.name}': its report carries no figure that can be checked against the artifact "
                      f"or the returned model (keys: {sorted(run.report)})")
    return checked


# ----------------------------------------------------------------------------- all of it


def check_step(step: str | StepSpec, model: nn.Module, data: DataBundle, workdir: str | Path,
               case: StepCase | None = None) -> list[str]:
    """Every conformance check on one step, with ``model`` (trained on ``data``) as the input;
    ``workdir`` must not exist or be empty. Returns the report figures checked."""
    spec = _spec(step)
    workdir = Path(workdir)
    check_config_yaml(spec, spec.config() if case is None or not case.config
                      else config_from_dict(spec.config, case.config))
    if spec.space is not None:
        check_space(spec, model=model)
    run = run_case(spec, model, data, workdir / "run", case)
    check_artifact(run, data)
    check_reload(run, data, workdir / "reloaded.safetensors")
    return check_report_figures(run, data)
