"""`slimkit nas` and `slimkit latency-table`: spaces as data, the latency table and its
prediction on real ONNX Runtime sessions, a real search on digits (rejections before training,
resume, worker), and the errors a user can cause."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import numpy as np
import onnx
import optuna
import pandas as pd
import pytest
import torch
import yaml

from slimkit.errors import ConfigError, SlimkitError
from slimkit.export import export_onnx, fold_batchnorm, ort_session
from slimkit.measure import Target
from slimkit.models import ModelRef, load_model
from slimkit.nas import (LatencyTable, NasSpace, ParetoStop, Space, TableConfig, block_plan, build_latency_table,
                         get_family, nas, recalibrate_bn, register_family)
from slimkit.nas._chain import onnx_chain
from slimkit.nas._chain import scopes as _scopes
from slimkit.nas._space import _FAMILIES, Family
from slimkit.nas._supernet import Supernet, evaluate_subnet, inherit, train_supernet
from slimkit.search import Budget, Search, Store
from slimkit.training import TrainConfig

# A small MobileNetV2 space for 8x8 digits: 8 architectures, 3 reference networks to export.
SPACE = {
    "width": [0.5],
    "stages": [
        {"blocks": [1], "kernel": [3], "expand": [1]},
        {"blocks": [1, 2], "kernel": [3, 5], "expand": [3]},
        {"blocks": [1, 2], "kernel": [3], "expand": [3]},
        {"blocks": [1], "kernel": [3], "expand": [3]},
        {"blocks": [1], "kernel": [3], "expand": [3]},
    ],
}
SMALL = {"width": 0.5, "stages": [{"blocks": 1, "kernel": 3, "expand": 1}, {"blocks": 1, "kernel": 5, "expand": 3},
                                  {"blocks": 2, "kernel": 3, "expand": 3}, {"blocks": 1, "kernel": 3, "expand": 3},
                                  {"blocks": 1, "kernel": 3, "expand": 3}]}
SMALLER = {"width": 0.5, "stages": [{"blocks": 1, "kernel": 3, "expand": 1}, {"blocks": 2, "kernel": 3, "expand": 3},
                                    {"blocks": 1, "kernel": 3, "expand": 3}, {"blocks": 1, "kernel": 3, "expand": 3},
                                    {"blocks": 1, "kernel": 3, "expand": 3}]}
# quick candidates: one proxy epoch of two batches, a short final training, short timing
FAST = dict(threads=1, proxy_epochs=1, proxy_batches=2, final_epochs=1, final_batches=2, max_seconds=0.2,
            sampler="random")


def run_nas(data, *, out, trials, teacher=None, teacher_weights=None, latency_table=None, max_latency_ms=None,
            max_size_kb=None, batch=1, seed=0):
    """``nas`` on the small space with the FAST settings, its options built from flat arguments."""
    space = NasSpace("mobilenetv2", space=SPACE, latency_table=latency_table,
                     teacher=ModelRef(teacher, weights=teacher_weights) if teacher else None,
                     proxy_epochs=FAST["proxy_epochs"], proxy_batches=FAST["proxy_batches"],
                     final_epochs=FAST["final_epochs"], final_batches=FAST["final_batches"])
    return nas(space, data, budget=Budget(max_latency_ms=max_latency_ms, max_size_kb=max_size_kb, max_accuracy_drop=None),
               target=Target(batch_sizes=(batch,), threads=FAST["threads"], max_seconds=FAST["max_seconds"]),
               search=Search(trials=trials, seed=seed, sampler=FAST["sampler"]), store=Store(out=out))
# The table's own validation times both architectures whole in the same interleaved rounds as
# its blocks. One thread: on a loaded 2-core machine a 2-thread session waits for its second
# thread to be scheduled, which adds noise the predictor is not about.
# The table's accuracy on real timings is a benchmark's claim (bench/nas.py, BENCHMARKS.md: 8.1% mean
# error over 30 architectures, timed on a quiet machine). Here, inside a test suite that loads the
# machine, the two validation networks (0.02 ms each) only have to come out within 50%: what a
# broken predictor (a block counted twice, the fixed cost left out) misses by. At 20% this test
# failed in full-suite runs on this 2-core machine and passed alone.
TOLERANCE = 0.5


@pytest.fixture(scope="module")
def space() -> Space:
    return Space.from_data(SPACE, knobs=("blocks", "kernel", "expand"))


@pytest.fixture(scope="module")
def table(digits, tmp_path_factory) -> LatencyTable:
    out = tmp_path_factory.mktemp("table") / "table.json"
    return build_latency_table("mobilenetv2", digits, Target("ort-cpu", batch_sizes=(1,), threads=1),
                               TableConfig(space=SPACE, rounds=7, validate=[SMALL, SMALLER]), out=out)


@pytest.fixture(scope="module")
def teacher(trained):
    return trained("lenet5", epochs=8)[1]


@pytest.fixture(scope="module")
def search_table(table) -> LatencyTable:
    """The measured table with every prediction doubled, for the search tests.

    They test control flow (rejection by the table, resume, results, workers), not the table's
    accuracy (tested above): with predictions twice the measured cost, a candidate the table
    admits also meets the limit when its artifact is timed, however noisy microsecond timings are.
    """
    data = copy.deepcopy(table.data)
    for entry in data["blocks"].values():
        entry["ms"] *= 2
    data["fixed_ms"] = {k: v * 2 for k, v in data["fixed_ms"].items()}
    return LatencyTable(data)


@pytest.fixture(scope="module")
def limit(search_table, space) -> float:
    """A latency limit between the fastest and the slowest architecture: some are rejected."""
    import itertools

    preds = []
    for combo in itertools.product(*[space.stage_options(i) for i in range(len(space.stages))]):
        preds.append(search_table.predict({"width": 0.5, "stages": list(combo)})["ms"])
    preds.sort()
    assert preds[0] < preds[-1]
    return (preds[len(preds) // 2 - 1] + preds[len(preds) // 2]) / 2


class Spy:
    """Counts real calls of the training loop (the wrapped function still runs)."""

    def __init__(self, fn):
        self.fn, self.calls = fn, 0

    def __call__(self, *args, **kwargs):
        self.calls += 1
        return self.fn(*args, **kwargs)


@pytest.fixture(scope="module")
def search(tmp_path_factory, digits, search_table, teacher, limit):
    """A real architecture search on digits: 2 candidates trained (distilled from lenet5), every
    other proposal rejected by the table; then resumed to 3 candidates."""
    import slimkit.methods.distill as distill_mod

    out = tmp_path_factory.mktemp("nas") / "run"
    mp = pytest.MonkeyPatch()
    spy = Spy(distill_mod.fit)
    mp.setattr(distill_mod, "fit", spy)
    try:
        first = run_nas(digits, teacher="zoo:lenet5", teacher_weights=teacher, latency_table=search_table,
                        max_latency_ms=limit, trials=2, out=out, seed=3)
        snapshot = [(t.number, t.state.name, t.values, t.datetime_complete) for t in _study(out).trials]
        calls_first = spy.calls
        second = run_nas(digits, teacher="zoo:lenet5", teacher_weights=teacher, latency_table=search_table,
                         max_latency_ms=limit, trials=3, out=out, seed=3)
    finally:
        mp.undo()
    return {"out": out, "first": first, "second": second, "snapshot": snapshot, "calls_first": calls_first,
            "calls": spy.calls}


def _study(out: Path) -> optuna.Study:
    optuna.logging.set_verbosity(optuna.logging.ERROR)
    return optuna.load_study(study_name=out.name, storage=f"sqlite:///{out / 'study.db'}")


# ----------------------------------------------------------------------------- spaces as data


def test_space_round_trips_as_data_and_builds_the_models_its_specs_name(tmp_path, space):
    assert Space.from_data(space.to_data(), knobs=space.knobs) == space
    assert space.size() == 8
    path = tmp_path / "space.yaml"
    path.write_text(yaml.safe_dump({"family": "mobilenetv2", **SPACE}))
    fam = get_family("mobilenetv2")
    from slimkit.nas import load_space

    assert load_space(fam, path) == space
    for name in ("mobilenetv2", "resnet"):
        fam = get_family(name)
        for arch in (fam.space.smallest(), fam.space.largest()):
            built = fam.build(arch, (1, 8, 8), 10)
            rebuilt = load_model(fam.spec(arch), input_shape=(1, 8, 8), num_classes=10)
            assert [p.shape for p in built.parameters()] == [p.shape for p in rebuilt.parameters()]
            _, plan = block_plan(fam, arch, (1, 8, 8), 10)
            assert len(plan) == sum(s["blocks"] for s in arch["stages"])
            assert [b["role"] for b in plan].count("first") == len(arch["stages"])
    trial = optuna.trial.FixedTrial({"width": 0.5, **{f"s{i}.{k}": v[0] for i, st in enumerate(SPACE["stages"])
                                                      for k, v in st.items()}})
    assert space.sample(trial) == space.smallest()
    assert space.contains(SMALL) and not space.contains({**SMALL, "width": 1.0})


@pytest.mark.parametrize("data,needle", [
    ({"width": [0.5], "stages": [{"blocks": [1], "kernel": [4], "expand": [1]}] * 5}, "field 'kernel'"),
    ({"width": [0.5], "stages": [{"blocks": [1], "kernel": [3], "expand": [1], "groups": [2]}] * 5}, "unknown knob"),
    ({"width": []}, "field 'width'"),
    ({"depth": [2]}, "unknown key"),
    ({"width": [0.5], "stages": [{"blocks": [1], "kernel": [3], "expand": [1]}] * 2}, "has 5 stages"),
])
def test_a_bad_space_is_rejected_naming_what_is_wrong(data, needle):
    from slimkit.nas import load_space

    with pytest.raises(ConfigError, match=needle):
        load_space(get_family("mobilenetv2"), data)


def test_a_new_family_registers_its_own_space(digits):
    """A family is data plus three functions; once registered, every part of nas can use it."""
    from slimkit.models import create_model

    def build(arch, input_shape, num_classes):
        return create_model("resnet", input_shape=input_shape, num_classes=num_classes, width=arch["width"],
                            blocks=[s["blocks"] for s in arch["stages"]], kernel=[s["kernel"] for s in arch["stages"]])

    fam = register_family(Family(
        name="tiny-resnet", space=Space.from_data({"width": [0.25], "stages": [{"blocks": [1, 2], "kernel": [3]}] * 3},
                                                  knobs=("blocks", "kernel")),
        build=build, spec=get_family("resnet").spec, blocks=get_family("resnet").blocks))
    try:
        assert get_family("tiny-resnet") is fam
        arch = fam.space.largest()
        _, plan = block_plan(fam, arch, digits.input_shape, digits.num_classes)
        assert [b["name"] for b in plan] == ["layer1.0", "layer1.1", "layer2.0", "layer2.1", "layer3.0", "layer3.1"]
        assert plan[2]["key"].startswith("first: BasicBlock 4x8x8") and plan[3]["role"] == "next"
    finally:
        _FAMILIES.pop("tiny-resnet", None)
    with pytest.raises(SlimkitError, match="unknown architecture family 'tiny-resnet'"):
        get_family("tiny-resnet")


# ----------------------------------------------------------------------------- the latency table


def test_a_block_cut_from_the_exported_graph_computes_what_the_torch_block_does(tmp_path, digits):
    """The table times ONNX subgraphs cut out of the exported network: check they are the blocks."""
    fam = get_family("mobilenetv2")
    torch.manual_seed(0)
    model, plan = block_plan(fam, SMALL, digits.input_shape, digits.num_classes)
    model.eval()
    path = export_onnx(model, tmp_path / "m.onnx", digits.example(2))
    proto = onnx.load(str(path))
    deploy = fold_batchnorm(model, digits.example(2))
    first, nxt = plan[2], plan[3]  # stage 2: its first block and the following one
    x = torch.randn(3, *first["in_shape"])
    with torch.no_grad():
        want = deploy.get_submodule(nxt["name"])(deploy.get_submodule(first["name"])(x)).numpy()
    chain = onnx_chain(proto, [first["name"], nxt["name"]], first["in_shape"], nxt["out_shape"])
    onnx.checker.check_model(chain)
    onnx.save(chain, str(tmp_path / "chain.onnx"))
    sess = ort_session(tmp_path / "chain.onnx", 1)
    got = sess.run(None, {"input": x.numpy()})[0]
    np.testing.assert_allclose(got, want, atol=1e-4, rtol=1e-4)
    longer = onnx_chain(proto, [first["name"]] + [nxt["name"]] * 3, first["in_shape"], nxt["out_shape"])
    assert len(longer.graph.node) == len(chain.graph.node) + 2 * sum(
        1 for n in proto.graph.node if nxt["name"] in _scopes(n))
    with pytest.raises(SlimkitError, match="no node of module"):
        onnx_chain(proto, ["blocks.99"], first["in_shape"], first["out_shape"])


def test_the_table_predicts_two_small_architectures_within_tolerance(table):
    d = table.data
    assert d["family"] == "mobilenetv2" and d["target"] == "ort-cpu" and d["batch"] == 1 and d["threads"] == 1
    assert list(d["fixed_ms"]) == ["0.5"]
    assert len(d["references"]) == 3  # two kernel choices at full depth, and the shallowest network
    hows = {v["how"] for v in d["blocks"].values()}
    assert hows == {"alone (first of its stage)", "chain of 4 minus the first alone"}
    assert all(v["ms"] > 0 for k, v in d["blocks"].items() if k.startswith("first"))
    pairs = d["validation"]["pairs"]
    assert [p["arch"] for p in pairs] == [SMALL, SMALLER]
    for p in pairs:
        assert p["predicted_ms"] == pytest.approx(table.predict(p["arch"])["ms"])
        assert p["relative_error"] == pytest.approx(abs(p["predicted_ms"] - p["measured_ms"]) / p["measured_ms"], rel=1e-3)
        assert p["relative_error"] <= TOLERANCE, pairs
    # a deeper architecture is predicted slower: the following block adds its measured cost
    deeper = copy.deepcopy(SMALLER)
    deeper["stages"][2]["blocks"] = 2
    assert table.predict(deeper)["ms"] > table.predict(SMALLER)["ms"]
    fastest_ms, fastest = table.fastest()
    assert fastest_ms == pytest.approx(table.predict(fastest)["ms"])
    assert fastest_ms <= min(table.predict(a)["ms"] for a in (SMALL, SMALLER, table.space.smallest()))


def test_a_table_is_only_used_for_what_it_measured(table, tmp_path, digits):
    path = table.save(tmp_path / "t.json")
    again = LatencyTable.load(path)
    assert again.predict(SMALL)["ms"] == pytest.approx(table.predict(SMALL)["ms"])
    need = dict(family="mobilenetv2", space=table.space, target="ort-cpu", batch=1, threads=1, input_shape=(1, 8, 8),
                num_classes=10)
    assert again.mismatches(**need) == []
    assert "batch" in again.mismatches(**{**need, "batch": 8})[0]
    wider = table.space.to_data()
    wider["width"] = [0.5, 1.0]
    assert "space" in again.mismatches(**{**need, "space": Space.from_data(wider, knobs=table.space.knobs)})[0]
    with pytest.raises(SlimkitError, match="measured for something else"):
        run_nas(digits, latency_table=path, batch=8, trials=1, out=tmp_path / "x")
    (tmp_path / "bad.json").write_text('{"x": 1}')
    with pytest.raises(SlimkitError, match="not a slimkit latency table"):
        LatencyTable.load(tmp_path / "bad.json")


# ----------------------------------------------------------------------------- the search


def test_candidates_over_budget_are_never_trained(search, limit):
    out = search["out"]
    study = _study(out)
    trials = study.trials
    rejected = [t for t in trials if t.user_attrs.get("rejected")]
    trained = [t for t in trials if not t.user_attrs.get("rejected") and not t.user_attrs.get("duplicate_of")]
    assert rejected, "the limit lies inside the space: some proposals must be over it"
    assert len(trained) == 3
    for t in rejected:
        assert t.state.name == "PRUNED"
        assert t.user_attrs["prediction"]["predicted_ms"] > limit
        assert t.constraints["latency_ms@1"] > 0
        for never in ("figures", "val_curve", "recipe", "artifacts"):
            assert never not in t.user_attrs  # no training, no export, no measurement
        assert not (out / "trials" / f"{t.number:04d}").exists()
    for t in trained:
        assert t.state.name == "COMPLETE"
        assert t.user_attrs["prediction"]["predicted_ms"] <= limit
        assert t.user_attrs["val_curve"] and (out / "trials" / f"{t.number:04d}" / "model.onnx").is_file()
        p = t.user_attrs["prediction"]
        assert p["measured_ms"] == t.user_attrs["figures"]["latency_ms"]["1"]
        assert t.user_attrs["recipe"]["steps"][0]["distill"]["student"] == get_family("mobilenetv2").spec(
            t.user_attrs["arch"])
    # the training loop ran once per trained candidate, plus the final training of the best (again
    # after the resume only if the best changed)
    finals = 1 + (search["second"].report["best"]["trial"] != search["first"].report["best"]["trial"])
    assert search["calls"] == len(trained) + finals
    csv = pd.read_csv(out / "trials.csv")
    assert set(csv.loc[csv["state"] == "rejected", "trial"]) == {t.number for t in rejected}
    assert csv["note"].fillna("").str.contains("rejected before training").sum() == len(rejected)


def test_nas_resumes_from_its_storage(search):
    out = search["out"]
    study = _study(out)
    before = search["snapshot"]
    assert [(t.number, t.state.name, t.values, t.datetime_complete) for t in study.trials[:len(before)]] == before
    assert search["calls_first"] == 2 + 1  # 2 candidates + the final training
    assert search["second"].report["trials"]["total"] == len(study.trials)


def test_nas_writes_the_compress_layout_and_predicted_vs_measured(search, digits):
    out, res = search["out"], search["second"]
    for name in ("best.onnx", "best.safetensors", "best_recipe.yaml", "best_arch.yaml", "trials.csv", "result.json",
                 "report.html", "latency_table.json"):
        assert (out / name).is_file() or name == "latency_table.json", name
    report = json.loads((out / "result.json").read_text())
    assert report["command"] == "nas" and report["family"] == "mobilenetv2"
    lp = report["latency_prediction"]
    assert len(lp["pairs"]) == 3 and lp["mean_relative_error"] is not None
    assert all(p["predicted_ms"] > 0 and p["measured_ms"] > 0 for p in lp["pairs"])
    best = report["best"]
    assert best["final"]["recipe"]["steps"][0]["distill"]["max_batches"] == 2  # the final training's recipe
    arch = yaml.safe_load((out / "best_arch.yaml").read_text())
    model = load_model(arch["model"], weights=out / "best.safetensors", input_shape=digits.input_shape,
                       num_classes=digits.num_classes)
    sess = ort_session(out / "best.onnx", 1)
    x = digits.x_test[:64]
    with torch.no_grad():
        np.testing.assert_allclose(sess.run(None, {"input": x.numpy()})[0], model(x).numpy(), atol=1e-3)
    assert res.model is not None and res.onnx_path == out / "best.onnx"
    page = (out / "report.html").read_text()
    assert "slimkit nas: mobilenetv2 architectures" in page and "predicted vs measured" in page
    recipe = yaml.safe_load((out / "best_recipe.yaml").read_text())
    assert recipe["steps"][0]["distill"]["student"] == arch["model"]


def test_a_worker_joins_an_architecture_search(search, cli):
    out = search["out"]
    n_before = len(_study(out).trials)
    trained_before = sum(1 for t in _study(out).trials if t.state.name == "COMPLETE"
                         and not t.user_attrs.get("duplicate_of"))
    r = cli("worker", "--storage", f"sqlite:///{out / 'study.db'}", "--study", out.name, "--trials", "1")
    assert r.code == 0, r
    study = _study(out)
    new = study.trials[n_before:]
    assert new and all("arch" in t.user_attrs and "prediction" in t.user_attrs for t in new)
    trained_now = sum(1 for t in study.trials if t.state.name == "COMPLETE" and not t.user_attrs.get("duplicate_of"))
    assert trained_now in (trained_before, trained_before + 1)  # +1 unless its only candidate failed or stopped
    assert sum(1 for t in new if not t.user_attrs.get("rejected") and not t.user_attrs.get("duplicate_of")) == 1


def test_an_impossible_budget_or_unknown_family_is_a_clear_error(table, tmp_path, digits, cli):
    fastest_ms, _ = table.fastest()
    with pytest.raises(SlimkitError, match="impossible budget: the fastest architecture") as e:
        run_nas(digits, latency_table=table, max_latency_ms=fastest_ms / 2, trials=1, out=tmp_path / "a")
    assert f"{fastest_ms:.3g} ms" in str(e.value)
    assert not (tmp_path / "a" / "trials").exists()
    with pytest.raises(SlimkitError, match="impossible budget: the smallest architecture"):
        run_nas(digits, latency_table=table, max_size_kb=1, trials=1, out=tmp_path / "b")
    r = cli("nas", "--family", "nope", "--out", tmp_path / "c")
    assert r.code == 2 and "unknown architecture family 'nope'" in r.err and "mobilenetv2" in r.err, r
    r = cli("latency-table", "--family", "nope", "--out", tmp_path / "t.json")
    assert r.code == 2 and "unknown architecture family 'nope'" in r.err, r
    r = cli("nas", "--max-accuracy-drop", "0.01", "--out", tmp_path / "d")
    assert r.code == 2 and "--teacher" in r.err, r


def test_latency_table_command(cli, tmp_path):
    """The CLI end to end on the smallest space: one reference network, its five first blocks."""
    space = tmp_path / "space.yaml"
    space.write_text(yaml.safe_dump({"family": "mobilenetv2", "width": [0.35],
                                     "stages": [{"blocks": [1], "kernel": [3], "expand": [1]}]
                                     + [{"blocks": [1], "kernel": [3], "expand": [2]}] * 4}))
    out = tmp_path / "t.json"
    r = cli("latency-table", "--family", "mobilenetv2", "--data", "digits", "--space", space, "--threads", "1",
            "--rounds", "3", "--out", out)
    assert r.code == 0, r
    assert "fixed cost per width" in r.out and f"wrote {out}" in r.out
    t = LatencyTable.load(out)
    assert len(t.data["blocks"]) == 5 and t.threads == 1
    assert t.predict(t.space.smallest())["ms"] == pytest.approx(t.data["references"][0]["measured_ms"])
    r = cli("latency-table", "--family", "mobilenetv2", "--space", space, "--out", out)
    assert r.code == 2 and "--overwrite" in r.err


# ----------------------------------------------------------------------------- training hooks


def test_recalibrated_batch_norm_statistics_are_those_of_the_data():
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3), torch.nn.BatchNorm2d(4))
    x = torch.randn(256, 1, 8, 8) * 3 + 1
    assert recalibrate_bn(net, x, batches=2, batch_size=128) == 1
    with torch.no_grad():
        feats = net[0](x)  # (N, 4, 6, 6)
    bn = net[1]
    np.testing.assert_allclose(bn.running_mean.numpy(), feats.mean((0, 2, 3)).numpy(), rtol=1e-4, atol=1e-5)
    assert bn.momentum == 0.1 and net.training


def test_pareto_stop_stops_a_slower_and_worse_candidate():
    study = optuna.create_study(directions=["minimize", "minimize", "maximize"])
    for pred, curve in ((0.5, [0.80, 0.90]), (0.6, [0.70, 0.85]), (2.0, [0.95, 0.97])):
        study.add_trial(optuna.trial.create_trial(values=[1, 1, curve[-1]], user_attrs={
            "val_curve": curve, "feasible": True, "prediction": {"predicted_ms": pred}}))
    fast = ParetoStop(study.ask(), floor=None, predicted_ms=0.4, epochs=2)
    fast.on_epoch_end(None, 1, 0.1)  # nothing finished is as fast: keep it
    slow = ParetoStop(study.ask(), floor=None, predicted_ms=1.0, epochs=2)
    with pytest.raises(optuna.TrialPruned, match="below that of 2 finished candidates"):
        slow.on_epoch_end(None, 1, 0.65)
    last = ParetoStop(study.ask(), floor=None, predicted_ms=1.0, epochs=1)
    last.on_epoch_end(None, 1, 0.1)  # the last proxy epoch: stopping would save nothing


# ----------------------------------------------------------------------------- the supernet


def test_supernet_sub_networks_share_its_weights_exactly(digits):
    """A sub-network computed inside the supernet equals the standalone model extracted from it,
    for both families, across widths, depths, kernels and expansions."""
    import random

    big = torch.arange(2 * 3 * 5 * 5, dtype=torch.float32).reshape(2, 3, 5, 5)
    assert torch.equal(inherit(big, (1, 2, 3, 3)), big[:1, :2, 1:4, 1:4])  # leading channels, kernel centre
    with pytest.raises(SlimkitError, match="larger than the supernet"):
        inherit(big, (3, 3, 5, 5))
    for name, narrow in (("mobilenetv2", {"width": [0.35, 0.5]}), ("resnet", {"width": [0.25, 0.5]})):
        sn = Supernet(name, input_shape=digits.input_shape, num_classes=10, space=narrow)
        rng = random.Random(0)
        x = digits.x_train[:16]
        for arch in (sn.space.smallest(), sn.sample(rng), sn.sample(rng)):
            sub = sn.extract(arch).train()  # batch statistics on both sides
            with torch.no_grad():
                np.testing.assert_allclose(sn(x, arch).numpy(), sub(x).numpy(), atol=1e-5)
            assert load_model(get_family(name).spec(arch), input_shape=(1, 8, 8), num_classes=10).state_dict().keys() \
                == sub.state_dict().keys()


def test_supernet_training_moves_every_sub_network(digits):
    sn = Supernet("mobilenetv2", input_shape=digits.input_shape, num_classes=10,
                  space={"width": [0.5], "stages": [{}, {"blocks": [1, 2]}, {"blocks": [1]}, {"blocks": [1]},
                                                    {"blocks": [1]}]})
    before = {n: p.detach().clone() for n, p in sn.named_parameters()}
    report = train_supernet(sn, digits, steps=3, train=TrainConfig(lr=2e-3, batch_size=32))
    assert report["steps"] == 3 and report["subnets_per_step"] == 4
    changed = [n for n, p in sn.named_parameters() if not torch.equal(p, before[n])]
    assert len(changed) == len(before)  # the largest sub-network touches every shared weight
    acc, model = evaluate_subnet(sn, sn.space.smallest(), digits)
    assert 0 <= acc <= 1 and isinstance(model, torch.nn.Module)


def test_result_json_is_what_the_written_files_measure(search, teacher, digits, tmp_path):
    """Issue 13, item 6: test accuracy exact, the latency ratio to the baseline (the teacher) within 25%."""
    from slimkit.export import export_onnx

    from .honesty import check_result_figures

    out = search["out"]
    report = json.loads((out / "result.json").read_text())
    baseline_onnx = export_onnx(load_model(weights=teacher), tmp_path / "teacher.onnx", digits.example(2))
    check_result_figures(report, baseline_onnx, out / "best.onnx", digits, (1,))
