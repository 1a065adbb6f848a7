"""The one error every topology parser raises for input it cannot read faithfully."""

from __future__ import annotations


class TopologyParseError(ValueError):
    """The input is not a topology this parser can read without guessing.

    ``line`` is the 1-based line of the input the problem was found on (None where the input is
    structured data, e.g. a JSON view, and ``reason`` names the field instead). ``str(err)``
    reads ``line N: reason``, so a caller can print it as is.
    """

    def __init__(self, reason: str, line: int | None = None) -> None:
        self.reason = reason
        self.line = line
        super().__init__(f"line {line}: {reason}" if line is not None else reason)
