"""``nas``: hardware-aware architecture search over a family's space, on the search's machinery.

Each trial draws an architecture from the family's space (Optuna, define-by-run), predicts
its latency from the latency table and rejects it before any training if the prediction (or
the size of its weights) is over the budget: the trial is recorded as *rejected* (pruned,
with the reason and the predicted figures). Otherwise the candidate is trained briefly (a
proxy: a few capped epochs, distilled from the teacher when there is one), its validation
curve watched by the pruner, exported, measured on the target for real, and judged like a
``compress`` trial (latency, size, validation accuracy; the budget as constraints). The
report shows the predicted against the measured latency of every trained candidate.

The study, its storage (SQLite in the output folder, or a shared PostgreSQL URL), resuming,
``slimkit worker``, and the result files (``best.onnx``, ``best.safetensors``,
``best_recipe.yaml``, ``trials.csv``, ``result.json``, ``report.html``) are the ``compress``
search's (:mod:`slimkit.search`). At the end the best architecture is trained fully
(``final_epochs``) and that model becomes ``best.onnx``; ``best_arch.yaml`` holds the
architecture and the spec that builds it.
"""


from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .. import _console
from ..data import DataBundle, resolve_data
from ..errors import ConfigError, SlimkitError
from ..measure import Target
from ..models import ModelRef, load_model, resolve_model
from ..search import (Budget, Joined, NasRecord, SearchInterrupted, SearchRecord, Search, Session, Store, WorkerOptions,
                      ensure_baseline, file_sha256, make_sampler, measure_baseline, model_record, open_or_resume,
                      open_place, optimize, redact, signal_name, stop_signals, validation_subset, worker_sampler,
                      worker_seed)
from ._hooks import weight_kb
from ._objective import MAX_REJECTED_IN_A_ROW, NasObjective, StopWhenTrained, rejected_count, trained_count
from ._options import NasSpace
from ._results import NAS_FILES, write_nas_results
from ._space import Family, Space, arch_summary, get_family, load_space
from ._table import LatencyTable, TableConfig, build_latency_table

__all__ = ["nas", "nas_worker", "NasResult", "TABLE_ATTR"]

TABLE_ATTR = "slimkit_nas_table"


@dataclass
class NasResult:
    """What :func:`nas` returns: the best model trained fully (``None`` while the study holds no
    trained trial), its ONNX file, the ``result.json`` report, the output folder and the table."""

    model: nn.Module | None
    onnx_path: Path | None
    report: dict[str, Any] | None
    out: Path
    table: LatencyTable


def resolve_table(table: LatencyTable | str | Path | None, stored: dict[str, Any] | None, out: Path, *,
                  fam: Family, space: Space, target: str, batch: int, threads: int, bundle: DataBundle,
                  rounds: int, seed: int) -> LatencyTable:
    """The table a search uses: given, stored in the study (resume, workers), in ``out``, or built now."""
    need: dict[str, Any] = dict(family=fam.name, space=space, target=target, batch=batch, threads=threads,
                input_shape=bundle.input_shape, num_classes=bundle.num_classes)
    if table is not None:
        t = table if isinstance(table, LatencyTable) else LatencyTable.load(table)
        diffs = t.mismatches(**need)
        if diffs:
            raise SlimkitError(f"the latency table {'' if isinstance(table, LatencyTable) else table} was measured for "
                               f"something else ({'; '.join(diffs)}). Build one for this search: slimkit latency-table "
                               f"--family {fam.name} --data D --target {target} --batch {batch} --threads {threads} "
                               "--out FILE (same --space), or leave --latency-table out to build it in --out.")
        return t
    if stored is not None:
        t = LatencyTable(stored)
        if not t.mismatches(**need):
            return t
    path = out / "latency_table.json"
    if path.is_file():
        with contextlib.suppress(SlimkitError):
            t = LatencyTable.load(path)
            if not t.mismatches(**need):
                _console.info(f"using the latency table in {path}")
                return t
    return build_latency_table(fam, bundle, Target(target, (batch,), threads), TableConfig(space=space, rounds=rounds),
                               out=path, seed=seed)


def check_budget(table: LatencyTable, space: Space, fam: Family, bundle: DataBundle, limit_ms: float | None,
                 max_size_kb: float | None) -> dict[str, Any]:
    """Refuse a budget no architecture of the space can meet (before any training)."""
    fastest_ms, fastest = table.fastest(space)
    info = {"fastest_predicted_ms": fastest_ms, "fastest_arch": fastest}
    if limit_ms is not None and fastest_ms > limit_ms:
        raise SlimkitError(
            f"impossible budget: the fastest architecture of the {fam.name} space ({arch_summary(fastest)}) is "
            f"predicted at {fastest_ms:.3g} ms at batch {table.batch} on {table.target}, above --max-latency-ms "
            f"{limit_ms:g}. Relax the limit, or search a space with smaller choices (--space FILE: smaller widths, "
            "fewer blocks, smaller expansions).")
    if max_size_kb is not None:
        smallest = space.smallest()
        kb = weight_kb(fam.build(smallest, bundle.input_shape, bundle.num_classes))
        info["smallest_weight_kb"] = kb
        if kb > max_size_kb:
            raise SlimkitError(
                f"impossible budget: the smallest architecture of the {fam.name} space ({arch_summary(smallest)}) "
                f"has {kb:.1f} KB of weights, above --max-size-kb {max_size_kb:g}. Relax the limit or search a "
                "space with smaller choices (--space FILE).")
    return info




def nas(
    space: NasSpace,
    data: DataBundle | str = "digits",
    *,
    budget: Budget = Budget(max_accuracy_drop=None),
    target: Target = Target(batch_sizes=(1,), max_seconds=1.0),
    search: Search = Search(),
    store: Store = Store(out="runs/nas"),
) -> NasResult:
    """Search a family's architectures for the best one within a latency / size budget on ``target``.

    Candidates the latency table predicts over ``budget.max_latency_ms`` (at the target's one
    batch size), or whose weights alone exceed ``budget.max_size_kb``, are rejected before any
    training; the others are trained for ``space.proxy_epochs`` epochs of at most
    ``space.proxy_batches`` batches (distilled from ``space.teacher`` if given), exported,
    measured and judged; ``search.trials`` counts trained candidates. The best by
    ``search.objective`` (default: the most accurate within budget) is then trained for
    ``space.final_epochs`` and exported. The table is ``space.latency_table`` (a file or
    object), or built into ``store.out/latency_table.json``. Same storage, resume and worker as
    ``compress``. ``budget.max_accuracy_drop`` is measured against the teacher (leave it
    ``None`` without one).

    >>> res = nas(NasSpace("mobilenetv2"), "digits", budget=Budget(max_latency_ms=0.5, max_accuracy_drop=None),
    ...           search=Search(trials=10), store=Store(out="runs/nas"))  # doctest: +SKIP
    >>> res.report["best"]["trial"]  # doctest: +SKIP
    """
    objective = search.objective or "accuracy"
    fam = space.family_obj
    sp = load_space(fam, space.space)
    if len(target.batch_sizes) != 1:
        raise ConfigError(f"an architecture search measures and limits latency at one batch size; got "
                          f"{list(target.batch_sizes)}.", field="batch_sizes")
    batch = target.batch_sizes[0]
    teacher = space.teacher
    if budget.max_accuracy_drop is not None and teacher is None:
        raise SlimkitError("--max-accuracy-drop is measured against the teacher; give --teacher (and "
                           "--teacher-weights), or leave the limit out (Budget(max_accuracy_drop=None)).")
    budget = budget.resolve((batch,))
    threads = target.resolved_threads
    # bad data or a bad teacher fails here, before anything is created or a previous search removed
    bundle = validation_subset(resolve_data(data, search.seed), search.val_size, search.seed)
    if len(bundle.input_shape) != 3:
        raise SlimkitError(f"family '{fam.name}' is convolutional and needs image data shaped (C, H, W); "
                           f"{bundle.name} has examples shaped {bundle.input_shape}.")
    teacher_net = resolve_model(teacher, bundle) if teacher is not None else None
    teacher_weights = teacher.weights if isinstance(teacher, ModelRef) else None
    if isinstance(space.latency_table, (str, Path)):
        LatencyTable.load(space.latency_table)  # a bad table fails before --out is created
    place = open_place(store, inputs=[teacher_weights], extra=NAS_FILES)
    out = place.out

    existing = place.existing() if place.resuming else None
    table = resolve_table(space.latency_table, existing.user_attrs.get(TABLE_ATTR) if existing else None, out,
                          fam=fam, space=sp, target=target.runtime, batch=batch, threads=threads, bundle=bundle,
                          rounds=space.table_rounds, seed=search.seed)
    feasibility = check_budget(table, sp, fam, bundle, budget.latency_limits.get(batch), budget.max_size_kb)
    _console.info(f"{table.describe()}; fastest architecture of the space predicted at "
                  f"{feasibility['fastest_predicted_ms']:.3g} ms")

    # the baseline: the teacher, or (without one) the space's largest architecture, untrained
    if teacher is not None and teacher_net is not None:
        net = teacher_net
        spec, weights_path = model_record(teacher, net, out)
        baseline_is = "teacher"
    else:
        largest = sp.largest()
        torch.manual_seed(search.seed)
        net = resolve_model(fam.spec(largest), bundle)
        spec, weights_path = fam.spec(largest), None
        baseline_is = f"the space's largest architecture ({arch_summary(largest)}), untrained: a latency and size " \
                      "reference only"
    settings = NasRecord(family=fam.name, space=sp.to_data(), teacher=teacher is not None,
                         proxy_epochs=space.proxy_epochs, proxy_batches=space.proxy_batches, lr=space.lr,
                         final_epochs=space.final_epochs, final_batches=space.final_batches,
                         table_digest=table.data.get("space_digest"), baseline_is=baseline_is)
    record = SearchRecord(
        kind="nas", model=spec, weights=weights_path, weights_sha256=file_sha256(weights_path),
        data=data if isinstance(data, str) else bundle.name, target=target.runtime, batch_sizes=[batch],
        threads=threads, budget=budget.to_data(), seed=search.seed,
        trust_pickle=teacher.trust_pickle if isinstance(teacher, ModelRef) else False, objective=objective,
        sampler=search.sampler_name, max_seconds=target.max_seconds, out=str(out.resolve()),
        val_size=search.val_size, nas=settings, trial_timeout=search.trial_timeout)
    st = open_or_resume(place, record)
    if st.user_attrs.get(TABLE_ATTR) is None or LatencyTable(st.user_attrs[TABLE_ATTR]).mismatches(
            family=fam.name, space=sp, target=target.runtime, batch=batch, threads=threads,
            input_shape=bundle.input_shape, num_classes=bundle.num_classes):
        st.set_user_attr(TABLE_ATTR, table.data)

    who = "teacher" if teacher is not None else "reference"
    baseline = ensure_baseline(st, lambda: measure_baseline(net, bundle, record, out),
                               status=f"measuring the baseline ({who}) on {target.runtime} ({threads} threads)")
    b = baseline["val"]
    _console.info(f"baseline ({'teacher' if teacher is not None else 'reference, untrained'}): val "
                  f"{b['accuracy']:.4f}, {b['latency_ms'][str(batch)]['median']:.3g} ms @{batch}, "
                  f"{b['artifact_bytes'] / 1024:.1f} KB")
    _console.info("budget: " + ("; ".join(budget.describe((batch,))) or "none (every candidate is feasible)"))

    session = Session(record, baseline, artifacts=out, data=bundle, model=net, verbose=search.verbose)
    gave_up = _search(st, session, table, fam, sp, search=search, label=f"study '{place.name}' in {redact(place.url)}",
                      shared=place.shared)
    if not trained_count(st):
        _console.info(f"study '{place.name}' holds no trained candidate yet ({rejected_count(st)} rejected); add "
                      f"trials with slimkit worker --storage {redact(place.url)} --study {place.name} --trials N, or "
                      "run again.")
        return NasResult(None, None, None, out, table)
    report = write_nas_results(st, session, table, place.url, out, feasibility, gave_up=gave_up)
    best = load_model(weights=out / "best.safetensors", input_shape=bundle.input_shape,
                      num_classes=bundle.num_classes)
    return NasResult(best, out / "best.onnx", report, out, table)


def _search(st: Any, session: Session, table: LatencyTable, fam: Family, sp: Space, *, search: Search, label: str,
            shared: bool) -> bool:
    """Run trials until ``search.trials`` candidates were trained in the study; True if the sampler
    kept proposing rejected candidates and the search gave up."""
    trials = search.trials
    done = trained_count(st)
    remaining = trials - done
    if done:
        _console.info(f"resuming {label}: {done} candidate(s) trained, {rejected_count(st)} rejected, "
                      f"{max(remaining, 0)} to go")
    if remaining <= 0:
        return False
    objective = NasObjective(session, table, fam, sp, total=trials)
    stopper = StopWhenTrained(objective, trials, done)
    st.sampler = make_sampler(search.sampler, seed=search.seed + len(st.get_trials(deepcopy=False)),
                              trials=max(trials, 10))
    _console.info(f"searching: {remaining} candidate(s) to train, sampler {search.sampler_name}; {label}"
                  + (f"; join with: slimkit worker --storage URL --study {st.study_name} --trials N" if shared else ""))
    _optimize(st, objective, timeout=search.timeout, callbacks=[stopper])
    if stopper.gave_up:
        _console.info(f"[yellow]stopped: the last {MAX_REJECTED_IN_A_ROW} candidates were all rejected by the "
                      "latency table or already trained: the budget leaves little of the space untried (relax it, "
                      "or widen the space)[/yellow]")
    return stopper.gave_up


def nas_worker(joined: Joined, *, trials: int, total: int | None, timeout: float | None, out: Path | None,
               options: WorkerOptions) -> None:
    """``slimkit worker`` on an architecture search: ``trials`` more trained candidates here (fewer
    if the study holds ``total`` trained candidates first)."""
    st, record = joined.study, joined.record
    table_data = st.user_attrs.get(TABLE_ATTR)
    if table_data is None:
        raise SlimkitError(f"study '{st.study_name}' has no latency table yet: its slimkit nas is still measuring it; "
                           "start the worker again in a moment.")
    if record.nas is None:
        raise SlimkitError(f"study '{st.study_name}' is an architecture search without its settings; start it again "
                           "with slimkit nas --overwrite.")
    table = LatencyTable(table_data)
    fam = get_family(record.nas.family)
    sp = load_space(fam, record.nas.space)
    if options.trial_timeout is not None:
        record.trial_timeout = options.trial_timeout
    session = Session(record, joined.baseline, artifacts=Path(out) if out else Path(record.out or "."),
                      verbose=options.verbose)
    objective = NasObjective(session, table, fam, sp, total=trials)
    done = trained_count(st)
    if total is not None:
        trials = min(trials, total - done)
        if trials <= 0:
            _console.info(f"study '{st.study_name}' already holds {done} trained candidates (--total {total})")
            return
    stopper = StopWhenTrained(objective, trials, 0)
    sampler, name = worker_sampler(record, options.sampler)
    st.sampler = make_sampler(sampler, seed=worker_seed(record), trials=trials + done)
    _console.info(f"worker {os.getpid()}: {trials} candidate(s) of architecture search '{st.study_name}', "
                  f"sampler {name}")
    _optimize(st, objective, timeout=timeout, callbacks=[stopper])


def _optimize(st: Any, objective: NasObjective, *, timeout: float | None, callbacks: list[Any]) -> None:
    """The trials, with SIGTERM / Ctrl-C ending them cleanly (the trial in flight recorded as failed)."""
    with stop_signals() as stop:
        optimize(st, objective, n_trials=None, timeout=timeout, callbacks=[*callbacks, stop.callback])
    if stop.signum is not None:
        raise SearchInterrupted(f"architecture search interrupted by {signal_name(stop.signum)}: the trial in "
                                "flight is recorded as failed, the finished ones stay in the study. Run the same "
                                "command to resume and write the results.", stop.signum)
