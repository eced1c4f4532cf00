"""The option objects a search takes: how to search, where it lives, what compress may draw.

The Python API, the CLI (its flags are generated from these fields' metadata) and the study's
stored record use the same objects::

    compress(model, data, budget=Budget(max_accuracy_drop=0.01), target=Target(batch_sizes=(1, 64)),
             search=Search(trials=20, sampler="tpe"), store=Store(out="runs/x"), space=CompressSpace())
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..config import check

__all__ = ["Search", "Store", "CompressSpace", "OBJECTIVES", "SAMPLERS"]

OBJECTIVES = ("latency", "size", "accuracy")
SAMPLERS = ("tpe", "nsga2", "gp", "random", "grid")


@dataclass
class Search:
    """How to search: what "best" means, how many trials, which sampler, which seed.

    ``sampler`` is a name (``tpe``, ``nsga2``, ``gp``, ``random``, ``grid``) or an Optuna sampler
    object, used as is. ``timeout``: start no new trial after this many seconds. ``val_size``:
    judge trials on this many validation examples (a fixed subset; ``None``: all).
    """

    objective: str = field(default="latency", metadata={"flag": "--objective", "help":
                           "What 'best' means among the trials within budget: latency, size or accuracy."})
    trials: int = field(default=20, metadata={"flag": "--trials", "short": "-n", "help":
                        "Trials the study should hold (earlier runs' count; 0 only sets the study up for workers)."})
    timeout: float | None = field(default=None, metadata={"flag": "--timeout", "help":
                                  "Start no new trial after this many seconds."})
    sampler: Any = field(default="tpe", metadata={"flag": "--sampler", "type": str, "help":
                         "tpe, nsga2, gp, random or grid."})
    seed: int = field(default=0, metadata={"flag": "--seed", "help":
                      "Seed of the train/val/test split, of training and of the sampler."})
    val_size: int | None = field(default=None, metadata={"flag": "--val-size", "help":
                                 "Judge trials on this many validation examples (a fixed subset; default: all)."})
    verbose: bool = field(default=False, metadata={"flag": "--verbose", "short": "-v", "help":
                          "Show every step's output inside each trial."})

    def __post_init__(self) -> None:
        check(self.objective in OBJECTIVES, "objective",
              f"unknown objective '{self.objective}'; choose one of {', '.join(OBJECTIVES)}")
        check(not isinstance(self.sampler, str) or self.sampler in SAMPLERS, "sampler",
              f"unknown sampler '{self.sampler}'; choose one of {', '.join(SAMPLERS)}")
        check(self.trials >= 0, "trials", f"must be >= 0, got {self.trials}")
        check(self.timeout is None or self.timeout > 0, "timeout", f"must be > 0 seconds, got {self.timeout}")
        check(self.val_size is None or self.val_size >= 10, "val_size", f"must be >= 10 examples, got {self.val_size}")

    @property
    def sampler_name(self) -> str:
        """The sampler's name as the study records it (an object's class name)."""
        return self.sampler if isinstance(self.sampler, str) else type(self.sampler).__name__


@dataclass
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


@dataclass
class CompressSpace:
    """What ``compress`` may draw: which steps, how long a trial's fine-tunes may run.

    ``methods``: search only these steps (default: every step with a search space);
    ``finetune_batches``: cap on batches per fine-tune epoch in each trial; ``warm``: try each
    method alone in the first trials, before the sampler combines them.
    """

    methods: Sequence[str] | None = field(default=None, metadata={"flag": "--methods", "type": str, "help":
                                          "Search only these steps, comma separated (default: every step with a "
                                          "search space; see slimkit steps)."})
    finetune_batches: int | None = field(default=None, metadata={"flag": "--finetune-batches", "help":
                                         "Cap on batches per fine-tune epoch in each trial (quicker trials)."})
    warm: bool = field(default=True, metadata={"flag": "--warm-start/--no-warm-start", "help":
                       "Try each method alone in the first trials, before the sampler combines them."})

    def __post_init__(self) -> None:
        if isinstance(self.methods, str):
            self.methods = [m.strip() for m in self.methods.split(",") if m.strip()]
        check(self.finetune_batches is None or self.finetune_batches >= 1, "finetune_batches",
              f"must be >= 1, got {self.finetune_batches}")
