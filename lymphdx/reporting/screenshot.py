"""A PNG of one part of ``report.html``, rendered by headless Chromium.

``screenshot_element`` copies the report's own style and one element (by ``id``) into a
page of its own and has Chromium draw it, so the picture shows what a reader of the
report sees (used by the test suite, and for the README's figure of the findings table).
"""

from __future__ import annotations

import re
import subprocess
import tempfile
from pathlib import Path

from lymphdx.core.errors import LymphdxError
from lymphdx.core.files import atomic_path

__all__ = ["screenshot_element"]

_STYLE = re.compile(r"<style>.*?</style>", re.S)


def screenshot_element(
    report: Path,
    element_id: str,
    out_png: Path,
    chromium: Path = Path("/usr/bin/chromium"),
    size: tuple[int, int] = (900, 260),
) -> Path:
    """Render the ``<div id="element_id">`` of ``report`` (a ``report.html``) alone, with
    the report's style, into ``out_png`` (``size``: the window in CSS pixels)."""
    page = Path(report).read_text(encoding="utf-8")
    element = re.search(rf'<div [^>]*id="{re.escape(element_id)}"[^>]*>.*?</div>', page, re.S)
    if element is None:
        raise LymphdxError(f"{report} has no element with id {element_id!r}")
    style = _STYLE.search(page)
    body = (
        '<!DOCTYPE html><html lang="en"><head><meta charset="utf-8">'
        f"{style.group(0) if style else ''}</head><body>{element.group(0)}</body></html>"
    )
    with tempfile.TemporaryDirectory(prefix="lymphdx-shot-") as tmp:
        html = Path(tmp) / "element.html"
        html.write_text(body, encoding="utf-8")
        with atomic_path(out_png) as target:
            subprocess.run(
                [
                    str(chromium),
                    "--headless",
                    "--no-sandbox",
                    "--disable-gpu",
                    "--hide-scrollbars",
                    "--disable-background-networking",
                    "--disable-component-update",
                    "--no-first-run",
                    f"--user-data-dir={Path(tmp) / 'profile'}",
                    f"--window-size={size[0]},{size[1]}",
                    f"--screenshot={target}",
                    html.as_uri(),
                ],
                capture_output=True,
                timeout=120,
                check=True,
            )
    return Path(out_png)
