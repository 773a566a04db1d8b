"""``results.md``'s "Calibration and operating point" section: per strategy and run, the
calibration intercept, slope, Brier score and ECE before → after recalibration with their
bootstrap intervals, and the sensitivity and specificity at the chosen threshold with
Wilson intervals (from ``results.json``'s ``calibration``, ``workflows.calibrate``)."""

from __future__ import annotations

from typing import Any

from lymphdx.reporting.html import escape, table
from lymphdx.reporting.table import label

__all__ = [
    "STATISTICS",
    "before_after",
    "calibration_html",
    "calibration_markdown",
    "calibration_rows",
]

STATISTICS = (("intercept", "+.2f"), ("slope", ".2f"), ("brier", ".3f"), ("ece", ".3f"))


def _value(stats: dict[str, Any], key: str, spec: str) -> str:
    """``v [lo, hi]`` of ``stats[key]``; "—" when undefined."""
    v = stats.get(key)
    if v is None:
        return "—"
    lo, hi = stats.get(f"{key}_ci95") or (None, None)
    ci = f" [{lo:{spec}}, {hi:{spec}}]" if lo is not None and hi is not None else ""
    return f"{v:{spec}}{ci}"


def before_after(run: dict[str, Any], key: str, spec: str) -> str:
    """``before → after`` of one statistic of a run's calibration record."""
    return f"{_value(run['before'], key, spec)} → {_value(run['after'], key, spec)}"


def _rate(point: dict[str, Any], key: str) -> str:
    v = point.get(key)
    if v is None:
        return "—"
    lo, hi = point.get(f"{key}_ci95") or (None, None)
    return f"{v:.2f} [{lo:.2f}, {hi:.2f}]" if lo is not None else f"{v:.2f}"


def _threshold(run: dict[str, Any]) -> str:
    point = run["operating_point"]
    target = (
        point["target"] if point.get("value") is None else f"{point['target']} {point['value']}"
    )
    if point.get("threshold") is not None:
        return f"{point['threshold']:.3f} ({target})"
    folds = [f["operating_point"]["threshold"] for f in run.get("folds", [])]
    return f"{', '.join(f'{t:.3f}' for t in folds)} per fold ({target})"


def calibration_rows(calibration: dict[str, Any]) -> tuple[list[str], list[list[str]]]:
    """The section's header and rows (one per strategy × run)."""
    header = [
        "Strategy",
        "run",
        "patients (events)",
        *(f"{name} before → after" for name, _ in STATISTICS),
        "threshold (target)",
        "sensitivity [95% CI]",
        "specificity [95% CI]",
    ]
    rows = []
    for name, entry in calibration.items():
        for run_name, run in entry["runs"].items():
            rows.append(
                [
                    label(name),
                    run_name,
                    f"{run['n']} ({run['events']})",
                    *(before_after(run, key, spec) for key, spec in STATISTICS),
                    _threshold(run),
                    _rate(run["operating_point"], "sensitivity"),
                    _rate(run["operating_point"], "specificity"),
                ]
            )
    return header, rows


def calibration_markdown(calibration: dict[str, Any] | None) -> str:
    """The section as Markdown ("" without calibration records)."""
    if not calibration:
        return ""
    header, rows = calibration_rows(calibration)
    lines = [
        "## Calibration and operating point",
        "",
        "| " + " | ".join(header) + " |",
        "|" + "---|" * len(header),
        *("| " + " | ".join(r) + " |" for r in rows),
        "",
    ]
    modes = {e["mode"] for e in calibration.values()}
    methods = {e["method"] for e in calibration.values()}
    lines.append(
        f"Recalibration: {', '.join(sorted(methods))}, fitted on {' / '.join(sorted(modes))}; "
        "statistics on the test patients (under cross-validation: all patients, each "
        "calibrated by a map and a threshold fitted on the other folds). Intercept: "
        "calibration-in-the-large (0 is ideal); slope: 1 is ideal, below 1 the "
        "probabilities are too extreme; ECE over 5 equal-width bins. Intervals: 95% "
        "stratified bootstrap (statistics), Wilson (sensitivity, specificity); — where "
        "undefined (e.g. a slope when the scores separate the classes). AUCs above are "
        "those of the uncalibrated scores (the maps are monotone)."
    )
    for name, entry in calibration.items():
        for run_name, run in entry["runs"].items():
            if run.get("warning"):
                lines.append(f"\n- {label(name)}, {run_name}: calibration set {run['warning']}.")
    return "\n".join(lines) + "\n"


def calibration_html(calibration: dict[str, Any] | None) -> str:
    """The section as HTML for ``lymphdx report`` ("" without calibration records)."""
    if not calibration:
        return ""
    header, rows = calibration_rows(calibration)
    notes = calibration_markdown(calibration).split("\n\n", 2)[-1].strip()
    paragraphs = "".join(
        f'<p class="note">{escape(p.strip().removeprefix("- "))}</p>' for p in notes.split("\n\n")
    )
    return "<h3>Calibration and operating point</h3>" + table(header, rows) + paragraphs
