"""`slimkit compress`'s second fidelity: the best candidates of the proxy search fine-tuned fully.

One proxy search (3 trials of lenet5 on digits, no finalists) is shared; each test runs the
final stage on a copy of it (the same command with ``finalists`` resumes the finished study
and goes straight to the final stage).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import optuna
import pytest
import yaml

from slimkit.models import ModelRef
from slimkit.pipeline import Recipe
from slimkit.search import compress
from slimkit.search import _final
from slimkit.search._final import FINAL_PATIENCE, final_recipe, stored_finalists

from ._services import compress_options

# tiny settings: one batch size, short timings, 2-batch proxy fine-tunes; every trial within budget
TINY = {"methods": ["finetune", "quantize_dynamic"], "batch_sizes": (1,), "threads": 1, "max_seconds": 0.05,
        "finetune_batches": 2, "max_accuracy_drop": 1.0, "trials": 4, "sampler": "random"}
FINAL = {"finalists": 2, "final_epochs": 2, "final_batches": 2}


def _study(out: Path) -> optuna.Study:
    optuna.logging.set_verbosity(optuna.logging.ERROR)
    return optuna.load_study(study_name=out.name, storage=f"sqlite:///{out / 'study.db'}")


def _max_batches(config: Any) -> list[Any]:
    """Every ``max_batches`` in a step's config (nested ones too)."""
    if isinstance(config, dict):
        return [v for k, v in config.items() if k == "max_batches"] + \
            [m for v in config.values() for m in _max_batches(v)]
    if isinstance(config, list):
        return [m for v in config for m in _max_batches(v)]
    return []


@pytest.fixture(scope="module")
def weights(trained):
    return trained("lenet5")[1]


@pytest.fixture(scope="module")
def proxy(tmp_path_factory, weights):
    """The proxy search, finished, with the final stage off (``finalists=0``)."""
    out = tmp_path_factory.mktemp("finalists") / "proxy"
    compress(ModelRef("zoo:lenet5", weights=weights), "digits", **compress_options(out=out, finalists=0, **TINY))
    return out


def _resume(proxy: Path, where: Path, weights: Path, **final: Any) -> Any:
    out = where / proxy.name  # the study is named after its folder: a copy keeps the name
    if not out.exists():
        shutil.copytree(proxy, out)
    return compress(ModelRef("zoo:lenet5", weights=weights), "digits",
                    **compress_options(out=out, **TINY, **{**FINAL, **final}))


_APPLY = _final.apply_trial  # the real one, whatever a test patched in


class _Counting:
    """Wraps the final stage's :func:`slimkit.search._final.apply_trial`: counts and records each
    recipe it runs; ``fail_at``: raise on that call (a process killed inside the final stage)."""

    def __init__(self, fail_at: int | None = None):
        self.real = _APPLY
        self.recipes: list[dict[str, Any]] = []
        self.folders: list[Path] = []
        self.fail_at = fail_at

    def __call__(self, recipe: Any, *args: Any, **kwargs: Any) -> Any:
        self.recipes.append(Recipe.coerce(recipe).to_data())
        self.folders.append(Path(args[3] if len(args) > 3 else kwargs["out"]))
        if len(self.recipes) == self.fail_at:
            raise RuntimeError("killed during the final stage")
        return self.real(recipe, *args, **kwargs)


def test_no_finalists_is_the_search_as_before(proxy):
    report = json.loads((proxy / "result.json").read_text())
    assert "finalists" not in report and "final" not in report["best"]
    assert not (proxy / "finalists").exists() and not stored_finalists(_study(proxy))
    best = report["best"]["trial"]
    trial = next(t for t in _study(proxy).trials if t.number == best)
    assert yaml.safe_load((proxy / "best_recipe.yaml").read_text()) == trial.user_attrs["recipe"] or report.get(
        "returned")
    if not report.get("returned"):  # the proxy best's own files, as before
        assert (proxy / "best.onnx").read_bytes() == (Path(trial.user_attrs["artifacts"]) / "model.onnx").read_bytes()


@pytest.fixture(scope="module")
def final(proxy, weights, tmp_path_factory):
    """The same command with two finalists on a copy of the proxy search, killed inside the final
    stage (an exception from its second finalist's run), then run again to the end."""
    where = tmp_path_factory.mktemp("final")
    with pytest.MonkeyPatch.context() as mp:
        killed = _Counting(fail_at=2)
        mp.setattr(_final, "apply_trial", killed)
        with pytest.raises(RuntimeError, match="killed during the final stage"):
            _resume(proxy, where, weights)
        out = where / proxy.name
        first = stored_finalists(_study(out))
        again = _Counting()
        mp.setattr(_final, "apply_trial", again)
        res = _resume(proxy, where, weights)
    return {"killed": killed, "first": first, "again": again, "report": res.report, "out": out}


def test_the_final_stage_runs_only_on_the_finalists_and_reaches_the_report(final):
    report, out = final["report"], final["out"]
    runs = final["killed"].recipes[:1] + final["again"].recipes  # the runs that finished, across both processes
    folders = final["killed"].folders[:1] + final["again"].folders
    st = _study(out)
    trials = {t.number: t for t in st.trials}
    rows = report["finalists"]

    # the two best of the proxy front (of 3 trials, all within budget), each run once to its end,
    # with the full fine-tune's recipe; no other trial's recipe ran again
    assert len([t for t in trials.values() if t.user_attrs.get("feasible")]) == TINY["trials"]
    assert [r["trial"] for r in rows] == [t.number for t in _final.pick_finalists(st, "latency", 2)]
    assert len(rows) == FINAL["finalists"] == len(runs)
    for row, recipe, folder in zip(rows, runs, folders):
        proxy_recipe = trials[row["trial"]].user_attrs["recipe"]
        assert recipe == final_recipe(proxy_recipe, epochs=2, batches=2, target="ort-cpu").to_data()
        tune = next(s["finetune"] for s in recipe["steps"] if "finetune" in s)
        assert tune["epochs"] == 2 and tune["patience"] == FINAL_PATIENCE and tune["distill"] is True
        assert set(_max_batches(recipe)) == {2} and set(_max_batches(proxy_recipe)) <= {TINY["finetune_batches"]}
        assert folder.name == f"{row['trial']:04d}" and (folder / "model.onnx").is_file()

    # both fidelities in the study, in result.json and in the report
    stored = stored_finalists(st)
    assert sorted(stored) == sorted(r["trial"] for r in rows)
    for r in rows:
        assert r["proxy_val_accuracy"] == trials[r["trial"]].user_attrs["figures"]["val_accuracy"]
        assert r["final_val_accuracy"] == stored[r["trial"]]["figures"]["val_accuracy"]
        assert r["latency_ms"]["1"] > 0 and r["within_budget"] is True
        assert "side by side" in r["timed"] and r["training"][0]["epochs_run"] <= 2
    assert json.loads((out / "result.json").read_text())["finalists"] == rows
    winner = [r for r in rows if r["winner"]]
    assert len(winner) == 1 and report["best"]["trial"] == winner[0]["trial"]
    assert report["best"]["final"]["figures"]["val_accuracy"] == winner[0]["final_val_accuracy"]
    if report.get("returned"):  # nothing beat the input when timed side by side: best.* is the input
        assert (out / "best.onnx").read_bytes() == (out / "baseline.onnx").read_bytes()
    else:
        best_recipe = yaml.safe_load((out / "best_recipe.yaml").read_text())
        assert best_recipe == stored[winner[0]["trial"]]["recipe"] == report["best"]["final"]["recipe"]
        assert (out / "best.onnx").read_bytes() == \
            (out / "finalists" / f"{winner[0]['trial']:04d}" / "model.onnx").read_bytes()
        assert report["headline"]["speedup"]["1"] > 0  # the headline is the winner's, timed side by side
    page = (out / "report.html").read_text()
    assert "Finalists: proxy vs full fine-tune" in page
    for r in rows:
        assert f"{r['proxy_val_accuracy']:.4f}" in page and f"{r['final_val_accuracy']:.4f}" in page


def test_a_kill_during_the_final_stage_resumes_without_redoing_finished_finalists(final):
    killed, again, first = final["killed"], final["again"], final["first"]
    assert len(killed.recipes) == 2 and len(first) == 1  # killed in the second: the first is in the study
    assert again.recipes == killed.recipes[1:]  # the rerun ran only the unfinished finalist
    rows = {r["trial"]: r for r in final["report"]["finalists"]}
    (done,) = first
    assert len(rows) == 2 and rows[done]["from_study"]
    assert [r["from_study"] for n, r in rows.items() if n != done] == [False]
    assert stored_finalists(_study(final["out"]))[done] == first[done]  # read from the study, not redone


def test_the_final_recipe_lifts_every_cap_and_fine_tunes_fully():
    """No model needed: the proxy recipe's caps go (nested ones too), its fine-tune runs the final
    epochs with early stopping and distillation; a recipe without one gets one where allowed."""
    proxy = {"steps": [{"prune_structured": {"ratio": 0.3, "finetune": {"epochs": 1, "max_batches": 3}}},
                       {"finetune": {"epochs": 1, "lr": 1e-3, "distill": False, "max_batches": 3}}, {"export": {}}]}
    got = final_recipe(proxy, epochs=7, batches=None, target="ort-cpu").to_data()["steps"]
    assert [next(iter(s)) for s in got] == ["prune_structured", "finetune", "export"]
    assert got[0]["prune_structured"]["finetune"]["max_batches"] is None  # the method's own fine-tune: uncapped
    assert got[0]["prune_structured"]["finetune"]["epochs"] == 1
    assert {k: got[1]["finetune"][k] for k in ("epochs", "lr", "distill", "max_batches", "patience")} == \
        {"epochs": 7, "lr": 1e-3, "distill": True, "max_batches": None, "patience": FINAL_PATIENCE}
    added = final_recipe({"steps": [{"prune_structured": {"ratio": 0.3}}, {"export": {}}, {"quantize_dynamic": {}}]},
                         epochs=4, batches=5, target="ort-cpu").to_data()["steps"]
    assert [next(iter(s)) for s in added] == ["prune_structured", "finetune", "export", "quantize_dynamic"]
    assert added[1]["finetune"]["epochs"] == 4 and added[1]["finetune"]["max_batches"] == 5


@pytest.mark.parametrize("flag,value,reason", [("--finalists", "-1", "must be >= 0"),
                                               ("--final-epochs", "0", "must be >= 1")])
def test_the_flags_are_the_option_objects_fields(cli, tmp_path, flag, value, reason):
    r = cli("compress", "--model", "zoo:lenet5", flag, value, "--out", tmp_path / "o")
    assert r.code == 2 and f"error: {flag}, field '{flag[2:].replace('-', '_')}'" in r.err and reason in r.err, r
    assert not (tmp_path / "o").exists()  # rejected before any work


def test_a_candidate_that_missed_only_the_accuracy_limit_gets_a_place():
    """The proxy fine-tune is short: a fast candidate a few points over the accuracy limit may recover fully
    fine-tuned, so half the places (rounded down) go to such candidates faster than every feasible one."""


    from slimkit.search import RECOVERABLE_DROP

    study = optuna.create_study(directions=["minimize", "minimize", "maximize"])

    def add(ratio: float, acc: float, feasible: bool, violations: dict, recipe: list | None = None) -> int:
        t = optuna.trial.create_trial(values=[ratio, 100.0, acc], user_attrs={
            "recipe": recipe or [{"prune_structured": {"ratio": round(1 - ratio, 2)}}, "export"],
            "figures": {"latency_ratio": ratio, "val_accuracy": acc, "size_kb": 100.0},
            "feasible": feasible, "violations": violations})
        study.add_trial(t)
        return study.trials[-1].number

    ok_slow, ok_fast = add(0.9, 0.99, True, {}), add(0.6, 0.985, True, {})
    near = add(0.3, 0.96, False, {"accuracy_drop": RECOVERABLE_DROP / 2})
    far = add(0.2, 0.5, False, {"accuracy_drop": RECOVERABLE_DROP * 8})
    too_big = add(0.25, 0.98, False, {"accuracy_drop": 0.01, "size_kb": 3.0})
    tuned = add(0.5, 0.99, True, {}, recipe=[{"finetune": {"epochs": 1}}, "export"])  # timing noise: the input
    picked = [t.number for t in _final.pick_finalists(study, "latency", 3)]
    assert picked == [ok_fast, ok_slow, near]  # far, too_big (over another limit) and tuned stay out
    assert tuned not in picked
    assert [t.number for t in _final.pick_finalists(study, "latency", 1)] == [ok_fast]
    assert far not in picked and too_big not in picked
