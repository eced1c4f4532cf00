"""Run provenance: when, with what, on which machine a result was made (stamped into every report)."""

from __future__ import annotations

import datetime as _dt
import os
import platform
from typing import Any

import torch

from . import __version__

__all__ = ["run_info"]


def run_info(target: str | None = None, threads: int | None = None) -> dict[str, Any]:
    """``created``, ``slimkit`` and ``torch`` versions, the machine, and the target if given."""
    return {
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "slimkit": __version__,
        "torch": torch.__version__,
        "machine": {"cpus": os.cpu_count(), "processor": platform.processor() or platform.machine()},
        **({"target": target} if target else {}),
        **({"threads": threads} if threads else {}),
    }
