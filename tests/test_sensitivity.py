"""Sensitivity analysis: each layer pruned alone, a table, a plot, and per-layer ratios for a target."""

import copy
import json

import pytest
import torch

from slimkit.errors import ConfigError, SlimkitError
from slimkit.methods.prune import SensitivityConfig, Unstructured, allocate, prune_, sensitivity
from slimkit.pipeline import Recipe
from slimkit.training import evaluate


def test_unstructured_sensitivity_measures_each_layer_alone(trained, digits, tmp_path):
    model, _ = trained("lenet300")
    r = sensitivity(model, digits, SensitivityConfig("unstructured", [0.5, 0.99], target=0.8), out=tmp_path / "s")
    base = evaluate(model, digits.x_val, digits.y_val)
    assert r["baseline_accuracy"] == base and r["ratios"] == [0.5, 0.99] and set(r["layers"]) == {"fc1", "fc2", "fc3"}
    # the figures are what pruning that one layer really does
    alone = copy.deepcopy(model)
    prune_(alone, Unstructured(sparsity=0.99, scope="layer", skip=["fc2", "fc3"]))
    assert r["layers"]["fc1"]["accuracy"][1] == evaluate(alone, digits.x_val, digits.y_val)
    for row in r["layers"].values():
        assert row["accuracy"][1] <= row["accuracy"][0] + 0.02  # 99% of a layer hurts at least as much as 50%
    assert r["layers"]["fc3"]["accuracy"][1] < base - 0.2  # the classifier alone at 99% is ruinous
    assert torch.equal(model.fc1.weight, trained("lenet300")[0].fc1.weight)  # the input model is untouched

    alloc = r["allocation"]
    params = {n: v["params"] for n, v in r["layers"].items()}
    weighted = sum(alloc["ratios"][n] * params[n] for n in params) / sum(params.values())
    assert alloc["achieved"] == pytest.approx(0.8, abs=1e-3) and weighted == pytest.approx(0.8, abs=1e-3)
    assert alloc["ratios"]["fc3"] <= max(alloc["ratios"]["fc1"], alloc["ratios"]["fc2"])  # the sensitive one is spared
    # the recipe it writes applies and reaches the target
    recipe = Recipe.load(tmp_path / "s" / "recipe.yaml")
    cfg = recipe.steps[0].config
    pruned = copy.deepcopy(model)
    rep = prune_(pruned, cfg)
    assert rep["pruned_layers_sparsity"] == pytest.approx(0.8, abs=1e-3)
    saved = json.loads((tmp_path / "s" / "sensitivity.json").read_text())
    assert saved["layers"]["fc1"]["accuracy"] == r["layers"]["fc1"]["accuracy"]
    assert (tmp_path / "s" / "sensitivity.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_structured_sensitivity_prunes_channel_groups(trained, digits):
    model, _ = trained("lenet5")
    r = sensitivity(model, digits, SensitivityConfig("structured", [0.25, 0.75], importance="l1"))
    assert set(r["layers"]) == {"conv1", "conv2", "fc1"}  # fc2 is the classifier: never pruned
    assert r["layers"]["conv1"]["coupled"] == ["conv1"]
    base = r["baseline_accuracy"]
    assert all(min(v["accuracy"]) <= base for v in r["layers"].values())
    assert any(v["accuracy"][1] < v["accuracy"][0] for v in r["layers"].values())


def test_allocation_spares_the_sensitive_layers():
    report = {"ratios": [0.3, 0.6, 0.9], "baseline_accuracy": 0.9, "layers": {
        "robust": {"params": 300, "accuracy": [0.9, 0.9, 0.88]},
        "middle": {"params": 100, "accuracy": [0.9, 0.89, 0.5]},
        "fragile": {"params": 10, "accuracy": [0.5, 0.4, 0.1]},
    }}
    a = allocate(report, 0.6)
    assert a["ratios"]["fragile"] == 0.0 and a["ratios"]["robust"] >= a["ratios"]["middle"] > 0
    assert a["achieved"] == pytest.approx(0.6) and a["tolerance"] == pytest.approx(0.02)
    assert allocate(report, 0.2)["ratios"] == {"robust": pytest.approx(0.2733, abs=1e-4), "middle": 0.0, "fragile": 0.0}
    with pytest.raises(SlimkitError, match="cannot be reached"):
        allocate(report, 0.95)


def test_sensitivity_cli_writes_table_plot_and_recipe(cli, trained, tmp_path):
    _, weights = trained("lenet5")
    out = tmp_path / "sens"
    r = cli("sensitivity", "--model", "zoo:lenet5", "--weights", weights, "--method", "unstructured",
            "--ratios", "0.5,0.9", "--layers", "conv*", "--target", "0.5", "--out", out)
    assert r.code == 0, r
    assert "conv1" in r.out and "conv2" in r.out and "fc1" not in r.out and "ratio for target" in r.out
    rep = json.loads((out / "sensitivity.json").read_text())
    assert set(rep["layers"]) == {"conv1", "conv2"} and rep["allocation"]["achieved"] == pytest.approx(0.5, abs=1e-3)
    assert (out / "sensitivity.png").stat().st_size > 1000
    assert Recipe.load(out / "recipe.yaml").steps[0].name == "prune_unstructured"
    again = cli("sensitivity", "--model", "zoo:lenet5", "--weights", weights, "--out", out)
    assert again.code == 2 and "already holds a previous run" in again.err


@pytest.mark.parametrize("args,message", [
    (["--method", "random"], "unknown method 'random'; choose one of unstructured, structured"),
    (["--ratios", "0.5,1.5"], "ratios must be one or more numbers in [0, 1)"),
    (["--ratios", "half"], "--ratios must be comma-separated numbers"),
    (["--layers", "fc9"], "no layer is named or matches 'fc9'"),
    (["--method", "structured", "--importance", "entropy"], "unknown importance 'entropy'"),
    (["--target", "1.5"], "target must be in (0, 1)"),
])
def test_sensitivity_bad_input_exits_2_with_a_reason(cli, tmp_path, args, message):
    r = cli("sensitivity", "--model", "zoo:lenet300", *args, "--out", tmp_path / "x")
    assert r.code == 2, r
    assert message in " ".join(r.err.split()), r.err


def test_bad_arguments_in_python_too():
    with pytest.raises(ConfigError, match="unknown method"):
        sensitivity("zoo:lenet300", "digits", SensitivityConfig("magnitude"))
