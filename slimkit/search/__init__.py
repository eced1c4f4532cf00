"""``slimkit compress``: the best model within a budget, searched jointly across every method;
and the public study kit that every search (``compress``, :func:`slimkit.nas.nas`) runs on.

The search is an Optuna study (define-by-run): each trial draws a recipe from the spaces the
registered steps carry (:func:`slimkit.pipeline.register_space`), applies it for real, and is
judged on the exported artifact measured on the target. The budget is a set of hard
constraints; the objectives (latency, size, accuracy) give a Pareto front; the best feasible
trial by the chosen objective becomes ``best.onnx``.

The study kit: the option objects (:class:`Budget`, :class:`Search`, :class:`Store`), the
stored record (:class:`SearchRecord`), :func:`open_place` / :func:`open_or_resume` (create a
study or resume it, checking its stored settings), :func:`ensure_baseline`, :class:`Session`,
:class:`TrialRecorder`, :class:`EarlyStop`, :func:`make_sampler`, :func:`write_results` (with a final
stage: :func:`finalist_stage`, compress's finalists fine-tuned fully), the
worker's side (:func:`join_study`) and the fault handling (:func:`stop_signals`,
:func:`recover_lost`, :func:`per_trial_seed`: see :mod:`slimkit.search._faults`).

>>> from slimkit.search import Budget, Search, Store, compress  # doctest: +SKIP
>>> from slimkit.models import ModelRef  # doctest: +SKIP
>>> res = compress(ModelRef("zoo:lenet5", weights="runs/lenet5/model.safetensors"), "digits",
...                budget=Budget(max_accuracy_drop=0.01), search=Search(trials=12),
...                store=Store(out="runs/lenet5-compress"))  # doctest: +SKIP
"""

from ._faults import (Interrupted, SearchInterrupted, TrialTimeoutError, per_trial_seed, recover_lost, signal_name,
                      stop_signals)
from ._final import FINAL_PATIENCE, RECOVERABLE_DROP, final_recipe, finalist_stage, pick_finalists, stored_finalists
from ._objective import Objective
from ._options import OBJECTIVES, SAMPLERS, Budget, CompressSpace, Search, Store, WorkerOptions, parse_latency
from ._record import (BASELINE_ATTR, DIRECTIONS, FINISHED, METRICS, RESULT_FILES, STUDY_ATTR, NasRecord,
                      SearchRecord)
from ._results import baseline_test, pick_best, trial_rows, write_results
from ._run import CompressResult, compress, compress_worker, model_record
from ._space import GridTrial, draw_recipe, searchable_steps
from ._study import (Joined, StudyPlace, check_worker_args, clean_outputs, count_finished, default_storage,
                     ensure_baseline, file_sha256, finished_states, join_study, make_sampler, open_or_resume,
                     open_place, open_storage, optimize, quiet_optuna, redact, study_names, trial_counts,
                     validation_subset, worker_sampler, worker_seed)
from ._trial import (EarlyStop, Judged, Session, TrialRecorder, apply_trial, constraint_limits, constraint_values,
                     describe_figures, figures_of, measure_baseline, speed_verdicts)

__all__ = [
    # compress
    "compress", "compress_worker", "CompressResult", "Objective", "draw_recipe", "searchable_steps", "GridTrial",
    # option objects and the stored record
    "Budget", "Search", "Store", "CompressSpace", "WorkerOptions", "parse_latency", "OBJECTIVES", "SAMPLERS",
    "SearchRecord", "NasRecord", "STUDY_ATTR", "BASELINE_ATTR", "DIRECTIONS", "METRICS", "FINISHED", "RESULT_FILES",
    # the study kit
    "StudyPlace", "open_place", "open_or_resume", "ensure_baseline", "clean_outputs", "quiet_optuna", "make_sampler",
    "optimize", "count_finished", "finished_states", "trial_counts", "open_storage", "default_storage", "redact",
    "study_names", "file_sha256", "validation_subset", "model_record",
    # trials
    "Session", "TrialRecorder", "Judged", "EarlyStop", "apply_trial", "measure_baseline", "figures_of",
    "constraint_values", "constraint_limits", "describe_figures", "speed_verdicts",
    # the second fidelity: the finalists fine-tuned fully
    "finalist_stage", "pick_finalists", "final_recipe", "stored_finalists", "FINAL_PATIENCE", "RECOVERABLE_DROP",
    # results and workers
    "write_results", "trial_rows", "pick_best", "baseline_test", "Joined", "join_study", "check_worker_args",
    "worker_sampler", "worker_seed",
    # faults: trial timeout, SIGTERM / Ctrl-C, lost trials
    "TrialTimeoutError", "Interrupted", "SearchInterrupted", "stop_signals", "signal_name", "recover_lost",
    "per_trial_seed",
]
