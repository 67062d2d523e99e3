"""adapt: a bundle re-fitted to a new lab's unlabelled crops (BatchNorm statistics + OOD), nothing else."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from typer.testing import CliRunner

from hematoscope import load_bundle
from hematoscope.bundle.adapt import MIN_IMAGES, adapt_bundle, estimate_class_mix
from hematoscope.bundle.base import BundleError, ModelOutput
from hematoscope.data.images import load_image


def other_lab(images: list[np.ndarray]) -> list[np.ndarray]:
    """The same cells as another lab's camera and stain would show them: bluer, darker, flatter."""
    return [np.clip(im.astype(np.float32) * [0.7, 0.8, 1.05] + [0, 10, 25], 0, 255).astype(np.uint8) for im in images]


@pytest.fixture(scope="module")
def trusted_bundle(tiny_neural_bundle, synthetic_root, tmp_path_factory):
    """The tiny bundle with temperature and a knn_energy OOD scorer fitted on synthetic cells."""
    from hematoscope.trust.fit import fit_trust

    bundle = load_bundle(tiny_neural_bundle)
    paths = sorted(synthetic_root.rglob("*.png"))
    labels = [bundle.labels.index({"ig": "immature_granulocyte"}.get(p.parent.name, p.parent.name)) for p in paths]
    out = bundle.forward([load_image(p) for p in paths])
    idx = np.arange(len(paths))
    tr, va = idx % 3 != 0, idx % 3 == 0
    fit_trust(bundle, train=(ModelOutput(out.logits[tr], out.features[tr]), np.array(labels)[tr]),
              val=(ModelOutput(out.logits[va], out.features[va]), np.array(labels)[va]))
    return load_bundle(bundle.save(tmp_path_factory.mktemp("trusted") / "bundle"))


@pytest.fixture(scope="module")
def lab_images(synthetic_root):
    return other_lab([load_image(p) for p in sorted(synthetic_root.rglob("*.png"))])


def _bn_keys(state) -> set[str]:
    return {k for k in state if k.endswith(("running_mean", "running_var", "num_batches_tracked"))}


def test_adapt_changes_batchnorm_statistics_and_ood_and_nothing_else(trusted_bundle, lab_images):
    adapted, report = adapt_bundle(trusted_bundle, lab_images, source="lab-x", mix=1.0)
    before, after = trusted_bundle.net.model.state_dict(), adapted.net.model.state_dict()
    bn = _bn_keys(before)
    assert bn and set(before) == set(after)
    for k in set(before) - bn:
        assert np.array_equal(before[k].numpy(), after[k].numpy()), k
    changed = [k for k in bn if k.endswith("running_mean") and not np.allclose(before[k].numpy(), after[k].numpy())]
    assert len(changed) == len([k for k in bn if k.endswith("running_mean")])
    a, b = adapted.config, trusted_bundle.config
    assert (a.labels, a.preprocess, a.temperature, a.abstain_threshold, a.tta) == \
           (b.labels, b.preprocess, b.temperature, b.abstain_threshold, b.tta)
    assert a.adaptation["framing"]["framing"] == 1.0  # the same cells, recoloured: framed as in training
    assert a.ood.method == b.ood.method and a.ood.threshold != b.ood.threshold
    assert a.adaptation["images"] == len(lab_images) == report.images
    assert a.adaptation["source"] == "lab-x" and len(a.adaptation["images_sha256"]) == 64
    assert a.adaptation["statistics"]["batchnorm_layers"] > 10
    assert 0.85 <= report.accepted_after <= 1.0
    assert trusted_bundle.config.adaptation is None  # the original is untouched
    assert trusted_bundle.path.name == "bundle" and (trusted_bundle.path / "config.json").is_file()


def test_adapted_bundle_round_trips_and_card_says_so(trusted_bundle, lab_images, tmp_path):
    adapted = trusted_bundle.adapt(lab_images, source="lab-x")
    path = adapted.save(tmp_path / "adapted")
    loaded = load_bundle(path)
    p1, p2 = adapted.predict(lab_images[:12]), loaded.predict(lab_images[:12])
    np.testing.assert_allclose(p1.probs, p2.probs, atol=1e-4)
    np.testing.assert_allclose(p1.ood_score, p2.ood_score, atol=1e-3)
    assert loaded.config.adaptation == adapted.config.adaptation
    card = (path / "README.md").read_text()
    assert "Adapted to a new lab" in card and "lab-x" in card and adapted.config.adaptation["images_sha256"] in card
    made = card.splitlines()[2]  # the trained model's date stays; the adaptation's is added, not hidden
    assert trusted_bundle.config.created in made and f"adapted to 'lab-x' on {adapted.config.adaptation['date']}" in made


def test_adapt_sets_the_flag_anew_and_stores_the_labs_levels(trusted_bundle, lab_images):
    """A flag moved on the trained bundle does not carry over: adapt's threshold is set on the lab's
    own held-out crops, and its levels (from those crops) let the lab move it again."""
    import copy

    loose = copy.deepcopy(trusted_bundle)
    loose.set_ood_accept(0.99)
    adapted, report = adapt_bundle(loose, lab_images, source="lab-x", mix=1.0)
    assert adapted.config.ood_accept is None and adapted.trust_for().ood_threshold == report.ood_threshold_after
    levels = adapted.config.ood.accept_levels
    assert levels["0.95"] == pytest.approx(report.ood_threshold_after)  # adapt's default target: 95 %
    assert list(levels.values()) == sorted(levels.values())
    adapted.set_ood_accept(0.8)
    assert adapted.trust_for().ood_threshold == levels["0.8"]
    # 19 held-out crops: 97.5 % and 99 % would each reject under half a crop, so they are not offered
    held = int(round(report.images / 5))
    assert held < 20 and set(levels) == {"0.8", "0.9", "0.95"}
    with pytest.raises(BundleError, match="0.99"):
        adapted.set_ood_accept(0.99)


def test_content_hash_ignores_order_and_names(trusted_bundle, lab_images):
    _, r1 = adapt_bundle(trusted_bundle, lab_images)
    _, r2 = adapt_bundle(trusted_bundle, lab_images[::-1])
    assert r1.sha256 == r2.sha256


def test_too_few_images_are_refused_with_a_clear_message(trusted_bundle, lab_images):
    with pytest.raises(BundleError, match=f"at least {MIN_IMAGES} readable"):
        adapt_bundle(trusted_bundle, lab_images[:MIN_IMAGES - 1])


def test_a_folder_is_given_as_its_images_not_as_a_path(synthetic_root, tmp_path):
    """`bundle.adapt("lab/")` would read the letters of the path as files: refused with the way to
    pass a folder's images, which then decode as the CLI reads them."""
    from hematoscope.bundle.adapt import decode_images
    from hematoscope.data.sources import expand_paths

    folder = tmp_path / "lab"
    folder.mkdir()
    for p in sorted(synthetic_root.rglob("*.png"))[:4]:
        (folder / p.name).write_bytes(p.read_bytes())
    for lone in (str(folder), folder):
        with pytest.raises(TypeError, match=r"expand_paths\(\[folder\]\)"):
            decode_images(lone)
    arrays, digests, skipped = decode_images(expand_paths([folder]))
    assert len(arrays) == 4 and not skipped
    assert digests == decode_images(sorted(folder.iterdir()))[1]


def test_unreadable_files_are_reported_and_skipped(trusted_bundle, synthetic_root, tmp_path):
    paths = sorted(synthetic_root.rglob("*.png"))[:MIN_IMAGES + 5]
    (tmp_path / "truncated.jpg").write_bytes(paths[0].read_bytes()[:50])
    (tmp_path / "empty.png").write_bytes(b"")
    _, report = adapt_bundle(trusted_bundle, [*paths, tmp_path / "truncated.jpg", tmp_path / "empty.png"])
    assert report.images == len(paths)
    assert sorted(s.reason for s in report.skipped) == ["empty file", "truncated file"] or \
        {s.source.split("/")[-1] for s in report.skipped} == {"truncated.jpg", "empty.png"}


def test_cli_adapt_writes_a_bundle_the_predict_command_uses(trusted_bundle, synthetic_root, tmp_path):
    from hematoscope.cli.main import app

    (tmp_path / "lab").mkdir()
    for i, p in enumerate(sorted(synthetic_root.rglob("*.png"))[:60]):
        (tmp_path / "lab" / f"{i}.png").write_bytes(p.read_bytes())
    (tmp_path / "lab" / "broken.jpg").write_bytes(b"not an image")
    (tmp_path / "lab" / "slide.ndpi").write_bytes(b"a slide scan, not a crop")
    runner = CliRunner()
    res = runner.invoke(app, ["adapt", str(trusted_bundle.path), str(tmp_path / "lab"), "--out", str(tmp_path / "ad")])
    assert res.exit_code == 0, res.output
    assert "60 images" in res.output and "broken.jpg" in res.output
    assert "1 file in the folders or zips was left out" in " ".join(res.output.split()) and ".ndpi 1" in res.output
    adapted = load_bundle(tmp_path / "ad")
    assert adapted.config.adaptation["source"] == "lab" and adapted.name == "ad"  # as the web app lists it
    assert len(adapted.config.seen_images) == 60  # the lab's crops, by content: evaluate counts them
    res = runner.invoke(app, ["predict", str(tmp_path / "lab"), "--model", str(tmp_path / "ad")])
    assert res.exit_code == 0, res.output
    # the lab's model is not replaced by accident; with --overwrite it is, leaving no file of the old one
    before = (tmp_path / "ad" / "config.json").read_bytes()
    res = runner.invoke(app, ["fewshot", "fit", str(synthetic_root), "-n", "2", "--head", "lr", "--size", "32",
                              "--out", str(tmp_path / "ad")])
    assert res.exit_code == 2 and "already holds a model bundle" in " ".join(res.output.replace("│", " ").split())
    assert (tmp_path / "ad" / "config.json").read_bytes() == before
    res = runner.invoke(app, ["fewshot", "fit", str(synthetic_root), "-n", "2", "--head", "lr", "--size", "32",
                              "--out", str(tmp_path / "ad"), "--overwrite"])
    assert res.exit_code == 0, res.output
    assert load_bundle(tmp_path / "ad").kind == "fewshot" and not (tmp_path / "ad" / "model.safetensors").exists()


def test_cli_adapt_refuses_a_folder_without_enough_images(trusted_bundle, tmp_path):
    from hematoscope.cli.main import app

    (tmp_path / "few").mkdir()
    res = CliRunner().invoke(app, ["adapt", str(trusted_bundle.path), str(tmp_path / "few"), "--out",
                                   str(tmp_path / "x")])
    assert res.exit_code == 2 and "at least" in res.output and not (tmp_path / "x").exists()
    # a path that is not there, and an unreadable crop, are named in the refusal with their reasons
    (tmp_path / "few" / "broken.jpg").write_bytes(b"not an image")
    res = CliRunner().invoke(app, ["adapt", str(trusted_bundle.path), str(tmp_path / "nowhere"),
                                   str(tmp_path / "few"), "--out", str(tmp_path / "x")])
    text = "".join(res.output.replace("│", "").split())  # rich may wrap a long path anywhere
    assert res.exit_code == 2 and "got0(2unreadable:" in text, res.output
    assert "nowhere:filenotfound" in text and "broken.jpg:" in text


def test_batchnorm_mix_is_chosen_by_lowest_entropy_and_applied(trusted_bundle, lab_images):
    from hematoscope.bundle.neural_torch import batchnorm_statistics

    auto, _ = adapt_bundle(trusted_bundle, lab_images)
    stats = auto.config.adaptation["statistics"]
    entropies = {float(m): e for m, e in stats["mean_entropy_by_mix"].items()}
    assert set(entropies) == {0.0, 0.25, 0.5, 0.75, 1.0}
    assert stats["mix"] == min(entropies, key=entropies.get) and stats["mix_chosen_by"].startswith("lowest")
    full, _ = adapt_bundle(trusted_bundle, lab_images, mix=1.0)
    trained, new = batchnorm_statistics(trusted_bundle.net), batchnorm_statistics(full.net)
    m = stats["mix"]
    for k, v in batchnorm_statistics(auto.net).items():
        np.testing.assert_allclose(v.numpy(), m * new[k].numpy() + (1 - m) * trained[k].numpy(), rtol=1e-4,
                                   atol=1e-5)
    none, _ = adapt_bundle(trusted_bundle, lab_images, mix=0.0)
    for k, v in batchnorm_statistics(none.net).items():
        np.testing.assert_array_equal(v.numpy(), trained[k].numpy())


def test_default_names_the_shipped_model():
    from hematoscope.bundle.default import load_default_bundle

    assert load_bundle("default").config == load_default_bundle().config


WHITE = ["basophil", "eosinophil", "lymphocyte", "monocyte", "neutrophil"]


def test_tuning_changes_the_backbone_only_and_is_recorded_and_seeded(trusted_bundle, lab_images, tmp_path):
    from hematoscope.bundle.neural_torch import batchnorm_statistics

    plain, _ = adapt_bundle(trusted_bundle, lab_images, mix=1.0)
    tuned, report = adapt_bundle(trusted_bundle, lab_images, mix=1.0, classes=WHITE, tune_epochs=3)
    again, _ = adapt_bundle(trusted_bundle, lab_images, mix=1.0, classes=WHITE, tune_epochs=3)
    before, after = plain.net.model.state_dict(), tuned.net.model.state_dict()
    head = {k for k in before if k.startswith("classifier.")}
    assert head and all(np.array_equal(before[k].numpy(), after[k].numpy()) for k in head)
    moved = [k for k in set(before) - head - _bn_keys(before) if not np.array_equal(before[k].numpy(), after[k].numpy())]
    assert len(moved) > 10
    stats = batchnorm_statistics(tuned.net)  # they follow the tuned features
    assert any(not np.allclose(v.numpy(), batchnorm_statistics(plain.net)[k].numpy()) for k, v in stats.items())
    for k, v in again.net.model.state_dict().items():
        np.testing.assert_array_equal(v.numpy(), after[k].numpy())  # seeded
    losses = report.tuning["loss_by_epoch"]
    assert len(losses) == 3 and losses[-1] < losses[0]
    a = tuned.config.adaptation
    assert a["classes"] == WHITE and a["tuning"]["epochs"] == 3 and plain.config.adaptation["tuning"] is None
    card = (tuned.save(tmp_path / "tuned") / "README.md").read_text()
    assert "tuned on these images without labels" in card and "answers among these by default" in card
    assert "in the class mix estimated from these images (" in card


def test_class_mix_estimate_recovers_a_labs_differential_from_posteriors_of_a_model_trained_on_another():
    """Exact posteriors of three 1-D Gaussian classes under the training mix, for cells drawn in
    a lab's very different mix: EM recovers the lab's mix; the plain mean answer does not."""
    rng = np.random.default_rng(0)
    trained, lab = np.array([0.2, 0.3, 0.5]), np.array([0.65, 0.3, 0.05])
    centres = np.array([-1.5, 0.0, 1.5])
    y = rng.choice(3, size=4000, p=lab)
    x = rng.normal(centres[y], 1.0)
    joint = trained * np.exp(-0.5 * (x[:, None] - centres) ** 2)
    posteriors = joint / joint.sum(1, keepdims=True)
    mix = estimate_class_mix(posteriors, trained)
    assert np.abs(mix - lab).max() < 0.03, mix
    assert np.abs(posteriors.mean(0) - lab).max() > 0.1  # the naive estimate leans towards training
    assert mix.sum() == pytest.approx(1.0)
    # the same posteriors under an equal training mix, and a class the lab lacks keeps a floor
    flat = np.exp(-0.5 * (x[:, None] - centres) ** 2)
    assert np.abs(estimate_class_mix(flat / flat.sum(1, keepdims=True)) - lab).max() < 0.03
    one = np.eye(3)[np.zeros(100, int)] * 0.999 + 0.001 / 3
    assert estimate_class_mix(one, trained).min() >= 1e-3


def test_tuning_follows_the_estimated_class_mix_unless_asked_for_equal_shares(trusted_bundle, lab_images):
    estimated, report = adapt_bundle(trusted_bundle, lab_images, mix=1.0, classes=WHITE, tune_epochs=1)
    assert list(report.class_mix) == WHITE and sum(report.class_mix.values()) == pytest.approx(1.0, abs=1e-3)
    assert estimated.config.adaptation["tuning"]["class_mix"] == report.class_mix
    uniform, report = adapt_bundle(trusted_bundle, lab_images, mix=1.0, classes=WHITE, tune_epochs=1,
                                   class_mix="uniform")
    assert report.class_mix == {} and uniform.config.adaptation["tuning"]["class_mix"] == "uniform"
    diff = [k for k, v in estimated.net.model.state_dict().items()
            if not np.array_equal(v.numpy(), uniform.net.model.state_dict()[k].numpy())]
    assert diff  # the target changes what tuning learns
    with pytest.raises(ValueError, match="class_mix must be one of"):
        adapt_bundle(trusted_bundle, lab_images, classes=WHITE, tune_epochs=1, class_mix="balanced")


def test_tuning_refuses_a_class_mix_that_is_not_shares_of_its_classes(trusted_bundle, lab_images):
    import torch

    from hematoscope.bundle.neural_torch import tune_unlabelled

    x = torch.zeros(4, 3, 32, 32)
    for bad in ([0.5, 0.5], [0.5, 0.3, 0.1], [1.2, -0.1, -0.1]):
        with pytest.raises(ValueError, match="positive shares summing to 1"):
            tune_unlabelled(trusted_bundle.net, x, [0, 1, 2], epochs=1, class_mix=bad)


def test_the_default_model_records_the_class_mix_it_was_trained_on():
    mix = load_bundle("default").trained_class_mix
    assert mix is not None and mix.shape == (8,) and mix.sum() == pytest.approx(1.0) and (mix > 0.05).all()


@pytest.mark.slow
def test_tuning_on_a_labs_natural_differential_keeps_its_count_with_the_estimated_class_mix(lisc_root):
    """A lab's unlabelled crops in a normal differential (57 % neutrophils, 2 % basophils; drawn
    from LISC's own-lab half): tuning towards equal shares turns neutrophils into other classes;
    towards the estimated mix the lab's count stays right. Scored on the test half's crops
    weighted to that differential (split by cell)."""
    from hematoscope.data.readers import read_dataset
    from hematoscope.data.splits import make_split

    table = make_split(read_dataset(lisc_root, reader="lisc"), val=0.0, test=0.5, seed=0, group_by="patient")
    differential = {"neutrophil": 120, "lymphocyte": 65, "monocyte": 15, "eosinophil": 8, "basophil": 4}
    own = table[table["split"] == "train"]
    lab = pd.concat([own[own["canonical"] == c].sample(n, random_state=0) for c, n in differential.items()])
    test = table[table["split"] == "test"]
    default = load_bundle("default")
    count_accuracy = {}
    for mix in ("estimated", "uniform"):
        adapted, report = adapt_bundle(default, list(lab["path"]), classes=WHITE, tune_epochs=8, class_mix=mix)
        pred = np.array(adapted.labels)[adapted.predict(list(test["path"])).probs.argmax(1)]
        recall = {c: np.mean(pred[test["canonical"].to_numpy() == c] == c) for c in differential}
        count_accuracy[mix] = sum(n * recall[c] for c, n in differential.items()) / sum(differential.values())
        if mix == "estimated":
            assert report.class_mix["neutrophil"] > 0.4 and report.class_mix["basophil"] < 0.1, report.class_mix
    assert count_accuracy["estimated"] >= count_accuracy["uniform"] + 0.05, count_accuracy


@pytest.mark.slow
def test_tuning_on_another_labs_unlabelled_cells_raises_macro_f1_on_held_out_cells(lisc_root):
    """The shipped model, adapted to 300 unlabelled LISC crops with and without tuning, scored on
    the crops of the other half of LISC's cells (split by cell)."""
    from sklearn.metrics import f1_score

    from hematoscope.data.readers import read_dataset
    from hematoscope.data.splits import make_split

    table = make_split(read_dataset(lisc_root, reader="lisc"), val=0.0, test=0.5, seed=0, group_by="patient")
    own = table[table["split"] == "train"].sample(300, random_state=0)
    test = table[table["split"] == "test"]
    assert not set(own["patient"]) & set(test["patient"])
    default = load_bundle("default")
    scores = {}
    for epochs in (0, 8):
        adapted, _ = adapt_bundle(default, list(own["path"]), classes=WHITE, tune_epochs=epochs)
        adapted.set_tta(1)
        pred = adapted.predict(list(test["path"]))
        scores[epochs] = f1_score(list(test["canonical"]), [adapted.labels[i] for i in pred.probs.argmax(1)],
                                  labels=WHITE, average="macro")
    assert scores[8] >= scores[0] + 0.08, scores


@pytest.mark.parametrize("classes, message", [(["neutrophil"], "needs at least 2 of"),
                                              (["neutrophil", "megakaryocyte"], "not classes of .*: megakaryocyte")])
def test_bad_lab_classes_are_refused(trusted_bundle, lab_images, classes, message):
    with pytest.raises(BundleError, match=message):
        adapt_bundle(trusted_bundle, lab_images, classes=classes, tune_epochs=1)


def test_cli_adapt_tune_with_classes(trusted_bundle, synthetic_root, tmp_path):
    from hematoscope.cli.main import app

    (tmp_path / "lab").mkdir()
    for i, p in enumerate(sorted(synthetic_root.rglob("*.png"))[:60]):
        (tmp_path / "lab" / f"{i}.png").write_bytes(p.read_bytes())
    res = CliRunner().invoke(app, ["adapt", str(trusted_bundle.path), str(tmp_path / "lab"), "--out",
                                   str(tmp_path / "ad"), "--tune", "--tune-epochs", "2", "--classes", ",".join(WHITE)])
    assert res.exit_code == 0, res.output
    out = " ".join(res.output.split())  # rich wraps long lines
    assert "tuned 2 epochs among basophil" in out and f"it answers among {', '.join(WHITE)}" in out
    assert "class mix tuned towards:" in out
    adapted = load_bundle(tmp_path / "ad")
    assert adapted.config.adaptation["tuning"]["epochs"] == 2
    assert adapted.answerable_classes == WHITE  # the lab's classes are its default answers
    res = CliRunner().invoke(app, ["predict", str(tmp_path / "lab"), "--model", str(tmp_path / "ad"), "--out",
                                   str(tmp_path / "p.csv")])
    assert res.exit_code == 0, res.output
    out = " ".join(res.output.split())
    assert "answers restricted to: basophil" in out and "adapted to" in out
    assert set(pd.read_csv(tmp_path / "p.csv")["prediction"]) <= set(WHITE)
    adapted.restrict_classes(adapted.labels)
    assert adapted.answerable_classes == adapted.labels


def test_a_kind_that_cannot_change_for_a_lab_is_refused_and_nothing_is_written(tiny_classical_bundle, lab_images,
                                                                                tmp_path):
    """Adapting a classical bundle could only refit its OOD flag: its answers on the lab's cells
    would be no better, but no longer set aside; refused before any image is read."""
    from hematoscope.cli.main import app

    classical = load_bundle(tiny_classical_bundle)
    assert not classical.adaptable
    for tune in (0, 1):
        with pytest.raises(BundleError, match="cannot be adapted"):
            adapt_bundle(classical, lab_images, tune_epochs=tune)
    lab = tmp_path / "lab"
    lab.mkdir()
    res = CliRunner().invoke(app, ["adapt", str(tiny_classical_bundle), str(lab), "--out", str(tmp_path / "ad")])
    assert res.exit_code != 0 and "cannot be adapted" in " ".join(res.output.split())
    assert not (tmp_path / "ad").exists()


def test_a_group_norm_network_keeps_its_weights_and_only_refits_ood(lab_images):
    import torch

    from hematoscope.bundle.neural import NeuralBundle
    from hematoscope.models.preprocess import Preprocess

    torch.manual_seed(0)
    bundle = NeuralBundle.create(["lymphocyte", "monocyte", "neutrophil"], arch="test_efficientnet", weights=None,
                                 preprocess=Preprocess(size=32), norm="group")
    adapted, report = adapt_bundle(bundle, lab_images, source="lab-g")
    before, after = bundle.net.state_dict(), adapted.net.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert report.statistics["batchnorm_layers"] == 0 and report.statistics["method"].startswith("none")
    assert adapted.config.model.norm == "group"


def test_adapting_the_default_model_drops_its_per_view_trust_and_cascade_without_warnings(lab_images, tmp_path,
                                                                                          caplog):
    default = load_bundle("default")
    assert default.config.cascade is not None and default.config.view_trust
    adapted, _ = adapt_bundle(default, lab_images, source="lab-c", classes=WHITE)
    assert adapted.config.cascade is None and not adapted.config.view_trust
    assert adapted.config.adaptation["per_view_trust_dropped"] and adapted.config.adaptation["views"] == 1
    assert "were dropped: it runs 1 fixed view(s)" in (adapted.save(tmp_path / "lab") / "README.md").read_text()
    with caplog.at_level("WARNING"):
        again = load_bundle(tmp_path / "lab")
        pred = again.predict(lab_images[:8])
    assert not [r for r in caplog.records if r.levelname == "WARNING"], caplog.text
    assert set(pred.views) == {1} and again.view_mode == "1"


@pytest.fixture(scope="module")
def pbc_cells(pbc_root):
    """64 real PBC test-like cells (8 per class) as the default model decodes them, with labels."""
    from hematoscope.data.readers import read_dataset

    from hematoscope.data.images import load_model_image

    table = read_dataset(pbc_root)
    table = table[~table["path"].map(lambda p: Path(p).name.startswith("."))].groupby("canonical").head(8)
    default = load_bundle("default")

    return [load_model_image(p, default.preprocess) for p in table["path"]], np.array(table["canonical"])


def test_adapt_finds_a_tighter_labs_framing_and_keeps_a_like_labs(pbc_cells, tmp_path):
    """A lab that crops tight around each cell (PBC cells cut to their centre 40 %): adapt pads
    them back to about the size the model was trained on, and answers far better; PBC's own
    framing is kept for PBC's cells."""
    from hematoscope.models.preprocess import centre_crop

    images, truth = pbc_cells
    tight = [centre_crop(im, 0.4) for im in images]
    default = load_bundle("default")
    framed, report = adapt_bundle(default, tight, source="tight lab")
    kept, _ = adapt_bundle(default, tight, source="tight lab", framing=None)
    assert framed.preprocess.framing >= 1.5 and kept.preprocess.framing == 1.0
    scores = report.framing["mean_ood_score"]
    assert scores[f"{framed.preprocess.framing:g}"] == min(scores.values()) < scores["1"]

    def accuracy(bundle):
        return np.mean(np.array(bundle.predict(tight).predicted) == truth)

    assert accuracy(framed) > accuracy(kept) + 0.15
    again = load_bundle(framed.save(tmp_path / "tight"))
    assert again.preprocess.framing == framed.preprocess.framing
    np.testing.assert_allclose(again.predict(tight[:8]).probs, framed.predict(tight[:8]).probs, atol=1e-5)
    assert "framing: the model sees a frame" in (tmp_path / "tight" / "README.md").read_text()
    like, _ = adapt_bundle(default, images, source="PBC itself")
    assert like.preprocess.framing == 1.0 and like.config.adaptation["framing"]["framing"] == 1.0


def test_cli_adapt_sets_a_framing(trusted_bundle, synthetic_root, tmp_path):
    from hematoscope.cli.main import app

    out = tmp_path / "framed"
    r = CliRunner().invoke(app, ["adapt", str(trusted_bundle.path), str(synthetic_root), "--out", str(out),
                                 "--framing", "1.5", "--no-onnx"])
    assert r.exit_code == 0, r.output
    assert load_bundle(out).preprocess.framing == 1.5 and "padded to 1.5×" in r.output
    r = CliRunner().invoke(app, ["adapt", str(trusted_bundle.path), str(synthetic_root), "--out", str(out),
                                 "--framing", "tight"])
    assert r.exit_code == 2 and "--framing" in r.output


def test_the_framing_is_chosen_on_the_callers_network_and_leaves_it_untouched(lab_images, monkeypatch):
    """The framing choice runs the trained network as the caller loaded it (ONNX Runtime for the
    default model, several times faster than the torch copy whose statistics adapt changes), on
    a twin: a served bundle keeps its own framing while another lab adapts it."""
    import hematoscope.bundle.adapt as adapt_module

    default = load_bundle("default")
    before = default.config.model_dump()
    seen = []

    def spy(bundle, *args, **kwargs):
        seen.append((bundle, bundle.active_backend))
        return choose(bundle, *args, **kwargs)

    choose = adapt_module.choose_framing
    monkeypatch.setattr(adapt_module, "choose_framing", spy)
    adapt_bundle(default, lab_images, source="lab-d")
    (twin, backend), = seen
    assert twin is not default and twin.runner is default.runner and backend == "onnx"
    assert default.config.model_dump() == before
