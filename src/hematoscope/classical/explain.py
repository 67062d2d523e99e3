"""How a classical bundle explains an answer: the cell and nucleus outlines its features were
measured on, drawn on the image, and the named features that pushed the trees towards the
answer (TreeSHAP, :mod:`hematoscope.explain.shap`). Registered as the ``segmentation`` explainer
(:meth:`hematoscope.bundle.Bundle.explainer`)."""
from __future__ import annotations

import io
from typing import Sequence

import numpy as np

from hematoscope.bundle.base import explained_classes, register_explainer
from hematoscope.bundle.prediction import Explanation


@register_explainer("segmentation")
class SegmentationExplainer:
    """Outlines plus the top SHAP feature contributions, per image."""

    #: Feature rows shown per image.
    TOP = 5

    def __init__(self, bundle):
        self.bundle = bundle

    def explain(self, images: Sequence, class_indices: Sequence[int | str | None] | None = None, *,
                max_side: int | None = None, framings: Sequence[float] | None = None) -> list[Explanation]:
        """As every explainer's ``explain``: each image's class as an index or a name, None (or
        None entries) for the bundle's answer; images as arrays, paths or encoded bytes."""
        # framings: the classical path has no framing search; its answers are of whole crops
        from hematoscope.data.images import load_image, rgb_array

        arrays = [rgb_array(im) if isinstance(im, np.ndarray) else load_image(im) for im in images]
        chosen, _ = explained_classes(self.bundle, arrays, class_indices)
        return [self._one(im, self.bundle.labels[c], max_side) for im, c in zip(arrays, chosen)]

    def _one(self, image: np.ndarray, label: str, max_side: int | None) -> Explanation:
        from PIL import Image

        from hematoscope._extras import available
        from hematoscope.classical.segment import segment_cell
        from hematoscope.explain.overlay import draw_explanation

        out = Explanation("segmentation", label, "outlines: cell and nucleus as measured; features: SHAP contributions")
        if available("shap"):  # the contributions need the explain extra; the outlines only the classical one
            from hematoscope.explain.shap import explain_features

            out.features = [{"name": f.name, "value": f.value, "unit": f.unit, "contribution": f.contribution}
                            for f in explain_features(self.bundle, image, label=label, top=self.TOP)]
        seg = segment_cell(image)
        if not seg.ok:
            out.note = f"segmentation failed: {seg.reason}"
            return out
        out.regions = seg.cell.astype(np.uint8) + seg.nucleus.astype(np.uint8)  # 0 outside, 1 cytoplasm, 2 nucleus
        im = Image.fromarray(draw_explanation(out, seg.image, max_side=max_side))
        buf = io.BytesIO()
        im.save(buf, format="PNG", optimize=True)
        out.png = buf.getvalue()
        return out
