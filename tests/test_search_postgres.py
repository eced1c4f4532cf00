"""Many processes, one study: `slimkit worker` on a real PostgreSQL server (127.0.0.1, throwaway)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections import Counter
from pathlib import Path

import optuna
import pytest

from slimkit.models import ModelRef
from slimkit.search import compress

from ._services import FAST, compress_options, postgres_bin, postgres_server

pytestmark = pytest.mark.skipif(postgres_bin() is None, reason="PostgreSQL binaries (/usr/lib/postgresql/*/bin) are "
                                "not installed: apt-get install postgresql")

ROOT = Path(__file__).resolve().parent.parent
RUN_CLI = [sys.executable, "-c", "import sys; from slimkit.cli import main; main(sys.argv[1:])"]


@pytest.fixture(scope="module")
def pg_url():
    with postgres_server() as url:
        yield url


def test_two_workers_share_one_study(pg_url, trained, tmp_path):
    _, weights = trained("lenet5")
    out = tmp_path / "shared"
    model = ModelRef("zoo:lenet5", weights=weights)
    # no accuracy floor: no trial is stopped early, whatever the workers (seeded by their pids) draw
    common = dict(out=out, storage=pg_url, study="lenet5-shared", methods=["finetune"], max_accuracy_drop=1.0, **FAST)
    ready = compress(model, "digits", **compress_options(trials=0, **common))  # sets the study up: config + baseline
    assert ready.report is None and not (out / "result.json").exists()

    # two workers at once, each a separate process knowing only the storage and the study name
    cmd = [*RUN_CLI, "worker", "--storage", pg_url, "--study", "lenet5-shared", "--trials", "2", "-q"]
    procs = [subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                              env={**os.environ, "PYTHONWARNINGS": "ignore"}) for _ in range(2)]
    outputs = [p.communicate(timeout=400) for p in procs]
    for p, (_, e) in zip(procs, outputs):
        assert p.returncode == 0, e[-3000:]
    assert all("finished trials" in o for o, _ in outputs)

    study = optuna.load_study(study_name="lenet5-shared", storage=pg_url)
    trials = [t for t in study.trials if t.state.name in ("COMPLETE", "PRUNED", "FAIL")]
    assert len(trials) == 4 and sorted(t.number for t in trials) == [0, 1, 2, 3]
    pids = {t.user_attrs["worker"]["pid"] for t in trials}
    assert len(pids) == 2 and os.getpid() not in pids  # both workers ran trials, the parent none
    assert all(t.state.name == "COMPLETE" for t in trials), [(t.number, t.state.name, t.user_attrs.get("error"))
                                                            for t in trials if t.state.name != "COMPLETE"]

    # the same command with the total wanted: nothing left to run, the results are written
    res = compress(model, "digits", **compress_options(trials=4, **common))
    report = json.loads((out / "result.json").read_text())
    assert report["trials"]["total"] == 4 and report["storage"] == pg_url
    assert res.report["best"]["trial"] in {t.number for t in trials} and (out / "best.onnx").exists()
    assert len(study.trials) == 4  # the parent ran no extra trial


def test_worker_needs_an_existing_study(pg_url, cli):
    r = cli("worker", "--storage", pg_url, "--study", "nobody-started-this", "--trials", "1")
    assert r.code == 2 and "no study 'nobody-started-this'" in r.err and "slimkit compress" in r.err, r


def test_unreachable_storage_is_explained(cli, tmp_path):
    r = cli("worker", "--storage", "postgresql://postgres@127.0.0.1:1/none", "--study", "x", "--trials", "1")
    assert r.code == 2 and "cannot open the storage" in r.err, r
    r = cli("worker", "--storage", "redis://localhost", "--study", "x", "--trials", "1")
    assert r.code == 2 and "database URL" in r.err, r


@pytest.mark.soak
def test_four_workers_by_25_trials_make_100_unique_trials(pg_url, trained, tmp_path):
    """4 `slimkit worker` processes x 25 of the cheapest trials on one PostgreSQL study: 100
    finished trials, numbers 0..99 each once, 25 run by each worker, every one complete."""
    _, weights = trained("lenet5")
    out = tmp_path / "many"
    compress(ModelRef("zoo:lenet5", weights=weights), "digits",
             **compress_options(trials=0, out=out, storage=pg_url, study="lenet5-many", methods=["finetune"],
                                sampler="random", batch_sizes=(1,), threads=1, max_seconds=0.02, finetune_batches=2,
                                max_accuracy_drop=1.0))
    cmd = [*RUN_CLI, "worker", "--storage", pg_url, "--study", "lenet5-many", "--trials", "25", "-q"]
    procs = [subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                              env={**os.environ, "PYTHONWARNINGS": "ignore", "OMP_NUM_THREADS": "1"})
             for _ in range(4)]
    outputs = [p.communicate(timeout=400) for p in procs]
    for p, (_, e) in zip(procs, outputs):
        assert p.returncode == 0, e[-3000:]
    trials = optuna.load_study(study_name="lenet5-many", storage=pg_url).trials
    assert sorted(t.number for t in trials) == list(range(100))  # 100 unique trials, none counted twice
    assert all(t.state.name == "COMPLETE" for t in trials), [(t.number, t.state.name) for t in trials
                                                            if t.state.name != "COMPLETE"]
    per_worker = Counter(t.user_attrs["worker"]["pid"] for t in trials)
    assert sorted(per_worker.values()) == [25, 25, 25, 25] and set(per_worker) == {p.pid for p in procs}
