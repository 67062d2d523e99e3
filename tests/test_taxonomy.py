from pathlib import Path

import pandas as pd
import pytest

from hematoscope.taxonomy import TAXONOMY, CellType, Taxonomy, taxonomy_markdown, unmapped_labels

DOC = Path(__file__).resolve().parents[1] / "docs" / "taxonomy.md"


def test_every_dataset_label_maps_to_a_known_type():
    for ds, mapping in TAXONOMY.mappings.items():
        for label, canon in mapping.items():
            assert TAXONOMY.canonical(ds, label) == canon
            assert TAXONOMY.canonical(ds, label.lower()) == canon  # case-insensitive


@pytest.mark.parametrize("dataset,label,expected,ancestor", [
    ("matek", "NGS", "neutrophil_segmented", "neutrophil"),
    ("matek", "PMB", "promyelocyte_bilobed", "immature_granulocyte"),
    ("matek", "MYB", "myeloblast", "blast"),
    ("pbc", "ig", "immature_granulocyte", "immature_granulocyte"),
    ("cnmc", "all", "lymphoblast", "blast"),
    ("cnmc", "hem", "lymphocyte_normal", "lymphocyte"),
    ("hida", "neutrophil_banded", "neutrophil_band", "neutrophil"),
    ("raabin", "Lymphocyte", "lymphocyte", "lymphocyte"),
])
def test_cross_dataset_matching(dataset, label, expected, ancestor):
    canon = TAXONOMY.canonical(dataset, label)
    assert canon == expected
    assert ancestor in TAXONOMY.ancestors(canon)
    assert TAXONOMY.match(canon, ["basophil", ancestor]) == ancestor


def test_synonyms_and_unknowns():
    assert TAXONOMY.canonical(None, "Immature Granulocytes") == "immature_granulocyte"
    assert TAXONOMY.canonical("folder", "NEUTROPHIL") == "neutrophil"
    assert TAXONOMY.canonical("cnmc", "artefact") is None
    assert TAXONOMY.canonical("folder", "all") is None  # "all" means lymphoblast only in C-NMC
    assert TAXONOMY.match("no_such_type", ["neutrophil"]) is None
    assert TAXONOMY.match("lymphocyte", ["neutrophil"]) is None


def test_tree_queries():
    assert set(TAXONOMY.children("immature_granulocyte")) == {"promyelocyte", "myelocyte", "metamyelocyte"}
    assert "promyelocyte_bilobed" in TAXONOMY.descendants("immature_granulocyte")
    assert TAXONOMY.display("smudge_cell") == "Smudge cell"


def test_inconsistent_taxonomies_are_rejected():
    with pytest.raises(ValueError, match="unknown parent"):
        Taxonomy("x", {"a": CellType("a", "A", parent="b")})
    with pytest.raises(ValueError, match="unknown type"):
        Taxonomy("x", {"a": CellType("a", "A")}, {"ds": {"l": "b"}})
    with pytest.raises(ValueError, match="already names"):
        Taxonomy("x", {"a": CellType("a", "A", synonyms=("z",)), "b": CellType("b", "B", synonyms=("Z",))})


def test_unmapped_labels_counts_per_dataset():
    table = pd.DataFrame({"path": list("abcd"), "label": ["x", "x", "ig", "y"],
                          "canonical": [None, None, "immature_granulocyte", None], "dataset": ["folder"] * 3 + ["csv"]})
    assert unmapped_labels(table) == {"folder": {"x": 2}, "csv": {"y": 1}}


def test_taxonomy_doc_is_up_to_date():
    assert DOC.read_text(encoding="utf-8") == taxonomy_markdown(), (
        "docs/taxonomy.md is stale; regenerate with: python -c \"from hematoscope.taxonomy import "
        "taxonomy_markdown as m; print(m(), end='')\" > docs/taxonomy.md")
