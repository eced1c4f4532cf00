"""Issue 13, item 6: a run's result.json figures, re-measured from the files it wrote.

Test accuracy must match exactly (the same artifact on the same split); the latency of the
result relative to the baseline, timed again side by side, within 25% of the ratio result.json
gives (timings move with the machine's load; their ratio should not).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from slimkit.data import DataBundle
from slimkit.measure import Target
from slimkit.measure import profile as measure_profile
from slimkit.measure.timing import medians, side_by_side

TOLERANCE = 0.25


def check_result_figures(report: dict[str, Any], baseline_onnx: Path, result_onnx: Path, data: DataBundle,
                         batch_sizes: tuple[int, ...], *, threads: int = 1, accuracy_key: str = "accuracy") -> dict:
    """Re-measure ``result_onnx`` (accuracy, exact) and the latency ratio against ``baseline_onnx``
    (side by side, within 25%); returns the figures for the assertion messages."""
    again = measure_profile(None, data, Target(batch_sizes=batch_sizes, threads=threads, layers=False),
                            onnx_path=result_onnx, latency=False)
    assert again["accuracy"] == report["result"][accuracy_key], (again["accuracy"], report["result"][accuracy_key])
    timed = medians(side_by_side({"baseline": baseline_onnx, "result": result_onnx}, data, batch_sizes,
                                 threads=threads, rounds=7, max_seconds=1.0))
    figures = {}
    for b in batch_sizes:
        said = report["result"]["latency_ms"][str(b)]["median"] / report["baseline"]["latency_ms"][str(b)]["median"]
        measured = timed["result"][str(b)] / timed["baseline"][str(b)]
        figures[b] = {"result.json": round(said, 3), "re-measured": round(measured, 3)}
        assert abs(said / measured - 1) <= TOLERANCE, figures
    return figures
