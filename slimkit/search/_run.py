"""``compress`` (start or resume a search, then write its results) and ``worker`` (join one)."""

from __future__ import annotations

import os
import shutil
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torch import nn

from .. import _console, _io
from ..data import DataBundle
from ..errors import ConfigError, SlimkitError
from ._objective import Objective, Session, describe_figures, measure_baseline
from ._results import RESULT_FILES, write_results
from ._study import (BASELINE_ATTR, DIRECTIONS, FINISHED, METRICS, OBJECTIVES, SAMPLERS, STUDY_ATTR, Budget,
                     SearchConfig, default_storage, file_sha256, open_storage, redact, study_names, validation_subset)

__all__ = ["compress", "worker", "CompressResult", "make_sampler"]


@dataclass
class CompressResult:
    """What :func:`compress` returns: the best model (``None`` while the study holds no trial),
    its ONNX file, the ``result.json`` report and the output folder."""

    model: nn.Module | None
    onnx_path: Path | None
    report: dict[str, Any] | None
    out: Path


def make_sampler(name: str, *, seed: int | None, trials: int) -> Any:
    """The Optuna sampler for ``--sampler`` (constraints come from ``trial.set_constraint``)."""
    import optuna

    startup = max(4, min(10, trials // 4))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # experimental-feature warnings of multivariate TPE, GP
        if name == "tpe":
            return optuna.samplers.TPESampler(seed=seed, n_startup_trials=startup, multivariate=True, group=True,
                                              constant_liar=True, warn_independent_sampling=False)
        if name == "nsga2":
            return optuna.samplers.NSGAIISampler(seed=seed, population_size=max(4, min(50, trials // 4)))
        if name == "gp":
            return optuna.samplers.GPSampler(seed=seed, n_startup_trials=startup, warn_independent_sampling=False)
        if name == "random":
            return optuna.samplers.RandomSampler(seed=seed)
        if name == "grid":
            return optuna.samplers.BruteForceSampler(seed=seed)
    raise ConfigError(f"unknown sampler '{name}'; choose one of {', '.join(SAMPLERS)}.", where="--sampler")


def _quiet_optuna() -> None:
    import optuna

    optuna.logging.set_verbosity(optuna.logging.ERROR)  # slimkit prints one line per trial itself
    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)


def _count_finished(study: Any) -> int:
    return sum(t.state.name in FINISHED for t in study.get_trials(deepcopy=False))


def _check_args(objective: str, sampler: str, trials: int, timeout: float | None, finetune_batches: int | None,
                max_seconds: float) -> None:
    if objective not in OBJECTIVES:
        raise ConfigError(f"unknown objective '{objective}'; choose one of {', '.join(OBJECTIVES)}.", where="--objective")
    if sampler not in SAMPLERS:
        raise ConfigError(f"unknown sampler '{sampler}'; choose one of {', '.join(SAMPLERS)}.", where="--sampler")
    if trials < 0:
        raise ConfigError(f"must be >= 0, got {trials}.", where="--trials")
    if timeout is not None and timeout <= 0:
        raise ConfigError(f"must be > 0 seconds, got {timeout}.", where="--timeout")
    if finetune_batches is not None and finetune_batches < 1:
        raise ConfigError(f"must be >= 1, got {finetune_batches}.", where="--finetune-batches")
    if max_seconds <= 0:
        raise ConfigError(f"must be > 0, got {max_seconds}.", where="--max-seconds")


def _clean_outputs(out: Path, storage_given: bool) -> None:
    """``--overwrite``: remove a previous search's files (never anything else)."""
    for name in RESULT_FILES:
        (out / name).unlink(missing_ok=True)
    shutil.rmtree(out / "trials", ignore_errors=True)
    if not storage_given:
        for suffix in ("", "-journal", "-wal", "-shm"):
            (out / f"study.db{suffix}").unlink(missing_ok=True)


def compress(
    model: nn.Module | str,
    data: DataBundle | str = "digits",
    *,
    weights: str | Path | None = None,
    trust_pickle: bool = False,
    target: str = "ort-cpu",
    batch_sizes: Sequence[int] = (1, 64),
    threads: int | None = None,
    max_latency_ms: float | dict[int, float] | str | None = None,
    min_throughput: float | None = None,
    max_size_kb: float | None = None,
    max_accuracy_drop: float | None = 0.01,
    objective: str = "latency",
    trials: int = 20,
    timeout: float | None = None,
    sampler: str = "tpe",
    storage: str | None = None,
    study: str | None = None,
    out: str | Path = "runs/compress",
    overwrite: bool = False,
    seed: int = 0,
    max_seconds: float = 1.0,
    finetune_batches: int | None = None,
    methods: Sequence[str] | None = None,
    warm: bool = True,
    val_size: int | None = None,
    verbose: bool = False,
) -> CompressResult:
    """Search every registered method's space for the best model within a budget.

    Each trial draws a recipe, applies it, fine-tunes, exports, checks parity and measures the
    artifact on ``target``. The budget's limits are hard constraints; the study's objectives
    (latency relative to the baseline, size, validation accuracy) give a Pareto front;
    ``objective`` picks the best feasible trial. ``finetune_batches`` caps every fine-tune epoch
    and ``val_size`` the validation examples trials are judged on (quicker trials on big data).
    With ``warm`` (the default), the first trials
    try each compression method alone before the sampler combines them. The study lives in
    ``out/study.db`` (or
    ``storage``); calling again with the same arguments resumes it until it holds ``trials``
    trials. Writes ``best.onnx``, ``best.safetensors``, ``best_recipe.yaml``, ``trials.csv``,
    ``result.json`` and ``report.html`` into ``out``; raises
    :class:`~slimkit.errors.NoFeasibleTrialError` (exit code 3) after writing them if no trial
    met the budget.

    >>> res = compress("zoo:lenet5", "digits", weights="runs/lenet5/model.safetensors",
    ...                max_accuracy_drop=0.01, trials=10, out="runs/lenet5-compress")  # doctest: +SKIP
    >>> res.report["result"]["latency_ms"]["1"]["median"]  # doctest: +SKIP
    """
    import optuna

    from ..data import resolve_data
    from ..models import resolve_model
    from ..measure import default_threads
    from ..measure.backends import get_backend
    from ..models import origin_of, save_model

    _check_args(objective, sampler, trials, timeout, finetune_batches, max_seconds)
    if val_size is not None and val_size < 10:
        raise ConfigError(f"must be >= 10 examples, got {val_size}.", where="--val-size")
    get_backend(target)
    batch_sizes = tuple(int(b) for b in batch_sizes)
    if not batch_sizes or any(b < 1 for b in batch_sizes):
        raise ConfigError(f"batch sizes must be integers >= 1, got {list(batch_sizes)}.", where="--batch")
    budget = Budget.of(batch_sizes, max_latency_ms=max_latency_ms, min_throughput=min_throughput,
                       max_size_kb=max_size_kb, max_accuracy_drop=max_accuracy_drop)
    if methods:
        from ._space import searchable_steps

        searchable_steps(target, methods)  # unknown names fail here, before any work
    _quiet_optuna()
    out = Path(out)
    if weights is not None and Path(weights).resolve().parent == out.resolve() and Path(weights).name in RESULT_FILES:
        raise SlimkitError(f"--weights {weights} is a file this search writes; slimkit never overwrites an input "
                           "model: copy it elsewhere or choose another --out.")
    url = storage or default_storage(out)
    name = study or out.resolve().name or "slimkit"
    # bad data or a bad model fails here, before anything is created or a previous search removed
    bundle = validation_subset(resolve_data(data, seed), val_size, seed)
    net = resolve_model(model, bundle, weights=weights, trust_pickle=trust_pickle)

    if overwrite:
        _clean_outputs(out, storage is not None)
    resuming = (out / "study.db").exists() if storage is None else None
    if storage is not None:
        store = open_storage(url)
        resuming = name in study_names(store)
        if resuming and overwrite:
            optuna.delete_study(study_name=name, storage=store)
            resuming = False
    if not resuming:
        _io.prepare_out_dir(out, overwrite=overwrite, inputs=[weights])
    if storage is None:
        store = open_storage(url)

    spec, weights_path = (model, weights) if isinstance(model, str) else (None, weights)
    if not isinstance(model, str) and weights is None and origin_of(net).get("model"):
        weights_path = save_model(net, out / "input.safetensors")  # so workers can rebuild it
        spec = origin_of(net)["model"]
    cfg = SearchConfig(
        model=spec, weights=str(Path(weights_path).resolve()) if weights_path else None,
        weights_sha256=file_sha256(weights_path), data=data if isinstance(data, str) else bundle.name,
        target=target, batch_sizes=list(batch_sizes), threads=int(threads or default_threads()),
        budget=budget.to_data(), seed=seed, trust_pickle=trust_pickle, objective=objective, max_seconds=max_seconds,
        finetune_batches=finetune_batches, methods=list(methods) if methods else None, out=str(out.resolve()),
        val_size=val_size, extra={"sampler": sampler},
    )
    st = optuna.create_study(study_name=name, storage=store, directions=list(DIRECTIONS), load_if_exists=True)
    stored = st.user_attrs.get(STUDY_ATTR)
    if stored is None:
        if st.get_trials(deepcopy=False):
            raise SlimkitError(f"study '{name}' in {redact(url)} was not made by slimkit compress; choose another "
                               "--study name.")
        st.set_metric_names(list(METRICS))
        st.set_user_attr(STUDY_ATTR, cfg.to_data())
        if warm and sampler != "grid":
            from ._space import warm_start

            for params in warm_start(target, cfg.methods, limit=max(2, trials // 2) if trials else None, seed=seed):
                st.enqueue_trial(params, skip_if_exists=True)
    else:
        old = SearchConfig.from_data(stored)
        if old.extra.get("kind") == "nas":
            raise SlimkitError(f"{out} holds an architecture search (slimkit nas, study '{name}'), not a compress "
                               "search; choose another --out (or --study), or pass --overwrite to replace it.")
        diffs = cfg.differences(old)
        if [d.split(':')[0] for d in diffs] == ["weights_sha256"] and cfg.model is None:
            diffs = []  # a Python model object saved again: same spec-less model
        if diffs:
            raise SlimkitError(
                f"{out} already holds search '{name}' with other settings ({'; '.join(diffs)}). Its trials were "
                "measured under those settings: run the same command to resume it, pass --overwrite to start a new "
                "search there, or choose another --out (or --study).")
        st.set_user_attr(STUDY_ATTR, cfg.to_data())  # objective, sampler... may change between runs

    baseline = st.user_attrs.get(BASELINE_ATTR)
    if baseline is None:
        with _console.status(f"measuring the baseline on {target} ({cfg.threads} threads)"):
            baseline = measure_baseline(net, bundle, cfg, out)
        st.set_user_attr(BASELINE_ATTR, baseline)
    b = baseline["val"]
    _console.info(f"baseline: val {b['accuracy']:.4f}, " + ", ".join(
        f"{b['latency_ms'][str(x)]['median']:.3g} ms @{x}" for x in batch_sizes) + f", {b['artifact_bytes'] / 1024:.1f} KB")
    _console.info("budget: " + ("; ".join(budget.describe(batch_sizes)) or "none (every trial is feasible)"))

    session = Session(cfg, baseline, artifacts=out, data=bundle, model=net, verbose=verbose)
    done = _count_finished(st)
    remaining = trials - done
    if done:
        _console.info(f"resuming study '{name}' ({redact(url)}): {done} trial(s) done, {max(remaining, 0)} to go")
    if remaining > 0:
        st.sampler = make_sampler(sampler, seed=seed + done, trials=trials)
        _console.info(f"searching: {remaining} trial(s), sampler {sampler}, objective {objective}; study '{name}' in "
                      f"{redact(url)}" + (f"; join with: slimkit worker --storage URL --study {name} --trials N"
                                           if storage else ""))
        try:
            st.optimize(Objective(session, grid=sampler == "grid", total=trials), n_trials=remaining,
                        timeout=timeout, catch=(Exception,), gc_after_trial=True,
                        callbacks=[optuna.study.MaxTrialsCallback(trials, states=_finished_states())])
        except KeyboardInterrupt:
            if any(t.state.name == "COMPLETE" for t in st.get_trials(deepcopy=False)):
                _console.info("interrupted: writing the results of the trials done so far (run the same command "
                              "to resume)")
                try:
                    write_results(st, session, storage=url, out=out)
                except SlimkitError:
                    pass
            raise
    if not _count_finished(st):
        _console.info(f"study '{name}' is ready and holds no trial yet; add trials with: slimkit worker --storage "
                      f"{redact(url)} --study {name} --trials N, then run this command again to write the results.")
        return CompressResult(None, None, None, out)
    report = write_results(st, session, storage=url, out=out)
    _summarize(report, cfg)
    from ..models import load_model

    best = load_model(weights=out / "best.safetensors", input_shape=bundle.input_shape, num_classes=bundle.num_classes) \
        if cfg.model else None
    return CompressResult(best, out / "best.onnx", report, out)


def _finished_states() -> tuple[Any, ...]:
    from optuna.trial import TrialState

    return tuple(getattr(TrialState, s) for s in FINISHED)


def _summarize(report: dict[str, Any], cfg: SearchConfig) -> None:
    c = report["trials"]
    _console.info(f"{c['total']} trials: {c['complete']} complete, {c['stopped_early']} stopped early, "
                  f"{c['failed']} failed; {c['within_budget']} within budget, {c['pareto']} on the Pareto front")
    best = report["best"]
    from ._objective import recipe_summary

    _console.info(f"[bold]best (by {cfg.objective})[/bold]: trial {best['trial']}: "
                  f"{recipe_summary(best['recipe'], best['params'])}")
    _console.info("  search (validation): " + describe_figures(best["search"], cfg.batch_sizes))


def worker(
    storage: str,
    study: str,
    *,
    trials: int = 10,
    timeout: float | None = None,
    out: str | Path | None = None,
    weights: str | Path | None = None,
    sampler: str | None = None,
    total: int | None = None,
    verbose: bool = False,
) -> dict[str, int]:
    """Run ``trials`` more trials of a study that ``compress`` started (``--storage`` shared).

    The study holds the whole search configuration, so nothing else is needed; ``out`` puts this
    worker's trial files elsewhere (another machine), ``weights`` points at a copy of the input
    weights (its hash must match); ``total`` stops the worker once the study holds that many
    finished trials, all workers together. Returns the study's trial counts afterwards.

    >>> worker("postgresql://user@db:5432/slimkit", "lenet5-search", trials=10)  # doctest: +SKIP
    """
    import optuna

    if trials < 1:
        raise ConfigError(f"must be >= 1, got {trials}.", where="--trials")
    if total is not None and total < 1:
        raise ConfigError(f"must be >= 1, got {total}.", where="--total")
    if timeout is not None and timeout <= 0:
        raise ConfigError(f"must be > 0 seconds, got {timeout}.", where="--timeout")
    _quiet_optuna()
    store = open_storage(storage)
    names = study_names(store)
    if study not in names:
        known = f" It holds: {', '.join(names)}." if names else " It holds no study."
        raise SlimkitError(f"no study '{study}' in {redact(storage)}.{known} Start one with slimkit compress ... "
                           f"--storage URL --study {study} (--trials 0 only sets it up).")
    st = optuna.load_study(study_name=study, storage=store)
    stored = st.user_attrs.get(STUDY_ATTR)
    if stored is None:
        raise SlimkitError(f"study '{study}' in {redact(storage)} was not made by slimkit compress.")
    baseline = st.user_attrs.get(BASELINE_ATTR)
    if baseline is None:
        raise SlimkitError(f"study '{study}' has no baseline yet: its slimkit compress is still measuring it; "
                           "start the worker again in a moment.")
    cfg = SearchConfig.from_data(stored)
    if weights is not None:
        if file_sha256(weights) != cfg.weights_sha256:
            raise SlimkitError(f"--weights {weights} is not the file this study started from "
                               f"({cfg.weights}; its SHA-256 differs).")
        cfg.weights = str(Path(weights).resolve())
    elif cfg.weights and not Path(cfg.weights).is_file():
        raise SlimkitError(f"the study's weights {cfg.weights} are not on this machine; copy them here and pass "
                           "--weights PATH.")
    name = sampler or cfg.extra.get("sampler", "tpe")
    if cfg.extra.get("kind") == "nas":  # an architecture search (slimkit nas): its own objective
        from ..nas._search import run_worker

        run_worker(st, cfg, baseline, trials=trials, total=total, timeout=timeout, out=Path(out) if out else None,
                   sampler=name, verbose=verbose)
    else:
        st.sampler = make_sampler(name, seed=cfg.seed + 1 + os.getpid(), trials=trials + _count_finished(st))
        session = Session(cfg, baseline, artifacts=Path(out) if out else Path(cfg.out or "."), verbose=verbose)
        _console.info(f"worker {os.getpid()}: {trials} trial(s) of study '{study}' ({redact(storage)}), sampler {name}")
        import optuna

        stop = [optuna.study.MaxTrialsCallback(total, states=_finished_states())] if total else []
        if total and _count_finished(st) >= total:
            trials = 0
        st.optimize(Objective(session, grid=name == "grid"), n_trials=trials, timeout=timeout, catch=(Exception,),
                    gc_after_trial=True, callbacks=stop)
    all_trials = st.get_trials(deepcopy=False)
    counts = {s.lower(): sum(t.state.name == s for t in all_trials) for s in FINISHED}
    _console.info(f"worker {os.getpid()} done; the study holds {sum(counts.values())} finished trials "
                  f"({counts['complete']} complete)")
    return counts
