"""Feature extraction: caching, unreadable files, TTA, local-file timm weights, bundle features."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from hematoscope.fewshot.features import FeatureError, FeatureSet, load_extractor


def _paths(root: Path, n: int = 3) -> list[str]:
    return [str(p) for d in sorted(root.iterdir()) for p in sorted(d.iterdir())[:n]]


def test_second_run_and_renamed_copies_hit_the_cache(lite0_extractor, synthetic_root, tmp_path, monkeypatch):
    monkeypatch.setenv("HEMATOSCOPE_CACHE", str(tmp_path / "cache"))  # empty cache, whatever ran before
    paths = _paths(synthetic_root)
    first = lite0_extractor.extract(paths, progress=False)
    assert isinstance(first, FeatureSet) and first.features.shape == (len(paths), 2 * (80 + 112 + 192 + 320))
    assert first.computed == len(paths) and first.ok.all()
    before = lite0_extractor.images_embedded
    # same bytes under another name, in another order: no forward pass at all
    copies = []
    for i, p in enumerate(reversed(paths)):
        copies.append(tmp_path / f"copy_{i}.png")
        copies[-1].write_bytes(Path(p).read_bytes())
    again = lite0_extractor.extract(copies, progress=False)
    assert again.computed == 0 and lite0_extractor.images_embedded == before
    np.testing.assert_array_equal(again.features, first.features[::-1])
    # without the cache the backbone runs and gives the same vectors
    fresh = lite0_extractor.extract(paths[:4], cache=False, progress=False)
    assert fresh.computed == 4
    np.testing.assert_allclose(fresh.features, first.features[:4], rtol=1e-4, atol=1e-5)


def test_unreadable_files_are_skipped_with_a_reason(lite0_extractor, synthetic_root, tmp_path):
    bad = tmp_path / "broken.jpg"
    bad.write_bytes(b"not a jpeg")
    paths = _paths(synthetic_root, 1)[:2] + [str(bad), str(tmp_path / "missing.png")]
    fs = lite0_extractor.extract(paths, progress=False)
    assert fs.ok.tolist() == [True, True, False, False]
    assert len(fs.features) == 2
    assert {s.source for s in fs.skipped} == {str(bad), str(tmp_path / "missing.png")}
    assert all(s.reason for s in fs.skipped)


def test_tta_averages_views_and_changes_the_cache_key(synthetic_root):
    plain = load_extractor("efficientnet_lite0", size=32)
    tta = load_extractor("efficientnet_lite0", size=32, tta=True)
    assert plain.cache_key != tta.cache_key
    from hematoscope.data.images import load_image

    img = tta.preprocess.resize_image(load_image(_paths(synthetic_root, 1)[0]))
    views = [np.ascontiguousarray(np.rot90(img[:, ::-1] if flip else img, k)) for flip in (0, 1) for k in range(4)]
    # the TTA vector is the mean of the plain vectors of the 8 flipped/rotated images
    np.testing.assert_allclose(tta.embed_arrays([img]), plain.embed_arrays(views).mean(0, keepdims=True),
                               rtol=1e-3, atol=1e-4)
    assert not np.allclose(plain.embed_arrays([img]), tta.embed_arrays([img]), atol=1e-3)


def test_timm_weights_from_a_local_safetensors_file(tiny_weights, tiny_arch, synthetic_root):
    import torch

    path, model = tiny_weights
    ext = load_extractor(tiny_arch, weights=path, size=32, pooling="pooled")
    assert ext.describe()["weights_id"].startswith("sha256:")
    from hematoscope.data.images import load_image

    imgs = [load_image(p) for p in _paths(synthetic_root, 1)[:2]]
    with torch.inference_mode():
        expected = model(torch.from_numpy(ext.preprocess(imgs))).numpy()
    np.testing.assert_allclose(ext.embed_arrays(imgs), expected, rtol=1e-4, atol=1e-5)


def test_bad_backbone_specs_raise_clear_errors(tmp_path):
    from hematoscope.models.backbones import WeightsError

    with pytest.raises(FeatureError, match="weights"):
        load_extractor("resnet18")
    with pytest.raises(WeightsError, match="not found"):
        load_extractor("efficientnet_lite0", weights=tmp_path / "nope.safetensors")
    with pytest.raises(FeatureError, match="pooling"):
        load_extractor("efficientnet_lite0", size=32, pooling="max")


def test_bundle_penultimate_features(tiny_neural_bundle, synthetic_root):
    from hematoscope.bundle import load_bundle
    from hematoscope.data.images import load_image

    ext = load_extractor(tiny_neural_bundle)
    bundle = load_bundle(tiny_neural_bundle)
    imgs = [load_image(p) for p in _paths(synthetic_root, 1)[:3]]
    expected = bundle.forward(imgs).features
    np.testing.assert_allclose(ext.embed_arrays(imgs), expected, rtol=1e-4, atol=1e-4)
    assert ext.identity.startswith("bundle:neural:") and ext.preprocess == bundle.preprocess


def test_bundle_backbone_views_come_from_the_extractor_not_the_bundle(tiny_neural_bundle, synthetic_root):
    """A bundle saved with 8 test-time views gives single-view features unless --tta is asked
    for, and --tta gives the 8-view average once (not 8 x 8)."""
    from hematoscope.bundle import load_bundle
    from hematoscope.data.images import load_image

    bundle = load_bundle(tiny_neural_bundle)
    imgs = [load_image(p) for p in _paths(synthetic_root, 1)[:3]]
    single = bundle.forward(imgs).features
    bundle.set_tta(8)
    eight = bundle.forward(imgs).features
    assert not np.allclose(single, eight, atol=1e-4)
    plain = load_extractor(tiny_neural_bundle, bundle=bundle)
    np.testing.assert_allclose(plain.embed_arrays(imgs), single, rtol=1e-4, atol=1e-4)
    views = load_extractor(tiny_neural_bundle, bundle=load_bundle(tiny_neural_bundle), tta=True)
    np.testing.assert_allclose(views.embed_arrays(imgs), eight, rtol=1e-4, atol=1e-4)
