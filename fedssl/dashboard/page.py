"""The dashboard's one HTML page, self-contained: uPlot, the style and the script are inlined.

The live page and the exported report are the same page: the live one carries no data and opens
the server-sent event stream; the exported one carries the snapshot as JSON and opens nothing,
so it can be viewed with no server and no network.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

STATIC = Path(__file__).resolve().parent / "static"
# uPlot (MIT, https://github.com/leeoniya/uPlot), vendored from the npm package uplot@1.6.32: see static/uPlot.LICENSE.
UPLOT_JS, UPLOT_CSS = "uPlot.iife.min.js", "uPlot.min.css"
TEMPLATE, SCRIPT, STYLE = "dashboard.html", "dashboard.js", "dashboard.css"
MARKER = re.compile(r"/\*(?:UPLOT_CSS|DASHBOARD_CSS|UPLOT_JS|CONFIG_JSON|DASHBOARD_JS)\*/")


def _read(name: str) -> str:
    return (STATIC / name).read_text(encoding="utf-8")


def _script_safe(text: str) -> str:
    """Text inside <script>: a '</' (e.g. '</script>' in a ledger's reason) must not end the element."""
    return text.replace("</", "<\\/")


def render_page(*, live: bool, snapshot: dict[str, Any] | None = None) -> str:
    config = json.dumps({"live": live, "snapshot": snapshot}, allow_nan=False)
    parts = {
        "/*UPLOT_CSS*/": _read(UPLOT_CSS),
        "/*DASHBOARD_CSS*/": _read(STYLE),
        "/*UPLOT_JS*/": _script_safe(_read(UPLOT_JS)),
        "/*CONFIG_JSON*/": _script_safe(config),
        "/*DASHBOARD_JS*/": _script_safe(_read(SCRIPT)),
    }
    # One pass over the template: text that was inlined is never searched for markers again.
    return MARKER.sub(lambda match: parts[match.group(0)], _read(TEMPLATE))


def export_html(snapshot: dict[str, Any], path: Path) -> Path:
    """Write the static report: one file, data embedded, nothing fetched when it is opened."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(render_page(live=False, snapshot=snapshot), encoding="utf-8")
    return path
