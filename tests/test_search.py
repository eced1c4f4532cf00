"""`slimkit compress`: the space, real trials, resume, SIGKILL, an infeasible budget, results."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import onnx
import optuna
import pandas as pd
import pytest
import torch
import yaml

from slimkit.measure import Target
from slimkit.models import ModelRef
from slimkit.pipeline import Recipe, get_step
from slimkit.search import Budget, EarlyStop, compress, draw_recipe, make_sampler, searchable_steps
from slimkit.search._space import GridTrial, off_switch, on_the_file, warm_start

from ._services import FAST, compress_options, failing_step, small_search

ROOT = Path(__file__).resolve().parent.parent


def _study(out: Path) -> optuna.Study:
    optuna.logging.set_verbosity(optuna.logging.ERROR)
    return optuna.load_study(study_name=out.name, storage=f"sqlite:///{out / 'study.db'}")


@pytest.fixture(scope="module")
def searches(tmp_path_factory):
    return tmp_path_factory.mktemp("searches")


@pytest.fixture(scope="module")
def weights(trained):
    return trained("lenet5")[1]


@pytest.fixture(scope="module")
def finished(searches, weights):
    """3 trials of lenet5 on digits (fine-tune space + a step that fails in trial 1)."""
    out, err = small_search(searches, weights, methods=["finetune", "test_fail"], trials=3)
    assert err is None, err
    return out


# ----------------------------------------------------------------------------- the space


def test_every_drawn_recipe_is_valid_and_in_order():
    """Whatever methods are registered, every recipe drawn is valid, ordered and ends exported."""
    study = optuna.create_study(directions=["minimize"] * 3, sampler=optuna.samplers.RandomSampler(seed=1))
    order = {s.name: s.order for s in searchable_steps("ort-cpu")}
    assert "finetune" in order and "export" in order
    seen = set()
    for _ in range(40):
        trial = study.ask()
        recipe = draw_recipe(trial, "ort-cpu")
        names = [s.name for s in recipe.steps]
        seen.update(names)
        assert "export" in names
        assert [order[n] for n in names] == sorted(order[n] for n in names)
        Recipe.from_data(recipe.to_data()).validate("ort-cpu")  # round-trips through plain data
        for param in trial.params:  # a parameter is only recorded for a step whose space was asked
            assert param.split(".")[0] in order
        study.tell(trial, [1.0, 1.0, 1.0])
    assert len(seen) >= 2
    for name in seen:  # a step the target cannot run is never drawn
        targets = get_step(name).targets
        assert targets is None or "ort-cpu" in targets


def test_a_new_method_joins_the_search_by_registering_a_space():
    with failing_step():
        assert "test_fail" in {s.name for s in searchable_steps("ort-cpu")}
        recipe = draw_recipe(optuna.trial.FixedTrial({"finetune.epochs": 0}, number=1), "ort-cpu",
                             methods=["test_fail", "finetune"])
        assert [s.name for s in recipe.steps] == ["test_fail", "export"]
        assert recipe.steps[0].config.fail is True
    assert "test_fail" not in {s.name for s in searchable_steps("ort-cpu")}
    with pytest.raises(Exception, match="cannot search over 'nope'"):
        searchable_steps("ort-cpu", ["nope"])


def test_off_switches_and_warm_start():
    ft = off_switch(get_step("finetune"))
    assert ft == ("finetune.epochs", 0, 4)
    assert off_switch(get_step("export")) is None  # always on
    trials = warm_start("ort-cpu")
    for i, params in enumerate(trials):
        on = [k for k, v in params.items() if off_switch(get_step(k.split(".")[0]))[2] == v]
        assert len(on) == (0 if i == 0 else 1)  # the reference, then one compression method per trial
        assert "finetune.epochs" not in params  # fine-tuning stays free
    alone = [next(k.split(".")[0] for k, v in p.items() if off_switch(get_step(k.split(".")[0]))[2] == v)
             for p in trials[1:]]
    on_file = [on_the_file(get_step(n)) for n in alone]
    assert on_file == sorted(on_file, reverse=True) and any(on_file)  # the quick INT8 steps first
    assert len(warm_start("ort-cpu", limit=2)) == min(2, len(trials))
    assert warm_start("ort-cpu", ["finetune"]) == []  # nothing to switch off


def test_grid_sampler_enumerates_levels_without_repeats():
    study = optuna.create_study(directions=["minimize"] * 3, sampler=make_sampler("grid", seed=0, trials=10))
    seen = set()
    for _ in range(10):
        trial = study.ask()
        recipe = draw_recipe(GridTrial(trial), "ort-cpu", methods=["finetune"])
        key = tuple(sorted(trial.params.items()))
        assert key not in seen
        seen.add(key)
        if trial.params["finetune.epochs"]:
            assert trial.params["finetune.epochs"] in (2, 4) and recipe.steps[0].name == "finetune"
            assert min(abs(trial.params["finetune.lr"] - v) for v in (1e-4, 3e-3, (1e-4 * 3e-3) ** 0.5)) < 1e-12
        study.tell(trial, [1.0, 1.0, 1.0])


@pytest.mark.parametrize("name", ["tpe", "nsga2", "gp", "random", "grid"])
def test_every_sampler_draws_valid_constrained_recipes(name):
    """Each sampler proposes valid recipes from the conditional space and reads the constraints."""
    sampler = make_sampler(name, seed=0, trials=6)  # 4 start-up trials, then 2 proposals of the sampler's own
    study = optuna.create_study(directions=["minimize", "minimize", "maximize"], sampler=sampler)
    for i in range(6):
        trial = study.ask()
        recipe = draw_recipe(GridTrial(trial) if name == "grid" else trial, "ort-cpu")
        n = len(recipe.steps)
        trial.set_constraint("accuracy_drop", (n - 3) * 0.01)  # feasible when few steps
        study.tell(trial, [1.0 / n, float(i % 3), 1.0 - 0.01 * n])
    assert all(t.state.name == "COMPLETE" for t in study.trials)
    assert all(all(v <= 0 for v in t.constraints.values()) for t in study.best_trials)


def test_early_stop_compares_with_trials_within_budget():
    study = optuna.create_study(directions=["minimize", "minimize", "maximize"])
    for curve, feasible in (([0.90, 0.95], True), ([0.88, 0.96], True), ([0.20, 0.30], False)):
        study.add_trial(optuna.trial.create_trial(values=[1, 1, curve[-1]], user_attrs={"val_curve": curve,
                                                                                        "feasible": feasible}))
    trial = study.ask()
    stop = EarlyStop(trial, floor=0.94)
    stop.on_epoch_end(None, 1, 0.89)  # below the floor but not below every feasible trial (0.88)
    with pytest.raises(optuna.TrialPruned, match="below the budget's floor"):
        stop.on_epoch_end(None, 2, 0.80)  # below 0.95 and 0.96 at epoch 2
    assert study.trials[-1].user_attrs["val_curve"] == [0.89, 0.80]
    assert "pruned" in study.trials[-1].user_attrs
    EarlyStop(study.ask(), floor=None).on_epoch_end(None, 1, 0.0)  # no accuracy limit: never stops
    lone = optuna.create_study(directions=["minimize", "minimize", "maximize"])
    EarlyStop(lone.ask(), floor=0.94).on_epoch_end(None, 1, 0.1)  # nothing to compare with yet


def test_budget_parsing():
    b = Budget.of((1, 64), max_latency_ms="1:0.5,64:8", max_size_kb=100)
    assert b.max_latency_ms == {1: 0.5, 64: 8.0} and b.max_accuracy_drop == 0.01
    assert Budget.of((1, 64), max_latency_ms=0.5).max_latency_ms == {1: 0.5}  # the smallest batch size
    assert "latency at batch 1 <= 0.5 ms" in Budget.of((1, 64), max_latency_ms=0.5).describe((1, 64))
    with pytest.raises(Exception, match="not measured"):
        Budget.of((1, 64), max_latency_ms="8:1")
    with pytest.raises(Exception, match="max_accuracy_drop"):
        Budget.of((1,), max_accuracy_drop=5)


def test_validation_subset_and_redacted_urls(digits):
    from slimkit.search import redact, validation_subset

    small = validation_subset(digits, 50, seed=0)
    assert len(small.x_val) == len(small.y_val) == 50 and small.x_test is digits.x_test
    assert torch.equal(small.x_val, validation_subset(digits, 50, seed=0).x_val)  # fixed by the seed
    assert validation_subset(digits, 10_000, seed=0) is digits and validation_subset(digits, None, 0) is digits
    assert redact("postgresql://ann:s3cret@db:5432/x") == "postgresql://ann:***@db:5432/x"
    assert redact("sqlite:////tmp/a/study.db") == "sqlite:////tmp/a/study.db"


@pytest.mark.parametrize("args,needle", [
    (["--sampler", "annealing"], "unknown sampler"),
    (["--objective", "speed"], "unknown objective"),
    (["--max-latency-ms", "16:x"], "--max-latency-ms"),
    (["--max-latency-ms", "8:1"], "not measured"),
    (["--methods", "nope"], "cannot search over 'nope'"),
    (["--max-accuracy-drop", "3"], "max_accuracy_drop"),
    (["--val-size", "3"], "--val-size"),
])
def test_bad_arguments_are_explained(cli, tmp_path, weights, args, needle):
    r = cli("compress", "--model", "zoo:lenet5", "--weights", weights, "--batch", "1,16", "--out", tmp_path / "x",
            "--trials", "1", *args)
    assert r.code == 2 and needle in r.err, r
    assert not (tmp_path / "x" / "study.db").exists()  # rejected before any work


# ----------------------------------------------------------------------------- a real search


def test_search_writes_every_result(finished, weights, digits, cli, tmp_path):
    out = finished
    res = json.loads((out / "result.json").read_text())
    study = _study(out)
    states = [t.state.name for t in study.trials]
    assert states == ["COMPLETE", "FAIL", "COMPLETE"]  # the failing trial did not stop the search
    failed = study.trials[1]
    assert failed.user_attrs["error"]["type"] == "RuntimeError" and "on purpose" in failed.user_attrs["error"]["message"]
    for t in (study.trials[0], study.trials[2]):  # every figure is a trial attribute; the budget a constraint
        f = t.user_attrs["figures"]
        assert set(f["latency_ms"]) == {"1", "16"} and f["artifact_bytes"] > 0 and 0 < f["val_accuracy"] <= 1
        assert set(t.constraints) == {"accuracy_drop"}
        assert t.user_attrs["feasible"] == (t.constraints["accuracy_drop"] <= 0)
        assert t.values == [f["latency_ratio"], f["size_kb"], f["val_accuracy"]]
    assert res["trials"]["total"] == 3 and res["trials"]["failed"] == 1
    assert res["baseline"]["accuracy"] > 0.8 and "val_accuracy" in res["baseline"]
    best = res["best"]["trial"]
    assert study.trials[best].user_attrs["feasible"]
    assert any(p["best"] for p in res["pareto"]) and all(0 < p["test_accuracy"] <= 1 for p in res["pareto"])
    # the CSV holds every trial, the failure's reason included
    csv = pd.read_csv(out / "trials.csv")
    assert list(csv["trial"]) == [0, 1, 2] and "on purpose" in csv.loc[1, "note"]
    assert csv.loc[best, "best"] and csv["latency_ms@16"].notna().sum() == 2

    # the best model's figures, re-measured from the written files, agree with result.json
    from slimkit.api import profile
    from slimkit.export import parity
    from slimkit.models import load_model

    onnx.checker.check_model(str(out / "best.onnx"))
    again = profile(None, digits, onnx=out / "best.onnx", target=Target(batch_sizes=(1, 16), threads=1, max_seconds=0.2))
    r = res["result"]
    for key in ("params", "nonzero_params", "macs", "artifact_bytes", "accuracy"):
        assert again[key] == r[key], key
    for bs in ("1", "16"):
        ratio = again["latency_ms"][bs]["median"] / r["latency_ms"][bs]["median"]
        assert 1 / 4 < ratio < 4, (bs, ratio)  # the same artifact, timed again on a shared machine
    model = load_model(weights=out / "best.safetensors")
    assert parity(model, out / "best.onnx", digits.x_test)["top1_agreement"] >= 0.99

    # best_recipe.yaml replays with `slimkit apply`
    recipe = yaml.safe_load((out / "best_recipe.yaml").read_text())
    assert recipe == res["best"]["recipe"]
    rep = cli("apply", out / "best_recipe.yaml", "--model", "zoo:lenet5", "--weights", weights, "--out",
              tmp_path / "replay", "--batch", "1", "--max-seconds", "0.05", "--threads", "1", "-q")
    assert rep.code == 0, rep
    replay = json.loads((tmp_path / "replay" / "result.json").read_text())["result"]
    assert replay["params"] == r["params"] and abs(replay["accuracy"] - r["accuracy"]) <= 0.02


def test_same_command_resumes_and_other_settings_are_refused(finished, weights, cli, tmp_path):
    out = tmp_path / finished.name  # a copy: the shared search stays as it is
    shutil.copytree(finished, out)
    before = {t.number: (t.params, t.values, t.state.name) for t in _study(out).trials}
    args = ["compress", "--model", "zoo:lenet5", "--weights", weights, "--data", "digits", "--batch", "1,16",
            "--threads", "1", "--max-seconds", "0.05", "--finetune-batches", "3", "--methods", "finetune,test_fail",
            "--out", out]
    with failing_step():
        r = cli(*args, "--trials", "4")
        changed = cli(*args, "--trials", "4", "--max-accuracy-drop", "0.2")
    assert r.code == 0, r
    assert "resuming study" in r.err and "3 trial(s) done, 1 to go" in r.err
    after = _study(out).trials
    assert len(after) == 4 and {t.number: (t.params, t.values, t.state.name) for t in after[:3]} == before
    assert json.loads((out / "result.json").read_text())["trials"]["total"] == 4
    assert "report:" in r.out and "baseline / best" in r.out
    assert changed.code == 2 and "other settings" in changed.err and "max_accuracy_drop" in changed.err
    assert len(_study(out).trials) == 4


def test_infeasible_budget_says_what_was_not_met(searches, weights, tmp_path):
    out, err = small_search(searches, weights, trials=2, max_size_kb=1.0)
    assert err is not None and err.exit_code == 3
    msg = str(err)
    assert "no trial met the budget" in msg and "artifact size (KB) was never within 1" in msg
    assert "Closest trials: trial" in msg
    res = json.loads((out / "result.json").read_text())
    assert res["best"] is None and res["result"] is None
    assert [u["constraint"] for u in res["unmet"]] == ["size_kb"] and len(res["closest"]) == 2
    assert not (out / "best.onnx").exists() and (out / "report.html").exists() and (out / "trials.csv").exists()
    assert "No trial met the budget" in (out / "report.html").read_text()


def test_infeasible_exit_code_from_the_cli(searches, weights, cli):
    out, _ = small_search(searches, weights, trials=2, max_size_kb=1.0)
    r = cli("compress", "--model", "zoo:lenet5", "--weights", weights, "--batch", "1,16", "--threads", "1",
            "--max-seconds", "0.05", "--finetune-batches", "3", "--methods", "finetune", "--trials", "2",
            "--max-size-kb", "1", "--out", out)  # the same command again: nothing to run, results rewritten
    assert r.code == 3 and "never within 1" in r.err, r


def test_sigkill_loses_no_completed_trial(weights, tmp_path):
    out = tmp_path / "killed"
    cmd = [sys.executable, "-c", "import sys; from slimkit.cli import main; main(sys.argv[1:])", "compress", "--model", "zoo:lenet5", "--weights", str(weights),
           "--batch", "1,16", "--threads", "1", "--max-seconds", "0.05", "--finetune-batches", "3",
           "--methods", "finetune", "--trials", "3", "--out", str(out), "-q"]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            env={**os.environ, "PYTHONWARNINGS": "ignore"})
    done: list[optuna.trial.FrozenTrial] = []
    deadline = time.monotonic() + 300
    try:
        while time.monotonic() < deadline and proc.poll() is None:
            time.sleep(0.5)
            if (out / "study.db").exists():
                try:
                    done = [t for t in _study(out).trials if t.state.name == "COMPLETE"]
                except Exception:  # the study is still being created
                    continue
                if done:
                    break
    finally:
        proc.send_signal(signal.SIGKILL)
        _, err = proc.communicate(timeout=30)
    assert done, f"no trial completed before the deadline: {err.decode()[-2000:]}"
    assert proc.returncode == -signal.SIGKILL
    kept = {t.number: (t.params, t.values) for t in _study(out).trials if t.state.name == "COMPLETE"}
    assert {t.number: (t.params, t.values) for t in done}.items() <= kept.items()
    # the same command again resumes: the completed trials stay, the search reaches 3 finished trials
    res = compress(ModelRef("zoo:lenet5", weights=weights), "digits",
                   **compress_options(out=out, methods=["finetune"], trials=3, **FAST))
    trials = _study(out).trials
    finished = [t for t in trials if t.state.name in ("COMPLETE", "PRUNED", "FAIL")]
    assert len(finished) >= 3
    assert all(trials[n].params == p and trials[n].values == v for n, (p, v) in kept.items())
    assert res.report["trials"]["total"] == len(finished) and (out / "best.onnx").exists()


def test_search_over_every_registered_method(searches, weights):
    """The joint space as it stands (whatever methods have landed): every trial ends complete
    with its figures, stopped early, or failed with its error; results are written either way."""
    out, err = small_search(searches, weights, methods=None, trials=3, max_accuracy_drop=0.3, finetune_batches=2)
    res = json.loads((out / "result.json").read_text())
    study = _study(out)
    assert len(study.trials) >= 3
    for t in study.trials:
        if t.state.name == "COMPLETE":
            assert "figures" in t.user_attrs and "accuracy_drop" in t.constraints
            Recipe.from_data(t.user_attrs["recipe"]).validate("ort-cpu")
        elif t.state.name == "FAIL":
            assert t.user_attrs["error"]["message"] is not None
        elif t.state.name == "PRUNED":
            assert t.user_attrs["pruned"]
    if err is None:
        assert res["best"]["trial"] in [t.number for t in study.trials if t.user_attrs.get("feasible")]
        assert (out / "best.onnx").exists()
    else:
        assert res["best"] is None and err.exit_code == 3


def test_result_json_is_what_the_written_files_measure(finished, digits):
    """Issue 13, item 6: test accuracy exact, the latency ratio to the baseline within 25% (side by side)."""
    from .honesty import check_result_figures

    out = finished
    report = json.loads((out / "result.json").read_text())
    check_result_figures(report, out / "baseline.onnx", out / "best.onnx", digits, (1, 16))
