"""Depthwise-separable replacement (separable_) on zoo models and on a model defined here."""

import json

import optuna
import pytest
import torch
from torch import nn

from slimkit.errors import ConfigError
from slimkit.export import export_onnx, parity
from slimkit.measure import count_macs, count_params, graph_stats
from slimkit.methods.architecture import Separable, SeparableConv2d, separable_
from slimkit.methods.decompose import LowRank, LowRankConv2d, decompose_
from slimkit.methods.distill import teacher_gap
from slimkit.models import load_model
from slimkit.pipeline import get_step
from slimkit.training import TrainConfig, evaluate, fit


class Net(nn.Module):
    """Dense 3x3 and 5x5 convs (one strided, one without bias), a 1x1 conv and a depthwise conv."""

    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, 16, 3, padding=1)
        self.b = nn.Conv2d(16, 24, 5, stride=2, padding=2, bias=False)
        self.point = nn.Conv2d(24, 24, 1)
        self.depth = nn.Conv2d(24, 24, 3, padding=1, groups=24)
        self.fc = nn.Linear(24, 4)

    def forward(self, x):
        x = torch.relu(self.b(torch.relu(self.a(x))))
        x = self.depth(torch.relu(self.point(x)))
        return self.fc(x.mean(dim=(2, 3)))  # (N, 24, H, W) -> (N, 24)


X = torch.randn(4, 3, 10, 10, generator=torch.Generator().manual_seed(1))


def _net():
    torch.manual_seed(0)
    return Net().eval()


def _rebuild(pair: SeparableConv2d) -> torch.Tensor:
    """W_hat[o, i] = sum_j P[o, i*m + j] D[i*m + j]: the dense kernel the pair computes."""
    depth, point = pair
    c_in = depth.groups
    m = depth.out_channels // c_in
    d = depth.weight[:, 0].reshape(c_in, m, *depth.kernel_size)  # (C_in, m, kh, kw)
    p = point.weight[:, :, 0, 0].reshape(-1, c_in, m)  # (C_out, C_in, m)
    return torch.einsum("oij,ijhw->oihw", p, d).detach()


def test_pair_is_the_best_depthwise_separable_fit_and_exact_at_full_multiplier():
    model = _net()
    weights = {"a": model.a.weight.detach().clone(), "b": model.b.weight.detach().clone()}
    with torch.no_grad():
        ref = model(X)
    rep = separable_(model, Separable(multiplier=1), example=X)
    rows = {r["name"]: r for r in rep["layers"]}
    assert rows["a"]["replaced"] and rows["b"]["replaced"] and rep["replaced"] == 2
    assert rows["point"]["reason"] == "a 1x1 convolution is already pointwise"
    assert rows["depth"]["reason"] == "already a grouped convolution"
    assert type(model.point) is nn.Conv2d and type(model.depth) is nn.Conv2d
    b = model.b
    assert isinstance(b, SeparableConv2d) and b[0].groups == 16 and b[0].stride == (2, 2) and b[0].kernel_size == (5, 5)
    assert b[1].kernel_size == (1, 1) and b[1].bias is None and model.a[1].bias is not None
    for name, w in weights.items():
        w_hat = _rebuild(getattr(model, name))
        err = float((w - w_hat).norm() / w.norm())
        assert err == pytest.approx(rows[name]["rel_error"], abs=1e-5) and 0 < err < 1
        # optimal: for each input channel, the rank-1 truncation of the (C_out, k*k) slice
        best = sum(float((torch.linalg.svdvals(w[:, i].reshape(w.shape[0], -1))[1:] ** 2).sum())
                   for i in range(w.shape[1]))
        assert err == pytest.approx((best / float(w.norm() ** 2)) ** 0.5, rel=1e-4)
    # with as many filters per channel as the slice's rank, the pair is the original layer
    model = _net()
    rep = separable_(model, Separable(multiplier=64, only_if_smaller=False), example=X)
    assert {r["name"]: r.get("multiplier") for r in rep["layers"] if r["replaced"]} == {"a": 9, "b": 24}
    with torch.no_grad():
        assert float((model(X) - ref).abs().max()) < 1e-4


def test_counts_and_rule_on_test_model():
    model = _net()
    rep = separable_(model, Separable(multiplier=2), example=X)
    rows = {r["name"]: r for r in rep["layers"]}
    # a: 3 -> 16 3x3 at 10x10; b: 16 -> 24 5x5 stride 2 at 5x5
    assert rows["a"]["params_after"] == 3 * 2 * (9 + 16) + 16 and rows["a"]["macs_after"] == 100 * 3 * 2 * (9 + 16)
    assert rows["b"]["params_after"] == 16 * 2 * (25 + 24) and rows["b"]["macs_after"] == 25 * 16 * 2 * (25 + 24)
    assert rep["params_after"] == count_params(model)["params"]
    assert rep["macs_after"] == count_macs(model, (3, 10, 10))
    # with many filters per channel the first conv would grow: it is left alone
    model = _net()
    rep = separable_(model, Separable(multiplier=8), example=X)
    rows = {r["name"]: r for r in rep["layers"]}
    assert not rows["a"]["replaced"] and "would not reduce" in rows["a"]["reason"] and rows["b"]["replaced"]


def test_resnet_separable_then_distilled_finetune(trained, digits, tmp_path):
    teacher, _ = trained("resnet", width=0.5)
    model, _ = trained("resnet", width=0.5)
    rep = separable_(model, Separable(), example=digits.example(1))
    assert rep["replaced"] == 19  # every 3x3 conv, the stem included; the 1x1 shortcuts stay
    assert all(isinstance(model.get_submodule(r["name"]), SeparableConv2d) for r in rep["layers"] if r["replaced"])
    assert rep["macs_after"] == count_macs(model, digits.input_shape) < rep["macs_before"] / 3
    path = export_onnx(model, tmp_path / "sep.onnx", digits.example(2))
    p = parity(model, path, digits.x_test[:128])
    assert p["max_abs_diff"] < 1e-3 and p["top1_agreement"] == 1.0
    assert graph_stats(path)["macs"] == rep["macs_after"]
    # fine-tuning with distillation from the original recovers accuracy and approaches the teacher
    acc0 = evaluate(model, digits.x_val, digits.y_val)
    gap0 = teacher_gap(model, teacher, digits.x_val)
    fit(model, digits, TrainConfig(epochs=2, batch_size=64, lr=2e-3, max_batches=8), teacher=teacher)
    assert evaluate(model, digits.x_val, digits.y_val) > acc0
    assert teacher_gap(model, teacher, digits.x_val) < gap0


def test_lenet5_and_then_decompose_leaves_the_pairs_alone(trained, digits):
    model, _ = trained("lenet5")
    rep = separable_(model, Separable(skip=["conv1"]), example=digits.example(1))
    assert [r["name"] for r in rep["layers"]] == ["conv2"] and rep["replaced"] == 1
    assert model.conv2[0].kernel_size == (5, 5) and model.conv2[0].groups == 20
    rep = decompose_(model, LowRank(ratio=0.5), example=digits.example(1))
    names = [r["name"] for r in rep["layers"]]
    assert "conv2" not in names and not any(n.startswith("conv2.") for n in names)
    assert isinstance(model.conv2, SeparableConv2d) and not isinstance(model.conv2[1], LowRankConv2d)


def test_filter_fn_and_bad_configs():
    model = _net()
    rep = separable_(model, Separable(), example=X, filter_fn=lambda m, name: name != "a")
    assert [r["name"] for r in rep["layers"] if r["replaced"]] == ["b"]
    with pytest.raises(ConfigError, match=r"field 'multiplier': must be in 1..64"):
        Separable(multiplier=0)
    with pytest.raises(ConfigError, match=r"field 'skip': the model has no layer 'c'; its convolutions are: a, b"):
        separable_(_net(), Separable(skip=["c"]), example=X)


def test_apply_chain_and_reload(cli, trained, digits, tmp_path):
    _, weights = trained("lenet5")
    (tmp_path / "r.yaml").write_text(
        "steps:\n  - separable: {multiplier: 2, if_slower: keep}\n  - decompose: {conv: none, ratio: 0.2, skip: [fc2], if_slower: keep}\n"
        "  - distill: {epochs: 1, batch_size: 64, features: {conv2: conv2}}\n  - export: {}\n")
    out = tmp_path / "run"
    r = cli("apply", tmp_path / "r.yaml", "--model", "zoo:lenet5", "--weights", weights, "--out", out,
            "--batch", "1", "--max-seconds", "0.1", "--threads", "1", "--max-accuracy-drop", "1")
    assert r.code == 0, r
    res = json.loads((out / "result.json").read_text())
    assert [s["step"] for s in res["steps"]] == ["separable", "decompose", "distill", "export"]
    assert res["steps"][0]["replaced"] == 2 and res["steps"][1]["replaced"] == 1
    assert res["steps"][2]["adapters"] == {}  # same widths: no adapter needed
    assert res["result"]["params"] < res["baseline"]["params"] / 2
    again = load_model(weights=out / "model.safetensors")
    assert isinstance(again.conv1, SeparableConv2d) and again.conv1[0].out_channels == 2
    p = parity(again, out / "model.onnx", digits.x_test[:64])
    assert p["max_abs_diff"] < 1e-4 and p["top1_agreement"] == 1.0
    # separable after export cannot work: rejected before work
    (tmp_path / "bad.yaml").write_text("steps:\n  - export: {}\n  - separable: {}\n")
    bad = cli("apply", tmp_path / "bad.yaml", "--model", "zoo:lenet5", "--weights", weights, "--out", tmp_path / "b")
    assert bad.code == 2 and "step 2 'separable'" in bad.err and "Move 'separable' earlier" in bad.err
    assert not (tmp_path / "b").exists()


def test_search_space_draws_a_valid_config():
    spec = get_step("separable")
    assert spec.order == 10
    cfg = spec.space(optuna.trial.FixedTrial({"separable.on": True, "separable.multiplier": 2}))
    assert cfg == Separable(multiplier=2)
    assert spec.space(optuna.trial.FixedTrial({"separable.on": False})) is None


def test_structured_pruning_after_separable_with_a_channel_multiplier(trained, digits, tmp_path):
    """Torch-Pruning cannot score a grouped conv with a channel multiplier: that layer is left out, named."""
    import slimkit

    model, _ = trained("lenet5")
    res = slimkit.apply([{"separable": {"multiplier": 2, "if_slower": "keep"}}, {"prune_structured": {"ratio": 0.47, "if_slower": "keep"}}, "export"], model, digits, out=tmp_path / "sp", budget=None, target=slimkit.Target("ort-cpu", threads=1, max_seconds=0.05, layers=False))
    step = next(s for s in res.report["steps"] if s["step"] == "prune_structured")
    assert "cannot be pruned" in step["skipped"]["conv1.1"]
    assert step["pruned_layers"]  # the rest was pruned
    assert res.report["parity"]["top1_agreement"] >= 0.99
