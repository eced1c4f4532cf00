"""What a study remembers: the typed record of its search, stored in its user attributes.

A process that joins a study (``slimkit worker``) knows only the storage and the study's name:
everything else (kind of search, model, data, target, budget, sampler, and for an architecture
search its family, space and training settings) is this record, stored under
:data:`STUDY_ATTR` as plain data.

>>> rec = SearchRecord(kind="compress", model="zoo:lenet5", data="digits", batch_sizes=[1, 64])
>>> SearchRecord.from_data(rec.to_data()) == rec
True
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from ..measure import Target
from ._options import Budget

__all__ = ["SearchRecord", "NasRecord", "STUDY_ATTR", "BASELINE_ATTR", "FORMAT", "KINDS", "METRICS", "DIRECTIONS",
           "FINISHED", "RESULT_FILES"]

STUDY_ATTR = "slimkit_search"
BASELINE_ATTR = "slimkit_baseline"
FORMAT = 2
KINDS = ("compress", "nas")
# The study's objectives (a Pareto front): latency relative to the baseline (geometric mean
# over the batch sizes), artifact size, validation accuracy.
METRICS = ("latency_ratio", "size_kb", "val_accuracy")
DIRECTIONS = ("minimize", "minimize", "maximize")
FINISHED = ("COMPLETE", "PRUNED", "FAIL")
RESULT_FILES = ("best.onnx", "best.safetensors", "best_recipe.yaml", "trials.csv", "result.json", "report.html")


@dataclass
class NasRecord:
    """An architecture search's own settings (``slimkit nas``), as its study stores them."""

    family: str
    space: dict[str, Any]
    teacher: bool = False
    proxy_epochs: int = 2
    proxy_batches: int | None = 50
    lr: float = 2e-3
    final_epochs: int = 10
    final_batches: int | None = None
    table_digest: str | None = None
    baseline_is: str = "teacher"

    # every trained candidate's figures depend on these
    IDENTITY = ("family", "space", "teacher", "proxy_epochs", "proxy_batches", "lr")


@dataclass
class SearchRecord:
    """Everything a process needs to run trials of a study; stored in the study."""

    kind: str = "compress"
    model: str | None = None
    weights: str | None = None
    weights_sha256: str | None = None
    data: str = "digits"
    target: str = "ort-cpu"
    batch_sizes: list[int] = field(default_factory=lambda: [1, 64])
    threads: int = 1
    budget: dict[str, Any] = field(default_factory=lambda: Budget().to_data())
    seed: int = 0
    trust_pickle: bool = False
    objective: str = "latency"
    sampler: str = "tpe"
    max_seconds: float = 1.0
    finetune_batches: int | None = None
    val_size: int | None = None
    methods: list[str] | None = None
    out: str | None = None
    trial_timeout: float | None = None
    nas: NasRecord | None = None
    format: int = FORMAT

    # What makes two searches the same search: every trial's figures depend on these.
    IDENTITY = ("model", "weights_sha256", "data", "seed", "target", "batch_sizes", "threads", "budget", "val_size")

    def to_data(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_data(cls, d: dict[str, Any]) -> "SearchRecord":
        names = {f.name for f in dataclasses.fields(cls)}
        kept = {k: v for k, v in d.items() if k in names}
        if kept.get("nas") is not None:
            kept["nas"] = NasRecord(**kept["nas"])
        return cls(**kept)

    def differences(self, other: "SearchRecord") -> list[str]:
        """What differs from the stored ``other``, e.g. ``max_accuracy_drop: 0.01 (stored) vs 0.02 (now)``."""
        pairs = [(k, getattr(self, k), getattr(other, k)) for k in self.IDENTITY]
        if self.nas is not None and other.nas is not None:
            pairs += [(k, getattr(self.nas, k), getattr(other.nas, k)) for k in NasRecord.IDENTITY]
        out = []
        for k, mine, theirs in pairs:
            if mine == theirs:
                continue
            if isinstance(mine, dict) and isinstance(theirs, dict) and k == "budget":
                out += [f"{sub}: {theirs.get(sub)!r} (stored) vs {mine.get(sub)!r} (now)"
                        for sub in sorted(set(mine) | set(theirs)) if mine.get(sub) != theirs.get(sub)]
            else:
                out.append(f"{k}: {theirs!r} (stored) vs {mine!r} (now)")
        if [d.split(":")[0] for d in out] == ["weights_sha256"] and self.model is None:
            out = []  # a Python model object saved again: the same spec-less model
        return out

    @property
    def budget_obj(self) -> Budget:
        return Budget.from_data(self.budget)

    @property
    def target_obj(self) -> Target:
        """The target each trial's artifact is measured on (no per-layer profile)."""
        return Target(self.target, tuple(self.batch_sizes), self.threads, self.max_seconds, layers=False)
