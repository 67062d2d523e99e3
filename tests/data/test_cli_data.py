from typer.testing import CliRunner

from hematoscope.cli.main import app
from hematoscope.data.readers import read_dataset
from hematoscope.data.synthetic import make_synthetic_dataset


def test_readers_lists_every_reader():
    res = CliRunner().invoke(app, ["data", "readers"])
    assert res.exit_code == 0
    for name in ("folder", "csv", "pbc", "matek", "raabin", "cnmc", "bccd", "bloodmnist", "hida"):
        assert name in res.output


def test_synthetic_command_writes_a_dataset(tmp_path):
    res = CliRunner().invoke(app, ["data", "synthetic", str(tmp_path / "syn"), "--n", "2", "--size", "24"])
    assert res.exit_code == 0, res.output
    table = read_dataset(tmp_path / "syn")
    assert len(table) == 16 and table["canonical"].notna().all()


def test_check_unknown_reader_is_a_clean_error(tmp_path):
    res = CliRunner().invoke(app, ["data", "check", str(tmp_path), "--reader", "nope"])
    assert res.exit_code == 2 and "unknown reader" in res.output


def test_a_zip_is_not_taken_for_a_csv(tmp_path):
    import zipfile

    root = make_synthetic_dataset(tmp_path / "d", classes=["a", "b"], n_per_class=2, size=16)
    with zipfile.ZipFile(tmp_path / "ds.zip", "w") as zf:
        for f in sorted(root.rglob("*.png")):
            zf.write(f, f.relative_to(root).as_posix())
    for cmd in ("check", "split"):
        res = CliRunner().invoke(app, ["data", cmd, str(tmp_path / "ds.zip"), "--out", str(tmp_path / "s.csv")]
                                 if cmd == "split" else ["data", cmd, str(tmp_path / "ds.zip")])
        text = " ".join(res.output.split())
        assert res.exit_code == 2 and "is a zip file" in text and "unzip it" in text, text
        assert "not a .csv file" not in text
