"""The automatic float fallback of the ONNX Runtime INT8 steps, on a model built so that INT8 of
one layer wrecks it, run through real ONNX Runtime quantization and sessions.

The model: an MLP trained briefly on digits, then its classifier ``fc3`` gets one weight of 1000
per row on an input that never fires (``fc2``'s unit 0 is dead: zero weights, bias -1). The float
outputs do not change, but an int8 scale stretched to 1000 rounds every other weight of ``fc3``
to zero, so the INT8 model predicts one class for almost every image.
"""

from __future__ import annotations

import copy
import pytest
import torch
from torch import nn

import slimkit
from slimkit.errors import ConfigError, SlimkitError
from slimkit.export import ort_session, parity
from slimkit.methods.quantize import DynamicInt8, StaticInt8
from slimkit.methods.quantize._ort import FLOAT_KERNELS, INT8_KERNELS, _optimized_graph

TARGET = slimkit.Target(batch_sizes=(1,), max_seconds=0.05, layers=False)


class OutlierMLP(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.fc2, self.fc3 = nn.Linear(64, 32), nn.Linear(32, 32), nn.Linear(32, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc3(torch.relu(self.fc2(torch.relu(self.fc1(x.flatten(1))))))  # (N, 64) -> (N, 10)


@pytest.fixture(scope="module")
def outlier_mlp(digits) -> OutlierMLP:
    torch.manual_seed(0)
    model = OutlierMLP()
    opt = torch.optim.Adam(model.parameters(), lr=2e-2)
    for _ in range(60):  # full-batch training, a second or so
        opt.zero_grad()
        nn.functional.cross_entropy(model(digits.x_train), digits.y_train).backward()
        opt.step()
    with torch.no_grad():
        model.fc2.weight[0] = 0.0
        model.fc2.bias[0] = -1.0  # fc2's unit 0 never fires ...
        model.fc3.weight[:, 0] = 1000.0  # ... so this outlier column changes nothing in float
    return model.eval()


def _step(res, name):
    return next(s for s in res.report["steps"] if s["step"].startswith(name))


def _fc3_runs_in_float(path) -> bool:
    """In the graph ONNX Runtime runs, fc3 is one float kernel reading a float32 weight (no integer kernel)."""
    from onnx import TensorProto

    graph = _optimized_graph(path).graph
    weights = {i.name: i.data_type for i in graph.initializer if i.name.startswith("fc3.weight")}
    fc3 = [n for n in graph.node if any(i in weights for i in n.input)]
    return (len(fc3) == 1 and fc3[0].op_type in FLOAT_KERNELS
            and all(weights[i] == TensorProto.FLOAT for i in fc3[0].input if i in weights))


def test_without_fallback_the_int8_step_refuses(outlier_mlp, digits):
    recipe = [{"quantize_static": {"calibration_size": 64, "fallback": "off"}}]
    with pytest.raises(SlimkitError, match=r"agrees with the float model on only .*min_agreement 90%.*fallback: auto"):
        slimkit.apply(recipe, outlier_mlp, digits, budget=None, target=TARGET)


@pytest.mark.parametrize("step, config", [("quantize_static", {"calibration_size": 64}), ("quantize_dynamic", {})])
def test_fallback_keeps_the_wrecking_layer_in_float(outlier_mlp, digits, step, config):
    res = slimkit.apply(["export", {step: config}], outlier_mlp, digits, budget=None, target=TARGET)
    report = _step(res, step)
    fallback = report["fallback"]
    assert fallback["sensitivity"][0]["layer"] == "fc3"  # ranked most sensitive
    assert fallback["kept_float"] == ["fc3"] and fallback["keep_float"] == ["fc3"] and fallback["reached"]
    first, last = fallback["attempts"][0], fallback["attempts"][-1]
    assert first["float_layers"] == [] and first["agreement"] < 0.5  # all INT8: wrecked
    assert last["float_layers"] == ["fc3"] and last["agreement"] >= 0.9
    assert list(report["kept_float"]) == ["fc3"]
    # the artifact: fc3 runs a float Gemm, fc1 and fc2 integer kernels
    assert _fc3_runs_in_float(res.onnx_path)
    assert sum(n for op, n in report["int8_ops"].items() if op in INT8_KERNELS) == 2
    # the bar, re-measured with a real ONNX Runtime session on every test image
    again = parity(outlier_mlp, res.onnx_path, digits.x_test)
    assert again["top1_agreement"] >= 0.9 and again["samples"] == len(digits.x_test)
    assert ort_session(res.onnx_path).get_inputs()[0].shape[1:] == [1, 8, 8]
    assert set(report["latency_ms"]["int8"]) == {"1"} and isinstance(report["faster"], bool)  # verdict intact


def test_user_keep_float_needs_no_fallback(outlier_mlp, digits):
    res = slimkit.apply([{"quantize_static": {"calibration_size": 64, "keep_float": ["fc3"]}}], outlier_mlp, digits,
                        budget=None, target=TARGET)
    report = _step(res, "quantize_static")
    assert "fallback" not in report and list(report["kept_float"]) == ["fc3"]
    assert report["agreement"]["top1_agreement"] >= 0.9 and _fc3_runs_in_float(res.onnx_path)


def test_fallback_that_cannot_reach_the_bar_names_what_it_tried(outlier_mlp, digits):
    model = copy.deepcopy(outlier_mlp)
    with torch.no_grad():  # a second wrecking layer: fc1's unit 0 dead, an outlier column in fc2
        model.fc1.weight[0] = 0.0
        model.fc1.bias[0] = -1.0
        model.fc2.weight[1:, 0] = 1000.0
    recipe = [{"quantize_static": {"calibration_size": 64, "max_float_layers": 1}}]
    with pytest.raises(SlimkitError, match=r"even with the most INT8-sensitive layers kept in float \(fallback: auto, "
                                           r"at most max_float_layers 1\).*\[\] -> .*%; \[fc[23]\] -> .*%"):
        slimkit.apply(recipe, model, digits, budget=None, target=TARGET)


def test_fallback_fields_are_checked():
    with pytest.raises(ConfigError, match=r"field 'fallback': got 'on'; choose one of auto, off"):
        StaticInt8(fallback="on")
    with pytest.raises(ConfigError, match=r"field 'max_float_layers'.*at least 1"):
        DynamicInt8(max_float_layers=0)
