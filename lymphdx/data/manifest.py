"""Manifests (one CSV row per patient): reading and checking them, duplicate scans.

A weak (classification) manifest has columns ``patient_id,image,label``; a strong (ROI)
manifest ``patient_id,image,mask``; either may add ``split`` (``train``/``val``/``test``).
Paths are relative to the CSV's own folder (absolute paths are allowed). Every problem
is an :class:`~lymphdx.core.errors.InputError` that names the CSV, the patient and the fault.

Splits: a run folder's ``splits.csv`` wins (so a resumed run keeps its split), then a
manifest's ``split`` column, then a seeded patient-wise split (stratified by label for
the weak set) whose sizes follow the given proportions by largest remainder
(``lymphdx.data.splits``).
"""

from __future__ import annotations

import csv
import io
import os
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lymphdx.core.errors import InputError
from lymphdx.core.files import path_problem

__all__ = [
    "MAX_LISTED",
    "SPLITS",
    "Problems",
    "StrongRecord",
    "WeakRecord",
    "check_disjoint",
    "check_duplicate_scans",
    "load_manifests",
    "load_strong_manifest",
    "load_weak_manifest",
    "parse_label",
    "read_rows",
    "resolve_path",
]

SPLITS = ("train", "val", "test")
MAX_LISTED = 10  # problems listed in one error message


@dataclass(frozen=True)
class WeakRecord:
    """One patient of the weakly labelled (scan-level label) set.

    ``manifest`` is the CSV the row came from (for error messages; not compared).
    """

    patient_id: str
    image: Path
    label: int
    split: str | None = None
    manifest: Path | None = field(default=None, compare=False, repr=False)


@dataclass(frozen=True)
class StrongRecord:
    """One patient of the strongly labelled (voxel-wise ROI mask) set."""

    patient_id: str
    image: Path
    mask: Path
    split: str | None = None
    manifest: Path | None = field(default=None, compare=False, repr=False)


# --------------------------------------------------------------------------- reading CSVs


@dataclass(frozen=True)
class _Row:
    line: int
    cells: dict[str, str]


class Problems:
    """Collects row problems so that one error lists them all (up to a limit)."""

    def __init__(self, csv_path: Path, what: str = "manifest"):
        self.csv_path = csv_path
        self.what = what
        self.items: list[tuple[str | None, int | None, str]] = []

    def add(self, patient: str | None, line: int | None, problem: str) -> None:
        self.items.append((patient, line, problem))

    def raise_if_any(self) -> None:
        if not self.items:
            return
        if len(self.items) == 1:
            patient, line, problem = self.items[0]
            where = f" (line {line})" if line is not None else ""
            raise InputError(f"{problem}{where}", self.csv_path, patient)
        lines = []
        for patient, line, problem in self.items[:MAX_LISTED]:
            who = f"patient {patient!r}" if patient is not None else "no patient id"
            lines.append(f"  line {line}, {who}: {problem}")
        if len(self.items) > MAX_LISTED:
            lines.append(f"  ... and {len(self.items) - MAX_LISTED} more")
        raise InputError(
            f"{len(self.items)} problems in the {self.what}:\n" + "\n".join(lines),
            self.csv_path,
            self.items[0][0],
        )


def read_rows(csv_path: Path, required: Sequence[str], what: str) -> tuple[list[str], list[_Row]]:
    """Header (stripped, lower-case) and the non-blank rows of a CSV, stripped."""
    problem = path_problem(csv_path)  # missing, a dangling link or a loop of links
    if problem is not None:
        raise InputError(f"{what} {problem}", csv_path)
    if csv_path.is_dir():
        raise InputError(f"{what} is a folder, expected a CSV file", csv_path)
    try:
        text = csv_path.read_text(encoding="utf-8-sig")  # -sig: drop a UTF-8 BOM
    except UnicodeDecodeError as err:
        raise InputError(f"{what} is not UTF-8 text ({err})", csv_path) from None
    # Line numbers as a spreadsheet shows them (a quoted cell may span several lines).
    numbered: list[tuple[int, list[str]]] = []
    reader = csv.reader(io.StringIO(text, newline=""), strict=True)
    line = 1
    try:
        for cells in reader:
            stripped = [c.strip() for c in cells]
            if any(stripped):
                numbered.append((line, stripped))
            line = reader.line_num + 1
    except csv.Error as err:
        raise InputError(f"{what} is not valid CSV (line {line}: {err})", csv_path) from None
    if not numbered:
        raise InputError(f"{what} is empty (no header, no rows)", csv_path)
    header = [h.lower() for h in numbered[0][1]]
    named = [h for h in header if h]
    dupes = sorted({h for h in named if named.count(h) > 1})
    if dupes:
        raise InputError(f"{what} header repeats column(s): {', '.join(dupes)}", csv_path)
    missing = [c for c in required if c not in header]
    if missing:
        raise InputError(
            f"{what} lacks required column(s): {', '.join(missing)}; found columns: "
            f"{', '.join(h for h in header if h) or '(none)'}; expected "
            f"{','.join(required)}{'[,split]' if what.endswith('manifest') else ''}",
            csv_path,
        )
    rows: list[_Row] = []
    problems = Problems(csv_path, what)
    for line_no, cells in numbered[1:]:
        extra = [c for c in cells[len(header) :] if c]
        if extra:
            id_index = header.index("patient_id")
            problems.add(
                cells[id_index] or None if id_index < len(cells) else None,
                line_no,
                f"row has {len(cells)} cells but the header has {len(header)} columns",
            )
            continue
        padded = cells + [""] * (len(header) - len(cells))
        rows.append(_Row(line_no, {h: v for h, v in zip(header, padded, strict=False) if h}))
    problems.raise_if_any()
    if not rows:
        raise InputError(f"{what} has a header but no patient rows", csv_path)
    return header, rows


def resolve_path(cell: str, base: Path) -> Path:
    """A manifest cell's path: as written when absolute, else relative to ``base``."""
    path = Path(cell).expanduser()
    return path if path.is_absolute() else base / path


def parse_label(text: str) -> int | None:
    """0 or 1 from ``"0"``, ``"1"``, ``"0.0"``, ``"1.0"``; None for anything else."""
    try:
        value = float(text)
    except ValueError:
        return None
    return int(value) if value in (0.0, 1.0) else None


def _load(csv_path: str | Path, kind: str) -> list[WeakRecord] | list[StrongRecord]:
    csv_path = Path(csv_path)
    what = f"{kind} manifest"
    path_columns = ("image",) if kind == "weak" else ("image", "mask")
    required = ("patient_id", *path_columns) + (("label",) if kind == "weak" else ())
    header, rows = read_rows(csv_path, required, what)
    base = Path(os.path.normpath(csv_path.absolute().parent))  # no symlinks followed
    has_split = "split" in header
    problems = Problems(csv_path, what)

    seen: dict[str, list[int]] = {}
    for row in rows:
        pid = row.cells["patient_id"]
        if pid:
            seen.setdefault(pid, []).append(row.line)
    for pid, lines in seen.items():
        if len(lines) > 1:
            problems.add(
                pid,
                lines[0],
                f"duplicate patient id {pid!r} on lines {', '.join(map(str, lines))}; "
                "each patient must have exactly one row",
            )

    images: dict[Path, tuple[str, int]] = {}
    records: list[WeakRecord | StrongRecord] = []
    splits_given: list[tuple[str, int]] = []
    splits_missing: list[tuple[str, int]] = []
    for row in rows:
        pid = row.cells["patient_id"]
        if not pid:
            problems.add(None, row.line, "empty patient_id cell")
            continue
        ok = True
        paths: dict[str, Path] = {}
        for column in path_columns:
            cell = row.cells[column]
            if not cell:
                problems.add(pid, row.line, f"empty {column} cell")
                ok = False
                continue
            path = resolve_path(cell, base)
            problem = path_problem(path)
            if problem == "does not exist":
                problem += f" (paths are relative to the manifest's folder {str(base)!r})"
            if problem is not None:
                problems.add(pid, row.line, f"{column} {str(path)!r} {problem}")
                ok = False
            paths[column] = path
        if "image" in paths and ok:
            key = paths["image"].resolve()
            if key in images:
                other, other_line = images[key]
                problems.add(
                    pid,
                    row.line,
                    f"image {str(paths['image'])!r} is also listed for patient {other!r} "
                    f"(line {other_line}); each patient needs its own scan",
                )
                ok = False
            else:
                images[key] = (pid, row.line)
        label = 0
        if kind == "weak":
            parsed = parse_label(row.cells["label"])
            if parsed is None:
                shown = row.cells["label"]
                problems.add(
                    pid,
                    row.line,
                    f"label must be 0 or 1, got {shown!r}" if shown else "empty label cell",
                )
                ok = False
            else:
                label = parsed
        split: str | None = None
        if has_split:
            value = row.cells["split"].lower()
            if not value:
                splits_missing.append((pid, row.line))
            elif value not in SPLITS:
                problems.add(
                    pid,
                    row.line,
                    f"unknown split {row.cells['split']!r}; use one of {', '.join(SPLITS)}",
                )
                ok = False
            else:
                split = value
                splits_given.append((pid, row.line))
        if not ok:
            continue
        if kind == "weak":
            records.append(WeakRecord(pid, paths["image"], label, split, csv_path))
        else:
            records.append(StrongRecord(pid, paths["image"], paths["mask"], split, csv_path))
    if splits_given and splits_missing:
        for pid, line in splits_missing:
            problems.add(
                pid,
                line,
                "empty split cell; when the split column is used, every row needs "
                f"one of {', '.join(SPLITS)}",
            )
    problems.raise_if_any()
    return records  # type: ignore[return-value]


def load_weak_manifest(csv_path: str | Path) -> list[WeakRecord]:
    """Read and validate a weak manifest (``patient_id,image,label[,split]``).

    Image paths are resolved against the CSV's folder and must exist. A ``split``
    column, when present, must be filled on every row (or on none).

    Raises:
        InputError: naming the CSV, the patient and the problem.
    """
    return _load(csv_path, "weak")  # type: ignore[return-value]


def load_strong_manifest(csv_path: str | Path) -> list[StrongRecord]:
    """Read and validate a strong manifest (``patient_id,image,mask[,split]``).

    Raises:
        InputError: naming the CSV, the patient and the problem.
    """
    return _load(csv_path, "strong")  # type: ignore[return-value]


def check_disjoint(
    weak: Iterable[WeakRecord],
    strong: Iterable[StrongRecord],
    weak_csv: str | Path | None = None,
    strong_csv: str | Path | None = None,
) -> None:
    """Refuse a patient id that appears in both sets.

    Raises:
        InputError: naming the shared id(s) and both manifests.
    """
    shared = sorted({r.patient_id for r in weak} & {r.patient_id for r in strong})
    if not shared:
        return
    listed = ", ".join(repr(p) for p in shared[:MAX_LISTED])
    if len(shared) > MAX_LISTED:
        listed += f" and {len(shared) - MAX_LISTED} more"
    weak_name = f"weak manifest {str(weak_csv)!r}" if weak_csv else "the weak manifest"
    strong_name = f"strong manifest {str(strong_csv)!r}" if strong_csv else "the strong manifest"
    raise InputError(
        f"patient id(s) {listed} appear in both the {weak_name} and the {strong_name}; "
        "the two sets must hold different patients (rename the ids if they are "
        "different people)",
        weak_csv,
        shared[0],
    )


def check_duplicate_scans(
    weak: Sequence[WeakRecord],
    strong: Sequence[StrongRecord],
    content_hash: Callable[[Path, str], str],
) -> None:
    """Refuse two patients whose scans have identical content (the same scan under two
    ids), within or across the sets.

    ``load_manifests`` catches a path listed twice; a copy of the file is only caught by
    its content: ``content_hash(image, patient_id)`` (``PreprocessCache.content_hash``,
    memoised, so a later run does not read the files again). A duplicate is refused
    whatever the labels: with opposite labels one of them is wrong, and with the same
    label the copy counts twice and may land in train and test alike.

    Raises:
        InputError: naming both patients, their files and labels, and the manifest.
    """
    first: dict[str, tuple[str, WeakRecord | StrongRecord]] = {}
    pairs: list[tuple[tuple[str, WeakRecord | StrongRecord], tuple[str, Any]]] = []
    for set_name, records in (("weak", weak), ("strong", strong)):
        for r in records:
            digest = content_hash(r.image, r.patient_id)
            if digest in first:
                pairs.append((first[digest], (set_name, r)))
            else:
                first[digest] = (set_name, r)
    if not pairs:
        return

    def who(set_name: str, r: WeakRecord | StrongRecord) -> str:
        label = f", label {r.label}" if isinstance(r, WeakRecord) else ""
        return f"{r.patient_id!r} ({set_name} set{label}, image {str(r.image)!r})"

    (set_a, a), (set_b, b) = pairs[0]
    if isinstance(a, WeakRecord) and isinstance(b, WeakRecord) and a.label != b.label:
        verdict = "with opposite labels, so one of them is wrong"
    else:
        verdict = "so it would count twice and could land in train and test alike"
    more = ""
    if len(pairs) > 1:
        rest = pairs[1 : 1 + MAX_LISTED]
        shown = ", ".join(f"{x.patient_id!r} = {y.patient_id!r}" for (_, x), (_, y) in rest)
        if len(pairs) - 1 > len(rest):
            shown += f" and {len(pairs) - 1 - len(rest)} more"
        more = f"; {len(pairs) - 1} more pair(s): {shown}"
    raise InputError(
        f"patients {a.patient_id!r} and {b.patient_id!r} have scans of identical content: "
        f"{who(set_a, a)} and {who(set_b, b)} are the same scan under two ids, {verdict}"
        f"{more}. Remove the duplicate row, or give the patient its own scan",
        a.manifest,
        a.patient_id,
    )


def load_manifests(
    weak_csv: str | Path, strong_csv: str | Path
) -> tuple[list[WeakRecord], list[StrongRecord]]:
    """Load both manifests and check that they share no patient id."""
    weak = load_weak_manifest(weak_csv)
    strong = load_strong_manifest(strong_csv)
    check_disjoint(weak, strong, weak_csv, strong_csv)
    return weak, strong
