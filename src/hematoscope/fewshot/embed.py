"""2-D UMAP view of backbone features, coloured by class and (with several datasets) by dataset,
which makes the domain shift between datasets visible."""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np


def umap_coordinates(features: np.ndarray, *, n_neighbors: int = 15, min_dist: float = 0.1,
                     seed: int = 0) -> np.ndarray:
    """(N, 2) UMAP embedding (cosine metric) of ``features``; ``n_neighbors`` is capped for tiny sets.

    Raises:
        ValueError: fewer than 4 samples.
    """
    from hematoscope._extras import require

    umap = require("umap", extra="research", purpose="a UMAP embedding")
    if len(features) < 4:
        raise ValueError(f"UMAP needs at least 4 images; got {len(features)}")
    reducer = umap.UMAP(n_neighbors=min(n_neighbors, len(features) - 1), min_dist=min_dist, metric="cosine",
                        random_state=seed, n_jobs=1, init="random" if len(features) < 16 else "spectral")
    return reducer.fit_transform(np.asarray(features, np.float32)).astype(np.float32)


def plot_embedding(coords: np.ndarray, classes: Sequence[str], datasets: Sequence[str], path: Path | str,
                   *, title: str = "") -> Path:
    """Scatter PNG: colour = class; with several datasets a second panel colours by dataset."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from hematoscope import _io

    panels = [("class", np.asarray(classes, dtype=object))]
    if len(set(datasets)) > 1:
        panels.append(("dataset", np.asarray(datasets, dtype=object)))
    fig, axes = plt.subplots(1, len(panels), figsize=(6.5 * len(panels), 5.5), dpi=110, squeeze=False)
    cmap = plt.get_cmap("tab20")
    for ax, (what, values) in zip(axes[0], panels):
        for i, v in enumerate(sorted(set(values.tolist()), key=str)):
            m = values == v
            ax.scatter(coords[m, 0], coords[m, 1], s=4, alpha=0.7, color=cmap(i % 20), label=f"{v} ({m.sum()})")
        ax.set_title(f"{title} coloured by {what}".strip())
        ax.set_xticks([])
        ax.set_yticks([])
        ax.legend(markerscale=3, fontsize=7, loc="best")
    return _io.save_figure(fig, path)
