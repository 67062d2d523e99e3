"""Bundle.save, the one way a bundle reaches disk: only changed files are rewritten, files of the
format the bundle no longer has are removed, and the bundle object is left as it was."""
from __future__ import annotations

import shutil
import zipfile

import numpy as np

from hematoscope import load_bundle
from hematoscope.trust import fit_trust


def _images(n, seed):
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 256, (48, 48, 3), dtype=np.uint8) for _ in range(n)]


def _stat(path):
    st = path.stat()
    return st.st_ino, st.st_mtime_ns, path.read_bytes()


def test_trust_refit_rewrites_config_not_weights(tiny_neural_bundle, tmp_path):
    path = tmp_path / "bundle"
    shutil.copytree(tiny_neural_bundle, path)
    (path / "notes.txt").write_text("kept")
    weights, config = _stat(path / "model.safetensors"), (path / "config.json").read_bytes()
    bundle = load_bundle(path)
    y = np.arange(24) % len(bundle.labels)
    fit_trust(bundle, train=(bundle.forward(_images(24, 0)), y), val=(bundle.forward(_images(24, 1)), y),
              method="energy")
    assert bundle.save(path) == path
    assert _stat(path / "model.safetensors") == weights  # same bytes, same file: not rewritten
    assert (path / "config.json").read_bytes() != config
    assert load_bundle(path).config.ood.method == "energy"
    assert (path / "notes.txt").read_text() == "kept"
    assert not any(p.name.startswith(".") for p in tmp_path.iterdir())  # no temporary left behind


def test_save_elsewhere_does_not_rebind_and_drops_stale_format_files(tiny_neural_bundle, tmp_path):
    bundle = load_bundle(tiny_neural_bundle)
    target = tmp_path / "copy"
    target.mkdir()
    (target / "ood.safetensors").write_bytes(b"stale scorer")  # the bundle has no scorer
    (target / "model.onnx").write_bytes(b"stale export")  # exported from other weights
    bundle.save(target)
    assert bundle.path == tiny_neural_bundle
    assert not (target / "ood.safetensors").exists() and not (target / "model.onnx").exists()
    assert (target / "model.safetensors").read_bytes() == (tiny_neural_bundle / "model.safetensors").read_bytes()


def test_onnx_export_in_place_adds_the_graph_and_keeps_the_weights_file(tiny_neural_bundle, tmp_path):
    from hematoscope.export.onnx import export_onnx

    path = tmp_path / "bundle"
    shutil.copytree(tiny_neural_bundle, path)
    weights = _stat(path / "model.safetensors")
    export_onnx(load_bundle(path))
    assert _stat(path / "model.safetensors") == weights
    again = load_bundle(path)
    assert again.config.model.onnx["file"] == "model.onnx" and (path / "model.onnx").is_file()
    again.save(path)  # saving back home keeps the export
    assert (path / "model.onnx").is_file()
    # a zip or a copy elsewhere carries it while the weights are the exported ones, so the copy
    # still runs on ONNX Runtime (the base install's only engine) ...
    again.save(tmp_path / "b.zip")
    with zipfile.ZipFile(tmp_path / "b.zip") as zf:
        assert "model.onnx" in zf.namelist()
    assert load_bundle(tmp_path / "b.zip").active_backend == "onnx"
    # ... and not once they changed (an adapted network): the export would answer for the old one
    import torch

    with torch.no_grad():
        next(again.net.parameters()).add_(1.0)
    again.save(tmp_path / "changed")
    assert not (tmp_path / "changed" / "model.onnx").exists()


def test_every_saved_file_is_readable_by_other_users(tiny_neural_bundle, tmp_path):
    """A bundle is copied to a lab's server and read by the user it runs as."""
    import os
    import stat

    import torch

    bundle = load_bundle(tiny_neural_bundle)
    with torch.no_grad():  # changed weights: written from the network, not copied from the file
        next(bundle.net.parameters()).add_(0.01)
    umask = os.umask(0o022)
    try:
        out = bundle.save(tmp_path / "fresh")
    finally:
        os.umask(umask)
    modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in out.iterdir()}
    assert "model.safetensors" in modes and set(modes.values()) == {0o644}, modes
