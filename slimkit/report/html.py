"""The search's report: one self-contained HTML page (no external file, script or font).

Plots are drawn with matplotlib (its object API, so no pyplot state or GUI backend) and
embedded as base64 PNG images; tables are plain HTML. Sections: the budget and the search,
baseline vs best (test split), the best recipe, the Pareto plots (speed and size against
validation accuracy), the Pareto trials, the per-layer profile of the best model, and every
trial. When no trial met the budget, the page says which limit was not met and shows the
closest trials.

>>> page = render_report(result_json, trial_rows)  # doctest: +SKIP
>>> page.startswith("<!DOCTYPE html>")  # doctest: +SKIP
True
"""

from __future__ import annotations

import base64
import html
import io
from collections.abc import Sequence
from typing import Any

from ..pipeline import recipe_summary
from . import fmt_bytes, fmt_count

__all__ = ["render_report"]

_CSS = """
body{font-family:system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;margin:2em auto;max-width:1200px;
     color:#222;padding:0 1em;line-height:1.4}
h1{font-size:1.6em;margin-bottom:.2em}h2{font-size:1.25em;margin-top:1.8em;border-bottom:1px solid #ddd}
table{border-collapse:collapse;margin:.6em 0;font-size:.88em}
th,td{border:1px solid #ddd;padding:.25em .55em;text-align:right;vertical-align:top}
th{background:#f4f4f4}td.l,th.l{text-align:left}
tr.best td{background:#fff2cc;font-weight:600}tr.pareto td{background:#eef6ff}
tr.stopped td{color:#8a6d00}tr.fail td{color:#b00020}
.muted{color:#777}.box{border:2px solid #b00020;background:#fff5f5;padding:.8em 1em;margin:1em 0}
.ok{color:#1a7f37;font-weight:600}.bad{color:#b00020;font-weight:600}
pre{background:#f7f7f7;padding:.7em;overflow-x:auto}
.plots{display:flex;flex-wrap:wrap;gap:1em}.plots figure{margin:0}figcaption{font-size:.85em;color:#555}
.scroll{max-height:40em;overflow:auto}
"""


def _e(x: Any) -> str:
    return html.escape(str(x))


def _num(v: Any, fmt: str = "{:.4g}") -> str:
    if v is None or v == "":
        return "-"
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, (int, float)):
        return fmt.format(v)
    return _e(v)


def _table(headers: Sequence[str], rows: Sequence[Sequence[str]], *, left: Sequence[int] = (0,),
           row_classes: Sequence[str] | None = None, cls: str = "") -> str:
    head = "".join(f'<th class="{"l" if i in left else ""}">{_e(h)}</th>' for i, h in enumerate(headers))
    body = []
    for r, row in enumerate(rows):
        rc = f' class="{row_classes[r]}"' if row_classes and row_classes[r] else ""
        cells = "".join(f'<td class="{"l" if i in left else ""}">{c}</td>' for i, c in enumerate(row))
        body.append(f"<tr{rc}>{cells}</tr>")
    return f'<table class="{cls}"><thead><tr>{head}</tr></thead><tbody>{"".join(body)}</tbody></table>'


def _png(fig: Any) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100, bbox_inches="tight")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def _figure(width: float = 6.0, height: float = 4.2) -> tuple[Any, Any]:
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height))
    return fig, fig.add_subplot(1, 1, 1)


def _img(src: str, alt: str, caption: str) -> str:
    return f'<figure><img src="{src}" alt="{_e(alt)}" width="600"><figcaption>{_e(caption)}</figcaption></figure>'


# ----------------------------------------------------------------------------- plots


def _pareto_plot(rows: list[dict[str, Any]], report: dict[str, Any], x_key: str, x_label: str, *,
                 log_x: bool) -> str:
    base = report["baseline"]
    base_val = base.get("val_accuracy", base["accuracy"])
    fig, ax = _figure()
    done = [r for r in rows if r.get("val_accuracy") is not None and r.get(x_key) is not None]
    groups = (
        ("over budget", [r for r in done if not r["feasible"]], dict(c="#bbbbbb", marker="o", s=22)),
        ("within budget", [r for r in done if r["feasible"] and not r["pareto"]], dict(c="#4c72b0", marker="o", s=26)),
        ("Pareto front", [r for r in done if r["pareto"] and not r["best"]], dict(c="#dd8452", marker="D", s=40)),
        ("best", [r for r in done if r["best"]], dict(c="#c44e52", marker="*", s=220)),
    )
    for label, pts, style in groups:
        if pts:
            ax.scatter([_x(r, x_key) for r in pts], [r["val_accuracy"] for r in pts], label=label, zorder=3,
                       edgecolors="black", linewidths=0.4, **style)
    front = sorted((r for r in done if r["pareto"]), key=lambda r: _x(r, x_key))
    if len(front) > 1:
        ax.plot([_x(r, x_key) for r in front], [r["val_accuracy"] for r in front], color="#dd8452", lw=1, zorder=2)
    base_x = 1.0 if x_key == "latency_ratio" else base["artifact_bytes"] / 1024
    ax.scatter([base_x], [base_val], marker="X", s=90, c="black", label="baseline", zorder=4)
    drop = (report.get("budget") or {}).get("max_accuracy_drop")
    if drop is not None:
        ax.axhline(base_val - drop, color="#c44e52", ls="--", lw=1, label="accuracy floor")
    size_limit = (report.get("budget") or {}).get("max_size_kb")
    if x_key == "size_kb" and size_limit:
        ax.axvline(size_limit, color="#8172b3", ls="--", lw=1, label="size limit")
    xs = [_x(r, x_key) for r in done] + [base_x]
    if log_x and max(xs) > 3 * min(xs):  # a log axis only pays over a wide range
        from matplotlib.ticker import FuncFormatter, LogLocator

        ax.set_xscale("log")
        ax.xaxis.set_major_locator(LogLocator(subs=(1.0, 2.0, 5.0)))
        ax.xaxis.set_minor_formatter(FuncFormatter(lambda v, _: ""))
        ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
    ax.set_xlabel(x_label)
    ax.set_ylabel("validation accuracy")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8, loc="lower right" if x_key == "latency_ratio" else "lower left")
    return _png(fig)


def _x(row: dict[str, Any], key: str) -> float:
    return 1.0 / row[key] if key == "latency_ratio" else row[key]


def _history_plot(rows: list[dict[str, Any]]) -> str | None:
    pts = [(r["trial"], 1.0 / r["latency_ratio"]) for r in rows if r.get("feasible") and r.get("latency_ratio")]
    if not pts:
        return None
    fig, ax = _figure(6.0, 3.2)
    all_pts = [(r["trial"], 1.0 / r["latency_ratio"]) for r in rows if r.get("latency_ratio")]
    ax.scatter([p[0] for p in all_pts], [p[1] for p in all_pts], s=14, c="#bbbbbb", label="every complete trial")
    best, xs, ys = 0.0, [], []
    for n, v in sorted(pts):
        best = max(best, v)
        xs.append(n)
        ys.append(best)
    ax.step(xs, ys, where="post", color="#c44e52", label="best within budget so far")
    ax.set_xlabel("trial")
    ax.set_ylabel("speed-up vs baseline")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    return _png(fig)


def _layers_plot(layers: list[dict[str, Any]], limit: int = 15) -> str | None:
    rows = sorted((r for r in layers if r.get("time_share")), key=lambda r: -r["time_share"])[:limit]
    if not rows:
        return None
    fig, ax = _figure(6.0, 0.35 * len(rows) + 1.2)
    names = [r["name"] for r in rows][::-1]
    ax.barh(names, [r["time_share"] * 100 for r in rows][::-1], color="#4c72b0")
    ax.set_xlabel("share of the measured time (%)")
    ax.tick_params(axis="y", labelsize=8)
    ax.grid(True, axis="x", alpha=0.3)
    return _png(fig)


# ----------------------------------------------------------------------------- sections


def _compare(before: dict[str, Any], after: dict[str, Any]) -> str:
    def ratio(a: float, b: float) -> str:
        return f"{a / b:.2f}x" if b else "-"

    rows = [
        ["parameters", f"{before['params']:,}", f"{after['params']:,}", ratio(before["params"], after["params"])],
        ["non-zero parameters", f"{before['nonzero_params']:,}", f"{after['nonzero_params']:,}",
         ratio(before["nonzero_params"], after["nonzero_params"])],
        ["MACs per example", f"{before['macs']:,}", f"{after['macs']:,}", ratio(before["macs"], after["macs"])],
        ["artifact size", fmt_bytes(before["artifact_bytes"]), fmt_bytes(after["artifact_bytes"]),
         ratio(before["artifact_bytes"], after["artifact_bytes"])],
        ["accuracy (test)", f"{before['accuracy']:.4f}", f"{after['accuracy']:.4f}",
         f"{(after['accuracy'] - before['accuracy']) * 100:+.2f} pts"],
    ]
    for bs, b in before.get("latency_ms", {}).items():
        a = after.get("latency_ms", {}).get(bs)
        if a:
            rows.append([f"latency batch {bs}, median (p90) ms", f"{b['median']:.4g} ({b['p90']:.4g})",
                         f"{a['median']:.4g} ({a['p90']:.4g})", ratio(b["median"], a["median"])])
    return _table(["measure", "baseline", "best", "baseline / best"], rows)


def _layers_table(layers: list[dict[str, Any]]) -> str:
    rows = [[_e(r["name"]), _e(r["type"]), fmt_count(r["params"]), fmt_count(r["nonzero_params"]),
             fmt_count(r["macs"]), f"{r['time_share']:.1%}"] for r in layers]
    return _table(["layer", "type", "params", "non-zero", "MACs", "time share"], rows, left=(0, 1))


def _trials_table(rows: list[dict[str, Any]], batch_sizes: Sequence[int]) -> str:
    headers = ["trial", "state", "within budget", "recipe", "val acc", "vs baseline (pts)"]
    headers += [f"ms @{b}" for b in batch_sizes] + ["speed-up", "size KB", "params", "over budget", "steps timed",
                                                    "seconds", "note"]
    body, classes = [], []
    for r in rows:
        cells = [str(r["trial"]), _e(r["state"]), _num(r["feasible"]), _e(r["recipe"]), _num(r["val_accuracy"]),
                 _num(None if r["accuracy_drop_pts"] is None else -r["accuracy_drop_pts"], "{:+.2f}")]
        cells += [_num(r.get(f"latency_ms@{b}")) for b in batch_sizes]
        cells += [_num(1 / r["latency_ratio"], "{:.2f}x") if r.get("latency_ratio") else "-", _num(r["size_kb"], "{:.1f}"),
                  fmt_count(r["params"]) if r.get("params") is not None else "-", _e(r["over_budget"]),
                  _e(r.get("step_speed", r.get("int8_faster", ""))), _num(r["seconds"], "{:.1f}"), _e(r["note"])]
        body.append(cells)
        classes.append("best" if r["best"] else "pareto" if r["pareto"] else
                       "stopped" if r["state"] == "stopped early" else "fail" if r["state"] == "fail" else "")
    n = len(headers)
    return _table(headers, body, left=(1, 3, n - 4, n - 3, n - 1),
                  row_classes=classes, cls="trials")


def _pareto_table(pareto: list[dict[str, Any]], batch_sizes: Sequence[int]) -> str:
    headers = ["trial", "recipe", "val acc", "test acc"] + [f"speed-up @{b}" for b in batch_sizes] + ["size KB"]
    rows, classes = [], []
    for p in pareto:
        s = p["search"]
        rows.append([str(p["trial"]), _e(p.get("summary") or recipe_summary(p["recipe"], p.get("params"))), f"{s['val_accuracy']:.4f}",
                     f"{p['test_accuracy']:.4f}"] + [_num(s["speedup"].get(str(b)), "{:.2f}x") for b in batch_sizes]
                    + [f"{s['size_kb']:.1f}"])
        classes.append("best" if p["best"] else "")
    return _table(headers, rows, left=(1,), row_classes=classes)


def _finalists_table(finalists: list[dict[str, Any]], batch_sizes: Sequence[int]) -> str:
    """The second fidelity: each finalist's proxy against its fully fine-tuned figures."""
    headers = (["trial", "recipe", "proxy val acc", "final val acc"] + [f"ms @{b}" for b in batch_sizes]
               + [f"speed-up @{b}" for b in batch_sizes] + ["within budget", "epochs run", "seconds"])
    rows, classes = [], []
    for f in finalists:
        epochs = ", ".join(str(t["epochs_run"]) + (" (stopped early)" if t.get("stopped_early") else "")
                           for t in f.get("training") or [])
        rows.append([str(f["trial"]), _e(f["summary"]), f"{f['proxy_val_accuracy']:.4f}",
                     f"{f['final_val_accuracy']:.4f}"]
                    + [_num(f["latency_ms"].get(str(b))) for b in batch_sizes]
                    + [_num(f["speedup"].get(str(b)), "{:.2f}x") for b in batch_sizes]
                    + [_num(f["within_budget"]) + ("" if f["within_budget"] else " (" + _e(", ".join(f["over_budget"])) + ")"),
                       _e(epochs or "-"), _num(f["seconds"], "{:.1f}")])
        classes.append("best" if f["winner"] else "")
    timed = finalists[0].get("timed", "") if finalists else ""
    return ("<h2>Finalists: proxy vs full fine-tune (validation split)</h2>"
            + _table(headers, rows, left=(1,), row_classes=classes)
            + f"<p class=\"muted\">Each finalist's recipe applied again to the input model with a full, distilled "
              f"fine-tune (early stopping on validation); latencies timed {_e(timed)}. The best within budget "
              "wins.</p>")


def _infeasible(report: dict[str, Any]) -> str:
    parts = ['<div class="box"><p class="bad">No trial met the budget.</p>']
    if report.get("unmet"):
        items = "".join(f"<li><b>{_e(u['constraint'])}</b> &le; {_num(u['limit'])} was met by no trial; the closest, "
                        f"trial {u['closest_trial']}, misses it by {_num(u['short_by'])}</li>" for u in report["unmet"])
        parts.append(f"<ul>{items}</ul>")
    else:
        parts.append("<p>Each limit was met by some trial, but never all at once (or no trial completed).</p>")
    parts.append("<p>Relax the budget, or search longer: the same command with a larger <code>--trials</code> "
                 "resumes the study.</p></div>")
    if report.get("closest"):
        rows = []
        for c in report["closest"]:
            f = c["figures"]
            rows.append([str(c["trial"]), _e(recipe_summary(c["recipe"])), f"{f['val_accuracy']:.4f}",
                         f"{1 / f['latency_ratio']:.2f}x", f"{f['size_kb']:.1f}",
                         _e("; ".join(f"{k} over by {v:.4g}" for k, v in c["over_budget"].items()))])
        parts.append("<h2>Closest trials</h2>" + _table(["trial", "recipe", "val acc", "speed-up", "size KB",
                                                         "over budget"], rows, left=(1, 5)))
    return "".join(parts)


def _prediction_section(lp: dict[str, Any]) -> str:
    """slimkit nas: the latency table's prediction against the measured latency of each trained candidate."""
    pairs = lp.get("pairs") or []
    mre = lp.get("mean_relative_error")
    head = (f"<h2>Latency table: predicted vs measured (batch {lp['batch']})</h2><p>{_e(lp['table'])}, measured "
            f"{_e(lp.get('table_measured') or '')}. ")
    if not pairs:
        return head + "No trained candidate yet.</p>"
    ok = mre is not None and mre <= lp.get("target", 0.10)
    head += (f"Mean relative error over {len(pairs)} trained candidates: <span class=\"{'ok' if ok else 'bad'}\">"
             f"{mre:.1%}</span> (target &le; {lp.get('target', 0.10):.0%}; largest {lp['max_relative_error']:.1%}). "
             "Each candidate's measured latency is the median of its own timing run, so load on the machine between "
             "the table and the trial shows up here as error.</p>")
    fig, ax = _figure(5.0, 4.2)
    xs = [p["predicted_ms"] for p in pairs]
    ys = [p["measured_ms"] for p in pairs]
    lo, hi = min(xs + ys) * 0.9, max(xs + ys) * 1.1
    # |predicted - measured| / measured <= 10%  <=>  predicted / 1.1 <= measured <= predicted / 0.9
    ax.fill_between([lo, hi], [lo / 1.1, hi / 1.1], [lo / 0.9, hi / 0.9], color="#dddddd", label="within 10%")
    ax.plot([lo, hi], [lo, hi], color="#555555", lw=1, label="measured = predicted")
    ax.scatter(xs, ys, c="#4c72b0", edgecolors="black", linewidths=0.4, zorder=3, label="trained candidate")
    ax.set_xlim(lo, hi)
    ax.set_ylim(lo, hi)
    ax.set_xlabel("predicted by the latency table (ms)")
    ax.set_ylabel("measured on the exported candidate (ms)")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8, loc="upper left")
    return head + "<div class=\"plots\">" + _img(_png(fig), "predicted against measured latency",
                                                 "Each trained candidate: latency predicted from the table against "
                                                 "latency measured on its exported artifact.") + "</div>"


def render_report(report: dict[str, Any], rows: list[dict[str, Any]]) -> str:
    """The whole page for a search's ``result.json`` content and its trial rows."""
    bs = report["batch_sizes"]
    c = report["trials"]
    command = report.get("command", "compress")
    subject = f"{report['family']} architectures" if report.get("family") else (report.get("model") or "model")
    title = f"slimkit {command}: {subject} on {report.get('data')}"
    out = [f"<!DOCTYPE html><html lang=\"en\"><head><meta charset=\"utf-8\"><title>{_e(title)}</title>"
           f"<style>{_CSS}</style></head><body>", f"<h1>{_e(title)}</h1>"]
    budget = "; ".join(report.get("budget_text") or []) or "none"
    out.append(
        f"<p>Target <b>{_e(report['target'])}</b> with {report['threads']} thread(s), batch sizes {_e(', '.join(map(str, bs)))}. "
        f"Budget: <b>{_e(budget)}</b>. Best by <b>{_e(report['objective'])}</b> among the trials within budget. "
        f"Study <code>{_e(report['study'])}</code> in <code>{_e(report['storage'])}</code>.</p>"
        f"<p>{c['total']} trials: {c['complete']} complete, {c['stopped_early']} stopped early, {c['failed']} failed; "
        f"<span class=\"{'ok' if c['within_budget'] else 'bad'}\">{c['within_budget']} within budget</span>, "
        f"{c['pareto']} on the Pareto front.<br><span class=\"muted\">Search figures are measured on the validation "
        f"split; the baseline vs best table and the test accuracies on the test split. Created {_e(report['created'])}, "
        f"slimkit {_e(report['slimkit'])}, torch {_e(report['torch'])}.</span></p>")
    best = report.get("best")
    if best is None:
        out.append(_infeasible(report))
    else:
        import yaml

        out.append(f"<h2>Baseline vs best (trial {best['trial']}, test split)</h2>")
        if report.get("returned"):
            out.append(f"<p class=\"bad\"><b>Nothing beat the baseline</b>: {_e(report['returned']['why'])}.</p>")
        out.append(_compare(report["baseline"], report["result"]))
        head = report.get("headline")
        if head:
            spread = max((s.get("spread") or 0.0) for f in (report["baseline"], report["result"])
                         for s in f["latency_ms"].values())
            slower = (f" <span class=\"bad\">Slower than the input at batch {_e(', '.join(head['slower_at']))}.</span>"
                      if head.get("slower_at") else "")
            out.append(f"<p class=\"muted\">Latencies: {_e(head['how'])}; widest spread over rounds "
                       f"{spread:.0%}.</p>{slower}")
        if best.get("confirmed"):
            conf = best["confirmed"]
            timed = ", ".join(f"trial {n}: {1 / conf['latency_ratio'][str(n)]:.2f}x" for n in conf["trials"])
            out.append(f"<p class=\"muted\">Chosen after timing the {len(conf['trials'])} fastest trials within budget "
                       f"again, side by side ({conf['rounds']} interleaved rounds, medians; speed-up vs baseline): "
                       f"{_e(timed)}.</p>")
        if best.get("verdicts") or best.get("int8"):
            notes = "; ".join(f"{r['step']}: {'faster' if r['faster'] else 'not faster'} than before it here"
                              + ("" if r.get("applied", True) else ", so reverted") for r in best.get("verdicts") or best["int8"])
            out.append(f"<p class=\"muted\">{_e(notes)}</p>")
        recipe = (best.get("final") or {}).get("recipe") or best["recipe"]
        note = f" ({_e(best['final']['note'])})" if best.get("final") else ""
        if report.get("finalists"):
            out.append(_finalists_table(report["finalists"], bs))
        out.append(f"<h2>Best recipe{note}</h2><pre>" + _e(yaml.safe_dump(recipe, sort_keys=False)) + "</pre>"
                   "<p class=\"muted\">Replay it with <code>slimkit apply best_recipe.yaml ...</code>.</p>")
    if report.get("baseline_is"):
        out.append(f"<p class=\"muted\">Baseline: {_e(report['baseline_is'])}.</p>")
    if report.get("latency_prediction"):
        out.append(_prediction_section(report["latency_prediction"]))
    out.append("<h2>Pareto front</h2><div class=\"plots\">")
    out.append(_img(_pareto_plot(rows, report, "latency_ratio", "speed-up vs baseline (geometric mean over batch sizes)",
                                 log_x=True), "Pareto plot: speed-up against validation accuracy",
                    "Speed-up against validation accuracy; the front joins the trials within budget that no other "
                    "beats on latency, size and accuracy at once."))
    out.append(_img(_pareto_plot(rows, report, "size_kb", "artifact size (KB)", log_x=True),
                    "Pareto plot: size against validation accuracy", "Artifact size against validation accuracy."))
    hist = _history_plot(rows)
    if hist:
        out.append(_img(hist, "search history", "Speed-up of each trial, and the best within budget so far."))
    out.append("</div>")
    if report.get("pareto"):
        out.append(_pareto_table(report["pareto"], bs))
    if best is not None:
        layers = report["result"].get("layers") or []
        out.append(f"<h2>Per-layer profile of the best model (batch {bs[0]}, {_e(report['target'])})</h2>")
        plot = _layers_plot(layers)
        if plot:
            out.append("<div class=\"plots\">" + _img(plot, "per-layer time share", "Share of the measured time per "
                                                      "layer (the most expensive first).") + "</div>")
        out.append(_layers_table(layers))
    out.append("<h2>Every trial</h2><div class=\"scroll\">" + _trials_table(rows, bs) + "</div>")
    out.append("</body></html>")
    return "\n".join(out)
