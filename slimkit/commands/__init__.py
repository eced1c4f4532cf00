"""The CLI's commands, one module per family, all registered on one typer app.

``_app`` holds the app, the shared helpers and the option generator (flags declared once, on
the option objects' fields); each module below adds its commands to the app when imported.
A new family: a module here using :func:`~slimkit.commands._app.command`, and one import line
below. :mod:`slimkit.cli` is the entry point.
"""

from . import core, distill, nas, prune, quantize, search  # noqa: F401  (registers the commands, in this order)
from ._app import app, stdout

__all__ = ["app", "stdout"]
