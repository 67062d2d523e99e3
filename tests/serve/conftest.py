"""Fixtures for the web app tests: a served tiny bundle, a fresh history database per test,
and small encoded images made on the fly."""
from __future__ import annotations

import io
from pathlib import Path
from typing import Callable

import numpy as np
import pytest


@pytest.fixture
def make_client(tiny_neural_bundle, tmp_path):
    """``make_client(**settings)`` → a started TestClient on the tiny bundle (own database by
    default). Clients are closed at the end of the test."""
    from fastapi.testclient import TestClient

    from hematoscope.serve.app import create_app
    from hematoscope.serve.config import Settings

    clients = []

    def make(**overrides) -> TestClient:
        values = {"models": [tiny_neural_bundle], "db": tmp_path / "history.sqlite3", **overrides}
        # A trusted host name: the app refuses TestClient's default Host "testserver".
        client = TestClient(create_app(Settings(**values)), base_url="http://localhost")
        client.__enter__()
        clients.append(client)
        return client

    yield make
    for c in clients:
        c.__exit__(None, None, None)


@pytest.fixture
def client(make_client):
    return make_client()


@pytest.fixture
def encode() -> Callable[..., bytes]:
    """``encode(array, fmt="PNG")`` → encoded image bytes."""
    from PIL import Image

    def enc(array: np.ndarray, fmt: str = "PNG") -> bytes:
        buf = io.BytesIO()
        Image.fromarray(array).save(buf, format=fmt)
        return buf.getvalue()

    return enc


@pytest.fixture(scope="session")
def sample_files() -> list[Path]:
    """Three bundled real PBC samples of different classes."""
    from hematoscope.samples import sample_paths

    paths = sample_paths()
    by_class = {}
    for p in paths:
        by_class.setdefault(p.parent.name, p)
    chosen = list(by_class.values())[:3]
    assert len(chosen) == 3, "the package should ship samples of at least 3 classes"
    return chosen
