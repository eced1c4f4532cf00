"""Shared fixtures: the digits data, small trained zoo models, and an in-process CLI runner."""

from __future__ import annotations

import copy
import os
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from slimkit.data import DataBundle, load_data
from slimkit.models import create_model, save_model, set_origin
from slimkit.training import TrainConfig, fit

FASHION = Path("/usr/share/datasets/fashion-mnist")


@pytest.fixture(scope="session")
def digits() -> DataBundle:
    return load_data("digits", seed=0)


@pytest.fixture(scope="session")
def _trained_cache(tmp_path_factory) -> dict:
    return {"dir": tmp_path_factory.mktemp("trained")}


@pytest.fixture(scope="session")
def trained(digits, _trained_cache) -> Callable[..., tuple[torch.nn.Module, Path]]:
    """``trained("lenet5", epochs=8, width=0.5)`` -> (a fresh copy of the model, its weights file).

    Each distinct request trains once per test session on digits and is cached; callers get a
    deep copy, so they may change it freely.
    """

    def get(name: str, epochs: int = 8, **kwargs) -> tuple[torch.nn.Module, Path]:
        key = (name, epochs, tuple(sorted(kwargs.items())))
        if key not in _trained_cache:
            torch.manual_seed(0)
            model = create_model(name, input_shape=digits.input_shape, num_classes=digits.num_classes, **kwargs)
            spec = "zoo:" + ",".join([name, *(f"{k}={v}" for k, v in sorted(kwargs.items()))])
            set_origin(model, spec, digits.input_shape, digits.num_classes)
            fit(model, digits, TrainConfig(epochs=epochs, batch_size=32, lr=2e-3))
            path = _trained_cache["dir"] / f"{name}-{epochs}-{abs(hash(key))}.safetensors"
            save_model(model, path)
            _trained_cache[key] = (model, path)
        model, path = _trained_cache[key]
        return copy.deepcopy(model).eval(), path

    return get


class CliResult:
    def __init__(self, code: int, out: str, err: str):
        self.code, self.out, self.err = code, out, err

    def __repr__(self) -> str:
        return f"CliResult(code={self.code}, out={self.out[-500:]!r}, err={self.err[-800:]!r})"


@pytest.fixture
def cli(capsys, monkeypatch) -> Callable[..., CliResult]:
    """Run ``slimkit ARGS`` in-process (same entry point as the console script)."""
    from slimkit.cli import main

    def run(*args: str, cwd: Path | None = None) -> CliResult:
        if cwd is not None:
            monkeypatch.chdir(cwd)
        capsys.readouterr()
        code = 0
        try:
            main([str(a) for a in args])
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
        captured = capsys.readouterr()
        return CliResult(code, captured.out, captured.err)

    return run


@pytest.fixture(autouse=True)
def _reset_console():
    """`--quiet` and `--json` silence the shared console; no test may leak that into the next."""
    from slimkit import _console

    yield
    _console.set_quiet(False)


def pytest_collection_modifyitems(config, items):
    """Soak tests (20 SIGKILLs across one search, 4 workers x 25 trials on PostgreSQL) take about
    90-100 s each, which `make test` cannot afford within its 10 minutes: `make soak` runs them."""
    if os.environ.get("SLIMKIT_SOAK") == "1":
        return
    skip = pytest.mark.skip(reason="soak test (90-100 s): run it with `make soak` (SLIMKIT_SOAK=1)")
    for item in items:
        if "soak" in item.keywords:
            item.add_marker(skip)
