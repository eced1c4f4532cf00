"""The option objects a search takes: what it may cost, how to search, where it lives, what
compress may draw.

The Python API, the CLI (its flags are generated from these fields' metadata) and the study's
stored record use the same objects::

    compress(model, data, budget=Budget(max_accuracy_drop=0.01), target=Target(batch_sizes=(1, 64)),
             search=Search(trials=20, sampler="tpe"), store=Store(out="runs/x"), space=CompressSpace())
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..config import check
from ..errors import ConfigError

__all__ = ["Budget", "Search", "Store", "CompressSpace", "WorkerOptions", "OBJECTIVES", "SAMPLERS",
           "parse_latency"]

OBJECTIVES = ("latency", "size", "accuracy")
SAMPLERS = ("tpe", "nsga2", "gp", "random", "grid")
#: ``compress``'s finalists by default, and (in a smaller search) one per this many trials.
DEFAULT_FINALISTS = 3
TRIALS_PER_FINALIST = 5


def parse_latency(value: float | dict[int, float] | str | None) -> float | dict[int, float] | None:
    """``0.5`` (for the smallest batch size, resolved later), ``{1: 0.5, 64: 8}`` or the CLI's ``"1:0.5,64:8"``."""
    if value is None or value == "":
        return None
    if isinstance(value, dict):
        return {int(b): float(v) for b, v in value.items()}
    if isinstance(value, (int, float)):
        return float(value)
    text = str(value).strip()
    try:
        if ":" not in text:
            return float(text)
        out = {}
        for part in text.split(","):
            b, ms = part.split(":")
            out[int(b)] = float(ms)
        return out
    except ValueError:
        raise ConfigError(f"expected milliseconds like 0.5 (for the smallest batch size) or per batch size like "
                          f"1:0.5,64:8; got '{text}'.", field="max_latency_ms") from None


@dataclass(frozen=True)
class Budget:
    """What the compressed model may cost; every limit is a hard constraint.

    ``max_latency_ms``: a limit for the smallest batch size (a number), ``{batch: ms}`` per
    batch size, or the CLI's ``"1:0.5,64:8"``; a search resolves it against its target's batch
    sizes (:meth:`resolve`). ``min_throughput``: examples per second at the largest batch size;
    ``max_size_kb``: size of the exported artifact; ``max_accuracy_drop``: validation accuracy
    the model may lose, as a fraction (0.01 = 1 point); ``None`` leaves a limit free.

    >>> Budget(max_latency_ms=0.5).resolve((1, 64)).max_latency_ms
    {1: 0.5}
    """

    max_latency_ms: float | dict[int, float] | str | None = field(default=None, metadata={
        "flag": "--max-latency-ms", "type": str, "help":
        "Latency limit in ms for the smallest batch size (e.g. 0.5), or per batch size (e.g. 1:0.5,64:8)."})
    min_throughput: float | None = field(default=None, metadata={"flag": "--min-throughput", "help":
                                         "Examples per second the largest batch size must reach."})
    max_size_kb: float | None = field(default=None, metadata={"flag": "--max-size-kb", "help":
                                      "Size limit of the exported artifact (KB)."})
    max_accuracy_drop: float | None = field(default=0.01, metadata={"flag": "--max-accuracy-drop", "help":
                                            "Validation accuracy the model may lose, as a fraction (0.01 = 1 point)."})

    def __post_init__(self) -> None:
        object.__setattr__(self, "max_latency_ms", parse_latency(self.max_latency_ms))
        limits = self.max_latency_ms.items() if isinstance(self.max_latency_ms, dict) else \
            [(1, self.max_latency_ms)] if self.max_latency_ms is not None else []
        for b, ms in limits:
            check(b >= 1 and ms > 0, "max_latency_ms", f"batch sizes and limits must be positive, got {b}: {ms}")
        check(self.min_throughput is None or self.min_throughput > 0, "min_throughput",
              f"must be > 0 examples/s, got {self.min_throughput}")
        check(self.max_size_kb is None or self.max_size_kb > 0, "max_size_kb", f"must be > 0, got {self.max_size_kb}")
        check(self.max_accuracy_drop is None or 0 <= self.max_accuracy_drop <= 1, "max_accuracy_drop",
              f"must be a fraction in [0, 1] (0.01 = 1 point), got {self.max_accuracy_drop}")

    @property
    def latency_limits(self) -> dict[int, float]:
        """``{batch: ms}`` of a resolved budget (a single number is not resolved yet: resolve it first)."""
        if isinstance(self.max_latency_ms, float):
            raise ConfigError("a latency limit for the smallest batch size needs the batch sizes: "
                              "call budget.resolve(batch_sizes) first", field="max_latency_ms")
        return dict(self.max_latency_ms) if isinstance(self.max_latency_ms, dict) else {}

    def resolve(self, batch_sizes: Sequence[int]) -> "Budget":
        """This budget for these batch sizes: a single latency limit applies to the smallest one;
        every limited batch size must be measured."""
        sizes = tuple(int(b) for b in batch_sizes)
        lat = self.max_latency_ms
        if isinstance(lat, float):
            lat = {min(sizes): lat}
        for b in lat or {}:
            if b not in sizes:
                raise ConfigError(f"limits batch size {b}, which is not measured; measured batch sizes: "
                                  f"{', '.join(map(str, sizes))} (--batch).", field="max_latency_ms")
        return dataclasses.replace(self, max_latency_ms=lat)

    @classmethod
    def of(cls, batch_sizes: Sequence[int], **limits: Any) -> "Budget":
        """``Budget(**limits).resolve(batch_sizes)``."""
        return cls(**limits).resolve(batch_sizes)

    def to_data(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["max_latency_ms"] = {str(b): v for b, v in self.latency_limits.items()} if self.max_latency_ms else None
        return d

    @classmethod
    def from_data(cls, d: dict[str, Any]) -> "Budget":
        return cls(**d)

    def describe(self, batch_sizes: Sequence[int]) -> list[str]:
        out = [f"latency at batch {b} <= {ms:g} ms" for b, ms in sorted(self.latency_limits.items())]
        if self.min_throughput is not None:
            out.append(f"throughput at batch {max(batch_sizes)} >= {self.min_throughput:g} examples/s")
        if self.max_size_kb is not None:
            out.append(f"artifact size <= {self.max_size_kb:g} KB")
        if self.max_accuracy_drop is not None:
            out.append(f"validation accuracy drop <= {self.max_accuracy_drop * 100:g} pts")
        return out


@dataclass(frozen=True)
class Search:
    """How to search: what "best" means, how many trials, which sampler, which seed.

    ``objective``: ``None`` is the verb's own (``latency`` for compress, ``accuracy`` for nas).
    ``sampler`` is a name (``tpe``, ``nsga2``, ``gp``, ``random``, ``grid``) or an Optuna sampler
    object, used as is. ``timeout``: start no new trial after this many seconds;
    ``trial_timeout``: stop a trial running longer than this (recorded as failed). ``val_size``:
    judge trials on this many validation examples (a fixed subset; ``None``: all).
    """

    objective: str | None = field(default=None, metadata={"flag": "--objective", "help":
                                  "What 'best' means among the trials within budget: latency, size or accuracy "
                                  "(default: latency for compress, accuracy for nas)."})
    trials: int = field(default=20, metadata={"flag": "--trials", "short": "-n", "help":
                        "Trials the study should hold (earlier runs' count; 0 only sets the study up for workers)."})
    timeout: float | None = field(default=None, metadata={"flag": "--timeout", "help":
                                  "Start no new trial after this many seconds."})
    trial_timeout: float | None = field(default=None, metadata={"flag": "--trial-timeout", "help":
                                        "Stop a trial running longer than this many seconds (recorded as "
                                        "failed; the search goes on)."})
    sampler: Any = field(default="tpe", metadata={"flag": "--sampler", "type": str, "help":
                         "tpe, nsga2, gp, random or grid."})
    seed: int = field(default=0, metadata={"flag": "--seed", "help":
                      "Seed of the train/val/test split, of training and of the sampler."})
    val_size: int | None = field(default=None, metadata={"flag": "--val-size", "help":
                                 "Judge trials on this many validation examples (a fixed subset; default: all)."})
    verbose: bool = field(default=False, metadata={"flag": "--verbose", "short": "-v", "help":
                          "Show every step's output inside each trial."})

    def __post_init__(self) -> None:
        check(self.objective is None or self.objective in OBJECTIVES, "objective",
              f"unknown objective '{self.objective}'; choose one of {', '.join(OBJECTIVES)}")
        check(not isinstance(self.sampler, str) or self.sampler in SAMPLERS, "sampler",
              f"unknown sampler '{self.sampler}'; choose one of {', '.join(SAMPLERS)}")
        check(self.trials >= 0, "trials", f"must be >= 0, got {self.trials}")
        check(self.timeout is None or self.timeout > 0, "timeout", f"must be > 0 seconds, got {self.timeout}")
        check(self.trial_timeout is None or self.trial_timeout > 0, "trial_timeout",
              f"must be > 0 seconds, got {self.trial_timeout}")
        check(self.val_size is None or self.val_size >= 10, "val_size", f"must be >= 10 examples, got {self.val_size}")

    @property
    def sampler_name(self) -> str:
        """The sampler's name as the study records it (an object's class name)."""
        return self.sampler if isinstance(self.sampler, str) else type(self.sampler).__name__


@dataclass(frozen=True)
class Store:
    """Where a search lives: its output folder, its Optuna storage and study name.

    ``storage``: a database URL shared by workers (default: ``out/study.db``, SQLite);
    ``study``: the study's name (default: the output folder's name); ``overwrite``: start anew,
    deleting a previous search's study and results in ``out``.
    """

    out: str | Path = field(default="runs/compress", metadata={"flag": "--out", "short": "-o", "help":
                            "Folder for the study, the trials and the results."})
    storage: str | None = field(default=None, metadata={"flag": "--storage", "help":
                                "Optuna storage URL shared by workers, e.g. postgresql://user:pw@host:5432/db "
                                "(default: a SQLite file in --out)."})
    study: str | None = field(default=None, metadata={"flag": "--study", "help":
                              "Study name (default: the --out folder's name)."})
    overwrite: bool = field(default=False, metadata={"flag": "--overwrite", "help":
                            "Start a new search in --out, deleting the previous one's study and results."})

    @property
    def out_path(self) -> Path:
        return Path(self.out)

    @property
    def study_name(self) -> str:
        return self.study or self.out_path.resolve().name or "slimkit"


@dataclass(frozen=True)
class CompressSpace:
    """What ``compress`` may draw: which steps, how long a trial's fine-tunes may run.

    ``methods``: search only these steps (default: every step with a search space);
    ``finetune_batches``: cap on batches per fine-tune epoch in each trial; ``warm``: try each
    method alone in the first trials, before the sampler combines them. ``finalists``: the best
    candidates of the proxy Pareto front applied again with a full fine-tune of ``final_epochs``
    epochs (of at most ``final_batches`` batches; ``None``: whole epochs), the best within budget
    winning (see :meth:`finalist_count` for the default; 0: the proxy best wins, as before).
    """

    methods: Sequence[str] | None = field(default=None, metadata={"flag": "--methods", "type": str, "help":
                                          "Search only these steps, comma separated (default: every step with a "
                                          "search space; see slimkit steps)."})
    finetune_batches: int | None = field(default=None, metadata={"flag": "--finetune-batches", "help":
                                         "Cap on batches per fine-tune epoch in each trial (quicker trials)."})
    warm: bool = field(default=True, metadata={"flag": "--warm-start/--no-warm-start", "help":
                       "Try each method alone in the first trials, before the sampler combines them."})
    finalists: int | None = field(default=None, metadata={"flag": "--finalists", "help":
                                  "Candidates of the proxy Pareto front fine-tuned fully at the end; the best "
                                  "within budget wins (0: none; default: 3, one per 5 trials in a smaller search)."})
    final_epochs: int = field(default=10, metadata={"flag": "--final-epochs", "help":
                              "Epochs of each finalist's full fine-tune (distilled from the input model, "
                              "early stopping on validation)."})
    final_batches: int | None = field(default=None, metadata={"cli": False})  # a cap for quick tests

    def __post_init__(self) -> None:
        if isinstance(self.methods, str):
            object.__setattr__(self, "methods", [m.strip() for m in self.methods.split(",") if m.strip()])
        check(self.finetune_batches is None or self.finetune_batches >= 1, "finetune_batches",
              f"must be >= 1, got {self.finetune_batches}")
        check(self.finalists is None or self.finalists >= 0, "finalists",
              f"must be >= 0 (0: no final stage), got {self.finalists}")
        check(self.final_epochs >= 1, "final_epochs", f"must be >= 1, got {self.final_epochs}")
        check(self.final_batches is None or self.final_batches >= 1, "final_batches",
              f"must be >= 1, got {self.final_batches}")

    def finalist_count(self, trials: int) -> int:
        """How many finalists a search of ``trials`` trials takes: ``finalists``, or by default 3 (one
        per :data:`TRIALS_PER_FINALIST` trials in a smaller search, none under that many).

        >>> CompressSpace().finalist_count(20), CompressSpace().finalist_count(12), CompressSpace().finalist_count(4)
        (3, 2, 0)
        """
        if self.finalists is not None:
            return self.finalists
        return min(DEFAULT_FINALISTS, trials // TRIALS_PER_FINALIST)


@dataclass(frozen=True)
class WorkerOptions:
    """How a ``slimkit worker`` runs its trials beyond the study's own settings.

    ``sampler``: a name or an Optuna sampler object instead of the study's sampler (``None``:
    the study's); ``verbose``: show every step's output inside each trial; ``trial_timeout``:
    stop a trial running longer than this many seconds (``None``: the study's).
    """

    sampler: Any = field(default=None, metadata={"flag": "--sampler", "type": str, "help":
                         "Override the study's sampler for this worker."})
    verbose: bool = field(default=False, metadata={"flag": "--verbose", "short": "-v", "help":
                          "Show every step's output inside each trial."})
    trial_timeout: float | None = field(default=None, metadata={"flag": "--trial-timeout", "help":
                                        "Stop a trial running longer than this many seconds (default: the "
                                        "study's --trial-timeout)."})

    def __post_init__(self) -> None:
        check(not isinstance(self.sampler, str) or self.sampler in SAMPLERS, "sampler",
              f"unknown sampler '{self.sampler}'; choose one of {', '.join(SAMPLERS)}")
        check(self.trial_timeout is None or self.trial_timeout > 0, "trial_timeout",
              f"must be > 0 seconds, got {self.trial_timeout}")
