"""The SQLite history: transactional writes, schema versioning, read-back."""
from __future__ import annotations

import sqlite3

import pytest

from hematoscope.serve.storage import HistoryStore, NotFound, StorageError, StoredItem

MODEL = {"name": "m", "kind": "neural", "id": "abc", "version": "1"}
LABELS = ["neutrophil", "lymphocyte"]
DIFF = {"classes": [], "classified": 1, "abstained": 0, "abstain_reasons": {}, "skipped": 1, "total": 2}


def _items():
    ok = {"prediction": "neutrophil", "confidence": 0.9, "abstain": False}
    return [StoredItem("a.jpg", "0" * 64, ok, b"jpeg", b"png"), StoredItem("b.jpg", "1" * 64, {"error": "empty file"})]


def test_round_trip(tmp_path):
    store = HistoryStore(tmp_path / "h.sqlite3")
    aid = store.add_analysis(MODEL, LABELS, DIFF, _items())
    got = store.get(aid)
    assert got.model == {**MODEL, "ood_accept": None} and got.labels == LABELS and got.differential == DIFF
    assert [(it.source, it.result, it.thumbnail, it.heatmap) for it in got.items] == \
        [(it.source, it.result, it.thumbnail, it.heatmap) for it in _items()]
    assert got.n_errors == 1
    assert store.get(aid, images=False).items[0].thumbnail is None
    with pytest.raises(NotFound):
        store.get("missing")


def test_failed_write_leaves_nothing(tmp_path):
    store = HistoryStore(tmp_path / "h.sqlite3")
    bad = _items() + [StoredItem("c.jpg", "2" * 64, {"not json": object()})]
    with pytest.raises(TypeError):
        store.add_analysis(MODEL, LABELS, DIFF, bad)
    assert store.list() == ([], 0)
    with sqlite3.connect(tmp_path / "h.sqlite3") as con:
        assert con.execute("SELECT COUNT(*) FROM items").fetchone()[0] == 0


def test_failed_correction_batch_is_not_half_applied(tmp_path):
    store = HistoryStore(tmp_path / "h.sqlite3")
    aid = store.add_analysis(MODEL, LABELS, DIFF, _items())
    with pytest.raises(ValueError, match="could not be read"):
        store.set_corrections(aid, [(0, "lymphocyte", ""), (1, "lymphocyte", "")])
    assert store.get(aid).corrections == {}
    store.set_corrections(aid, [(0, "lymphocyte", "x")])
    store.set_corrections(aid, [(0, "neutrophil", "y")])  # a second correction replaces the first
    assert {k: (v["label"], v["note"]) for k, v in store.get(aid).corrections.items()} == {0: ("neutrophil", "y")}


def test_a_history_written_before_sample_ids_is_upgraded_and_keeps_its_analyses(tmp_path):
    from hematoscope.serve import storage

    path = tmp_path / "h.sqlite3"
    with sqlite3.connect(path) as con:  # the version-1 table, as hematoscope wrote it before sample ids
        con.execute("CREATE TABLE analyses (id TEXT PRIMARY KEY, created TEXT NOT NULL, model_name TEXT NOT NULL, "
                    "model_kind TEXT NOT NULL, model_id TEXT NOT NULL, model_version TEXT NOT NULL, "
                    "labels TEXT NOT NULL, n_images INTEGER NOT NULL, n_errors INTEGER NOT NULL, "
                    "differential TEXT NOT NULL)")
        assert "sample" not in {r[1] for r in con.execute("PRAGMA table_info(analyses)")}
        con.execute("INSERT INTO analyses VALUES ('old', '2026-01-01T00:00:00', 'm', 'neural', 'abc', '1', "
                    "'[\"neutrophil\", \"lymphocyte\"]', 0, 0, '{}')")
        con.execute("PRAGMA user_version = 1")
    store = HistoryStore(path)
    assert store.get("old").sample == "" and store.list()[0][0]["sample"] == ""
    store.set_sample("old", "S-1")
    new = store.add_analysis(MODEL, LABELS, DIFF, _items(), sample="S-2")
    assert (store.get("old").sample, store.get(new).sample) == ("S-1", "S-2")
    with sqlite3.connect(path) as con:
        assert con.execute("PRAGMA user_version").fetchone()[0] == storage.SCHEMA_VERSION == 5
    with pytest.raises(NotFound):
        store.set_sample("missing", "x")
    with pytest.raises(ValueError, match="control"):
        store.add_analysis(MODEL, LABELS, DIFF, _items(), sample="a\tb")
    assert store.list()[1] == 2  # the refused one left nothing


def test_full_size_views_are_stored_and_read_one_at_a_time(tmp_path):
    store = HistoryStore(tmp_path / "h.sqlite3")
    items = _items()
    items[0].view = b"full size jpeg"
    aid = store.add_analysis(MODEL, LABELS, DIFF, items)
    assert store.view(aid, 0) == b"full size jpeg"
    assert store.get(aid).items[0].view is None  # the analysis itself stays light
    for analysis, index in ((aid, 1), (aid, 2), ("missing", 0)):  # an unreadable upload has nothing to show
        with pytest.raises(NotFound):
            store.view(analysis, index)


def test_a_full_size_heatmap_is_stored_where_the_explanation_had_a_map(tmp_path):
    store = HistoryStore(tmp_path / "h.sqlite3")
    items = _items()
    items[0].view, items[0].heatmap_view = b"full size jpeg", b"heatmap over it"
    items.append(StoredItem("c.jpg", "2" * 64, items[0].result, b"jpeg", b"outlines", view=b"no map: outlines only"))
    aid = store.add_analysis(MODEL, LABELS, DIFF, items)
    assert store.view(aid, 0, heatmap=True) == b"heatmap over it" and store.view(aid, 0) == b"full size jpeg"
    assert [it.has_heatmap_view for it in store.get(aid).items] == [True, False, False]
    assert [it.has_heatmap_view for it in store.get(aid, images=False).items] == [True, False, False]
    assert store.get(aid).items[0].heatmap_view is None  # served one at a time, like the view
    assert store.view(aid, 2) == b"no map: outlines only"
    for index in (1, 2, 3):
        with pytest.raises(NotFound):
            store.view(aid, index, heatmap=True)
    store.delete(aid)
    with pytest.raises(NotFound):
        store.view(aid, 0, heatmap=True)


def test_a_history_written_before_full_size_views_is_upgraded_and_shows_its_thumbnails(tmp_path):
    from hematoscope.serve import storage

    path = tmp_path / "h.sqlite3"
    with sqlite3.connect(path) as con:  # the version-2 tables, as hematoscope wrote them before views
        con.execute("CREATE TABLE analyses (id TEXT PRIMARY KEY, created TEXT NOT NULL, model_name TEXT NOT NULL, "
                    "model_kind TEXT NOT NULL, model_id TEXT NOT NULL, model_version TEXT NOT NULL, "
                    "labels TEXT NOT NULL, n_images INTEGER NOT NULL, n_errors INTEGER NOT NULL, "
                    "differential TEXT NOT NULL, sample TEXT NOT NULL DEFAULT '')")
        con.execute("CREATE TABLE items (analysis_id TEXT NOT NULL REFERENCES analyses (id) ON DELETE CASCADE, "
                    "idx INTEGER NOT NULL, source TEXT NOT NULL, sha256 TEXT NOT NULL, result TEXT NOT NULL, "
                    "thumbnail BLOB, heatmap BLOB, PRIMARY KEY (analysis_id, idx))")
        con.execute("INSERT INTO analyses VALUES ('old', '2026-01-01T00:00:00', 'm', 'neural', 'abc', '1', "
                    "'[\"neutrophil\"]', 1, 0, '{}', 'S-1')")
        con.execute("INSERT INTO items VALUES ('old', 0, 'a.jpg', ?, '{}', x'ffd8', NULL)", ("0" * 64,))
        con.execute("PRAGMA user_version = 2")
    store = HistoryStore(path)
    assert store.view("old", 0) == bytes.fromhex("ffd8")  # its thumbnail: the only image it kept
    items = _items()
    items[0].view = b"full"
    assert store.view(store.add_analysis(MODEL, LABELS, DIFF, items), 0) == b"full"
    with sqlite3.connect(path) as con:
        assert con.execute("PRAGMA user_version").fetchone()[0] == storage.SCHEMA_VERSION
    # schema 4: the flag's operating point; analyses from before it were made as fitted
    assert store.get("old").model["ood_accept"] is None
    moved = store.add_analysis({**MODEL, "ood_accept": 0.99}, LABELS, DIFF, _items())
    assert store.get(moved).model["ood_accept"] == 0.99
    assert {row["id"]: row["model"]["ood_accept"] for row in store.list()[0]}[moved] == 0.99
    assert {row["id"]: row["model"]["ood_accept"] for row in store.list()[0]}["old"] is None
    # schema 5: heatmaps over the full-size view; older analyses have their cards' only
    assert not store.get("old").items[0].has_heatmap_view
    with pytest.raises(NotFound):
        store.view("old", 0, heatmap=True)


def test_history_is_searched_by_sample_id(tmp_path):
    store = HistoryStore(tmp_path / "h.sqlite3")
    ids = {name: store.add_analysis(MODEL, LABELS, DIFF, _items(), sample=name)
           for name in ["Slide 118-B", "slide 1180", "S_2 100%", "S22 100x", ""]}
    found = lambda text: {r["sample"] for r in store.list(sample=text)[0]}  # noqa: E731
    assert found("118") == {"Slide 118-B", "slide 1180"} and store.list(sample="118")[1] == 2
    assert found("SLIDE") == {"Slide 118-B", "slide 1180"}  # any case
    assert found("_2") == {"S_2 100%"} and found("0%") == {"S_2 100%"}  # wildcards are plain characters
    assert found("") == set(ids) and store.list(sample="nothing like it") == ([], 0)


def test_newer_schema_is_refused(tmp_path):
    path = tmp_path / "h.sqlite3"
    HistoryStore(path)
    with sqlite3.connect(path) as con:
        con.execute("PRAGMA user_version = 99")
    with pytest.raises(StorageError, match="upgrade hematoscope"):
        HistoryStore(path)


def test_writes_are_not_checkpointed_one_by_one(tmp_path):
    """An idle connection held by the store keeps SQLite from checkpointing the WAL into the file
    (with its fsyncs) every time a write's connection closes; the data stays readable after close."""
    from hematoscope.serve.storage import HistoryStore, StoredItem

    db = tmp_path / "h.sqlite3"
    store = HistoryStore(db)
    model = {"name": "m", "kind": "neural", "id": "x", "version": "1"}
    ids = [store.add_analysis(model, ["a", "b"], {}, [StoredItem("c.jpg", "0" * 64, {"prediction": "a"}, b"j")])
           for _ in range(3)]
    wal = db.with_name(db.name + "-wal")
    assert wal.exists() and wal.stat().st_size > 0  # the writes are in the WAL, not yet checkpointed
    store.close()
    again = HistoryStore(db)
    assert [again.get(i).items[0].result["prediction"] for i in ids] == ["a", "a", "a"]
    again.close()
