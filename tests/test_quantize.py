"""INT8 quantization against real ONNX Runtime sessions and real eager int8 kernels, on digits.

Accuracy tolerance: an INT8 model may lose at most 3 points of test accuracy against its float
model on digits (359 test images, so one image is 0.28 points), and must agree on the top-1
class of at least 95% of them.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

import slimkit
from slimkit.data import DataBundle
from slimkit.errors import ConfigError, SlimkitError
from slimkit.export import export_onnx
from slimkit.measure import Target
from slimkit.methods.quantize import (
    QAT,
    DynamicInt8,
    FakeQuant,
    Int8DynamicLinear,
    StaticInt8,
    fold_batchnorm_,
    int8_ops,
    quantize_,
    quantize_onnx,
)
from slimkit.models import create_model, load_model
from slimkit.pipeline import Recipe

TOL_POINTS = 3.0
MIN_AGREEMENT = 0.95


def _step(res, name):
    return next(s for s in res.report["steps"] if s["step"].startswith(name))


def _check_verdict(step, batch_sizes=("1", "64")):
    lat = step["latency_ms"]
    assert set(lat["float"]) == set(lat["int8"]) == set(batch_sizes)
    assert all(v > 0 for per in lat.values() for v in per.values())
    speed = {b: lat["float"][b] / lat["int8"][b] for b in batch_sizes}
    assert step["faster_at"] == {b: s > 1 for b, s in speed.items()}
    assert step["faster"] is all(s > 1 for s in speed.values())


def test_static_int8_runs_integer_kernels_and_keeps_accuracy(trained, digits):
    model, _ = trained("lenet5")
    res = slimkit.apply([{"quantize_static": {"calibration_size": 128}}], model, digits, budget=None, target=slimkit.Target(max_seconds=0.1, layers=False))
    step = _step(res, "quantize_static")
    # the optimised graph ONNX Runtime runs holds integer kernels for every conv and linear layer
    assert step["int8_ops"]["QLinearConv"] == 2 and step["int8_ops"]["QGemm"] == 2
    assert step["float_ops"] == {}
    assert int8_ops(res.onnx_path) == step["int8_ops"]
    acc = step["accuracy"]
    assert acc["float"] - acc["int8"] <= TOL_POINTS / 100
    assert step["agreement"]["top1_agreement"] >= MIN_AGREEMENT
    assert res.report["result"]["accuracy"] == pytest.approx(acc["int8"])
    assert step["onnx_bytes"]["int8"] < 0.4 * step["onnx_bytes"]["float"]  # int8 weights on disk
    assert step["applied"] is True and step["calibration_size"] == 128
    _check_verdict(step)


def test_static_keep_float_and_other_calibrations(trained, digits, tmp_path):
    model, _ = trained("lenet5")
    src = export_onnx(model, tmp_path / "f.onnx", digits.example(2))
    cfg = StaticInt8(calibration_size=64, method="percentile", per_channel=False, keep_float=["fc2"])
    r = quantize_onnx(src, tmp_path / "q.onnx", cfg, data=digits, model=model, target=Target(threads=1, max_seconds=0.05))
    assert r["int8_ops"]["QLinearConv"] == 2 and r["int8_ops"]["QGemm"] == 1  # fc2 left in float
    assert sum(r["float_ops"].values()) == 1 and list(r["kept_float"]) == ["fc2"]
    assert r["accuracy"]["float"] - r["accuracy"]["int8"] <= TOL_POINTS / 100
    r2 = quantize_onnx(src, tmp_path / "e.onnx", StaticInt8(calibration_size=64, method="entropy"), data=digits,
                       target=Target(threads=1, max_seconds=0.05))
    assert r2["int8_op_count"] >= 4 and r2["agreement"]["top1_agreement"] >= MIN_AGREEMENT
    assert src.stat().st_size == r["onnx_bytes"]["float"]  # the source is left as it was


def test_dynamic_int8_on_ort(trained, digits):
    model, _ = trained("lenet300")
    res = slimkit.apply(["export", "quantize_dynamic"], model, digits, budget=None, target=slimkit.Target(max_seconds=0.1, layers=False))
    step = _step(res, "quantize_dynamic")
    assert step["int8_ops"] == {"DynamicQuantizeMatMul": 3}
    assert step["accuracy"]["float"] - step["accuracy"]["int8"] <= TOL_POINTS / 100
    _check_verdict(step)


def test_slower_int8_is_reported_and_can_be_reverted(trained, digits):
    """ConvInteger (dynamic INT8 of convolutions) is far slower than float convs on CPU."""
    model, _ = trained("lenet5")
    kept = slimkit.apply([{"quantize_dynamic": {"ops": "all"}}], model, digits, budget=None, target=slimkit.Target(batch_sizes=(64,), max_seconds=0.3, layers=False))
    step = _step(kept, "quantize_dynamic")
    assert step["int8_ops"]["ConvInteger"] == 2
    assert step["faster"] is False and step["faster_at"] == {"64": False}
    assert step["latency_ms"]["int8"]["64"] > step["latency_ms"]["float"]["64"]  # both latencies reported
    assert int8_ops(kept.onnx_path)["ConvInteger"] == 2  # if_slower: keep (default) keeps the INT8 artifact
    reverted = slimkit.apply([{"quantize_dynamic": {"ops": "all", "if_slower": "revert"}}], model, digits, budget=None, target=slimkit.Target(batch_sizes=(64,), max_seconds=0.3, layers=False))
    step = _step(reverted, "quantize_dynamic")
    assert step["faster"] is False and step["applied"] is False
    assert int8_ops(reverted.onnx_path) == {}  # the float artifact is the result


def test_dynamic_int8_on_torch_saves_reloads_and_profiles(trained, digits, tmp_path):
    model, _ = trained("lenet300")
    res = slimkit.apply(["quantize_dynamic_torch"], model, digits, out=tmp_path / "out", target=slimkit.Target("torch-cpu", max_seconds=0.1, layers=False))
    step = _step(res, "quantize_dynamic_torch")
    assert step["layers"] == ["fc1", "fc2", "fc3"] and isinstance(res.model.fc1, Int8DynamicLinear)
    assert res.model.fc1.weight_int8.dtype == torch.int8
    assert step["accuracy"]["float"] - step["accuracy"]["int8"] <= TOL_POINTS / 100
    _check_verdict(step)
    base, result = res.report["baseline"], res.report["result"]
    assert result["params"] == base["params"] and result["macs"] == base["macs"]  # counted like the float model
    assert result["artifact_bytes"] < 0.35 * base["artifact_bytes"]  # int8 weights
    again = load_model(weights=tmp_path / "out" / "model.safetensors")
    assert isinstance(again.fc2, Int8DynamicLinear)
    x = digits.x_test[:64]
    with torch.no_grad():
        assert torch.equal(again(x), res.model(x))
    assert (tmp_path / "out" / "model.onnx").is_file()  # the dequantized weights, in float, still export


def test_qat_exports_to_integer_kernels_and_reloads(trained, digits, tmp_path):
    model, _ = trained("lenet5")
    res = slimkit.apply([{"qat": {"epochs": 1, "calibration_size": 128}}], model, digits, out=tmp_path / "qat", budget=None, target=slimkit.Target(max_seconds=0.1, layers=False))
    qat = _step(res, "qat")
    assert qat["layers"] == ["conv1", "conv2", "fc1", "fc2"]
    assert sum(isinstance(m, FakeQuant) for m in res.model.modules()) == 8
    export = _step(res, "export")
    assert export["int8_ops"]["QLinearConv"] == 2 and export["int8_ops"]["QGemm"] == 2
    assert export["qat_ranges"] >= 4  # the learned ranges reached ONNX Runtime's quantizer
    assert res.report["parity"]["top1_agreement"] >= MIN_AGREEMENT  # torch fake-quant vs ORT int8
    assert res.report["result"]["accuracy"] >= slimkit.profile(model, digits, target=slimkit.Target(batch_sizes=(1,), max_seconds=0.05, layers=False))["accuracy"] - TOL_POINTS / 100
    _check_verdict(export)
    again = load_model(weights=tmp_path / "qat" / "model.safetensors")
    x = digits.x_test[:64]
    with torch.no_grad():
        assert torch.equal(again.eval()(x), res.model.eval()(x))


def test_qat_folds_batchnorm_on_resnet(trained, digits):
    model, _ = trained("resnet", width=0.5)
    n_bn = sum(isinstance(m, nn.BatchNorm2d) for m in model.modules())
    x = digits.x_test[:32]
    with torch.no_grad():
        ref = model.eval()(x)
    pairs = fold_batchnorm_(model, digits.example(2))
    assert len(pairs) == n_bn and not any(isinstance(m, nn.BatchNorm2d) for m in model.modules())
    with torch.no_grad():
        assert torch.allclose(model(x), ref, atol=1e-4)
    model2, _ = trained("resnet", width=0.5)
    res = slimkit.apply([{"qat": {"epochs": 0, "calibration_size": 128}}], model2, digits, budget=None, target=slimkit.Target(batch_sizes=(8,), max_seconds=0.05, layers=False))
    export = _step(res, "export")
    n_conv = sum(isinstance(m, nn.Conv2d) for m in model2.modules())
    assert export["int8_ops"]["QLinearConv"] == n_conv and export["int8_ops"].get("QLinearAdd", 0) >= 1
    assert res.report["parity"]["top1_agreement"] >= MIN_AGREEMENT


def test_quantize_verb_and_configs():
    model = create_model("lenet300", input_shape=(1, 8, 8), num_classes=10)
    with pytest.raises(ConfigError, match="field 'ops'.*linear layers only"):
        quantize_(model, DynamicInt8(ops="all"))
    with pytest.raises(SlimkitError, match="quantize_onnx"):
        quantize_(model, StaticInt8())
    with pytest.raises(SlimkitError, match="pass data="):
        quantize_(model, QAT())


@pytest.mark.parametrize("recipe,message", [
    ([{"quantize_static": {"calibration_size": 0}}],
     r"step 1 'quantize_static', field 'calibration_size'.*at least 1 example"),
    ([{"quantize_static": {"method": "kl"}}], r"field 'method': got 'kl'; choose one of minmax, entropy, percentile"),
    ([{"qat": {"activation_type": "int4"}}], r"field 'activation_type'"),
    ([{"quantize_static": {}}, {"finetune": {}}], r"step 2 'finetune'.*cannot come after step 1 'quantize_static'"),
    ([{"qat": {}}, {"quantize_static": {}}], r"step 2 'quantize_static'.*fake-quantization"),
    (["quantize_static", "quantize_dynamic"], r"step 2 'quantize_dynamic'.*cannot come after"),
])
def test_bad_quantization_recipes_fail_before_work(recipe, message):
    with pytest.raises(ConfigError, match=message):
        Recipe.from_data(recipe)


def test_target_and_unknown_layer_rejected_before_work(trained, digits, tmp_path):
    model, _ = trained("lenet300")
    with pytest.raises(ConfigError, match="runs only for target.*ort-cpu"):
        slimkit.apply(["quantize_static"], model, digits, target=slimkit.Target("torch-cpu"))
    with pytest.raises(ConfigError, match=r"step 1 'quantize_static', field 'keep_float'.*no layer named 'fc9'.*fc1"):
        slimkit.apply([{"quantize_static": {"keep_float": ["fc9"]}}], model, digits, out=tmp_path / "o")
    assert not (tmp_path / "o").exists() or not any((tmp_path / "o").iterdir())  # nothing measured, nothing written


def test_empty_calibration_set_is_rejected(trained, digits, tmp_path):
    model, _ = trained("lenet300")
    src = export_onnx(model, tmp_path / "f.onnx", digits.example(2))
    empty = DataBundle("empty-train", digits.x_train[:0], digits.y_train[:0], digits.x_val, digits.y_val,
                       digits.x_test, digits.y_test, 10)
    with pytest.raises(SlimkitError, match="calibration set of empty-train is empty"):
        quantize_onnx(src, tmp_path / "q.onnx", StaticInt8(), data=empty)
    assert not (tmp_path / "q.onnx").exists()


def test_int8_dynamic_linear_matches_float_closely():
    torch.manual_seed(0)
    lin = nn.Linear(40, 16)
    q = Int8DynamicLinear.from_float(lin)
    x = torch.randn(8, 40)
    with torch.no_grad():
        ref, got = lin(x), q(x)
        dequant = torch.nn.functional.linear(x, q.dequantized_weight(), q.bias)
    assert (got - ref).abs().max() < 0.05 * ref.abs().max()
    assert (dequant - ref).abs().max() < 0.02 * ref.abs().max()
    assert not torch.equal(got, dequant)  # the int8 kernel ran (its activations are quantized too)


def test_static_int8_of_a_sparse_stored_artifact(trained, digits):
    """After store_sparse (ONNX sparse initializers) the weights are made dense for the quantizer."""
    model, _ = trained("lenet5")
    res = slimkit.apply([{"prune_unstructured": {"sparsity": 0.8}}, "export", "store_sparse",
                         {"quantize_static": {"calibration_size": 64}}], model, digits, budget=None, target=slimkit.Target(batch_sizes=(1,), max_seconds=0.05, layers=False))
    step = _step(res, "quantize_static")
    assert step["densified_sparse_weights"] >= 3 and step["int8_ops"]["QLinearConv"] == 2
    assert step["agreement"]["top1_agreement"] >= MIN_AGREEMENT
