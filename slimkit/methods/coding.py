"""Deep Compression (Han, Mao & Dally, 2016): pruning, k-means weight sharing, Huffman coding.

Top level API::

    res = deep_compress(model, data, DeepCompression(sparsity={"conv": 0.6, "fc": 0.92},
                                                     bits={"conv": 8, "fc": 5}), out="runs/dc")
    res.model, res.report["total"]["ratio"], res.path      # DIR/model.slim, DIR/result.json
    share_weights_(model, {"fc1": 5})                       # k-means weight sharing only, in place
    slimkit.load_packed("runs/dc/model.slim")               # the shared-weight model, bit for bit

The three stages, each on the layers with a weight matrix or kernel (convolutions and linear
layers; ``skip`` leaves some dense):

1. magnitude pruning to each layer's sparsity (:mod:`slimkit.methods.prune`, ``scope="layer"``),
   then fine-tuning with the masks held;
2. weight sharing: the layer's remaining weights are clustered by k-means (scikit-learn) into
   at most ``2**bits - 1`` shared values, the centroids initialised linearly between the
   smallest and largest weight, as the paper recommends; then the centroids are fine-tuned:
   after each optimizer step each centroid moves to the mean of its weights' updated values and
   every weight takes its centroid's value again (pruned weights stay zero);
3. coding: positions as relative indices of ``index_bits`` bits (with filler zeros for long
   runs), symbols and indices Huffman-coded per layer, written to the ``.slim`` format
   (:mod:`slimkit.export.packed`, ``docs/slim-format.md``).

``bits`` counts the symbol alphabet including the zero, so 5 bits give 31 shared values.
"""

from __future__ import annotations

import copy
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import numpy as np
import torch
from torch import nn

from .. import _console, _io
from ..config import check
from ..data import DataBundle
from ..errors import ConfigError, SlimkitError
from ..export.packed import CodedTensor, read_packed, write_packed
from ..layers import LayerSelection, family_of
from ..pipeline import AccuracyVerdict, Context, check_max_drop, Finetune, register_space, register_step, training_hints
from ..training import evaluate, fit
from .prune import Unstructured, finalize_, masks_of, prune_

__all__ = ["DeepCompression", "DeepCompressed", "deep_compress", "share_weights_", "SharedWeightsHook",
           "parse_layer_values", "paper_table"]

SCHEDULES = ("one-shot", "agp")
# a key of sparsity / bits / index_bits that names no coded layer
UNKNOWN_KEY = "unknown layer '{key}': use all, conv, fc, a layer name or a glob; the model's {what} are: {names}"
DEFAULTS = {"sparsity": 0.0, "bits": 8, "index_bits": 8}  # for a layer no key of the field covers


def coded_layers(model: nn.Module) -> dict[str, nn.Module]:
    """The layers Deep Compression codes: convolutions and linear layers, by module name."""
    return {n: m for n, m in model.named_modules()
            if n and family_of(m) and isinstance(getattr(m, "weight", None), nn.Parameter)}


def parse_layer_values(text: str, kind: type, what: str) -> dict[str, Any]:
    """``"conv=8,fc=5,fc3=6"`` -> ``{"conv": 8, "fc": 5, "fc3": 6}``; a bare ``"0.9"`` -> ``{"all": 0.9}``."""
    text = (text or "").strip()
    if not text:
        raise ConfigError(f"give {what} as a number or as key=value pairs like conv=8,fc=5", field=what)
    out: dict[str, Any] = {}
    for part in [p.strip() for p in text.split(",") if p.strip()]:
        key, sep, value = part.partition("=")
        if not sep:
            key, value = "all", part
        try:
            out[key.strip()] = kind(value.strip())
        except ValueError:
            raise ConfigError(f"'{part}' is not key={kind.__name__} (e.g. conv=8,fc=5 or 0.9)", field=what) from None
    return out


@dataclass
class DeepCompression:
    """Deep Compression: magnitude pruning, k-means weight sharing with centroid fine-tuning,
    Huffman-coded sparse storage in the ``.slim`` format, with exact byte accounting.

    ``sparsity``, ``bits`` and ``index_bits`` are per layer: keys ``all``, ``conv``, ``fc`` (by
    layer type), a module name or a glob (a name wins, then the longest glob, then the type, then
    ``all``; see :class:`slimkit.layers.LayerSelection`); ``sparsity`` may be one number.
    ``bits`` (1..8): symbol width of the shared weights (``2**bits - 1`` values plus zero);
    ``index_bits`` (1..8): width of the relative position indices. ``skip``: layers left dense
    (names, globs or blocks).
    ``prune_epochs`` fine-tune after pruning (``schedule`` ``agp`` prunes gradually during
    them), ``share_epochs`` fine-tune the centroids; ``lr`` / ``share_lr`` their learning rates;
    ``distill``: the model before compression teaches both fine-tunes. ``min_steps``: each
    fine-tune makes at least this many optimisation steps (a small data set gets more epochs;
    0: the epochs as given). On digits, 8 epochs of 10 steps at lr 1e-3 let lenet300 at sparsity
    0.9 fall from 0.964 to 0.58 test accuracy; 3,000 steps at 2e-3 keep it within 0.3-1.1 points
    (3 seeds). ``device``: where the
    fine-tunes run (``cpu``, ``cuda``...); the packed weights do not depend on it.
    """

    sparsity: float | dict[str, float] = field(default_factory=lambda: {"conv": 0.6, "fc": 0.92})
    bits: dict[str, int] = field(default_factory=lambda: {"conv": 8, "fc": 5})
    index_bits: dict[str, int] = field(default_factory=lambda: {"conv": 8, "fc": 5})
    skip: list[str] = field(default_factory=list)
    prune_epochs: int = 8
    share_epochs: int = 2
    schedule: str = "agp"
    lr: float = 2e-3
    share_lr: float = 2e-4
    distill: bool = True
    batch_size: int = 128
    max_batches: int | None = None
    min_steps: int = 3000
    seed: int = 0
    device: str = "cpu"

    def __post_init__(self) -> None:
        if isinstance(self.sparsity, (int, float)) and not isinstance(self.sparsity, bool):
            self.sparsity = {"all": float(self.sparsity)}
        check(isinstance(self.sparsity, dict) and bool(self.sparsity), "sparsity",
              "give one number or a mapping like {conv: 0.6, fc: 0.92}")
        for key, s in self.sparsity.items():
            check(isinstance(s, (int, float)) and 0 <= s < 1, "sparsity",
                  f"the sparsity of '{key}' must be in [0, 1) (the fraction of weights set to zero), got {s}")
        for name in ("bits", "index_bits"):
            values = getattr(self, name)
            check(isinstance(values, dict) and bool(values), name, "give a mapping like {conv: 8, fc: 5}")
            for key, b in values.items():
                check(isinstance(b, int) and not isinstance(b, bool) and 1 <= b <= 8, name,
                      f"the {name.replace('_', ' ')} of '{key}' must be an integer in 1..8, got {b!r}")
        check(self.prune_epochs >= 0, "prune_epochs", f"must be >= 0, got {self.prune_epochs}")
        check(self.share_epochs >= 0, "share_epochs", f"must be >= 0, got {self.share_epochs}")
        check(self.schedule in SCHEDULES, "schedule", f"got '{self.schedule}'; choose one of {', '.join(SCHEDULES)}")
        check(self.schedule != "agp" or self.prune_epochs >= 1, "schedule",
              "agp prunes gradually while fine-tuning: give prune_epochs >= 1 or use schedule: one-shot")
        check(0 < self.lr < 10, "lr", f"must be in (0, 10), got {self.lr}")
        check(0 < self.share_lr < 10, "share_lr", f"must be in (0, 10), got {self.share_lr}")
        check(self.batch_size >= 1, "batch_size", f"must be >= 1, got {self.batch_size}")
        check(self.max_batches is None or self.max_batches >= 1, "max_batches", f"must be >= 1 or null, got {self.max_batches}")
        check(self.min_steps >= 0, "min_steps", f"must be >= 0, got {self.min_steps}")

    def check_model(self, model: nn.Module) -> None:
        self.plan(model)

    def selection(self, field_name: str) -> LayerSelection:
        """The per-layer values of ``sparsity``, ``bits`` or ``index_bits`` (``all`` is the default), minus skip."""
        values = {("_default" if k == "all" else k): v for k, v in getattr(self, field_name).items()}
        return LayerSelection({"_default": DEFAULTS[field_name], **values}, skip=self.skip)

    def plan(self, model: nn.Module) -> dict[str, dict[str, Any]]:
        """Per coded layer: its type, sparsity, bits and index bits; unknown layer names are errors."""
        layers = coded_layers(model)
        chosen = {name: self.selection(name) for name in DEFAULTS}
        for name, sel in chosen.items():
            sel.check(layers, what="conv and linear layers", field=name, unknown=UNKNOWN_KEY,
                      skip_field="skip" if name == "sparsity" else None)
        plan = {}
        for name, mod in layers.items():
            if chosen["bits"].left_out(name, mod):
                continue
            value = {k: sel.value_for(name, mod) for k, sel in chosen.items()}
            plan[name] = {"type": family_of(mod), "sparsity": float(value["sparsity"]), "bits": int(value["bits"]),
                          "index_bits": int(value["index_bits"])}
        if not plan:
            raise SlimkitError("no layer is left to compress: the model has no conv or linear layer outside skip.")
        return plan

    def finetune(self, epochs: int, lr: float) -> Finetune:
        return Finetune(epochs=epochs, lr=lr, distill=self.distill, batch_size=self.batch_size,
                        max_batches=self.max_batches, min_steps=self.min_steps, seed=self.seed, device=self.device)


# ----------------------------------------------------------------------------- weight sharing


def _kmeans(values: np.ndarray, k: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """k-means of 1-D ``values`` with linear initialisation; returns (centroids float32, labels)."""
    from sklearn.cluster import KMeans

    k = max(1, min(k, len(np.unique(values))))
    init = np.linspace(values.min(), values.max(), k).reshape(-1, 1)  # (k, 1)
    km = KMeans(n_clusters=k, init=init, n_init=1, max_iter=300, random_state=seed)
    labels = km.fit_predict(values.reshape(-1, 1).astype(np.float64))
    centroids = km.cluster_centers_.reshape(-1).astype(np.float32)
    # drop empty clusters and renumber, so every stored value is used
    used = np.unique(labels)
    remap = np.full(k, -1, dtype=np.int64)
    remap[used] = np.arange(len(used))
    return centroids[used], remap[labels]


def _weight(model: nn.Module, name: str) -> torch.Tensor:
    """The weight of the layer ``name`` (a linear or convolution layer)."""
    return cast(torch.Tensor, model.get_submodule(name).weight)


class SharedWeightsHook:
    """A :func:`slimkit.training.fit` hook keeping each layer's weights on its shared values.

    After every optimizer step a centroid becomes the mean of its weights' updated values
    (the centroid's gradient step, averaged over its weights) and every weight takes its
    centroid's value; pruned weights (label -1) stay exactly zero.
    """

    def __init__(self, labels: dict[str, torch.Tensor], centroids: dict[str, torch.Tensor]):
        self.labels = labels  # per layer, shaped like its weight: cluster index, -1 where pruned
        self.centroids = centroids  # per layer: (k,) float32

    def apply_(self, model: nn.Module) -> None:
        with torch.no_grad():
            for name, lab in self.labels.items():
                w = _weight(model, name)
                lab = lab.to(w.device)
                keep = lab >= 0
                table = self.centroids[name].to(w.device, w.dtype)
                w.copy_(torch.where(keep, table[lab.clamp_min(0)], torch.zeros((), dtype=w.dtype)))

    def on_train_begin(self, model: nn.Module, total_steps: int) -> None:
        self.apply_(model)

    def on_step_end(self, model: nn.Module, step: int, total_steps: int) -> None:
        with torch.no_grad():
            for name, lab in self.labels.items():
                w = _weight(model, name).detach().reshape(-1).double().cpu()
                flat = lab.reshape(-1)
                keep = flat >= 0
                k = len(self.centroids[name])
                sums = torch.zeros(k, dtype=torch.float64).scatter_add_(0, flat[keep], w[keep])
                counts = torch.bincount(flat[keep], minlength=k)
                moved = counts > 0
                self.centroids[name][moved] = (sums[moved] / counts[moved]).float()
        self.apply_(model)

    def sync_(self, model: nn.Module) -> None:
        """Read the centroids back from the weights (exactly: a member's value), e.g. after
        ``fit`` restored its best epoch."""
        with torch.no_grad():
            for name, lab in self.labels.items():
                w = _weight(model, name).detach().reshape(-1).cpu()
                flat = lab.reshape(-1)
                idx = torch.nonzero(flat >= 0).reshape(-1)
                first = torch.full((len(self.centroids[name]),), -1, dtype=torch.long)
                first.scatter_reduce_(0, flat[idx], idx, reduce="amin", include_self=False)
                ok = first >= 0
                self.centroids[name][ok] = w[first[ok]].float()
        self.apply_(model)

    def on_train_end(self, model: nn.Module) -> None:
        self.sync_(model)


def share_weights_(model: nn.Module, bits: dict[str, int], *, seed: int = 0) -> SharedWeightsHook:
    """k-means weight sharing of the named layers, in place: each layer's non-zero weights take at
    most ``2**bits - 1`` shared values (linear initialisation). Returns the hook that keeps
    them shared while fine-tuning.

    >>> from slimkit.models import create_model
    >>> model = create_model("lenet300", input_shape=(1, 8, 8), num_classes=10)
    >>> hook = share_weights_(model, {"fc1": 3, "fc2": 3})
    >>> len(model.fc1.weight.unique())  # at most 7 shared values
    7
    """
    labels, centroids = {}, {}
    for name, b in bits.items():
        w = _weight(model, name).detach()
        flat = w.reshape(-1).float().numpy()
        nz = np.flatnonzero(flat != 0)
        lab = np.full(flat.shape, -1, dtype=np.int64)
        if len(nz):
            cent, l_nz = _kmeans(flat[nz], (1 << b) - 1, seed)
            lab[nz] = l_nz
        else:
            cent = np.zeros(0, np.float32)
        labels[name] = torch.from_numpy(lab).reshape(w.shape)
        centroids[name] = torch.from_numpy(cent.copy())
    hook = SharedWeightsHook(labels, centroids)
    hook.apply_(model)
    return hook


# ----------------------------------------------------------------------------- the pipeline


@dataclass
class DeepCompressed:
    """What :func:`deep_compress` returns: the weight-shared model, the report, the ``.slim`` path."""

    model: nn.Module
    report: dict[str, Any]
    path: Path | None


def _fmt_bytes(n: float) -> str:
    return f"{n / 1024:.1f} KB" if n >= 1024 else f"{n:.0f} B"


def _deep_compress_(model: nn.Module, data: DataBundle, cfg: DeepCompression, path: Path, *,
                    teacher: nn.Module | None = None, hooks: list[Any] | tuple[Any, ...] = ()) -> dict[str, Any]:
    """The pipeline, in place on ``model``; writes the ``.slim`` file to ``path``; returns the report."""
    plan = cfg.plan(model)
    if cfg.distill and teacher is None and (cfg.prune_epochs or cfg.share_epochs):
        teacher = copy.deepcopy(model).eval()
    teacher = teacher if cfg.distill else None
    acc_before = evaluate(model, data.x_test, data.y_test)
    report: dict[str, Any] = {"config": {k: v for k, v in cfg.__dict__.items()}, "plan": plan}

    # 1. pruning (masks held while fine-tuning)
    targets = {n: p["sparsity"] for n, p in plan.items() if p["sparsity"] > 0}
    if targets:
        prune_cfg = Unstructured(sparsity=0.0, scope="layer", layers=targets,
                                 schedule=cfg.schedule if cfg.prune_epochs else "one-shot",
                                 finetune=cfg.finetune(cfg.prune_epochs, cfg.lr) if cfg.prune_epochs else None)
        _console.info(f"deep compression 1/3: pruning {len(targets)} layers")
        pr = prune_(model, prune_cfg, data=data, teacher=teacher, hooks=list(hooks),
                    filter_fn=lambda module, name: name in targets)
        report["prune"] = {k: pr[k] for k in ("pruned_layers_sparsity", "finetune") if k in pr}
        if masks_of(model):
            finalize_(model)
    acc_pruned = evaluate(model, data.x_test, data.y_test)

    # 2. weight sharing + centroid fine-tuning
    _console.info("deep compression 2/3: k-means weight sharing "
                  + ", ".join(f"{n} {p['bits']}b" for n, p in list(plan.items())[:8]))
    hook = share_weights_(model, {n: p["bits"] for n, p in plan.items()}, seed=cfg.seed)
    acc_shared0 = evaluate(model, data.x_test, data.y_test)
    if cfg.share_epochs:
        ft = fit(model, data, cfg.finetune(cfg.share_epochs, cfg.share_lr), teacher=teacher,
                 hooks=[hook, *hooks], label="centroid fine-tune")
        ft.pop("history", None)
        report["share_finetune"] = ft
    hook.sync_(model)
    acc_after = evaluate(model, data.x_test, data.y_test)

    # 3. coding and the packed file
    _console.info("deep compression 3/3: Huffman coding, writing " + str(path))
    coded = {f"{n}.weight": CodedTensor.from_shared(_weight(model, n), p["bits"], p["index_bits"])
             for n, p in plan.items()}
    acct = write_packed(path, model, coded)
    _, state, _ = read_packed(path)
    own = model.state_dict()
    exact = all(_bit_equal(own[k], state[k]) for k in own)
    if not exact:
        raise SlimkitError("internal error: the packed model does not decode to the shared-weight model bit for bit.")
    report["layers"] = _layer_rows(model, plan, coded, acct)
    report["total"] = _totals(model, acct, report["layers"])
    report["accuracy"] = {"before": acc_before, "pruned": acc_pruned, "shared_before_finetune": acc_shared0,
                          "after": acc_after, "drop_points": round((acc_before - acc_after) * 100, 3)}
    report["bit_exact"] = exact
    return report


def _bit_equal(a: torch.Tensor, b: torch.Tensor) -> bool:
    if a.shape != b.shape or a.dtype != b.dtype:
        return False
    return torch.equal(a.detach().contiguous().reshape(-1).view(torch.uint8),
                       b.detach().contiguous().reshape(-1).view(torch.uint8))


def _layer_rows(model: nn.Module, plan: dict[str, Any], coded: dict[str, CodedTensor],
                acct: dict[str, Any]) -> dict[str, dict[str, Any]]:
    rows = {}
    for name, p in plan.items():
        c = coded[f"{name}.weight"]
        st = c.stats()
        rec = acct["tensors"][f"{name}.weight"]
        params = c.numel
        stored = rec["bytes"]
        fixed = (st["weight_fixed_bits"] + st["index_fixed_bits"] + 7) // 8 + rec["codebook_bytes"]
        rows[name] = {
            "type": p["type"], "params": params, "nonzero": st["nonzero"],
            "kept": round(st["nonzero"] / max(params, 1), 6), "bits": c.bits, "index_bits": c.index_bits,
            "centroids": st["centroids"], "entries": st["entries"], "fillers": st["fillers"],
            "weight_bits_per_entry": round(st["weight_huffman_bits"] / max(st["entries"], 1), 3),
            "index_bits_per_entry": round(st["index_huffman_bits"] / max(st["entries"], 1), 3),
            "bytes": {"weights": rec["weight_stream_bytes"], "index": rec["index_stream_bytes"],
                      "codebook": rec["codebook_bytes"], "tables": rec["table_bytes"],
                      "record": stored, "fixed_width": fixed},
            "entropy_bytes": {"weights": round(st["weight_entropy_bits"] / 8, 1),
                              "index": round(st["index_entropy_bits"] / 8, 1)},
            "dense_fp32_bytes": 4 * params,
            "ratio": round(4 * params / max(stored, 1), 2),
            "ratio_fixed_width": round(4 * params / max(fixed, 1), 2),
        }
    return rows


def _totals(model: nn.Module, acct: dict[str, Any], rows: dict[str, Any]) -> dict[str, Any]:
    params = sum(t.numel() for t in model.state_dict().values() if t.is_floating_point())
    dense = 4 * params
    raw = sum(v["bytes"] for v in acct["tensors"].values() if v["kind"] == "raw")
    coded = sum(r["bytes"]["record"] for r in rows.values())
    entropy = sum(r["entropy_bytes"]["weights"] + r["entropy_bytes"]["index"] for r in rows.values())
    streams = sum(r["bytes"]["weights"] + r["bytes"]["index"] for r in rows.values())
    return {
        "params": params,
        "dense_fp32_bytes": dense,
        "file_bytes": acct["file_bytes"],
        "coded_bytes": coded,
        "raw_bytes": raw,
        "header_bytes": acct["header_bytes"],
        "huffman_stream_bytes": streams,
        "entropy_bound_bytes": round(entropy, 1),
        "ratio": round(dense / acct["file_bytes"], 2),
        "ratio_coded_layers": round(sum(r["dense_fp32_bytes"] for r in rows.values()) / max(coded, 1), 2),
    }


def deep_compress(
    model: nn.Module,
    data: DataBundle,
    config: DeepCompression | None = None,
    *,
    out: str | Path | None = None,
    overwrite: bool = False,
    teacher: nn.Module | None = None,
    hooks: list[Any] | tuple[Any, ...] = (),
    max_accuracy_drop: float | None = 0.01,
) -> DeepCompressed:
    """Deep Compression of a copy of ``model`` (the input is not changed); see the module docs.

    With ``out``, writes ``out/model.slim`` and ``out/result.json`` (per-layer and total
    bytes, the ratio against the fp32 dense weights, the entropy bound of the stored symbols,
    test accuracy before and after). Returns the weight-shared model, the report and the path.
    Past ``max_accuracy_drop`` of test accuracy (a fraction; ``None``: no limit) everything is
    still written, but ``report["within_budget"]`` is false and ``report["accuracy"]["hints"]``
    says what the fine-tunes show (a loss that rose while the sparsity ramped, too few steps).

    >>> from slimkit.data import load_data
    >>> from slimkit.models import create_model
    >>> data = load_data("digits")
    >>> model = create_model("lenet300", input_shape=data.input_shape, num_classes=10)
    >>> res = deep_compress(model, data, DeepCompression(sparsity=0.8, bits={"fc": 4}, prune_epochs=1,
    ...                                                  share_epochs=0))
    >>> res.report["total"]["ratio"] > 10, res.report["bit_exact"]
    (True, True)
    """
    cfg = config or DeepCompression()
    if not isinstance(model, nn.Module):
        raise SlimkitError(f"deep_compress needs a torch.nn.Module, got {type(model).__name__}.")
    cfg.plan(model)  # unknown layers: before any work
    check_max_drop(max_accuracy_drop)
    out_dir = _io.prepare_out_dir(out, overwrite=overwrite) if out is not None else None
    net = copy.deepcopy(model)
    if teacher is None and cfg.distill:
        teacher = copy.deepcopy(model).eval()
    with tempfile.TemporaryDirectory(prefix="slimkit-dc-") as tmp:
        packed = (out_dir / "model.slim") if out_dir is not None else Path(tmp) / "model.slim"
        report = _deep_compress_(net, data, cfg, packed, teacher=teacher, hooks=hooks)
    path = packed if out_dir is not None else None  # a temporary file is gone
    report["data"] = data.name
    acc = report["accuracy"]
    fits = [(what, report.get(key) if key == "share_finetune" else report.get("prune", {}).get("finetune"))
            for what, key in (("pruning fine-tune", "prune"), ("centroid fine-tune", "share_finetune"))]
    verdict = AccuracyVerdict(acc["before"], acc["after"], max_accuracy_drop,
                              hints=training_hints([(w, r) for w, r in fits if isinstance(r, dict)]))
    acc.update(verdict.to_data())
    report["within_budget"] = verdict.within_budget
    if out_dir is not None:
        report["files"] = {"packed": str(out_dir / "model.slim"), "report": str(out_dir / "result.json")}
        _io.write_json(out_dir / "result.json", report)
    return DeepCompressed(net.eval(), report, path)


# ----------------------------------------------------------------------------- the paper's table


def paper_table(report: dict[str, Any]) -> tuple[list[str], list[list[str]]]:
    """Deep Compression's per-layer table (Han et al., Tables 2-3): headers and rows."""
    headers = ["layer", "#weights", "weights kept (P)", "weight bits (P+Q)", "weight bits (P+Q+H)",
               "index bits (P+Q)", "index bits (P+Q+H)", "bytes (P+Q+H)", "ratio (P+Q)", "ratio (P+Q+H)"]
    rows = []
    for name, r in report["layers"].items():
        rows.append([name, f"{r['params']:,}", f"{r['kept']:.1%}", str(r["bits"]), f"{r['weight_bits_per_entry']:.2f}",
                     str(r["index_bits"]), f"{r['index_bits_per_entry']:.2f}", f"{r['bytes']['record']:,}",
                     f"{r['ratio_fixed_width']:.1f}x", f"{r['ratio']:.1f}x"])
    t = report["total"]
    kept = sum(r["nonzero"] for r in report["layers"].values()) / max(sum(r["params"] for r in report["layers"].values()), 1)
    rows.append(["total (file)", f"{t['params']:,}", f"{kept:.1%}", "", "", "", "", f"{t['file_bytes']:,}", "",
                 f"**{t['ratio']:.1f}x**"])
    return headers, rows


# ----------------------------------------------------------------------------- recipe step


@register_step("deep_compress", DeepCompression, forbids={"exported", "quantized", "fake_quant"}, sets={"quantized"})
def _deep_compress_step(ctx: Context, cfg: DeepCompression) -> dict[str, Any]:
    """Deep Compression (prune, share weights by k-means, Huffman-code); reports the packed bytes."""
    path = ctx.new_path("model", ".slim")
    report = _deep_compress_(ctx.model, ctx.data, cfg, path, teacher=ctx.teacher, hooks=ctx.train_hooks())
    t = report["total"]
    _console.info(f"  packed: {_fmt_bytes(t['file_bytes'])} vs {_fmt_bytes(t['dense_fp32_bytes'])} fp32 dense "
                  f"({t['ratio']:.1f}x); accuracy {report['accuracy']['before']:.4f} -> {report['accuracy']['after']:.4f}")
    ctx.outputs["model.slim"] = path  # apply(out=DIR) writes DIR/model.slim
    report["packed_bytes"] = t["file_bytes"]
    report["packed_ratio"] = t["ratio"]
    return report


@register_space("deep_compress", order=65)
def _deep_compress_space(trial: Any) -> DeepCompression | None:
    if not trial.suggest_categorical("deep_compress.on", [False, True]):
        return None
    return DeepCompression(
        sparsity={"conv": trial.suggest_float("deep_compress.conv_sparsity", 0.3, 0.8),
                  "fc": trial.suggest_float("deep_compress.fc_sparsity", 0.6, 0.95)},
        bits={"conv": trial.suggest_int("deep_compress.conv_bits", 4, 8),
              "fc": trial.suggest_int("deep_compress.fc_bits", 3, 6)},
        prune_epochs=trial.suggest_int("deep_compress.prune_epochs", 1, 4),
        share_epochs=trial.suggest_int("deep_compress.share_epochs", 0, 2),
    )
