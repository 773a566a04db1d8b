"""Patient-wise train/val/test splits of the manifests' records.

Split sizes (``split_counts``) follow the given proportions by largest remainder; the
seeded assignment (``assign_splits``) is stratified by label for the weak set. A run
folder's ``splits.csv`` (``write_splits_csv``, ``read_splits_csv``) wins over a manifest's
``split`` column, which wins over a seeded split (``resolve_splits``); the weak set's
splits must each hold both classes (``check_weak_splits``).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import replace
from fractions import Fraction
from pathlib import Path
from typing import NamedTuple, TypeVar

from lymphdx.core.errors import ConfigError, InputError
from lymphdx.core.files import write_csv
from lymphdx.core.seeding import seeded_rng
from lymphdx.data.manifest import (
    MAX_LISTED,
    SPLITS,
    Problems,
    StrongRecord,
    WeakRecord,
    parse_label,
    read_rows,
)

__all__ = [
    "SPLITS_FILE",
    "SplitEntry",
    "assign_splits",
    "check_weak_splits",
    "read_splits_csv",
    "resolve_splits",
    "split_counts",
    "write_splits_csv",
]

SPLITS_FILE = "splits.csv"
_SETS = ("weak", "strong")


Record = TypeVar("Record", WeakRecord, StrongRecord)


class SplitEntry(NamedTuple):
    """One row of ``splits.csv``: the patient's split and (weak set only) its label."""

    split: str
    label: int | None


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

    Not sklearn's ``train_test_split``: it neither keeps counts such as ``(90, 10, 23)``
    exactly nor promises both classes in a small val split (and would re-draw every seed).
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
    rng = seeded_rng(seed)
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
    rows = []
    for set_name, records in (("weak", weak), ("strong", strong)):
        for r in sorted(records, key=lambda r: r.patient_id):
            if r.split not in SPLITS:
                raise ValueError(f"{set_name} patient {r.patient_id!r} has no split")
            label = str(int(r.label)) if isinstance(r, WeakRecord) else ""
            rows.append([set_name, r.patient_id, r.split, label])
    write_csv(path, ["set", "patient_id", "split", "label"], rows)
    return path


def read_splits_csv(path: str | Path) -> dict[tuple[str, str], SplitEntry]:
    """Read a ``splits.csv``: ``{(set, patient_id): SplitEntry(split, label)}``.

    Raises:
        InputError: unreadable file, missing columns, or a bad set/split/label value.
    """
    path = Path(path)
    _, rows = read_rows(path, ("set", "patient_id", "split", "label"), "splits file")
    problems = Problems(path, "splits file")
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
        label = parse_label(label_text) if label_text else None
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
    text = ", ".join(repr(p) for p in ids[:MAX_LISTED])
    return text + (f" and {len(ids) - MAX_LISTED} more" if len(ids) > MAX_LISTED else "")


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
        shown = "; ".join(f"{pid!r} ({why})" for pid, why in conflicts[:MAX_LISTED])
        more = f" and {len(conflicts) - MAX_LISTED} more" if len(conflicts) > MAX_LISTED else ""
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
    # too few of a class: no split (column, shares or splits.csv) can help, only patients
    sizes = {0: len(weak) - n_pos, 1: n_pos}
    scarce = min(sizes, key=lambda c: (sizes[c], c))
    if sizes[scarce] < len(SPLITS):
        have = (
            f"All {len(weak)} patients are labelled {1 - scarce}"
            if sizes[scarce] == 0
            else f"Only {sizes[scarce]} of the {len(weak)} patients "
            f"{'is' if sizes[scarce] == 1 else 'are'} labelled {scarce}"
        )
        raise InputError(
            problem + f"{have}: a weak set needs both labels, at least one of each in "
            f"each of train, val and test, so at least {len(SPLITS)} patients labelled "
            f"{scarce} (1: metastatic lymph nodes, 0: none); about 40 patients or more "
            "are needed for a validation split that can choose a model. Fix: add "
            f"patients labelled {scarce}, or check the manifest's label column",
            source,
        )
    if origin == "column":
        problem += (
            "Fix: give every split of the manifest's split column positives and negatives "
            "(at least one of each in val and test), or delete the split column so that "
            "lymphdx makes a stratified split"
        )
    elif origin == "seeded":
        shown = "/".join(f"{p:g}" for p in proportions) if proportions is not None else "?"
        # shares that split this many patients (each class has >= 3 here, so n >= 6)
        example = (
            "[60, 20, 20], which splits from about 9 patients"
            if len(weak) >= 9
            else "[1, 1, 1], equal shares, which split from 6 patients"
        )
        problem += (
            f"The set has {len(weak)} patients, {n_pos} with label 1 and "
            f"{len(weak) - n_pos} with label 0; the stratified split (proportions "
            f"train/val/test {shown}, data.split.weak) gives each split both classes only "
            "when each class has at least 3 patients and val and test at least 2 each; "
            "the default 90/10/23 gives val 2 patients only from 21 weak patients on, and "
            "about 40 or more are needed for a validation split that can choose a model. "
            f"Fix: add patients, set data.split.weak to larger val and test shares (e.g. "
            f"{example}), or add a split column (train/val/test) to the manifest"
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
