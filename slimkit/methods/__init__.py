"""Compression methods, one module per family; importing this package registers their steps."""

from . import core  # noqa: F401  finetune, export
