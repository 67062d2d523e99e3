"""CSV / JSON outputs and the differential count."""
from __future__ import annotations

import csv
import json

import numpy as np
import pytest

from hematoscope.bundle.prediction import LOW_CONFIDENCE, Prediction, SkippedFile
from hematoscope.predict.report import (ReportWriter, differential_table, merge_differentials, write_csv,
                                        write_json)

LABELS = ["lymphocyte", "monocyte", "neutrophil"]


def _pred(probs, abstain=None, skipped=()):
    probs = np.asarray(probs, float)
    n = len(probs)
    abstain = np.zeros(n, bool) if abstain is None else np.asarray(abstain)
    reasons = [LOW_CONFIDENCE if a else None for a in abstain]
    return Prediction(LABELS, probs, [f"img{i}.jpg" for i in range(n)], np.full(n, np.nan), np.zeros(n, bool),
                      abstain, reasons, list(skipped))


BATCH_1 = _pred([[0.8, 0.1, 0.1], [0.2, 0.7, 0.1]], skipped=[SkippedFile("bad.jpg", "truncated file")])
BATCH_2 = _pred([[0.1, 0.1, 0.8], [0.4, 0.3, 0.3]], abstain=[False, True])


def test_csv_streams_rows_and_writes_the_differential(tmp_path):
    out = tmp_path / "preds.csv"
    with ReportWriter(out, LABELS, top_k=2) as writer:
        writer.add(BATCH_1)
        writer.add(BATCH_2)
    rows = list(csv.DictReader(out.open()))
    assert [r["prediction"] for r in rows] == ["lymphocyte", "monocyte", "", "neutrophil", "lymphocyte"]
    assert rows[2] == {**{k: "" for k in rows[2]}, "source": "bad.jpg", "error": "truncated file"}
    assert rows[4]["abstain"] == "True" and rows[4]["abstain_reason"] == LOW_CONFIDENCE
    assert rows[1]["top2"] == "lymphocyte" and float(rows[1]["top2_prob"]) == 0.2
    assert "top3" not in rows[0]
    diff = list(csv.reader((tmp_path / "preds.differential.csv").open()))
    assert diff[1:4] == [["lymphocyte", "1", "33.33"], ["monocyte", "1", "33.33"], ["neutrophil", "1", "33.33"]]
    assert diff[4:] == [["abstained", "1", ""], ["unreadable", "1", ""]]


def test_json_has_rows_skipped_and_differential(tmp_path):
    out = write_json(Prediction.concat([BATCH_1, BATCH_2]), tmp_path / "preds.json", model={"name": "m"})
    data = json.loads(out.read_text())
    assert data["model"] == {"name": "m"}
    assert [r["source"] for r in data["predictions"]] == [f"img{i}.jpg" for i in (0, 1, 0, 1)]
    assert data["skipped"] == [{"source": "bad.jpg", "reason": "truncated file"}]
    d = data["differential"]
    assert d["classified"] == 3 and d["abstained"] == 1 and d["skipped"] == 1 and d["total"] == 5
    assert d["abstain_reasons"] == {LOW_CONFIDENCE: 1}
    assert [c["count"] for c in d["classes"]] == [1, 1, 1]


def test_merged_differential_equals_the_whole(tmp_path):
    whole = Prediction.concat([BATCH_1, BATCH_2]).differential()
    merged = merge_differentials(BATCH_1.differential(), BATCH_2.differential())
    assert merged.to_dict() == whole.to_dict()
    from rich.console import Console

    console = Console(record=True, width=100)
    console.print(differential_table(merged))
    text = console.export_text()
    assert "Neutrophil" in text and "33.3" in text and "unreadable files" in text


def test_a_failed_run_leaves_no_partial_file(tmp_path):
    out = tmp_path / "preds.csv"
    with pytest.raises(RuntimeError):
        with ReportWriter(out, LABELS) as writer:
            writer.add(BATCH_1)
            raise RuntimeError("interrupted")
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(ValueError, match=".csv or .json"):
        write_csv(BATCH_1, tmp_path / "preds.xlsx")
