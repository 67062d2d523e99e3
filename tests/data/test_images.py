"""load_image on every odd or broken kind of file (all generated here)."""
import io
import struct
import zlib

import numpy as np
import pytest
from PIL import Image

from hematoscope.data.images import ImageError, is_image_file, load_image


def _save(img: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **kw)
    return buf.getvalue()


def _gradient(w=32, h=24) -> np.ndarray:
    x = np.linspace(0, 255, w)[None, :].repeat(h, 0)
    y = np.linspace(0, 255, h)[:, None].repeat(w, 1)
    return np.stack([x, y, 255 - x], axis=2).round().astype(np.uint8)


def _check_rgb(arr: np.ndarray, h: int, w: int):
    assert arr.dtype == np.uint8 and arr.shape == (h, w, 3) and arr.flags["C_CONTIGUOUS"]


# --- broken files: one clear error each ---------------------------------------------------

@pytest.mark.parametrize("data,reason", [
    (b"", "empty file"),
    (b"hello, I am a text file\n" * 10, "not an image or unknown format"),
    (bytes(np.random.default_rng(0).integers(0, 256, 500, dtype=np.uint8)), "not an image or unknown format"),
])
def test_garbage_is_an_image_error(data, reason):
    with pytest.raises(ImageError) as err:
        load_image(data)
    assert err.value.reason == reason


@pytest.mark.parametrize("fmt", ["JPEG", "PNG"])
def test_truncated_files(fmt):
    data = _save(Image.fromarray(np.random.default_rng(1).integers(0, 256, (64, 64, 3), dtype=np.uint8)), fmt)
    with pytest.raises(ImageError) as err:
        load_image(data[: len(data) // 2])
    assert err.value.reason == "truncated file"


def _png_header_only(width: int, height: int) -> bytes:
    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)) + chunk(b"IEND", b"")


def test_decompression_bomb_is_refused_before_decoding():
    with pytest.raises(ImageError) as err:
        load_image(_png_header_only(100_000, 100_000))
    assert err.value.reason == "image too large (> 64000000 pixels)"
    with pytest.raises(ImageError) as err:  # above our limit, below Pillow's: our words, with the size
        load_image(_png_header_only(12_000, 12_000))
    assert err.value.reason == "image too large (12000x12000 > 64000000 pixels)"


def test_pixel_limit_is_configurable():
    data = _save(Image.new("RGB", (100, 100)), "PNG")
    with pytest.raises(ImageError, match="too large"):
        load_image(data, max_pixels=5_000)
    _check_rgb(load_image(data, max_pixels=10_000), 100, 100)


def test_missing_file_and_directory(tmp_path):
    with pytest.raises(ImageError) as err:
        load_image(tmp_path / "nope.png")
    assert err.value.reason == "file not found" and str(tmp_path / "nope.png") in str(err.value)
    with pytest.raises(ImageError):
        load_image(tmp_path)


def test_error_names_the_file(tmp_path):
    bad = tmp_path / "x.jpg"
    bad.write_text("nope")
    with pytest.raises(ImageError) as err:
        load_image(bad)
    assert err.value.source == str(bad) and isinstance(err.value, ValueError)


# --- odd but valid files: all become RGB uint8 ----------------------------------------------

@pytest.mark.parametrize("fmt,ext", [("PNG", "png"), ("BMP", "bmp"), ("TIFF", "tiff"), ("WEBP", "webp"), ("PPM", "ppm")])
def test_lossless_formats_round_trip(tmp_path, fmt, ext):
    arr = _gradient()
    path = tmp_path / f"img.{ext}"
    Image.fromarray(arr).save(path, fmt, **({"lossless": True} if fmt == "WEBP" else {}))
    assert is_image_file(path)
    out = load_image(path)
    _check_rgb(out, 24, 32)
    assert np.array_equal(out, arr)


def test_path_bytes_and_file_object_agree(tmp_path):
    data = _save(Image.fromarray(_gradient()), "PNG")
    (tmp_path / "a.png").write_bytes(data)
    a, b, c = load_image(tmp_path / "a.png"), load_image(data), load_image(io.BytesIO(data))
    assert np.array_equal(a, b) and np.array_equal(b, c)


def test_16bit_grey_is_scaled_by_the_bit_depth_it_uses():
    grey = np.linspace(1000, 60000, 20 * 10).reshape(10, 20).astype(np.uint16)
    data = _save(Image.fromarray(grey), "PNG")
    assert Image.open(io.BytesIO(data)).mode.startswith("I")
    out = load_image(data)
    _check_rgb(out, 10, 20)
    expected = np.round(grey / 65535 * 255).astype(np.uint8)  # 16 bits used: black stays black
    assert np.array_equal(out[..., 0], expected) and np.array_equal(out[..., 0], out[..., 2])
    # a 12-bit camera's image in a 16-bit file fills the range instead of 16 grey levels
    twelve = (np.arange(64).reshape(8, 8) * 64).astype(np.uint16)
    out = load_image(_save(Image.fromarray(twelve), "PNG"))
    assert out[0, 0, 0] == 0 and out[-1, -1, 0] == round(4032 / 4095 * 255) and len(np.unique(out)) == 64


def test_a_deep_file_and_its_pixels_as_an_array_give_one_input():
    from hematoscope.data.images import rgb_array

    rng = np.random.default_rng(0)
    for grey, fmt in ((rng.integers(0, 4096, (9, 7)).astype(np.uint16), "PNG"),
                      (rng.integers(0, 65536, (9, 7)).astype(np.uint16), "TIFF"),
                      (rng.uniform(0, 1, (9, 7)).astype(np.float32), "TIFF"),
                      (rng.uniform(0, 1000, (9, 7)).astype(np.float32), "TIFF")):
        np.testing.assert_array_equal(load_image(_save(Image.fromarray(grey), fmt)), rgb_array(grey))


def test_16bit_tiff_and_float_tiff():
    grey = (np.arange(64).reshape(8, 8) * 1000).astype(np.uint16)
    out = load_image(_save(Image.fromarray(grey), "TIFF"))
    _check_rgb(out, 8, 8)
    assert out[0, 0, 0] == 0 and out[-1, -1, 0] == round(63000 / 65535 * 255)
    flat = load_image(_save(Image.fromarray(np.full((4, 4), 3.5, np.float32)), "TIFF"))
    assert flat.shape == (4, 4, 3) and (flat == 4).all()  # a constant image is read as its value
    with pytest.raises(ImageError, match="NaN"):
        load_image(_save(Image.fromarray(np.full((4, 4), np.nan, np.float32)), "TIFF"))


def test_a_tiff_pillow_cannot_decode_says_what_to_save_it_as():
    """A floating-point RGB TIFF (as tifffile writes) is an image, not 'not an image'."""
    tifffile = pytest.importorskip("tifffile")
    buf = io.BytesIO()
    tifffile.imwrite(buf, np.random.default_rng(0).random((16, 16, 3)).astype(np.float32))
    with pytest.raises(ImageError, match="a TIFF this reader cannot decode .* save it as 8- or 16-bit RGB"):
        load_image(buf.getvalue())


def test_cmyk_jpeg():
    cyan = Image.new("CMYK", (16, 16), (255, 0, 0, 0))
    out = load_image(_save(cyan, "JPEG", quality=95))
    _check_rgb(out, 16, 16)
    r, g, b = out[8, 8].astype(int)
    assert r < 30 and g > 225 and b > 225


def test_rgba_transparency_becomes_white():
    rgba = np.zeros((10, 10, 4), np.uint8)
    rgba[:, :5] = (200, 0, 0, 255)  # opaque red
    rgba[:, 5:] = (0, 0, 0, 0)  # fully transparent
    out = load_image(_save(Image.fromarray(rgba, "RGBA"), "PNG"))
    assert tuple(out[0, 0]) == (200, 0, 0) and tuple(out[0, 9]) == (255, 255, 255)


def test_grey_la_and_one_bit():
    out = load_image(_save(Image.new("L", (6, 4), 100), "PNG"))
    _check_rgb(out, 4, 6)
    assert (out == 100).all()
    la = load_image(_save(Image.new("LA", (4, 4), (0, 0)), "PNG"))
    assert (la == 255).all()  # transparent black on white
    bits = np.zeros((8, 8), bool)
    bits[:, 4:] = True
    out = load_image(_save(Image.fromarray(bits), "PNG"))
    assert (out[:, :4] == 0).all() and (out[:, 4:] == 255).all()


def test_palette_with_and_without_transparency():
    pal = Image.fromarray(_gradient()).convert("P", palette=Image.Palette.ADAPTIVE, colors=16)
    out = load_image(_save(pal, "PNG"))
    _check_rgb(out, 24, 32)
    assert np.abs(out.astype(int) - np.asarray(pal.convert("RGB")).astype(int)).max() == 0
    p = Image.new("P", (4, 4), 1)
    p.putpalette([0, 0, 0, 10, 20, 30] + [0] * 762)
    p.putpixel((0, 0), 0)
    out = load_image(_save(p, "PNG", transparency=0))
    assert tuple(out[0, 0]) == (255, 255, 255) and tuple(out[1, 1]) == (10, 20, 30)
    gif = load_image(_save(pal, "GIF"))
    _check_rgb(gif, 24, 32)


def test_exif_orientation_is_honoured():
    arr = np.zeros((20, 40, 3), np.uint8)  # wide: left half red, right half blue
    arr[:, :20] = (255, 0, 0)
    arr[:, 20:] = (0, 0, 255)
    exif = Image.Exif()
    exif[0x0112] = 6  # stored rotated: display = rotate 90° clockwise
    out = load_image(_save(Image.fromarray(arr), "JPEG", exif=exif.tobytes(), quality=95))
    _check_rgb(out, 40, 20)  # now tall
    assert out[5, 10, 0] > 200 and out[5, 10, 2] < 60  # top is red (was the left side)
    assert out[35, 10, 2] > 200 and out[35, 10, 0] < 60


def test_jpeg_draft_decodes_small_but_not_below_the_target():
    data = _save(Image.fromarray(np.random.default_rng(2).integers(0, 256, (256, 300, 3), dtype=np.uint8)), "JPEG")
    small = load_image(data, draft_size=64)
    assert min(small.shape[:2]) >= 64 and small.shape[0] < 256
    _check_rgb(load_image(data), 256, 300)


def test_non_raster_formats_are_refused(tmp_path):
    """EPS would run Ghostscript; only raster decoders are allowed."""
    eps = tmp_path / "x.eps"
    Image.new("RGB", (8, 8)).save(eps)
    with pytest.raises(ImageError) as err:
        load_image(eps)
    assert err.value.reason == "not an image or unknown format"


def test_numpy_images_in_other_layouts_become_rgb_uint8():
    from hematoscope.data.images import rgb_array

    rgb = np.random.default_rng(0).integers(0, 256, (6, 5, 3), dtype=np.uint8)
    np.testing.assert_array_equal(rgb_array(rgb / 255.0), rgb)
    np.testing.assert_array_equal(rgb_array(rgb.astype(np.uint16) * 257), rgb)
    np.testing.assert_array_equal(rgb_array(rgb.astype(np.uint16)), rgb)  # 8-bit values in a 16-bit array
    twelve = rgb.astype(np.uint16) * 16 + 15  # a 12-bit camera: 0-4095
    np.testing.assert_array_equal(rgb_array(twelve), np.round(twelve / 4095 * 255).astype(np.uint8))
    rgba16 = np.dstack([twelve, np.full((6, 5), 65535, np.uint16)])  # opaque: alpha has its own depth
    np.testing.assert_array_equal(rgb_array(rgba16), rgb_array(twelve))
    np.testing.assert_array_equal(rgb_array(rgb[:, :, 0]), np.repeat(rgb[:, :, :1], 3, axis=2))
    rgba = np.dstack([rgb, np.zeros((6, 5), np.uint8)])
    rgba[0, 0, 3] = 255
    out = rgb_array(rgba)  # transparent is white, opaque keeps its colour
    assert (out[1:] == 255).all() and (out[0, 0] == rgb[0, 0]).all()
    with pytest.raises(ValueError, match="channels-first"):
        rgb_array(rgb.transpose(2, 0, 1))
    with pytest.raises(ValueError, match="NaN"):
        rgb_array(np.full((4, 4, 3), np.nan))


def test_bundle_answers_a_float_or_grey_array_as_its_uint8_image():
    from hematoscope import load_bundle
    from hematoscope.samples import sample_paths

    bundle = load_bundle("default")
    image = load_image(sample_paths()[0])
    a, b = bundle.predict([image, image[:, :, 1]]), bundle.predict([image / 255.0, image[:, :, 1:2] / 255.0])
    np.testing.assert_allclose(a.probs, b.probs, atol=1e-6)


def test_an_image_too_small_to_hold_a_cell_is_refused_for_a_model_with_its_size(tmp_path):
    from hematoscope.data.images import MIN_MODEL_SIDE, load_model_image
    from hematoscope.models.preprocess import Preprocess

    tiny = tmp_path / "dot.png"
    tiny.write_bytes(_save(Image.new("RGB", (1, 1), (200, 100, 150)), "PNG"))
    with pytest.raises(ImageError, match=r"image too small \(1x1;") as err:
        load_model_image(tiny, Preprocess())
    assert err.value.source == str(tiny)
    assert load_image(tiny).shape == (1, 1, 3)  # decoding itself (data checks, training tables) still reads it
    # the limit is a quarter of the model's input side (32 px at 128), between MIN_MODEL_SIDE and 32
    for size, limit in ((128, 32), (224, 32), (64, 16), (32, MIN_MODEL_SIDE)):
        edge = _save(Image.new("RGB", (limit, 40), (200, 100, 150)), "PNG")
        assert load_model_image(edge, Preprocess(size=size)).ndim == 3  # at the limit: read
        with pytest.raises(ImageError, match=f"too small .* at least {limit} px"):
            load_model_image(_save(Image.new("RGB", (limit - 1, 40)), "PNG"), Preprocess(size=size))


# --- probe_image: the cheap look `data split` takes at every file -------------------------

def test_probe_finds_what_cannot_be_read_and_passes_whole_images(tmp_path):
    from hematoscope.data.images import probe_image

    jpeg = _save(Image.fromarray(_gradient(64, 64)), "JPEG", quality=95)
    files = {"ok.jpg": jpeg, "ok.png": _save(Image.fromarray(_gradient()), "PNG"),
             "ok.bmp": _save(Image.fromarray(_gradient()), "BMP"),
             "padded.jpg": jpeg + b"\0" * 4096,  # data after the end marker: still decodes
             ".DS_Store.jpg": b"\0\0\0\1Bud1" + b"\0" * 2000, "empty.jpg": b"",
             "cut.jpg": jpeg[: len(jpeg) // 2], "cut.png": _save(Image.fromarray(_gradient(256, 256)), "PNG")[:300]}
    for name, data in files.items():
        (tmp_path / name).write_bytes(data)
    got = {name: probe_image(tmp_path / name) for name in files}
    assert got == {"ok.jpg": None, "ok.png": None, "ok.bmp": None, "padded.jpg": None,
                   ".DS_Store.jpg": "not an image or unknown format", "empty.jpg": "empty file",
                   "cut.jpg": "truncated file", "cut.png": "truncated file"}
    assert probe_image(tmp_path / "gone.jpg") == "file not found"


def test_a_multi_page_tiff_is_read_from_its_first_page_and_says_so():
    pages = [Image.new("RGB", (16, 16), (i * 60, 100, 200)) for i in range(3)]
    buf = io.BytesIO()
    pages[0].save(buf, format="TIFF", save_all=True, append_images=pages[1:])
    with pytest.warns(UserWarning, match="3 pages \\(TIFF\\); only the first is read"):
        out = load_image(buf.getvalue())
    assert tuple(out[0, 0]) == (0, 100, 200)
