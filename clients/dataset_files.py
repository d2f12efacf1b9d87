"""The files of a recorded dataset folder, read and checked: fixations.csv, dataset.json, stimuli/.

Every problem is a :class:`DatasetError` naming the file, the line and the column to fix
(``docs/dataset-format.md`` describes the format). :class:`clients.recorded.RecordedDataset` builds
sessions from what these functions return.
"""

from __future__ import annotations

import csv
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from learner.errors import InputError

__all__ = [
    "IMAGE_SUFFIXES",
    "REQUIRED_COLUMNS",
    "DatasetError",
    "Fixation",
    "check_px_per_deg",
    "list_stimuli",
    "read_fixations",
    "read_metadata",
]

#: Columns ``fixations.csv`` must have; any other column is allowed and ignored.
REQUIRED_COLUMNS = ("image", "subject", "fix_index", "x_px", "y_px", "duration_ms")
IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp"})


class DatasetError(InputError):
    """A dataset folder that cannot be read; the message names the file, line and column to fix."""


@dataclass(frozen=True)
class Fixation:
    """One recorded fixation: where (image pixels, origin top-left, y down) and for how long."""

    image: str
    subject: str
    fix_index: int
    x: float
    y: float
    duration_ms: float


def check_px_per_deg(value: Any, where: str) -> float:
    """``value`` as pixels per degree: a positive finite number (``where`` names it in the error)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise DatasetError(f"{where}: px_per_deg must be a positive number or null, got {value!r}")
    if not math.isfinite(value) or value <= 0:
        raise DatasetError(f"{where}: px_per_deg must be a positive finite number, got {value!r}")
    return float(value)


def read_metadata(root: Path) -> dict[str, Any]:
    """``dataset.json``, checked (``name`` and ``px_per_deg``); without the file, the folder's name."""
    path = root / "dataset.json"
    if not path.exists():
        return {"name": root.resolve().name, "px_per_deg": None}
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise DatasetError(f"{path}: not readable JSON ({exc})") from exc
    if not isinstance(meta, dict):
        raise DatasetError(f"{path}: must hold a JSON object, got {type(meta).__name__}")
    name = meta.get("name")
    if name is not None and (not isinstance(name, str) or not name.strip()):
        raise DatasetError(f"{path}: 'name' must be a non-empty string, got {name!r}")
    ppd = meta.get("px_per_deg")
    meta["px_per_deg"] = None if ppd is None else check_px_per_deg(ppd, str(path))
    return meta


def list_stimuli(root: Path) -> list[str]:
    """The image ids: paths under ``stimuli/`` with an image suffix, sorted."""
    stimuli = root / "stimuli"
    if not stimuli.is_dir():
        raise DatasetError(f"{stimuli} is missing: put the images in a 'stimuli' folder")
    names = sorted(
        p.relative_to(stimuli).as_posix()
        for p in stimuli.rglob("*")
        if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES and not p.name.startswith(".")
    )
    if not names:
        raise DatasetError(f"{stimuli} holds no images ({', '.join(sorted(IMAGE_SUFFIXES))})")
    return names


def _bad(path: Path, line: int, column: str, problem: str) -> DatasetError:
    return DatasetError(f"{path} line {line}, column {column!r}: {problem}")


def _number(path: Path, line: int, row: dict[str, str], column: str) -> float:
    text = row[column]
    try:
        value = float(text)
    except ValueError:
        raise _bad(path, line, column, f"{text!r} is not a number") from None
    if not math.isfinite(value):
        raise _bad(path, line, column, f"{text!r} is not finite")
    return value


def _parse_row(path: Path, line: int, row: dict[str, str], images: frozenset[str]) -> Fixation:
    for col in REQUIRED_COLUMNS:
        if row.get(col) is None or not row[col].strip():
            raise _bad(path, line, col, "value is empty")
    image = row["image"].strip()
    if image not in images:
        raise _bad(path, line, "image", f"{image!r} is not in {path.parent / 'stimuli'}")
    index = _number(path, line, row, "fix_index")
    if not index.is_integer() or index < 0:
        raise _bad(path, line, "fix_index", f"{row['fix_index']!r} must be a whole number >= 0")
    duration = _number(path, line, row, "duration_ms")
    if duration < 0:
        raise _bad(path, line, "duration_ms", f"{duration} must be >= 0")
    x, y = _number(path, line, row, "x_px"), _number(path, line, row, "y_px")
    return Fixation(image, row["subject"].strip(), int(index), x, y, duration)


def read_fixations(path: Path, images: frozenset[str]) -> dict[tuple[str, str], list[Fixation]]:
    """``fixations.csv`` as scanpaths: (image, subject) -> fixations ordered by ``fix_index``."""
    if not path.is_file():
        raise DatasetError(f"{path} is missing: a dataset needs one row per fixation there")
    groups: dict[tuple[str, str], list[Fixation]] = {}
    seen: dict[tuple[str, str, int], int] = {}
    with open(path, newline="", encoding="utf-8-sig") as f:  # -sig: accept Excel's BOM
        reader = csv.DictReader(f)
        header = reader.fieldnames
        if not header:
            raise DatasetError(f"{path} line 1: empty file, expected a header row")
        missing = [c for c in REQUIRED_COLUMNS if c not in header]
        if missing:
            raise DatasetError(
                f"{path} line 1: missing column(s) {', '.join(missing)}; "
                f"required: {', '.join(REQUIRED_COLUMNS)}; found: {', '.join(header)}"
            )
        for row in reader:
            line = reader.line_num  # the physical line, header = 1, so editors can jump to it
            fix = _parse_row(path, line, row, images)
            key = (fix.image, fix.subject, fix.fix_index)
            if key in seen:
                raise _bad(
                    path,
                    line,
                    "fix_index",
                    f"fixation {fix.fix_index} of subject {fix.subject!r} on {fix.image!r} "
                    f"already appears on line {seen[key]}",
                )
            seen[key] = line
            groups.setdefault((fix.image, fix.subject), []).append(fix)
    for fixations in groups.values():
        fixations.sort(key=lambda f: f.fix_index)
    return groups
