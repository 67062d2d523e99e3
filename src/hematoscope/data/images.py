"""The one image decoder of hematoscope: every path (train, predict, serve, classical) uses it.

``load_image`` turns any readable image (path, bytes or file object) into an RGB ``uint8`` array
of shape (H, W, 3). Anything it cannot decode raises :class:`ImageError` with a short reason,
which callers turn into a skipped-file record instead of dying on one bad file.

``load_model_image`` is the one way a *file* becomes a model's pixels: the CLI, ``evaluate``, the
server, ``trust fit``, the classical features and training's evaluation all call it, so one file
gets one answer wherever it is sent.
"""
from __future__ import annotations

import io
import warnings
from pathlib import Path
from typing import BinaryIO

import numpy as np

IMAGE_EXTENSIONS = frozenset(
    {".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".gif", ".webp", ".jfif", ".ppm", ".pgm"}
)
#: Pillow decoders allowed to open input: raster formats only, so an upload can never reach
#: plugins that run external programs (EPS → Ghostscript) or parse exotic containers.
DECODE_FORMATS = ("JPEG", "PNG", "BMP", "TIFF", "GIF", "WEBP", "PPM")
#: Default pixel limit: far above any single-cell crop, far below a decompression bomb.
MAX_PIXELS = 64_000_000
#: Images a model is given must be at least this many pixels a side: a smaller one (a 1x1
#: placeholder, an icon) holds no cell, yet would be resized up and answered with confidence.
MIN_MODEL_SIDE = 8
#: Files larger than this are refused before decoding.
MAX_FILE_BYTES = 256 * 1024 * 1024


def too_small(shape: tuple[int, ...], minimum: int = MIN_MODEL_SIDE) -> str:
    """Why an image of ``shape`` (H, W, ...) under ``minimum`` px a side is not given to a model."""
    return f"image too small ({shape[1]}x{shape[0]}; a cell crop needs at least {minimum} px a side)"


def model_min_side(preprocess) -> int:
    """The smallest side an image given to a model with ``preprocess`` may have: a quarter of its
    input side, between :data:`MIN_MODEL_SIDE` and 32 px (32 for the default 128 px model and any
    larger one; a model trained on 28 px images, as BloodMNIST's, takes them). An 8 px neutrophil
    blown up 16 times was answered 'erythroblast' at 0.999 and not flagged: so small an image holds
    no detail the model was trained to read."""
    return max(MIN_MODEL_SIDE, min(32, int(preprocess.size) // 4))


class ImageError(ValueError):
    """An image could not be loaded; ``reason`` says why in a few words, ``source`` says what."""

    def __init__(self, reason: str, source: str | None = None):
        self.reason = reason
        self.source = source
        super().__init__(f"{source}: {reason}" if source else reason)


def is_image_file(path: Path | str) -> bool:
    """True for a visible file with a known image extension (hidden files like ``.DS_x.jpg`` too)."""
    return Path(path).suffix.lower() in IMAGE_EXTENSIONS


def load_image(
    src: Path | str | bytes | BinaryIO,
    *,
    max_pixels: int = MAX_PIXELS,
    draft_size: int | None = None,
) -> np.ndarray:
    """Decode ``src`` into an RGB ``uint8`` array of shape (H, W, 3).

    Args:
        src: a path, raw bytes or a binary file object.
        max_pixels: refuse images with more pixels than this (decompression-bomb guard).
        draft_size: when given, JPEG files may be decoded at a reduced scale (DCT scaling) as
            long as both sides stay ``>= draft_size``; a large speed-up when the model input is
            much smaller than the file.

    Raises:
        ImageError: empty, missing, truncated, non-image, too large or undecodable input.
    """
    from PIL import Image, ImageOps, UnidentifiedImageError

    name = _source_name(src)
    data = _read_bytes(src, name)
    if not data:
        raise ImageError("empty file", name)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # max_pixels below is the limit
            with Image.open(io.BytesIO(data), formats=DECODE_FORMATS) as im:
                w, h = im.size
                if w <= 0 or h <= 0:
                    raise ImageError("image has no pixels", name)
                if w * h > max_pixels:
                    raise ImageError(f"image too large ({w}x{h} > {max_pixels} pixels)", name)
                if draft_size and im.format == "JPEG" and im.mode in ("RGB", "L"):
                    im.draft("RGB", (draft_size, draft_size))
                im.load()
                pages = getattr(im, "n_frames", 1)
                if pages > 1:  # a z-stack or time series: the cell may be sharpest on another page
                    warnings.warn(f"{name}: {pages} pages ({im.format}); only the first is read", UserWarning,
                                  stacklevel=2)
                im = ImageOps.exif_transpose(im) or im
                return pil_rgb_array(im)
    except ImageError:
        raise
    except UnidentifiedImageError:
        if data[:4] in (b"II*\x00", b"MM\x00*"):  # a TIFF header: the file is an image Pillow cannot decode
            raise ImageError("a TIFF this reader cannot decode (e.g. floating-point colour channels or an "
                             "unusual compression); save it as 8- or 16-bit RGB", name) from None
        raise ImageError("not an image or unknown format", name) from None
    except Image.DecompressionBombError:  # Pillow's own limit, far above max_pixels: refused at open
        raise ImageError(f"image too large (> {max_pixels} pixels)", name) from None
    except (OSError, SyntaxError, ValueError, EOFError) as exc:
        raise ImageError(_decode_reason(exc), name) from None


#: How ``load_model_image`` decodes JPEGs: with DCT scaling ("draft" mode) down to the model's
#: decode size when the file is at least twice as large. Measured with bench/decode_modes.py on
#: 400 PBC validation images re-encoded at 512 px: the same 8-view accuracy either way and 1-view
#: accuracy within one image, decoding 1.5-2x faster; the PBC copy itself (256 px) decodes
#: identically either way for a 128 px model with crop 0.89. Every path decodes this way.
DRAFT_DECODE = True


def load_model_image(src: Path | str | bytes | BinaryIO, preprocess, *, max_pixels: int = MAX_PIXELS,
                     draft: bool | None = None) -> np.ndarray:
    """Decode a file for a model with ``preprocess`` (a :class:`~hematoscope.models.preprocess.Preprocess`):
    JPEG draft decoding down to ``preprocess.decode_size`` (see :data:`DRAFT_DECODE`), then the
    early resize that leaves the model's input unchanged (``preprocess.early_resizer()``).

    ``preprocess([load_model_image(f, preprocess)])`` is the model input of file ``f`` on every
    path; ``preprocess.resize_image`` of the result gives the final ``size x size`` pixels.

    Args:
        src: a path, raw bytes or a binary file object.
        preprocess: the model's input spec.
        max_pixels: refuse images with more pixels than this.
        draft: override :data:`DRAFT_DECODE` and ``preprocess.jpeg_draft`` (for measuring the two
            decodings against each other only).

    Raises:
        ImageError: as :func:`load_image`, and an image under :func:`model_min_side` a side.
    """
    use_draft = (DRAFT_DECODE and preprocess.jpeg_draft) if draft is None else draft
    image = load_image(src, max_pixels=max_pixels, draft_size=preprocess.decode_size if use_draft else None)
    floor = model_min_side(preprocess)
    if min(image.shape[:2]) < floor:
        raise ImageError(too_small(image.shape, floor), _source_name(src))
    resize = preprocess.early_resizer()
    return resize(image) if resize is not None else image


def image_size(data: bytes | Path | str) -> tuple[int, int]:
    """(width, height) of encoded image bytes, or of an image file, from the header alone,
    without decoding pixels: what :func:`load_image` would return, rotated or not (EXIF turns
    keep the pixel count).

    Raises:
        ImageError: empty input, an unreadable file, or not an image in one of :data:`DECODE_FORMATS`.
    """
    from PIL import Image, UnidentifiedImageError

    if isinstance(data, bytes) and not data:
        raise ImageError("empty file")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data) if isinstance(data, bytes) else data, formats=DECODE_FORMATS) as im:
                return im.size
    except UnidentifiedImageError:
        raise ImageError("not an image or unknown format") from None
    except Image.DecompressionBombError as exc:
        raise ImageError(f"image too large ({exc})") from None
    except (OSError, SyntaxError, ValueError, EOFError) as exc:
        raise ImageError(_decode_reason(exc)) from None


#: Bytes read from each end of a file by :func:`probe_image`.
_PROBE_HEAD, _PROBE_TAIL = 4096, 1024
#: What a complete file of these formats ends with (in its last bytes; JPEG may carry padding
#: after its end marker). An FFD9 pair never occurs inside JPEG scan data (0xFF is stuffed there).
_END_MARKERS = {"JPEG": b"\xff\xd9", "PNG": b"IEND"}
#: How JPEG and PNG files start: with their end marker in place, such a file passes the probe
#: without a header parse (Pillow's JPEG header parse, in Python, would triple its time).
_SIGNATURES = {"JPEG": b"\xff\xd8\xff", "PNG": b"\x89PNG\r\n\x1a\n"}


def probe_image(path: Path | str) -> str | None:
    """Why the file at ``path`` is not a usable image, from a cheap look at it, or None when it
    looks whole: its signature and end marker for JPEG and PNG, else its header (and the file is
    decoded when a JPEG or PNG lacks its end marker). A few KB are read per file, far cheaper
    than decoding: it catches empty, missing and non-image files (a ``.DS_Store`` saved as
    ``.jpg``) and truncated JPEGs and PNGs, not damage inside the pixel data, which only
    :func:`load_image` (as ``hematoscope data check`` runs it) finds. The reasons are
    :func:`load_image`'s."""
    from PIL import Image, UnidentifiedImageError

    try:
        with open(path, "rb") as fh:
            head = fh.read(_PROBE_HEAD)
            size = fh.seek(0, io.SEEK_END)
            fh.seek(max(0, size - _PROBE_TAIL))
            tail = fh.read()
    except FileNotFoundError:
        return "file not found"
    except IsADirectoryError:
        return "is a directory"
    except OSError as exc:
        return f"cannot read ({exc.strerror})"
    if not head:
        return "empty file"
    if any(head.startswith(sig) and _END_MARKERS[fmt] in tail for fmt, sig in _SIGNATURES.items()):
        return None

    def header(src) -> str:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(src, formats=DECODE_FORMATS) as im:
                return im.format

    try:
        try:
            fmt = header(io.BytesIO(head))
        except (OSError, SyntaxError, ValueError, EOFError):  # a header longer than the bytes read
            fmt = header(path)
    except UnidentifiedImageError:
        return "not an image or unknown format"
    except Image.DecompressionBombError:
        return f"image too large (> {MAX_PIXELS} pixels)"
    except (OSError, SyntaxError, ValueError, EOFError) as exc:
        return _decode_reason(exc)
    end = _END_MARKERS.get(fmt)
    if end is None or end in tail:
        return None
    try:  # no end in sight: truncated, or data after the end (decodable); decoding tells
        load_image(path)
    except ImageError as exc:
        return exc.reason
    return None


def _source_name(src: Path | str | bytes | BinaryIO) -> str | None:
    """What an :class:`ImageError` names: a path, a file object's name, or nothing for bytes."""
    return str(src) if isinstance(src, (str, Path)) else getattr(src, "name", None)


def _decode_reason(exc: BaseException) -> str:
    msg = str(exc).lower()
    return "truncated file" if "truncat" in msg or "premature" in msg else f"cannot decode ({exc})"


def _read_bytes(src: Path | str | bytes | BinaryIO, name: str | None) -> bytes:
    if isinstance(src, (bytes, bytearray, memoryview)):
        data = bytes(src)
    elif isinstance(src, (str, Path)):
        path = Path(src)
        try:
            size = path.stat().st_size
        except FileNotFoundError:
            raise ImageError("file not found", name) from None
        except OSError as exc:
            raise ImageError(f"cannot read ({exc.strerror})", name) from None
        if path.is_dir():
            raise ImageError("is a directory", name)
        if size > MAX_FILE_BYTES:
            raise ImageError(f"file too large ({size} bytes)", name)
        try:
            data = path.read_bytes()
        except OSError as exc:
            raise ImageError(f"cannot read ({exc.strerror})", name) from None
    else:
        data = src.read(MAX_FILE_BYTES + 1)
    if len(data) > MAX_FILE_BYTES:
        raise ImageError(f"file too large (> {MAX_FILE_BYTES} bytes)", name)
    return data


def rgb_array(image: np.ndarray) -> np.ndarray:
    """A numpy image as the HWC RGB uint8 array the models take: greys (HxW or HxWx1) are
    repeated into 3 channels, alpha is composited on white (as for files), floats in [0, 1]
    are scaled to 0-255, values above 255 by the bit depth they use (:func:`_deep_to_uint8`).

    Raises:
        ValueError: a layout that is not an image (e.g. channels first: transpose it to HWC).
    """
    a = np.asarray(image)
    if a.ndim == 3 and a.shape[0] in (1, 3, 4) and a.shape[2] not in (1, 3, 4):
        raise ValueError(f"image array of shape {a.shape} looks channels-first; pass it as (height, width, "
                         "channels), e.g. array.transpose(1, 2, 0)")
    if a.ndim == 2:
        a = a[:, :, None]
    if a.ndim != 3 or a.shape[2] not in (1, 3, 4) or a.shape[0] < 1 or a.shape[1] < 1:
        raise ValueError(f"image array of shape {a.shape}: expected (height, width) or (height, width, 1, 3 or 4)")
    if a.dtype == np.bool_:
        a = a.astype(np.uint8) * 255
    elif a.dtype != np.uint8:
        if np.issubdtype(a.dtype, np.floating):
            if not np.isfinite(a).all():
                raise ValueError("image array holds NaN or infinite values")
            if a.max(initial=0) <= 1.0:
                a = a * 255.0
        elif not np.issubdtype(a.dtype, np.integer):
            raise ValueError(f"image array of dtype {a.dtype}: expected uint8, uint16, float or bool")
        colour = _deep_to_uint8(a[:, :, :3])
        a = np.dstack([colour, _deep_to_uint8(a[:, :, 3:])]) if a.shape[2] == 4 else colour
    if a.shape[2] == 1:
        a = np.repeat(a, 3, axis=2)
    elif a.shape[2] == 4:
        alpha = a[:, :, 3:].astype(np.float32) / 255.0
        a = (a[:, :, :3] * alpha + 255.0 * (1 - alpha)).round().astype(np.uint8)
    return np.ascontiguousarray(a)


def _deep_to_uint8(a: np.ndarray) -> np.ndarray:
    """Pixel values onto 0-255 by the bit depth they use: up to 255 as they are, else the
    smallest of 10, 12, 14, 16, 24 or 32 bits that holds the image's maximum. A 12-bit camera
    stores its images in 16-bit files: scaled by 65535 they would keep 16 grey levels, and
    stretched between their own minimum and maximum they would lose their black level."""
    peak = float(a.max(initial=0))
    if peak <= 255:
        return np.clip(np.round(a), 0, 255).astype(np.uint8)
    bits = next((b for b in (10, 12, 14, 16, 24, 32) if peak < 2 ** b), 64)
    return np.clip(np.round(a.astype(np.float64) * (255 / (2.0 ** bits - 1))), 0, 255).astype(np.uint8)


def pil_rgb_array(im) -> np.ndarray:
    """A PIL image (any mode) as the HWC RGB uint8 array the models take, as its file would give.
    16/32-bit greys and float images follow :func:`rgb_array`'s rules for numpy images (a file
    and its pixels as an array give the same input); alpha is composited on white (a
    transparent slide background is white, not black)."""
    from PIL import Image

    if im.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        arr = np.asarray(im)
        return rgb_array(arr.astype(np.float64) if im.mode == "F" else arr.astype(np.int64))
    if im.mode == "P":
        im = im.convert("RGBA" if "transparency" in im.info else "RGB")
    if im.mode in ("RGBA", "LA", "PA", "La", "RGBa"):
        rgba = im.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        im = Image.alpha_composite(background, rgba)
    if im.mode != "RGB":
        im = im.convert("RGB")
    arr = np.asarray(im, dtype=np.uint8)
    return np.ascontiguousarray(arr)
