"""Test-time views: the numpy view helper, the bundle setting, its persistence and the CLI flag."""
from __future__ import annotations

import numpy as np
import pytest

from hematoscope.bundle.base import BundleConfig, BundleError, load_bundle
from hematoscope.models.preprocess import TTA_VIEWS, dihedral_views


def test_dihedral_views_are_the_distinct_symmetries_of_the_square():
    x = np.arange(2 * 3 * 4 * 4, dtype=np.float32).reshape(2, 3, 4, 4)
    views = dihedral_views(x, 8)
    assert views[0] is not x and np.array_equal(views[0], x)
    assert np.array_equal(views[1], x[..., ::-1])
    assert np.array_equal(views[2], np.rot90(x, 1, axes=(2, 3)))
    assert len({v.tobytes() for v in views}) == 8
    assert all(v.flags.c_contiguous and v.shape == x.shape for v in views)
    assert [len(dihedral_views(x, n)) for n in TTA_VIEWS] == list(TTA_VIEWS)
    with pytest.raises(ValueError, match="one of"):
        dihedral_views(x, 3)


def test_config_rejects_unknown_view_counts():
    with pytest.raises(ValueError, match="tta"):
        BundleConfig(kind="neural", labels=["a", "b"], preprocess={}, tta=3)


def test_neural_bundle_averages_views_and_persists_the_setting(tiny_neural_bundle, tmp_path):
    bundle = load_bundle(tiny_neural_bundle)
    rng = np.random.default_rng(0)
    images = [rng.integers(0, 256, (40, 40, 3), dtype=np.uint8) for _ in range(3)]
    x = bundle.preprocess(images)
    single = [bundle.forward_tensor(v) for v in dihedral_views(x, 4)]
    bundle.set_tta(4)
    averaged = bundle.forward(images)
    np.testing.assert_allclose(averaged.logits, np.mean([o.logits for o in single], axis=0), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(averaged.features, np.mean([o.features for o in single], axis=0), rtol=1e-5, atol=1e-5)
    assert not np.allclose(averaged.logits, single[0].logits)  # random weights: views really differ
    bundle.save(tmp_path / "b")
    again = load_bundle(tmp_path / "b")
    assert again.config.tta == 4
    np.testing.assert_allclose(again.forward(images).logits, averaged.logits, rtol=1e-3, atol=1e-3)
    with pytest.raises(BundleError, match="one of"):
        again.set_tta(5)


def test_kinds_without_views_refuse_them():
    from hematoscope.bundle.base import Bundle

    class NoViews(Bundle):
        kind = "noviews"

        def forward(self, images):  # pragma: no cover - not called
            raise AssertionError

        def _save_weights(self, directory):  # pragma: no cover
            pass

        @classmethod
        def _load_weights(cls, config, directory, metrics):  # pragma: no cover
            raise AssertionError

    b = NoViews(BundleConfig(kind="noviews", labels=["a", "b"], preprocess={}))
    b.set_tta(1)  # the one view it runs: nothing to change
    with pytest.raises(BundleError, match="sees each image in 1 view, fixed when it was made"):
        b.set_tta(8)


def test_predict_cli_takes_views_and_rejects_bad_counts(tiny_neural_bundle, pbc_subset):
    from typer.testing import CliRunner

    from hematoscope.cli.main import app

    runner = CliRunner()
    folder = str(pbc_subset / "basophil")
    ok = runner.invoke(app, ["predict", folder, "--model", str(tiny_neural_bundle), "--tta", "2"])
    assert ok.exit_code == 0, ok.output
    assert "6 images through the model" in ok.output
    bad = runner.invoke(app, ["predict", folder, "--model", str(tiny_neural_bundle), "--tta", "3"])
    assert bad.exit_code == 2
    assert "one of (1, 2, 4, 8)" in bad.output
