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

A step runs with its default config, training capped by :func:`quick`, on each of :data:`MODELS`
(``lenet5``), after the steps that give it the state it needs (:func:`prerequisites`). A step
whose defaults cannot run gets an entry in :data:`STEP_CASES`: the smallest valid config and
model for it (it then runs on that model only).
"""

from ..pipeline import Recipe, Step, StepSpec, get_step, step_names
from ._cases import STEP_CASES, StepCase, case_recipe, case_target, prerequisites, quick, step_case
from ._checks import CaseRun, check_artifact, check_config_yaml, check_reload, check_space, draw_configs, run_case
from ._figures import ARTIFACT_RULES, MODEL_RULES, check_report_figures
from ._models import DEFAULT_MODEL, MODELS, TinyCNN, TinyMLP, tiny_cnn, tiny_mlp, train_model
from ._suite import check_step

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
    "ARTIFACT_RULES",
    "MODEL_RULES",
    "check_step",
    # the registry names the checks use, re-exported: tests import them from here
    "Recipe",
    "Step",
    "StepSpec",
    "get_step",
    "step_names",
]
