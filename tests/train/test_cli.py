"""``hematoscope train`` argument handling (the training itself is covered in test_train.py)."""
from __future__ import annotations

from typer.testing import CliRunner

from hematoscope.cli.main import app


def test_train_without_out_is_a_clean_error(synthetic_root):
    result = CliRunner().invoke(app, ["train", str(synthetic_root)])
    assert result.exit_code == 2 and "--out" in _flat(result.output)


def test_train_config_file_errors_are_clean(synthetic_root, tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("epochz: 3\n")
    result = CliRunner().invoke(app, ["train", str(synthetic_root), "--out", str(tmp_path / "r"), "--config", str(cfg)])
    assert result.exit_code == 2 and "epochz" in _flat(result.output)
    result = CliRunner().invoke(app, ["train", "--resume", str(tmp_path)])
    assert result.exit_code == 2 and "not a training run" in _flat(result.output)
    # options beside --resume were dropped without a word: a changed --epochs looked applied
    result = CliRunner().invoke(app, ["train", "--resume", str(tmp_path), "--epochs", "4", "--lr", "0.5"])
    assert result.exit_code == 2 and "not used with it: epochs, lr" in _flat(result.output)


def test_train_missing_data_is_a_clean_error(tmp_path):
    result = CliRunner().invoke(app, ["train", str(tmp_path / "nowhere"), "--out", str(tmp_path / "r"),
                                      "--epochs", "1"])
    assert result.exit_code == 2 and "does not exist" in _flat(result.output)
    assert not (tmp_path / "r" / "bundle").exists()


def test_train_on_rows_without_labels_is_refused_and_leaves_no_run_folder(synthetic_root, tmp_path):
    files = sorted(synthetic_root.rglob("*.png"))[:20]
    (tmp_path / "half.csv").write_text("path,label\n" + "".join(
        f"{p},{p.parent.name if i % 2 else ''}\n" for i, p in enumerate(files)))
    result = CliRunner().invoke(app, ["train", str(tmp_path / "half.csv"), "--out", str(tmp_path / "r"),
                                      "--epochs", "1"])
    assert result.exit_code == 2 and "10 of 20 images have no label" in _flat(result.output)
    assert not (tmp_path / "r").exists()


def test_an_option_out_of_range_is_named_in_one_line(synthetic_root, tmp_path):
    result = CliRunner().invoke(app, ["train", str(synthetic_root), "--out", str(tmp_path / "r"), "--size", "0"])
    assert result.exit_code == 2 and "size: Input should be greater than or equal to 8" in _flat(result.output)
    assert "pydantic.dev" not in result.output and not (tmp_path / "r").exists()


def _flat(text: str) -> str:
    """Console output with rich's line wrapping undone."""
    return " ".join(text.split())


def test_a_stopped_training_says_how_to_resume(synthetic_root, tmp_path, monkeypatch):
    import hematoscope.train

    def interrupted(config):
        raise KeyboardInterrupt

    monkeypatch.setattr(hematoscope.train, "train", interrupted)
    result = CliRunner().invoke(app, ["train", str(synthetic_root), "--out", str(tmp_path / "r"), "--epochs", "1"])
    assert result.exit_code == 130 and f"hematoscope train --resume {tmp_path / 'r'}" in _flat(result.output)
