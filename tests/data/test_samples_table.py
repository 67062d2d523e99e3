"""The samples table's own rules (hematoscope.data.samples): which class a row is, table or path."""
import pandas as pd
import pytest

from hematoscope.data.readers import as_table
from hematoscope.data.samples import DatasetError, class_column, class_names, group_keys, make_table, resolve_group_by


def _table():
    return make_table([{"path": "/d/a.jpg", "label": "SNE", "patient": "p1"},
                       {"path": "/d/b.jpg", "label": "smudge-ish"},
                       {"path": "/d/c.jpg", "label": "LYT", "patient": "p1"}], dataset="matek")


def test_class_is_the_canonical_name_else_the_dataset_label():
    table = _table()
    assert class_column(table).tolist() == ["neutrophil_segmented", "smudge-ish", "lymphocyte_typical"]
    assert class_names(table) == ["lymphocyte_typical", "neutrophil_segmented", "smudge-ish"]
    # tables without a canonical column (hand-made) and empty or NaN cells fall back to the label
    assert class_column(pd.DataFrame({"label": ["x", "y"]})).tolist() == ["x", "y"]
    nan = pd.DataFrame({"label": ["x", "y", "z"], "canonical": [float("nan"), "", "monocyte"]})
    assert class_column(nan).tolist() == ["x", "y", "monocyte"]


def test_as_table_passes_tables_through_and_reads_paths(synthetic_root, tmp_path):
    table = _table()
    assert as_table(table) is table
    assert len(as_table(synthetic_root)) == len(as_table(str(synthetic_root), reader="folder")) > 0
    with pytest.raises(DatasetError, match="does not exist"):
        as_table(tmp_path / "missing")


def test_groups():
    table = _table()
    assert resolve_group_by(table) == "patient" and resolve_group_by(table, "none") is None
    with pytest.raises(ValueError, match="no such column.*ids \\(1 of them\\) are in 'patient'"):
        resolve_group_by(table, "slide")  # e.g. LISC's 'group' ids, which its reader puts in 'patient'
    assert group_keys(table, "patient").tolist() == ["id:matek|p1", "row:/d/b.jpg", "id:matek|p1"]
    assert group_keys(table, None) is None
