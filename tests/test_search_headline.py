"""Issue 11, items 3 and 6: the search's headline latencies are the baseline and the best timed side by
side, and a search whose best is slower than the input model at every batch size says so and
returns the input model. The timings here come from a backend that sleeps chosen times (real
speed-ups belong in benchmarks)."""

from __future__ import annotations

import json

import pytest
import yaml

import slimkit.measure.timing as timing
from slimkit.models import ModelRef, load_model
from slimkit.search import compress

from ._services import FAST, ChosenTimes, compress_options


def _search(tmp_path, trained, monkeypatch, ms):
    _, weights = trained("lenet5")
    monkeypatch.setattr(timing, "get_backend", lambda name: ChosenTimes(ms))
    out = tmp_path / "s"
    compress(ModelRef("zoo:lenet5", weights=weights), "digits",
             **compress_options(out=out, trials=1, methods=["finetune"], objective="latency", max_accuracy_drop=1.0,
                                **FAST))
    return out, json.loads((out / "result.json").read_text()), weights


def test_a_best_slower_than_the_input_everywhere_returns_the_input(tmp_path, trained, monkeypatch, digits, capsys):
    out, res, weights = _search(tmp_path, trained, monkeypatch, {"baseline.onnx": 2.0, "best.onnx": 6.0})
    assert res["returned"]["model"] == "baseline"
    assert all(s < 1 for s in res["returned"]["its_speedup"].values())
    assert (out / "best.onnx").read_bytes() == (out / "baseline.onnx").read_bytes()
    recipe = yaml.safe_load((out / "best_recipe.yaml").read_text())
    assert [next(iter(s)) for s in recipe["steps"]] == ["export"]
    best, original = load_model(weights=out / "best.safetensors"), load_model(weights=weights)
    x = digits.x_test[:32]
    assert (best(x) - original(x)).abs().max() < 1e-6
    assert res["result"]["params"] == res["baseline"]["params"]
    assert "nothing beat the baseline" in capsys.readouterr().err.lower()
    assert "Nothing beat the baseline" in (out / "report.html").read_text()


def test_the_headline_is_timed_side_by_side(tmp_path, trained, monkeypatch):
    out, res, _ = _search(tmp_path, trained, monkeypatch, {"baseline.onnx": 6.0, "best.onnx": 2.0})
    assert "returned" not in res
    head = res["headline"]
    assert "side by side" in head["how"]
    for b in ("1", "16"):
        assert head["speedup"][b] == pytest.approx(3.0, rel=0.3)  # 6 ms against 2 ms, plus the same model time
        for figures in (res["baseline"], res["result"]):
            assert figures["latency_ms"][b]["timed"] == "side by side"
        assert res["result"]["latency_ms"][b]["median"] == head["latency_ms"]["best"][b]
