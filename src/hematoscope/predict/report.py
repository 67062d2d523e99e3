"""Rendering predictions: rich tables for the terminal, CSV and JSON files.

Files are written as the batches come (:class:`ReportWriter`), so a 100k-image run never holds
all rows in memory, and atomically: the file appears complete or not at all. Every output ends
with the differential count: cells per class and their percentage of the classified cells, with
abstentions and unreadable files counted apart, like a haematology analyser's report.
"""
from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence, TextIO

from hematoscope import _io
from hematoscope._csv import safe_cell, safe_row
from hematoscope.bundle.prediction import DifferentialCount, Prediction, SkippedFile

if TYPE_CHECKING:
    from rich.table import Table

FORMATS = (".csv", ".json")


def merge_differentials(a: DifferentialCount, b: DifferentialCount) -> DifferentialCount:
    """The differential count of two runs (or batches) taken together."""
    reasons = dict(a.abstain_reasons)
    for why, n in b.abstain_reasons.items():
        reasons[why] = reasons.get(why, 0) + n
    return DifferentialCount(list(a.labels), {k: a.counts[k] + b.counts.get(k, 0) for k in a.labels},
                             a.abstained + b.abstained, reasons, a.skipped + b.skipped)


def empty_differential(labels: Sequence[str]) -> DifferentialCount:
    return DifferentialCount(list(labels), {k: 0 for k in labels}, 0, {}, 0)


def csv_columns(top_k: int) -> list[str]:
    cols = ["source", "prediction", "confidence", "abstain", "abstain_reason", "ood_score", "ood_flag", "views",
            "framing", "recolour"]
    for r in range(1, top_k + 1):
        cols += [f"top{r}", f"top{r}_prob"]
    return cols + ["error"]


class ReportWriter:
    """Stream per-image rows into a ``.csv`` or ``.json`` file, batch by batch.

    CSV: one row per image (``records()`` columns) and one per unreadable file (``error``
    column), text cells that a spreadsheet would run as a formula with a leading ``'`` (see
    :mod:`hematoscope._csv`); the differential count goes to a sibling
    ``<name>.differential.csv``. JSON: one object with ``model``, ``predictions`` (rows),
    ``skipped`` and ``differential``.

    Args:
        path: output file; its suffix picks the format.
        labels: the model's class names.
        top_k: classes listed per image.
        model: a JSON-able description of the model (JSON output only).

    Raises:
        ValueError: unknown file suffix.
    """

    def __init__(self, path: Path | str, labels: Sequence[str], *, top_k: int = 3, model: dict | None = None):
        self.path = Path(path)
        self.format = self.path.suffix.lower()
        if self.format not in FORMATS:
            raise ValueError(f"output must end in {' or '.join(FORMATS)}; got {self.path.name!r}")
        self.top_k = max(1, min(top_k, len(labels)))
        self.differential = empty_differential(labels)
        self.skipped: list[SkippedFile] = []
        self._model = model or {}
        self._rows = 0
        self._atomic = _io.atomic_path(self.path, self.format)
        self._file: TextIO = open(self._atomic.__enter__(), "w", encoding="utf-8", newline="")
        if self.format == ".csv":
            self._csv = csv.DictWriter(self._file, fieldnames=csv_columns(self.top_k), restval="",
                                       extrasaction="ignore")
            self._csv.writeheader()
        else:
            self._file.write('{\n"model": ' + json.dumps(self._model, default=str) + ',\n"predictions": [\n')

    def add(self, pred: Prediction) -> None:
        """Append one batch."""
        self.differential = merge_differentials(self.differential, pred.differential())
        self.skipped.extend(pred.skipped)
        if self.format == ".csv":
            self._csv.writerows(safe_row(r) for r in pred.records(self.top_k))
            return
        for row in pred.records(self.top_k)[:len(pred)]:
            self._file.write((",\n" if self._rows else "") + json.dumps(row))
            self._rows += 1

    def close(self) -> Path:
        """Finish the file and move it into place; returns its path."""
        diff = self.differential.to_dict()
        if self.format == ".json":
            skipped = [{"source": s.source, "reason": s.reason} for s in self.skipped]
            self._file.write('\n],\n"skipped": ' + json.dumps(skipped, indent=1) +
                             ',\n"differential": ' + json.dumps(diff, indent=1) + "\n}\n")
        self._file.close()
        self._atomic.__exit__(None, None, None)
        if self.format == ".csv":
            write_differential_csv(self.differential, self.path.with_suffix(".differential.csv"))
        return self.path

    def abort(self) -> None:
        """Drop the partial file (e.g. after an error)."""
        self._file.close()
        self._atomic.__exit__(RuntimeError, RuntimeError("aborted"), None)

    def __enter__(self) -> "ReportWriter":
        return self

    def __exit__(self, exc_type, *_: Any) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()


def write_csv(pred: Prediction, path: Path | str, *, top_k: int = 3) -> Path:
    """Write one Prediction as CSV (plus ``<name>.differential.csv``)."""
    with ReportWriter(path, pred.labels, top_k=top_k) as w:
        w.add(pred)
    return Path(path)


def write_json(pred: Prediction, path: Path | str, *, top_k: int = 3, model: dict | None = None) -> Path:
    """Write one Prediction as JSON (rows, skipped files and the differential count)."""
    with ReportWriter(path, pred.labels, top_k=top_k, model=model) as w:
        w.add(pred)
    return Path(path)


def write_differential_csv(diff: DifferentialCount, path: Path | str) -> Path:
    """The differential count as a small CSV: one row per class, then abstained and skipped."""
    import io

    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(["class", "count", "percent"])
    pct = diff.percent()
    for label in diff.labels:
        writer.writerow([safe_cell(label), diff.counts[label], f"{pct[label]:.2f}"])
    writer.writerow(["abstained", diff.abstained, ""])
    writer.writerow(["unreadable", diff.skipped, ""])
    return _io.write_text(path, buf.getvalue())


# --- terminal ------------------------------------------------------------------------------
def differential_table(diff: DifferentialCount, title: str = "Differential count",
                       classes: Sequence[str] | None = None) -> "Table":
    """Counts and % per class (of classified cells); abstained and unreadable apart. ``classes``:
    the classes answers could name (``predict --classes``), the only rows shown then (the others
    are 0 by construction)."""
    from rich.table import Table

    from hematoscope.taxonomy import TAXONOMY

    table = Table(title=title, title_justify="left")
    table.add_column("class")
    table.add_column("count", justify="right")
    table.add_column("%", justify="right")
    pct = diff.percent()
    shown = set(classes) if classes is not None else set(diff.labels)
    for label in diff.labels:
        if label in shown or diff.counts[label]:
            table.add_row(TAXONOMY.display(label), str(diff.counts[label]), f"{pct[label]:.1f}")
    table.add_section()
    table.add_row("[bold]classified", f"[bold]{diff.classified}", "100.0" if diff.classified else "")
    reasons = ", ".join(f"{why}: {n}" for why, n in sorted(diff.abstain_reasons.items()))
    table.add_row("abstained" + (f" ({reasons})" if reasons else ""), str(diff.abstained), "")
    table.add_row("unreadable files", str(diff.skipped), "")
    return table


def predictions_table(pred: Prediction, *, top_k: int = 3, limit: int | None = None) -> "Table":
    """Per-image rows: source, prediction (or abstained), top-k with probabilities."""
    from rich.table import Table

    table = Table(title="Predictions", title_justify="left")
    table.add_column("image", overflow="fold")
    table.add_column("prediction")
    table.add_column(f"top {top_k}")
    for i, top in enumerate(pred.top_k(top_k)[:limit]):
        label = top[0][0] if not pred.abstain[i] else f"[yellow]abstained[/] ({pred.abstain_reason[i]})"
        table.add_row(pred.sources[i], label, ", ".join(f"{lab} {p:.2f}" for lab, p in top))
    return table


def skipped_table(skipped: Sequence[SkippedFile], *, limit: int | None = None) -> "Table":
    """Unreadable files and why."""
    from rich.table import Table

    table = Table(title=f"Unreadable files ({len(skipped)})", title_justify="left")
    table.add_column("file", overflow="fold")
    table.add_column("reason")
    for s in skipped[:limit]:
        table.add_row(s.source, s.reason)
    return table

