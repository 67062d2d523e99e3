"""Shot sampling: exact counts per class, reproducible, nested across counts, short classes reported."""
from __future__ import annotations

import numpy as np
import pytest

from hematoscope.fewshot.shots import parse_shots, sample_shots

LABELS = np.array(["a"] * 30 + ["b"] * 12 + ["c"] * 3, dtype=object)


@pytest.mark.parametrize("n", [1, 3, 10])
def test_exact_counts_and_short_classes(n):
    draw = sample_shots(LABELS, n, seed=0)
    counts = {c: int((LABELS[draw.indices] == c).sum()) for c in "abc"}
    assert counts == {"a": n, "b": n, "c": min(n, 3)}
    assert draw.short == ({"c": 3} if n > 3 else {})
    assert len(set(draw.indices.tolist())) == len(draw.indices)


def test_reproducible_by_seed_and_nested():
    a, b = sample_shots(LABELS, 5, seed=7), sample_shots(LABELS, 5, seed=7)
    np.testing.assert_array_equal(a.indices, b.indices)
    assert not np.array_equal(a.indices, sample_shots(LABELS, 5, seed=8).indices)
    small, large = sample_shots(LABELS, 2, seed=3), sample_shots(LABELS, 10, seed=3)
    assert set(small.indices) <= set(large.indices)


def test_all_and_parse():
    assert len(sample_shots(LABELS, None).indices) == len(LABELS)
    assert parse_shots("1, 5,all") == [1, 5, None]
    with pytest.raises(ValueError, match="positive"):
        parse_shots("0,5")
    with pytest.raises(ValueError, match=">= 1"):
        sample_shots(LABELS, 0)


def test_grouped_draws_count_groups_one_image_each():
    # class a: cells g1 (3 crops), g2 (2), g3 (1), g4 (2); class b: 5 single-crop cells
    labels = ["a"] * 8 + ["b"] * 5
    groups = ["g1"] * 3 + ["g2"] * 2 + ["g3"] + ["g4"] * 2 + [f"h{i}" for i in range(5)]
    g = np.array(groups)
    for seed in range(20):
        d = sample_shots(labels, 3, seed=seed, groups=groups)
        a = d.indices[d.indices < 8]
        assert len(a) == 3 and len(set(g[a])) == 3  # three different cells, one crop each
        assert len(d.indices) == 6 and not d.short
        big = sample_shots(labels, 4, seed=seed, groups=groups)
        assert set(d.indices) <= set(big.indices)  # nested
    short = sample_shots(labels, 6, seed=0, groups=groups)
    assert short.short == {"a": 4, "b": 5} and len(set(g[short.indices])) == len(short.indices)
    # every image its own group: the same draw as without groups
    np.testing.assert_array_equal(sample_shots(LABELS, 5, seed=3, groups=[f"x{i}" for i in range(len(LABELS))]).indices,
                                  sample_shots(LABELS, 5, seed=3).indices)
    with pytest.raises(ValueError, match="group ids"):
        sample_shots(labels, 1, groups=groups[:-1])
