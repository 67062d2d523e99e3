"""``hematoscope serve`` refuses to start with a clear message when there is nothing to serve."""
from __future__ import annotations

from typer.testing import CliRunner

from hematoscope.cli.main import app


def test_missing_bundle_is_a_clear_error(tmp_path):
    result = CliRunner().invoke(app, ["serve", "--model", str(tmp_path / "nope"), "--db", str(tmp_path / "h.db")])
    assert result.exit_code == 2
    output = " ".join(result.output.split())  # rich wraps long lines
    assert "cannot serve" in output and "no bundle at" in output


def test_no_default_model_is_a_clear_error(tmp_path, monkeypatch):
    import hematoscope.bundle.default as default

    monkeypatch.setattr(default, "DEFAULT_MODEL_DIR", tmp_path / "not_installed")
    result = CliRunner().invoke(app, ["serve", "--db", str(tmp_path / "h.db")])
    assert result.exit_code == 2
    output = " ".join(result.output.split())
    assert "no model to serve" in output and "--model" in output
