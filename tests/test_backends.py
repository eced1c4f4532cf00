"""One contract, every latency backend: the same checks run against each registered target."""

import numpy as np
import pytest
import torch

from slimkit.export import export_onnx
from slimkit.measure import target_names
from slimkit.measure.backends import get_backend, time_runs, torch_threads


@pytest.fixture(params=target_names())
def runner(request, trained, digits, tmp_path):
    model, _ = trained("lenet5")
    backend = get_backend(request.param)
    path = export_onnx(model, tmp_path / "m.onnx", digits.example(2)) if backend.needs_onnx else None
    r = backend.prepare(None if backend.needs_onnx else model, path, threads=1)
    yield model, r
    r.close()


def test_runner_returns_the_models_logits(runner, digits):
    model, r = runner
    for batch in (1, 7, 64):  # the batch dimension is dynamic
        x = digits.example(batch)
        with torch.no_grad():
            ref = model(x).numpy()
        got = r(np.ascontiguousarray(x.numpy()))
        assert got.shape == (batch, 10)
        np.testing.assert_allclose(got, ref, atol=1e-4)


def test_layer_times_name_real_modules(runner, digits):
    model, r = runner
    times = r.layer_times(np.ascontiguousarray(digits.example(4).numpy()), repeats=3)
    names = dict(model.named_modules())
    assert {"conv1", "conv2", "fc1"} <= set(times)
    assert all(t >= 0 for t in times.values())
    assert all(n in names or n.startswith("(") for n in times)


def test_torch_threads_are_restored():
    before = torch.get_num_threads()
    with torch_threads(1):
        assert torch.get_num_threads() == 1
    assert torch.get_num_threads() == before


def test_time_runs_reports_medians_and_stops():
    import time

    stats = time_runs(lambda: time.sleep(0.002), max_seconds=0.3)
    assert 1.5 < stats["median"] < 20 and stats["p90"] >= stats["median"] and stats["runs"] >= 10
