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


def test_bundle_backbone_uses_its_own_view_count_unless_told(tiny_neural_bundle, synthetic_root):
    """A bundle's own ``config.tta`` is the default view count; --tta / --no-tta / a count
    override it, and 8 views are averaged once (not 8 x 8)."""
    from hematoscope.bundle import load_bundle
    from hematoscope.data.images import load_image

    imgs = [load_image(p) for p in _paths(synthetic_root, 1)[:3]]
    bundle = load_bundle(tiny_neural_bundle)
    single = bundle.forward(imgs).features
    bundle.set_tta(8)
    eight = bundle.forward(imgs).features
    bundle.set_tta(2)
    two = bundle.forward(imgs).features
    assert not np.allclose(single, eight, atol=1e-4)
    own = load_extractor(tiny_neural_bundle, bundle=bundle)  # saved with 2 views: 2 views
    assert own.views == 2
    np.testing.assert_allclose(own.embed_arrays(imgs), two, rtol=1e-4, atol=1e-4)
    for tta, expected in [(False, single), (True, eight), (8, eight), (1, single)]:
        ext = load_extractor(tiny_neural_bundle, bundle=load_bundle(tiny_neural_bundle), tta=tta)
        np.testing.assert_allclose(ext.embed_arrays(imgs), expected, rtol=1e-4, atol=1e-4)
    assert load_extractor(tiny_neural_bundle).views == 1  # the fixture bundle is saved with 1 view
    with pytest.raises(FeatureError, match="views"):
        load_extractor(tiny_neural_bundle, tta=3)


def test_onnx_backend_matches_torch_and_shares_the_cache(synthetic_root):
    from hematoscope.data.images import load_image
    from hematoscope.fewshot.onnx_features import onnx_path

    imgs = [load_image(p) for p in _paths(synthetic_root, 1)[:5]]
    torch_ext = load_extractor("efficientnet_lite0", size=32, tta=2, backend="torch")
    onnx_ext = load_extractor("efficientnet_lite0", size=32, tta=2)  # auto
    assert onnx_ext.active_backend == "onnx" and torch_ext.active_backend == "torch"
    assert onnx_path(onnx_ext).is_file() and onnx_ext.cache_key == torch_ext.cache_key
    np.testing.assert_allclose(onnx_ext.embed_arrays(imgs), torch_ext.embed_arrays(imgs), rtol=1e-4, atol=1e-4)
    again = load_extractor("efficientnet_lite0", size=32, backend="onnx")  # reuses the exported file
    assert again.active_backend == "onnx" and onnx_path(again) == onnx_path(onnx_ext)
    with pytest.raises(FeatureError, match="backend"):
        load_extractor("efficientnet_lite0", size=32, backend="tensorrt")


def test_onnx_parity_check_refuses_different_features():
    from hematoscope.fewshot.onnx_features import FeatureOnnxError, check_parity

    ref = np.random.default_rng(0).normal(size=(4, 16)).astype(np.float32)
    assert check_parity(ref, ref + 1e-7)["min_cosine"] > 0.99999
    with pytest.raises(FeatureOnnxError, match="differ"):
        check_parity(ref, ref + np.float32(0.05))
    with pytest.raises(FeatureOnnxError, match="shape"):
        check_parity(ref, ref[:, :8])
