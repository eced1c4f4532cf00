"""``slimkit compress``: the best model within a budget, searched jointly across every method.

The search is an Optuna study (define-by-run): each trial draws a recipe from the spaces the
registered steps carry (:func:`slimkit.pipeline.register_space`), applies it for real, and is
judged on the exported artifact measured on the target. The budget is a set of hard
constraints; the objectives (latency, size, accuracy) give a Pareto front; the best feasible
trial by the chosen objective becomes ``best.onnx``.

>>> from slimkit.search import compress, worker  # doctest: +SKIP
>>> res = compress("zoo:lenet5", "digits", weights="runs/lenet5/model.safetensors",
...                max_accuracy_drop=0.01, trials=12, out="runs/lenet5-compress")  # doctest: +SKIP
"""

from ._run import CompressResult, compress, make_sampler, worker
from ._space import draw_recipe, searchable_steps
from ._study import OBJECTIVES, SAMPLERS, Budget, SearchConfig

__all__ = ["compress", "worker", "CompressResult", "Budget", "SearchConfig", "draw_recipe", "searchable_steps",
           "make_sampler", "OBJECTIVES", "SAMPLERS"]
