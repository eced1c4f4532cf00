"""An architecture search's results: the best architecture trained fully, the latency table's
predictions against the measured latencies, ``best_arch.yaml``; the rest is the ``compress``
search's :func:`slimkit.search.write_results`."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import yaml

from .. import _console, _io
from ..search import Session, apply_trial, write_results
from ._hooks import RecalibrateBN
from ._objective import proxy_recipe, rejected_count, trained_count
from ._table import LatencyTable, relative_error

__all__ = ["write_nas_results", "FINAL_ATTR", "NAS_FILES"]

FINAL_ATTR = "slimkit_nas_final"
NAS_FILES = ("best_arch.yaml", "final")


def _final(st: Any, session: Session, out: Path) -> Callable[[Any], dict[str, Any]]:
    """``final(best_trial)`` for ``write_results``: the best architecture trained fully (or kept)."""

    def final(best: Any) -> dict[str, Any]:
        cfg, nas = session.record, session.record.nas
        assert nas is not None
        spec = best.user_attrs["student"]
        model_arg = cfg.model if nas.teacher else spec
        if not nas.final_epochs:
            return {"folder": Path(best.user_attrs["artifacts"]), "recipe": best.user_attrs["recipe"],
                    "model": model_arg, "note": f"trial {best.number}'s candidate as the search trained it"}
        recipe = proxy_recipe(spec, teacher=nas.teacher, epochs=nas.final_epochs, batches=nas.final_batches,
                              lr=nas.lr, seed=cfg.seed)
        folder = out / "final"
        done = st.user_attrs.get(FINAL_ATTR) or {}
        if not (done.get("trial") == best.number and done.get("recipe") == recipe.to_data()
                and (folder / "model.onnx").is_file() and (folder / "model.safetensors").is_file()):
            _console.info(f"training the best architecture (trial {best.number}: {best.user_attrs['summary']}) fully: "
                          f"{nas.final_epochs} epochs" + (" distilled from the teacher" if nas.teacher else ""))
            torch.manual_seed(cfg.seed)
            t0 = time.perf_counter()
            apply_trial(recipe, session.model if nas.teacher else spec, session.data, cfg, folder,
                        hooks=[RecalibrateBN(session.data.x_train, nas.final_epochs, seed=cfg.seed)])
            st.set_user_attr(FINAL_ATTR, {"trial": best.number, "recipe": recipe.to_data(),
                                          "seconds": round(time.perf_counter() - t0, 1)})
        else:
            _console.info(f"the best architecture (trial {best.number}) was already trained fully in {folder}")
        return {"folder": folder, "recipe": recipe.to_data(), "model": model_arg,
                "note": f"trial {best.number}'s architecture trained fully ({nas.final_epochs} epochs)"}

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


def write_nas_results(st: Any, session: Session, table: LatencyTable, url: str, out: Path, feasibility: dict[str, Any],
                      *, gave_up: bool) -> dict[str, Any]:
    """Every result file of an architecture search (``compress``'s, plus ``best_arch.yaml`` and the
    prediction figures in ``result.json``); raises like :func:`slimkit.search.write_results`."""
    nas = session.record.nas
    assert nas is not None
    trials = st.get_trials(deepcopy=False)
    extra = {
        "command": "nas",
        "family": nas.family,
        "space": nas.space,
        "baseline_is": nas.baseline_is,
        "latency_prediction": _prediction_summary(st, table),
        "feasibility": feasibility,
        "rejected": rejected_count(st),
        "gave_up": gave_up,
    }
    try:
        report = write_results(st, session, storage=url, out=out, final=_final(st, session, out), extra=extra)
    finally:
        _console.info(f"{len(trials)} trials: {trained_count(st)} trained, {extra['rejected']} rejected by the "
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
