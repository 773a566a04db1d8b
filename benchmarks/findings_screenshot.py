"""The README's figure of the report's findings table: ``lymphdx report`` on a compare
folder, then headless Chromium on the first overlay patient's table (the code path of
``tests/test_report.py::test_findings_table_screenshot_in_headless_chromium``).

Usage: python benchmarks/findings_screenshot.py COMPARE_FOLDER OUT.png
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

from lymphdx.reporting.screenshot import screenshot_element


def main() -> None:
    folder, out = Path(sys.argv[1]), Path(sys.argv[2])
    report = folder / "report.html"
    pid = re.findall(r'<div class="findings" id="findings-([^"]+)">', report.read_text())[0]
    screenshot_element(report, f"findings-{pid}", out, size=(760, 170))
    print(f"{out}: findings of patient {pid} in {report}")


if __name__ == "__main__":
    main()
