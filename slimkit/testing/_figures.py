"""Check 4: the figures a step reports are the ones measured on its artifact and model."""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..data import DataBundle
from ..export import ort_predict, ort_session, parity
from ..measure import count_macs, count_params, graph_stats
from ..methods.quantize import int8_ops
from ..pipeline import get_step
from ..training import evaluate
from ._checks import CaseRun

# ----------------------------------------------------------------------------- 4: the reported figures


ACC_TOL = 1e-6  # accuracies: a report may hold a float32 mean; one test example is ~3e-3 on digits


class _Measured:
    """What a step's figures are checked against, each measured once: the artifact, the returned
    model and the input model."""

    def __init__(self, run: CaseRun, data: DataBundle):
        self.run, self.data = run, data
        self._cache: dict[str, Any] = {}

    def _get(self, key: str, fn: Any) -> Any:
        if key not in self._cache:
            self._cache[key] = fn()
        return self._cache[key]

    @property
    def input_unchanged(self) -> bool:
        """Whether the step saw the input model as given (no prerequisite changed it first)."""
        return all(get_step(s.name).requires or "exported" in get_step(s.name).sets
                   for s in self.run.recipe.steps[:-1])

    def artifact_bytes(self) -> int:
        return self.run.onnx_path.stat().st_size

    def params(self, of_input: bool = False) -> dict[str, int]:

        model = self.run.model_in if of_input else self.run.model
        return self._get(f"params{of_input}", lambda: count_params(model))

    def macs(self, of_input: bool = False) -> int:

        model = self.run.model_in if of_input else self.run.model
        return self._get(f"macs{of_input}", lambda: count_macs(model, self.data.input_shape))

    def accuracy(self, split: str = "test", of_input: bool = False) -> float:

        model = self.run.model_in if of_input else self.run.model
        return self._get(f"acc{split}{of_input}", lambda: evaluate(model, *self.data.split(split)))

    def artifact_accuracy(self) -> float:

        def measure() -> float:
            logits = ort_predict(ort_session(self.run.onnx_path, 1), self.data.x_test)
            return float((logits.argmax(1) == self.data.y_test.numpy()).mean())

        return self._get("acc_artifact", measure)

    def int8_ops(self) -> dict[str, int]:

        return self._get("int8_ops", lambda: int8_ops(self.run.onnx_path))

    def sparse_initializers(self) -> list[str]:
        import onnx

        return self._get("sparse", lambda: sorted(t.values.name for t in
                                                   onnx.load(str(self.run.onnx_path)).graph.sparse_initializer))

    def graph(self) -> dict[str, Any]:

        return self._get("graph", lambda: graph_stats(self.run.onnx_path))

    def parity(self, samples: int) -> dict[str, Any]:

        return self._get(f"parity{samples}", lambda: parity(self.run.model, self.run.onnx_path,
                                                            self.data.x_test[:samples], threads=1))


@dataclass
class _Report:
    """One step report under check; ``check`` compares a figure and records its key."""

    r: dict[str, Any]
    label: str
    m: _Measured
    checked: list[str]

    @property
    def reverted(self) -> bool:
        return self.r.get("applied") is False  # an ONNX-level step that kept the float artifact

    @property
    def onnx_level(self) -> bool:
        """Whether the step's result is the ONNX artifact run by ONNX Runtime (it compared it with the model)."""
        agreement = self.r.get("agreement")
        return self.m.run.target == "ort-cpu" and isinstance(agreement, dict) and "max_abs_diff" in agreement

    def check(self, key: str, got: Any, want: Any, tol: float = 0.0) -> None:
        ok = got == want if tol == 0 else math.isclose(float(got), float(want), rel_tol=0, abs_tol=tol)
        assert ok, f"{self.label}: {key}: the report says {got!r}, measured again it is {want!r}"
        self.checked.append(f"{self.r['step']}.{key}")

    def check_parity(self, key: str) -> None:
        value = self.r[key]
        got = self.m.parity(int(value["samples"]))
        self.check(f"{key}.top1_agreement", value["top1_agreement"], got["top1_agreement"], ACC_TOL)
        self.check(f"{key}.max_abs_diff", value["max_abs_diff"], got["max_abs_diff"], 1e-6 * (1 + got["max_abs_diff"]))


def _module(model: nn.Module, name: str) -> nn.Module | None:
    try:
        return model.get_submodule(name)
    except AttributeError:
        return None


# Figures of the artifact, checked on the report that made the final artifact.

def _onnx_bytes(rep: _Report) -> None:
    value = rep.r.get("onnx_bytes")
    if isinstance(value, int):
        rep.check("onnx_bytes", value, rep.m.artifact_bytes())
    elif isinstance(value, dict) and {"float", "int8"} <= set(value):  # float -> int8: the one kept
        kept = "float" if rep.reverted else "int8"
        rep.check(f"onnx_bytes.{kept}", value[kept], rep.m.artifact_bytes())


def _sparse(rep: _Report) -> None:
    if "sparse_bytes" in rep.r:
        rep.check("sparse_bytes", rep.r["sparse_bytes"], rep.m.artifact_bytes())
    value = rep.r.get("sparse_initializers")  # a count, or the names of the initializers stored sparse
    if isinstance(value, list):
        rep.check("sparse_initializers", sorted(value), rep.m.sparse_initializers())
    elif isinstance(value, int):
        rep.check("sparse_initializers", value, len(rep.m.sparse_initializers()))


def _int8_ops(rep: _Report) -> None:
    if isinstance(rep.r.get("int8_ops"), dict) and not rep.reverted:
        rep.check("int8_ops", dict(rep.r["int8_ops"]), rep.m.int8_ops())
        if "int8_op_count" in rep.r:
            rep.check("int8_op_count", rep.r["int8_op_count"], sum(rep.m.int8_ops().values()))


def _parity(rep: _Report) -> None:
    if isinstance(rep.r.get("parity"), dict) and "max_abs_diff" in rep.r["parity"]:
        rep.check_parity("parity")
    if rep.onnx_level and not rep.reverted:
        rep.check_parity("agreement")  # the torch model against the integer artifact


ARTIFACT_RULES = (_onnx_bytes, _sparse, _int8_ops, _parity)


# Figures of the returned model (and of the input model, when the step saw it as given),
# checked on the step's own report.

def _params_and_macs(rep: _Report) -> None:
    for key, want in (("params", lambda: rep.m.params()["params"]),
                      ("params_after", lambda: rep.m.params()["params"]),
                      ("nonzero_params", lambda: rep.m.params()["nonzero_params"]),
                      ("macs", rep.m.macs), ("macs_after", rep.m.macs)):
        if isinstance(rep.r.get(key), int):
            rep.check(key, rep.r[key], want())
    if rep.m.input_unchanged:
        for key, want in (("params_before", lambda: rep.m.params(of_input=True)["params"]),
                          ("nonzero_before", lambda: rep.m.params(of_input=True)["nonzero_params"]),
                          ("macs_before", lambda: rep.m.macs(of_input=True))):
            if isinstance(rep.r.get(key), int):
                rep.check(key, rep.r[key], want())


def _training(rep: _Report) -> None:
    # fit keeps the best epoch: the returned model has the validation accuracy reported
    for prefix, part in (("", rep.r), ("finetune.", rep.r.get("finetune"))):
        if isinstance(part, dict) and isinstance(part.get("best_val_accuracy"), float) and part.get("epochs_run"):
            rep.check(f"{prefix}best_val_accuracy", part["best_val_accuracy"], rep.m.accuracy("val"), ACC_TOL)
    if isinstance(rep.r.get("fake_quant_test_accuracy"), float):
        rep.check("fake_quant_test_accuracy", rep.r["fake_quant_test_accuracy"], rep.m.accuracy("test"), ACC_TOL)


def _accuracy(rep: _Report) -> None:
    acc = rep.r.get("accuracy")
    if not isinstance(acc, dict):
        return
    after = "float" if rep.reverted else ("int8" if "int8" in acc else "after")
    if after in acc:
        rep.check(f"accuracy.{after}", acc[after],
                  rep.m.artifact_accuracy() if rep.onnx_level else rep.m.accuracy("test"), ACC_TOL)
    before = "float" if "float" in acc else "before"
    if before in acc and before != after and rep.m.input_unchanged:
        # an ONNX-level step measured its float artifact, which may round one example unlike torch
        tol = 1.5 / len(rep.m.data.y_test) if rep.onnx_level else ACC_TOL
        rep.check(f"accuracy.{before}", acc[before], rep.m.accuracy("test", of_input=True), tol)


def _torch_agreement(rep: _Report) -> None:
    agreement = rep.r.get("agreement")
    if isinstance(agreement, dict) and "max_abs_diff" not in agreement and rep.m.input_unchanged:
        # a torch-level step compared its result with its input model: classes on the first test examples
        x = rep.m.data.x_test[: int(agreement["samples"])]
        with torch.no_grad():
            same = rep.m.run.model_in.eval()(x).argmax(1) == rep.m.run.model.eval()(x).argmax(1)
        rep.check("agreement.top1_agreement", agreement["top1_agreement"], float(same.float().mean()), ACC_TOL)


def _layers(rep: _Report) -> None:
    layers = rep.r.get("layers")  # {module: {"params": weight size, "nonzero": its non-zeros, ...}}
    if not isinstance(layers, dict):
        return
    for name, row in layers.items():
        w = getattr(_module(rep.m.run.model, name), "weight", None)
        if not isinstance(row, dict) or not isinstance(w, torch.Tensor):
            continue
        if isinstance(row.get("params"), int):
            rep.check(f"layers.{name}.params", row["params"], w.numel())
        if isinstance(row.get("nonzero"), int):
            rep.check(f"layers.{name}.nonzero", row["nonzero"], int(torch.count_nonzero(w.detach())))


def _channels(rep: _Report) -> None:
    channels = rep.r.get("channels")  # {module: [before, after]}
    if not isinstance(channels, dict):
        return
    for name, pair in channels.items():
        mod = _module(rep.m.run.model, name)
        n = getattr(mod, "out_channels", getattr(mod, "out_features", None))
        if isinstance(pair, (list, tuple)) and isinstance(n, int):
            rep.check(f"channels.{name}", pair[-1], n)


def _weight_bytes(rep: _Report) -> None:
    wb, layers = rep.r.get("weight_bytes"), rep.r.get("layers")  # {float, int8} of the listed layers
    if not (isinstance(wb, dict) and isinstance(layers, list)) or rep.reverted:
        return
    if "int8" in wb:
        int8 = sum(t.numel() * t.element_size() for k, t in rep.m.run.model.state_dict().items()
                   if t.dtype in (torch.int8, torch.uint8) and any(k.startswith(f"{n}.") for n in layers))
        rep.check("weight_bytes.int8", wb["int8"], int8)
    if "float" in wb and rep.m.input_unchanged:
        sizes = [rep.m.run.model_in.get_submodule(n).weight.numel() for n in layers]
        dense = 4 * sum(int(n) for n in sizes)
        rep.check("weight_bytes.float", wb["float"], dense)


def _packed_bytes(rep: _Report) -> None:
    if "packed_bytes" not in rep.r:
        return
    files = rep.m.run.result.report.get("files", {})
    extra = {k: Path(v) for k, v in files.items() if k not in ("onnx", "weights", "report")}
    assert len(extra) == 1, f"{rep.label}: packed_bytes, but apply wrote {sorted(extra)} beside the model"
    rep.check("packed_bytes", rep.r["packed_bytes"], next(iter(extra.values())).stat().st_size)


MODEL_RULES = (_params_and_macs, _training, _accuracy, _torch_agreement, _layers, _channels, _weight_bytes,
               _packed_bytes)


def check_report_figures(run: CaseRun, data: DataBundle) -> list[str]:
    """Check each figure of the step's report that can be measured again, by key name: against
    the artifact (``onnx_bytes``, ``sparse_bytes``, ``int8_ops``, ``parity``, ``agreement``...:
    :data:`ARTIFACT_RULES`) or the returned model (``params``, ``macs``, ``best_val_accuracy``,
    ``layers``, ``packed_bytes``...: :data:`MODEL_RULES`); then apply's own ``parity`` and
    ``result``. Returns the keys checked; a step with none of its own fails."""
    m = _Measured(run, data)
    checked: list[str] = []
    reports = run.step_reports  # the step's own, then the automatic export if any
    artifact_keys = ("onnx_bytes", "sparse_bytes", "int8_ops", "parity", "agreement")
    made = max((i for i, r in enumerate(reports) if any(k in r for k in artifact_keys)), default=None)
    for i, r in enumerate(reports):
        rep = _Report(r, f"step '{run.name}', report of '{r['step']}'", m, checked)
        for rule in (ARTIFACT_RULES if i == made else ()) + (MODEL_RULES if i == 0 else ()):
            rule(rep)
    own = list(checked)
    assert own, (f"step '{run.name}': its report carries no figure that can be checked against the artifact or "
                 f"the returned model (keys: {sorted(run.report)})")
    spine = _Report({"step": "apply", **run.result.report}, f"step '{run.name}', apply's report", m, checked)
    _parity(spine)
    result = run.result.report.get("result") or {}
    if run.target == "ort-cpu" and "artifact_bytes" in result:
        spine.check("result.artifact_bytes", result["artifact_bytes"], m.artifact_bytes())
        spine.check("result.params", result["params"], m.graph()["params"])
        spine.check("result.nonzero_params", result["nonzero_params"], m.graph()["nonzero_params"])
    return checked


