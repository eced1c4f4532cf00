"""Issue 11, item 2: latency-targeted structured pruning. ``prune_structured: {target_speedup: 2}``
allocates per-layer channel ratios from the per-layer times measured on the target and the
accuracy each candidate cut leaves (NetAdapt), and reports the target against what was reached.

The allocation's tests use a latency backend (or callbacks) reporting chosen times: real
speed-ups belong in benchmarks, not in timed tests.
"""

from __future__ import annotations

import time

import onnx
import optuna
import pytest

import slimkit
from slimkit.errors import ConfigError
from slimkit.export import parity
from slimkit.layers import LayerSelection
from slimkit.measure import backends
from slimkit.methods._prune_structured import allocate_latency_
from slimkit.methods.prune import Structured, prune_
from slimkit.models import ModelRef, load_model
from slimkit.pipeline import Recipe, get_step
from slimkit.training import evaluate

MS_PER_CHANNEL = 0.2  # what conv1 costs per output channel on the pretend target


class ConvOneSlow:
    """``ort-cpu`` where conv1 is the slow layer: an artifact's calls take ``MS_PER_CHANNEL`` more per
    output channel of its conv1 (read from the ONNX file), and the profiler reports that as conv1's
    time; the other layers' times are the real ones (lenet5's conv2 is the slow one in truth)."""

    name = "ort-cpu"
    needs_onnx = True

    def __init__(self, real):
        self.real = real

    def prepare(self, model, onnx_path, threads):
        runner = self.real.prepare(model, onnx_path, threads)
        graph = onnx.load(str(onnx_path), load_external_data=False).graph
        channels = next(i.dims[0] for i in graph.initializer if i.name == "conv1.weight")
        delay = channels * MS_PER_CHANNEL / 1000

        class Slow:
            def __call__(self, x):
                time.sleep(delay)
                return runner(x)

            def layer_times(self, x, repeats):
                return {**runner.layer_times(x, repeats), "conv1": delay}

            def close(self):
                runner.close()

        return Slow()


TARGET = slimkit.Target(batch_sizes=(1,), threads=1, max_seconds=0.05, layers=False)


def test_the_layer_the_target_says_is_slowest_is_pruned_most(trained, digits, monkeypatch):
    monkeypatch.setitem(backends._BACKENDS, "ort-cpu", ConvOneSlow(backends.get_backend("ort-cpu")))
    model, _ = trained("lenet5")
    step = prune_(model, Structured(target_speedup=2.0), data=digits, target=TARGET)
    assert step["target"] == {"speedup": 2.0, "batch": "1"}
    # conv1 (reported slow) loses channels, conv2 (really the slowest, reported cheap) keeps them
    assert step["ratios"]["conv1"] >= 0.2 and "conv2" not in step["ratios"]
    assert step["channels"]["conv2"] == [50, 50] and model.conv1.out_channels == step["channels"]["conv1"][1]
    # every iteration is timed side by side with the input, profiled again and scored on validation accuracy
    rows = step["iterations"]
    assert rows[0]["speedup"] == 1.0 and len(rows) >= 2
    assert all(r["layer"] == "conv1" and {"measured_ms", "estimated_ms", "speedup", "accuracy"} <= set(r) for r in rows[1:])
    assert step["stopped"] == "target reached" and step["reached"]["speedup"] == rows[-1]["speedup"] >= 2.0
    assert step["reached"]["met"] is True and step["reached"]["batch"] == "1"


def test_the_allocation_follows_the_measured_layer_times(trained, digits):
    """The same model with fc1 made the slow layer (times scale with the weights: in x out
    channels): what is cut is fc1's time, through its own channels or conv2's; conv1 is not cut."""
    model, _ = trained("lenet5")
    cost = {"conv1": 0.05, "conv2": 0.05, "fc1": 4.0}  # ms at full size
    full = {n: model.get_submodule(n).weight.numel() for n in cost}

    def layer_times(m):
        return {n: c * m.get_submodule(n).weight.numel() / full[n] for n, c in cost.items()}

    def measure(m, first):
        ms = sum(layer_times(m).values())
        return ms, sum(cost.values()) / ms

    recovered = []
    r = allocate_latency_(model, LayerSelection({}), importance="l2", round_to=8, example=digits.example(2),
                          data=digits, reached=lambda ms, s: s >= 2.0, remaining=lambda ms, s: max(0.0, 1 - s / 2.0),
                          step=0.2, layer_times=layer_times, measure=measure,
                          accuracy=lambda m: evaluate(m, digits.x_val, digits.y_val), recover=recovered.append)
    assert "conv1" not in r["ratios"] and {"fc1", "conv2"} & set(r["ratios"]), r["ratios"]
    assert layer_times(model)["fc1"] <= cost["fc1"] / 1.8
    assert r["stopped"] == "target reached" and r["iterations"][-1]["speedup"] >= 2.0
    assert len(recovered) == len(r["iterations"]) - 1 and all("recovered_accuracy" in row for row in r["iterations"][1:])
    assert all(r["channels"][n][1] % 8 == 0 for n in r["ratios"])  # what is cut stays aligned
    assert model(digits.example(4)).shape == (4, 10)


def test_pruning_that_buys_no_speed_stops_and_keeps_the_fastest_iteration(trained, digits):
    """A target that no cut brings closer (the model reads 1.2x whatever goes): after three
    iterations no faster than the first, the allocation stops and gives back the first's model."""
    model, _ = trained("lenet5")
    r = allocate_latency_(model, LayerSelection({}), importance="l2", round_to=8, example=digits.example(2),
                          data=digits, reached=lambda ms, s: s >= 3.0, remaining=lambda ms, s: max(0.0, 1 - s / 3.0),
                          step=0.1, layer_times=lambda m: {"conv1": 1.0, "conv2": 1.0, "fc1": 1.0},
                          measure=lambda m, first: (1.0, 1.0) if first else (1 / 1.2, 1.2),
                          accuracy=lambda m: evaluate(m, digits.x_val, digits.y_val))
    rows = r["iterations"]
    assert len(rows) == 5 and r["stopped"].startswith("no faster than iteration 1 (1.20x)"), r["stopped"]
    first = rows[1]
    assert r["ratios"] == {first["layer"]: round(1 - first["channels"][1] / first["channels"][0], 4)}
    assert model.get_submodule(first["layer"]).weight.shape[0] == first["channels"][1]


@pytest.mark.parametrize("fields,field,message", [
    ({"target_speedup": 1.0}, "target_speedup", "must be > 1"),
    ({"target_speedup": 0.5}, "target_speedup", "must be > 1"),
    ({"target_latency_ms": 0}, "target_latency_ms", "must be > 0"),
    ({"target_speedup": 2, "target_latency_ms": 1.0}, "target_latency_ms", "not both"),
    ({"target_speedup": 2, "ratio": 0.3}, "ratio", "either ratio .* or target_speedup"),
    ({"target_speedup": 2, "layers": {"conv1": 0.5}}, "layers", "allocated from the measured times"),
    ({"target_speedup": 2, "scope": "global"}, "scope", "must be 'layer'"),
    ({"target_batch": 64}, "target_batch", "give target_speedup or target_latency_ms"),
    ({"target_speedup": 2, "latency_step": 0}, "latency_step", r"must be in \(0, 1\]"),
    ({"target_speedup": 2, "recover_batches": -1}, "recover_batches", "must be >= 0"),
])
def test_bad_targets_are_rejected_naming_the_field(fields, field, message):
    with pytest.raises(ConfigError, match=message) as err:
        Structured(**fields)
    assert err.value.field == field
    with pytest.raises(ConfigError, match=f"step 1 'prune_structured', field '{field}'"):
        Recipe.from_data([{"prune_structured": fields}])


def test_a_target_batch_the_target_does_not_time_is_refused(trained, tmp_path):
    _, weights = trained("lenet5")
    with pytest.raises(ConfigError, match=r"32 is not one of the batch sizes the target times \(1, 64\)") as err:
        slimkit.apply([{"prune_structured": {"target_speedup": 2, "target_batch": 32}}, "export"],
                      ModelRef("zoo:lenet5", weights=weights), "digits", out=tmp_path / "o", budget=None,
                      target=slimkit.Target(batch_sizes=(1, 64), threads=1, max_seconds=0.05, layers=False))
    assert err.value.field == "target_batch"


def test_a_real_target_on_lenet5_exports_with_parity_and_reloads(trained, digits, tmp_path):
    original, weights = trained("lenet5")
    out = tmp_path / "real"
    res = slimkit.apply([{"prune_structured": {"target_speedup": 1.5, "recover_batches": 2, "if_slower": "keep"}}, "export"],
                        ModelRef("zoo:lenet5", weights=weights), "digits", out=out, budget=None,
                        target=slimkit.Target(batch_sizes=(64,), threads=1, max_seconds=0.05, layers=False))
    step = res.report["steps"][0]
    assert step["target"] == {"speedup": 1.5, "batch": "64"} and step["pruned_layers"]
    assert set(step["reached"]) >= {"speedup", "latency_ms", "met"} and step["reached"]["speedup"] > 0
    assert all("recovered_accuracy" in row for row in step["iterations"][1:])
    assert res.report["parity"]["top1_agreement"] == 1.0
    model = load_model(weights=out / "model.safetensors")
    for name, (_, after) in step["channels"].items():
        assert model.get_submodule(name).weight.shape[0] == after
    assert parity(model, out / "model.onnx", digits.x_test)["top1_agreement"] == 1.0
    assert sum(p.numel() for p in model.parameters()) < sum(p.numel() for p in original.parameters())


def test_the_search_draws_a_target_or_a_ratio():
    space = get_step("prune_structured").space
    drawn = {"prune_structured.on": True, "prune_structured.importance": "l2"}
    target = space(optuna.trial.FixedTrial({**drawn, "prune_structured.mode": "target",
                                            "prune_structured.target_speedup": 2.2}))
    assert target == Structured(target_speedup=2.2, recover_batches=10) and target.targeted
    ratio = space(optuna.trial.FixedTrial({**drawn, "prune_structured.mode": "ratio", "prune_structured.ratio": 0.4}))
    assert ratio == Structured(ratio=0.4) and not ratio.targeted
    # a trial stored before the mode existed replays as the ratio it drew
    assert space(optuna.trial.FixedTrial({**drawn, "prune_structured.ratio": 0.4})) == Structured(ratio=0.4)
