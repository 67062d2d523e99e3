"""Segmentation of the centre cell: known geometry on drawn cells, sanity on real PBC crops."""
from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image, ImageDraw

from hematoscope.classical.segment import WORK_SIZE, overlay_png, segment_cell

@pytest.mark.parametrize("size", [128, 256, 96])
def test_drawn_cell_geometry_is_recovered_at_any_input_size(size, draw_cell):
    seg = segment_cell(draw_cell(size))
    assert seg.ok, seg.reason
    assert seg.image.shape[:2] == (WORK_SIZE, WORK_SIZE)
    # Areas are in working pixels whatever the input size (PIL's ellipse includes its bounding
    # box, hence the half-pixel on each radius).
    assert seg.nucleus.sum() == pytest.approx(np.pi * 15.5 * 10.5, rel=0.15)
    assert seg.cell.sum() == pytest.approx(np.pi * 26.5**2, rel=0.15)
    assert not (seg.nucleus & ~seg.cell).any()
    assert seg.cytoplasm.sum() > 0.5 * (np.pi * 26**2 - np.pi * 150)


def test_drawn_cell_shape_features(draw_cell):
    from hematoscope.classical.features import FEATURE_NAMES, cell_features

    f = dict(zip(FEATURE_NAMES, cell_features(draw_cell())))
    assert f["seg_ok"] == 1
    assert f["cell_circularity"] > 0.85
    assert f["nuc_eccentricity"] == pytest.approx(np.sqrt(1 - (10 / 15) ** 2), abs=0.08)
    assert f["nuc_major_axis"] == pytest.approx(30, rel=0.1)
    assert f["nc_ratio"] == pytest.approx((15.5 * 10.5) / 26.5**2, rel=0.15)
    assert f["nuc_lobes"] == 1 and f["nuc_parts"] == 1
    assert f["cell_on_border"] == 0


def test_cell_touching_red_cell_is_split_off(draw_cell):
    im = Image.fromarray(draw_cell(red_cells=False))
    ImageDraw.Draw(im).ellipse([64 + 20, 64 - 13, 64 + 46, 64 + 13], fill=(214, 160, 158))  # overlaps the cell rim
    seg = segment_cell(np.asarray(im))
    assert seg.ok
    assert seg.cell.sum() == pytest.approx(np.pi * 26**2, rel=0.2)
    assert not seg.cell[64, 64 + 40], "the touching red cell was merged into the leukocyte"


def test_two_lobes_are_one_nucleus(draw_cell):
    im = Image.fromarray(draw_cell(nucleus=False))
    d = ImageDraw.Draw(im)
    for cx in (52, 76):
        d.ellipse([cx - 9, 55, cx + 9, 73], fill=(98, 50, 150))
    seg = segment_cell(np.asarray(im))
    from hematoscope.classical.features import FEATURE_NAMES, features_of

    f = dict(zip(FEATURE_NAMES, features_of(seg)))
    assert seg.ok
    assert f["nuc_parts"] == 2
    assert f["nuc_area"] == pytest.approx(2 * np.pi * 9.5**2, rel=0.15)


@pytest.mark.parametrize("image, reason", [
    (np.full((100, 100, 3), 230, np.uint8), "flat"),
    (np.asarray(Image.new("RGB", (128, 128), (214, 160, 158))), "stained"),
])
def test_failure_is_reported_not_guessed(image, reason):
    seg = segment_cell(image)
    assert not seg.ok
    assert reason in seg.reason
    assert not seg.nucleus.any() and not seg.cell.any()


def test_off_centre_nucleus_fails():
    im = Image.new("RGB", (128, 128), (242, 224, 200))
    ImageDraw.Draw(im).ellipse([2, 2, 22, 22], fill=(98, 50, 150))
    seg = segment_cell(np.asarray(im))
    assert not seg.ok and "centre" in seg.reason


def test_rejects_non_rgb():
    with pytest.raises(ValueError, match="RGB uint8"):
        segment_cell(np.zeros((32, 32), np.uint8))


def test_overlay_png_draws_contours(draw_cell):
    seg = segment_cell(draw_cell())
    im = np.asarray(Image.open(io.BytesIO(overlay_png(seg))))
    assert im.shape[0] >= 256
    assert ((im == (0, 230, 255)).all(-1)).sum() > 20  # nucleus contour
    assert ((im == (255, 220, 0)).all(-1)).sum() > 20  # cell contour


def test_real_pbc_crops_mostly_segment(pbc_subset):
    from hematoscope.data.images import load_image

    files = sorted(pbc_subset.rglob("*.jpg"))
    segs = {f: segment_cell(load_image(f)) for f in files}
    ok = [s.ok for s in segs.values()]
    assert np.mean(ok) >= 0.9, [(f.name, s.reason) for f, s in segs.items() if not s.ok]
    for f, s in segs.items():
        if not s.ok:
            continue
        # The centre cell is a single object around the centre, never most of the frame.
        assert s.cell.sum() < 0.6 * s.cell.size
        assert s.cell[WORK_SIZE // 2 - 20: WORK_SIZE // 2 + 20, WORK_SIZE // 2 - 20: WORK_SIZE // 2 + 20].any()
    platelets = [s for f, s in segs.items() if f.parent.name == "platelet" and s.ok]
    others = [s for f, s in segs.items() if f.parent.name not in ("platelet",) and s.ok]
    assert platelets and np.median([s.nucleus.sum() for s in platelets]) < 0.5 * np.median(
        [s.nucleus.sum() for s in others])
