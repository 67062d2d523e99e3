"""CSV cells that a spreadsheet will not run as formulas.

Spreadsheets (Excel, LibreOffice, Google Sheets) treat a cell that starts with ``=``, ``+``,
``-`` or ``@`` as a formula, and a leading tab or carriage return can hide such a start. An
upload named ``=cmd|'/c calc'!A1.jpg`` would otherwise become a live formula in the report a
user opens. Following OWASP's advice, such text cells get a leading apostrophe, which
spreadsheets show as text. Numbers are written as numbers (``-0.5`` stays a number).

Used for the reports people open (``hematoscope predict --out x.csv``, the web app's
``report.csv``); machine-read files such as split CSVs keep paths verbatim.
"""
from __future__ import annotations

from typing import Any, Mapping

#: First characters that make a spreadsheet read a cell as a formula (or hide one).
FORMULA_STARTS = ("=", "+", "-", "@", "\t", "\r")


def safe_cell(value: Any) -> Any:
    """``value`` unchanged, unless it is text starting with a formula character: then the text
    with a ``'`` in front."""
    if isinstance(value, str) and value.startswith(FORMULA_STARTS):
        return "'" + value
    return value


def safe_row(row: Mapping[str, Any]) -> dict[str, Any]:
    """A CSV row (column → value) with every text cell made safe."""
    return {k: safe_cell(v) for k, v in row.items()}
