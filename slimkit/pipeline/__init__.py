"""The spine: recipes, the step registry, the context steps share, and :func:`apply_recipe`.

A recipe in YAML::

    steps:
      - finetune: {epochs: 3, lr: 0.001}
      - export: {}

Adding a method = one config dataclass, one handler, one registration (see
:func:`register_step`); the spine's own steps, ``finetune`` and ``export``, live here.

>>> recipe = Recipe.from_data([{"finetune": {"epochs": 1}}, "export"])
>>> [s.name for s in recipe.steps]
['finetune', 'export']
"""

from ._apply import ApplyResult, apply_recipe, time_side_by_side, write_result
from ._guard import AccuracyVerdict, check_max_drop, fits_in, training_hints
from ._context import Context, ExportTransform, SpeedVerdict, run_recipe
from ._speed import (IF_SLOWER, SLOWER_MARGIN, check_if_slower, judged_report, never_slower, side_by_side_rounds,
                     slower_at, time_models)
from ._recipe import (FLAGS, Recipe, Step, StepSpec, get_step, recipe_summary, register_space, register_step,
                      step_names)
from ._steps import Export, Finetune, export_step

__all__ = ["FLAGS", "Recipe", "Step", "StepSpec", "get_step", "step_names", "register_step", "register_space",
           "recipe_summary", "Context", "ExportTransform", "SpeedVerdict", "run_recipe", "apply_recipe", "ApplyResult", "write_result", "time_side_by_side",
           "Finetune", "Export", "export_step", "AccuracyVerdict", "check_max_drop", "training_hints", "fits_in",
           "IF_SLOWER", "SLOWER_MARGIN", "check_if_slower", "never_slower", "judged_report", "side_by_side_rounds", "slower_at", "time_models"]
