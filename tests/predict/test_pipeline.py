"""The pipelined predictor: bad files reported, order kept, one preprocessing path, flat memory."""
from __future__ import annotations

import gc
import itertools

import numpy as np
import pytest

from hematoscope import load_bundle
from hematoscope.bundle.prediction import SkippedFile
from hematoscope.data.sources import ImageSource, expand_paths
from hematoscope.models.preprocess import Preprocess
from hematoscope.predict import decode_batches, iter_predictions, predict_paths, predict_sources
from hematoscope.samples import sample_paths

BAD_REASONS = {"truncated.jpg": "truncated file", "empty.png": "empty file",
               "text.jpg": "not an image or unknown format"}


def _check_messy_result(pred, prefix: str):
    assert len(pred) == 6
    assert [s.rsplit("/", 1)[-1] for s in pred.sources] == [f"cell_{i}.jpg" for i in range(6)]
    assert all(s.startswith(prefix) for s in pred.sources)
    # cell_i is dominated by colour channel i % 3, which is the ColourBundle's class index
    assert pred.probs.argmax(1).tolist() == [i % 3 for i in range(6)]
    assert {s.source.rsplit("/", 1)[-1]: s.reason for s in pred.skipped} == BAD_REASONS


@pytest.mark.parametrize("workers", [1, 3])
def test_folder_with_bad_files_goes_on_and_reports_them(colour_bundle, messy_folder, workers):
    pred = predict_paths(colour_bundle, [messy_folder], batch_size=4, workers=workers)
    _check_messy_result(pred, str(messy_folder))


def test_zip_with_bad_files_goes_on_and_reports_them(colour_bundle, messy_zip):
    pred = predict_paths(colour_bundle, [messy_zip], batch_size=5)
    _check_messy_result(pred, f"{messy_zip}!")


def test_streaming_yields_one_prediction_per_batch(colour_bundle, messy_folder):
    parts = list(iter_predictions(colour_bundle, [messy_folder], batch_size=4))
    assert [len(p) + len(p.skipped) for p in parts] == [4, 4, 1]
    assert sum(len(p.skipped) for p in parts) == 3


@pytest.mark.parametrize("pre", [Preprocess(size=32), Preprocess(size=32, resize="shorter_crop"),
                                 Preprocess(size=128, resize="shorter_crop", crop_pct=128 / 144),
                                 Preprocess(size=30, resize="shorter_crop", crop_pct=0.75, interpolation="bicubic")])
def test_resizing_in_workers_gives_the_model_the_same_pixels(pre, images):
    rng = np.random.default_rng(0)
    resize = pre.early_resizer()
    assert resize is not None
    for h, w in [(256, 258), (257, 300), (90, 61), (145, 144), (301, 256)]:
        image = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
        np.testing.assert_array_equal(pre([resize(image)]), pre([image]))


def test_no_early_resize_when_crops_would_not_compose():
    assert Preprocess(size=32, resize="shorter_crop", crop_pct=32 / 37).early_resizer() is None


def test_same_results_as_bundle_predict(tiny_neural_bundle):
    """The pipeline only moves work into threads, decoding as Bundle.predict does: it must give
    exactly the probabilities of Bundle.predict on the same files."""
    bundle = load_bundle(tiny_neural_bundle)
    paths = sample_paths()[:12]
    piped = predict_paths(bundle, paths, batch_size=5, workers=2)
    direct = bundle.predict(paths)
    assert piped.sources == direct.sources
    np.testing.assert_array_equal(piped.probs, direct.probs)


def test_draft_decoding_keeps_at_least_the_model_size(tmp_path, images):
    big = tmp_path / "big.jpg"
    big.write_bytes(images.encode(images.colour(2, size=400)))
    [drafted] = next(decode_batches([ImageSource(str(big), big)], Preprocess(size=96, resize="shorter_crop",
                                                                             crop_pct=0.5))).images
    assert min(drafted.shape[:2]) >= 192  # DCT scaling stops at size / crop_pct
    assert min(drafted.shape[:2]) < 400   # but did scale down


def test_large_images_decode_a_few_at_a_time_whatever_the_threads(tmp_path, monkeypatch):
    """Full-size decodes share a pixel budget: with room for two of these images, eight threads
    never hold three, while every image is still decoded (a folder of large flat scans on a
    many-core PC took about 1 GB per thread)."""
    import threading

    from PIL import Image

    import hematoscope.data.decode as decode

    for i in range(6):
        Image.new("RGB", (400, 300), (40 * i, 90, 160)).save(tmp_path / f"scan_{i}.png")
    monkeypatch.setattr(decode, "DECODE_BUDGET_PIXELS", 2 * 400 * 300)
    held, peak, lock = [0], [0], threading.Lock()
    real = decode.load_model_image

    def counting(data, spec):
        with lock:
            held[0] += 1
            peak[0] = max(peak[0], held[0])
        try:
            import time

            time.sleep(0.05)  # long enough for the other threads to try
            return real(data, spec)
        finally:
            with lock:
                held[0] -= 1

    monkeypatch.setattr(decode, "load_model_image", counting)
    items = [ImageSource(str(f), f) for f in sorted(tmp_path.glob("*.png"))]
    batches = list(decode_batches(items, Preprocess(size=64), batch_size=6, workers=8))
    assert sum(len(b.images) for b in batches) == 6 and peak[0] == 2


def _rss_growth_streaming(bundle, folder, n_items: int) -> float:
    """Peak MB of resident memory gained while streaming n_items through the pipeline (the items
    themselves are generated lazily: nothing but the pipeline may hold them)."""
    import psutil

    files = sorted(folder.glob("*.png"))

    def stream(n):
        return (ImageSource(str(f), f) for f in itertools.islice(itertools.cycle(files), n))

    proc = psutil.Process()
    peak = 0

    def run(n):
        nonlocal peak
        counted = 0
        for pred in predict_sources(bundle, stream(n), batch_size=32, workers=2):
            assert not pred.skipped
            counted += len(pred)
            peak = max(peak, proc.memory_info().rss)
        return counted

    run(200)  # warm-up: thread pool, allocator arenas, imports
    gc.collect()
    baseline = peak = proc.memory_info().rss
    assert run(n_items) == n_items
    return (peak - baseline) / 1e6


@pytest.fixture
def small_pngs(tmp_path, images):
    folder = tmp_path / "pngs"
    folder.mkdir()
    for i in range(200):
        (folder / f"{i:03d}.png").write_bytes(images.encode(images.colour(i % 3, size=40, seed=i), "PNG"))
    return folder


# Workers hand 128 px images (48 KB each): buffering the whole stream would cost 74 MB at 1.5k
# images and 1 GB at 20k, far above the bound.
def test_memory_stays_flat_on_a_stream(colour_bundle_128, small_pngs):
    assert _rss_growth_streaming(colour_bundle_128, small_pngs, 1_500) < 25


@pytest.mark.slow
def test_memory_stays_flat_on_a_long_stream(colour_bundle_128, small_pngs):
    assert _rss_growth_streaming(colour_bundle_128, small_pngs, 20_000) < 25


def test_all_bad_input_gives_an_empty_prediction_with_reasons(colour_bundle, messy_folder):
    pred = predict_paths(colour_bundle, [messy_folder / "a" / "empty.png", messy_folder / "missing.jpg"])
    assert len(pred) == 0 and pred.labels == colour_bundle.labels
    assert pred.skipped == [SkippedFile(str(messy_folder / "a" / "empty.png"), "empty file"),
                            SkippedFile(str(messy_folder / "missing.jpg"), "file not found")]
    assert expand_paths([]) == []


def test_one_image_comes_in_a_list_and_every_kind_of_image_gives_one_answer(colour_bundle):
    """A lone path or array would be iterated as characters or pixel rows, each answered as an
    image: refused with the fix named. Paths, arrays, bytes, open files and PIL images agree."""
    from PIL import Image

    from hematoscope.data.images import load_image

    path = sample_paths()[0]
    pixels = load_image(path)
    for lone in (str(path), path, pixels, pixels[:, :, 0], path.read_bytes()):
        with pytest.raises(TypeError, match=r"pass \[image\]"):
            colour_bundle.predict(lone)
    with open(path, "rb") as fh, pytest.raises(TypeError, match=r"pass \[image\]"):
        colour_bundle.predict(fh)  # would be read line by line
    with pytest.raises(TypeError, match="image 1 is a int"):
        colour_bundle.predict([path, 7])
    with Image.open(path) as pil, open(path, "rb") as fh:
        pred = colour_bundle.predict([str(path), pixels, path.read_bytes(), fh, pil])
    assert len(pred) == 5 and not pred.skipped
    # encoded forms decode alike (JPEG at reduced scale where it can); pixels and PIL images are whole
    np.testing.assert_allclose(pred.probs[[2, 3]], pred.probs[[0, 0]], atol=1e-6)
    np.testing.assert_allclose(pred.probs[4], pred.probs[1], atol=1e-6)
    np.testing.assert_allclose(pred.probs[1], pred.probs[0], atol=1e-2)
    assert len(colour_bundle.predict(pixels[None])) == 1  # a stacked batch (N, H, W, 3) is a list of images


def test_an_unusable_array_among_images_is_skipped_with_its_reason_and_the_rest_answered(colour_bundle):
    """Arrays follow the rules files do: one that is no image (NaN, channels first) or is too small
    to hold a cell is skipped with why, named by its position, and the others are answered."""
    from hematoscope.data.images import load_image

    pixels = load_image(sample_paths()[0])
    bad = [np.full((64, 64, 3), np.nan, np.float32), pixels.transpose(2, 0, 1), np.full((1, 1, 3), 200, np.uint8)]
    with pytest.warns(UserWarning, match="3 of 5 inputs could not be read and have no row .*Prediction.sources"):
        pred = colour_bundle.predict([pixels, *bad, pixels])  # fewer rows than inputs: said, not left to find
    assert len(pred) == 2 and pred.sources == ["image_0", "image_4"]
    reasons = {s.source: s.reason for s in pred.skipped}
    assert sorted(reasons) == ["image_1", "image_2", "image_3"]
    assert "NaN" in reasons["image_1"] and "too small (1x1" in reasons["image_3"]
    np.testing.assert_allclose(pred.probs[0], pred.probs[1])
