"""Errors that lymphdx reports to users (no tracebacks from deep inside a library)."""

from __future__ import annotations

from pathlib import Path


class LymphdxError(Exception):
    """A problem with the user's input or environment, with a message a user can act on."""


class InputError(LymphdxError):
    """Bad input data: names the file, the patient (when known) and what is wrong."""

    def __init__(self, problem: str, path: str | Path | None = None, patient: str | None = None):
        self.problem = problem
        self.path = None if path is None else str(path)
        self.patient = patient
        parts = []
        if patient is not None:
            parts.append(f"patient {patient!r}")
        if path is not None:
            parts.append(f"file {str(path)!r}")
        where = ", ".join(parts)
        super().__init__(f"{where}: {problem}" if where else problem)


class ConfigError(LymphdxError):
    """Invalid configuration: names the key and what is wrong."""
