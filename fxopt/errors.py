"""User-facing errors.

Every problem caused by the user's input (a model file, a rule file, an output path) is a
`FxoptError`: the CLI prints its message as one line and exits with code 2. Anything else is a
bug in fxopt and is reported as such.
"""

from __future__ import annotations


class FxoptError(Exception):
    """A problem with the user's input; `str(err)` is a complete one-line message."""


class RuleError(FxoptError):
    """A rule file is invalid; the message starts with ``file:line:column``."""

    def __init__(self, source: str, line: int, column: int, message: str):
        self.source, self.line, self.column = source, line, column
        super().__init__(f"{source}:{line}:{column}: {message}")


class ModelFileError(FxoptError):
    """A model file cannot be loaded or does not define what fxopt needs."""


class TraceFailure(FxoptError):
    """Neither torch.fx nor torch.export could capture the model."""


class OutputError(FxoptError):
    """The output directory cannot be written, or a saved result cannot be read."""


class StrictFailure(FxoptError):
    """`--strict` was given and a site was rolled back or end-to-end tolerance was violated."""


def first_line(exc: BaseException) -> str:
    """'TypeName: first line of the message': enough to name a failure on one line."""
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}".strip()
