"""Manifests (one CSV row per patient) and patient-wise train/val/test splits.

A weak (classification) manifest has columns ``patient_id,image,label``; a strong (ROI)
manifest ``patient_id,image,mask``; either may add ``split`` (``train``/``val``/``test``).
Paths are relative to the CSV's own folder (absolute paths are allowed). Every problem
is an :class:`~lymphdx.core.errors.InputError` that names the CSV, the patient and the fault.

Splits: a run folder's ``splits.csv`` wins (so a resumed run keeps its split), then a
manifest's ``split`` column, then a seeded patient-wise split (stratified by label for
the weak set) whose sizes follow the given proportions by largest remainder.
"""

from __future__ import annotations

import csv
import io
import math
import os
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field, replace
from fractions import Fraction
from pathlib import Path
from typing import Any, NamedTuple, TypeVar

import numpy as np

from lymphdx.core.errors import ConfigError, InputError
from lymphdx.core.files import atomic_path

__all__ = [
    "SPLITS",
    "SPLITS_FILE",
    "SplitEntry",
    "StrongRecord",
    "WeakRecord",
    "assign_splits",
    "check_disjoint",
    "check_duplicate_scans",
    "check_weak_splits",
    "load_manifests",
    "load_strong_manifest",
    "load_weak_manifest",
    "read_splits_csv",
    "resolve_splits",
    "split_counts",
    "write_splits_csv",
]

SPLITS = ("train", "val", "test")
SPLITS_FILE = "splits.csv"
_SETS = ("weak", "strong")
_MAX_LISTED = 10  # problems listed in one error message


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


Record = TypeVar("Record", WeakRecord, StrongRecord)


class SplitEntry(NamedTuple):
    """One row of ``splits.csv``: the patient's split and (weak set only) its label."""

    split: str
    label: int | None


# --------------------------------------------------------------------------- reading CSVs


@dataclass(frozen=True)
class _Row:
    line: int
    cells: dict[str, str]


class _Problems:
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
        for patient, line, problem in self.items[:_MAX_LISTED]:
            who = f"patient {patient!r}" if patient is not None else "no patient id"
            lines.append(f"  line {line}, {who}: {problem}")
        if len(self.items) > _MAX_LISTED:
            lines.append(f"  ... and {len(self.items) - _MAX_LISTED} more")
        raise InputError(
            f"{len(self.items)} problems in the {self.what}:\n" + "\n".join(lines),
            self.csv_path,
            self.items[0][0],
        )


def _read_rows(csv_path: Path, required: Sequence[str], what: str) -> tuple[list[str], list[_Row]]:
    """Header (stripped, lower-case) and the non-blank rows of a CSV, stripped."""
    if not csv_path.exists():
        raise InputError(f"{what} does not exist", csv_path)
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
    problems = _Problems(csv_path, what)
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


def _resolve_path(cell: str, base: Path) -> Path:
    path = Path(cell).expanduser()
    return path if path.is_absolute() else base / path


def _parse_label(text: str) -> int | None:
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
    header, rows = _read_rows(csv_path, required, what)
    base = Path(os.path.normpath(csv_path.absolute().parent))  # no symlinks followed
    has_split = "split" in header
    problems = _Problems(csv_path, what)

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
            path = _resolve_path(cell, base)
            if not path.exists():
                problems.add(
                    pid,
                    row.line,
                    f"{column} {str(path)!r} does not exist (paths are relative to the "
                    f"manifest's folder {str(base)!r})",
                )
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
            parsed = _parse_label(row.cells["label"])
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
    listed = ", ".join(repr(p) for p in shared[:_MAX_LISTED])
    if len(shared) > _MAX_LISTED:
        listed += f" and {len(shared) - _MAX_LISTED} more"
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
        rest = pairs[1 : 1 + _MAX_LISTED]
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


# --------------------------------------------------------------------------- splitting


def _fractions(proportions: Sequence[float]) -> list[Fraction]:
    try:
        values = [float(v) for v in proportions]
    except (TypeError, ValueError):
        values = []
    if len(values) != len(SPLITS) or not all(math.isfinite(v) and v >= 0 for v in values):
        raise ConfigError(
            f"split proportions must be {len(SPLITS)} non-negative numbers "
            f"({'/'.join(SPLITS)}), got {proportions!r}"
        )
    fracs = [Fraction(v).limit_denominator(10**9) for v in values]
    if sum(fracs) <= 0:
        raise ConfigError(f"split proportions must not all be zero, got {proportions!r}")
    return fracs


def _largest_remainder(ideal: Sequence[Fraction], total: int) -> list[int]:
    """Integers that sum to ``total``, each the floor or ceiling of its ``ideal``.

    ``ideal`` must sum to ``total``. Ties go to the earlier entry (train, val, test).
    """
    counts = [math.floor(x) for x in ideal]
    order = sorted(range(len(ideal)), key=lambda i: (-(ideal[i] - counts[i]), i))
    for i in order[: total - sum(counts)]:
        counts[i] += 1
    return counts


def split_counts(n: int, proportions: Sequence[float]) -> list[int]:
    """Split sizes (train, val, test) for ``n`` patients by largest remainder."""
    fracs = _fractions(proportions)
    whole = sum(fracs)
    return _largest_remainder([n * f / whole for f in fracs], n)


def _stratified_counts(class_sizes: Sequence[int], totals: Sequence[int]) -> list[list[int]]:
    """Per-class split counts for two classes whose column sums are ``totals``.

    Class 1 is rounded by largest remainder towards ``n_1 * total_s / n``; class 0 takes
    the rest of each split, so both are the floor or ceiling of their ideal. Then, where
    a class has at least 3 patients and val or test (with at least 2 patients) got none
    of it, one patient of each class is swapped with another split so that AUC on val
    and test is defined; a count then stays less than 2 away from its ideal.
    """
    if len(class_sizes) < 2:
        return [list(totals) for _ in class_sizes]
    n, n1 = sum(class_sizes), class_sizes[1]
    x1 = _largest_remainder([Fraction(n1 * t, n) for t in totals], n1)
    counts = [[t - c for t, c in zip(totals, x1, strict=True)], x1]
    ideal = [[Fraction(size * t, n) for t in totals] for size in class_sizes]
    for s in (1, 2):  # val, test
        if totals[s] < 2:
            continue
        for c in (0, 1):
            other = 1 - c
            if class_sizes[c] < 3 or counts[c][s] > 0 or counts[other][s] < 2:
                continue
            donors = [
                d for d in range(len(SPLITS)) if d != s and counts[c][d] >= (1 if d == 0 else 2)
            ]
            if not donors:
                continue
            d = max(donors, key=lambda d: (counts[c][d] - ideal[c][d], d == 0))
            counts[c][s] += 1
            counts[c][d] -= 1
            counts[other][s] -= 1
            counts[other][d] += 1
    return counts


def assign_splits(
    records: Iterable[WeakRecord | StrongRecord],
    proportions: Sequence[float],
    seed: int,
    stratify: bool,
) -> dict[str, str]:
    """A seeded patient-wise split: ``{patient_id: "train" | "val" | "test"}``.

    Split sizes follow ``proportions`` (relative; counts such as ``(90, 10, 23)`` work)
    by largest remainder. With ``stratify`` the records' 0/1 ``label`` is spread over the
    splits as proportionally as possible, with at least one patient of each class in val
    and test whenever the class has 3 or more patients. The result depends only on the
    set of patients (sorted by id), their labels, the proportions and ``seed``.
    """
    records = sorted(records, key=lambda r: r.patient_id)
    ids = [r.patient_id for r in records]
    if len(set(ids)) != len(ids):
        dupes = sorted({p for p in ids if ids.count(p) > 1})
        raise InputError(f"duplicate patient ids: {', '.join(dupes)}", patient=dupes[0])
    totals = split_counts(len(records), proportions)
    if stratify:
        labels = [int(r.label) for r in records]  # type: ignore[union-attr]
        classes = sorted(set(labels))
        if not set(classes) <= {0, 1}:
            raise ValueError(f"stratified split needs 0/1 labels, got {classes}")
        groups = [[p for p, y in zip(ids, labels, strict=True) if y == c] for c in classes]
        counts = _stratified_counts([len(g) for g in groups], totals)
    else:
        groups = [ids]
        counts = [totals]
    rng = np.random.default_rng(seed)
    result: dict[str, str] = {}
    for group, group_counts in zip(groups, counts, strict=True):
        order = rng.permutation(len(group))
        start = 0
        for split, count in zip(SPLITS, group_counts, strict=True):
            for i in order[start : start + count]:
                result[group[int(i)]] = split
            start += count
    return result


# --------------------------------------------------------------------------- splits.csv


def write_splits_csv(
    path: str | Path, weak: Iterable[WeakRecord], strong: Iterable[StrongRecord]
) -> Path:
    """Write ``set,patient_id,split,label`` (label empty for the strong set) atomically.

    Rows are sorted by set (weak first), then patient id. Every record needs a split.
    """
    path = Path(path)
    buffer = io.StringIO(newline="")
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(["set", "patient_id", "split", "label"])
    for set_name, records in (("weak", weak), ("strong", strong)):
        for r in sorted(records, key=lambda r: r.patient_id):
            if r.split not in SPLITS:
                raise ValueError(f"{set_name} patient {r.patient_id!r} has no split")
            label = str(int(r.label)) if isinstance(r, WeakRecord) else ""
            writer.writerow([set_name, r.patient_id, r.split, label])
    with atomic_path(path) as tmp:
        tmp.write_text(buffer.getvalue(), encoding="utf-8", newline="")
    return path


def read_splits_csv(path: str | Path) -> dict[tuple[str, str], SplitEntry]:
    """Read a ``splits.csv``: ``{(set, patient_id): SplitEntry(split, label)}``.

    Raises:
        InputError: unreadable file, missing columns, or a bad set/split/label value.
    """
    path = Path(path)
    _, rows = _read_rows(path, ("set", "patient_id", "split", "label"), "splits file")
    problems = _Problems(path, "splits file")
    result: dict[tuple[str, str], SplitEntry] = {}
    for row in rows:
        set_name, pid = row.cells["set"].lower(), row.cells["patient_id"]
        split, label_text = row.cells["split"].lower(), row.cells["label"]
        if set_name not in _SETS:
            problems.add(pid or None, row.line, f"unknown set {row.cells['set']!r}")
            continue
        if not pid:
            problems.add(None, row.line, "empty patient_id cell")
            continue
        if split not in SPLITS:
            problems.add(pid, row.line, f"unknown split {row.cells['split']!r}")
            continue
        label = _parse_label(label_text) if label_text else None
        if label_text and label is None:
            problems.add(pid, row.line, f"label must be 0, 1 or empty, got {label_text!r}")
            continue
        if (set_name, pid) in result:
            problems.add(pid, row.line, f"{set_name} patient {pid!r} is listed twice")
            continue
        result[(set_name, pid)] = SplitEntry(split, label)
    problems.raise_if_any()
    return result


def _listing(ids: Iterable[str]) -> str:
    ids = sorted(ids)
    text = ", ".join(repr(p) for p in ids[:_MAX_LISTED])
    return text + (f" and {len(ids) - _MAX_LISTED} more" if len(ids) > _MAX_LISTED else "")


def _apply_saved(
    records: Sequence[Record],
    set_name: str,
    saved: dict[tuple[str, str], SplitEntry],
    splits_path: Path,
) -> list[Record]:
    """Records with the split from ``splits.csv``, after checking it matches them."""
    mine = {pid for s, pid in saved if s == set_name}
    ids = {r.patient_id for r in records}
    if mine != ids:
        parts = []
        if ids - mine:
            parts.append(f"in the {set_name} manifest but not in it: {_listing(ids - mine)}")
        if mine - ids:
            parts.append(f"in it but not in the {set_name} manifest: {_listing(mine - ids)}")
        raise InputError(
            f"the run folder's splits.csv was made for other data ({'; '.join(parts)}). "
            "The run folder belongs to other data: use a new run folder (or delete "
            "splits.csv there to make a new split)",
            splits_path,
            sorted(ids ^ mine)[0],
        )
    out: list[Record] = []
    conflicts: list[tuple[str, str]] = []
    for r in records:
        entry = saved[(set_name, r.patient_id)]
        if r.split is not None and r.split != entry.split:
            conflicts.append((r.patient_id, f"{r.split} in the manifest, {entry.split} saved"))
        if isinstance(r, WeakRecord) and entry.label is not None and entry.label != r.label:
            conflicts.append(
                (r.patient_id, f"label {r.label} in the manifest, {entry.label} saved")
            )
        out.append(replace(r, split=entry.split))
    if conflicts:
        shown = "; ".join(f"{pid!r} ({why})" for pid, why in conflicts[:_MAX_LISTED])
        more = f" and {len(conflicts) - _MAX_LISTED} more" if len(conflicts) > _MAX_LISTED else ""
        raise InputError(
            f"the {set_name} manifest disagrees with the run folder's splits.csv: {shown}{more}. "
            "The run folder belongs to other data: use a new run folder",
            splits_path,
            conflicts[0][0],
        )
    return out


def _split_set(
    records: Sequence[Record], proportions: Sequence[float], seed: int, stratify: bool
) -> list[Record]:
    given = [r.split is not None for r in records]
    if all(given):
        return list(records)
    if any(given):
        lacking = [r.patient_id for r in records if r.split is None]
        raise InputError(
            f"some patients have a split and others not: {_listing(lacking)} lack one",
            patient=lacking[0],
        )
    assigned = assign_splits(records, proportions, seed, stratify)
    return [replace(r, split=assigned[r.patient_id]) for r in records]


def check_weak_splits(
    weak: Sequence[WeakRecord],
    source: str | Path | None = None,
    origin: str = "column",
    proportions: Sequence[float] | None = None,
) -> None:
    """Refuse a weak-set split without both classes in each of train, val and test.

    AUC is undefined on a split with one class: val AUC selects the model and test AUC is
    the result. ``origin`` says where the split came from (``column``: the manifest's
    split column; ``seeded``: lymphdx's stratified split with ``proportions``; ``saved``:
    the run folder's ``splits.csv``, which is ``source``), so the message can say what to
    change.

    Raises:
        InputError: naming ``source`` and every split that lacks a class.
    """
    faults = []
    for split in SPLITS:
        labels = [r.label for r in weak if r.split == split]
        if not labels:
            faults.append(f"the {split} split holds no patients")
        elif len(set(labels)) < 2:
            n = len(labels)
            faults.append(
                f"the {split} split holds only label {labels[0]} ({n} patient{'s' * (n > 1)})"
            )
    if not faults:
        return
    n_pos = sum(r.label for r in weak)
    problem = (
        f"weak set: {'; '.join(faults)}. AUC is undefined without both classes (val AUC "
        "selects the model, test AUC is the result). "
    )
    if origin == "column":
        problem += (
            "Fix: give every split of the manifest's split column positives and negatives "
            "(at least one of each in val and test), or delete the split column so that "
            "lymphdx makes a stratified split"
        )
    elif origin == "seeded":
        shown = "/".join(f"{p:g}" for p in proportions) if proportions is not None else "?"
        problem += (
            f"The set has {len(weak)} patients, {n_pos} with label 1 and "
            f"{len(weak) - n_pos} with label 0; the stratified split (proportions "
            f"train/val/test {shown}, data.split.weak) gives each split both classes only "
            "when each class has at least 3 patients and val and test at least 2 each; "
            "the default 90/10/23 gives val 2 patients only from 21 weak patients on, and "
            "about 40 or more are needed for a validation split that can choose a model. "
            "Fix: add patients, set data.split.weak to larger val and test shares (e.g. "
            "[60, 20, 20], which splits from about 9 patients), or add a split column "
            "(train/val/test) to the manifest"
        )
    else:
        problem += (
            "The split comes from the run folder's splits.csv (written by hand or by an "
            "older lymphdx): use a new run folder, or fix or delete that file"
        )
    raise InputError(problem, source)


def resolve_splits(
    weak: Sequence[WeakRecord],
    strong: Sequence[StrongRecord],
    run_dir: str | Path,
    weak_proportions: Sequence[float],
    strong_proportions: Sequence[float],
    seed: int,
) -> tuple[list[WeakRecord], list[StrongRecord]]:
    """The records with ``split`` filled, and ``run_dir/splits.csv`` written or reused.

    Order of precedence: an existing ``run_dir/splits.csv`` (it must cover exactly these
    patients, with the same labels and any manifest splits); the manifests' own ``split``
    column; a seeded split (weak set stratified by label, strong set not).

    The weak set's train, val and test splits must each hold both classes
    (:func:`check_weak_splits`); a new ``splits.csv`` is written only after that check.

    Raises:
        InputError: a ``splits.csv`` made for other patients, partial split columns, or a
            weak-set split without both classes.
    """
    splits_path = Path(run_dir) / SPLITS_FILE
    if splits_path.exists():
        saved = read_splits_csv(splits_path)
        weak_out = _apply_saved(weak, "weak", saved, splits_path)
        strong_out = _apply_saved(strong, "strong", saved, splits_path)
        check_weak_splits(weak_out, splits_path, "saved")
        return weak_out, strong_out
    weak_out = _split_set(weak, weak_proportions, seed, stratify=True)
    strong_out = _split_set(strong, strong_proportions, seed, stratify=False)
    given = bool(weak) and all(r.split is not None for r in weak)
    source = next((r.manifest for r in weak if r.manifest is not None), None)
    check_weak_splits(weak_out, source, "column" if given else "seeded", weak_proportions)
    write_splits_csv(splits_path, weak_out, strong_out)
    return weak_out, strong_out
