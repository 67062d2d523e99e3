"""One canonical taxonomy of blood cell types, and the mapping of every dataset's labels onto it.

Canonical names are snake_case. Types form a shallow tree (``neutrophil_segmented`` is a
``neutrophil``), so datasets that label at different granularity can still be compared on their
common ancestors. Unknown labels are returned as ``None`` and reported, never guessed.
"""
from __future__ import annotations

from dataclasses import dataclass, field

TAXONOMY_VERSION = "1"


@dataclass(frozen=True)
class CellType:
    name: str
    display: str
    parent: str | None = None
    synonyms: tuple[str, ...] = ()


@dataclass
class Taxonomy:
    version: str
    types: dict[str, CellType]
    #: dataset reader name → {dataset label (case-insensitive) → canonical name}
    mappings: dict[str, dict[str, str]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self._synonyms: dict[str, str] = {}
        for t in self.types.values():
            for s in (t.name, t.display, *t.synonyms):
                self._synonyms[_key(s)] = t.name
            if t.parent is not None and t.parent not in self.types:
                raise ValueError(f"{t.name}: unknown parent {t.parent!r}")
        for ds, m in self.mappings.items():
            for lab, canon in m.items():
                if canon not in self.types:
                    raise ValueError(f"mapping {ds}:{lab} → unknown type {canon!r}")

    def canonical(self, dataset: str | None, label: str) -> str | None:
        """The canonical name of ``label`` as used by ``dataset``; None when unmappable."""
        m = self.mappings.get(dataset or "", {})
        k = _key(label)
        for lab, canon in m.items():
            if _key(lab) == k:
                return canon
        return self._synonyms.get(k)

    def ancestors(self, name: str) -> list[str]:
        """``name`` followed by its parents up to the root."""
        out = []
        while name is not None:
            out.append(name)
            name = self.types[name].parent
        return out

    def match(self, label: str, targets: list[str]) -> str | None:
        """The member of ``targets`` that ``label`` falls under (itself or an ancestor), if any."""
        if label not in self.types:
            return None
        for a in self.ancestors(label):
            if a in targets:
                return a
        return None

    def display(self, name: str) -> str:
        return self.types[name].display if name in self.types else name


def _key(s: str) -> str:
    return "".join(ch for ch in s.lower() if ch.isalnum())


_TYPES = [
    CellType("neutrophil", "Neutrophil", synonyms=("neutrophils", "NEUTROPHIL")),
    CellType("neutrophil_segmented", "Segmented neutrophil", "neutrophil", ("SNE", "segmented neutrophil")),
    CellType("neutrophil_band", "Band neutrophil", "neutrophil", ("BNE", "band neutrophil", "band")),
    CellType("eosinophil", "Eosinophil", synonyms=("eosinophils",)),
    CellType("basophil", "Basophil", synonyms=("basophils",)),
    CellType("lymphocyte", "Lymphocyte", synonyms=("lymphocytes",)),
    CellType("monocyte", "Monocyte", synonyms=("monocytes",)),
    CellType("immature_granulocyte", "Immature granulocyte", synonyms=("ig", "immature granulocytes")),
    CellType("erythroblast", "Erythroblast", synonyms=("erythroblasts", "nrbc", "nucleated red blood cell")),
    CellType("platelet", "Platelet", synonyms=("platelets", "thrombocyte")),
]

TAXONOMY = Taxonomy(
    version=TAXONOMY_VERSION,
    types={t.name: t for t in _TYPES},
    mappings={
        "pbc": {"ig": "immature_granulocyte"},
    },
)
