"""Compression methods, one module per family; importing this package registers their steps.

Every module here is imported (so its ``register_step`` / ``register_space`` /
``register_structure_op`` calls run); adding a family is adding a module.
"""

import importlib
import pkgutil

for _info in sorted(pkgutil.iter_modules(__path__), key=lambda i: (i.name != "core", i.name)):
    if not _info.name.startswith("_"):
        importlib.import_module(f"{__name__}.{_info.name}")
