"""Fixtures of the classical-pipeline tests: cells drawn with known geometry."""
from __future__ import annotations

import numpy as np
import pytest
from PIL import Image, ImageDraw

BACKGROUND, RED_CELL = (242, 224, 200), (214, 160, 158)
CYTOPLASM, NUCLEUS = (185, 172, 215), (98, 50, 150)


def drawn_cell(size: int = 128, cell_r: float = 26, nuc_a: float = 15, nuc_b: float = 10,
               red_cells: bool = True, nucleus: bool = True) -> np.ndarray:
    """A smear crop: beige background, a few separate red cells, a round leukocyte of radius
    ``cell_r`` with an elliptic nucleus of semi-axes ``nuc_a`` x ``nuc_b`` at the centre."""
    im = Image.new("RGB", (size, size), BACKGROUND)
    d = ImageDraw.Draw(im)
    s = size / 128
    if red_cells:
        for cx, cy in ((18, 20), (110, 22), (16, 108), (108, 106)):
            d.ellipse([(cx - 13) * s, (cy - 13) * s, (cx + 13) * s, (cy + 13) * s], fill=RED_CELL)
    c = size / 2
    d.ellipse([c - cell_r * s, c - cell_r * s, c + cell_r * s, c + cell_r * s], fill=CYTOPLASM)
    if nucleus:
        d.ellipse([c - nuc_a * s, c - nuc_b * s, c + nuc_a * s, c + nuc_b * s], fill=NUCLEUS)
    return np.asarray(im)


@pytest.fixture(scope="session")
def draw_cell():
    """``drawn_cell(size=128, cell_r=26, nuc_a=15, nuc_b=10, red_cells=True, nucleus=True)``."""
    return drawn_cell
