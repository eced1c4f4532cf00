"""INT8 quantization that is measured: static and dynamic INT8 for ONNX Runtime, dynamic INT8
for eager PyTorch, and quantization-aware training exported to integer QDQ kernels.

Top level API::

    quantize_onnx(src, dst, StaticInt8(method="entropy"), data=data)  # calibrated QDQ INT8 (ort-cpu)
    quantize_onnx(src, dst, DynamicInt8(), data=data)   # INT8 weights, activations quantized at run time
    quantize_(model, DynamicInt8())                     # torch-cpu: int8 linear kernels, in place
    quantize_(model, QAT(epochs=2), data=data)          # fake quantization + fine-tune, in place
    int8_ops(onnx_path)                                 # integer kernels in ONNX Runtime's optimised graph

INT8 is not always faster (on small models ONNX Runtime's integer kernels often lose to its
float ones), so every ONNX-level result carries a verdict: the float and the INT8 artifact
timed side by side at the batch sizes asked for, and ``"faster"``: true only if INT8 wins at
every one of them. The integer operators counted are those of the graph ONNX Runtime runs
after its own optimisations (``QLinearConv``, ``QGemm``, ...), which proves int8 kernels run.

>>> from slimkit.data import load_data
>>> from slimkit.models import create_model
>>> from slimkit.export import export_onnx
>>> from slimkit.measure import Target
>>> data = load_data("digits")
>>> model = create_model("lenet5", input_shape=data.input_shape, num_classes=10)
>>> path = export_onnx(model, "/tmp/lenet5-float.onnx", data.example(2))
>>> report = quantize_onnx(path, "/tmp/lenet5-int8.onnx", StaticInt8(calibration_size=64), data=data,
...                        target=Target(threads=1, max_seconds=0.2))
>>> report["int8_ops"]["QLinearConv"], isinstance(report["faster"], bool)
(2, True)
"""

from __future__ import annotations

from ...export import fold_batchnorm_
from ._configs import QAT, DynamicInt8, StaticInt8
from ._eager import Int8DynamicLinear
from ._ort import compare_latency, int8_ops, quantize_onnx
from ._qat import FakeQuant, quantize_
from . import _steps  # noqa: F401  (registers the recipe steps and their search spaces)

__all__ = [
    "StaticInt8",
    "DynamicInt8",
    "QAT",
    "quantize_",
    "quantize_onnx",
    "int8_ops",
    "compare_latency",
    "Int8DynamicLinear",
    "FakeQuant",
    "fold_batchnorm_",
]
