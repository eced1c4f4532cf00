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
    # three re-measurements, each in 9 interleaved rounds, paired ratios (medians() of a side-by-side
    # timing); the ratio they agree on is their median
    runs = [medians(side_by_side({"baseline": baseline_onnx, "result": result_onnx}, data, batch_sizes,
                                 threads=threads, rounds=9, max_seconds=0.36)) for _ in range(3)]
    figures = {}
    for b in batch_sizes:
        said = report["result"]["latency_ms"][str(b)]["median"] / report["baseline"]["latency_ms"][str(b)]["median"]
        measured = sorted(t["result"][str(b)] / t["baseline"][str(b)] for t in runs)
        figures[b] = {"result.json": round(said, 3), "re-measured": [round(m, 3) for m in measured]}
        assert abs(said / measured[1] - 1) <= TOLERANCE, figures
    return figures
