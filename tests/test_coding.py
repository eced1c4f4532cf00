"""Deep Compression: Huffman coding, the .slim format (bit-exact, self-checking), the pipeline,
its recipe step and its command, on digits."""

from __future__ import annotations

import json
import struct
import zlib

import numpy as np
import pytest
import torch

import slimkit
from slimkit.errors import ConfigError, SlimkitError
from slimkit.export.packed import (
    CodedTensor,
    entropy_bits,
    huffman_decode,
    huffman_encode,
    huffman_lengths,
    load_packed,
    read_packed,
    write_packed,
)
from slimkit.methods.coding import DeepCompression, deep_compress, parse_layer_values, share_weights_
from slimkit.models import create_model, set_origin

FAST = dict(prune_epochs=1, share_epochs=1, schedule="one-shot", batch_size=64, max_batches=8)


def _bit_equal(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(
        x.dtype == y.dtype and torch.equal(x.reshape(-1).view(torch.uint8), y.reshape(-1).view(torch.uint8))
        for x, y in zip(a.values(), (b[k] for k in a)))


@pytest.mark.parametrize("seed", range(5))
def test_huffman_round_trip_is_optimal_within_one_bit(seed):
    rng = np.random.default_rng(seed)
    k = int(rng.integers(2, 300))
    symbols = rng.zipf(1.3 + seed / 4, size=int(rng.integers(1, 5000))) % k
    lengths = huffman_lengths(np.bincount(symbols, minlength=k))
    assert sum(2.0 ** -n for n in lengths if n) == pytest.approx(1.0) or len(set(symbols)) == 1  # Kraft: complete
    data = huffman_encode(symbols, lengths)
    assert np.array_equal(huffman_decode(data, len(symbols), lengths), symbols)
    coded_bits = sum(lengths[s] for s in symbols)
    h = entropy_bits(symbols)
    assert h <= coded_bits < h + len(symbols) + 1e-9 and len(data) == (coded_bits + 7) // 8


def test_coded_tensor_relative_index_with_fillers():
    w = torch.zeros(3, 50)
    w[0, 1], w[1, 30], w[2, 49] = 0.5, -0.25, 0.5  # gaps of 1, 78 and 68 zeros
    c = CodedTensor.from_shared(w, bits=2, index_bits=3)  # runs longer than 7 zeros need fillers
    assert c.stats()["nonzero"] == 3 and c.stats()["fillers"] == 78 // 8 + 68 // 8
    assert c.rel_index.max() <= 7 and set(c.symbols.tolist()) <= {0, 1, 2}
    assert torch.equal(c.decode(), w)
    with pytest.raises(SlimkitError, match="3 distinct non-zero values; 1-bit symbols hold at most 1"):
        CodedTensor.from_shared(torch.tensor([1.0, 2.0, 3.0]), bits=1)


def test_share_weights_linear_init_and_zeros_kept():
    torch.manual_seed(0)
    model = create_model("lenet300", input_shape=(1, 8, 8), num_classes=10)
    with torch.no_grad():
        model.fc1.weight[:, :10] = 0
    w0 = model.fc1.weight.detach().clone()
    hook = share_weights_(model, {"fc1": 3, "fc2": 5})
    w = model.fc1.weight.detach()
    assert torch.equal(w == 0, w0 == 0)  # pruned weights stay zero, kept ones stay non-zero
    assert len(torch.unique(w[w != 0])) == 7 and len(torch.unique(model.fc2.weight)) <= 31
    c = hook.centroids["fc1"]
    assert torch.all(c[1:] > c[:-1]) and w0.min() <= c.min() and c.max() <= w0.max()
    err = (w - w0).abs().max()
    assert err < (w0.max() - w0.min()) / 7  # each weight is near its centroid


def test_packed_round_trip_is_bit_exact_with_buffers_and_structure(tmp_path, digits):
    from slimkit.methods.quantize import fold_batchnorm_

    torch.manual_seed(0)
    model = create_model("resnet", input_shape=digits.input_shape, num_classes=10, width=0.25)
    set_origin(model, "zoo:resnet,width=0.25", digits.input_shape, 10)
    model.train()
    with torch.no_grad():
        model(digits.x_train[:64])  # non-trivial batch-norm statistics
    model.eval()
    folded = create_model("resnet", input_shape=digits.input_shape, num_classes=10, width=0.25)
    set_origin(folded, "zoo:resnet,width=0.25", digits.input_shape, 10)
    fold_batchnorm_(folded, digits.example(2))  # a recorded structural change the reader must replay
    for i, net in enumerate((model, folded)):
        layers = {n: 4 for n, m in net.named_modules() if isinstance(m, torch.nn.Conv2d)}
        share_weights_(net, layers)
        coded = {f"{n}.weight": CodedTensor.from_shared(net.get_submodule(n).weight, 4, 4) for n in layers}
        acct = write_packed(tmp_path / f"m{i}.slim", net, coded)
        assert acct["file_bytes"] == (tmp_path / f"m{i}.slim").stat().st_size
        again = load_packed(tmp_path / f"m{i}.slim")
        assert _bit_equal(again.state_dict(), net.state_dict())  # floats, int64 counters, everything
        x = digits.x_test[:16]
        with torch.no_grad():
            assert torch.equal(again(x), net(x))


@pytest.fixture(scope="module")
def compressed(trained, digits, tmp_path_factory):
    model, weights = trained("lenet300")
    out = tmp_path_factory.mktemp("dc") / "run"
    cfg = DeepCompression(sparsity={"fc": 0.7, "fc3": 0.3}, bits={"fc": 4}, index_bits={"fc": 4}, **FAST)
    return model, weights, out, deep_compress(model, digits, cfg, out=out)


def test_deep_compress_writes_a_packed_model_and_its_report(compressed, digits):
    model, _, out, res = compressed
    r = json.loads((out / "result.json").read_text())
    assert r["bit_exact"] is True and res.path == out / "model.slim"
    layers = r["layers"]
    assert layers["fc1"]["kept"] == pytest.approx(0.3, abs=0.01) and layers["fc3"]["kept"] == pytest.approx(0.7, abs=0.01)
    for name in ("fc1", "fc2", "fc3"):
        w = res.model.get_submodule(name).weight
        assert len(torch.unique(w[w != 0])) <= 15  # 4 bits: zero + 15 shared values, kept through fine-tuning
        b = layers[name]["bytes"]
        assert b["weights"] >= layers[name]["entropy_bytes"]["weights"] - 1  # Huffman cannot beat Shannon
        assert b["record"] > b["weights"] + b["index"] + b["codebook"]
    t = r["total"]
    assert t["file_bytes"] == (out / "model.slim").stat().st_size
    assert t["ratio"] == pytest.approx(t["dense_fp32_bytes"] / t["file_bytes"], rel=1e-3) and t["ratio"] > 7
    assert t["entropy_bound_bytes"] <= t["huffman_stream_bytes"]
    assert set(r["accuracy"]) >= {"before", "after", "pruned"} and 0 < r["accuracy"]["after"] <= 1
    packed = load_packed(out / "model.slim")
    assert _bit_equal(packed.state_dict(), res.model.state_dict())
    assert slimkit.load_packed is load_packed
    x = digits.x_test
    with torch.no_grad():
        acc = float((packed(x).argmax(1) == digits.y_test).float().mean())
    assert acc == pytest.approx(r["accuracy"]["after"])
    with torch.no_grad():  # the input model was not changed
        assert torch.count_nonzero(model.fc1.weight) == model.fc1.weight.numel()


@pytest.mark.parametrize("damage,message", [
    (lambda b: b[:-10], "truncated: the header says"),
    (lambda b: b[:20], "truncated: 20 bytes"),
    (lambda b: b[:200] + bytes([b[200] ^ 0x40]) + b[201:], "corrupted: its CRC-32 does not match"),
    (lambda b: b + b"\0", "longer than its header says"),
    (lambda b: b"PK\x03\x04" + b[4:], "not a .slim packed model"),
])
def test_damaged_packed_files_give_clear_errors(compressed, tmp_path, damage, message):
    data = (compressed[2] / "model.slim").read_bytes()
    (tmp_path / "bad.slim").write_bytes(damage(data))
    with pytest.raises(SlimkitError, match=message):
        load_packed(tmp_path / "bad.slim")


def test_newer_format_version_is_refused(compressed, tmp_path):
    data = bytearray((compressed[2] / "model.slim").read_bytes())
    data[4:6] = struct.pack("<H", 2)
    data[-4:] = struct.pack("<I", zlib.crc32(bytes(data[:-4])))
    (tmp_path / "v2.slim").write_bytes(bytes(data))
    with pytest.raises(SlimkitError, match="format version 2; this slimkit reads version 1"):
        read_packed(tmp_path / "v2.slim")


@pytest.mark.parametrize("fields,message", [
    ({"bits": {"fc": 9}}, r"field 'bits': the bits of 'fc' must be an integer in 1\.\.8, got 9"),
    ({"bits": {"conv": 0}}, r"field 'bits'.*in 1\.\.8, got 0"),
    ({"index_bits": {"fc": 12}}, r"field 'index_bits'.*1\.\.8"),
    ({"sparsity": 1.0}, r"field 'sparsity'.*\[0, 1\)"),
    ({"schedule": "agp", "prune_epochs": 0}, r"field 'schedule'.*prune_epochs >= 1"),
])
def test_bad_deep_compression_configs(fields, message):
    with pytest.raises(ConfigError, match=message):
        DeepCompression(**fields)


def test_unknown_layer_rejected_before_work(trained, digits):
    model, _ = trained("lenet300")
    with pytest.raises(ConfigError, match=r"field 'bits': unknown layer 'conv9'.*fc1, fc2, fc3"):
        deep_compress(model, digits, DeepCompression(bits={"conv9": 4}))
    with pytest.raises(ConfigError, match=r"step 1 'deep_compress', field 'skip'.*'fc7'"):
        slimkit.apply([{"deep_compress": {"skip": ["fc7"]}}], model, digits)
    assert parse_layer_values("0.9", float, "sparsity") == {"all": 0.9}
    assert parse_layer_values("conv=8, fc=5", int, "bits") == {"conv": 8, "fc": 5}


def test_cli_deep_compress_matches_the_api(cli, compressed, tmp_path):
    _, weights, out_api, _ = compressed
    out = tmp_path / "cli"
    r = cli("deep-compress", "--model", "zoo:lenet300", "--weights", weights, "--sparsity", "fc=0.7,fc3=0.3",
            "--bits", "fc=4", "--index-bits", "fc=4", "--prune-epochs", "1", "--share-epochs", "1",
            "--schedule", "one-shot", "--batch-size", "64", "--max-batches", "8", "--out", out, "-q")
    assert r.code == 0, r
    assert "wrote" in r.out and "fc1" in r.out
    assert (out / "model.slim").read_bytes() == (out_api / "model.slim").read_bytes()  # same run, same bytes
    again = cli("deep-compress", "--model", "zoo:lenet300", "--weights", weights, "--out", out)
    assert again.code == 2 and "previous run" in again.err


@pytest.mark.parametrize("args,message", [
    (["--bits", "conv=9"], "--bits: the bits of 'conv' must be an integer in 1..8, got 9"),
    (["--sparsity", "fc9=0.5"], "--sparsity: unknown layer 'fc9'"),
    (["--bits", "fc=five"], "'fc=five' is not key=int"),
])
def test_cli_rejects_bad_options_before_work(cli, trained, tmp_path, args, message):
    _, weights = trained("lenet300")
    r = cli("deep-compress", "--model", "zoo:lenet300", "--weights", weights, *args, "--out", tmp_path / "o")
    assert r.code == 2 and message in " ".join(r.err.split()), r
    assert not (tmp_path / "o").exists()


def test_deep_compress_recipe_step(trained, digits, tmp_path):
    model, _ = trained("lenet300")
    res = slimkit.apply([{"deep_compress": {"sparsity": 0.5, "bits": {"fc": 3}, "prune_epochs": 0,
                                            "share_epochs": 0, "schedule": "one-shot"}}, "export"], model, digits, out=tmp_path / "run", budget=None, target=slimkit.Target(batch_sizes=(1,), max_seconds=0.05, layers=False))
    step = next(s for s in res.report["steps"] if s["step"] == "deep_compress")
    assert step["bit_exact"] and step["packed_ratio"] > 5
    packed = tmp_path / "run" / "model.slim"  # apply(out=DIR) keeps the packed file
    assert packed.stat().st_size == step["packed_bytes"] and res.report["files"]["model.slim"] == str(packed)
    assert _bit_equal(load_packed(packed).state_dict(), res.model.state_dict())
    assert len(torch.unique(res.model.fc2.weight)) <= 8  # zero + 7 shared values, exported as they are
    assert res.report["result"]["nonzero_params"] < 0.6 * res.report["result"]["params"]
    with pytest.raises(ConfigError, match="cannot come after step 1 'deep_compress'"):
        slimkit.Recipe.from_data(["deep_compress", "finetune"])
