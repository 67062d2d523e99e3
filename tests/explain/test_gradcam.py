"""Grad-CAM heatmaps: shape, range, class dependence, and that they land on the pixels that
drive the score (checked with a network whose answer is known)."""
from __future__ import annotations

import io
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from hematoscope.explain.gradcam import ExplainNotAvailable, GradCamExplainer, gradcam, overlay_png
from hematoscope.models.preprocess import Preprocess


@pytest.fixture(scope="module")
def tiny_bundle(tiny_neural_bundle):
    from hematoscope.bundle import load_bundle

    return load_bundle(tiny_neural_bundle)


@pytest.fixture(scope="module")
def cell_image():
    from hematoscope.samples import sample_paths
    from hematoscope.data.images import load_image

    return load_image(sample_paths()[0])


def test_heatmap_shape_range_and_class_dependence(tiny_bundle, cell_image):
    explainer = GradCamExplainer(tiny_bundle)
    maps = explainer([cell_image, cell_image], [0, 1])
    for m in maps:
        assert m.shape == cell_image.shape[:2] and m.dtype == np.float32
        assert 0.0 <= m.min() and m.max() <= 1.0
    assert not np.allclose(maps[0], maps[1], atol=1e-3)
    # class_index None explains the predicted class
    predicted = int(tiny_bundle.predict([cell_image]).probs.argmax())
    np.testing.assert_allclose(gradcam(tiny_bundle, cell_image), explainer([cell_image], [predicted])[0], atol=1e-4)


def test_classes_by_name_images_by_path_and_the_predicted_class_by_default(tiny_bundle, cell_image):
    from hematoscope.samples import sample_paths

    explainer = GradCamExplainer(tiny_bundle)
    by_name = explainer([str(sample_paths()[0])], [tiny_bundle.labels[1]])[0]
    np.testing.assert_allclose(by_name, explainer([cell_image], [1])[0], atol=1e-5)
    [default] = explainer.explain([cell_image])
    predicted = tiny_bundle.labels[int(tiny_bundle.predict([cell_image]).probs.argmax())]
    assert default.target == predicted and "the predicted class" in default.note
    [other] = explainer.explain([cell_image], [tiny_bundle.labels[1]])
    assert other.target == tiny_bundle.labels[1] and f"class {tiny_bundle.labels[1]}" in other.note
    with pytest.raises(ValueError, match="not a class"):
        explainer([cell_image], ["banana"])


def _stain_detector() -> nn.Module:
    """Class 0 = "how much purple stain", class 1 = its opposite. Purple pixels have low green,
    so a 1x1 convolution on -green (after ImageNet normalisation) detects them."""
    conv = nn.Conv2d(3, 1, 1)
    with torch.no_grad():
        conv.weight.copy_(torch.tensor([0.0, -1.0, 0.0]).view(1, 3, 1, 1))
        conv.bias.fill_(0.0)
    head = nn.Linear(1, 2)
    with torch.no_grad():
        head.weight.copy_(torch.tensor([[1.0], [-1.0]]))
        head.bias.zero_()
    return nn.Sequential(conv, nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), head)


@pytest.mark.parametrize("preprocess", [Preprocess(size=32), Preprocess(size=32, resize="shorter_crop", crop_pct=0.875)])
def test_heatmap_lands_on_the_cell(preprocess):
    image = np.full((90, 60, 3), 235, np.uint8)  # pale background, not square
    yy, xx = np.mgrid[:90, :60]
    cell = (yy - 50) ** 2 + (xx - 25) ** 2 < 15 ** 2
    image[cell] = (120, 40, 170)  # a purple "cell" off centre
    net = _stain_detector()
    bundle = SimpleNamespace(torch_module=lambda: net, preprocess=preprocess, kind="neural", labels=["a", "b"])
    heat = gradcam(bundle, image, class_index=0)
    assert heat.shape == (90, 60)
    assert heat[cell].mean() > 0.5 > 0.1 > heat[~cell & ((yy - 50) ** 2 + (xx - 25) ** 2 > 22 ** 2)].mean()


def _strided_stain_detector() -> nn.Module:
    """The stain detector followed by five stride-2 convolutions padded as timm pads (k // 2): a
    4 x 4 grid at 128 px whose cell j is centred on pixel 32j, as Lite0's last stage is."""
    layers = [nn.Conv2d(3, 1, 1), nn.ReLU()]
    with torch.no_grad():
        layers[0].weight.copy_(torch.tensor([0.0, -1.0, 0.0]).view(1, 3, 1, 1))
        layers[0].bias.fill_(0.0)
    for _ in range(5):
        conv = nn.Conv2d(1, 1, 3, stride=2, padding=1, bias=False)
        with torch.no_grad():
            conv.weight.fill_(1 / 9)
        layers.append(conv)
    head = nn.Linear(1, 2)
    with torch.no_grad():
        head.weight.copy_(torch.tensor([[1.0], [-1.0]]))
        head.bias.zero_()
    return nn.Sequential(*layers, nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), head)


@pytest.mark.parametrize("centre", [(40, 40), (64, 64), (88, 88), (40, 88)])
def test_the_heat_of_a_strided_network_is_where_its_grid_looks(centre):
    """pytorch-grad-cam draws grid cell j over pixels [32j, 32j + 32); a network padded k // 2
    looks at pixel 32j: drawn as it came, every map sat 15 px (12 %) right of and below the cell."""
    from scipy.ndimage import center_of_mass

    image = np.full((128, 128, 3), 235, np.uint8)
    yy, xx = np.mgrid[:128, :128]
    image[(yy - centre[0]) ** 2 + (xx - centre[1]) ** 2 < 12 ** 2] = (120, 40, 170)
    net = _strided_stain_detector()
    bundle = SimpleNamespace(torch_module=lambda: net, preprocess=Preprocess(size=128), kind="neural",
                             labels=["a", "b"])
    heat = gradcam(bundle, image, class_index=0)
    assert np.abs(np.array(center_of_mass(heat)) - centre).max() < 8  # was about 15


def test_overlay_png(cell_image):
    heat = np.zeros(cell_image.shape[:2], np.float32)
    heat[:20, :20] = 1.0
    full = Image.open(io.BytesIO(overlay_png(cell_image, heat)))
    assert full.format == "PNG" and full.size == (cell_image.shape[1], cell_image.shape[0])
    small = Image.open(io.BytesIO(overlay_png(cell_image, heat, max_side=64)))
    assert max(small.size) == 64
    pixels = np.asarray(full, dtype=np.int16)
    assert not np.array_equal(pixels[5, 5], pixels[-5, -5])  # hot corner is coloured differently


def test_kinds_without_network_are_refused():
    from hematoscope.bundle import BundleError

    def no_network():
        raise BundleError("'classical' bundles have no torch network")

    with pytest.raises(ExplainNotAvailable, match="not available for 'classical'"):
        GradCamExplainer(SimpleNamespace(kind="classical", preprocess=Preprocess(size=32), torch_module=no_network))


def test_heatmaps_of_the_default_model_are_smooth_without_grid_edges():
    """Lite0's last stage is a 4 x 4 grid at 128 px: upsampled as it is, the cells Grad-CAM zeroes
    meet the others in straight kinks that read as a box drawn around the evidence (about 0.02 of
    the peak in second differences on these cells). The drawn map is one smooth region."""
    from hematoscope.bundle import load_bundle
    from hematoscope.bundle.default import DEFAULT_MODEL_DIR
    from hematoscope.data.images import load_image
    from hematoscope.samples import sample_paths

    if not (DEFAULT_MODEL_DIR / "config.json").is_file():
        pytest.skip("the package has no default model")
    bundle = load_bundle("default")
    maps = bundle.explainer("grad-cam")([load_image(p) for p in sample_paths()[:4]])
    for m in maps:
        h, w = m.shape
        inner = m[h // 8:-h // 8, w // 8:-w // 8]  # inside the model's centre crop
        kink = np.abs(np.diff(inner, 2, axis=0)).max() + np.abs(np.diff(inner, 2, axis=1)).max()
        assert inner.max() > 0.5 and kink < 0.006 * inner.max()


def test_a_cell_answered_from_its_centre_is_explained_as_that_view():
    """The framing search answers a third of another lab's cells from a centre crop; their maps
    explained the whole crop. Asked for the framing the answer came from, the map covers that
    centre alone, placed where it lies in the image, and the note says so."""
    from hematoscope.bundle import load_bundle
    from hematoscope.bundle.default import DEFAULT_MODEL_DIR
    from hematoscope.data.images import load_image
    from hematoscope.samples import sample_paths

    if not (DEFAULT_MODEL_DIR / "config.json").is_file():
        pytest.skip("the package has no default model")
    image = load_image(sample_paths()[0])
    explainer = load_bundle("default").explainer("grad-cam")
    (whole, centre, padded) = explainer.explain([image] * 3, [0] * 3, framings=[1.0, 0.6, 1.7])
    h, w = image.shape[:2]
    ch, cw = round(h * 0.6), round(w * 0.6)
    top, left = (h - ch) // 2, (w - cw) // 2
    inside = np.zeros((h, w), bool)
    inside[top:top + ch, left:left + cw] = True
    assert centre.heatmap.shape == (h, w) and not centre.heatmap[~inside].any() and centre.heatmap[inside].any()
    assert "centre 60%" in centre.note and "padded to 1.7x" in padded.note and "crop" not in whole.note
    assert padded.heatmap.shape == (h, w) and not np.allclose(centre.heatmap, whole.heatmap)


def test_explain_explains_the_bundles_answer_not_the_networks_own_top_class(tiny_neural_bundle, cell_image):
    """The bundle can answer another class than the network's whole-crop top one (views, the
    framing search, classes the lab restricted it to); explain() explained the network's."""
    from hematoscope.bundle import load_bundle

    bundle = load_bundle(tiny_neural_bundle)
    top = int(bundle.predict([cell_image]).probs.argmax())
    allowed = [c for i, c in enumerate(bundle.labels) if i != top][:2]
    bundle.restrict_classes(allowed)
    answered = bundle.predict([cell_image]).predicted[0]
    [explained] = bundle.explainer("grad-cam").explain([cell_image])
    assert answered in allowed and explained.target == answered and "the predicted class" in explained.note


def test_an_image_predict_would_not_answer_is_not_explained(tiny_bundle):
    explainer = GradCamExplainer(tiny_bundle)
    with pytest.raises(ValueError, match="image 0: image too small .*predict does not answer it either"):
        explainer.explain([np.full((5, 5, 3), 120, np.uint8)])
