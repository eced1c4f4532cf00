"""``compress`` (start or resume a search, then write its results) and its worker's share
(:func:`compress_worker`, which :func:`slimkit.api.worker` runs for a compress study)."""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torch import nn

from .. import _console
from ..data import DataBundle, resolve_data
from ..errors import NoFeasibleTrialError, SlimkitError
from ..measure import Target
from ..models import ModelRef, load_model, origin_of, resolve_model, save_model
from ..pipeline import recipe_summary
from ._faults import SearchInterrupted, per_trial_seed, recover_lost, signal_name, stop_signals, write_error
from ._final import FINALISTS_DIR, finalist_stage
from ._objective import Objective
from ._options import Budget, CompressSpace, Search, Store, WorkerOptions
from ._record import RESULT_FILES, SearchRecord
from ._results import write_results
from ._space import searchable_steps, warm_start
from ._study import (Joined, StudyPlace, count_finished, ensure_baseline, file_sha256, finished_states, make_sampler,
                     open_or_resume, open_place, optimize, redact, validation_subset, worker_sampler,
                     worker_seed)
from ._trial import Session, describe_figures, measure_baseline

__all__ = ["compress", "compress_worker", "CompressResult", "model_record"]


@dataclass
class CompressResult:
    """What :func:`compress` returns: the best model (``None`` while the study holds no trial),
    its ONNX file, the ``result.json`` report and the output folder."""

    model: nn.Module | None
    onnx_path: Path | None
    report: dict[str, Any] | None
    out: Path


def model_record(model: nn.Module | str | ModelRef, net: nn.Module, out: Path) -> tuple[str | None, str | None]:
    """``(spec, weights path)`` a worker rebuilds the input model from; a Python model object that
    knows its spec is saved into ``out/input.safetensors`` for that."""
    ref = model if isinstance(model, ModelRef) else ModelRef(model) if isinstance(model, str) else None
    spec, weights = (ref.spec, ref.weights) if ref is not None else (None, None)
    if ref is None and origin_of(net).get("model"):
        weights = save_model(net, out / "input.safetensors")
        spec = origin_of(net)["model"]
    elif ref is not None and spec is None and weights is not None:
        spec = origin_of(net).get("model")  # a model slimkit saved: its spec is inside its weights
    return spec, str(Path(weights).resolve()) if weights else None


def compress(
    model: nn.Module | str | ModelRef,
    data: DataBundle | str = "digits",
    *,
    budget: Budget = Budget(),
    target: Target = Target(max_seconds=1.0),
    search: Search = Search(),
    store: Store = Store(),
    space: CompressSpace = CompressSpace(),
) -> CompressResult:
    """Search every registered method's space for the best model within a budget.

    Each trial draws a recipe, applies it, fine-tunes, exports, checks parity and measures the
    artifact on ``target``. The budget's limits are hard constraints; the study's objectives
    (latency relative to the baseline, size, validation accuracy) give a Pareto front;
    ``search.objective`` (default ``latency``) picks the best feasible trial.
    ``space.finetune_batches`` caps every fine-tune epoch and ``search.val_size`` the validation
    examples trials are judged on (quicker trials on big data). With ``space.warm`` (the
    default), the first trials try each compression method alone before the sampler combines
    them. Then the best ``space.finalists`` candidates of that proxy Pareto front are applied
    again with a full fine-tune (``space.final_epochs``, distilled, early stopping), exported and
    timed side by side with the input model; the best of them within budget on validation wins
    (:mod:`slimkit.search._final`). The study lives in ``store.out/study.db`` (or ``store.storage``);
    calling again with the same arguments resumes it until it holds ``search.trials`` trials,
    then runs the finalists not finished yet. Writes ``best.onnx``,
    ``best.safetensors``, ``best_recipe.yaml``, ``trials.csv``, ``result.json`` and
    ``report.html`` into ``store.out``; raises :class:`~slimkit.errors.NoFeasibleTrialError`
    (exit code 3) after writing them if no trial met the budget. ``search.trial_timeout`` stops
    (and fails) a trial that runs longer; SIGTERM or Ctrl-C fails the trial in flight, writes the
    finished trials' results and raises :class:`SearchInterrupted` (exit code 143 or 130); a
    trial killed outright (SIGKILL) runs again, with the same number and parameters, when the
    same call resumes the study.

    >>> res = compress(ModelRef("zoo:lenet5", weights="runs/lenet5/model.safetensors"), "digits",
    ...                budget=Budget(max_accuracy_drop=0.01), search=Search(trials=10),
    ...                store=Store(out="runs/lenet5-compress"))  # doctest: +SKIP
    >>> res.report["result"]["latency_ms"]["1"]["median"]  # doctest: +SKIP
    """
    objective = search.objective or "latency"
    budget = budget.resolve(target.batch_sizes)
    if space.methods:
        searchable_steps(target.runtime, space.methods)  # unknown names fail here, before any work
    out = store.out_path
    weights = model.weights if isinstance(model, ModelRef) else None
    if weights is not None and Path(weights).resolve().parent == out.resolve() and Path(weights).name in RESULT_FILES:
        raise SlimkitError(f"--weights {weights} is a file this search writes; slimkit never overwrites an input "
                           "model: copy it elsewhere or choose another --out.")
    # bad data or a bad model fails here, before anything is created or a previous search removed
    bundle = validation_subset(resolve_data(data, search.seed), search.val_size, search.seed)
    net = resolve_model(model, bundle)
    place = open_place(store, inputs=[weights], extra=(FINALISTS_DIR,))

    spec, weights_path = model_record(model, net, out)
    record = SearchRecord(
        kind="compress", model=spec, weights=weights_path, weights_sha256=file_sha256(weights_path),
        data=data if isinstance(data, str) else bundle.name, target=target.runtime,
        batch_sizes=list(target.batch_sizes), threads=target.resolved_threads, budget=budget.to_data(),
        seed=search.seed, trust_pickle=model.trust_pickle if isinstance(model, ModelRef) else False,
        objective=objective, sampler=search.sampler_name, max_seconds=target.max_seconds,
        finetune_batches=space.finetune_batches, methods=list(space.methods) if space.methods else None,
        out=str(out.resolve()), val_size=search.val_size, trial_timeout=search.trial_timeout)

    def warm_up(st: Any) -> None:
        if space.warm and search.sampler != "grid":
            limit = max(2, search.trials // 2) if search.trials else None
            for params in warm_start(target.runtime, record.methods, limit=limit, seed=search.seed):
                st.enqueue_trial(params, skip_if_exists=True)

    st = open_or_resume(place, record, on_create=warm_up)
    baseline = ensure_baseline(st, lambda: measure_baseline(net, bundle, record, out),
                               status=f"measuring the baseline on {record.target} ({record.threads} threads)")
    b = baseline["val"]
    _console.info(f"baseline: val {b['accuracy']:.4f}, " + ", ".join(
        f"{b['latency_ms'][str(x)]['median']:.3g} ms @{x}" for x in record.batch_sizes)
        + f", {b['artifact_bytes'] / 1024:.1f} KB")
    _console.info("budget: " + ("; ".join(budget.describe(record.batch_sizes)) or "none (every trial is feasible)"))

    session = Session(record, baseline, artifacts=out, data=bundle, model=net, verbose=search.verbose)
    _search(st, session, place, search)
    if not count_finished(st):
        _console.info(f"study '{place.name}' is ready and holds no trial yet; add trials with: slimkit worker "
                      f"--storage {redact(place.url)} --study {place.name} --trials N, then run this command again "
                      "to write the results.")
        return CompressResult(None, None, None, out)
    count = space.finalist_count(search.trials)
    stage = finalist_stage(st, session, out, count=count, epochs=space.final_epochs,
                           batches=space.final_batches) if count else None
    report = _write(st, session, place, final=stage)
    _summarize(report, record)
    best = load_model(weights=out / "best.safetensors", input_shape=bundle.input_shape,
                      num_classes=bundle.num_classes) if record.model else None
    return CompressResult(best, out / "best.onnx", report, out)


def _search(st: Any, session: Session, place: StudyPlace, search: Search) -> None:
    """Run trials until the study holds ``search.trials`` finished ones. SIGTERM or Ctrl-C ends it
    cleanly: the trial in flight is recorded as failed, the finished trials' results are written,
    then :class:`SearchInterrupted` (exit code 143 or 130); a folder that takes no more files
    stops it with a clear error. Either way the same command resumes."""
    trials, name = search.trials, place.name
    _recover(st)
    done = count_finished(st)
    remaining = trials - done
    if done:
        _console.info(f"resuming study '{name}' ({redact(place.url)}): {done} trial(s) done, "
                      f"{max(remaining, 0)} to go")
    if remaining <= 0:
        return
    import optuna

    sampler = make_sampler(search.sampler, seed=search.seed, trials=trials)
    st.sampler = per_trial_seed(sampler, search.seed) if isinstance(search.sampler, str) else sampler
    _console.info(f"searching: {remaining} trial(s), sampler {search.sampler_name}, objective "
                  f"{session.record.objective}; study '{name}' in {redact(place.url)}"
                  + (f"; join with: slimkit worker --storage URL --study {name} --trials N" if place.shared else ""))
    with stop_signals() as stop:
        optimize(st, Objective(session, grid=search.sampler == "grid", total=trials), n_trials=remaining,
                 timeout=search.timeout, callbacks=[optuna.study.MaxTrialsCallback(trials, states=finished_states()),
                                                    stop.callback])
    if session.write_failure is not None:
        raise write_error(session.write_failure, place.out, "the trials' files", study=redact(place.url))
    if stop.signum is None:
        return
    counts = sum(t.state.name == "COMPLETE" for t in st.get_trials(deepcopy=False))
    wrote = ""
    if counts:
        wrote = f"; wrote the results of the {counts} complete trial(s) to {place.out}"
        try:
            _write(st, session, place)
        except NoFeasibleTrialError:
            pass  # no trial within budget: the files are written all the same
        except SlimkitError as e:
            wrote = f"; the results could not be written ({e})"
    raise SearchInterrupted(f"search interrupted by {signal_name(stop.signum)}: the trial in flight is recorded as "
                            f"failed{wrote}. Run the same command to resume.", stop.signum)


def _recover(st: Any) -> None:
    lost = recover_lost(st)
    if lost:
        _console.info(f"trial(s) {', '.join(map(str, lost))} of a process that no longer runs go back into the queue "
                      "(they run again with the same parameters)")


def _write(st: Any, session: Session, place: StudyPlace,
           final: Callable[[Any], dict[str, Any]] | None = None) -> dict[str, Any]:
    """The search's result files (``final``: the finalists' stage, see :mod:`slimkit.search._final`);
    a folder that takes no file is a clear error (the study stays)."""
    try:
        return write_results(st, session, storage=place.url, out=place.out, final=final, confirm=final is None)
    except OSError as e:
        raise write_error(e, place.out, "the search's results", study=redact(place.url)) from None


def _summarize(report: dict[str, Any], record: SearchRecord) -> None:
    c = report["trials"]
    _console.info(f"{c['total']} trials: {c['complete']} complete, {c['stopped_early']} stopped early, "
                  f"{c['failed']} failed; {c['within_budget']} within budget, {c['pareto']} on the Pareto front")
    best = report["best"]
    _console.info(f"[bold]best (by {record.objective})[/bold]: trial {best['trial']}: "
                  f"{recipe_summary(best['recipe'], best['params'])}")
    _console.info("  search (validation): " + describe_figures(best["search"], record.batch_sizes))
    if (best.get("final") or {}).get("figures"):
        _console.info("  fine-tuned fully (validation): " + describe_figures(best["final"]["figures"],
                                                                              record.batch_sizes))


def compress_worker(joined: Joined, *, trials: int, total: int | None, timeout: float | None, out: Path | None,
                    options: WorkerOptions) -> None:
    """``slimkit worker`` on a compress study: ``trials`` more trials here (none once the study
    holds ``total`` finished trials)."""
    import optuna

    st, record = joined.study, joined.record
    if options.trial_timeout is not None:
        record.trial_timeout = options.trial_timeout
    sampler, name = worker_sampler(record, options.sampler)
    st.sampler = make_sampler(sampler, seed=worker_seed(record), trials=trials + count_finished(st))
    session = Session(record, joined.baseline, artifacts=Path(out) if out else Path(record.out or "."),
                      verbose=options.verbose)
    _console.info(f"worker {os.getpid()}: {trials} trial(s) of study '{st.study_name}' ({redact(joined.url)}), "
                  f"sampler {name}")
    _recover(st)
    stop = [optuna.study.MaxTrialsCallback(total, states=finished_states())] if total else []
    if total and count_finished(st) >= total:
        trials = 0
    with stop_signals() as signals:
        optimize(st, Objective(session, grid=sampler == "grid"), n_trials=trials, timeout=timeout,
                 callbacks=[*stop, signals.callback])
    if session.write_failure is not None:
        raise write_error(session.write_failure, session.artifacts, "the trials' files", study=redact(joined.url))
    if signals.signum is not None:
        raise SearchInterrupted(f"worker {os.getpid()} interrupted by {signal_name(signals.signum)}: its trial in "
                                "flight is recorded as failed; the study keeps every finished trial.", signals.signum)
