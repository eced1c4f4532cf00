"""The spine (slimkit.pipeline) leaves nothing behind: no temporary folder, no profiler trace in the
current folder, whether a run succeeds or fails."""

from __future__ import annotations

import gc
import tempfile
from pathlib import Path

import numpy as np
import pytest

import slimkit
from slimkit.export import export_onnx, ort_session
from slimkit.measure import Target, profile
from slimkit.measure.backends import get_backend
from slimkit.pipeline import Recipe, apply_recipe


def _scratch_dirs() -> set[Path]:
    tmp = Path(tempfile.gettempdir())
    return {p for p in tmp.iterdir() if p.name.startswith(("slimkit-", ".slimkit-work-"))}


def test_apply_without_out_leaves_no_temporary_folder(trained, digits, tmp_path, monkeypatch):
    model, _ = trained("lenet300")
    # a temporary folder of this test's own: other processes' scratch folders come and go in /tmp
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    before = _scratch_dirs()
    res = slimkit.apply(["export"], model, digits, budget=None, target=Target(batch_sizes=(1,), max_seconds=0.05,
                                                                                 layers=False))
    assert res.onnx_path.is_file()  # usable while the result lives
    folder = res.onnx_path.parent
    del res
    gc.collect()
    assert not folder.exists()
    assert _scratch_dirs() == before


def test_apply_recipe_with_out_writes_artifacts_and_no_work_folder(trained, digits, tmp_path):
    model, _ = trained("lenet300")
    res = apply_recipe(Recipe.coerce(["export"]), model, digits, Target(batch_sizes=(1,), max_seconds=0.05),
                       out=tmp_path, baseline=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.onnx", "model.safetensors"]
    assert res.onnx_path == tmp_path / "model.onnx" and res.report["files"]["onnx"] == str(tmp_path / "model.onnx")


def test_layer_profile_leaves_no_trace_in_the_current_folder(trained, digits, tmp_path, monkeypatch):
    model, _ = trained("lenet5")
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    report = profile(model, digits, Target("ort-cpu", batch_sizes=(1,), threads=1, max_seconds=0.05, layers=True))
    assert report["layers"]  # the per-layer table came from ONNX Runtime's profiler
    assert list(cwd.iterdir()) == []

    # a run that fails while profiling: the trace stays out of the current folder too
    onnx_path = export_onnx(model, tmp_path / "m.onnx", digits.example(2))
    runner = get_backend("ort-cpu").prepare(None, onnx_path, 1)
    with pytest.raises(Exception):  # noqa: B017 (ONNX Runtime's own error type for a wrong input shape)
        runner.layer_times(np.zeros((1, 3, 5, 5), np.float32), 2)
    runner.close()
    trace_dir = tmp_path / "trace"
    trace_dir.mkdir()
    session = ort_session(onnx_path, 1, profile_dir=trace_dir)
    with pytest.raises(Exception):  # noqa: B017
        session.run(None, {session.get_inputs()[0].name: np.zeros((1, 3, 5, 5), np.float32)})
    assert list(cwd.iterdir()) == []
    assert [p.name.startswith("ort-profile") for p in trace_dir.iterdir()] == [True]
