"""Imported by the forkserver of tests/test_search_faults.py: slimkit imported and one ONNX export
done once (one thread, so nothing that a fork breaks is started), so that each forked
``slimkit compress`` starts its trials at once instead of paying the exporter's first call."""

import tempfile
from pathlib import Path

import torch

from slimkit.cli import main as _main  # noqa: F401  (imported for the children)
from slimkit.export import export_onnx
from slimkit.models import create_model

torch.set_num_threads(1)
with tempfile.TemporaryDirectory() as tmp:
    export_onnx(create_model("lenet5", input_shape=(1, 8, 8), num_classes=10).eval(), Path(tmp) / "warm.onnx",
                torch.zeros(2, 1, 8, 8))
