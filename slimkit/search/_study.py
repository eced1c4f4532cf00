"""Where a search lives: its Optuna storage, the study, and what the study remembers.

The default storage is a SQLite file in the output folder (``DIR/study.db``), so every search
is resumable: the same command again loads the study and goes on. ``--storage
postgresql://...`` lets several processes or machines share one study; ``slimkit worker``
joins it knowing only the storage and the study name, because the study holds the whole
search configuration (model, weights, data, target, budget...) and the baseline figures in
its user attributes.

Heartbeats mark a trial whose process died (SIGKILL, a lost machine) as failed once it has
been silent for :data:`GRACE_S` seconds; that trial is then retried once with the same
parameters. A trial's completion is one database transaction, so a kill at any moment loses
no completed trial.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import re
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..config import check
from ..errors import ConfigError, SlimkitError

__all__ = ["Budget", "SearchConfig", "OBJECTIVES", "SAMPLERS", "DIRECTIONS", "METRICS", "open_storage",
           "default_storage", "redact", "file_sha256", "validation_subset"]

STUDY_ATTR = "slimkit_search"
BASELINE_ATTR = "slimkit_baseline"
FORMAT = 1
OBJECTIVES = ("latency", "size", "accuracy")
SAMPLERS = ("tpe", "nsga2", "gp", "random", "grid")
# The study's objectives (a Pareto front): latency relative to the baseline (geometric mean
# over the batch sizes), artifact size, validation accuracy.
METRICS = ("latency_ratio", "size_kb", "val_accuracy")
DIRECTIONS = ("minimize", "minimize", "maximize")
HEARTBEAT_S = 5
GRACE_S = 20
FINISHED = ("COMPLETE", "PRUNED", "FAIL")


@dataclass
class Budget:
    """What the compressed model may cost; every limit is a hard constraint.

    ``max_latency_ms``: a limit for the smallest batch size, or ``{batch: ms}`` per batch
    size; ``min_throughput``: examples per second at the largest batch size;
    ``max_size_kb``: size of the exported artifact; ``max_accuracy_drop``: validation
    accuracy the model may lose, as a fraction (0.01 = 1 point); ``None`` leaves it free.
    """

    max_latency_ms: dict[int, float] | None = None
    min_throughput: float | None = None
    max_size_kb: float | None = None
    max_accuracy_drop: float | None = 0.01

    def __post_init__(self) -> None:
        if isinstance(self.max_latency_ms, (int, float)):
            raise ConfigError("give a mapping {batch size: ms}; Budget.of() takes a single number",
                              field="max_latency_ms")
        if self.max_latency_ms is not None:
            self.max_latency_ms = {int(b): float(ms) for b, ms in self.max_latency_ms.items()}
            for b, ms in self.max_latency_ms.items():
                check(b >= 1 and ms > 0, "max_latency_ms", f"batch sizes and limits must be positive, got {b}: {ms}")
        check(self.min_throughput is None or self.min_throughput > 0, "min_throughput",
              f"must be > 0 examples/s, got {self.min_throughput}")
        check(self.max_size_kb is None or self.max_size_kb > 0, "max_size_kb", f"must be > 0, got {self.max_size_kb}")
        check(self.max_accuracy_drop is None or 0 <= self.max_accuracy_drop <= 1, "max_accuracy_drop",
              f"must be a fraction in [0, 1] (0.01 = 1 point), got {self.max_accuracy_drop}")

    @classmethod
    def of(cls, batch_sizes: tuple[int, ...], *, max_latency_ms: float | dict[int, float] | str | None = None,
           min_throughput: float | None = None, max_size_kb: float | None = None,
           max_accuracy_drop: float | None = 0.01) -> "Budget":
        """Build a budget for these batch sizes; a single latency limit applies to the smallest one."""
        lat = parse_latency(max_latency_ms, batch_sizes)
        budget = cls(lat, min_throughput, max_size_kb, max_accuracy_drop)
        for b in budget.max_latency_ms or {}:
            if b not in batch_sizes:
                raise ConfigError(f"limits batch size {b}, which is not measured; measured batch sizes: "
                                  f"{', '.join(map(str, batch_sizes))} (--batch).", where="--max-latency-ms")
        return budget

    def to_data(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        if d["max_latency_ms"] is not None:
            d["max_latency_ms"] = {str(b): v for b, v in d["max_latency_ms"].items()}
        return d

    @classmethod
    def from_data(cls, d: dict[str, Any]) -> "Budget":
        d = dict(d)
        if d.get("max_latency_ms") is not None:
            d["max_latency_ms"] = {int(b): v for b, v in d["max_latency_ms"].items()}
        return cls(**d)

    def describe(self, batch_sizes: tuple[int, ...]) -> list[str]:
        out = []
        for b, ms in sorted((self.max_latency_ms or {}).items()):
            out.append(f"latency at batch {b} <= {ms:g} ms")
        if self.min_throughput is not None:
            out.append(f"throughput at batch {max(batch_sizes)} >= {self.min_throughput:g} examples/s")
        if self.max_size_kb is not None:
            out.append(f"artifact size <= {self.max_size_kb:g} KB")
        if self.max_accuracy_drop is not None:
            out.append(f"validation accuracy drop <= {self.max_accuracy_drop * 100:g} pts")
        return out


def parse_latency(value: float | dict[int, float] | str | None, batch_sizes: tuple[int, ...]) -> dict[int, float] | None:
    """``0.5`` (smallest batch size), ``{1: 0.5, 64: 8}`` or the CLI's ``"1:0.5,64:8"``."""
    if value is None or value == "":
        return None
    if isinstance(value, dict):
        return {int(b): float(v) for b, v in value.items()}
    if isinstance(value, (int, float)):
        return {min(batch_sizes): float(value)}
    text = str(value).strip()
    try:
        if ":" not in text:
            return {min(batch_sizes): float(text)}
        out = {}
        for part in text.split(","):
            b, ms = part.split(":")
            out[int(b)] = float(ms)
        return out
    except ValueError:
        raise ConfigError(f"expected milliseconds like 0.5 (for the smallest batch size) or per batch size like "
                          f"1:0.5,64:8; got '{text}'.", where="--max-latency-ms") from None


@dataclass
class SearchConfig:
    """Everything a process needs to run trials of a study; stored in the study."""

    model: str | None
    weights: str | None
    weights_sha256: str | None
    data: str
    target: str
    batch_sizes: list[int]
    threads: int
    budget: dict[str, Any]
    seed: int = 0
    trust_pickle: bool = False
    objective: str = "latency"
    max_seconds: float = 1.0
    finetune_batches: int | None = None
    val_size: int | None = None
    methods: list[str] | None = None
    out: str | None = None
    format: int = FORMAT
    extra: dict[str, Any] = field(default_factory=dict)

    # What makes two searches the same search: every trial's figures depend on these.
    IDENTITY = ("model", "weights_sha256", "data", "seed", "target", "batch_sizes", "threads", "budget", "val_size")

    def to_data(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_data(cls, d: dict[str, Any]) -> "SearchConfig":
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})

    def differences(self, other: "SearchConfig") -> list[str]:
        """What differs from the stored ``other``, e.g. ``max_accuracy_drop: 0.01 (stored) vs 0.02 (now)``."""
        out = []
        for k in self.IDENTITY:
            mine, theirs = getattr(self, k), getattr(other, k)
            if mine == theirs:
                continue
            if isinstance(mine, dict) and isinstance(theirs, dict):
                out += [f"{sub}: {theirs.get(sub)!r} (stored) vs {mine.get(sub)!r} (now)"
                        for sub in sorted(set(mine) | set(theirs)) if mine.get(sub) != theirs.get(sub)]
            else:
                out.append(f"{k}: {theirs!r} (stored) vs {mine!r} (now)")
        return out

    @property
    def budget_obj(self) -> Budget:
        return Budget.from_data(self.budget)


def file_sha256(path: str | Path | None) -> str | None:
    if path is None:
        return None
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def default_storage(out: Path) -> str:
    return f"sqlite:///{(Path(out) / 'study.db').resolve()}"


def redact(url: str) -> str:
    """The storage URL without its password, for messages and files."""
    return re.sub(r"(//[^:/@]+:)[^@/]*@", r"\1***@", url)


def open_storage(url: str) -> Any:
    """An Optuna RDB storage with heartbeats (stale trials fail, then retry once)."""
    import optuna

    if not re.match(r"^(sqlite|postgresql|postgres|mysql)(\+\w+)?://", url):
        raise SlimkitError(f"--storage must be a database URL such as postgresql://user:password@host:5432/db or "
                           f"sqlite:///path/study.db; got '{redact(url)}'.")
    url = re.sub(r"^postgres://", "postgresql://", url)
    kwargs: dict[str, Any] = {}
    if url.startswith("sqlite"):
        kwargs["connect_args"] = {"timeout": 60}  # several processes may share one file
    else:
        kwargs["pool_pre_ping"] = True
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return optuna.storages.RDBStorage(
                url, engine_kwargs=kwargs, heartbeat_interval=HEARTBEAT_S, grace_period=GRACE_S,
                heartbeat_stale_trial_callback=optuna.storages.RetryHeartbeatStaleTrialCallback(max_retry=1))
    except ImportError as e:
        raise SlimkitError(f"cannot open the storage {redact(url)}: {e} (PostgreSQL needs the 'psycopg' "
                           "package: pip install 'psycopg[binary]').") from None
    except Exception as e:  # sqlalchemy's OperationalError and friends
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise SlimkitError(f"cannot open the storage {redact(url)}: {first}. Check that the database server runs, "
                           "that the URL's host, port, user and database are right, and that it accepts this "
                           "machine.") from None


def study_names(storage: Any) -> list[str]:
    import optuna

    with contextlib.suppress(Exception):
        return [s.study_name for s in optuna.get_all_study_summaries(storage, include_best_trial=False)]
    return []


def validation_subset(data: Any, size: int | None, seed: int) -> Any:
    """``data`` with at most ``size`` validation examples (a fixed random subset, by ``seed``).

    Trials are judged on the validation split after every fine-tune epoch; on a large split a
    subset makes trials quicker (at the price of a noisier accuracy: about
    ``sqrt(p (1 - p) / size)``). The test split, which the final figures use, is untouched.
    """
    if size is None or size >= len(data.x_val):
        return data
    import torch

    idx = torch.randperm(len(data.x_val), generator=torch.Generator().manual_seed(seed + 104729))[:size]
    return dataclasses.replace(data, x_val=data.x_val[idx], y_val=data.y_val[idx])
