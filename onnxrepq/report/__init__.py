"""Quantization reports: report.json (the numbers) and report.html (the same, drawn)."""
from __future__ import annotations

from pathlib import Path
from typing import Any


def write_report(result, config, folder: str | Path) -> dict[str, Any]:
    """Measure ``result`` (a QuantizeResult) against its float model; write report.json and report.html."""
    from .html_report import write_html
    from .json_report import build_report, write_json

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    report = build_report(result, config)
    write_json(report, folder / "report.json")
    write_html(report, folder / "report.html")
    return report
