import pytest
import torch
from torch import nn

from slimkit.errors import SlimkitError
from slimkit.export import export_onnx
from slimkit.measure import Target, accuracy, artifact_bytes, count_macs, count_params, graph_stats, layer_macs, profile


def test_params_and_nonzero():
    m = nn.Sequential(nn.Linear(10, 5), nn.ReLU(), nn.Linear(5, 2))
    with torch.no_grad():
        m[0].weight[:2] = 0
    c = count_params(m)
    assert c == {"params": 10 * 5 + 5 + 5 * 2 + 2, "nonzero_params": 10 * 5 + 5 + 5 * 2 + 2 - 20}


def test_macs_are_exact_for_conv_and_linear():
    m = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 8, 3, padding=1, groups=4), nn.Flatten(), nn.Linear(8 * 6 * 6, 4))
    expected = 8 * 36 * 3 * 9 + 8 * 36 * 2 * 9 + 288 * 4
    assert count_macs(m, (3, 6, 6)) == expected
    per = layer_macs(m, (3, 6, 6))
    assert per["0"] == 8 * 36 * 27 and per["3"] == 288 * 4


def test_onnx_graph_counts_match_torch(tmp_path, digits):
    m = nn.Sequential(nn.Conv2d(1, 6, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(6 * 64, 10)).eval()
    path = export_onnx(m, tmp_path / "m.onnx", digits.example(2))
    s = graph_stats(path)
    assert s["params"] == count_params(m)["params"]
    assert s["macs"] == count_macs(m, (1, 8, 8))
    assert s["layers"]["0"]["params"] == 6 * 9 + 6 and s["layers"]["3"]["macs"] == 384 * 10
    assert artifact_bytes(path) == path.stat().st_size > 4 * s["params"]


@pytest.mark.parametrize("name,kw", [("lenet5", {}), ("resnet", {"width": 0.5}), ("mobilenetv2", {"width": 0.5})])
def test_profile_agrees_between_targets(trained, digits, name, kw):
    """torch-cpu and ort-cpu report the same params, MACs and accuracy for the same model."""
    model, _ = trained(name, **kw)
    t = profile(model, digits, Target("torch-cpu", batch_sizes=(1, 16), max_seconds=0.2))
    o = profile(model, digits, Target("ort-cpu", batch_sizes=(1, 16), max_seconds=0.2))
    for key in ("params", "nonzero_params", "macs"):
        assert t[key] == o[key], key
    assert t["accuracy"] == pytest.approx(o["accuracy"], abs=1 / len(digits.x_test) + 1e-9)
    assert t["accuracy"] > 0.5  # a trained model, not chance
    for p in (t, o):
        assert set(p["latency_ms"]) == {"1", "16"}
        for stats in p["latency_ms"].values():
            assert 0 < stats["median"] <= stats["p90"] and stats["runs"] >= 3 and stats["spread"] >= 0
        shares = sum(row["time_share"] for row in p["layers"])
        assert 0.9 < shares < 1.005  # shares are rounded to 4 decimals each
        assert p["artifact_bytes"] > 0
    # the per-layer names are the torch module names on both targets
    conv_t = {r["name"] for r in t["layers"] if r["macs"]}
    conv_o = {r["name"] for r in o["layers"] if r["macs"]}
    assert conv_t == conv_o
    assert sum(r["macs"] for r in o["layers"]) == o["macs"]


def test_profile_of_onnx_file_alone(trained, digits, tmp_path):
    model, _ = trained("lenet5")
    path = export_onnx(model, tmp_path / "m.onnx", digits.example(2))
    p = profile(None, digits, Target("ort-cpu", batch_sizes=(4,), max_seconds=0.1), onnx_path=path)
    assert p["artifact_bytes"] == path.stat().st_size and p["params"] == count_params(model)["params"]


def test_profile_bad_arguments(digits):
    m = nn.Sequential(nn.Flatten(), nn.Linear(64, 10))
    with pytest.raises(SlimkitError, match="unknown target 'gpu'.*ort-cpu"):
        profile(m, digits, "gpu")
    with pytest.raises(SlimkitError, match="batch sizes must be at least 1"):
        profile(m, digits, Target(batch_sizes=(0,)))
    with pytest.raises(SlimkitError, match="threads must be at least 1"):
        profile(m, digits, Target(threads=-1))


def test_accuracy_of_a_perfect_and_a_constant_model(digits):
    class Oracle(nn.Module):
        def forward(self, x):
            return torch.nn.functional.one_hot(self.labels[: len(x)], 10).float()

    o = Oracle()
    o.labels = digits.y_test
    assert accuracy(o, digits.x_test, digits.y_test) == 1.0
    const = nn.Sequential(nn.Flatten(), nn.Linear(64, 10))
    with torch.no_grad():
        const[1].weight.zero_()
        const[1].bias.copy_(torch.arange(10.0))
    assert accuracy(const, digits.x_test, digits.y_test) == pytest.approx(float((digits.y_test == 9).float().mean()))
