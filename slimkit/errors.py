"""Errors slimkit reports to the user.

Every error a user can cause (a missing file, a bad recipe, data that does not fit the
model) is a :class:`SlimkitError`: the CLI prints its message as one paragraph and exits
with code 2, without a traceback. Anything else is a bug in slimkit and keeps its traceback.
"""

from __future__ import annotations

__all__ = ["SlimkitError", "ConfigError", "ExportError", "NotMetError", "NoFeasibleTrialError"]


class SlimkitError(Exception):
    """A problem with the user's input or environment; the message says what to do."""

    exit_code = 2


class ConfigError(SlimkitError, ValueError):
    """A configuration value is out of range, unknown or of the wrong type.

    ``where`` names the place (a recipe step, a CLI flag, a config class) and ``field`` the
    offending field, so the message can point at it.
    """

    def __init__(self, message: str, *, field: str | None = None, where: str | None = None):
        self.field = field
        self.where = where
        self.reason = message
        super().__init__(self._compose())

    def _compose(self) -> str:
        parts = []
        if self.where:
            parts.append(self.where)
        if self.field:
            parts.append(f"field '{self.field}'")
        prefix = ", ".join(parts)
        return f"{prefix}: {self.reason}" if prefix else self.reason

    def located(self, where: str) -> "ConfigError":
        """The same error, placed inside ``where`` (e.g. ``recipe step 2 'finetune'``)."""
        inner = f"{where}, {self.where}" if self.where else where
        return ConfigError(self.reason, field=self.field, where=inner)


class ExportError(SlimkitError):
    """Export to ONNX failed; names the module and the operator that failed."""

    def __init__(self, message: str, *, module: str | None = None, op: str | None = None):
        self.module = module
        self.op = op
        super().__init__(message)


class NotMetError(SlimkitError):
    """The command ran and wrote its results, but what the user asked for was not met (exit code 3).

    The message says what was not met, with the measured figures, and what to change.
    """

    exit_code = 3


class NoFeasibleTrialError(NotMetError):
    """A search finished without any trial that meets the budget (exit code 3)."""
