"""Every registered recipe step passes the same conformance checks (:mod:`slimkit.testing`).

Parametrized over ``step_names()``: a new method is checked by registering. A step whose
defaults cannot run on lenet5 needs an entry in ``slimkit.testing.STEP_CASES``, else its tests
fail. Known failures of existing steps are listed in ``KNOWN`` (strict xfails: fixing one
makes its test fail until the entry is removed).
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

from slimkit import testing as conformance
from slimkit.testing import StepSpec, get_step, step_names  # the registry, through its one import site

STEPS = step_names()
SEARCHABLE = [n for n in STEPS if get_step(n).space is not None]

# (step, check) -> why an existing step fails that check; the check: yaml, space, artifact, reload, figures.
KNOWN: dict[tuple[str, str], str] = {}


def _params(names: list[str], check: str) -> list:
    return [pytest.param(n, marks=pytest.mark.xfail(strict=True, reason=KNOWN[(n, check)]))
            if (n, check) in KNOWN else n for n in names]


def _runs(check: str) -> list:
    """(step, model spec): each of MODELS, or the one model of the step's STEP_CASES entry."""
    out = []
    for n in STEPS:
        models = [conformance.STEP_CASES[n].model] if n in conformance.STEP_CASES else conformance.MODELS
        for m in models:
            marks = [pytest.mark.xfail(strict=True, reason=KNOWN[(n, check)])] if (n, check) in KNOWN else []
            out.append(pytest.param(n, m, marks=marks, id=f"{n}-{m.split(':')[-1]}"))
    return out


@pytest.fixture(scope="module", autouse=True)
def _quiet_optuna():
    import optuna

    level = optuna.logging.get_verbosity()
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    yield
    optuna.logging.set_verbosity(level)


@pytest.fixture(scope="module")
def case_model(trained, digits):
    """``case_model(spec)`` -> a fresh copy of that model trained on digits (zoo models via ``trained``)."""
    import copy

    others: dict[str, torch.nn.Module] = {}

    def get(spec: str) -> torch.nn.Module:
        if spec.startswith("zoo:"):
            name, *kw = spec[4:].split(",")
            kwargs = dict(pair.split("=", 1) for pair in kw)
            return trained(name, **{k: float(v) if "." in v else int(v) for k, v in kwargs.items()})[0]
        if spec not in others:
            others[spec] = conformance.train_model(spec, digits)
        return copy.deepcopy(others[spec]).eval()

    return get


@pytest.fixture(scope="module")
def case_run(case_model, digits, tmp_path_factory):
    """``case_run(step, model)`` -> its :class:`~slimkit.testing.CaseRun`, run once per module (a failure, too)."""
    runs: dict[tuple[str, str], conformance.CaseRun | Exception] = {}

    def get(name: str, model: str) -> conformance.CaseRun:
        key = (name, model)
        if key not in runs:
            try:
                case = conformance.step_case(name)
                out = tmp_path_factory.mktemp(f"conformance-{name}") / "run"
                runs[key] = conformance.run_case(name, case_model(model), digits, out, case)
            except Exception as e:  # every test of this run reports it
                runs[key] = e
        run = runs[key]
        if isinstance(run, Exception):
            raise run
        return run

    return get


# ----------------------------------------------------------------------------- 1. YAML


@pytest.mark.parametrize("name", _params(STEPS, "yaml"))
def test_config_round_trips_through_yaml(name):
    spec = get_step(name)
    case = conformance.step_case(name)
    configs = [spec.config(), conformance.quick(spec.config())] if not case.config else []
    configs.append(conformance.quick(conformance.case_recipe(name, case).steps[-1].config))
    if spec.space is not None:
        configs += [c for _, c in conformance.draw_configs(name, range(8)) if c is not None]
    for cfg in configs:
        recipe = conformance.check_config_yaml(name, cfg)
        assert recipe.steps[-1] == conformance.Step(name, cfg)


# ----------------------------------------------------------------------------- 2. search spaces


@pytest.mark.parametrize("name", _params(SEARCHABLE, "space"))
def test_search_space_draws_valid_configs(name, case_model):
    model = case_model(conformance.step_case(name).model)
    drawn = conformance.check_space(name, model=model)
    assert drawn and all(isinstance(c, get_step(name).config) for c in drawn)


# ----------------------------------------------------------------------------- 3. apply, export, parity, reload


@pytest.mark.parametrize("name,model", _runs("artifact"))
def test_apply_exports_an_artifact_that_agrees_with_the_model(name, model, case_run, digits):
    run = case_run(name, model)
    assert [r["step"] for r in run.step_reports][0] == name
    got = conformance.check_artifact(run, digits)
    assert got["samples"] == 256
    assert run.model_in is not run.model  # apply worked on a copy


@pytest.mark.parametrize("name,model", _runs("reload"))
def test_saved_model_reloads_with_the_same_outputs(name, model, case_run, digits, tmp_path):
    run = case_run(name, model)
    again = conformance.check_reload(run, digits, tmp_path / "model.safetensors")
    assert type(again) is type(run.model)


# ----------------------------------------------------------------------------- 4. reported figures


@pytest.mark.parametrize("name,model", _runs("figures"))
def test_reported_figures_match_the_artifact(name, model, case_run, digits):
    run = case_run(name, model)
    checked = conformance.check_report_figures(run, digits)
    assert any(c.startswith(f"{name}.") or c.startswith("export") for c in checked), checked


# ----------------------------------------------------------------------------- the suite itself


@dataclasses.dataclass
class _NeedsStudent:
    student: str

    def __post_init__(self) -> None:
        assert self.student


def _needs_student_step(ctx, cfg):
    return {}


def test_a_step_that_cannot_run_with_its_defaults_fails_without_a_case():
    spec = StepSpec("needs_student", _NeedsStudent, _needs_student_step)
    with pytest.raises(AssertionError, match=r"'needs_student' has no runnable case.*STEP_CASES"):
        conformance.step_case(spec)
    case = conformance.StepCase(config={"student": "zoo:lenet300"})
    assert conformance.step_case(spec, {"needs_student": case}) is case


def test_prerequisites_come_from_the_flags():
    assert conformance.prerequisites("store_sparse") == ["prune_unstructured", "export"]
    assert conformance.prerequisites("quantize_static") == []
    assert conformance.case_target("quantize_dynamic_torch") == "torch-cpu"
    assert [s.name for s in conformance.case_recipe("store_sparse").steps] == ["prune_unstructured", "export",
                                                                               "store_sparse"]


def test_quick_caps_training_everywhere_and_revalidates():
    from slimkit.methods.prune import Unstructured
    from slimkit.pipeline import Finetune

    cfg = conformance.quick(Unstructured(schedule="agp", finetune=Finetune(epochs=5)))
    assert (cfg.finetune.epochs, cfg.finetune.max_batches) == (1, 2)
    assert conformance.quick(Finetune(epochs=0)).epochs == 0


@pytest.mark.parametrize("factory", [conformance.tiny_mlp, conformance.tiny_cnn])
def test_toy_models_build_from_their_spec_and_export(factory, digits, tmp_path):
    from slimkit.export import export_onnx, parity
    from slimkit.models import load_model, save_model

    spec = f"slimkit.testing:{factory.__name__}"
    model = load_model(spec, input_shape=digits.input_shape, num_classes=digits.num_classes)
    (x,) = model.example_inputs()
    assert model(x).shape == (2, digits.num_classes)
    onnx = export_onnx(model, tmp_path / "m.onnx", x)
    assert parity(model, onnx, digits.x_test[:32])["max_abs_diff"] < 1e-4
    again = load_model(weights=save_model(model, tmp_path / "m.safetensors"),
                       input_shape=digits.input_shape, num_classes=digits.num_classes)
    assert torch.equal(again(x), model.eval()(x))


@pytest.mark.parametrize("name,key,where", [
    ("export", "onnx_bytes", -1),
    ("prune_unstructured", "nonzero_params", 0),
    ("quantize_static", "int8_op_count", 0),
])
def test_a_wrong_figure_in_a_report_fails_the_check(name, key, where, case_run, digits):
    import copy

    run = case_run(name, conformance.DEFAULT_MODEL)
    report = copy.deepcopy(run.result.report)
    report["steps"][where][key] += 1
    wrong = dataclasses.replace(run, result=dataclasses.replace(run.result, report=report))
    with pytest.raises(AssertionError, match=rf"{key}: the report says"):
        conformance.check_report_figures(wrong, digits)


def test_check_step_runs_every_check_on_a_plugin_style_model(digits, tmp_path):
    # what a plugin author runs: a model of their own (batch norms, a residual add), one call
    model = conformance.train_model("slimkit.testing:tiny_cnn", digits, epochs=2)
    checked = conformance.check_step("prune_structured", model, digits, tmp_path / "check")
    assert "prune_structured.params" in checked and "prune_structured.channels.conv1" in checked
    assert "apply.result.artifact_bytes" in checked
