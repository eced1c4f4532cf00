"""CLI commands of the method families; each module adds its commands to ``slimkit.cli.app``.

A family's commands live in their own module here (``prune.py``, ``quantize.py``, ...) and
are imported below, so ``slimkit --help`` lists them all. Keep imports of heavy libraries
inside the command functions.
"""

import importlib
import pkgutil


def load_all() -> None:
    for info in pkgutil.iter_modules(__path__):
        if not info.name.startswith("_"):
            importlib.import_module(f"{__name__}.{info.name}")
