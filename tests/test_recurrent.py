"""Recurrent nets and attention: zoo:lstm, MACs of LSTM / GRU / MultiheadAttention counted by hand,
export with ONNX Runtime parity, dynamic INT8 of the LSTM itself, profile and a 2-trial compress."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper
from torch import nn

from slimkit.errors import SlimkitError
from slimkit.export import ort_predict, ort_session, parity
from slimkit.measure import Target, attention_macs, count_macs, graph_stats, layer_macs, profile, rnn_macs
from slimkit.methods.quantize import DynamicInt8, quantize_onnx
from slimkit.models import ModelRef, create_model, load_model, save_model, set_origin
from slimkit.search import compress
from slimkit.training import TrainConfig, fit

from ._services import FAST, compress_options

LSTM_DIGITS_MACS = 4 * (8 * 64 + 64 * 64) * 8 + 64 * 10  # 4 gates x (input + hidden) x 8 steps, + the classifier


class _Seq(nn.Module):
    """A recurrent layer over (N, T, F), its last step's output classified."""

    def __init__(self, rnn: nn.RNNBase, classes: int = 10):
        super().__init__()
        self.rnn = rnn
        width = rnn.hidden_size * (2 if rnn.bidirectional else 1)
        self.fc = nn.Linear(width, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (N, T, F)
        if not self.rnn.batch_first:
            return self.fc(self.rnn(x.transpose(0, 1))[0][-1])  # the layer reads (T, N, F)
        return self.fc(self.rnn(x)[0][:, -1])


class _Attend(nn.Module):
    def __init__(self, attn: nn.MultiheadAttention):
        super().__init__()
        self.attn = attn

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.attn(x, x, x)[0]


@pytest.fixture(scope="module")
def lstm(digits, tmp_path_factory):
    """zoo:lstm (hidden 64) trained briefly on digits read row by row, and its weights file."""
    torch.manual_seed(0)
    model = create_model("lstm", input_shape=digits.input_shape, num_classes=digits.num_classes)
    set_origin(model, "zoo:lstm", digits.input_shape, digits.num_classes)
    fit(model, digits, TrainConfig(epochs=4, batch_size=32, lr=1e-2))
    path = save_model(model, tmp_path_factory.mktemp("lstm") / "lstm.safetensors")
    return model.eval(), path


@pytest.fixture(scope="module")
def search(lstm, tmp_path_factory):
    """A real 2-trial compress of the trained zoo:lstm on digits (fine-tune and dynamic INT8)."""
    out = tmp_path_factory.mktemp("lstm-search") / "search"
    compress(ModelRef("zoo:lstm", weights=lstm[1]), "digits",
             **compress_options(out=out, trials=2, methods=["finetune", "quantize_dynamic"], **FAST))
    return out


@pytest.fixture(scope="module")
def exported(search):
    """The trained zoo:lstm exported to ONNX (dynamic batch axis): the search's baseline.onnx, which
    is ``export_onnx(model, ...)`` of it (reused: an LSTM export takes seconds)."""
    return search / "baseline.onnx"


# ----------------------------------------------------------------------------- MACs


@pytest.mark.parametrize("rnn,steps,hand", [
    (nn.LSTM(8, 64, batch_first=True), 8, 4 * (8 * 64 + 64 * 64) * 8),
    (nn.GRU(28, 32, batch_first=True), 28, 3 * (28 * 32 + 32 * 32) * 28),
    (nn.RNN(8, 16), 8, (8 * 16 + 16 * 16) * 8),  # sequence first
    # 2 layers, 2 directions: the second layer reads both directions' states (2 * 32)
    (nn.LSTM(10, 32, num_layers=2, bidirectional=True, batch_first=True), 6,
     2 * 4 * (10 * 32 + 32 * 32) * 6 + 2 * 4 * (64 * 32 + 32 * 32) * 6),
])
def test_recurrent_macs_are_counted_by_hand(rnn, steps, hand):
    model = _Seq(rnn).eval()
    shape = (steps, rnn.input_size)
    classifier = model.fc.in_features * model.fc.out_features
    assert rnn_macs(rnn, steps) == hand
    assert layer_macs(model, shape)["rnn"] == hand
    assert count_macs(model, shape) == hand + classifier


def test_attention_macs_are_counted_by_hand():
    e, heads, length, ff = 16, 4, 5, 32
    per_attention = 4 * length * e * e + 2 * length * length * e  # Q, K, V, out + Q K^T + attention x V
    attn = nn.MultiheadAttention(e, heads, batch_first=True)
    assert attention_macs(attn, length) == per_attention
    assert count_macs(_Attend(attn), (length, e)) == per_attention
    # an encoder runs its fast path in eval mode: still counted, attention and feed-forward alike
    encoder = nn.TransformerEncoder(nn.TransformerEncoderLayer(e, heads, ff, batch_first=True), 2,
                                    enable_nested_tensor=False)
    macs = layer_macs(encoder, (length, e))
    assert macs["layers.0.self_attn"] == per_attention
    assert macs[""] == 2 * (per_attention + 2 * length * e * ff)
    assert "layers" not in macs  # a ModuleList never runs: no row of its own
    # cross-attention: keys of another length and width
    cross = nn.MultiheadAttention(e, heads, kdim=8, vdim=12)
    assert attention_macs(cross, 5, 7) == 5 * e * e + 7 * 8 * e + 7 * 12 * e + 5 * e * e + 2 * 5 * 7 * e


def test_torch_and_onnx_count_the_same_macs(lstm, exported):
    model, _ = lstm
    stats = graph_stats(exported)
    assert stats["macs"] == count_macs(model, (1, 8, 8)) == LSTM_DIGITS_MACS
    assert stats["params"] == sum(p.numel() for p in model.parameters())
    rnn = stats["layers"]["rnn"]  # the exporter renames the LSTM's weights: they are counted with it all the same
    assert rnn["params"] == sum(p.numel() for p in model.rnn.parameters()) and rnn["type"] == "LSTM"
    assert rnn["macs"] == 4 * (8 * 64 + 64 * 64) * 8 and "LSTM" in rnn["ops"]


@pytest.mark.parametrize("layout", [0, 1])
def test_onnx_recurrent_nodes_are_counted_by_hand(tmp_path, layout):
    """A bidirectional GRU node as another exporter writes it: X (T, N, F), or (N, T, F) with layout=1."""
    steps, features, hidden = 6, 10, 16
    x_shape = [steps, 1, features] if layout == 0 else [1, steps, features]
    w = numpy_helper.from_array(np.zeros((2, 3 * hidden, features), np.float32), "gru.W")
    r = numpy_helper.from_array(np.zeros((2, 3 * hidden, hidden), np.float32), "gru.R")
    node = helper.make_node("GRU", ["x", "gru.W", "gru.R"], ["y"], hidden_size=hidden, direction="bidirectional",
                            layout=layout)
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, x_shape)],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], [w, r])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), tmp_path / "gru.onnx")
    stats = graph_stats(tmp_path / "gru.onnx")
    assert stats["macs"] == 2 * 3 * (features * hidden + hidden * hidden) * steps
    assert stats["layers"]["gru"]["macs"] == stats["macs"]


# ----------------------------------------------------------------------------- the zoo model


def test_zoo_lstm_reads_images_row_by_row_and_sequences():
    images = create_model("lstm", input_shape=(1, 28, 28), num_classes=10, hidden=32)
    assert images.rnn.input_size == 28 and isinstance(images.rnn, nn.LSTM)
    assert images(torch.rand(3, 1, 28, 28)).shape == (3, 10)
    colour = create_model("lstm", input_shape=(3, 8, 8), num_classes=4)
    assert colour.rnn.input_size == 24 and colour(torch.rand(2, 3, 8, 8)).shape == (2, 4)
    seq = load_model("zoo:lstm,cell=gru,hidden=16,layers=2,bidirectional=true", input_shape=(12, 5), num_classes=3)
    assert isinstance(seq.rnn, nn.GRU) and seq.rnn.num_layers == 2 and seq.fc.in_features == 32
    assert seq(torch.rand(4, 12, 5)).shape == (4, 3)
    with pytest.raises(SlimkitError, match="reads sequences"):
        create_model("lstm", input_shape=(64,), num_classes=10)
    with pytest.raises(SlimkitError, match="cell must be one of lstm, gru"):
        load_model("zoo:lstm,cell=rnn", input_shape=(8, 8), num_classes=10)


def test_zoo_lstm_trains_exports_with_parity_and_reloads(lstm, exported, digits):
    model, weights = lstm
    assert (model(digits.x_test).argmax(1) == digits.y_test).float().mean() > 0.6  # 10 classes: chance is 0.1
    check = parity(model, exported, digits.x_test)
    assert check["top1_agreement"] == 1.0 and check["max_abs_diff"] < 1e-4
    session = ort_session(exported, 1)
    for batch in (1, 7):  # the batch axis is dynamic
        x = digits.x_test[:batch]
        assert torch.allclose(torch.from_numpy(ort_predict(session, x)), model(x), atol=1e-4)
    again = load_model(weights=weights)
    assert torch.equal(again(digits.x_test[:8]), model(digits.x_test[:8]))


def test_dynamic_int8_quantizes_the_lstm_itself(lstm, exported, digits, tmp_path):
    model, _ = lstm
    report = quantize_onnx(exported, tmp_path / "lstm-int8.onnx", DynamicInt8(), data=digits, model=model,
                           target=Target(batch_sizes=(1,), threads=1, max_seconds=0.05))
    assert report["int8_ops"].get("DynamicQuantizeLSTM") == 1  # the recurrent weights run in 8 bits
    assert report["agreement"]["top1_agreement"] >= 0.95
    assert report["onnx_bytes"]["int8"] < 0.5 * report["onnx_bytes"]["float"]
    assert graph_stats(tmp_path / "lstm-int8.onnx")["macs"] == LSTM_DIGITS_MACS  # counted on the int8 graph too


def test_profile_counts_the_lstm(lstm, exported, digits):
    model, _ = lstm
    for runtime in ("ort-cpu", "torch-cpu"):
        report = profile(model, digits, Target(runtime, batch_sizes=(1,), threads=1, max_seconds=0.05),
                         onnx_path=exported if runtime == "ort-cpu" else None)
        assert report["macs"] == LSTM_DIGITS_MACS, runtime
        rows = {row["name"]: row for row in report["layers"]}
        assert rows["rnn"]["macs"] == 4 * (8 * 64 + 64 * 64) * 8 and rows["rnn"]["type"] == "LSTM", runtime


def test_two_trial_compress_of_the_lstm(search):
    result = json.loads((search / "result.json").read_text())
    assert result["trials"]["complete"] == 2 and (search / "best.onnx").is_file()
    assert result["baseline"]["macs"] == LSTM_DIGITS_MACS
    assert {row["name"] for row in result["baseline"]["layers"]} >= {"rnn", "fc"}
    best = load_model(weights=search / "best.safetensors")  # the best model reloads as itself
    assert isinstance(best.rnn, nn.LSTM) and best.rnn.hidden_size == 64
