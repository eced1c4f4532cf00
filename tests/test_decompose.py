"""Low-rank decomposition: SVD, Tucker-2 and CP on zoo models and on a model defined here."""

import copy
import json

import numpy as np
import optuna
import pytest
import torch
from torch import nn

from slimkit.errors import ConfigError
from slimkit.export import export_onnx, fold_batchnorm, parity
from slimkit.measure import count_macs, count_params, graph_stats
from slimkit.methods.decompose import CPConv2d, LowRank, LowRankConv2d, LowRankLinear, Tucker2Conv2d, decompose_
from slimkit.models import load_model, structure_of
from slimkit.pipeline import Recipe, get_step


class Net(nn.Module):
    """A 3x3 conv with bias, a strided 3x3 conv, a 1x1 conv, a depthwise conv, two linear layers."""

    def __init__(self):
        super().__init__()
        self.conv_a = nn.Conv2d(3, 24, 3, padding=1)
        self.conv_b = nn.Conv2d(24, 32, 3, stride=2, padding=1, bias=False)
        self.point = nn.Conv2d(32, 32, 1)
        self.depth = nn.Conv2d(32, 32, 3, padding=1, groups=32)
        self.fc = nn.Linear(32 * 6 * 6, 40)
        self.head = nn.Linear(40, 5)

    def forward(self, x):
        x = torch.relu(self.conv_a(x))
        x = torch.relu(self.point(torch.relu(self.conv_b(x))))
        x = torch.relu(self.depth(x)).flatten(1)  # (N, 32*6*6)
        return self.head(torch.relu(self.fc(x)))


X = torch.randn(8, 3, 12, 12, generator=torch.Generator().manual_seed(0))


def _net():
    torch.manual_seed(0)
    return Net().eval()


def _rel(a, b):
    return float((a - b).norm() / b.norm())


def test_full_rank_svd_and_tucker2_reconstruct_the_model_exactly():
    model, ref = _net(), None
    with torch.no_grad():
        ref = model(X)
    rep = decompose_(model, LowRank(conv="tucker2", ratio=1.0, only_if_smaller=False), example=X)
    kinds = {r["name"]: (r["kind"], r["replaced"]) for r in rep["layers"]}
    assert kinds == {"conv_a": ("tucker2", True), "conv_b": ("tucker2", True), "point": ("svd", True),
                     "depth": (None, False), "fc": ("svd", True), "head": ("svd", True)}
    assert isinstance(model.conv_a, Tucker2Conv2d) and isinstance(model.point, LowRankConv2d)
    assert isinstance(model.fc, LowRankLinear) and type(model.depth) is nn.Conv2d
    assert all(r["rel_error"] < 1e-6 for r in rep["layers"] if r["replaced"])
    assert next(r for r in rep["layers"] if r["name"] == "depth")["reason"] == "grouped convolution"
    with torch.no_grad():
        assert _rel(model(X), ref) < 1e-5
    # the strided conv keeps its stride in the core, the bias moves to the last 1x1
    assert model.conv_b[1].stride == (2, 2) and model.conv_a[2].bias is not None and model.conv_a[0].bias is None


def test_cp_gets_closer_with_rank_and_is_exact_enough_at_full_cp_rank():
    errors = {}
    for rank in (2, 8, 27):  # conv_a is a (24, 3, 9) tensor: its CP rank is at most 3 * 9 = 27
        model = _net()
        w = model.conv_a.weight.detach().clone()
        rep = decompose_(model, LowRank(conv="cp", ranks={"conv_a": rank}, only_if_smaller=False, skip=["conv_b"],
                                        linear="none"), example=X)
        row = rep["layers"][0]
        assert row["name"] == "conv_a" and row["rank"] == rank and isinstance(model.conv_a, CPConv2d)
        # the chain: 1x1 (3 -> R), depthwise 3x3 on R channels, 1x1 (R -> 24)
        first, depth, last = model.conv_a
        assert (first.weight.shape, depth.weight.shape, last.weight.shape) == (
            (rank, 3, 1, 1), (rank, 1, 3, 3), (24, rank, 1, 1)) and depth.groups == rank
        # rebuild the weight from the three layers independently: sum_r A[o,r] B[i,r] K[r,:,:]
        rebuilt = torch.einsum("or,ri,rk->oik", last.weight[:, :, 0, 0], first.weight[:, :, 0, 0],
                               depth.weight[:, 0].reshape(rank, 9)).reshape(w.shape)
        assert _rel(rebuilt.detach(), w) == pytest.approx(row["rel_error"], abs=1e-4)
        errors[rank] = row["rel_error"]
    assert errors[2] > errors[8] > errors[27] and errors[27] < 0.05


@pytest.mark.parametrize("energy", [0.6, 0.95])
def test_energy_picks_the_smallest_rank_that_keeps_it(energy):
    model = _net()
    weights = {n: m.weight.detach().numpy().reshape(m.weight.shape[0], -1).copy() for n, m in model.named_modules()
               if n in ("fc", "point")}
    rep = decompose_(model, LowRank(energy=energy, skip=["conv_a", "conv_b", "head"], only_if_smaller=False),
                     example=X)
    rows = {r["name"]: r for r in rep["layers"] if r["replaced"]}
    for name, w in weights.items():
        s = np.linalg.svd(w, compute_uv=False)
        kept = np.cumsum(s**2) / np.sum(s**2)
        expected = int(np.argmax(kept >= energy - 1e-9)) + 1
        assert rows[name]["rank"] == expected
        assert 1 - rows[name]["rel_error"] ** 2 >= energy - 1e-6


def test_only_layers_that_get_smaller_are_replaced():
    model = _net()
    # fc: 1152 -> 40, rank 39 costs 39 * 1192 > 1152 * 40; head rank 2 is smaller
    rep = decompose_(model, LowRank(ranks={"fc": 39, "head": 2}, conv="none"), example=X)
    rows = {r["name"]: r for r in rep["layers"]}
    assert not rows["fc"]["replaced"] and "would not reduce" in rows["fc"]["reason"]
    assert rows["head"]["replaced"] and rows["head"]["params_after"] == 2 * (40 + 5) + 5
    assert type(model.fc) is nn.Linear and isinstance(model.head, LowRankLinear)


def test_svd_on_trained_lenet300_counts_and_onnx_parity(trained, digits, tmp_path):
    model, _ = trained("lenet300")
    before = copy.deepcopy(model)
    rep = decompose_(model, LowRank(ratio=0.25, skip=["fc3"]), example=digits.example(1))
    assert [r["name"] for r in rep["layers"]] == ["fc1", "fc2"] and rep["replaced"] == 2
    # fc1: 64 -> 300 at rank 16; fc2: 300 -> 100 at rank 25 (the full ranks are 64 and 100)
    assert [r["rank"] for r in rep["layers"]] == [16, 25]
    expected = 16 * (64 + 300) + 300 + 25 * (300 + 100) + 100 + 100 * 10 + 10
    assert rep["params_after"] == count_params(model)["params"] == expected
    assert rep["macs_after"] == count_macs(model, digits.input_shape) == expected - 300 - 100 - 10
    assert rep["params_before"] == count_params(before)["params"]
    path = export_onnx(model, tmp_path / "svd.onnx", digits.example(2))
    p = parity(model, path, digits.x_test)
    assert p["max_abs_diff"] < 1e-4 and p["top1_agreement"] == 1.0
    stats = graph_stats(path)
    assert stats["params"] == rep["params_after"] and stats["macs"] == rep["macs_after"]
    # a rank-25% model still classifies most test examples like the original
    with torch.no_grad():
        agree = (model(digits.x_test).argmax(1) == before(digits.x_test).argmax(1)).float().mean()
    assert agree > 0.8


@pytest.mark.parametrize("conv", ["tucker2", "cp"])
def test_convolutions_of_trained_resnet(trained, digits, tmp_path, conv):
    model, _ = trained("resnet", width=0.5)
    x = digits.example(2)
    rep = decompose_(model, LowRank(conv=conv, ratio=0.5, linear="none"), example=digits.example(1))
    replaced = [r for r in rep["layers"] if r["replaced"]]
    assert len(replaced) >= 17  # the 18 block convolutions at least
    assert rep["macs_after"] == count_macs(model, digits.input_shape) < rep["macs_before"] / 1.5
    assert rep["params_after"] == count_params(model)["params"] < rep["params_before"]
    # per-layer figures add up to the model's change
    saved = sum(r["macs_before"] - r["macs_after"] for r in replaced)
    assert rep["macs_before"] - rep["macs_after"] == saved
    assert all(r["params_after"] < r["params_before"] and r["macs_after"] < r["macs_before"] for r in replaced)
    assert all(0 < r["rel_error"] < 1 for r in replaced)
    path = export_onnx(model, tmp_path / f"{conv}.onnx", x)
    p = parity(model, path, digits.x_test[:128])
    assert p["max_abs_diff"] < 1e-3 and p["top1_agreement"] == 1.0
    assert graph_stats(path)["macs"] == rep["macs_after"]
    assert graph_stats(path)["params"] == count_params(fold_batchnorm(model, x))["params"]
    ops = [op for op in structure_of(model) if op["op"] == "lowrank"]
    assert len(ops) == len(replaced) and {op["kind"] for op in ops} <= {conv, "svd"}


def test_cp_energy_search_reaches_the_energy(trained, digits):
    model, _ = trained("resnet", width=0.5)
    rep = decompose_(model, LowRank(conv="cp", energy=0.7, linear="none", skip=["conv1", "layer1", "layer2"]),
                     example=digits.example(1))
    rows = [r for r in rep["layers"] if r["kind"] == "cp"]
    assert rows
    for r in rows:
        if r["replaced"]:
            assert 1 - r["rel_error"] ** 2 >= 0.7 - 1e-6
        else:
            assert "energy" in r["reason"] or "would not reduce" in r["reason"]


@pytest.mark.parametrize("kwargs,message", [
    ({"energy": 0}, r"field 'energy': must be in \(0, 1\]"),
    ({"energy": 1.5}, r"field 'energy': must be in \(0, 1\].*got 1.5"),
    ({"ratio": 0}, r"field 'ratio': must be in \(0, 1\]"),
    ({"conv": "svd"}, r"field 'conv': got 'svd'; choose one of tucker2, cp, none"),
    ({"ranks": {"fc": 0}}, r"field 'ranks': ranks\['fc'\] = 0"),
])
def test_bad_configs_are_rejected(kwargs, message):
    with pytest.raises(ConfigError, match=message):
        LowRank(**kwargs)


@pytest.mark.parametrize("cfg,message", [
    (LowRank(ranks={"fc": 41}), r"ranks\['fc'\] = 41 is larger than the matrix: the \(40, 1152\) weight has rank at most 40"),
    (LowRank(ranks={"conv_b": [33, 8]}), r"ranks\['conv_b'\].*Tucker-2 ranks .* at most \[32, 24\]"),
    (LowRank(ranks={"fc2": 4}), r"the model has no layer 'fc2'; its decomposable layers are: conv_a, conv_b"),
    (LowRank(skip=["convx"]), r"field 'skip': the model has no layer 'convx'"),
    (LowRank(ranks={"depth": 4}), r"ranks\['depth'\]: this layer cannot be decomposed \(grouped convolution\)"),
    (LowRank(ranks={"fc": [4, 4]}), r"ranks\['fc'\] = \[4, 4\]: SVD takes one integer rank"),
])
def test_bad_ranks_and_names_are_rejected_before_any_layer_changes(cfg, message):
    model = _net()
    state = copy.deepcopy(model.state_dict())
    with pytest.raises(ConfigError, match=message):
        decompose_(model, LowRank(**{**cfg.__dict__, "ranks": {"head": 2, **cfg.ranks}}), example=X)
    assert type(model.head) is nn.Linear and all(torch.equal(v, state[k]) for k, v in model.state_dict().items())


def test_recipe_order_is_checked_before_work():
    with pytest.raises(ConfigError, match=r"step 2 'decompose'.*cannot come after step 1 'export'.*Move 'decompose' earlier"):
        Recipe.from_data(["export", {"decompose": {"ratio": 0.5}}])
    recipe = Recipe.from_data([{"decompose": {}}, {"finetune": {"epochs": 1}}, "export"])
    for flag, words in (("quantized", "quantized"), ("fake_quant", "fake-quantization"), ("masked", "pruning masks")):
        with pytest.raises(ConfigError, match=rf"step 1 'decompose'.*{words}"):
            recipe.validate(initial={flag})


def test_apply_decompose_then_reload_from_safetensors(cli, trained, digits, tmp_path):
    _, weights = trained("resnet", width=0.5)
    (tmp_path / "r.yaml").write_text(
        "steps:\n  - decompose: {conv: cp, ratio: 0.5, skip: [fc], if_slower: keep}\n  - finetune: {epochs: 1, batch_size: 64, max_batches: 4}\n"
        "  - export: {}\n")
    out = tmp_path / "run"
    r = cli("apply", tmp_path / "r.yaml", "--model", "zoo:resnet,width=0.5", "--weights", weights, "--data", "digits",
            "--out", out, "--batch", "1", "--max-seconds", "0.1", "--threads", "1", "--max-accuracy-drop", "1")
    assert r.code == 0, r
    res = json.loads((out / "result.json").read_text())
    step = res["steps"][0]
    assert step["step"] == "decompose" and step["replaced"] >= 17
    assert res["result"]["macs"] == step["macs_after"] < res["baseline"]["macs"]
    again = load_model(weights=out / "model.safetensors")
    assert isinstance(again.layer1[0].conv1, CPConv2d)
    p = parity(again, out / "model.onnx", digits.x_test[:64])
    assert p["max_abs_diff"] < 1e-4 and p["top1_agreement"] == 1.0


def test_decompose_command(cli, trained, tmp_path):
    _, weights = trained("lenet300")
    out = tmp_path / "d"
    r = cli("decompose", "--model", "zoo:lenet300", "--weights", weights, "--ratio", "0.25", "--skip", "fc3",
            "--rank", "fc2=10", "--finetune-epochs", "1", "--out", out, "--batch", "1", "--max-seconds", "0.1",
            "--if-slower", "keep")
    assert r.code == 0, r
    res = json.loads((out / "result.json").read_text())
    assert [s["step"] for s in res["steps"]] == ["decompose", "finetune", "export"]
    assert [row["rank"] for row in res["steps"][0]["layers"]] == [16, 10]
    assert "decomposed layers" in r.out and "fc1" in r.out
    bad = cli("decompose", "--model", "zoo:lenet300", "--weights", weights, "--rank", "fc1=65", "--out", tmp_path / "e")
    assert bad.code == 2 and "larger than the matrix" in bad.err and "Traceback" not in bad.err
    bad = cli("decompose", "--model", "zoo:lenet300", "--rank", "fc1", "--out", tmp_path / "e")
    assert bad.code == 2 and "LAYER=RANK" in bad.err


def test_search_space_draws_a_valid_config():
    spec = get_step("decompose")
    assert spec.order == 20
    cfg = spec.space(optuna.trial.FixedTrial({"decompose.on": True, "decompose.conv": "cp", "decompose.energy": 0.8}))
    assert cfg == LowRank(conv="cp", energy=0.8)
    assert spec.space(optuna.trial.FixedTrial({"decompose.on": False})) is None
