"""`hematoscope serve --classes`: every served model answers among the given classes."""
from __future__ import annotations

import pytest

from hematoscope.bundle.default import default_bundle_path
from hematoscope.samples import sample_paths

WHITE = ["basophil", "eosinophil", "lymphocyte", "monocyte", "neutrophil"]


def test_server_answers_among_its_classes(tmp_path):
    """`serve --classes`: every served model answers among them, /api/models says so, a class a
    model lacks stops the server from starting."""
    from fastapi.testclient import TestClient

    from hematoscope.serve.app import create_app
    from hematoscope.serve.config import Settings
    from hematoscope.serve.deps import ServeError

    others = [p for p in sample_paths() if p.parent.name in ("platelet", "erythroblast", "ig")]
    settings = Settings(models=[default_bundle_path()], db=tmp_path / "h.sqlite3", classes=",".join(WHITE))
    with TestClient(create_app(settings), base_url="http://localhost") as client:
        r = client.post("/api/predict?top_k=8", files=[("files", (p.name, p.read_bytes())) for p in others])
        assert r.status_code == 200, r.text
        items = r.json()["items"]
        assert len(items) == len(others) and all(it["prediction"] in WHITE for it in items)
        assert all(t["prob"] == 0 for it in items for t in it["top_k"] if t["label"] not in WHITE)
        info = client.get("/api/models").json()["data"][0]
        assert info["answerable_classes"] == [c for c in info["labels"] if c in WHITE]
    with pytest.raises(ServeError, match="--classes: not classes of"):
        create_app(Settings(models=[default_bundle_path()], db=tmp_path / "h2.sqlite3", classes="neutrophil,blast"))
