"""History of analyses in SQLite: what was uploaded (names, hashes, each image as a thumbnail
and at full size), which model answered, its predictions, the differential count and the
user's corrections.

Every write is one transaction; a new connection is opened per operation, so the store is safe
to use from the server's worker threads and survives restarts (the file is the state).

The file holds the image of every upload, so it is private: created with mode 0600 (a
world- or group-readable file of ours is tightened to 0600 when opened; SQLite gives its
``-wal`` / ``-shm`` files the same mode), and deleted analyses are overwritten on disk
(``PRAGMA secure_delete``), not merely unlinked from the tables.
"""
from __future__ import annotations

import json
import os
import sqlite3
import stat
import unicodedata
import uuid
from contextlib import closing, contextmanager
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any, Iterator

#: 2: analyses.sample (the lab's sample / slide id); 3: items.view (the cell at full size);
#: 4: analyses.model_ood_accept (the OOD flag's operating point the analysis was made at)
#: 5: items.heatmap_view (the explanation's map drawn over the full-size view)
SCHEMA_VERSION = 5
#: Longest sample id kept (a specimen, slide or run code, not a note).
SAMPLE_MAX = 100
_SCHEMA = """
CREATE TABLE IF NOT EXISTS analyses (
    id TEXT PRIMARY KEY,
    created TEXT NOT NULL,
    model_name TEXT NOT NULL,
    model_kind TEXT NOT NULL,
    model_id TEXT NOT NULL,
    model_version TEXT NOT NULL,
    labels TEXT NOT NULL,          -- JSON list, the model's classes in output order
    n_images INTEGER NOT NULL,
    n_errors INTEGER NOT NULL,
    differential TEXT NOT NULL,    -- JSON, DifferentialCount.to_dict()
    sample TEXT NOT NULL DEFAULT '', -- the lab's sample / slide id, as typed
    model_ood_accept REAL           -- share of validation cells the OOD flag accepted (NULL: as fitted)
);
CREATE INDEX IF NOT EXISTS analyses_created ON analyses (created);
CREATE TABLE IF NOT EXISTS items (
    analysis_id TEXT NOT NULL REFERENCES analyses (id) ON DELETE CASCADE,
    idx INTEGER NOT NULL,
    source TEXT NOT NULL,
    sha256 TEXT NOT NULL,
    result TEXT NOT NULL,          -- JSON: prediction fields, or {"error": reason}
    thumbnail BLOB,                -- JPEG
    heatmap BLOB,                  -- PNG overlay (Grad-CAM or segmentation)
    view BLOB,                     -- JPEG, the upload at up to VIEW_SIDE px (NULL before schema 3)
    heatmap_view BLOB,             -- JPEG, the explanation's map drawn over the view (NULL: no map, or before schema 5)
    PRIMARY KEY (analysis_id, idx)
);
CREATE TABLE IF NOT EXISTS corrections (
    analysis_id TEXT NOT NULL REFERENCES analyses (id) ON DELETE CASCADE,
    idx INTEGER NOT NULL,
    label TEXT NOT NULL,
    note TEXT NOT NULL DEFAULT '',
    updated TEXT NOT NULL,
    PRIMARY KEY (analysis_id, idx)
);
"""


class StorageError(ValueError):
    """The history database is unusable (e.g. written by a newer hematoscope)."""


class NotFound(KeyError):
    """No analysis (or no image in it) with that id / index."""


@dataclass
class StoredItem:
    """One uploaded file of an analysis: its result (or error) and small images to show it."""

    source: str
    sha256: str
    result: dict[str, Any]
    thumbnail: bytes | None = None
    heatmap: bytes | None = None
    #: the upload at up to ``analysis.VIEW_SIDE`` px, for a reviewer to look at closely (not read
    #: back by :meth:`HistoryStore.get`: :meth:`HistoryStore.view` serves one at a time)
    view: bytes | None = None
    #: the explanation's map drawn over ``view`` (None when the explanation has no map, e.g.
    #: segmentation outlines); written like ``view``, served by :meth:`HistoryStore.view`
    heatmap_view: bytes | None = None
    #: read back by :meth:`HistoryStore.get`: whether the item has a ``heatmap_view``
    has_heatmap_view: bool = False


@dataclass
class StoredAnalysis:
    """An analysis as read back from the store."""

    id: str
    created: str
    model: dict[str, Any]
    labels: list[str]
    differential: dict[str, Any]
    items: list[StoredItem] = field(default_factory=list)
    #: image index → {"label", "note", "updated"}
    corrections: dict[int, dict[str, str]] = field(default_factory=dict)
    sample: str = ""

    @property
    def n_errors(self) -> int:
        return sum("error" in it.result for it in self.items)


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds")


class HistoryStore:
    """The SQLite history file at ``path`` (created with its schema when missing).

    Raises:
        StorageError: the file's schema version is newer than this code understands.
    """

    def __init__(self, path: Path | str):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        _create_private(self.path)
        with self._transaction() as con:
            version = con.execute("PRAGMA user_version").fetchone()[0]
            if version > SCHEMA_VERSION:
                raise StorageError(f"{self.path} has history schema {version}; this hematoscope "
                                   f"reads up to {SCHEMA_VERSION}: upgrade hematoscope or use --db")
            if version == 1:  # histories written before sample ids keep their analyses
                con.execute("ALTER TABLE analyses ADD COLUMN sample TEXT NOT NULL DEFAULT ''")
            analysis_columns = {row[1] for row in con.execute("PRAGMA table_info(analyses)")}
            if analysis_columns and "model_ood_accept" not in analysis_columns:  # before schema 4: as fitted
                con.execute("ALTER TABLE analyses ADD COLUMN model_ood_accept REAL")
            item_columns = {row[1] for row in con.execute("PRAGMA table_info(items)")}
            if item_columns and "view" not in item_columns:  # written before full-size views: thumbnails stay
                con.execute("ALTER TABLE items ADD COLUMN view BLOB")
            if item_columns and "heatmap_view" not in item_columns:  # before schema 5: heatmaps as thumbnails
                con.execute("ALTER TABLE items ADD COLUMN heatmap_view BLOB")
            for statement in _SCHEMA.split(";"):  # executescript would COMMIT mid-transaction
                if statement.strip():
                    con.execute(statement)
            con.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
        # Held open, unused, while the store lives: when the last connection to a WAL database
        # closes, SQLite checkpoints the WAL into the file (with its fsyncs), which made every
        # write (one connection each) cost ~20 ms and capped the server near 45 analyses/s. WAL
        # checkpoints now happen at SQLite's usual size mark, and explicitly after deletions.
        # (otherwise unused, so any thread may close it)
        self._keeper: sqlite3.Connection | None = sqlite3.connect(self.path, timeout=30, check_same_thread=False)
        self._keeper.execute("PRAGMA user_version").fetchone()  # a connection opens the file on first use

    def close(self) -> None:
        """Close the store's idle connection (the last close checkpoints the WAL)."""
        if self._keeper is not None:
            self._keeper.close()
            self._keeper = None

    def _connect(self) -> sqlite3.Connection:
        con = sqlite3.connect(self.path, timeout=30, isolation_level=None)
        con.execute("PRAGMA foreign_keys = ON")
        con.execute("PRAGMA secure_delete = ON")  # deleted thumbnails are zeroed, not left in free pages
        con.execute("PRAGMA journal_mode = WAL")  # readers do not block the writer
        return con

    @contextmanager
    def _transaction(self) -> Iterator[sqlite3.Connection]:
        """One connection and one transaction: all of the block is written, or none of it."""
        with closing(self._connect()) as con:
            con.execute("BEGIN IMMEDIATE")
            try:
                yield con
            except BaseException:
                con.execute("ROLLBACK")
                raise
            con.execute("COMMIT")

    # --- writing -----------------------------------------------------------------------
    def add_analysis(self, model: dict[str, str], labels: list[str], differential: dict,
                     items: list[StoredItem], *, sample: str = "") -> str:
        """Store a new analysis and return its id.

        Args:
            model: ``name``, ``kind``, ``id`` and ``version`` of the bundle that answered, and
                ``ood_accept`` when its OOD flag was moved (:meth:`Bundle.set_ood_accept`).
            labels: the bundle's classes in output order (corrections must use one of them).
            differential: ``DifferentialCount.to_dict()`` of the batch.
            items: the uploaded files in upload order.
            sample: the lab's sample / slide id (:func:`clean_sample`).

        Raises:
            ValueError: a sample id :func:`clean_sample` refuses.
        """
        analysis_id = uuid.uuid4().hex
        sample = clean_sample(sample)
        with self._transaction() as con:
            con.execute(
                "INSERT INTO analyses (id, created, model_name, model_kind, model_id, model_version, labels, "
                "n_images, n_errors, differential, sample, model_ood_accept) "
                "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (analysis_id, _now(), model["name"], model["kind"], model["id"], model["version"],
                 json.dumps(labels), len(items), sum("error" in it.result for it in items),
                 json.dumps(differential), sample, model.get("ood_accept")),
            )
            con.executemany(
                "INSERT INTO items (analysis_id, idx, source, sha256, result, thumbnail, heatmap, view, heatmap_view) "
                "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                [(analysis_id, i, it.source, it.sha256, json.dumps(it.result), it.thumbnail, it.heatmap, it.view,
                  it.heatmap_view) for i, it in enumerate(items)],
            )
        return analysis_id

    def set_corrections(self, analysis_id: str, corrections: list[tuple[int, str | None, str]]) -> None:
        """Set (or with label None, remove) the user's label for images of an analysis.

        Args:
            corrections: ``(image index, label or None, note)`` triples.

        Raises:
            NotFound: unknown analysis or image index.
            ValueError: a label that is not one of the analysis' classes, or a correction for a
                file that could not be read.
        """
        with self._transaction() as con:
            row = con.execute("SELECT labels FROM analyses WHERE id = ?", (analysis_id,)).fetchone()
            if row is None:
                raise NotFound(analysis_id)
            labels = json.loads(row[0])
            results = dict(con.execute("SELECT idx, result FROM items WHERE analysis_id = ?", (analysis_id,)))
            now = _now()
            for idx, label, note in corrections:
                if idx not in results:
                    raise NotFound(f"{analysis_id} has no image {idx}")
                if label is None:
                    con.execute("DELETE FROM corrections WHERE analysis_id = ? AND idx = ?", (analysis_id, idx))
                    continue
                if label not in labels:
                    raise ValueError(f"label {label!r} is not one of this model's classes: {', '.join(labels)}")
                if "error" in json.loads(results[idx]):
                    raise ValueError(f"image {idx} could not be read, so it cannot be relabelled")
                con.execute(
                    "INSERT INTO corrections VALUES (?, ?, ?, ?, ?) ON CONFLICT (analysis_id, idx) "
                    "DO UPDATE SET label = excluded.label, note = excluded.note, updated = excluded.updated",
                    (analysis_id, idx, label, note, now),
                )

    def set_sample(self, analysis_id: str, sample: str) -> None:
        """Set (``""``: clear) the sample id of an analysis.

        Raises:
            NotFound: no analysis with that id.
            ValueError: a sample id :func:`clean_sample` refuses.
        """
        sample = clean_sample(sample)
        with self._transaction() as con:
            if con.execute("UPDATE analyses SET sample = ? WHERE id = ?", (sample, analysis_id)).rowcount == 0:
                raise NotFound(analysis_id)

    def delete(self, analysis_id: str) -> None:
        """Delete an analysis with its images, results and corrections.

        Raises:
            NotFound: no analysis with that id.
        """
        with self._transaction() as con:
            if con.execute("DELETE FROM analyses WHERE id = ?", (analysis_id,)).rowcount == 0:
                raise NotFound(analysis_id)
        self._checkpoint()

    def purge(self, *, older_than_days: float) -> int:
        """Delete every analysis created more than ``older_than_days`` ago; returns how many."""
        if older_than_days <= 0:
            raise ValueError(f"older_than_days must be positive, got {older_than_days}")
        cutoff = (datetime.now(timezone.utc) - timedelta(days=older_than_days)).isoformat(timespec="milliseconds")
        with self._transaction() as con:
            n = con.execute("DELETE FROM analyses WHERE created < ?", (cutoff,)).rowcount
        if n:
            self._checkpoint()
        return n

    def _checkpoint(self) -> None:
        """Copy the write-ahead log into the database file and empty it, so deleted rows do not
        linger in the ``-wal`` file either."""
        with closing(self._connect()) as con:
            con.execute("PRAGMA wal_checkpoint(TRUNCATE)")

    # --- reading -----------------------------------------------------------------------
    def get(self, analysis_id: str, *, images: bool = True) -> StoredAnalysis:
        """The full analysis (``images=False`` leaves thumbnails and heatmaps out).

        Raises:
            NotFound: no analysis with that id.
        """
        with closing(self._connect()) as con:
            row = con.execute("SELECT id, created, model_name, model_kind, model_id, model_version, labels, "
                              "differential, sample, model_ood_accept FROM analyses WHERE id = ?",
                              (analysis_id,)).fetchone()
            if row is None:
                raise NotFound(analysis_id)
            blobs = "thumbnail, heatmap" if images else "NULL, NULL"
            items = [StoredItem(src, sha, json.loads(res), thumb, heat, has_heatmap_view=bool(full))
                     for src, sha, res, thumb, heat, full in con.execute(
                         f"SELECT source, sha256, result, {blobs}, heatmap_view IS NOT NULL FROM items "
                         "WHERE analysis_id = ? ORDER BY idx", (analysis_id,))]
            corrections = {idx: {"label": lab, "note": note, "updated": upd} for idx, lab, note, upd in con.execute(
                "SELECT idx, label, note, updated FROM corrections WHERE analysis_id = ?", (analysis_id,))}
        return StoredAnalysis(
            id=row[0], created=row[1],
            model={"name": row[2], "kind": row[3], "id": row[4], "version": row[5], "ood_accept": row[9]},
            labels=json.loads(row[6]), differential=json.loads(row[7]), items=items, corrections=corrections,
            sample=row[8],
        )

    def view(self, analysis_id: str, index: int, *, heatmap: bool = False) -> bytes:
        """The JPEG of image ``index`` of an analysis at its stored full size (its thumbnail for
        analyses stored before full-size views); with ``heatmap``, its explanation's map drawn
        over it at that size.

        Raises:
            NotFound: no such analysis, no image with that index, or the image could not be read
                when it was uploaded (there is nothing to show); with ``heatmap``, also an image
                whose explanation has no map, or none was made.
        """
        column = "heatmap_view" if heatmap else "COALESCE(view, thumbnail)"
        with closing(self._connect()) as con:
            row = con.execute(f"SELECT {column} FROM items WHERE analysis_id = ? AND idx = ?",
                              (analysis_id, index)).fetchone()
        if row is None or row[0] is None:
            raise NotFound(f"{analysis_id}/{index}")
        return row[0]

    def list(self, *, limit: int = 50, offset: int = 0, sample: str | None = None) -> tuple[list[dict[str, Any]], int]:
        """Summaries of analyses, newest first, and how many there are: all of them, or with
        ``sample`` those whose sample id contains it (ASCII letters in either case: SQLite's LIKE)."""
        where, args = "", []
        if sample:
            escaped = sample.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")
            where, args = "WHERE a.sample LIKE ? ESCAPE '\\'", [f"%{escaped}%"]
        with closing(self._connect()) as con:
            total = con.execute(f"SELECT COUNT(*) FROM analyses a {where}", args).fetchone()[0]
            rows = con.execute(
                "SELECT a.id, a.created, a.model_name, a.model_kind, a.model_id, a.model_version, a.n_images, "
                "a.n_errors, a.differential, (SELECT COUNT(*) FROM corrections c WHERE c.analysis_id = a.id), "
                f"a.sample, a.model_ood_accept FROM analyses a {where} ORDER BY a.created DESC, a.rowid DESC "
                "LIMIT ? OFFSET ?",
                [*args, limit, offset],
            ).fetchall()
        out = [{
            "id": r[0], "created": r[1],
            "model": {"name": r[2], "kind": r[3], "id": r[4], "version": r[5], "ood_accept": r[11]},
            "n_images": r[6], "n_errors": r[7], "differential": json.loads(r[8]), "n_corrections": r[9],
            "sample": r[10],
        } for r in rows]
        return out, total


def clean_sample(sample: str | None) -> str:
    """A sample id as stored: surrounding spaces dropped; at most :data:`SAMPLE_MAX` characters
    and no control characters (it is shown in pages and written into CSV rows).

    Raises:
        ValueError: too long, or a control character in it.
    """
    sample = (sample or "").strip()
    if len(sample) > SAMPLE_MAX:
        raise ValueError(f"a sample id has at most {SAMPLE_MAX} characters; got {len(sample)}")
    if any(unicodedata.category(ch).startswith("C") for ch in sample):
        raise ValueError("a sample id cannot hold control characters (line breaks, tabs ...)")
    return sample


def _create_private(path: Path) -> None:
    """Create ``path`` empty with mode 0600 when missing; tighten it to 0600 when it is ours and
    readable by others (a history written by an older hematoscope)."""
    try:
        fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600)
    except FileExistsError:
        st = path.stat()
        if st.st_mode & 0o077 and hasattr(os, "getuid") and st.st_uid == os.getuid() and stat.S_ISREG(st.st_mode):
            os.chmod(path, 0o600)
        return
    os.close(fd)
