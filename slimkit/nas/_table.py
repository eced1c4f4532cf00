"""The latency table: each block configuration measured once on the target; a candidate's
latency predicted as the sum over its blocks plus a measured fixed cost.

How a block is measured, so that the sum holds on the exported network and not only on
isolated blocks (summing isolated sessions counts the per-call overhead and the layout
conversions at a session's ends once per block):

- *Reference networks.* For each width, a few whole networks of the space are built and
  exported exactly as a candidate is (:func:`slimkit.export_onnx`: BN folded, dynamo
  exporter): one per combination of the non-depth knobs at the deepest depth, plus the
  shallowest network. Every block measured below is cut out of these exported graphs
  (the exporter labels each ONNX node with its torch module), so a block in the table is
  the very ONNX subgraph a candidate holds.
- *A following block* (the 2nd, 3rd... of a stage: same shape in and out) is measured as a
  difference: ``(T(first + r copies) - T(first alone)) / r``. The session's per-call
  overhead and the layout conversions at its ends cancel out.
- *The first block of a stage* changes the shape, so it cannot be chained; it is timed
  alone, overhead included. Every architecture has exactly one first block per stage and
  their input and output shapes depend only on the width, so that overhead is the same for
  every architecture of a width and is absorbed by:
- *The fixed cost* of a width: the measured latency of each reference network minus the sum
  of its blocks from the table (median over the references). It holds the stem, the head,
  the classifier, the session's per-call overhead, and corrects the first blocks' overhead.

Every session is timed in interleaved rounds (a random order each round; per session the
median of a chunk of calls after two discarded warm-up calls); a figure is the median over
rounds, and a following block's difference is taken within each round (paired) before the
median, so a slow drift of a loaded machine hits both terms alike.

>>> table = build_latency_table("mobilenetv2", "digits", Target("ort-cpu", batch_sizes=(1,)),
...                             TableConfig(space={"width": [0.5]}, rounds=3))  # doctest: +SKIP
>>> table.predict(table.space.smallest())["ms"]  # doctest: +SKIP
0.21
"""

from __future__ import annotations

import copy
import datetime as _dt
import functools
import itertools
import json
import math
import os
import random
import statistics
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from .. import _console, _io
from .._provenance import run_info
from ..data import DataBundle, resolve_data
from ..config import check
from ..errors import ConfigError, SlimkitError
from ..export import export_onnx, fold_batchnorm
from ..measure import Target
from ..measure.backends import get_backend
from ..measure.timing import interleaved
from ._chain import block_plan, onnx_chain
from ._space import Arch, Family, Space, get_family, load_space

__all__ = ["LatencyTable", "TableConfig", "build_latency_table", "relative_error", "CHAIN_COPIES"]

FORMAT = 1
CHAIN_COPIES = 4  # following blocks chained after the first to measure one by difference


def _width_key(width: float) -> str:
    return f"{float(width):g}"


# ----------------------------------------------------------------------------- the table


class LatencyTable:
    """A measured latency table: ``blocks`` (key -> ms), ``fixed_ms`` (width -> ms) and what it
    was measured for (family, space, target, batch, threads, input shape). Plain data inside
    (``self.data``), saved as JSON.

    >>> table = LatencyTable.load("runs/mbv2-table.json")  # doctest: +SKIP
    >>> table.predict(arch)["ms"]  # doctest: +SKIP
    """

    def __init__(self, data: dict[str, Any]):
        self.data = data

    # what it was measured for
    @property
    def family(self) -> Family:
        return get_family(self.data["family"])

    @property
    def space(self) -> Space:
        return load_space(self.family, self.data["space"])

    @property
    def target(self) -> str:
        return self.data["target"]

    @property
    def batch(self) -> int:
        return int(self.data["batch"])

    @property
    def threads(self) -> int:
        return int(self.data["threads"])

    @property
    def input_shape(self) -> tuple[int, ...]:
        return tuple(self.data["input_shape"])

    @property
    def num_classes(self) -> int:
        return int(self.data["num_classes"])

    @classmethod
    def load(cls, path: str | Path) -> "LatencyTable":
        path = Path(path)
        if not path.exists():
            raise SlimkitError(f"latency table {path} does not exist; build one with slimkit latency-table "
                               "--family F --data D --target T --batch B --out FILE.")

        def parse(p: Path) -> LatencyTable:
            try:
                data = json.loads(p.read_text(encoding="utf-8"))
            except ValueError as e:
                raise SlimkitError(f"{p} is not a latency table (not valid JSON: {e}).") from None
            if not isinstance(data, dict) or data.get("kind") != "slimkit-latency-table":
                raise SlimkitError(f"{p} is not a slimkit latency table; build one with slimkit latency-table.")
            if data.get("format") != FORMAT:
                raise SlimkitError(f"{p} is a latency table of format {data.get('format')!r}; this slimkit reads "
                                   f"format {FORMAT}: build it again with slimkit latency-table.")
            problem = _table_problem(data)
            if problem:
                raise SlimkitError(f"latency table {p} is damaged ({problem}); build it again with slimkit "
                                   "latency-table.")
            return cls(data)

        return _io.read_file(path, "latency table", parse, expected="give the JSON file slimkit latency-table wrote")

    def save(self, path: str | Path) -> Path:
        return _io.write_json(path, self.data)

    def mismatches(self, *, family: str, space: Space, target: str, batch: int, threads: int,
                   input_shape: Sequence[int], num_classes: int) -> list[str]:
        """How this table differs from what a search needs ([] when it fits)."""
        want = {"family": family, "target": target, "batch": int(batch), "threads": int(threads),
                "input_shape": list(input_shape), "num_classes": int(num_classes)}
        out = [f"{k}: table {self.data.get(k)!r}, search {v!r}" for k, v in want.items() if self.data.get(k) != v]
        if not out and not self.covers(space):
            out.append("space: the search's space has choices the table did not measure")
        return out

    def covers(self, space: Space) -> bool:
        """Whether every architecture of ``space`` can be predicted (its choices are a subset)."""
        mine = self.space
        if not set(space.width) <= set(mine.width) or len(space.stages) != len(mine.stages):
            return False
        return all(set(v) <= set(m[k]) for st, m in zip(space.stages, mine.stages) for k, v in st.items())

    def predict(self, arch: Arch, *, model: nn.Module | None = None) -> dict[str, Any]:
        """Predicted latency (ms) of ``arch``: ``ms``, ``fixed_ms`` and each block's ``ms``."""
        fam = self.family
        _, plan = block_plan(fam, arch, self.input_shape, self.num_classes, model=model)
        fixed = self.data["fixed_ms"].get(_width_key(arch["width"]))
        if fixed is None:
            raise SlimkitError(f"the latency table has no fixed cost for width {arch['width']:g} (it measured widths "
                               f"{', '.join(self.data['fixed_ms'])}); build it again for this space.")
        blocks = []
        for b in plan:
            entry = self.data["blocks"].get(b["key"])
            if entry is None:
                raise SlimkitError(f"the latency table has no entry for block {b['name']} ({b['key']}): it was "
                                   "measured for another space or input shape; build it again with slimkit "
                                   "latency-table for this space.")
            blocks.append({"name": b["name"], "key": b["key"], "ms": entry["ms"]})
        total = fixed + sum(b["ms"] for b in blocks)
        return {"ms": total, "fixed_ms": fixed, "blocks": blocks}

    def fastest(self, space: Space | None = None) -> tuple[float, Arch]:
        """The smallest predicted latency over ``space`` (default: the table's), and its architecture.

        Exact, without enumerating the space: a stage's cost depends only on the width and
        that stage's knobs (its first block plus ``blocks - 1`` following ones).
        """
        space = space or self.space
        best: tuple[float, Arch] | None = None
        for width in space.width:
            wk = _width_key(width)
            total = self.data["fixed_ms"][wk]
            stages = []
            for s, entries in enumerate(self.data["stages"][wk]):
                options = []
                for e in entries:
                    knobs = {k: v for k, v in e["knobs"].items()}
                    if any(knobs[k] not in space.stages[s][k] for k in knobs):
                        continue
                    first = self.data["blocks"][e["first"]]["ms"]
                    nxt = self.data["blocks"][e["next"]]["ms"] if e.get("next") else 0.0
                    for b in space.stages[s].get("blocks", (1,)):
                        if b > 1 and not e.get("next"):
                            continue
                        options.append((first + (b - 1) * nxt, {**knobs, "blocks": b}))
                cost, choice = min(options, key=lambda o: o[0])
                total += cost
                stages.append({k: choice[k] for k in space.stages[s]})
            if best is None or total < best[0]:
                best = (total, {"width": float(width), "stages": stages})
        assert best is not None
        return best

    def describe(self) -> str:
        d = self.data
        return (f"latency table of {d['family']} on {d['target']} (batch {d['batch']}, {d['threads']} threads, input "
                f"{'x'.join(map(str, d['input_shape']))}): {len(d['blocks'])} blocks, widths "
                f"{', '.join(d['fixed_ms'])}")


def _is_int(v: Any, low: int = 1) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v >= low


def _is_ms(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


_TABLE_FIELDS: tuple[tuple[str, Callable[[Any], bool], str], ...] = (
    ("family", lambda v: isinstance(v, str), "a family name"),
    ("target", lambda v: isinstance(v, str), "a target name"),
    ("batch", _is_int, "a positive integer"),
    ("threads", lambda v: _is_int(v, 0), "an integer"),
    ("num_classes", _is_int, "a positive integer"),
    ("input_shape", lambda v: isinstance(v, list) and bool(v) and all(_is_int(d) for d in v),
     "a list of positive integers"),
    ("space", lambda v: isinstance(v, dict), "a mapping"),
    ("blocks", lambda v: isinstance(v, dict) and all(isinstance(e, dict) and _is_ms(e.get("ms")) for e in v.values()),
     "a mapping of block keys to {ms: ...}"),
    ("fixed_ms", lambda v: isinstance(v, dict) and all(_is_ms(x) for x in v.values()),
     "a mapping of widths to milliseconds"),
    ("stages", lambda v: isinstance(v, dict), "a mapping of widths to per-stage entries"),
)


def _table_problem(data: dict[str, Any]) -> str | None:
    """What is wrong with a latency table's content; None when it has the shape slimkit writes."""
    for key, ok, want in _TABLE_FIELDS:
        if key not in data:
            return f"it has no '{key}'"
        if not ok(data[key]):
            return f"'{key}' is not {want}"
    try:
        space = load_space(get_family(data["family"]), data["space"])
    except SlimkitError as e:
        return str(e)
    blocks = data["blocks"]
    for width in space.width:
        wk = _width_key(width)
        entries = data["stages"].get(wk)
        if wk not in data["fixed_ms"] or not isinstance(entries, list) or len(entries) != len(space.stages):
            return f"width {wk} has no fixed cost or no entry per stage"
        for s, stage in enumerate(entries):
            if not isinstance(stage, list) or not stage or not all(
                    isinstance(e, dict) and isinstance(e.get("knobs"), dict)
                    and set(e["knobs"]) == set(space.stages[s]) - {"blocks"}
                    and all(v in space.stages[s][k] for k, v in e["knobs"].items())
                    and isinstance(e.get("first"), str) and e["first"] in blocks
                    and (not e.get("next") or (isinstance(e["next"], str) and e["next"] in blocks))
                    for e in stage):
                return f"the entries of stage {s} at width {wk} are malformed"
    return None


def _reference_archs(space: Space, width: float) -> list[Arch]:
    """The whole networks measured at ``width``: each non-depth combination at full depth, and the shallowest."""
    per_stage = []
    for st in space.stages:
        others = {k: v for k, v in st.items() if k != "blocks"}
        per_stage.append([dict(zip(others, combo)) for combo in _product(list(others.values()))])
    n = max(len(p) for p in per_stage)
    archs: list[Arch] = []
    for c in range(n):
        archs.append({"width": float(width), "stages": [
            {**opts[c % len(opts)], "blocks": max(st.get("blocks", (1,)))}
            for opts, st in zip(per_stage, space.stages)]})
    shallow = space.smallest(width)
    if shallow not in archs:
        archs.append(shallow)
    # knob order as the space declares it
    return [{"width": a["width"], "stages": [{k: s[k] for k in st} for s, st in zip(a["stages"], space.stages)]}
            for a in archs]


def _product(lists: list[tuple[int, ...]]) -> list[tuple[int, ...]]:
    return list(itertools.product(*lists)) if lists else [()]


@dataclass(frozen=True)
class TableConfig:
    """What :func:`build_latency_table` measures and how long it times.

    ``space``: the family's default space (``None``), a narrower one (a :class:`Space`, data
    or a YAML file; a mapping with only some keys, e.g. ``{"width": [0.5]}``, narrows the
    default). ``rounds``: interleaved timing rounds; ``chunk_s``: seconds of calls per session
    and round. ``validate``: a number of random architectures of the space (or a list of them)
    exported and timed whole in the same rounds, to report how well the table predicts them.

    >>> TableConfig(space={"width": [0.5]}, rounds=3).rounds
    3
    """

    space: Space | dict[str, Any] | str | Path | None = None
    rounds: int = 7
    chunk_s: float = 0.05
    validate: int | Sequence[Arch] = 0

    def __post_init__(self) -> None:
        check(self.rounds >= 1, "rounds", f"must be >= 1, got {self.rounds}")
        check(self.chunk_s > 0, "chunk_s", f"must be > 0 seconds, got {self.chunk_s}")
        check(not isinstance(self.validate, int) or self.validate >= 0, "validate",
              f"must be >= 0 architectures, got {self.validate}")


def build_latency_table(
    family: str | Family,
    data: DataBundle | str = "digits",
    target: Target | str = "ort-cpu",
    config: TableConfig | None = None,
    *,
    validation_dir: str | Path | None = None,
    out: str | Path | None = None,
    seed: int = 0,
) -> LatencyTable:
    """Measure every block configuration of ``family``'s space once on ``target`` (see the module doc).

    ``target``: the runtime, the one batch size and the threads (a runtime name: batch 1, this
    machine's cores); ``config`` (:class:`TableConfig`): the space, the timing rounds and the
    validation architectures, reported in ``data["validation"]`` (their ONNX files are kept in
    ``validation_dir`` if given). With ``out``, the table is written there (JSON, atomically).

    >>> table = build_latency_table("mobilenetv2", "digits", "ort-cpu",
    ...                             TableConfig(space={"width": [0.5]}, rounds=3))  # doctest: +SKIP
    >>> sorted(table.data["fixed_ms"])  # doctest: +SKIP
    ['0.5']
    """
    fam = family if isinstance(family, Family) else get_family(family)
    tgt = Target(target, batch_sizes=(1,)) if isinstance(target, str) else target
    cfg = config or TableConfig()
    if len(tgt.batch_sizes) != 1:
        raise ConfigError(f"a latency table is measured at one batch size; got {list(tgt.batch_sizes)}.",
                          field="batch_sizes")
    backend = get_backend(tgt.runtime)
    runtime, batch, threads = tgt.runtime, tgt.batch_sizes[0], tgt.resolved_threads
    space, rounds, chunk_s, validate = cfg.space, cfg.rounds, cfg.chunk_s, cfg.validate
    sp = load_space(fam, space)
    bundle = resolve_data(data)
    input_shape, num_classes = tuple(bundle.input_shape), int(bundle.num_classes)
    if len(input_shape) != 3:
        raise SlimkitError(f"family '{fam.name}' is convolutional and needs image data shaped (C, H, W); "
                           f"{bundle.name} has examples shaped {input_shape}.")
    t_start = time.perf_counter()
    rng = np.random.default_rng(seed)

    runs: dict[str, Callable[[], Any]] = {}
    refs: list[dict[str, Any]] = []  # reference networks: arch, plan, session name
    firsts: dict[str, str] = {}  # first-block key -> session
    chains: dict[str, tuple[str, str]] = {}  # next-block key -> (chain session, its first block's session)
    stages: dict[str, list[list[dict[str, Any]]]] = {}
    keep: list[Any] = []  # runners stay open until timed

    def runner(module: nn.Module | None, onnx_model: Any | None, shape: Sequence[int], tmp: Path, tag: str):
        x = np.ascontiguousarray(rng.standard_normal((int(batch), *shape)).astype(np.float32))
        if backend.needs_onnx:
            import onnx

            path = tmp / f"{tag}.onnx"
            assert onnx_model is not None
            onnx.save(onnx_model, str(path))
            r = backend.prepare(None, path, threads)
        else:
            r = backend.prepare(module, None, threads)
        keep.append(r)
        return lambda: r(x)

    with tempfile.TemporaryDirectory(prefix="slimkit-latency-table-") as tmpdir:
        tmp = Path(tmpdir)
        archs = [a for w in sp.width for a in _reference_archs(sp, w)]
        _console.info(f"latency table for {fam.name} on {runtime} (batch {batch}, {threads} threads, input "
                      f"{'x'.join(map(str, input_shape))}): exporting {len(archs)} reference networks")
        with _console.progress() as bar:
            task = bar.add_task("reference networks", total=len(archs), info="")
            for r_i, arch in enumerate(archs):
                torch.manual_seed(seed + r_i)
                model, plan = block_plan(fam, arch, input_shape, num_classes)
                model.eval()
                example = torch.zeros((2, *input_shape))
                onnx_model = deploy = None
                if backend.needs_onnx:
                    import onnx

                    path = export_onnx(model, tmp / f"ref{r_i}.onnx", example)
                    onnx_model = onnx.load(str(path))
                    full = backend.prepare(None, path, threads)
                    keep.append(full)
                else:
                    deploy = fold_batchnorm(model, example)
                    full = backend.prepare(deploy, None, threads)
                    keep.append(full)
                xin = np.ascontiguousarray(rng.standard_normal((int(batch), *input_shape)).astype(np.float32))
                name = f"ref{r_i}"
                runs[name] = functools.partial(full, xin)
                refs.append({"arch": arch, "plan": plan, "session": name})
                wk = _width_key(arch["width"])
                stage_rows = stages.setdefault(wk, [[] for _ in sp.stages])
                for s in range(len(sp.stages)):
                    members = [b for b in plan if b["stage"] == s]
                    first = members[0]
                    nxt = members[1] if len(members) > 1 else None
                    knobs = {k: v for k, v in arch["stages"][s].items() if k != "blocks"}
                    row = next((e for e in stage_rows[s] if e["knobs"] == knobs), None)
                    if row is None:
                        stage_rows[s].append({"knobs": knobs, "first": first["key"], "next": nxt and nxt["key"]})
                    elif nxt and not row["next"]:
                        row["next"] = nxt["key"]
                    if first["key"] not in firsts:
                        sess = f"first{len(firsts)}"
                        if backend.needs_onnx:
                            chain = onnx_chain(onnx_model, [first["name"]], first["in_shape"], first["out_shape"])
                            runs[sess] = runner(None, chain, first["in_shape"], tmp, sess)
                        else:
                            mod = copy.deepcopy(deploy.get_submodule(first["name"]))
                            runs[sess] = runner(mod, None, first["in_shape"], tmp, sess)
                        firsts[first["key"]] = sess
                    if nxt and nxt["key"] not in chains:
                        sess = f"chain{len(chains)}"
                        names = [first["name"]] + [nxt["name"]] * CHAIN_COPIES
                        if backend.needs_onnx:
                            chain = onnx_chain(onnx_model, names, first["in_shape"], nxt["out_shape"])
                            runs[sess] = runner(None, chain, first["in_shape"], tmp, sess)
                        else:
                            mod = nn.Sequential(*[copy.deepcopy(deploy.get_submodule(n)) for n in names])
                            runs[sess] = runner(mod, None, first["in_shape"], tmp, sess)
                        chains[nxt["key"]] = (sess, firsts[first["key"]])
                bar.update(task, advance=1)
        if isinstance(validate, int):
            pick = random.Random(seed + 1)
            val_archs = [sp.random(pick) for _ in range(validate)]
        else:
            val_archs = [dict(a) for a in validate]
        val_sessions = []
        if val_archs:
            _console.info(f"exporting {len(val_archs)} validation networks (timed whole, in the same rounds)")
        for v_i, arch in enumerate(val_archs):
            sp.check(arch, where=f"validation architecture {v_i}")
            torch.manual_seed(seed + 10_000 + v_i)
            model = fam.build(arch, input_shape, num_classes).eval()
            example = torch.zeros((2, *input_shape))
            if backend.needs_onnx:
                where = Path(validation_dir) if validation_dir is not None else tmp
                r = backend.prepare(None, export_onnx(model, where / f"val{v_i}.onnx", example), threads)
            else:
                r = backend.prepare(fold_batchnorm(model, example), None, threads)
            keep.append(r)
            xin = np.ascontiguousarray(rng.standard_normal((int(batch), *input_shape)).astype(np.float32))
            runs[f"val{v_i}"] = functools.partial(r, xin)
            val_sessions.append((arch, f"val{v_i}"))
        _console.info(f"timing {len(runs)} sessions ({len(firsts)} first blocks, {len(chains)} chains, "
                      f"{len(refs)} whole networks) in {rounds} interleaved rounds")
        times = interleaved(runs, rounds=rounds, seconds=chunk_s, shuffle_seed=seed, label="latency table")
        for r in keep:
            r.close()

    def spread(values: list[float]) -> float:
        if len(values) < 2:
            return 0.0
        q1, med, q3 = np.percentile(values, [25, 50, 75])
        return float((q3 - q1) / med) if med > 0 else 0.0

    blocks: dict[str, dict[str, Any]] = {}
    for key, sess in firsts.items():
        blocks[key] = {"ms": statistics.median(times[sess]), "how": "alone (first of its stage)",
                       "spread": round(spread(times[sess]), 4)}
    for key, (sess, first_sess) in chains.items():
        diffs = [(c - f) / CHAIN_COPIES for c, f in zip(times[sess], times[first_sess])]
        blocks[key] = {"ms": statistics.median(diffs), "how": f"chain of {CHAIN_COPIES} minus the first alone",
                       "spread": round(spread(diffs), 4)}
    references = []
    residuals: dict[str, list[float]] = {}
    for ref in refs:
        measured = statistics.median(times[ref["session"]])
        summed = sum(blocks[b["key"]]["ms"] for b in ref["plan"])
        wk = _width_key(ref["arch"]["width"])
        residuals.setdefault(wk, []).append(measured - summed)
        references.append({"arch": ref["arch"], "measured_ms": measured, "blocks_ms": summed,
                           "residual_ms": measured - summed})
    fixed = {wk: statistics.median(v) for wk, v in residuals.items()}
    for ref in references:
        wk = _width_key(ref["arch"]["width"])
        ref["predicted_ms"] = fixed[wk] + ref["blocks_ms"]

    table = LatencyTable({
        "kind": "slimkit-latency-table",
        "format": FORMAT,
        "family": fam.name,
        "space": sp.to_data(),
        "space_digest": sp.digest(),
        "target": runtime,
        "batch": int(batch),
        "threads": threads,
        "input_shape": list(input_shape),
        "num_classes": num_classes,
        "data": bundle.name,
        "rounds": rounds,
        "chain_copies": CHAIN_COPIES,
        "blocks": blocks,
        "fixed_ms": fixed,
        "stages": stages,
        "references": references,
        "validation": None,
        "seconds": round(time.perf_counter() - t_start, 1),
        "machine_load": _loadavg(),
        **run_info(runtime, threads),
        "measured": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
    })
    if val_sessions:
        pairs = []
        for arch, sess in val_sessions:
            predicted, measured = table.predict(arch)["ms"], statistics.median(times[sess])
            pairs.append({"arch": arch, "predicted_ms": predicted, "measured_ms": measured,
                          "relative_error": relative_error(predicted, measured)})
        errors = [p["relative_error"] for p in pairs]
        table.data["validation"] = {"pairs": pairs, "mean_relative_error": sum(errors) / len(errors),
                                    "max_relative_error": max(errors),
                                    "how": "random architectures exported whole, timed in the same rounds"}
    if out is not None:
        table.save(out)
    return table


def _loadavg() -> list[float] | None:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except (AttributeError, OSError):
        return None


def relative_error(predicted: float, measured: float) -> float:
    return abs(predicted - measured) / measured if measured > 0 else math.inf
