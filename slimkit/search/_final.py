"""The search's second fidelity: the best few candidates of the proxy search, fine-tuned fully.

The trials are proxies: every fine-tune epoch is capped (``finetune_batches``), so an
aggressive candidate has no time to recover its accuracy. After the trials, the best
``finalists`` candidates are taken from the proxy Pareto front (Optuna's ``study.best_trials``:
the non-dominated trials among those within budget), ranked by the search's objective; when
the front holds fewer, the next trials within budget by the objective fill the list. Each
finalist's recipe is applied again to the input model with a full fine-tune
(:func:`final_recipe`): no batch cap, the recipe's ``finetune`` step (added where the recipe
has none) run for ``final_epochs`` epochs, distilled from the input model, stopped after
:data:`FINAL_PATIENCE` epochs without a better validation accuracy and rolled back to its best
epoch (:class:`~slimkit.training.TrainConfig`'s ``patience``). It is exported (parity checked),
measured on the validation split and timed side by side with ``baseline.onnx``
(:func:`slimkit.pipeline.time_side_by_side`: paired ratios). The best finalist within budget
by the objective wins and becomes ``best.*`` (:func:`slimkit.search.write_results`'s
``final`` hook); when none stays within budget, the proxy best is kept, as the search trained it.

Each finished finalist is stored at once in the study's user attributes (``slimkit_final:NNNN``,
the trial's number), so a search killed during this stage resumes it: the same command reads
the finished finalists from the study and runs only the others.

What Optuna does here: the front is its constrained non-dominated sort (``best_trials``), and
the study's storage keeps both fidelities. Finalists are not new trials: they would count
towards ``--trials`` and the samplers would learn from full-fidelity figures as if they were
proxies. Successive halving and Hyperband need ``trial.report`` / ``should_prune``, which
Optuna refuses in a multi-objective study; the search's :class:`~slimkit.search.EarlyStop`
compares a curve with the proxy trials' capped epochs, not like with like. The full fine-tune's
early stop is the training loop's own (``patience``, best epoch kept).

>>> [s.name for s in final_recipe({"steps": [{"export": {}}]}, epochs=5, batches=None, target="ort-cpu").steps]
['finetune', 'export']
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .. import _console
from ..errors import ConfigError
from ..pipeline import Finetune, Recipe, Step, get_step, recipe_summary, time_side_by_side
from ._results import _SELECT, _is_feasible
from ._space import is_training_step, with_max_batches
from ._trial import Session, _plain, apply_trial, constraint_values, describe_figures, figures_of

__all__ = ["final_recipe", "pick_finalists", "RECOVERABLE_DROP", "finalist_stage", "stored_finalists", "FINAL_ATTR", "FINAL_PATIENCE",
           "FINALISTS_DIR"]

#: A finished finalist is stored under this prefix and its trial's number (``slimkit_final:0007``).
FINAL_ATTR = "slimkit_final:"
#: The full fine-tune stops after this many epochs without a better validation accuracy.
FINAL_PATIENCE = 3
#: Where each finalist's files go, under the search's folder (``finalists/0007/model.onnx``).
FINALISTS_DIR = "finalists"


def final_recipe(recipe: Recipe | dict[str, Any], *, epochs: int, batches: int | None, target: str,
                 patience: int = FINAL_PATIENCE) -> Recipe:
    """A proxy trial's recipe with a full fine-tune: every batch cap lifted (or ``batches``), its
    fine-tuning steps (``finetune``, ``distill``) run for ``epochs`` epochs, distilled from the input
    model, with early stopping (``patience``). A recipe without one gets a ``finetune`` step where the
    search would place it, if the recipe's order allows it there."""
    steps = []
    tuned = False
    for step in Recipe.coerce(copy.deepcopy(recipe)).steps:
        config = with_max_batches(step.config, batches)
        if is_training_step(get_step(step.name)):  # finetune, distill: the recipe's own fine-tunes
            distill = {"distill": True} if any(f.name == "distill" for f in dataclasses.fields(config)) else {}
            config = dataclasses.replace(config, epochs=epochs, patience=patience, **distill)
            tuned = True
        steps.append(Step(step.name, config))
    if not tuned:
        order = get_step("finetune").order
        at = next((i for i, s in enumerate(steps) if get_step(s.name).order > order), len(steps))
        added = Step("finetune", Finetune(epochs=epochs, patience=patience, distill=True, max_batches=batches))
        candidate = Recipe([*steps[:at], added, *steps[at:]])
        try:
            candidate.validate(target)
            return candidate
        except ConfigError:
            pass  # a step before it forbids fine-tuning (e.g. quantized already): the recipe as it is
    return Recipe(steps)


#: A trial that missed only the accuracy limit, by at most this much (a fraction: 0.05 is 5 points),
#: may still become a finalist: a short proxy fine-tune is what held back the aggressive (fast)
#: candidates, and a full fine-tune may bring them back within budget.
RECOVERABLE_DROP = 0.05


def _changes_model(t: Any) -> bool:
    """Whether a trial's recipe has a step besides fine-tuning and export: one that can make the
    model faster or smaller (the reference trial, the input model fine-tuned, cannot)."""
    steps = Recipe.from_data(t.user_attrs["recipe"]).steps
    return any(s.name != "export" and not is_training_step(get_step(s.name)) for s in steps)


def _recoverable(t: Any) -> bool:
    missed = t.user_attrs.get("violations") or {}
    return (t.state.name == "COMPLETE" and "figures" in t.user_attrs and not t.user_attrs.get("feasible")
            and set(missed) == {"accuracy_drop"} and missed["accuracy_drop"] <= RECOVERABLE_DROP)


def pick_finalists(study: Any, objective: str, count: int) -> list[Any]:
    """The best ``count`` trials of the proxy Pareto front within budget that change the model (not
    only fine-tune it), by ``objective`` (the next
    trials within budget when the front holds fewer); with ``count >= 2``, ``count // 2`` of the places
    go to trials better by ``objective`` than every one of those that missed only the accuracy limit,
    by at most :data:`RECOVERABLE_DROP` (see there), best first."""
    if count <= 0:
        return []

    def rank(t: Any) -> tuple[Any, ...]:
        return _SELECT[objective](t.user_attrs["figures"]), t.number

    trials = [t for t in study.get_trials(deepcopy=False) if "recipe" in t.user_attrs and _changes_model(t)]
    numbers = {t.number for t in trials}
    front = sorted((t for t in study.best_trials if _is_feasible(t) and t.number in numbers), key=rank)
    on_front = {t.number for t in front}
    feasible = [*front, *sorted((t for t in trials if _is_feasible(t) and t.number not in on_front), key=rank)]
    best = rank(feasible[0]) if feasible else None
    recover = sorted((t for t in trials if _recoverable(t) and (best is None or rank(t) < best)), key=rank)
    take = min(len(recover), count // 2) if feasible else min(len(recover), count)
    chosen = [*feasible[:count - take], *recover[:take]]
    return [*chosen, *[t for t in feasible[count - take:] if t not in chosen]][:count]


def stored_finalists(study: Any) -> dict[int, dict[str, Any]]:
    """The finished finalists the study holds, by their trial's number."""
    return {int(k[len(FINAL_ATTR):]): v for k, v in study.user_attrs.items() if k.startswith(FINAL_ATTR)}


def _run_finalist(study: Any, session: Session, trial: Any, recipe: Recipe, out: Path) -> dict[str, Any]:
    """Apply ``recipe`` (the trial's, fully fine-tuned) to the input model, time it side by side with
    ``baseline.onnx``, judge it against the budget and store it in the study."""
    cfg = session.record
    folder = out / FINALISTS_DIR / f"{trial.number:04d}"
    t0 = time.perf_counter()
    with _console.muted() if not session.verbose else contextlib.nullcontext():
        res = apply_trial(recipe, session.model, session.data, cfg, folder)
    result = res.report["result"]
    base = copy.deepcopy(session.baseline["val"])
    base_onnx = out / "baseline.onnx"
    timed = cfg.target == "ort-cpu" and base_onnx.is_file() and bool(cfg.batch_sizes)
    if timed:
        time_side_by_side(base, result, base_onnx, folder / "model.onnx", session.data, cfg.target_obj)
    fig = figures_of(result, base)
    cons = constraint_values(session.budget, fig, cfg.batch_sizes)
    trained = [{k: r.get(k) for k in ("step", "epochs_run", "best_epoch", "best_val_accuracy", "stopped_early")}
               for r in res.report["steps"] if "epochs_run" in r]
    entry = _plain({
        "trial": trial.number,
        "recipe": recipe.to_data(),
        "folder": str(folder.resolve()),
        "figures": fig,
        "proxy": trial.user_attrs["figures"],
        "feasible": all(v <= 0 for v in cons.values()),
        "violations": {k: v for k, v in cons.items() if v > 0},
        "timed": "side by side with baseline.onnx (paired ratios)" if timed else "alone",
        "training": trained,
        "seconds": round(time.perf_counter() - t0, 2),
    })
    study.set_user_attr(f"{FINAL_ATTR}{trial.number:04d}", entry)
    return entry


def _has_files(entry: dict[str, Any]) -> bool:
    folder = Path(entry["folder"])
    return (folder / "model.onnx").is_file() and (folder / "model.safetensors").is_file()


def _row(entry: dict[str, Any], trial: Any, *, winner: bool, from_study: bool) -> dict[str, Any]:
    """One finalist as ``result.json`` and the report show it: proxy against final figures."""
    fig = entry["figures"]
    return {"trial": entry["trial"], "summary": trial.user_attrs.get("summary") or
            recipe_summary(trial.user_attrs["recipe"], trial.params),
            "proxy_val_accuracy": entry["proxy"]["val_accuracy"], "final_val_accuracy": fig["val_accuracy"],
            "proxy_within_budget": bool(trial.user_attrs.get("feasible")),
            "latency_ms": fig["latency_ms"], "speedup": fig["speedup"], "latency_ratio": fig["latency_ratio"],
            "size_kb": fig["size_kb"], "within_budget": entry["feasible"], "over_budget": entry["violations"],
            "winner": winner, "timed": entry["timed"], "training": entry["training"], "seconds": entry["seconds"],
            "from_study": from_study}


def finalist_stage(study: Any, session: Session, out: Path, *, count: int, epochs: int,
                   batches: int | None = None) -> Callable[[Any], dict[str, Any]]:
    """``final(proxy_best)`` for :func:`slimkit.search.write_results`: the finalists fully fine-tuned
    (stored finalists read from the study, the others run), the best within budget returned
    (``trial``: whose recipe it is, ``folder``, ``recipe``, ``figures``, ``note``) with every
    finalist's row under ``finalists``."""
    cfg = session.record

    def final(best: Any) -> dict[str, Any]:
        chosen = pick_finalists(study, cfg.objective, count)
        stored = stored_finalists(study)
        recipes: dict[int, Recipe] = {}
        seen: set[str] = set()
        for t in chosen:  # two trials with one recipe once fully fine-tuned are one finalist
            recipe = final_recipe(t.user_attrs["recipe"], epochs=epochs, batches=batches, target=cfg.target)
            text = recipe.to_yaml()
            if text not in seen:
                seen.add(text)
                recipes[t.number] = recipe
        trials = {t.number: t for t in chosen if t.number in recipes}
        old = {n for n, e in stored.items() if n in recipes and e.get("recipe") == recipes[n].to_data()}
        what = (f"{epochs} epochs" + (f" of at most {batches} batches" if batches else "")
                + f", distilled from the input model, stopping after {FINAL_PATIENCE} without a better validation "
                  "accuracy")
        _console.info(f"[bold]finalists[/bold]: trial(s) {', '.join(map(str, recipes))}, the best of the proxy search, "
                      f"each fine-tuned fully ({what})"
                      + (f"; {len(old)} already done (read from the study)" if old else ""))
        entries = {n: stored[n] for n in old}
        for i, n in enumerate(recipes, 1):
            if n in old:
                continue
            _console.info(f"[bold]finalist {i}/{len(recipes)}[/bold]: trial {n}: {recipe_summary(recipes[n])}")
            entries[n] = _run_finalist(study, session, trials[n], recipes[n], out)
            e = entries[n]
            _console.info(f"  proxy val {e['proxy']['val_accuracy']:.4f} -> final "
                          + describe_figures(e["figures"], cfg.batch_sizes, e["feasible"], e["violations"])
                          + f" ({e['seconds']:.1f}s)")
        within = [n for n in recipes if entries[n]["feasible"]]
        win = min(within, key=lambda n: (_SELECT[cfg.objective](entries[n]["figures"]), n)) if within else None
        rows = [_row(entries[n], trials[n], winner=n == win, from_study=n in old) for n in recipes]
        if win is None:  # the proxy best, as the search trained it (write_results finds its files)
            note = (f"no finalist stayed within budget after the full fine-tune: trial {best.number} as the "
                    "search trained it")
            _console.info(f"[yellow]{note}[/yellow]")
            return {"folder": None, "recipe": best.user_attrs["recipe"], "model": None, "note": note,
                    "finalists": rows}
        entry = entries[win]
        if not _has_files(entry):  # finished on another machine, or its folder was removed: run it again here
            _console.info(f"finalist trial {win}'s files are not here ({entry['folder']}); running it again")
            entry = _run_finalist(study, session, trials[win], recipes[win], out)
        return {"folder": Path(entry["folder"]), "recipe": entry["recipe"], "model": None, "trial": trials[win],
                "figures": entry["figures"], "finalists": rows,
                "note": f"trial {win}'s recipe fine-tuned fully ({epochs} epochs, early stopping), the best of "
                        f"{len(recipes)} finalist(s) within budget on validation"}

    return final
