"""Time of ``patients_for_power`` (the "patients for 80% power" of every paired test in a
``compare`` summary) with and without its normal-approximation shortcut, on the paired
tests of a finished ``compare`` or ``compare --ablation`` folder (``results.json`` or
``ablation.json``). Both searches run in this process, one after the other, on the same
inputs; their results must be identical.

Usage: ``python benchmarks/archive/power_search.py OUT/ablation/ablation.json``. Prints one JSON
object: per paired test the inputs, the patient count (None: more than 20,000) and both
times, and the totals with their ratio.
"""

from __future__ import annotations

import argparse
import json
import re
import time
from pathlib import Path
from typing import Any

from lymphdx.core.errors import LymphdxError
from lymphdx.stats import power


def _search(inputs: tuple[float, float, float, float]) -> int | None:
    """``patients_for_power(auc_a, auc_b, rho, prevalence)``; None: more than 20,000."""
    try:
        return power.patients_for_power(*inputs)
    except LymphdxError:
        return None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("results", type=Path, help="results.json or ablation.json")
    args = parser.parse_args()
    results = json.loads(args.results.read_text())
    strategies = results["strategies"]
    prevalence = results["n_test_pos"] / results["n_test"]
    approximation = power.analytic_patients_for_power
    rows: list[dict[str, Any]] = []
    for name, test in results["paired_tests"].items():
        a, b = name.split(" vs ")
        rho = float(re.search(r"ρ = ([0-9.]+)", test["power_text"]).group(1))  # as reported
        inputs = (strategies[a]["test_auc_mean"], strategies[b]["test_auc_mean"], rho, prevalence)
        row: dict[str, Any] = {"test": name, "auc_a": inputs[0], "auc_b": inputs[1], "rho": rho}
        for label, fn in (("with_shortcut", approximation), ("without", lambda *a, **k: 0)):
            power.analytic_patients_for_power = fn  # type: ignore[assignment]
            start = time.perf_counter()
            row[f"n_{label}"] = _search(inputs)
            row[f"seconds_{label}"] = round(time.perf_counter() - start, 2)
        power.analytic_patients_for_power = approximation
        if row["n_with_shortcut"] != row["n_without"]:
            raise SystemExit(f"the two searches disagree: {row}")
        rows.append(row)
    total = {
        k: round(sum(r[f"seconds_{k}"] for r in rows), 1) for k in ("with_shortcut", "without")
    }
    print(
        json.dumps(
            {
                "results": str(args.results),
                "paired_tests": rows,
                "seconds": total,
                "speed_up": round(total["without"] / total["with_shortcut"], 2),
            },
            indent=1,
        )
    )


if __name__ == "__main__":
    main()
