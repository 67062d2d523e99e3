import csv
import subprocess
import sys
import time

import pytest
from typer.testing import CliRunner

from hematoscope import __version__
from hematoscope.cli.main import app
from hematoscope.samples import sample_paths

runner = CliRunner()


def test_version():
    result = runner.invoke(app, ["--version"])
    assert result.exit_code == 0
    assert result.output.strip() == f"hematoscope {__version__}"


def test_help_lists_every_command_group():
    result = runner.invoke(app, ["--help"])
    assert result.exit_code == 0
    for cmd in ("demo", "data", "train", "evaluate", "predict", "features", "fewshot", "classical", "trust",
                "export", "serve"):
        assert cmd in result.output


def _commands(group, prefix=()):
    """(path, click command) of every command, through the sub-groups."""
    for name, cmd in group.commands.items():
        if hasattr(cmd, "commands"):
            yield from _commands(cmd, (*prefix, name))
        else:
            yield (*prefix, name), cmd


def test_every_command_help_flows_in_paragraphs():
    """Typer's rich help keeps single line breaks of a docstring: every command's help is
    reflowed so the list of commands shows one summary line, and the help no ragged lines."""
    import typer.main

    from hematoscope.cli.main import reflowed

    commands = list(_commands(typer.main.get_command(app)))
    assert len(commands) > 20
    for path, cmd in commands:
        paragraphs = cmd.help.split("\n\n")
        assert paragraphs[0] and "\n" not in paragraphs[0], f"hematoscope {' '.join(path)}: {paragraphs[0]!r}"
        for para in paragraphs[1:]:
            assert "\n" not in para or all(line.startswith(("- ", "* ")) for line in para.splitlines()[:1]), para
    assert reflowed("""Sum up.

        First line
        goes on.

        - one
        - two
        """) == "Sum up.\n\nFirst line goes on.\n\n- one\n- two"


def test_flags_show_no_value_in_help_and_options_their_type():
    """A flag takes no value: help must not show one (``--outliers <bool>`` reads as
    ``--outliers true``, which is refused)."""
    result = runner.invoke(app, ["data", "check", "--help"], terminal_width=160)
    assert result.exit_code == 0
    lines = {line.split()[1]: line for line in result.output.splitlines() if line.startswith("│ --")}
    assert "<bool>" not in result.output
    assert "<int>" in lines["--workers"] and "<path>" in lines["--json"]


def test_help_is_fast_and_imports_no_heavy_library():
    code = ("import sys, time; t = time.perf_counter(); from hematoscope.cli.main import app; "
            "heavy = [m for m in ('torch', 'timm', 'sklearn', 'xgboost', 'fastapi', 'onnxruntime', 'skimage', "
            "'matplotlib', 'pandas') if m in sys.modules]; print(heavy, time.perf_counter() - t)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    heavy, seconds = out.rsplit(" ", 1)
    assert heavy == "[]", f"CLI import pulled in heavy libraries: {heavy}"
    assert float(seconds) < 1.0


def test_demo_classifies_bundled_samples(tiny_neural_bundle, tmp_path):
    out = tmp_path / "demo.csv"
    result = runner.invoke(app, ["demo", "--model", str(tiny_neural_bundle), "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert "Differential count" in result.output
    said = " ".join(result.output.split())
    import re

    answered = re.search(r"(\d+)/(\d+) answered sample cells right", said)
    assert answered and int(answered[1]) <= int(answered[2]) <= len(sample_paths())
    aside = len(sample_paths()) - int(answered[2])  # set-aside cells are not counted as answers
    assert (f"; {aside} set aside" in said) == (aside > 0)
    with open(out, newline="") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == len(sample_paths())


def test_demo_with_missing_model_says_why(tmp_path):
    result = runner.invoke(app, ["demo", "--model", str(tmp_path / "nope")])
    assert result.exit_code == 2
    assert "no bundle at" in result.output


@pytest.mark.parametrize("signal_exc, code, said", [("KeyboardInterrupt", 130, "interrupted"),
                                                    ("Terminated", 143, "stopped (SIGTERM)")])
def test_an_interrupted_command_says_so_and_exits_128_plus_the_signal(monkeypatch, tmp_path, signal_exc, code, said):
    """Typer exits 130 on Ctrl-C without a word (and SIGTERM killed outright, leaving partial
    files); the command names itself and what it left."""
    import hematoscope.data.readers as readers
    from hematoscope.cli._common import Terminated

    def interrupted(*args, **kwargs):
        raise {"KeyboardInterrupt": KeyboardInterrupt, "Terminated": Terminated}[signal_exc]

    monkeypatch.setattr(readers, "read_dataset", interrupted)
    out = tmp_path / "split.csv"
    result = runner.invoke(app, ["data", "split", str(tmp_path), "--out", str(out)])
    assert result.exit_code == code
    assert f"hematoscope data split: {said}" in " ".join(result.output.split())
    assert not out.exists()


def test_an_interruption_inside_a_librarys_clean_up_is_still_an_interruption(monkeypatch, tmp_path):
    """Ctrl-C landing in Ray Data's threads surfaced as "RuntimeError: release unlocked lock",
    chained to the KeyboardInterrupt: a traceback and exit 1 instead of the interruption's word."""
    import hematoscope.data.readers as readers

    def interrupted_in_a_lock(*args, **kwargs):
        try:
            raise KeyboardInterrupt
        except KeyboardInterrupt:
            raise RuntimeError("release unlocked lock")

    monkeypatch.setattr(readers, "read_dataset", interrupted_in_a_lock)
    result = runner.invoke(app, ["data", "split", str(tmp_path), "--out", str(tmp_path / "s.csv")])
    assert result.exit_code == 130 and "interrupted" in result.output

    def failed(*args, **kwargs):
        raise RuntimeError("a real error")

    monkeypatch.setattr(readers, "read_dataset", failed)
    result = runner.invoke(app, ["data", "split", str(tmp_path), "--out", str(tmp_path / "s.csv")])
    assert result.exit_code != 130 and "interrupted" not in result.output


def test_sigterm_stops_predict_without_leaving_a_partial_file(tmp_path):
    """The console script turns SIGTERM into the clean-up path Ctrl-C takes."""
    import os
    import signal

    folder = tmp_path / "cells"
    folder.mkdir()
    for i in range(400):  # one real cell, many times: enough work to be caught mid-run
        (folder / f"c{i:03d}.jpg").write_bytes(sample_paths()[i % 24].read_bytes())
    out = tmp_path / "p.csv"
    proc = subprocess.Popen([sys.executable, "-c", "from hematoscope.cli.main import run; run()", "predict",
                             str(folder), "--out", str(out), "--tta", "8", "--backend", "torch"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while time.time() < deadline and not any(tmp_path.glob(".p.csv*")):  # the partial file is being written
        time.sleep(0.2)
    os.kill(proc.pid, signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 143, err
    assert "stopped (SIGTERM)" in " ".join(err.split())
    assert not out.exists() and not list(tmp_path.glob(".p.csv*"))


def test_the_packages_warnings_are_one_plain_line(monkeypatch, capsys):
    import warnings

    import hematoscope.trust.calibration as calibration
    from hematoscope.cli import main

    monkeypatch.setattr(warnings, "showwarning", warnings.showwarning)  # restored after the test
    main._show_warnings_plainly()
    warnings.warn_explicit("no temperature can be fitted", UserWarning, calibration.__file__, 1)
    warnings.warn_explicit("a library's own", UserWarning, warnings.__file__, 1)
    err = capsys.readouterr().err
    assert err.startswith("warning: no temperature can be fitted\n") and "UserWarning: no temperature" not in err
    assert "a library's own" not in err  # others go on to the handler before (here pytest's record)
