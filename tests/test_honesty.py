"""Issue 13, item 6: `apply`'s result.json, re-measured from the files it wrote (compress and nas
have the same check beside their own searches: tests/test_search.py, tests/test_nas.py)."""

from __future__ import annotations

import json

import slimkit
from slimkit.export import export_onnx
from slimkit.models import ModelRef

from .honesty import check_result_figures


def test_apply_result_json_is_what_its_files_measure(trained, digits, tmp_path):
    model, weights = trained("lenet5")
    out = tmp_path / "run"
    recipe = [{"prune_structured": {"ratio": 0.5}}, {"finetune": {"epochs": 1, "max_batches": 4}}, "export"]
    slimkit.apply(recipe, ModelRef("zoo:lenet5", weights=weights), digits, out=out, budget=slimkit.Budget(max_accuracy_drop=1.0),
                  target=slimkit.Target(batch_sizes=(1, 64), threads=1, max_seconds=0.3, layers=False))
    report = json.loads((out / "result.json").read_text())
    baseline_onnx = export_onnx(model, tmp_path / "baseline.onnx", digits.example(2))
    check_result_figures(report, baseline_onnx, out / "model.onnx", digits, (1, 64))
