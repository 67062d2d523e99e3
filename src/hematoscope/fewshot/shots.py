"""Drawing a few labelled examples per class: exact counts, reproducible by seed, nested.

For one seed, each class's images are put in one random order and the first ``n`` are taken,
so the 5-shot draw contains the 1-shot draw, the 10-shot draw the 5-shot one, and so on: a
learning curve then measures more labels, not a different luck of the draw.

With ``groups`` (e.g. the crops of one cell, or the cells of one patient), a label counts a group:
``n`` labels per class are ``n`` different groups, one random image of each. Without groups, or
when every image is its own group, the draw is the same as the plain one.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import numpy as np


@dataclass
class ShotDraw:
    """Indices of the drawn samples, and the classes that had fewer images than asked.

    Attributes:
        indices: sorted positions into the label sequence.
        short: class → number available, for classes with fewer than ``n`` (all were used).
    """

    indices: np.ndarray
    short: dict[str, int] = field(default_factory=dict)


def sample_shots(labels: Sequence, n: int | None, *, seed: int = 0, groups: Sequence | None = None) -> ShotDraw:
    """Draw ``n`` samples per class (all of a class when it has fewer; ``n=None`` = all).

    Args:
        labels: the class of each sample.
        n: labels per class, or None for every sample.
        seed: the draw depends only on ``labels``, ``groups`` and ``seed``.
        groups: group id of each sample (None = every sample its own group). Then ``n``
            different groups are drawn per class and one random sample of each; a class with
            fewer groups than ``n`` is short (one sample of every group is taken).

    Raises:
        ValueError: ``n`` < 1, or ``groups`` not as long as ``labels``.
    """
    labels = np.asarray(labels, dtype=object)
    if groups is not None:
        groups = np.asarray(groups, dtype=object)
        if len(groups) != len(labels):
            raise ValueError(f"{len(groups)} group ids for {len(labels)} samples")
    if n is None:
        return ShotDraw(np.arange(len(labels)))
    if n < 1:
        raise ValueError(f"labels per class must be >= 1; got {n}")
    rng = np.random.default_rng(seed)
    picked, short = [], {}
    for cls in sorted(set(labels.tolist()), key=str):
        idx = rng.permutation(np.flatnonzero(labels == cls))
        if groups is not None:  # the first image of each group in this random order: a random
            _, first = np.unique(groups[idx].astype(str), return_index=True)  # order of groups,
            idx = idx[np.sort(first)]  # one random image each (nested across n like the plain draw)
        if len(idx) < n:
            short[str(cls)] = len(idx)
        picked.append(idx[:n])
    return ShotDraw(np.sort(np.concatenate(picked)) if picked else np.zeros(0, int), short)


def parse_shots(text: str) -> list[int | None]:
    """``"1,5,10,all"`` → ``[1, 5, 10, None]``.

    Raises:
        ValueError: an entry is neither a positive integer nor ``all``.
    """
    out: list[int | None] = []
    for part in text.split(","):
        part = part.strip().lower()
        if part == "all":
            out.append(None)
        elif part.isdigit() and int(part) > 0:
            out.append(int(part))
        else:
            raise ValueError(f"shots must be positive integers or 'all'; got {part!r}")
    return out
