"""Human-readable tables of measurements (rich), shared by the CLI commands."""

from __future__ import annotations

from typing import Any

from rich.table import Table

__all__ = ["fmt_count", "fmt_bytes", "profile_table", "layers_table", "compare_table"]


def fmt_count(n: float | int | None) -> str:
    if n is None:
        return "-"
    n = float(n)
    for unit, div in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(n) >= div:
            return f"{n / div:.2f}{unit}"
    return f"{n:.0f}"


def fmt_bytes(n: float | int | None) -> str:
    if n is None:
        return "-"
    n = float(n)
    for unit, div in (("MB", 1 << 20), ("KB", 1 << 10)):
        if n >= div:
            return f"{n / div:.1f} {unit}"
    return f"{n:.0f} B"


def _latency_rows(p: dict[str, Any]) -> list[tuple[str, str]]:
    rows = []
    for bs, stats in p.get("latency_ms", {}).items():
        rows.append((f"latency batch {bs} (median / p90 ms)",
                     f"{stats['median']:.3f} / {stats['p90']:.3f}  (spread {stats['spread']:.0%}, {stats['runs']} runs)"))
    return rows


def profile_table(p: dict[str, Any], title: str = "profile") -> Table:
    t = Table(title=f"{title} on {p['target']} ({p['threads']} threads)")
    t.add_column("measure")
    t.add_column("value", justify="right")
    t.add_row("parameters", f"{p['params']:,}")
    t.add_row("non-zero parameters", f"{p['nonzero_params']:,}")
    t.add_row("MACs per example", f"{p['macs']:,}")
    t.add_row("artifact size", fmt_bytes(p["artifact_bytes"]))
    t.add_row("accuracy (test)", f"{p['accuracy']:.4f}")
    for name, value in _latency_rows(p):
        t.add_row(name, value)
    return t


def layers_table(p: dict[str, Any], limit: int = 40) -> Table:
    t = Table(title="per layer")
    for col in ("layer", "type", "params", "MACs", "time share"):
        t.add_column(col, justify="left" if col in ("layer", "type") else "right")
    for row in p.get("layers", [])[:limit]:
        t.add_row(row["name"], row["type"], fmt_count(row["params"]), fmt_count(row["macs"]), f"{row['time_share']:.1%}")
    return t


def _ratio(a: float, b: float) -> str:
    return f"{a / b:.2f}x" if b else "-"


def compare_table(before: dict[str, Any], after: dict[str, Any], title: str = "before / after") -> Table:
    t = Table(title=f"{title} on {after['target']} ({after['threads']} threads)")
    for col in ("measure", "before", "after", "before/after"):
        t.add_column(col, justify="left" if col == "measure" else "right")
    t.add_row("parameters", f"{before['params']:,}", f"{after['params']:,}", _ratio(before["params"], after["params"]))
    t.add_row("non-zero parameters", f"{before['nonzero_params']:,}", f"{after['nonzero_params']:,}",
              _ratio(before["nonzero_params"], after["nonzero_params"]))
    t.add_row("MACs", f"{before['macs']:,}", f"{after['macs']:,}", _ratio(before["macs"], after["macs"]))
    t.add_row("artifact size", fmt_bytes(before["artifact_bytes"]), fmt_bytes(after["artifact_bytes"]),
              _ratio(before["artifact_bytes"], after["artifact_bytes"]))
    t.add_row("accuracy (test)", f"{before['accuracy']:.4f}", f"{after['accuracy']:.4f}",
              f"{(after['accuracy'] - before['accuracy']) * 100:+.2f} pts")
    for bs, b in before.get("latency_ms", {}).items():
        a = after.get("latency_ms", {}).get(bs)
        if a:
            t.add_row(f"latency batch {bs} (ms)", f"{b['median']:.3f}", f"{a['median']:.3f}", _ratio(b["median"], a["median"]))
    return t
