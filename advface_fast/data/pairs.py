"""Parsers for the LFW protocol files: pairs.txt, pairsDevTrain/DevTest.txt and people*.txt.

Folds are numbered from 1, as in the LFW documentation.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from pathlib import Path

from .errors import DataError, DataIssue, check_on_bad

# Names become directory names, so nothing that could leave the image folder ("..", "/") passes.
_NAME = re.compile(r"^\w[\w.'\-]*$")
_NUMBER = re.compile(r"^[0-9]{1,4}$")  # images are numbered with 4 digits, from 1


@dataclass(frozen=True)
class Pair:
    """One verification pair. fold is 1-based; a and b are image ids such as "Name/Name_0001"."""

    fold: int
    a: str
    b: str
    same: bool


@dataclass(frozen=True)
class PairsFile:
    """A parsed pairs file. lines[k] is the line number of pairs[k] in the file."""

    file: str
    n_folds: int
    pairs_per_half: int
    pairs: tuple[Pair, ...]
    lines: tuple[int, ...]
    skipped: tuple[DataIssue, ...] = field(default=())


def image_id(name: str, number: int) -> str:
    """LFW image id of the number-th (1-based) image of a person: "Name/Name_0001"."""
    return f"{name}/{name}_{number:04d}"


def _read_text(path: Path) -> str:
    try:
        return path.read_bytes().decode("utf-8")
    except FileNotFoundError:
        raise DataError("file is missing", file=path) from None
    except UnicodeDecodeError as exc:
        raise DataError(f"not UTF-8 text ({exc.reason} at byte {exc.start})", file=path) from None


def _body_lines(text: str) -> list[str]:
    lines = text.splitlines()
    while lines and not lines[-1].strip():  # a trailing newline or blank lines are harmless
        lines.pop()
    return lines


def _positive_ints(fields: list[str]) -> list[int] | None:
    if not all(f.isdigit() for f in fields):
        return None
    values = [int(f) for f in fields]
    return values if all(v > 0 for v in values) else None


def _parse_name(text: str) -> str:
    if not _NAME.match(text):
        raise ValueError(f"invalid person name {text!r}")
    return text


def _parse_number(text: str) -> int:
    if not _NUMBER.match(text) or int(text) == 0:
        raise ValueError(f"invalid image number {text!r} (expected 1..9999)")
    return int(text)


def _parse_pair_line(fields: list[str], same: bool) -> tuple[str, str]:
    if same:
        if len(fields) != 3:
            raise ValueError(f"expected a matched pair 'Name<TAB>i<TAB>j' (3 fields), got {len(fields)} fields")
        name, i, j = _parse_name(fields[0]), _parse_number(fields[1]), _parse_number(fields[2])
        if i == j:
            raise ValueError(f"matched pair compares image {i} of {name} with itself")
        return image_id(name, i), image_id(name, j)
    if len(fields) != 4:
        raise ValueError(
            f"expected a mismatched pair 'Name1<TAB>i<TAB>Name2<TAB>j' (4 fields), got {len(fields)} fields"
        )
    name1, i = _parse_name(fields[0]), _parse_number(fields[1])
    name2, j = _parse_name(fields[2]), _parse_number(fields[3])
    if name1 == name2:
        raise ValueError(f"mismatched pair names the same person twice ({name1})")
    return image_id(name1, i), image_id(name2, j)


def parse_pairs_text(text: str, *, file: str = "pairs.txt", on_bad: str = "error") -> PairsFile:
    """Parse the text of a pairs file.

    Header "F<TAB>N" (pairs.txt, View 2): F folds, each N matched then N mismatched lines.
    Header "N" (pairsDevTrain/DevTest.txt, View 1): one fold of N matched then N mismatched lines.
    A bad header or a line count that disagrees with the header is always an error: without them
    fold membership cannot be trusted. A malformed pair line raises, or with on_bad="skip" is
    dropped and recorded; it still occupies its slot, so the fold layout stays right.
    """
    check_on_bad(on_bad)
    lines = _body_lines(text)
    if not lines:
        raise DataError("pairs file is empty", file=file, line=1)
    header = _positive_ints(lines[0].split())
    if header is None or len(header) not in (1, 2):
        raise DataError(
            f"bad header {lines[0]!r}: expected 'folds<TAB>pairs_per_half' (e.g. '10\\t300') "
            "or a single pair count (e.g. '1100')",
            file=file,
            line=1,
        )
    n_folds, per_half = (1, header[0]) if len(header) == 1 else header
    expected = n_folds * 2 * per_half
    if len(lines) - 1 != expected:
        raise DataError(
            f"header {lines[0].strip()!r} promises {n_folds} fold(s) x 2 x {per_half} = {expected} pair lines, "
            f"but the file has {len(lines) - 1}",
            file=file,
        )
    pairs, numbers, skipped = [], [], []
    for offset, line in enumerate(lines[1:]):
        line_no = offset + 2
        fold, slot = divmod(offset, 2 * per_half)
        same = slot < per_half
        try:
            a, b = _parse_pair_line(line.split(), same)
        except ValueError as exc:
            if on_bad != "skip":
                raise DataError(str(exc), file=file, line=line_no) from None
            skipped.append(DataIssue(file, line_no, str(exc)))
            continue
        pairs.append(Pair(fold=fold + 1, a=a, b=b, same=same))
        numbers.append(line_no)
    return PairsFile(file, n_folds, per_half, tuple(pairs), tuple(numbers), tuple(skipped))


def parse_pairs(path: str | os.PathLike, *, on_bad: str = "error") -> PairsFile:
    """Parse a pairs file from disk (see parse_pairs_text)."""
    path = Path(path)
    return parse_pairs_text(_read_text(path), file=str(path), on_bad=on_bad)


def parse_people(path: str | os.PathLike) -> list[list[tuple[str, int]]]:
    """Parse people.txt (folds count, then per fold a count and 'Name<TAB>num_images' lines)
    or peopleDevTrain/DevTest.txt (a count, then the lines; returned as one fold).

    Returns one list of (name, num_images) per fold. Any malformed line is a DataError.
    """
    path = Path(path)
    lines = _body_lines(_read_text(path))
    if not lines:
        raise DataError("people file is empty", file=path, line=1)

    def count_at(index: int) -> int:
        values = _positive_ints(lines[index].split()) if index < len(lines) else None
        if values is None or len(values) != 1:
            raise DataError("expected a single positive count", file=path, line=index + 1)
        return values[0]

    def people_at(start: int, count: int) -> list[tuple[str, int]]:
        if start + count > len(lines):
            raise DataError(f"expected {count} people lines, file ends early", file=path, line=len(lines))
        people = []
        for index in range(start, start + count):
            fields = lines[index].split()
            try:
                if len(fields) != 2:
                    raise ValueError(f"expected 'Name<TAB>num_images' (2 fields), got {len(fields)}")
                people.append((_parse_name(fields[0]), _parse_number(fields[1])))
            except ValueError as exc:
                raise DataError(str(exc), file=path, line=index + 1) from None
        return people

    first = count_at(0)
    multi_fold = len(lines) > 1 and len(lines[1].split()) == 1
    if not multi_fold:
        folds, cursor = [people_at(1, first)], 1 + first
    else:
        folds, cursor = [], 1
        for _ in range(first):
            count = count_at(cursor)
            folds.append(people_at(cursor + 1, count))
            cursor += 1 + count
    if cursor != len(lines):
        raise DataError("unexpected extra lines after the last fold", file=path, line=cursor + 1)
    return folds
