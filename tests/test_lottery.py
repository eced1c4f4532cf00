"""Lottery tickets: iterative magnitude pruning with rewinding, the random-reinit control, the files."""

import json

import pytest
import torch

from slimkit.errors import ConfigError
from slimkit.methods.prune import LotteryConfig, lottery
from slimkit.models import load_model
from slimkit.training import TrainConfig


def test_lottery_rounds_rewind_and_control(digits, tmp_path):
    out = tmp_path / "lt"
    res = lottery("zoo:lenet300", digits, LotteryConfig(rounds=2, rate=0.2, rewind_epoch=0), out=out,
                  train=TrainConfig(epochs=2, batch_size=64, lr=2e-3))
    rows = res.report["rounds"]
    assert [r["round"] for r in rows] == [0, 1, 2]
    assert [r["remaining"] for r in rows] == pytest.approx([1.0, 0.8, 0.64], abs=1e-4)
    for r in rows:
        assert 0.3 < r["ticket_accuracy"] <= 1 and 0 < r["control_accuracy"] <= 1
    assert res.report["ticket_epochs"] == 2 and res.report["control_epochs"] == 2

    saved = json.loads((out / "lottery.json").read_text())
    assert saved["rounds"] == rows and (out / "lottery.png").read_bytes()[:4] == b"\x89PNG"
    final = load_model(weights=out / "model.safetensors")  # the trained ticket, zeros where pruned
    ticket = load_model(weights=out / "ticket.safetensors")  # the same mask on the rewound weights
    torch.manual_seed(0)
    init = load_model("zoo:lenet300", input_shape=digits.input_shape, num_classes=10)  # the seeded initialisation
    for name in ("fc1", "fc2", "fc3"):
        w, t, w0 = (m.get_submodule(name).weight for m in (final, ticket, init))
        mask = t != 0
        assert torch.equal(w != 0, mask)  # trained with the mask held
        assert torch.equal(t[mask], w0[mask])  # rewound to epoch 0: the very initial values
    nonzero = sum(int((final.get_submodule(n).weight != 0).sum()) for n in ("fc1", "fc2", "fc3"))
    assert nonzero == rows[-1]["nonzero_weights"]
    assert torch.equal(res.model.fc1.weight, final.fc1.weight)


def test_rewinding_to_a_later_epoch_keeps_that_epochs_weights(digits, tmp_path):
    res = lottery("zoo:lenet300", digits, LotteryConfig(rounds=1, rate=0.5, rewind_epoch=1, control=False, scope="layer"),
                  out=tmp_path / "lt", train=TrainConfig(epochs=2, batch_size=64))
    rows = res.report["rounds"]
    assert rows[1]["control_accuracy"] is None and res.report["ticket_epochs"] == 1
    ticket = load_model(weights=tmp_path / "lt" / "ticket.safetensors")
    torch.manual_seed(0)
    init = load_model("zoo:lenet300", input_shape=digits.input_shape, num_classes=10)
    for name in ("fc1", "fc2", "fc3"):  # layer scope: each layer keeps half
        t = ticket.get_submodule(name).weight
        assert int((t != 0).sum()) == t.numel() - round(0.5 * t.numel())
        assert not torch.equal(t[t != 0], init.get_submodule(name).weight[t != 0])  # one epoch past the init


def test_lottery_cli(cli, tmp_path):
    out = tmp_path / "cli"
    r = cli("lottery", "--model", "zoo:lenet300", "--data", "digits", "--rounds", "1", "--rate", "0.2",
            "--rewind-epoch", "0", "--epochs", "1", "--batch-size", "64", "--out", out)
    assert r.code == 0, r
    assert "random reinit" in r.out and "80.0%" in r.out
    assert {p.name for p in out.iterdir()} >= {"lottery.json", "lottery.png", "model.safetensors", "ticket.safetensors"}
    again = cli("lottery", "--model", "zoo:lenet300", "--out", out)
    assert again.code == 2 and "already holds a previous run" in again.err


@pytest.mark.parametrize("args,message", [
    (["--rate", "1.5"], "field 'rate': must be in (0, 1)"),
    (["--rewind-epoch", "3", "--epochs", "2"], "field 'rewind_epoch': must be in [0, epochs) = [0, 2), got 3"),
    (["--rounds", "0"], "field 'rounds': must be >= 1"),
    (["--scope", "model"], "field 'scope': got 'model'; choose one of global, layer"),
])
def test_lottery_bad_input_exits_2(cli, tmp_path, args, message):
    r = cli("lottery", "--model", "zoo:lenet300", *args, "--out", tmp_path / "x")
    assert r.code == 2, r
    assert message in " ".join(r.err.split()), r.err
    assert not (tmp_path / "x").exists()  # rejected before any work


def test_lottery_rejects_bad_values_in_python():
    with pytest.raises(ConfigError, match="rewind_epoch"):
        lottery("zoo:lenet300", "digits", LotteryConfig(rewind_epoch=1), train=TrainConfig(epochs=1))
