"""One canonical taxonomy of blood cell types, and the mapping of every dataset's labels onto it.

Canonical names are snake_case. Types form a shallow tree (``neutrophil_segmented`` is a
``neutrophil``), so datasets that label at different granularity can still be compared on their
common ancestors. Unknown labels are returned as ``None`` and reported, never guessed.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterable, Mapping

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
                other = self._synonyms.setdefault(_key(s), t.name)
                if other != t.name:
                    raise ValueError(f"synonym {s!r} of {t.name} already names {other}")
            if t.parent is not None and t.parent not in self.types:
                raise ValueError(f"{t.name}: unknown parent {t.parent!r}")
        self._mapped: dict[str, dict[str, str]] = {}
        for ds, m in self.mappings.items():
            for lab, canon in m.items():
                if canon not in self.types:
                    raise ValueError(f"mapping {ds}:{lab} → unknown type {canon!r}")
            self._mapped[ds] = {_key(lab): canon for lab, canon in m.items()}

    def canonical(self, dataset: str | None, label: str) -> str | None:
        """The canonical name of ``label`` as used by ``dataset``; None when unmappable.

        The dataset's own mapping wins; otherwise any type name, display name or synonym matches
        (case, spaces and punctuation ignored).
        """
        k = _key(str(label))
        return self._mapped.get(dataset or "", {}).get(k) or self._synonyms.get(k)

    def children(self, name: str) -> list[str]:
        """Direct sub-types of ``name``."""
        return [t.name for t in self.types.values() if t.parent == name]

    def descendants(self, name: str) -> list[str]:
        """``name`` and every type below it."""
        return [t for t in self.types if name in self.ancestors(t)]

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
    CellType("neutrophil", "Neutrophil", synonyms=("neutrophils",)),
    CellType("neutrophil_segmented", "Segmented neutrophil", "neutrophil", ("SNE", "NGS", "segmented neutrophil")),
    CellType("neutrophil_band", "Band neutrophil", "neutrophil", ("BNE", "NGB", "band neutrophil", "band", "neutrophil banded")),
    CellType("eosinophil", "Eosinophil", synonyms=("eosinophils",)),
    CellType("basophil", "Basophil", synonyms=("basophils",)),
    CellType("lymphocyte", "Lymphocyte", synonyms=("lymphocytes",)),
    CellType("lymphocyte_typical", "Typical lymphocyte", "lymphocyte", ("LYT", "typical lymphocyte")),
    CellType("lymphocyte_atypical", "Atypical (reactive) lymphocyte", "lymphocyte", ("LYA", "atypical lymphocyte", "reactive lymphocyte", "variant lymphocyte")),
    CellType("lymphocyte_normal", "Normal lymphoid cell (C-NMC hem)", "lymphocyte", ("normal lymphocyte",)),
    CellType("monocyte", "Monocyte", synonyms=("monocytes",)),
    CellType("immature_granulocyte", "Immature granulocyte", synonyms=("ig", "immature granulocytes")),
    CellType("promyelocyte", "Promyelocyte", "immature_granulocyte", ("PMO", "PMY", "promyelocytes")),
    CellType("promyelocyte_bilobed", "Promyelocyte (bilobed)", "promyelocyte", ("PMB", "bilobed promyelocyte")),
    CellType("myelocyte", "Myelocyte", "immature_granulocyte", ("MYO", "MY", "myelocytes")),
    CellType("metamyelocyte", "Metamyelocyte", "immature_granulocyte", ("MMZ", "MMY", "metamyelocytes")),
    CellType("blast", "Blast", synonyms=("blasts", "blast cell")),
    CellType("myeloblast", "Myeloblast", "blast", ("MYB", "myeloblasts")),
    CellType("monoblast", "Monoblast", "blast", ("MOB", "monoblasts")),
    CellType("lymphoblast", "Lymphoblast (ALL)", "blast", ("lymphoblasts", "ALL blast")),
    CellType("erythroblast", "Erythroblast", synonyms=("erythroblasts", "EBO", "ERB", "nrbc", "nucleated red blood cell")),
    CellType("platelet", "Platelet", synonyms=("platelets", "thrombocyte", "thrombocytes")),
    CellType("smudge_cell", "Smudge cell", synonyms=("KSC", "smudge cells", "basket cell")),
]

_PBC = {"basophil": "basophil", "eosinophil": "eosinophil", "erythroblast": "erythroblast",
        "ig": "immature_granulocyte", "lymphocyte": "lymphocyte", "monocyte": "monocyte",
        "neutrophil": "neutrophil", "platelet": "platelet"}
_WBC5 = {"basophil": "basophil", "eosinophil": "eosinophil", "lymphocyte": "lymphocyte",
         "monocyte": "monocyte", "neutrophil": "neutrophil"}

TAXONOMY = Taxonomy(
    version=TAXONOMY_VERSION,
    types={t.name: t for t in _TYPES},
    mappings={
        "pbc": _PBC,
        "bloodmnist": _PBC,
        "matek": {
            "BAS": "basophil", "EBO": "erythroblast", "EOS": "eosinophil", "KSC": "smudge_cell",
            "LYA": "lymphocyte_atypical", "LYT": "lymphocyte_typical", "MMZ": "metamyelocyte",
            "MOB": "monoblast", "MON": "monocyte", "MYB": "myeloblast", "MYO": "myelocyte",
            "NGB": "neutrophil_band", "NGS": "neutrophil_segmented", "PMB": "promyelocyte_bilobed",
            "PMO": "promyelocyte",
        },
        "raabin": {k.capitalize(): v for k, v in _WBC5.items()},
        "bccd": {k.upper(): v for k, v in _WBC5.items()},
        "lisc": dict(_WBC5),
        "cnmc": {"all": "lymphoblast", "hem": "lymphocyte_normal"},
        "hida": {
            "basophil": "basophil", "eosinophil": "eosinophil", "erythroblast": "erythroblast",
            "myeloblast": "myeloblast", "promyelocyte": "promyelocyte", "myelocyte": "myelocyte",
            "metamyelocyte": "metamyelocyte", "neutrophil_banded": "neutrophil_band",
            "neutrophil_segmented": "neutrophil_segmented", "monocyte": "monocyte",
            "lymphocyte_typical": "lymphocyte_typical",
        },
    },
)


def unmapped_labels(table) -> dict[str, dict[str, int]]:
    """Labels of a samples table that have no canonical name: ``{dataset: {label: count}}``.

    Rows with such labels stay in the table (``canonical`` is None); callers report them.
    """
    if len(table) == 0:
        return {}
    rows = table[table["canonical"].isna()]
    out: dict[str, dict[str, int]] = {}
    for (ds, label), n in rows.groupby(["dataset", "label"], dropna=False).size().items():
        out.setdefault(str(ds), {})[str(label)] = int(n)
    return out


def unknown_labels_note(counts: Mapping[str, str], known: Iterable[str] = (), *, what: str = "each a class of its own"
                        ) -> str | None:
    """A warning naming the labels the taxonomy does not know (``counts``: label → how many, as
    text), each with the known class it is probably a typo of; None when there are none. Unknown
    labels are kept (a lab's own classes are fine), so a typo would silently make an extra class.

    Args:
        known: other class names the data has, also offered as corrections.
        what: what becomes of such a label, for the message.
    """
    import difflib

    if not counts:
        return None
    names = sorted(set(TAXONOMY.types) | set(known))
    parts = []
    for label in sorted(counts):
        near = difflib.get_close_matches(str(label).lower(), names, n=1, cutoff=0.75)
        parts.append(f"'{label}' ({counts[label]}" + (f"; did you mean '{near[0]}'?)" if near else ")"))
    more = f" and {len(parts) - 20} more" if len(parts) > 20 else ""
    return (f"{len(parts)} label(s) the taxonomy does not know, {what}: {', '.join(parts[:20])}{more}. "
            "Fix typos in the data (see `hematoscope data check`); labels of your own are fine.")


def taxonomy_markdown(taxonomy: Taxonomy = TAXONOMY) -> str:
    """The taxonomy as Markdown tables (the content of ``docs/taxonomy.md``)."""

    def path(name: str) -> str:
        return " ⊂ ".join(f"`{a}`" for a in taxonomy.ancestors(name))

    lines = [
        "# Cell-type taxonomy",
        "",
        "<!-- Generated by hematoscope.taxonomy.taxonomy_markdown(); do not edit by hand. -->",
        "",
        f"Taxonomy version {taxonomy.version}. Every dataset label is mapped onto one canonical type;",
        "types form a shallow tree, so datasets labelled at different granularity are compared on",
        "their common ancestors (a `neutrophil_segmented` prediction counts as `neutrophil` against",
        "PBC's `neutrophil` folder). Labels without a mapping keep `canonical = None` and are reported",
        "by `hematoscope data check`, never dropped silently. Matching ignores case, spaces and punctuation.",
        "",
        "## Cell types",
        "",
        "| canonical name | display name | parent | synonyms |",
        "|---|---|---|---|",
    ]
    for t in taxonomy.types.values():
        parent = f"`{t.parent}`" if t.parent else ""
        lines.append(f"| `{t.name}` | {t.display} | {parent} | {', '.join(t.synonyms)} |")
    for ds in sorted(taxonomy.mappings):
        lines += ["", f"## Dataset `{ds}`", "", "| dataset label | canonical type (⊂ ancestors) |", "|---|---|"]
        lines += [f"| {lab} | {path(canon)} |" for lab, canon in taxonomy.mappings[ds].items()]
    return "\n".join(lines) + "\n"
