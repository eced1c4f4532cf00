"""Issue 13, item 2: every command that changes a model shows accuracy before and after, takes
--max-accuracy-drop, and past it still writes its artifacts, says so loudly, records
within_budget: false and exits 3."""

from __future__ import annotations

import json

import pytest

import slimkit
from slimkit.methods.prune import LotteryConfig, lottery
from slimkit.training import TrainConfig


def _text(r) -> str:
    return " ".join((r.out + r.err).split())


def test_deep_compress_past_the_limit_writes_everything_says_why_and_exits_3(cli, trained, tmp_path):
    """The issue's own case: sparsity 0.9 with the old fine-tune (8 epochs of 10 steps at lr 1e-3) collapses
    the model; the command names the cause it can see (the loss rose while the sparsity ramped)."""
    _, weights = trained("lenet300")
    out = tmp_path / "dc"
    r = cli("deep-compress", "--model", "zoo:lenet300", "--weights", weights, "--sparsity", "0.9",
            "--bits", "conv=8,fc=5", "--min-steps", "0", "--lr", "1e-3", "--out", out)
    assert r.code == 3, r
    res = json.loads((out / "result.json").read_text())
    acc = res["accuracy"]
    assert res["within_budget"] is False and acc["within_budget"] is False
    assert acc["drop_points"] == pytest.approx(100 * (acc["before"] - acc["after"]), abs=1e-3) and acc["drop_points"] > 1
    assert (out / "model.slim").is_file()
    text = _text(r)
    assert "accuracy dropped past the limit" in text and "within_budget: false" in text
    assert "loss rose" in text and any("loss rose" in h for h in acc["hints"])


def test_deep_compress_within_a_wider_limit_exits_0(cli, trained, tmp_path):
    _, weights = trained("lenet300")
    out = tmp_path / "dc"
    r = cli("deep-compress", "--model", "zoo:lenet300", "--weights", weights, "--sparsity", "0.5", "--bits", "fc=6",
            "--prune-epochs", "1", "--share-epochs", "0", "--schedule", "one-shot", "--max-batches", "4",
            "--max-accuracy-drop", "1", "--out", out, "-q")
    assert r.code == 0, r
    res = json.loads((out / "result.json").read_text())
    assert res["within_budget"] is True and res["accuracy"]["max_drop_points"] == 100


def test_apply_past_the_limit_exits_3_and_result_json_says_why(cli, trained, tmp_path):
    """Unstructured pruning of 97% of the weights with no fine-tune: far past the default 1 point."""
    _, weights = trained("lenet300")
    (tmp_path / "r.yaml").write_text("steps:\n  - prune_unstructured: {sparsity: 0.97, scope: layer}\n  - export: {}\n")
    out = tmp_path / "run"
    r = cli("apply", tmp_path / "r.yaml", "--model", "zoo:lenet300", "--weights", weights, "--out", out,
            "--batch", "1", "--max-seconds", "0.05", "--threads", "1")
    assert r.code == 3, r
    res = json.loads((out / "result.json").read_text())
    assert res["within_budget"] is False and res["accuracy"]["max_drop_points"] == 1
    assert res["accuracy"]["before"] == res["baseline"]["accuracy"] > res["result"]["accuracy"] == res["accuracy"]["after"]
    assert any("accuracy dropped past the limit" in n for n in res["not_met"])
    assert (out / "model.onnx").is_file() and (out / "model.safetensors").is_file()
    assert "over the accuracy budget" in _text(r)


def test_apply_judges_the_other_limits_too(trained, digits):
    """A size limit no model meets: within_budget false, and not_met names the limit and the figure."""
    model, _ = trained("lenet300")
    res = slimkit.apply(["export"], model, digits, target=slimkit.Target(batch_sizes=(1,), max_seconds=0.05, layers=False),
                        budget=slimkit.Budget(max_size_kb=1.0, max_accuracy_drop=0.01))
    assert res.report["accuracy"]["within_budget"] is True  # export alone loses nothing
    assert res.report["within_budget"] is False
    assert any("size_kb" in n and "limit 1" in n for n in res.report["not_met"])


def test_apply_without_a_budget_measures_no_baseline(trained, digits):
    model, _ = trained("lenet300")
    res = slimkit.apply(["export"], model, digits, target=slimkit.Target(batch_sizes=(1,), max_seconds=0.05, layers=False),
                        budget=None)
    assert res.report["baseline"] is None and "within_budget" not in res.report


def test_lottery_judges_the_last_ticket_against_the_dense_network(digits):
    res = lottery("zoo:lenet300", digits, LotteryConfig(rounds=1, rate=0.5, rewind_epoch=0, control=False),
                  train=TrainConfig(epochs=2, batch_size=64), max_accuracy_drop=0.0)
    rows, acc = res.report["rounds"], res.report["accuracy"]
    assert acc["before"] == rows[0]["ticket_accuracy"] and acc["after"] == rows[-1]["ticket_accuracy"]
    assert res.report["within_budget"] == (acc["after"] >= acc["before"])
    if not res.report["within_budget"]:
        assert "fewer rounds" in acc["hints"][0]


@pytest.mark.parametrize("command", ["apply", "distill", "decompose", "deep-compress", "lottery"])
def test_every_model_changing_command_takes_max_accuracy_drop(cli, command):
    r = cli(command, "--help")
    assert r.code == 0 and "--max-accuracy-drop" in r.out
