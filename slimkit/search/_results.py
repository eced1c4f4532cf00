"""The search's results: best model, recipe, every trial, the Pareto front, the report.

Written into the output folder, each file atomically:

- ``best.onnx``, ``best.safetensors``: the best feasible trial's artifacts (by ``--objective``);
- ``best_recipe.yaml``: its recipe, replayable with ``slimkit apply``;
- ``trials.csv``: one row per trial (state, recipe, every figure, why it failed or stopped);
- ``result.json``: the baseline and the best model measured on the *test* split (same keys as
  ``slimkit profile --json``), the best trial's search figures, the Pareto front with test
  accuracy, counts; when nothing met the budget, what was not met and the closest trials;
- ``report.html``: a self-contained page (see :mod:`slimkit.report.html`).
"""

from __future__ import annotations

import copy
import math
import shlex
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .. import _console, _io
from .._provenance import run_info
from ..errors import NoFeasibleTrialError
from ..measure import Target, profile
from ..measure.timing import medians, side_by_side
from ..models import load_model, save_model
from ..pipeline import SLOWER_MARGIN, Recipe, recipe_summary, time_side_by_side
from ..report.html import render_report
from ._record import RESULT_FILES, SearchRecord
from ._study import redact
from ._trial import Session, apply_trial, constraint_limits, constraint_values, trial_verdicts, verdict_text

__all__ = ["write_results", "trial_rows", "pick_best", "baseline_test", "RESULT_FILES"]

_SELECT = {
    "latency": lambda f: (f["latency_ratio"], -f["val_accuracy"], f["size_kb"]),
    "size": lambda f: (f["size_kb"], f["latency_ratio"], -f["val_accuracy"]),
    "accuracy": lambda f: (-f["val_accuracy"], f["latency_ratio"], f["size_kb"]),
}


def _is_feasible(t: Any) -> bool:
    return t.state.name == "COMPLETE" and bool(t.user_attrs.get("feasible")) and "figures" in t.user_attrs


def pick_best(trials: list[Any], objective: str) -> Any | None:
    feasible = [t for t in trials if _is_feasible(t)]
    if not feasible:
        return None
    return min(feasible, key=lambda t: (_SELECT[objective](t.user_attrs["figures"]), t.number))


def trial_rows(trials: list[Any], cfg: SearchRecord, pareto: set[int], best: int | None) -> list[dict[str, Any]]:
    """One flat row per trial (for trials.csv and the report's table)."""
    rows = []
    for t in sorted(trials, key=lambda t: t.number):
        a = t.user_attrs
        fig = a.get("figures") or {}
        recipe = a.get("recipe")
        note = ""
        if a.get("error"):
            note = f"{a['error']['type']}: {a['error']['message'].splitlines()[0] if a['error']['message'] else ''}"
        elif a.get("rejected"):  # slimkit nas: over budget by the latency table, never trained
            note = a["rejected"]
        elif a.get("pruned"):
            note = "stopped early: " + a["pruned"]
        elif t.state.name == "FAIL":
            note = str(t.system_attrs.get("fail_reason", "failed (process lost)"))[:300]
        row: dict[str, Any] = {
            "trial": t.number,
            "state": "rejected" if a.get("rejected") else
                     {"COMPLETE": "complete", "PRUNED": "stopped early"}.get(t.state.name, t.state.name.lower()),
            "feasible": a.get("feasible") if t.state.name == "COMPLETE" else None,
            "pareto": t.number in pareto,
            "best": t.number == best,
            "recipe": a.get("summary") or (recipe_summary(recipe, t.params) if recipe else ""),
            "val_accuracy": fig.get("val_accuracy"),
            "accuracy_drop_pts": None if "accuracy_drop" not in fig else round(fig["accuracy_drop"] * 100, 3),
        }
        for b in cfg.batch_sizes:
            row[f"latency_ms@{b}"] = (fig.get("latency_ms") or {}).get(str(b))
            row[f"speedup@{b}"] = (fig.get("speedup") or {}).get(str(b))
        row.update({
            "latency_ratio": fig.get("latency_ratio"),
            "size_kb": fig.get("size_kb"),
            "params": fig.get("params"),
            "nonzero_params": fig.get("nonzero_params"),
            "macs": fig.get("macs"),
            "over_budget": "; ".join(f"{k} by {v:.4g}" for k, v in (a.get("violations") or {}).items()),
            "step_speed": "; ".join(verdict_text(r) for r in trial_verdicts(a)),
            "seconds": a.get("seconds"),
            "val_curve": " ".join(f"{v:.4f}" for v in a.get("val_curve", [])),
            "note": note,
            "worker": f"{a['worker']['host']}:{a['worker']['pid']}" if a.get("worker") else "",
        })
        row.update(a.get("columns") or {})  # a search's own figures (slimkit nas: predicted latency)
        for k, v in sorted(t.params.items()):
            row[f"param:{k}"] = v
        rows.append(row)
    return rows


def _artifacts(trial: Any, session: Session) -> tuple[Path, str | None]:
    """The trial's files; rebuilt here from its recipe if they are not reachable (another machine)."""
    path = Path(trial.user_attrs.get("artifacts", ""))
    if (path / "model.onnx").is_file() and (path / "model.safetensors").is_file():
        return path, None
    where = session.trial_dir(trial.number)
    _console.info(f"trial {trial.number}'s files are not reachable here ({path}); rebuilding them from its recipe")
    with _console.muted():
        apply_trial(trial.user_attrs["recipe"], trial.user_attrs.get("model") or session.model, session.data,
                    session.record, where)
    return where, f"rebuilt from its recipe on this machine (the trial ran on {trial.user_attrs.get('worker')})"


def _measure_test(session: Session, folder: Path, *, onnx: str = "model.onnx", weights: str = "model.safetensors",
                  batch_sizes: list[int], layers: bool) -> dict[str, Any]:
    """A trial's (or the best model's) files measured on the *test* split (``weights`` for torch-cpu)."""
    cfg = session.record
    model = None
    if cfg.target != "ort-cpu":
        model = load_model(weights=folder / weights, input_shape=session.data.input_shape,
                           num_classes=session.data.num_classes)
    target = Target(cfg.target, tuple(batch_sizes) or (1,), cfg.threads, max(cfg.max_seconds, 1.0), layers=layers)
    return profile(model, session.data, target, onnx_path=folder / onnx if cfg.target == "ort-cpu" else None,
                   split="test", latency=bool(batch_sizes))


def baseline_test(baseline: dict[str, Any]) -> dict[str, Any]:
    """The baseline as ``result.json`` shows it: test accuracy, with the validation one beside it."""
    b = copy.deepcopy(baseline["val"])
    b["val_accuracy"] = b["accuracy"]
    b["accuracy"] = baseline["test_accuracy"]
    return b


def _unmet(trials: list[Any], cfg: SearchRecord) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Which constraints no complete trial met (alone), and the trials closest to the budget."""
    done = [t for t in trials if t.state.name == "COMPLETE" and "figures" in t.user_attrs]
    limits = constraint_limits(cfg.budget_obj, cfg.batch_sizes)
    per_trial = {t.number: constraint_values(cfg.budget_obj, t.user_attrs["figures"], cfg.batch_sizes) for t in done}
    unmet = []
    for key, limit in limits.items():
        vals = [(v[key], n) for n, v in per_trial.items()]
        if vals and min(vals)[0] > 0:
            gap, n = min(vals)
            unmet.append({"constraint": key, "limit": limit, "closest_trial": n, "short_by": gap})
    scored = sorted(per_trial.items(), key=lambda kv: sum(max(0.0, v) / max(abs(limits[k]), 1e-12)
                                                          for k, v in kv[1].items()))
    closest = []
    for n, cons in scored[:5]:
        t = next(t for t in done if t.number == n)
        closest.append({"trial": n, "recipe": t.user_attrs["recipe"], "figures": t.user_attrs["figures"],
                        "over_budget": {k: v for k, v in cons.items() if v > 0}})
    return unmet, closest


def _describe_constraint(key: str) -> str:
    if key.startswith("latency_ms@"):
        return f"latency at batch {key.split('@')[1]} (ms)"
    if key.startswith("throughput@"):
        return f"throughput at batch {key.split('@')[1]} (examples/s)"
    return {"size_kb": "artifact size (KB)", "accuracy_drop": "validation accuracy drop"}.get(key, key)


def write_results(study: Any, session: Session, *, storage: str, out: Path,
                  final: Callable[[Any], dict[str, Any]] | None = None,
                  extra: dict[str, Any] | None = None, confirm: bool = True) -> dict[str, Any]:
    """Write every result file; raise :class:`NoFeasibleTrialError` (after writing) if nothing met the budget.

    ``final(best_trial)``, the search's final stage (``slimkit nas``: the best architecture
    trained fully; ``compress``: its finalists fine-tuned fully, :mod:`slimkit.search._final`),
    returns the ``folder`` holding the model that becomes ``best.*`` (``None``: the best trial's
    own files), its ``recipe``, the ``model`` it applies to and a ``note``; a stage that chooses
    among several candidates also returns the ``trial`` whose recipe won, its validation
    ``figures`` and the ``finalists`` it compared (``result.json`` and the report show them).
    ``confirm``: re-time the fastest trials side by side to pick the best (a stage that times its
    candidates itself needs no such step). ``extra`` is merged into ``result.json`` (and the report).
    """
    cfg = session.record
    out = Path(out)
    trials = study.get_trials(deepcopy=False)
    finished = [t for t in trials if t.state.name in ("COMPLETE", "PRUNED", "FAIL")]
    best_t = pick_best(trials, cfg.objective)
    confirmed = None
    if best_t is not None and confirm and cfg.objective == "latency" and cfg.target == "ort-cpu":
        best_t, confirmed = _confirm_fastest(trials, session)
    done = final(best_t) if final is not None and best_t is not None else None
    if done and done.get("trial") is not None:
        best_t = done["trial"]  # the final stage's winner
    pareto_ts = [t for t in study.best_trials if "figures" in t.user_attrs] if best_t is not None else []
    pareto_ts = [t for t in pareto_ts if t.user_attrs.get("feasible")]
    if best_t is not None and best_t not in pareto_ts:
        # re-timed side by side, the best was the fastest feasible trial: on the front by those timings
        pareto_ts.append(best_t)
    pareto = {t.number for t in pareto_ts}
    rows = trial_rows(trials, cfg, pareto, best_t.number if best_t else None)
    counts = {
        "total": len(finished),
        "complete": sum(t.state.name == "COMPLETE" for t in trials),
        "stopped_early": sum(t.state.name == "PRUNED" for t in trials),
        "failed": sum(t.state.name == "FAIL" for t in trials),
        "running": sum(t.state.name == "RUNNING" for t in trials),
        "within_budget": sum(_is_feasible(t) for t in trials),
        "pareto": len(pareto),
    }
    report: dict[str, Any] = {
        "study": study.study_name,
        "storage": redact(storage),
        "model": cfg.model,
        "weights": cfg.weights,
        "data": cfg.data,
        "batch_sizes": cfg.batch_sizes,
        "objective": cfg.objective,
        "objectives": {"latency_ratio": "minimize", "size_kb": "minimize", "val_accuracy": "maximize"},
        "budget": cfg.budget,
        "budget_text": cfg.budget_obj.describe(tuple(cfg.batch_sizes)),
        "baseline": baseline_test(session.baseline),
        "trials": counts,
        **run_info(cfg.target, cfg.threads),
        **(extra or {}),
    }
    files = {"trials": str(out / "trials.csv"), "report": str(out / "report.html"), "result": str(out / "result.json")}
    _io.atomic_write(out / "trials.csv", lambda p: _write_csv(p, rows))

    if best_t is None:
        unmet, closest = _unmet(trials, cfg)
        report.update(result=None, best=None, pareto=[], unmet=unmet, closest=closest, files=files)
        for stale in ("best.onnx", "best.safetensors", "best_recipe.yaml"):
            (out / stale).unlink(missing_ok=True)
        _io.write_text(out / "report.html", render_report(report, rows))
        _io.write_json(out / "result.json", report)
        raise NoFeasibleTrialError(_no_feasible_message(report, trials, out))

    chosen = done is not None and done.get("trial") is not None  # the final stage's winner, in its own folder
    folder, rebuilt = (done["folder"], None) if chosen else _artifacts(best_t, session)
    best_folder = done["folder"] if done and done.get("folder") is not None else folder
    _io.atomic_write(out / "best.onnx", lambda p: shutil.copyfile(best_folder / "model.onnx", p))
    _io.atomic_write(out / "best.safetensors", lambda p: shutil.copyfile(best_folder / "model.safetensors", p))
    recipe = Recipe.from_data(done["recipe"] if done else best_t.user_attrs["recipe"])
    command = (extra or {}).get("command", "compress")
    _io.write_text(out / "best_recipe.yaml",
                   f"# slimkit {command}: trial {best_t.number} of study '{study.study_name}' (best by {cfg.objective})"
                   f"{'; ' + done['note'] if done else ''}\n"
                   f"# replay: slimkit apply {out / 'best_recipe.yaml'} --model "
                   f"{shlex.quote((done or {}).get('model') or cfg.model or 'M')}"
                   f"{' --weights ' + cfg.weights if cfg.weights else ''} --data {cfg.data} --target {cfg.target}\n"
                   + recipe.to_yaml())
    with _console.status("measuring the best model on the test split"):
        result = _measure_test(session, out, onnx="best.onnx", weights="best.safetensors",
                               batch_sizes=cfg.batch_sizes, layers=True)
    headline = _headline(report["baseline"], result, session, out)
    returned = None
    if headline:
        # slower beyond the timing's own noise: a fine-tune-only best is the input's architecture
        margin = {b: max(SLOWER_MARGIN, *(f["latency_ms"][b].get("spread", 0.0) for f in (report["baseline"], result)))
                  for b in headline["speedup"]}
        slower = sorted((b for b, x in headline["speedup"].items() if x < 1.0 - margin[b]), key=int)
        if slower and command == "compress" and cfg.objective == "latency" and len(slower) == len(headline["speedup"]):
            result, returned = _return_baseline(report, best_t, headline, session, out)
        elif slower:
            _console.info(f"[bold red]the best trial is slower than the input model[/bold red] at batch "
                          f"{', '.join(slower)} (timed side by side: "
                          + ", ".join(f"{headline['speedup'][b]:.2f}x @{b}" for b in slower) + ")")
            headline["slower_at"] = slower
    pareto_rows = []
    for t in sorted(pareto_ts, key=lambda t: t.user_attrs["figures"]["latency_ratio"]):
        f_dir, _ = (folder, rebuilt) if t.number == best_t.number else _artifacts(t, session)
        test_acc = result["accuracy"] if t.number == best_t.number else \
            _measure_test(session, f_dir, batch_sizes=[], layers=False)["accuracy"]
        pareto_rows.append({"trial": t.number, "recipe": t.user_attrs["recipe"], "params": t.params,
                            "summary": t.user_attrs.get("summary"),
                            "search": t.user_attrs["figures"],
                            "test_accuracy": test_acc, "best": t.number == best_t.number})
    files.update(onnx=str(out / "best.onnx"), weights=str(out / "best.safetensors"), recipe=str(out / "best_recipe.yaml"))
    report.update(
        result=result,
        best={"trial": best_t.number, "recipe": best_t.user_attrs["recipe"], "params": best_t.params,
              "search": best_t.user_attrs["figures"], "steps": best_t.user_attrs.get("steps"),
              "verdicts": trial_verdicts(best_t.user_attrs) or None, **({"rebuilt": rebuilt} if rebuilt else {}),
              **({"confirmed": confirmed} if confirmed else {}),
              **({"final": {"recipe": done["recipe"], "note": done["note"],
                            **({"figures": done["figures"]} if done.get("figures") else {})}} if done else {})},
        pareto=pareto_rows,
        **({"finalists": done["finalists"]} if done and "finalists" in done else {}),
        files=files,
        **({"headline": headline} if headline else {}),
        **({"returned": returned} if returned else {}),
    )
    _io.write_text(out / "report.html", render_report(report, rows))
    _io.write_json(out / "result.json", report)
    return report


def _headline(baseline: dict[str, Any], result: dict[str, Any], session: Session, out: Path) -> dict[str, Any] | None:
    """Time ``baseline.onnx`` and ``best.onnx`` side by side and make those medians the headline.

    The baseline was timed when the study began and the best model at the end, minutes apart on
    a machine whose load changes; here both are timed in the same interleaved rounds.
    """
    cfg = session.record
    base_onnx = out / "baseline.onnx"
    if cfg.target != "ort-cpu" or not base_onnx.is_file():
        return None
    target = Target(cfg.target, tuple(cfg.batch_sizes), cfg.threads, cfg.max_seconds)
    time_side_by_side(baseline, result, base_onnx, out / "best.onnx", session.data, target)
    ms = {name: {b: t["median"] for b, t in figures["latency_ms"].items()}
          for name, figures in (("baseline", baseline), ("best", result))}
    rounds = max(t["rounds"] for t in result["latency_ms"].values())
    return {"how": f"baseline.onnx and best.onnx timed side by side in {rounds} interleaved rounds (medians)",
            "latency_ms": ms, "speedup": {b: ms["baseline"][b] / ms["best"][b] for b in ms["best"] if ms["best"][b] > 0}}


def _return_baseline(report: dict[str, Any], best_t: Any, headline: dict[str, Any], session: Session,
                     out: Path) -> tuple[dict[str, Any], dict[str, Any]]:
    """No trial beat the input model when timed side by side: ``best.*`` become the input model.

    Returns the result figures (the baseline's) and what ``result.json`` says under ``returned``.
    """
    speed = ", ".join(f"{x:.2f}x @{b}" for b, x in headline["speedup"].items())
    note = (f"no trial was faster than the input model: the fastest within budget (trial {best_t.number}) ran at "
            f"{speed} when timed side by side with it; best.onnx and best.safetensors are the input model")
    _console.info(f"[bold red]nothing beat the baseline[/bold red]: {note}")
    _io.atomic_write(out / "best.onnx", lambda p: shutil.copyfile(out / "baseline.onnx", p))
    save_model(session.model, out / "best.safetensors")
    _io.write_text(out / "best_recipe.yaml", f"# slimkit compress: {note}\n" + Recipe.from_data(["export"]).to_yaml())
    return copy.deepcopy(report["baseline"]), {"model": "baseline", "why": note, "fastest_trial": best_t.number,
                                               "its_speedup": headline["speedup"]}


def _confirm_fastest(trials: list[Any], session: Session, *, top: int = 3, rounds: int = 3) -> tuple[Any, Any]:
    """Re-time the fastest feasible trials side by side and keep the truly fastest.

    Each trial was timed alone, at its own moment, on a machine that may have been busy; the
    few leading candidates are timed again interleaved (:func:`slimkit.measure.timing.side_by_side`:
    rounds in rotating order, medians), so machine drift hits them alike. Only candidates whose
    files are on this machine take part.
    """
    cfg = session.record
    feasible = sorted((t for t in trials if _is_feasible(t)), key=lambda t: (_SELECT["latency"](t.user_attrs["figures"]),
                                                                              t.number))
    local = [t for t in feasible[:top] if (Path(t.user_attrs.get("artifacts", "")) / "model.onnx").is_file()]
    if len(local) < 2 or local[0] is not feasible[0]:
        return feasible[0], None
    base = {str(b): session.baseline["val"]["latency_ms"][str(b)]["median"] for b in cfg.batch_sizes}
    timed = side_by_side({str(t.number): Path(t.user_attrs["artifacts"]) / "model.onnx" for t in local}, session.data,
                         cfg.batch_sizes, runtime="ort-cpu", threads=cfg.threads, rounds=rounds,
                         max_seconds=cfg.max_seconds * rounds,
                         label=f"timing the {len(local)} fastest trials side by side")
    ms = medians(timed)
    ratio = {n: math.exp(sum(math.log(m[b] / base[b]) for b in m) / len(m)) for n, m in ms.items()}
    winner = min(local, key=lambda t: (ratio[str(t.number)], t.number))
    return winner, {"trials": [t.number for t in local], "rounds": rounds, "latency_ms": ms, "latency_ratio": ratio}


def _write_csv(path: Path, rows: list[dict[str, Any]]) -> None:
    import pandas as pd

    pd.DataFrame(rows).to_csv(path, index=False)


def _no_feasible_message(report: dict[str, Any], trials: list[Any], out: Path) -> str:
    c = report["trials"]
    head = (f"no trial met the budget ({'; '.join(report['budget_text']) or 'no limits'}) after {c['total']} trials "
            f"({c['complete']} complete, {c['stopped_early']} stopped early, {c['failed']} failed).")
    if not c["complete"]:
        errors = [t.user_attrs["error"] for t in trials if t.user_attrs.get("error")]
        first = f" The first error: {errors[0]['type']}: {errors[0]['message'].splitlines()[0]}." if errors else ""
        return f"{head} No trial completed.{first} See {out / 'trials.csv'}."
    parts = []
    for u in report["unmet"]:
        parts.append(f"{_describe_constraint(u['constraint'])} was never within {u['limit']:g} "
                     f"(closest: trial {u['closest_trial']}, short by {u['short_by']:.4g})")
    never = (" Never met by any trial: " + "; ".join(parts) + ".") if parts else \
        " Each limit was met by some trial, but never all at once."
    closest = "; ".join(
        f"trial {c['trial']} ({', '.join(f'{k} over by {v:.4g}' for k, v in c['over_budget'].items())})"
        for c in report["closest"][:3])
    return (f"{head}{never} Closest trials: {closest}. Relax the budget, or search longer (the same command with a "
            f"larger --trials resumes the study). Details: {out / 'report.html'}.")
