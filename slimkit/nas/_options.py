"""What an architecture search searches (:class:`NasSpace`): a family's space, the teacher, the
latency table, and how each candidate trains. The budget, target, search and store options
are the ``compress`` search's (:mod:`slimkit.search`)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from torch import nn

from ..config import check
from ..models import ModelRef
from ._space import Family, Space, get_family
from ._table import LatencyTable

__all__ = ["NasSpace"]


@dataclass(frozen=True)
class NasSpace:
    """The architectures ``nas`` searches and how each candidate is trained and predicted.

    ``family``: an architecture family (``mobilenetv2``, ``resnet``, or a registered one);
    ``space``: its space narrowed (a :class:`Space`, a mapping over the default, or a YAML
    file; default: the family's); ``teacher``: the model each candidate is distilled from (a
    spec, a :class:`~slimkit.models.ModelRef` with its weights, or a module; ``None``: train on
    the labels); ``latency_table``: a table from ``slimkit latency-table`` (default: reuse or
    build one in the output folder, timed in ``table_rounds`` rounds); ``proxy_epochs`` /
    ``proxy_batches``: each candidate's brief training; ``final_epochs`` / ``final_batches``:
    the best architecture's full training (0 epochs: keep it as the search trained it); ``lr``.

    >>> NasSpace("mobilenetv2", space={"width": [0.5]}, proxy_epochs=1).family_obj.name
    'mobilenetv2'
    """

    family: str | Family = field(default="mobilenetv2", metadata={"flag": "--family", "short": "-f", "type": str,
                                 "help": "Architecture family: mobilenetv2 or resnet (slimkit.nas.family_names())."})
    space: Space | dict[str, Any] | str | Path | None = field(default=None, metadata={"flag": "--space", "type": Path,
                                                              "help": "YAML file narrowing the family's space (width, "
                                                              "and per stage blocks / kernel / expand choices)."})
    teacher: nn.Module | str | ModelRef | None = field(default=None, metadata={"flag": "--teacher", "type": str,
                                                       "help": "Model that teaches each candidate (distillation): "
                                                       "zoo:NAME, package.module:function or FILE.pt."})
    latency_table: LatencyTable | str | Path | None = field(default=None, metadata={
        "flag": "--latency-table", "type": Path,
        "help": "A table from slimkit latency-table (default: reuse or build one in --out)."})
    proxy_epochs: int = field(default=2, metadata={"flag": "--proxy-epochs", "help":
                              "Epochs each candidate trains in the search."})
    proxy_batches: int | None = field(default=50, metadata={"flag": "--proxy-batches", "help":
                                      "Cap on batches per proxy epoch."})
    final_epochs: int = field(default=10, metadata={"flag": "--final-epochs", "help":
                              "Epochs the best architecture trains at the end (0: keep it as the search trained it)."})
    final_batches: int | None = field(default=None, metadata={"cli": False})
    lr: float = field(default=2e-3, metadata={"cli": False})  # the CLI's --lr is TrainConfig's (declared once)
    table_rounds: int = field(default=7, metadata={"flag": "--table-rounds", "help":
                              "Timing rounds when the table is built here."})

    def __post_init__(self) -> None:
        check(self.proxy_epochs >= 1, "proxy_epochs", f"must be >= 1, got {self.proxy_epochs}")
        check(self.proxy_batches is None or self.proxy_batches >= 1, "proxy_batches",
              f"must be >= 1, got {self.proxy_batches}")
        check(self.final_epochs >= 0, "final_epochs",
              f"must be >= 0 (0: keep the best candidate as the search trained it), got {self.final_epochs}")
        check(self.final_batches is None or self.final_batches >= 1, "final_batches",
              f"must be >= 1, got {self.final_batches}")
        check(0 < self.lr < 10, "lr", f"must be in (0, 10), got {self.lr}")
        check(self.table_rounds >= 1, "table_rounds", f"must be >= 1, got {self.table_rounds}")

    @property
    def family_obj(self) -> Family:
        """The family (an unknown name is an error naming the known ones)."""
        return self.family if isinstance(self.family, Family) else get_family(self.family)
