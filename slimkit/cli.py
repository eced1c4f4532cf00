"""The ``slimkit`` command line: a thin layer over :mod:`slimkit.api` (same behaviour, same errors).

The commands live in :mod:`slimkit.commands`; this module is the entry point (``slimkit = "slimkit.cli:main"``).
"""

from __future__ import annotations

import sys

from . import _console
from .commands import app
from .errors import SlimkitError

__all__ = ["app", "main"]


def main(argv: list[str] | None = None) -> None:
    """Run the CLI; a user error prints one paragraph and exits with its code (2), no traceback."""
    try:
        app(args=argv, prog_name="slimkit")
    except SlimkitError as e:
        _console.console.print(f"error: {e}", style="red", markup=False, highlight=False, soft_wrap=True)
        sys.exit(e.exit_code)
    except KeyboardInterrupt:
        _console.console.print("interrupted", style="red")
        sys.exit(130)


if __name__ == "__main__":
    main()
