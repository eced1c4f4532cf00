"""Faults during a search: a hanging trial, SIGTERM, SIGKILL at random moments, an output folder
that stops taking files. Each test is bounded in time; the slow ones are marked ``slow``."""

from __future__ import annotations

import json
import multiprocessing
import os
import random
import shutil
import signal
import sqlite3
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

import optuna
import pandas as pd
import pytest

from slimkit.models import ModelRef
from slimkit.search import compress

from ._services import compress_options, one_trial_step, sleeping_step

ROOT = Path(__file__).resolve().parent.parent

# the cheapest real trials: 2 fine-tune batches, timing capped at 0.02 s, batch size 1, 1 thread
CHEAP = {"methods": ["finetune"], "finetune_batches": 2, "max_seconds": 0.02, "batch_sizes": (1,), "threads": 1,
         "max_accuracy_drop": 1.0}
CHEAP_ARGS = ["--data", "digits", "--finetune-batches", "2", "--max-seconds", "0.02", "--batch", "1", "--threads", "1",
              "--max-accuracy-drop", "1", "-q"]


def _study(out: Path) -> optuna.Study:
    optuna.logging.set_verbosity(optuna.logging.ERROR)
    return optuna.load_study(study_name=out.name, storage=f"sqlite:///{out / 'study.db'}")


def _created(db: Path) -> bool:
    """The study's database holds its schema and the study (read-only look: opening it with Optuna
    while the search process is still creating it would race it to create the schema)."""
    if not db.exists():
        return False
    try:
        con = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=1)
        try:
            stamped = con.execute("SELECT COUNT(*) FROM alembic_version").fetchone()[0]
            studies = con.execute("SELECT COUNT(*) FROM studies").fetchone()[0]
        finally:
            con.close()
    except sqlite3.Error:
        return False
    return stamped > 0 and studies > 0


def _trials(out: Path) -> list[optuna.trial.FrozenTrial]:
    """The study's trials, or none while it is still being created."""
    if not _created(out / "study.db"):
        return []
    try:
        return _study(out).trials
    except Exception:
        return []


@pytest.fixture(scope="module")
def weights(trained):
    return trained("lenet5")[1]


def _args(weights: Path, methods: str) -> list[str]:
    return ["compress", "--model", "zoo:lenet5", "--weights", str(weights), "--methods", methods, *CHEAP_ARGS]


# ----------------------------------------------------------------------------- a trial that hangs


def test_a_hanging_trial_is_stopped_by_the_trial_timeout(weights, tmp_path, cli):
    out = tmp_path / "hang"
    before = signal.getsignal(signal.SIGALRM)
    t0 = time.monotonic()
    with sleeping_step(trial_number=1, seconds=120):
        res = compress(ModelRef("zoo:lenet5", weights=weights), "digits",
                       **compress_options(out=out, trials=3, trial_timeout=6, **{**CHEAP, "methods": ["finetune",
                                                                                                     "test_sleep"]}))
    assert time.monotonic() - t0 < 90  # the 120 s sleep was cut short
    trials = _study(out).trials
    assert [t.state.name for t in trials] == ["COMPLETE", "FAIL", "COMPLETE"]  # the search went on
    hung = trials[1]
    assert hung.user_attrs["error"]["type"] == "TrialTimeoutError"
    assert "trial timeout" in hung.user_attrs["error"]["message"] and hung.user_attrs["seconds"] < 10
    assert "trial timeout" in pd.read_csv(out / "trials.csv").loc[1, "note"]
    assert res.report["trials"]["failed"] == 1 and res.report["trials"]["complete"] == 2
    assert json.loads((out / "result.json").read_text())["trials"]["total"] == 3
    # the alarm and its handler are as they were
    assert signal.getitimer(signal.ITIMER_REAL) == (0.0, 0.0) and signal.getsignal(signal.SIGALRM) == before
    # the flag is generated from Search.trial_timeout, and checked
    r = cli(*_args(weights, "finetune"), "--trials", "1", "--trial-timeout", "0", "--out", tmp_path / "bad")
    assert r.code == 2 and "trial" in r.err and "> 0" in r.err, r


# ----------------------------------------------------------------------------- SIGTERM


@pytest.mark.slow
def test_sigterm_ends_the_search_cleanly_and_the_same_command_resumes(weights, tmp_path):
    out = tmp_path / "term"
    # the command runs in a subprocess with a step that hangs in trial 2, so SIGTERM lands mid-trial
    code = ("import sys; from tests._services import sleeping_step; from slimkit.cli import main\n"
            "with sleeping_step(trial_number=2, seconds=300): main(sys.argv[1:])")
    cmd = [sys.executable, "-c", code, *_args(weights, "finetune,test_sleep"), "--trials", "5", "--out", str(out)]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONWARNINGS": "ignore"})
    deadline = time.monotonic() + 150
    try:
        while time.monotonic() < deadline and proc.poll() is None:
            time.sleep(0.3)
            running = [t for t in _trials(out) if t.number == 2 and t.state.name == "RUNNING"]
            if running and "recipe" in running[0].user_attrs:  # inside the trial, sleeping
                break
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 143, err[-3000:]
    assert "interrupted by SIGTERM" in err and "run the same command to resume" in err.lower(), err[-2000:]
    trials = _study(out).trials
    assert [t.state.name for t in trials] == ["COMPLETE", "COMPLETE", "FAIL"]
    assert trials[2].user_attrs["error"]["type"] == "Interrupted" and "SIGTERM" in trials[2].user_attrs["error"]["message"]
    report = json.loads((out / "result.json").read_text())  # the finished trials' results are written
    assert report["trials"]["complete"] == 2 and report["trials"]["failed"] == 1
    assert (out / "trials.csv").exists() and (out / "report.html").exists() and (out / "best.onnx").exists()
    assert "interrupted by SIGTERM" in pd.read_csv(out / "trials.csv").loc[2, "note"]

    # the same command again resumes to the asked total (the interrupted trial counts as a failed one)
    with sleeping_step(trial_number=2, seconds=300):
        res = compress(ModelRef("zoo:lenet5", weights=weights), "digits",
                       **compress_options(out=out, trials=5, **{**CHEAP, "methods": ["finetune", "test_sleep"]}))
    after = _study(out).trials
    assert len(after) == 5 and [t.state.name for t in after[3:]] == ["COMPLETE", "COMPLETE"]
    assert {t.number: t.params for t in after[:3]} == {t.number: t.params for t in trials}
    assert res.report["trials"]["total"] == 5


# ----------------------------------------------------------------------------- SIGKILL at random moments


def _cli_child(argv: list[str]) -> None:
    """``slimkit ARGV`` in a forked child (its output dropped)."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 1)
    os.dup2(devnull, 2)
    from slimkit.cli import main

    main(argv)


def _completed(out: Path) -> dict[int, tuple[dict[str, Any], list[float] | None]]:
    return {t.number: (t.params, t.values) for t in _trials(out) if t.state.name == "COMPLETE"}


@pytest.mark.soak
def test_sigkill_at_20_random_moments_loses_and_duplicates_nothing(weights, tmp_path):
    """SIGKILL at 20 seeded random moments of one search, the same command restarted each time.

    What "identical in content" means here: the interrupted search ends with the same trial
    numbers 0..T-1, every one COMPLETE, and each trial drew the same parameters (hence the same
    recipe) as in an uninterrupted run with the same seed and --trials; their validation
    accuracy is the same too (training is seeded, one thread). Latencies are not compared:
    they are timings of a shared machine. This holds because (1) a trial killed while RUNNING
    keeps its number and parameters: the next run puts it back into the queue (WAITING) and
    runs it again, instead of failing it and sampling a new one; (2) every trial's draws are
    seeded from (seed, trial number), not from the sampler's history in this process; (3) the
    random sampler draws without looking at the measured figures (TPE after its start-up
    trials would depend on the timings, which differ between any two runs).

    Each restart is a fresh process forked from a server that imported slimkit once
    (multiprocessing's forkserver), so that 20 restarts fit in the time a few cold starts of
    Python + torch would take.
    """
    trials = 12
    argv = [*_args(weights, "finetune"), "--sampler", "random", "--trials", str(trials)]
    out = tmp_path / "killed"
    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload(["tests._warm", "tests.test_search_faults", "optuna", "onnxruntime"])
    rng = random.Random(20261203)
    seen: dict[int, tuple[dict[str, Any], list[float] | None]] = {}
    in_trials = 0
    t0 = time.monotonic()
    for i in range(20):
        p = ctx.Process(target=_cli_child, args=([*argv, "--out", str(out)],))
        p.start()
        if i % 5 == 4:  # every fifth kill: a moment of the start-up (data, model, study, baseline)
            p.join(rng.uniform(0.0, 2.0))
        else:  # the others: a moment once this process runs trials (inside one, or between two)
            while p.is_alive() and not any(t.state.name == "RUNNING" and (t.user_attrs.get("worker") or {}).get("pid")
                                           == p.pid for t in _trials(out)):
                time.sleep(0.05)
            in_trials += p.is_alive()
            p.join(rng.uniform(0.2, 2.5))
        if p.is_alive():
            p.kill()
        p.join(30)
        assert p.exitcode in (0, -signal.SIGKILL), p.exitcode
        p.close()
        now = _completed(out)
        assert seen.items() <= now.items()  # no completed trial lost or changed
        seen = now
    p = ctx.Process(target=_cli_child, args=([*argv, "--out", str(out)],))  # the last run, to the end
    p.start()
    p.join(240)
    assert p.exitcode == 0, p.exitcode
    killed_s = time.monotonic() - t0

    ref = tmp_path / "uninterrupted"
    compress(ModelRef("zoo:lenet5", weights=weights), "digits",
             **compress_options(out=ref, trials=trials, sampler="random", **CHEAP))
    got, want = _study(out).trials, _study(ref).trials
    print(f"\n{in_trials} of 20 SIGKILLs while trials ran; {len(seen)} of {trials} trials complete before the last "
          f"run; killed search {killed_s:.0f}s")
    assert in_trials >= 10
    assert [t.number for t in got] == list(range(trials)), [(t.number, t.state.name, t.user_attrs.get("worker"),
                                                            t.datetime_start) for t in got]  # none counted twice
    assert all(t.state.name == "COMPLETE" for t in got), [(t.number, t.state.name) for t in got]
    assert seen.items() <= _completed(out).items()
    assert {t.number: t.params for t in got} == {t.number: t.params for t in want}
    assert Counter(json.dumps(t.user_attrs["recipe"], sort_keys=True) for t in got) == \
        Counter(json.dumps(t.user_attrs["recipe"], sort_keys=True) for t in want)
    assert [t.user_attrs["figures"]["val_accuracy"] for t in got] == \
        [t.user_attrs["figures"]["val_accuracy"] for t in want]
    assert json.loads((out / "result.json").read_text())["trials"]["total"] == trials


# ----------------------------------------------------------------------------- an output folder that takes no files


def test_an_unwritable_output_folder_is_a_clear_error_and_the_study_resumes(weights, tmp_path, cli):
    """Mid-run, in trial 1, the trials folder is replaced by a file: every write into it fails
    (ENOTDIR), as on a read-only or full disk (tests run as root here, so chmod would not stop a
    write). Then result.json is made a folder, so writing the final results fails too."""
    out = tmp_path / "ro"
    trials_dir = out / "trials"

    def break_folder() -> None:
        shutil.rmtree(trials_dir)
        trials_dir.write_text("not a folder any more")

    args = [*_args(weights, "finetune,test_break"), "--trials", "3", "--out", out]
    with one_trial_step("test_break", break_folder, trial_number=1):
        r = cli(*args)
    assert r.code == 2, r
    assert f"cannot write the trials' files into {out}" in r.err and "is intact" in r.err, r
    assert "Traceback" not in r.err
    trials = _study(out).trials  # the study is intact
    assert [t.state.name for t in trials] == ["COMPLETE", "FAIL"]
    assert trials[1].user_attrs["error"]["type"] in ("NotADirectoryError", "FileExistsError")

    trials_dir.unlink()  # the folder is fixed; the final results cannot be written yet
    (out / "result.json").mkdir()
    with one_trial_step("test_break", break_folder, trial_number=1):
        r = cli(*args)
    assert r.code == 2 and f"cannot write the search's results into {out}" in r.err, r
    assert len([t for t in _study(out).trials if t.state.name == "COMPLETE"]) == 2

    (out / "result.json").rmdir()
    with one_trial_step("test_break", break_folder, trial_number=1):
        r = cli(*args)  # the same command resumes and writes everything
    assert r.code == 0, r
    assert json.loads((out / "result.json").read_text())["trials"]["total"] == 3
