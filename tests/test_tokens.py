"""Integer token ids: npz data kept integer (with an attention mask naming the pad id), zoo:transformer
trained on them, exported with int64 input and dynamic batch and sequence axes (parity with ONNX
Runtime), profiled (attention MACs counted alike in torch and in the graph), dynamic INT8 through a
recipe, and clear errors for bad token data and for models that cannot take ids."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch

from slimkit.api import apply
from slimkit.data import load_data
from slimkit.errors import SlimkitError
from slimkit.export import export_onnx, ort_predict, ort_session, parity
from slimkit.export.packed import load_packed, write_packed
from slimkit.measure import Target, attention_macs, count_macs, count_ops, profile
from slimkit.models import load_model, resolve_model, save_model
from slimkit.training import TrainConfig, fit

N, T, VOCAB, MARK = 400, 16, 32, 7
SPEC = "zoo:transformer,dim=32,heads=2,layers=2"


def _tokens(n: int = N, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Token ids 1..31 (0 is left for padding); the class says whether token 7 appears."""
    rng = np.random.default_rng(seed)
    x = rng.integers(1, VOCAB, (n, T))
    x[x == MARK] = MARK + 1
    y = (rng.random(n) < 0.5).astype(np.int64)
    x[y == 1, rng.integers(0, T, int(y.sum()))] = MARK
    return x.astype(np.int64), y


@pytest.fixture(scope="module")
def token_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("tokens") / "tokens.npz"
    x, y = _tokens()
    np.savez(path, x=x, y=y)
    return path


@pytest.fixture(scope="module")
def tokens(token_file):
    return load_data(f"npz:{token_file}")


@pytest.fixture(scope="module")
def trained(tokens):
    """zoo:transformer (2 layers, dim 32) trained for a few seconds."""
    torch.manual_seed(0)
    model = resolve_model(SPEC, tokens)
    fit(model, tokens, TrainConfig(epochs=8, batch_size=32, lr=3e-3))
    return model.eval()


@pytest.fixture(scope="module")
def exported(trained, tokens, tmp_path_factory):
    return export_onnx(trained, tmp_path_factory.mktemp("onnx") / "tokens.onnx", tokens.example(2))


def test_npz_keeps_token_ids_integer(tokens, token_file):
    assert tokens.x_train.dtype == tokens.x_test.dtype == torch.int64
    assert tokens.input_shape == (T,) and tokens.vocab_size == VOCAB and tokens.pad_id is None
    assert tokens.example(5).dtype == torch.int64 and tokens.calibration(8).dtype == torch.int64
    x, _ = _tokens()
    assert set(np.unique(tokens.x_train.numpy())) <= set(np.unique(x))
    assert "token ids (vocabulary 32)" in tokens.describe()
    # float data is unchanged: float32, uint8 pixels scaled, 3-D images get a channel axis
    feats = token_file.parent / "floats.npz"
    np.savez(feats, x=np.random.default_rng(0).random((50, 6)).astype(np.float64), y=np.arange(50) % 2)
    assert load_data(f"npz:{feats}").x_train.dtype == torch.float32
    pixels = token_file.parent / "pixels.npz"
    np.savez(pixels, x=np.full((50, 4, 4), 255, np.uint8), y=np.arange(50) % 2)
    px = load_data(f"npz:{pixels}")
    assert px.input_shape == (1, 4, 4) and float(px.x_train.max()) == 1.0 and px.vocab_size is None


def test_attention_mask_names_the_pad_id(tmp_path):
    x, y = _tokens(60)
    mask = np.ones_like(x)
    mask[::2, 12:] = 0  # every other sequence padded after 12 tokens
    x[mask == 0] = 0
    np.savez(tmp_path / "padded.npz", x=x, y=y, attention_mask=mask)
    data = load_data(f"npz:{tmp_path / 'padded.npz'}")
    assert data.pad_id == 0
    net = resolve_model("zoo:transformer,dim=16,heads=2,layers=1", data)
    assert net.pad == 0 and net.embed.num_embeddings == VOCAB
    # padding does not change a sequence's logits (masked in attention and pooling)
    ids = torch.from_numpy(x[1:2, :12])
    padded = torch.cat([ids, torch.zeros(1, 4, dtype=torch.int64)], 1)
    with torch.no_grad():
        torch.testing.assert_close(net(ids), net(padded), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("arrays, match", [
    (lambda x, y: {"x": -x, "y": y}, "negative"),
    (lambda x, y: {"x": x, "y": y, "attention_mask": np.ones((len(x), T - 1))}, "attention_mask has shape"),
    (lambda x, y: {"x": x, "y": y, "attention_mask": np.full(x.shape, 2)}, "only 0 .padding. and 1"),
    (lambda x, y: {"x": x, "y": y, "attention_mask": np.zeros(x.shape)}, "different ids"),
    (lambda x, y: {"x": x, "y": y, "x_test": x[:20].astype(np.float32), "y_test": y[:20]}, "x_test holds float"),
    (lambda x, y: {"x": x.astype(np.float32).reshape(len(x), 4, 4), "y": y, "attention_mask": np.ones((len(x), 4, 4))},
     "goes with integer token ids"),
])
def test_bad_token_data_is_explained(tmp_path, arrays, match):
    x, y = _tokens(60)
    np.savez(tmp_path / "bad.npz", **arrays(x, y))
    with pytest.raises(SlimkitError, match=match):
        load_data(f"npz:{tmp_path / 'bad.npz'}")


def test_pad_id_used_by_a_real_token_is_refused(tmp_path):
    x, y = _tokens(60)
    mask = np.ones_like(x)
    mask[0, -2:] = 0
    x[0, -2:] = 5  # 5 pads sequence 0 but is a real token elsewhere
    np.savez(tmp_path / "bad.npz", x=x, y=y, attention_mask=mask)
    with pytest.raises(SlimkitError, match="id 5 marks padding .* but also appears"):
        load_data(f"npz:{tmp_path / 'bad.npz'}")


def test_transformer_trains_above_chance_and_reloads(trained, tokens, tmp_path):
    acc = float((trained(tokens.x_test).argmax(1) == tokens.y_test).float().mean())
    assert acc >= 0.8, acc  # chance is about 0.5
    path = save_model(trained, tmp_path / "tokens.safetensors")
    again = load_model(weights=path)  # the vocabulary comes back from the file, no data needed
    write_packed(tmp_path / "tokens.slim", trained, {})  # the packed format records the vocabulary too
    packed = load_packed(tmp_path / "tokens.slim")
    assert again.embed.num_embeddings == packed.embed.num_embeddings == VOCAB
    with torch.no_grad():
        torch.testing.assert_close(again(tokens.x_test), trained(tokens.x_test))
        torch.testing.assert_close(packed(tokens.x_test), trained(tokens.x_test))


def test_export_with_token_ids_has_parity(trained, tokens, exported):
    session = ort_session(exported)
    inp = session.get_inputs()[0]
    assert inp.type == "tensor(int64)" and isinstance(inp.shape[0], str) and isinstance(inp.shape[1], str)
    for batch in (1, 64):
        result = parity(trained, exported, tokens.example(batch))
        assert result["top1_agreement"] == 1.0 and result["max_abs_diff"] < 1e-4, result
    # the sequence axis is dynamic: shorter sequences run and agree with torch
    short = tokens.example(8)[:, : T // 2]
    with torch.no_grad():
        np.testing.assert_allclose(ort_predict(session, short), trained(short).numpy(), atol=1e-4)


def test_profile_counts_attention(trained, tokens, exported):
    dim, ff, layers = 32, 4 * 32, 2
    per_layer = attention_macs(trained.encoder.layers[0].self_attn, T) + 2 * T * dim * ff
    expected = layers * per_layer + dim * tokens.num_classes
    assert count_macs(trained, tokens.input_shape) == expected
    target = Target("ort-cpu", batch_sizes=(1, 8), max_seconds=0.1)
    ort = profile(None, tokens, target, onnx_path=exported)
    assert ort["macs"] == expected  # the graph counted at the exported sequence length, not 1
    assert set(ort["latency_ms"]) == {"1", "8"} and all(v["median"] > 0 for v in ort["latency_ms"].values())
    assert ort["accuracy"] >= 0.8
    rows = {r["name"]: r for r in ort["layers"]}
    assert rows["encoder.layers.0.self_attn"]["macs"] > 0 and rows["embed"]["params"] == VOCAB * dim
    torch_cpu = profile(trained, tokens, Target("torch-cpu", batch_sizes=(1,), max_seconds=0.1))
    assert torch_cpu["macs"] == expected and torch_cpu["accuracy"] == ort["accuracy"]


def test_dynamic_int8_recipe_runs_integer_kernels(trained, tokens):
    res = apply([{"quantize_dynamic": {}}], trained, tokens, budget=None,
                target=Target("ort-cpu", batch_sizes=(1,), max_seconds=0.1))
    ops = count_ops(res.onnx_path)
    integer = {k: v for k, v in ops.items() if k in ("DynamicQuantizeMatMul", "MatMulInteger", "DynamicQuantizeLinear")}
    assert integer, ops
    assert onnx.load(str(res.onnx_path)).graph.input[0].type.tensor_type.elem_type == onnx.TensorProto.INT64
    assert res.report["parity"]["top1_agreement"] >= 0.95
    assert res.report["result"]["macs"] == count_macs(trained, tokens.input_shape)


def test_float_model_on_token_ids_is_explained(tokens):
    with pytest.raises(SlimkitError, match="integer token ids shaped \\(16,\\) with ids up to 31.*float-only"):
        resolve_model("zoo:lenet300", tokens)
    with pytest.raises(SlimkitError, match="embedding of at least 32 rows"):
        resolve_model("zoo:transformer,vocab=16,dim=16,heads=2,layers=1", tokens)  # too small for the ids


def test_cli_errors_exit_2(cli, token_file, tmp_path):
    res = cli("profile", "--model", "zoo:lenet300", "--data", f"npz:{token_file}", "--batch", "1")
    assert res.code == 2 and "integer token ids" in res.err + res.out, res
    x, y = _tokens(60)
    np.savez(tmp_path / "bad.npz", x=x, y=y, attention_mask=np.ones((60, 3)))
    res = cli("profile", "--model", SPEC, "--data", f"npz:{tmp_path / 'bad.npz'}", "--batch", "1")
    assert res.code == 2 and "attention_mask has shape" in res.err + res.out, res
