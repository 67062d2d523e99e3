import json

import numpy as np
import pytest
from PIL import Image

from hematoscope.trust.ood_sets import CORRUPTIONS, NOT_CELLS, make_ood_set


@pytest.mark.parametrize("kind", NOT_CELLS)
def test_not_cell_kinds_are_deterministic_and_labelled(kind, tmp_path):
    a = make_ood_set(kind, tmp_path / "a", n=3, seed=1, size=48)
    b = make_ood_set(kind, tmp_path / "b", n=3, seed=1, size=48)
    assert [p.name for p in a] == [f"{kind}_{i:05d}.png" for i in range(3)]
    for x, y in zip(a, b):
        arr = np.asarray(Image.open(x))
        assert arr.shape == (48, 48, 3) and np.array_equal(arr, np.asarray(Image.open(y)))
    manifest = json.loads((tmp_path / "a" / "ood_manifest.json").read_text())
    assert manifest["family"] == "not cells" and {m["kind"] for m in manifest["images"]} == {kind}


def test_corruptions_change_real_cells(pbc_subset, tmp_path):
    files = make_ood_set("corrupted", tmp_path / "c", n=6, seed=0, source=pbc_subset)
    manifest = json.loads((tmp_path / "c" / "ood_manifest.json").read_text())
    assert [m["kind"] for m in manifest["images"]] == list(CORRUPTIONS) * 2
    assert manifest["family"] == "corrupted cells"
    for f, m in zip(files, manifest["images"]):
        out = np.asarray(Image.open(f)).astype(float)
        src = np.asarray(Image.open(m["source"]).convert("RGB")).astype(float)
        assert out.shape == src.shape and np.abs(out - src).mean() > 10


def test_bad_requests_raise(tmp_path):
    with pytest.raises(ValueError, match="unknown OOD kind"):
        make_ood_set("sunset", tmp_path)
    with pytest.raises(ValueError, match="source="):
        make_ood_set("blur", tmp_path)
