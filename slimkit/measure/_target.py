"""Where and how a model is measured: the runtime, the batch sizes, the threads, the timing cap."""

from __future__ import annotations

from dataclasses import dataclass, field

from ..config import check
from .backends import default_threads, target_names

__all__ = ["Target"]


@dataclass(frozen=True)
class Target:
    """The target a model must run on, and how it is timed there.

    ``runtime``: ``ort-cpu`` (ONNX Runtime) or ``torch-cpu`` (eager PyTorch); ``batch_sizes``:
    the batch sizes timed; ``threads``: the runtime's thread count (``None``: this machine's
    cores); ``max_seconds``: time cap per batch size; ``layers``: also profile each layer.

    >>> Target("ort-cpu", batch_sizes=(1, 64), threads=2).resolved_threads
    2
    """

    runtime: str = field(default="ort-cpu", metadata={"flag": "--target", "short": "-t", "help":
                         "Where the model must run: ort-cpu (ONNX Runtime) or torch-cpu (eager PyTorch)."})
    batch_sizes: tuple[int, ...] = field(default=(1, 64), metadata={"flag": "--batch", "short": "-b", "help":
                                         "Batch sizes to time, comma separated."})
    threads: int | None = field(default=None, metadata={"flag": "--threads", "help":
                                "Threads for the target runtime (default: this machine's cores)."})
    max_seconds: float = field(default=2.0, metadata={"flag": "--max-seconds", "help":
                               "Time cap per batch size for latency measurement."})
    layers: bool = field(default=True, metadata={"cli": False})

    def __post_init__(self) -> None:
        check(self.runtime in target_names(), "runtime",
              f"unknown target '{self.runtime}'; choose one of {', '.join(target_names())}")
        sizes = tuple(int(b) for b in self.batch_sizes)
        check(bool(sizes) and all(b >= 1 for b in sizes), "batch_sizes",
              f"batch sizes must be at least 1, got {list(self.batch_sizes)}")
        object.__setattr__(self, "batch_sizes", sizes)
        check(self.threads is None or self.threads >= 1, "threads",
              f"must be >= 1 (the runtime's threads must be at least 1), got {self.threads}")
        check(self.max_seconds > 0, "max_seconds", f"must be > 0 seconds, got {self.max_seconds}")

    @property
    def resolved_threads(self) -> int:
        """The thread count, this machine's cores when none was given."""
        return int(self.threads or default_threads())
