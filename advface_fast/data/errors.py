"""Errors and issue records shared by the data layer."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Literal

from .policy import ON_BAD_CHOICES  # noqa: F401  (the one list; re-exported here for old imports)

OnBad = Literal["error", "skip", "convert"]


class DataError(ValueError):
    """Bad input data: a missing or corrupt file, a malformed line, a checksum mismatch.

    ``file`` and ``line`` (1-based) say where; both also appear in the message.
    """

    def __init__(self, reason: str, *, file: object = None, line: int | None = None):
        self.reason = reason
        self.file = None if file is None else str(file)
        self.line = line
        where = self.file or ""
        if line is not None:
            where = f"{where}:{line}" if where else f"line {line}"
        super().__init__(f"{where}: {reason}" if where else reason)


def bad_input_error(problems: Iterable[DataError], remedy: str, convert_hint: bool = True) -> DataError:
    """The one-line error that stops a run on bad input (on_bad "error" / "convert"): the first problem,
    how many more there are, and ``remedy`` (e.g. "use --on-bad skip ... to drop the pairs that use it");
    a mode problem also suggests --on-bad convert (unless ``convert_hint`` is False, or the mode is one
    that is never converted, such as 16-bit)."""
    problems = list(problems)
    first = problems[0]
    more = f" ({len(problems) - 1} more bad image(s))" if len(problems) > 1 else ""
    convertible = "mode" in first.reason and "not converted" not in first.reason  # see images._check_mode
    hint = ", or --on-bad convert to convert it to RGB" if convert_hint and convertible else ""
    return DataError(f"{first.reason}{more}; {remedy}{hint}", file=first.file, line=first.line)


@dataclass(frozen=True)
class DataIssue:
    """One recorded problem that did not stop loading.

    action is "skipped" (the pair was dropped) or "converted" (an image was converted to RGB).
    For a dropped pair, file/line point at its line in the pairs file and reason names the cause.
    """

    file: str
    line: int | None
    reason: str
    action: Literal["skipped", "converted"] = "skipped"


def check_on_bad(on_bad: str) -> None:
    if on_bad not in ON_BAD_CHOICES:
        raise ValueError(f"on_bad must be one of {ON_BAD_CHOICES}, got {on_bad!r}")
