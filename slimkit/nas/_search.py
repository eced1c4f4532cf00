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
import shutil
import socket
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .. import _console, _io
from ..data import DataBundle
from ..errors import ConfigError, SlimkitError
from ..pipeline import Recipe
from ._space import Arch, Family, Space, arch_summary, get_family
from ._table import LatencyTable, _space_arg, build_latency_table, relative_error

__all__ = ["nas", "NasResult", "NasObjective", "ParetoStop", "RecalibrateBN", "recalibrate_bn", "run_worker"]

TABLE_ATTR = "slimkit_nas_table"
FINAL_ATTR = "slimkit_nas_final"
NAS_FILES = ("best_arch.yaml",)
MAX_REJECTED_IN_A_ROW = 60  # proposals in a row rejected or already trained: stop


@dataclass
class NasResult:
    """What :func:`nas` returns: the best model trained fully (``None`` while the study holds no
    trained trial), its ONNX file, the ``result.json`` report, the output folder and the table."""

    model: nn.Module | None
    onnx_path: Path | None
    report: dict[str, Any] | None
    out: Path
    table: LatencyTable


def weight_kb(model: nn.Module) -> float:
    """KB of the conv / linear weights and biases (float32): a lower bound of the exported size."""
    n = sum(p.numel() for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))
            for p in m.parameters(recurse=False))
    return n * 4 / 1024


# ----------------------------------------------------------------------------- training hooks


class RecalibrateBN:
    """Re-estimate every batch norm's statistics on a few training batches at the end of each
    epoch, before the validation accuracy is measured.

    A candidate trained from scratch for a few dozen steps has running statistics far from its
    current weights' (momentum 0.1 has not caught up), so its validation accuracy in eval mode
    is near chance even when its training loss has dropped: the proxy would rank nothing. The
    statistics are reset and recomputed as a plain average (``momentum=None``) over
    ``batches`` training batches, in train mode without gradients (as Once-for-All does for
    its sub-networks).
    """

    def __init__(self, x_train: torch.Tensor, epochs: int, *, batches: int = 4, batch_size: int = 128, seed: int = 0):
        self.x = x_train
        self.epochs = max(1, int(epochs))
        self.batches = batches
        self.batch_size = batch_size
        self.seed = seed
        self.per_epoch = 1

    def on_train_begin(self, model: nn.Module, total_steps: int) -> None:
        self.per_epoch = max(1, total_steps // self.epochs)

    def on_step_end(self, model: nn.Module, step: int, total_steps: int) -> None:
        if step % self.per_epoch == 0:
            recalibrate_bn(model, self.x, batches=self.batches, batch_size=self.batch_size, seed=self.seed + step)


def recalibrate_bn(model: nn.Module, x: torch.Tensor, *, batches: int = 4, batch_size: int = 128, seed: int = 0) -> int:
    """Reset and re-estimate ``model``'s batch-norm statistics on ``batches`` batches of ``x``; returns how many."""
    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats]
    if not bns:
        return 0
    momenta = [b.momentum for b in bns]
    was = model.training
    idx = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))
    dev = next((p.device for p in model.parameters()), torch.device("cpu"))
    try:
        for b in bns:
            b.reset_running_stats()
            b.momentum = None  # a cumulative average over the batches below
        model.train()
        with torch.no_grad():
            for i in range(batches):
                chunk = idx[i * batch_size:(i + 1) * batch_size]
                if len(chunk) < 2:
                    break
                model(x[chunk].to(dev))
    finally:
        for b, m in zip(bns, momenta):
            b.momentum = m
        model.train(was)
    return len(bns)


# ----------------------------------------------------------------------------- early stopping


class ParetoStop:
    """The trials' pruner: after a proxy epoch (not the last), stop a candidate that is slower
    (by the table) than at least ``min_references`` finished candidates which all had a better
    validation accuracy at the same epoch: it is unlikely to reach the Pareto front.

    Also applies the ``compress`` search's rule (:class:`slimkit.search._objective.EarlyStop`):
    below the budget's accuracy floor and below every feasible trial at that epoch. Optuna's
    own ``trial.report`` / ``should_prune`` refuse multi-objective studies, hence a hook.
    """

    def __init__(self, trial: Any, floor: float | None, predicted_ms: float, epochs: int, *,
                 min_references: int = 2):
        from ..search._objective import EarlyStop

        self.base = EarlyStop(trial, floor, min_references=min_references)
        self.trial = trial
        self.predicted_ms = predicted_ms
        self.epochs = epochs
        self.min_references = min_references

    @property
    def curve(self) -> list[float]:
        return self.base.curve

    def on_epoch_end(self, model: nn.Module, epoch: int, val_accuracy: float) -> None:
        import optuna

        self.base.on_epoch_end(model, epoch, val_accuracy)
        step = len(self.curve) - 1
        if step + 1 >= self.epochs:
            return  # stopping after the last proxy epoch saves nothing
        better = []
        for t in self.trial.study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,)):
            curve = t.user_attrs.get("val_curve") or []
            pred = (t.user_attrs.get("prediction") or {}).get("predicted_ms")
            if pred is not None and pred <= self.predicted_ms and len(curve) > step and curve[step] > val_accuracy:
                better.append((t.number, curve[step]))
        if len(better) >= self.min_references:
            reason = (f"after proxy epoch {step + 1}, validation accuracy {val_accuracy:.4f} is below that of "
                      f"{len(better)} finished candidates predicted at most as slow (trials "
                      f"{', '.join(str(n) for n, _ in better[:5])})")
            self.trial.set_user_attr("pruned", reason)
            raise optuna.TrialPruned(reason)


# ----------------------------------------------------------------------------- one trial


def proxy_recipe(spec: str, *, teacher: bool, epochs: int, batches: int | None, lr: float, seed: int) -> Recipe:
    """How a candidate is trained: distilled from the teacher into the architecture ``spec``
    (``distill`` with a ``student``), or from the labels alone (``finetune``), then exported."""
    if teacher:
        step = {"distill": {"student": spec, "epochs": epochs, "lr": lr, "max_batches": batches, "seed": seed}}
    else:
        step = {"finetune": {"epochs": epochs, "lr": lr, "max_batches": batches, "distill": False, "seed": seed}}
    return Recipe.from_data([step, "export"])


class NasObjective:
    """``objective(trial) -> (latency ratio, size KB, validation accuracy)`` for ``study.optimize``.

    ``trained`` counts the trials this process trained (the rejected ones are not counted).
    """

    def __init__(self, session: Any, table: LatencyTable, family: Family, space: Space, *, total: int | None = None):
        self.s = session
        self.table = table
        self.family = family
        self.space = space
        self.total = total
        self.nas = session.cfg.extra["nas"]
        self.trained = 0
        self.rejected_in_a_row = 0

    def __call__(self, trial: Any) -> tuple[float, float, float]:
        import optuna

        from ..search._objective import apply_trial, describe_figures, record_failure, record_result, record_stopped

        s, cfg, nas = self.s, self.s.cfg, self.nas
        t0 = time.perf_counter()
        trial.set_user_attr("worker", {"host": socket.gethostname(), "pid": os.getpid()})
        arch = self.space.sample(trial)
        spec = self.family.spec(arch)
        model = self.family.build(arch, s.data.input_shape, s.data.num_classes)
        pred = self.table.predict(arch, model=model)["ms"]
        kb = weight_kb(model)
        summary = arch_summary(arch)
        b = str(self.table.batch)
        trial.set_user_attr("arch", arch)
        trial.set_user_attr("summary", summary)
        trial.set_user_attr("student", spec)
        trial.set_user_attr("prediction", {"predicted_ms": pred, "batch": self.table.batch, "weight_kb": kb})
        trial.set_user_attr("columns", {f"predicted_ms@{b}": round(pred, 5), "weight_kb": round(kb, 2)})
        count = f"/{self.total}" if self.total else ""
        over = {}
        limit = (s.budget.max_latency_ms or {}).get(self.table.batch)
        if limit is not None and pred > limit:
            over[f"latency_ms@{b}"] = (pred - limit, f"predicted latency {pred:.3g} ms > {limit:g} ms at batch {b}")
        if s.budget.max_size_kb is not None and kb > s.budget.max_size_kb:
            over["size_kb"] = (kb - s.budget.max_size_kb,
                               f"its weights alone take {kb:.1f} KB > {s.budget.max_size_kb:g} KB")
        same = self._trained_before(trial, arch)
        if same is not None and not over:
            return self._duplicate(trial, same, t0)
        if over:
            reason = "rejected before training: " + "; ".join(text for _, text in over.values())
            for key, (gap, _) in over.items():
                trial.set_constraint(key, gap)
            trial.set_user_attr("rejected", reason)
            trial.set_user_attr("pruned", reason)
            trial.set_user_attr("seconds", round(time.perf_counter() - t0, 3))
            self.rejected_in_a_row += 1
            _console.info(f"trial {trial.number}: {summary}: [yellow]{reason}[/yellow]")
            raise optuna.TrialPruned(reason)
        self.rejected_in_a_row = 0
        self.trained += 1
        recipe = proxy_recipe(spec, teacher=nas["teacher"], epochs=nas["proxy_epochs"], batches=nas["proxy_batches"],
                              lr=nas["lr"], seed=cfg.seed)
        apply_model: Any = s.model if nas["teacher"] else spec
        trial.set_user_attr("recipe", recipe.to_data())
        trial.set_user_attr("model", cfg.model if nas["teacher"] else spec)
        _console.info(f"[bold]trial {trial.number}[/bold] (trained {self.trained}{count}): {summary}, predicted "
                      f"{pred:.3g} ms @{b}")
        tdir = s.trial_dir(trial.number)
        stop = ParetoStop(trial, s.floor, pred, nas["proxy_epochs"])
        try:
            torch.manual_seed(cfg.seed)  # the candidate's initial weights (finetune builds it from the spec)
            with _console.muted() if not s.verbose else contextlib.nullcontext():
                res = apply_trial(recipe, apply_model, s.data, cfg, tdir,
                                  hooks=[stop, RecalibrateBN(s.data.x_train, nas["proxy_epochs"], seed=cfg.seed)])
        except optuna.TrialPruned as e:
            record_stopped(trial, tdir, t0, e)
            raise
        except Exception as e:
            record_failure(trial, tdir, t0, e)
            raise
        fig, cons, feasible, _ = record_result(trial, s, res, tdir, t0)
        measured = fig["latency_ms"][b]
        err = (pred - measured) / measured if measured > 0 else None
        trial.set_user_attr("prediction", {"predicted_ms": pred, "measured_ms": measured, "relative_error": err,
                                           "batch": self.table.batch, "weight_kb": kb})
        trial.set_user_attr("columns", {f"predicted_ms@{b}": round(pred, 5), "weight_kb": round(kb, 2),
                                        "prediction_error": None if err is None else round(err, 4)})
        _console.info("  " + describe_figures(fig, cfg.batch_sizes, feasible, cons)
                      + f"; predicted {pred:.3g} ms ({'-' if err is None else f'{err:+.0%}'})"
                      + f" ({time.perf_counter() - t0:.1f}s)")
        return fig["latency_ratio"], fig["size_kb"], fig["val_accuracy"]


    def _trained_before(self, trial: Any, arch: Arch) -> Any | None:
        import optuna

        for t in trial.study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,)):
            if t.user_attrs.get("arch") == arch and "figures" in t.user_attrs and not t.user_attrs.get("duplicate_of"):
                return t
        return None

    def _duplicate(self, trial: Any, same: Any, t0: float) -> tuple[float, float, float]:
        """The sampler proposed an architecture already trained: reuse that trial's figures."""
        from ..search._objective import constraint_values

        a = same.user_attrs
        for key in ("figures", "violations", "feasible", "prediction", "recipe", "model", "steps", "parity",
                    "artifacts", "val_curve"):
            if key in a:
                trial.set_user_attr(key, a[key])
        trial.set_user_attr("columns", {**(a.get("columns") or {}), "duplicate_of": same.number})
        trial.set_user_attr("duplicate_of", same.number)
        for key, value in constraint_values(self.s.budget, a["figures"], self.s.cfg.batch_sizes).items():
            trial.set_constraint(key, value)
        trial.set_user_attr("seconds", round(time.perf_counter() - t0, 3))
        self.rejected_in_a_row += 1
        _console.info(f"trial {trial.number}: {a.get('summary') or arch_summary(a['arch'])}: already trained in trial "
                      f"{same.number}; its figures are reused")
        f = a["figures"]
        return f["latency_ratio"], f["size_kb"], f["val_accuracy"]


class _StopWhenTrained:
    """Stop ``study.optimize`` once ``target`` trials were trained (rejections do not count), or
    when the sampler keeps proposing candidates the table rejects."""

    def __init__(self, objective: NasObjective, target: int | None, trained_before: int):
        self.objective = objective
        self.target = target
        self.trained_before = trained_before
        self.gave_up = False

    def __call__(self, study: Any, trial: Any) -> None:
        if self.target is not None and self.trained_before + self.objective.trained >= self.target:
            study.stop()
        elif self.objective.rejected_in_a_row >= MAX_REJECTED_IN_A_ROW:
            self.gave_up = True
            study.stop()


def _trained_count(study: Any) -> int:
    """Trials that trained a candidate (not those rejected by the table, nor repeats of a trained one)."""
    return sum((t.state.name in ("COMPLETE", "FAIL") and not t.user_attrs.get("duplicate_of"))
               or (t.state.name == "PRUNED" and not t.user_attrs.get("rejected"))
               for t in study.get_trials(deepcopy=False))


def _rejected_count(study: Any) -> int:
    return sum(bool(t.user_attrs.get("rejected")) for t in study.get_trials(deepcopy=False))


# ----------------------------------------------------------------------------- the search


def _check_args(objective: str, sampler: str, trials: int, timeout: float | None, proxy_epochs: int,
                proxy_batches: int | None, final_epochs: int, max_seconds: float, lr: float) -> None:
    from ..search._study import OBJECTIVES, SAMPLERS

    if objective not in OBJECTIVES:
        raise ConfigError(f"unknown objective '{objective}'; choose one of {', '.join(OBJECTIVES)}.", where="--objective")
    if sampler not in SAMPLERS:
        raise ConfigError(f"unknown sampler '{sampler}'; choose one of {', '.join(SAMPLERS)}.", where="--sampler")
    if trials < 0:
        raise ConfigError(f"must be >= 0, got {trials}.", where="--trials")
    if timeout is not None and timeout <= 0:
        raise ConfigError(f"must be > 0 seconds, got {timeout}.", where="--timeout")
    if proxy_epochs < 1:
        raise ConfigError(f"must be >= 1, got {proxy_epochs}.", where="--proxy-epochs")
    if proxy_batches is not None and proxy_batches < 1:
        raise ConfigError(f"must be >= 1, got {proxy_batches}.", where="--proxy-batches")
    if final_epochs < 0:
        raise ConfigError(f"must be >= 0 (0: keep the best candidate as the search trained it), got {final_epochs}.",
                          where="--final-epochs")
    if max_seconds <= 0:
        raise ConfigError(f"must be > 0, got {max_seconds}.", where="--max-seconds")
    if not 0 < lr < 10:
        raise ConfigError(f"must be in (0, 10), got {lr}.", where="--lr")


def _resolve_table(table: LatencyTable | str | Path | None, stored: dict[str, Any] | None, out: Path, *,
                   fam: Family, space: Space, target: str, batch: int, threads: int, bundle: DataBundle,
                   rounds: int, seed: int) -> LatencyTable:
    """The table a search uses: given, stored in the study (resume, workers), in ``out``, or built now."""
    need = dict(family=fam.name, space=space, target=target, batch=batch, threads=threads,
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
    return build_latency_table(fam, bundle, target=target, batch=batch, threads=threads, space=space, rounds=rounds,
                               out=path, seed=seed)


def _check_budget(table: LatencyTable, space: Space, fam: Family, bundle: DataBundle, limit_ms: float | None,
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
    family: str,
    data: DataBundle | str = "digits",
    *,
    teacher: nn.Module | str | None = None,
    teacher_weights: str | Path | None = None,
    trust_pickle: bool = False,
    target: str = "ort-cpu",
    batch: int = 1,
    threads: int | None = None,
    space: Space | dict[str, Any] | str | Path | None = None,
    latency_table: LatencyTable | str | Path | None = None,
    max_latency_ms: float | None = None,
    max_size_kb: float | None = None,
    max_accuracy_drop: float | None = None,
    objective: str = "accuracy",
    trials: int = 20,
    timeout: float | None = None,
    sampler: str = "tpe",
    storage: str | None = None,
    study: str | None = None,
    out: str | Path = "runs/nas",
    overwrite: bool = False,
    seed: int = 0,
    max_seconds: float = 1.0,
    proxy_epochs: int = 2,
    proxy_batches: int | None = 50,
    final_epochs: int = 10,
    final_batches: int | None = None,
    lr: float = 2e-3,
    val_size: int | None = None,
    table_rounds: int = 7,
    verbose: bool = False,
) -> NasResult:
    """Search ``family``'s architectures for the best one within a latency / size budget on ``target``.

    Candidates the latency table predicts over ``max_latency_ms`` (at batch ``batch``), or
    whose weights alone exceed ``max_size_kb``, are rejected before any training; the others
    are trained for ``proxy_epochs`` epochs of at most ``proxy_batches`` batches (distilled from
    ``teacher`` if given), exported, measured and judged; ``trials`` counts trained candidates.
    The best by ``objective`` (default: the most accurate within budget) is then trained for
    ``final_epochs`` and exported. The table is ``latency_table`` (a file or object), or built
    into ``out/latency_table.json``. ``val_size``: validation examples the candidates are judged
    on (a fixed subset; quicker on big data). Same storage, resume and worker as ``compress``.

    >>> res = nas("mobilenetv2", "digits", max_latency_ms=0.5, trials=10, out="runs/nas")  # doctest: +SKIP
    >>> res.report["best"]["arch"]  # doctest: +SKIP
    """
    import optuna

    from ..data import resolve_data
    from ..models import resolve_model
    from ..measure import default_threads
    from ..measure.backends import get_backend
    from ..models import save_model
    from ..search._objective import Session, measure_baseline
    from ..search._run import _clean_outputs, _quiet_optuna
    from ..search._study import (BASELINE_ATTR, DIRECTIONS, METRICS, STUDY_ATTR, Budget, SearchConfig,
                                 default_storage, file_sha256, open_storage, redact, study_names,
                                 validation_subset)

    _check_args(objective, sampler, trials, timeout, proxy_epochs, proxy_batches, final_epochs, max_seconds, lr)
    fam = get_family(family)
    sp = _space_arg(fam, space)
    get_backend(target)
    batch = int(batch)
    if batch < 1:
        raise ConfigError(f"must be >= 1, got {batch}.", where="--batch")
    if teacher_weights is not None and teacher is None:
        raise SlimkitError("--teacher-weights needs --teacher (the architecture the weights belong to).")
    if max_accuracy_drop is not None and teacher is None:
        raise SlimkitError("--max-accuracy-drop is measured against the teacher; give --teacher (and "
                           "--teacher-weights), or leave the limit out.")
    budget = Budget.of((batch,), max_latency_ms=max_latency_ms, max_size_kb=max_size_kb,
                       max_accuracy_drop=max_accuracy_drop)
    threads = int(threads or default_threads())
    _quiet_optuna()
    out = Path(out)
    url = storage or default_storage(out)
    name = study or out.resolve().name or "slimkit-nas"
    # bad data or a bad teacher fails here, before anything is created or a previous search removed
    if val_size is not None and val_size < 10:
        raise ConfigError(f"must be >= 10 examples, got {val_size}.", where="--val-size")
    bundle = validation_subset(resolve_data(data, seed), val_size, seed)
    if len(bundle.input_shape) != 3:
        raise SlimkitError(f"family '{fam.name}' is convolutional and needs image data shaped (C, H, W); "
                           f"{bundle.name} has examples shaped {bundle.input_shape}.")
    teacher_net = (resolve_model(teacher, bundle, weights=teacher_weights, trust_pickle=trust_pickle)
                   if teacher is not None else None)
    if overwrite:
        _clean_outputs(out, storage is not None)
        for extra in NAS_FILES:
            (out / extra).unlink(missing_ok=True)
        shutil.rmtree(out / "final", ignore_errors=True)
    if out.exists() and not out.is_dir():
        raise SlimkitError(f"--out {out} exists and is a file, not a folder; choose a folder path.")
    out.mkdir(parents=True, exist_ok=True)
    store = open_storage(url)
    resuming = name in study_names(store)
    if resuming and overwrite:
        optuna.delete_study(study_name=name, storage=store)
        resuming = False
    if not resuming:
        _io.prepare_out_dir(out, overwrite=overwrite, inputs=[teacher_weights])

    stored_table = None
    if resuming:
        existing = optuna.load_study(study_name=name, storage=store)
        stored_table = existing.user_attrs.get(TABLE_ATTR)
    table = _resolve_table(latency_table, stored_table, out, fam=fam, space=sp, target=target, batch=batch,
                           threads=threads, bundle=bundle, rounds=table_rounds, seed=seed)
    limit = (budget.max_latency_ms or {}).get(batch)
    feasibility = _check_budget(table, sp, fam, bundle, limit, budget.max_size_kb)
    _console.info(f"{table.describe()}; fastest architecture of the space predicted at "
                  f"{feasibility['fastest_predicted_ms']:.3g} ms")

    # the baseline: the teacher, or (without one) the space's largest architecture, untrained
    if teacher is not None:
        net = teacher_net
        spec, weights_path = (teacher, teacher_weights) if isinstance(teacher, str) else (None, teacher_weights)
        from ..models import origin_of

        if not isinstance(teacher, str) and teacher_weights is None and origin_of(net).get("model"):
            weights_path = save_model(net, out / "input.safetensors")  # so workers can rebuild it
            spec = origin_of(net)["model"]
        baseline_is = "teacher"
    else:
        largest = sp.largest()
        torch.manual_seed(seed)
        net = resolve_model(fam.spec(largest), bundle)
        spec, weights_path = fam.spec(largest), None
        baseline_is = f"the space's largest architecture ({arch_summary(largest)}), untrained: a latency and size " \
                      "reference only"
    nas_cfg = {"family": fam.name, "space": sp.to_data(), "teacher": teacher is not None, "proxy_epochs": proxy_epochs,
               "proxy_batches": proxy_batches, "lr": lr, "final_epochs": final_epochs, "final_batches": final_batches,
               "table_digest": table.data.get("space_digest"), "baseline_is": baseline_is}
    cfg = SearchConfig(
        model=spec, weights=str(Path(weights_path).resolve()) if weights_path else None,
        weights_sha256=file_sha256(weights_path), data=data if isinstance(data, str) else bundle.name,
        target=target, batch_sizes=[batch], threads=threads, budget=budget.to_data(), seed=seed,
        trust_pickle=trust_pickle, objective=objective, max_seconds=max_seconds,
        out=str(out.resolve()), val_size=val_size, extra={"kind": "nas", "sampler": sampler, "nas": nas_cfg},
    )
    st = optuna.create_study(study_name=name, storage=store, directions=list(DIRECTIONS), load_if_exists=True)
    stored = st.user_attrs.get(STUDY_ATTR)
    if stored is None:
        if st.get_trials(deepcopy=False):
            raise SlimkitError(f"study '{name}' in {redact(url)} was not made by slimkit nas; choose another --study.")
        st.set_metric_names(list(METRICS))
        st.set_user_attr(STUDY_ATTR, cfg.to_data())
    else:
        old = SearchConfig.from_data(stored)
        if old.extra.get("kind") != "nas":
            raise SlimkitError(f"{out} holds a slimkit compress search ('{name}'), not an architecture search; choose "
                               "another --out (or --study), or pass --overwrite to replace it.")
        diffs = cfg.differences(old)
        keys = ("family", "space", "teacher", "proxy_epochs", "proxy_batches", "lr")
        diffs += [f"{k}: {old.extra['nas'].get(k)!r} (stored) vs {nas_cfg[k]!r} (now)" for k in keys
                  if old.extra["nas"].get(k) != nas_cfg[k]]
        if diffs:
            raise SlimkitError(
                f"{out} already holds architecture search '{name}' with other settings ({'; '.join(diffs)}). Run the "
                "same command to resume it, pass --overwrite to start a new search there, or choose another --out "
                "(or --study).")
        st.set_user_attr(STUDY_ATTR, cfg.to_data())
    if st.user_attrs.get(TABLE_ATTR) is None or LatencyTable(st.user_attrs[TABLE_ATTR]).mismatches(
            family=fam.name, space=sp, target=target, batch=batch, threads=threads, input_shape=bundle.input_shape,
            num_classes=bundle.num_classes):
        st.set_user_attr(TABLE_ATTR, table.data)

    baseline = st.user_attrs.get(BASELINE_ATTR)
    if baseline is None:
        with _console.status(f"measuring the baseline ({'teacher' if teacher is not None else 'reference'}) on "
                             f"{target} ({threads} threads)"):
            baseline = measure_baseline(net, bundle, cfg, out)
        st.set_user_attr(BASELINE_ATTR, baseline)
    b = baseline["val"]
    _console.info(f"baseline ({'teacher' if teacher is not None else 'reference, untrained'}): val "
                  f"{b['accuracy']:.4f}, {b['latency_ms'][str(batch)]['median']:.3g} ms @{batch}, "
                  f"{b['artifact_bytes'] / 1024:.1f} KB")
    _console.info("budget: " + ("; ".join(budget.describe((batch,))) or "none (every candidate is feasible)"))

    session = Session(cfg, baseline, artifacts=out, data=bundle, model=net, verbose=verbose)
    res = _optimize(st, session, table, fam, sp, trials=trials, timeout=timeout, sampler=sampler, seed=seed,
                    label=f"study '{name}' in {redact(url)}", shared=storage is not None)
    if not _trained_count(st):
        _console.info(f"study '{name}' holds no trained candidate yet ({_rejected_count(st)} rejected); add trials "
                      f"with slimkit worker --storage {redact(url)} --study {name} --trials N, or run again.")
        return NasResult(None, None, None, out, table)
    report = _write(st, session, table, url, out, feasibility, gave_up=res)
    from ..models import load_model

    best = load_model(weights=out / "best.safetensors", input_shape=bundle.input_shape,
                      num_classes=bundle.num_classes)
    return NasResult(best, out / "best.onnx", report, out, table)


def _optimize(st: Any, session: Any, table: LatencyTable, fam: Family, sp: Space, *, trials: int | None,
              timeout: float | None, sampler: str, seed: int, label: str, shared: bool) -> bool:
    """Run trials until ``trials`` candidates were trained in the study; True if the sampler kept
    proposing rejected candidates and the search gave up."""
    from ..search._run import make_sampler

    done = _trained_count(st)
    remaining = None if trials is None else trials - done
    if done:
        _console.info(f"resuming {label}: {done} candidate(s) trained, {_rejected_count(st)} rejected"
                      + (f", {max(remaining, 0)} to go" if remaining is not None else ""))
    if remaining is not None and remaining <= 0:
        return False
    objective = NasObjective(session, table, fam, sp, total=trials)
    stopper = _StopWhenTrained(objective, trials, done)
    st.sampler = make_sampler(sampler, seed=seed + len(st.get_trials(deepcopy=False)),
                              trials=max(trials or 10, 10))
    _console.info(f"searching: {remaining if remaining is not None else 'more'} candidate(s) to train, sampler "
                  f"{sampler}; {label}" + (f"; join with: slimkit worker --storage URL --study {st.study_name} "
                                           "--trials N" if shared else ""))
    st.optimize(objective, n_trials=None, timeout=timeout, catch=(Exception,), gc_after_trial=True,
                callbacks=[stopper])
    if stopper.gave_up:
        _console.info(f"[yellow]stopped: the last {MAX_REJECTED_IN_A_ROW} candidates were all rejected by the "
                      "latency table or already trained: the budget leaves little of the space untried (relax it, "
                      "or widen the space)[/yellow]")
    return stopper.gave_up


def run_worker(st: Any, cfg: Any, baseline: dict[str, Any], *, trials: int, timeout: float | None,
               out: Path | None, sampler: str | None, verbose: bool, total: int | None = None) -> None:
    """``slimkit worker`` on an architecture search: ``trials`` more trained candidates here (fewer
    if the study holds ``total`` trained candidates first)."""
    from ..search._objective import Session
    from ..search._run import make_sampler

    table_data = st.user_attrs.get(TABLE_ATTR)
    if table_data is None:
        raise SlimkitError(f"study '{st.study_name}' has no latency table yet: its slimkit nas is still measuring it; "
                           "start the worker again in a moment.")
    table = LatencyTable(table_data)
    nas_cfg = cfg.extra["nas"]
    fam = get_family(nas_cfg["family"])
    sp = _space_arg(fam, nas_cfg["space"])
    session = Session(cfg, baseline, artifacts=Path(out) if out else Path(cfg.out or "."), verbose=verbose)
    objective = NasObjective(session, table, fam, sp, total=trials)
    done = _trained_count(st)
    if total is not None:
        trials = min(trials, total - done)
        if trials <= 0:
            _console.info(f"study '{st.study_name}' already holds {done} trained candidates (--total {total})")
            return
    stopper = _StopWhenTrained(objective, trials, 0)
    name = sampler or cfg.extra.get("sampler", "tpe")
    st.sampler = make_sampler(name, seed=cfg.seed + 1 + os.getpid(), trials=trials + _trained_count(st))
    _console.info(f"worker {os.getpid()}: {trials} candidate(s) of architecture search '{st.study_name}', "
                  f"sampler {name}")
    st.optimize(objective, n_trials=None, timeout=timeout, catch=(Exception,), gc_after_trial=True,
                callbacks=[stopper])


# ----------------------------------------------------------------------------- results


def _final(st: Any, session: Any, out: Path) -> Any:
    """``final(best_trial)`` for ``write_results``: the best architecture trained fully (or kept)."""

    def final(best: Any) -> dict[str, Any]:
        from ..search._objective import apply_trial

        cfg, nas = session.cfg, session.cfg.extra["nas"]
        spec = best.user_attrs["student"]
        model_arg = cfg.model if nas["teacher"] else spec
        if not nas["final_epochs"]:
            return {"folder": Path(best.user_attrs["artifacts"]), "recipe": best.user_attrs["recipe"],
                    "model": model_arg, "note": f"trial {best.number}'s candidate as the search trained it"}
        recipe = proxy_recipe(spec, teacher=nas["teacher"], epochs=nas["final_epochs"], batches=nas["final_batches"],
                              lr=nas["lr"], seed=cfg.seed)
        folder = out / "final"
        done = st.user_attrs.get(FINAL_ATTR) or {}
        if not (done.get("trial") == best.number and done.get("recipe") == recipe.to_data()
                and (folder / "model.onnx").is_file() and (folder / "model.safetensors").is_file()):
            _console.info(f"training the best architecture (trial {best.number}: {best.user_attrs['summary']}) fully: "
                          f"{nas['final_epochs']} epochs" + (" distilled from the teacher" if nas["teacher"] else ""))
            torch.manual_seed(cfg.seed)
            t0 = time.perf_counter()
            apply_trial(recipe, session.model if nas["teacher"] else spec, session.data, cfg, folder,
                        hooks=[RecalibrateBN(session.data.x_train, nas["final_epochs"], seed=cfg.seed)])
            st.set_user_attr(FINAL_ATTR, {"trial": best.number, "recipe": recipe.to_data(),
                                          "seconds": round(time.perf_counter() - t0, 1)})
        else:
            _console.info(f"the best architecture (trial {best.number}) was already trained fully in {folder}")
        return {"folder": folder, "recipe": recipe.to_data(), "model": model_arg,
                "note": f"trial {best.number}'s architecture trained fully ({nas['final_epochs']} epochs)"}

    return final


def _prediction_summary(st: Any, table: LatencyTable) -> dict[str, Any]:
    rows = []
    for t in st.get_trials(deepcopy=False):
        p = t.user_attrs.get("prediction") or {}
        if t.state.name == "COMPLETE" and p.get("measured_ms") and not t.user_attrs.get("duplicate_of"):
            rows.append({"trial": t.number, "predicted_ms": p["predicted_ms"], "measured_ms": p["measured_ms"],
                         "relative_error": relative_error(p["predicted_ms"], p["measured_ms"])})
    errors = [r["relative_error"] for r in rows]
    return {
        "batch": table.batch,
        "table": table.describe(),
        "table_measured": table.data.get("measured"),
        "pairs": rows,
        "mean_relative_error": sum(errors) / len(errors) if errors else None,
        "max_relative_error": max(errors) if errors else None,
        "target": 0.10,
    }


def _write(st: Any, session: Any, table: LatencyTable, url: str, out: Path, feasibility: dict[str, Any], *,
           gave_up: bool) -> dict[str, Any]:
    import yaml

    from ..search._results import write_results

    trials = st.get_trials(deepcopy=False)
    extra = {
        "command": "nas",
        "family": session.cfg.extra["nas"]["family"],
        "space": session.cfg.extra["nas"]["space"],
        "baseline_is": session.cfg.extra["nas"]["baseline_is"],
        "latency_prediction": _prediction_summary(st, table),
        "feasibility": feasibility,
        "rejected": _rejected_count(st),
        "gave_up": gave_up,
    }
    try:
        report = write_results(st, session, storage=url, out=out, final=_final(st, session, out), extra=extra)
    finally:
        _console.info(f"{len(trials)} trials: {_trained_count(st)} trained, {extra['rejected']} rejected by the "
                      "latency table before training")
        lp = extra["latency_prediction"]
        if lp["mean_relative_error"] is not None:
            _console.info(f"latency prediction: mean relative error {lp['mean_relative_error']:.1%} over "
                          f"{len(lp['pairs'])} trained candidates (target <= 10%)")
    best = next(t for t in trials if t.number == report["best"]["trial"])
    pred = best.user_attrs.get("prediction") or {}
    text = yaml.safe_dump({
        "family": extra["family"],
        "arch": best.user_attrs["arch"],
        "model": best.user_attrs["student"],
        "predicted_latency_ms": {table.batch: round(pred.get("predicted_ms", 0.0), 5)},
        "measured_latency_ms": {int(k): round(v["median"], 5) for k, v in report["result"]["latency_ms"].items()},
        "test_accuracy": report["result"]["accuracy"],
    }, sort_keys=False)
    _io.write_text(out / "best_arch.yaml",
                   f"# slimkit nas: the best architecture, trial {best.number} of study '{st.study_name}'\n"
                   f"# its weights: best.safetensors; rebuild it with --model '{best.user_attrs['student']}'\n" + text)
    report["files"]["arch"] = str(out / "best_arch.yaml")
    _io.write_json(out / "result.json", report)
    return report
