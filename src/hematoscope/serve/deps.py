"""What the routes depend on: the served bundles (loaded once, when the app is created), the
history store, the settings and the token check, as annotated dependency types."""
from __future__ import annotations

import hashlib
import json
import logging
import secrets
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Sequence

from fastapi import Depends, HTTPException, Request, status

from hematoscope.serve.config import Settings
from hematoscope.serve.storage import HistoryStore


log = logging.getLogger(__name__)


class ServeError(ValueError):
    """The server cannot start: no model to serve, or a bundle that does not load."""


@dataclass
class ServedModel:
    """A loaded bundle with what the server needs around it."""

    bundle: Any
    name: str
    #: Fingerprint of the bundle's config.json (changes with every retraining).
    id: str
    _explainer: Any = field(default=None, repr=False)
    _explainer_lock: threading.Lock = field(default_factory=threading.Lock, repr=False)
    #: Gathers concurrent requests' images into model batches (set when the app starts).
    batcher: Any = field(default=None, repr=False)

    @property
    def version(self) -> str:
        cfg = self.bundle.config
        adapted = f", adapted {cfg.adaptation['date']}" if cfg.adaptation and cfg.adaptation.get("date") else ""
        return f"{cfg.created} (hematoscope {cfg.hematoscope_version or '?'}){adapted}"

    def info(self) -> dict[str, str]:
        return {"name": self.name, "kind": self.bundle.kind, "id": self.id, "version": self.version}

    def explainer(self):
        """The bundle's explainer (:meth:`~hematoscope.bundle.Bundle.explainer`), built on first
        use; None when its kind has none."""
        if not self.bundle.explanation_methods:
            return None
        with self._explainer_lock:
            if self._explainer is None:
                self._explainer = self.bundle.explainer()
            return self._explainer


def model_fingerprint(bundle) -> str:
    text = json.dumps(bundle.config.model_dump(mode="json"), sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def adapted_model_dirs(adapt_dir: Path | None) -> list[Path]:
    """The bundles in the web app's adaptation folder (``Settings.adapt_dir``), by name."""
    if adapt_dir is None or not Path(adapt_dir).is_dir():
        return []
    # a name starting with "." is a folder being removed (see the DELETE route)
    return sorted(d for d in Path(adapt_dir).iterdir() if not d.name.startswith(".") and (d / "config.json").is_file())


def is_adapted_here(served: "ServedModel", adapt_dir: Path | None) -> bool:
    """Whether ``served`` was loaded from the web app's adaptation folder (so it may be removed
    from the web app; the operator's ``--model`` bundles may not)."""
    path = served.bundle.path
    return adapt_dir is not None and path is not None and Path(path).resolve().parent == Path(adapt_dir).resolve()


def load_models(paths: list[Path], *, classes: list[str] | None = None, recolour: bool = False,
                ood_accept: float | None = None, adapted: Sequence[Path] = ()) -> dict[str, ServedModel]:
    """Load every bundle once; the first is the default. With no paths, the shipped model.
    ``adapted`` (models adapted from the web app) follow; one that does not load is left out
    with a warning in the log, so that one broken folder does not stop the server.
    With ``classes``, every model answers only among them (:meth:`Bundle.restrict_classes`);
    with ``recolour``, those with a framing search also try its colour changes
    (:meth:`Bundle.set_recolour`; the others are served as they are); with ``ood_accept``,
    every model's OOD flag accepts that share of its validation cells (:meth:`Bundle.set_ood_accept`).

    Raises:
        ServeError: nothing to serve, a bundle that cannot be loaded, one without all of
            ``classes``, or one whose flag cannot be moved to ``ood_accept`` (the message says which).
    """
    from hematoscope.bundle import load_bundle

    if not paths:
        from hematoscope.bundle.default import default_bundle_path

        try:
            paths = [default_bundle_path()]
        except FileNotFoundError as exc:
            raise ServeError(f"no model to serve: {exc}") from None
    models: dict[str, ServedModel] = {}
    for path in [*paths, *adapted]:
        try:
            bundle = load_bundle(path)
        except (ValueError, FileNotFoundError) as exc:
            if path in adapted:
                log.warning("adapted model %s left out: %s", path, exc)
                continue
            raise ServeError(f"cannot serve {path}: {exc}") from None
        if classes:
            try:
                bundle.restrict_classes(classes)
            except ValueError as exc:
                raise ServeError(f"cannot serve {path} with --classes: {exc}") from None
        if recolour and bundle.reframes:
            bundle.set_recolour()
        if ood_accept is not None:
            try:
                bundle.set_ood_accept(ood_accept)
            except ValueError as exc:
                raise ServeError(f"cannot serve {path} with --ood-accept: {exc}") from None
        name, n = bundle.name, 2
        while name in models:  # two bundles with one name stay addressable
            name, n = f"{bundle.name}-{n}", n + 1
        models[name] = ServedModel(bundle, name, model_fingerprint(bundle))
    return models


# --- dependencies ------------------------------------------------------------------------
def get_settings(request: Request) -> Settings:
    return request.app.state.settings


def get_store(request: Request) -> HistoryStore:
    return request.app.state.store


def get_models(request: Request) -> dict[str, ServedModel]:
    return request.app.state.models


def require_token(request: Request) -> None:
    """Accept the request when no token is configured, or when it carries the token as
    ``Authorization: Bearer <token>`` or ``X-API-Token``."""
    expected = request.app.state.settings.token_value()
    if expected is None:
        return
    header = request.headers.get("authorization", "")
    given = header[7:].strip() if header.lower().startswith("bearer ") else request.headers.get("x-api-token", "")
    if not secrets.compare_digest(given.encode(), expected.encode()):
        raise HTTPException(status.HTTP_401_UNAUTHORIZED, "missing or wrong API token",
                            headers={"WWW-Authenticate": "Bearer"})


SettingsDep = Annotated[Settings, Depends(get_settings)]
StoreDep = Annotated[HistoryStore, Depends(get_store)]
ModelsDep = Annotated[dict[str, ServedModel], Depends(get_models)]


def pick_model(models: dict[str, ServedModel], name: str | None) -> ServedModel:
    """The model called ``name``, or the default (first) one when ``name`` is empty."""
    if not name:
        return next(iter(models.values()))
    try:
        return models[name]
    except KeyError:
        raise HTTPException(status.HTTP_404_NOT_FOUND,
                            f"no model named {name!r}; served: {', '.join(models)}") from None
