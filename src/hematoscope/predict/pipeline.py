"""Pipelined prediction over files, folders, globs and zips.

The decoding runs in worker threads while the model runs (:func:`hematoscope.data.decode.decode_batches`,
through :meth:`hematoscope.bundle.Bundle.iter_predictions`); this module adds the expansion of
what the user named (:func:`~hematoscope.data.sources.expand_paths`). Results come back in
input order; unreadable files become :class:`~hematoscope.data.sources.SkippedFile` records and
the run goes on.
"""
from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Iterable, Iterator, Sequence

from hematoscope.bundle.prediction import Prediction
from hematoscope.data.decode import DecodedBatch, decode_batches
from hematoscope.data.sources import ImageSource, SkippedFile, expand_paths
from hematoscope.predict.options import InferenceOptions

if TYPE_CHECKING:
    from hematoscope.bundle.base import Bundle

__all__ = ["DecodedBatch", "InferenceOptions", "decode_batches", "iter_predictions", "load_for_inference",
           "predict_paths", "predict_sources"]


def predict_sources(
    bundle: "Bundle",
    items: Iterable[ImageSource | SkippedFile],
    *,
    batch_size: int = 64,
    workers: int | None = None,
) -> Iterator[Prediction]:
    """Classify expanded sources batch by batch (:meth:`~hematoscope.bundle.Bundle.iter_predictions`)."""
    return bundle.iter_predictions(items, batch_size=batch_size, workers=workers)


def iter_predictions(
    bundle: "Bundle",
    paths: Iterable[str | Path],
    *,
    batch_size: int = 64,
    workers: int | None = None,
) -> Iterator[Prediction]:
    """Classify files, folders, globs and zips, yielding one :class:`Prediction` per batch.

    Memory stays flat however many images there are: use this for very large folders and
    write each batch out as it comes.

    Args:
        bundle: any loaded bundle.
        paths: files, folders, glob patterns or zip files (see
            :func:`~hematoscope.data.sources.expand_paths`).
        batch_size: images per model call.
        workers: decode threads (default: one per CPU).

    Yields:
        Per batch, a Prediction whose ``skipped`` lists the unreadable files of that batch
        (and inputs with nothing to classify: an empty folder, a hostile or broken zip).
    """
    yield from predict_sources(bundle, expand_paths(paths), batch_size=batch_size, workers=workers)


def predict_paths(
    bundle: "Bundle",
    paths: Iterable[str | Path],
    *,
    batch_size: int = 64,
    workers: int | None = None,
) -> Prediction:
    """Classify files, folders, globs and zips into one :class:`Prediction` (results in input
    order; unreadable files in ``Prediction.skipped``). Arguments as :func:`iter_predictions`."""
    parts = list(iter_predictions(bundle, paths, batch_size=batch_size, workers=workers))
    return Prediction.concat(parts, bundle.labels)


def load_for_inference(model: str | Path | None, options: InferenceOptions | None = None, *,
                       threads: int | None = None) -> "Bundle":
    """Load a bundle as ``hematoscope predict`` uses it: the shipped default model when ``model``
    is None, with ``options`` (:class:`InferenceOptions`: backend, views, abstain threshold,
    answerable classes, framing search and colour changes, framing, the OOD flag's operating
    point) applied; an ONNX session (or torch) limited to ``threads`` intra-op threads."""
    from hematoscope.bundle import load_bundle
    from hematoscope.bundle.default import default_bundle_path

    bundle = load_bundle(model if model is not None else default_bundle_path())
    return (options or InferenceOptions()).apply(bundle, threads=threads)


def choose_run_framing(bundle: "Bundle", items: Sequence[ImageSource | SkippedFile], *, sample: int = 300) -> dict:
    """``predict --framing auto``: the framing (``adapt``'s candidates, relative to the bundle's
    own) under which up to ``sample`` of the run's images, spread over it, look most like the
    training data; the bundle keeps it for the run. Every answer of the run then depends on
    that choice, not on the image alone.

    Raises:
        ValueError: the bundle has no OOD scorer, or no image is readable.
    """
    import numpy as np

    from hematoscope.bundle.adapt import choose_framing

    if bundle.ood is None:
        raise ValueError(f"--framing auto compares OOD scores; {bundle.name!r} has no OOD scorer (hematoscope trust fit)")
    sources = [i for i in items if isinstance(i, ImageSource)]
    picked = [sources[int(k)] for k in np.unique(np.linspace(0, len(sources) - 1, min(sample, len(sources))).round())]
    images = [im for batch in bundle.iter_batches(picked) for im in batch.images]
    if not images:
        raise ValueError("--framing auto needs readable images")
    report = choose_framing(bundle, images, batch_size=64)
    bundle.set_framing(report["framing"])
    return {**report, "images": len(images)}
